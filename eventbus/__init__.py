"""eventbus: change the database and announce it, as one atomic act.

Publish typed events inside your own PostgreSQL transaction (a transactional outbox); after commit a relay
hands them to your subscribers, with timeouts, retries and one shared dead-letter table.
"""

from .bus import BusStatistics, EventBus, Transaction
from .errors import (
    ConfigurationError,
    DatabaseUnavailable,
    DeserializationError,
    EventBusError,
    MigrationsMissing,
    NotInTransaction,
    RegistrationError,
    UnknownTopic,
)
from .events import Envelope, Registry, topic
from .handlers import Backoff, Context, Subscription
from .ids import id_time, max_id_for, min_id_for, new_id
from .migrations import check_migrations, migrate
from .relay import RelayConfig, RelayStatistics
from .repository import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterRepository,
    NewEvent,
    OfferResult,
    OutboxRepository,
    Reason,
    Settlement,
    Status,
)

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "BusStatistics",
    "ConfigurationError",
    "Context",
    "DatabaseUnavailable",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "DeserializationError",
    "Envelope",
    "EventBus",
    "EventBusError",
    "MigrationsMissing",
    "NewEvent",
    "NotInTransaction",
    "OfferResult",
    "OutboxRepository",
    "Reason",
    "RegistrationError",
    "Registry",
    "RelayConfig",
    "RelayStatistics",
    "Settlement",
    "Status",
    "Subscription",
    "Transaction",
    "UnknownTopic",
    "__version__",
    "check_migrations",
    "id_time",
    "max_id_for",
    "migrate",
    "min_id_for",
    "new_id",
    "topic",
]
