"""The typed event model: events are frozen ``msgspec.Struct`` classes, named by a stable topic.

Pure: no I/O. A :class:`Registry` maps topic names to classes and owns one encoder and one decoder per class,
so encoding and decoding never rebuild msgspec machinery on the hot path.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from .errors import DeserializationError, RegistrationError, UnknownTopic

__all__ = ["PARTITIONS", "Envelope", "EventFields", "Registry", "aliases_of", "partition_of", "topic", "topic_of"]

#: Number of key-hash partitions. Ordered delivery is per partition; relays share partitions between them.
PARTITIONS = 32

E = TypeVar("E", bound=msgspec.Struct)


def topic(name: str, *, aliases: Iterable[str] = ()) -> Any:
    """Class decorator giving an event class an explicit, stable topic name::

        @topic("orders.placed", aliases=["OrderPlaced"])
        class OrderPlaced(msgspec.Struct, frozen=True): ...

    Without it the topic is the class name. Renaming a class then renames its topic, so name topics
    explicitly once events are stored anywhere. ``aliases`` are former names of the topic: rows and dead letters
    stored under them still decode into this class and reach its subscribers; new events take ``name``.
    """
    _check_topic_name(name)
    former = tuple(aliases)
    if isinstance(aliases, str):
        raise RegistrationError(f"aliases of topic {name!r} must be a list of names, e.g. aliases=[{aliases!r}]")
    for alias in former:
        _check_topic_name(alias)
    if name in former:
        raise RegistrationError(f"topic {name!r} lists itself among its aliases")

    def mark(cls: type[E]) -> type[E]:
        cls.__eventbus_topic__ = name  # type: ignore[attr-defined]
        cls.__eventbus_aliases__ = former  # type: ignore[attr-defined]
        return cls

    return mark


def _check_topic_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 200 or any(c.isspace() for c in name):
        raise RegistrationError(
            f"topic name {name!r} is not usable: use 1-200 characters without spaces, e.g. 'orders.placed'"
        )


def topic_of(cls: type[msgspec.Struct]) -> str:
    """The topic name of an event class: its ``@topic`` name, else its class name."""
    name = getattr(cls, "__eventbus_topic__", None)
    return name if isinstance(name, str) else cls.__name__


def aliases_of(cls: type[msgspec.Struct]) -> tuple[str, ...]:
    """The former topic names of an event class (``@topic(..., aliases=[...])``)."""
    aliases = getattr(cls, "__eventbus_aliases__", ())
    return aliases if isinstance(aliases, tuple) else ()


def partition_of(key: str | None) -> int | None:
    """The partition of an ordering key (stable across processes and Python versions); None without a key."""
    if key is None:
        return None
    return zlib.crc32(key.encode()) % PARTITIONS


class EventFields(msgspec.Struct, frozen=True, kw_only=True):
    """What every outbox row of an event carries: its topic, encoded payload (JSON), ordering key, the one
    subscriber it targets (None: every subscriber of the topic), tenant and headers."""

    topic: str
    payload: bytes
    key: str | None = None
    target: str | None = None
    tenant: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Envelope(EventFields, frozen=True, kw_only=True):
    """One outbox row as the relay and the subscribers see it."""

    id: uuid.UUID
    event_id: uuid.UUID
    attempts: int = 0
    created_at: datetime | None = None


class Registry:
    """Maps topic names to event classes; encodes and decodes payloads."""

    _encoder: ClassVar[msgspec.json.Encoder] = msgspec.json.Encoder()

    def __init__(self) -> None:
        self._by_topic: dict[str, type[msgspec.Struct]] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}

    def register(self, cls: type[E], *, name: str | None = None) -> type[E]:
        """Register ``cls`` under its topic (or ``name``) and the topic's aliases. Registering the same class
        again is a no-op."""
        if not (isinstance(cls, type) and issubclass(cls, msgspec.Struct)):
            raise RegistrationError(
                f"{cls!r} is not an event class: declare events as "
                "`class MyEvent(msgspec.Struct, frozen=True): ...`"
            )
        topic_name = name if name is not None else topic_of(cls)
        _check_topic_name(topic_name)
        names = (topic_name, *aliases_of(cls))
        for each in names:
            existing = self._by_topic.get(each)
            if existing is not None and existing is not cls:
                raise RegistrationError(
                    f"topic {each!r} is already taken by {existing.__module__}.{existing.__qualname__}; "
                    f"give {cls.__qualname__} its own name with @eventbus.topic('...')"
                )
        for other_topic, other in self._by_topic.items():
            if other is cls and other_topic not in names:
                raise RegistrationError(f"{cls.__qualname__} is already registered as topic {other_topic!r}")
        decoder = msgspec.json.Decoder(cls)
        for each in names:
            self._by_topic[each] = cls
            self._decoders[each] = decoder
        return cls

    def topic_for(self, event: msgspec.Struct) -> str:
        """The registered topic of an event instance, registering its class on first sight."""
        cls = type(event)
        name = topic_of(cls)
        if self._by_topic.get(name) is not cls:
            self.register(cls)
        return name

    def class_for(self, topic_name: str) -> type[msgspec.Struct]:
        try:
            return self._by_topic[topic_name]
        except KeyError:
            raise UnknownTopic(
                f"no event class is registered for topic {topic_name!r}; "
                "subscribe a handler to it or call bus.registry.register(YourEvent)"
            ) from None

    def topics(self) -> Mapping[str, type[msgspec.Struct]]:
        return dict(self._by_topic)

    def encode(self, event: msgspec.Struct) -> bytes:
        return self._encoder.encode(event)

    def decode(self, topic_name: str, payload: bytes | str) -> msgspec.Struct:
        """Decode a payload into the class registered for ``topic_name``.

        Raises :class:`UnknownTopic` when no class is registered and :class:`DeserializationError` when the
        payload does not fit the class.
        """
        decoder = self._decoders.get(topic_name)
        if decoder is None:
            self.class_for(topic_name)  # raises UnknownTopic
            raise AssertionError("unreachable")
        try:
            return decoder.decode(payload)  # type: ignore[no-any-return]
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            cls = self._by_topic[topic_name]
            raise DeserializationError(
                f"payload of topic {topic_name!r} does not decode into {cls.__qualname__}: {exc}. "
                "Fix the producer or make the new fields optional (give them defaults)"
            ) from exc

    def register_all(self, classes: Iterable[type[msgspec.Struct]]) -> None:
        for cls in classes:
            self.register(cls)
