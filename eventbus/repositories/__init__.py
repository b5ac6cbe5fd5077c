"""The only code that speaks SQL: one repository per table, each with its records.

- :mod:`.outbox` — ``eventbus_outbox``: offer, claim, settle, renew, reclaim, purge.
- :mod:`.dead_letters` — ``eventbus_dead_letters``: list, get, count, replay, purge.
- :mod:`.inbox` — ``eventbus_inbox``: a transactional subscriber's dedupe.
- :mod:`.relays` — ``eventbus_relays`` and partition ownership.
- :mod:`.subscriptions` — ``eventbus_subscriptions``: what the relays carry; pause, resume, retire.
"""

from ._rows import MAX_ERROR_CHARS, Reason, cap_error
from .dead_letters import DeadLetter, DeadLetterFilter, DeadLetterRepository, Replayed
from .inbox import InboxRepository
from .outbox import NewEvent, OfferResult, OutboxRepository, Settlement, Status, envelope_from_row
from .relays import RelayRepository
from .subscriptions import Carried, SubscriberState, SubscriptionInfo, SubscriptionRepository

__all__ = [
    "MAX_ERROR_CHARS",
    "Carried",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "InboxRepository",
    "NewEvent",
    "OfferResult",
    "OutboxRepository",
    "Reason",
    "RelayRepository",
    "Replayed",
    "Settlement",
    "Status",
    "SubscriberState",
    "SubscriptionInfo",
    "SubscriptionRepository",
    "cap_error",
    "envelope_from_row",
]
