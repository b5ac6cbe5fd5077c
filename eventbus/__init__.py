"""eventbus: change the database and announce it, as one atomic act.

Publish typed events inside your own PostgreSQL transaction (a transactional outbox); after commit a relay
hands them to your subscribers, with timeouts, retries and one shared dead-letter table.
"""

from .bus import BusStatistics, EventBus, Health, Transaction
from .errors import (
    ConfigurationError,
    DatabaseError,
    DatabaseUnavailable,
    DeserializationError,
    EventBusError,
    MigrationLocked,
    MigrationsMissing,
    NotInTransaction,
    RegistrationError,
    UnknownTopic,
)
from .events import Envelope, Registry, topic
from .handlers import Backoff, Context, PublishOptions, SubscribeOptions, Subscription
from .ids import id_time, max_id_for, min_id_for, new_id
from .migrations import check_migrations, migrate
from .relay import RelayConfig, RelayStatistics
from .repositories import (
    Carried,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterRepository,
    NewEvent,
    OfferResult,
    OutboxRepository,
    Reason,
    RelayRepository,
    Replayed,
    Settlement,
    Status,
    SubscriberState,
    SubscriptionInfo,
    SubscriptionRepository,
)
from .transports import DeliveryStatistics, Transport
from .transports.local import LocalTransport
from .transports.nats import NatsTransport

__version__ = "0.2.0"

__all__ = [
    "Backoff",
    "BusStatistics",
    "Carried",
    "ConfigurationError",
    "Context",
    "DatabaseError",
    "DatabaseUnavailable",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "DeliveryStatistics",
    "DeserializationError",
    "Envelope",
    "EventBus",
    "EventBusError",
    "Health",
    "LocalTransport",
    "MigrationLocked",
    "MigrationsMissing",
    "NatsTransport",
    "NewEvent",
    "NotInTransaction",
    "OfferResult",
    "OutboxRepository",
    "PublishOptions",
    "Reason",
    "RegistrationError",
    "Registry",
    "RelayConfig",
    "RelayRepository",
    "RelayStatistics",
    "Replayed",
    "Settlement",
    "Status",
    "SubscribeOptions",
    "SubscriberState",
    "Subscription",
    "SubscriptionInfo",
    "SubscriptionRepository",
    "Transaction",
    "Transport",
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
