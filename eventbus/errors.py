"""The library's own exceptions.

Driver exceptions (asyncpg, nats) are mapped to these at the boundary, with the original kept as ``__cause__``.
Every message says what went wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseError",
    "DatabaseUnavailable",
    "DeserializationError",
    "EventBusError",
    "MigrationLocked",
    "MigrationsMissing",
    "NotInTransaction",
    "RegistrationError",
    "UnknownTopic",
]


class EventBusError(Exception):
    """Base class of every error raised by eventbus."""


class ConfigurationError(EventBusError):
    """A setting is invalid (schema name, DSN, option value)."""


class RegistrationError(EventBusError):
    """An event class or a handler cannot be registered as declared."""


class UnknownTopic(EventBusError):
    """A topic name has no registered event class."""


class DeserializationError(EventBusError):
    """A payload does not decode into its event class; it becomes a ``DeserializationFailed`` dead letter."""


class NotInTransaction(EventBusError):
    """``publish`` was given a connection that is not inside a transaction."""


class DatabaseUnavailable(EventBusError):
    """The database cannot be reached, or the connection to it was lost."""


class DatabaseError(EventBusError):
    """PostgreSQL refused a statement; ``sqlstate`` is its error code (the driver's exception is the cause)."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class MigrationsMissing(EventBusError):
    """The database schema is older than this version of eventbus expects."""


class MigrationLocked(EventBusError):
    """A migration could not take the lock it needs on an eventbus table within its retries: a long transaction
    holds a conflicting lock."""
