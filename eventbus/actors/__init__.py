"""A small actor runtime on anyio: bounded mailboxes, lanes for per-key order, supervised workers."""

from .runtime import Actor, BatchTracker, Delivery

__all__ = ["Actor", "BatchTracker", "Delivery"]
