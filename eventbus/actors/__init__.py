"""A small actor runtime on anyio: ordered queues per key, parked retries, supervised workers."""

from .runtime import Actor, Delivery

__all__ = ["Actor", "Delivery"]
