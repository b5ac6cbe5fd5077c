"""Type aliases shared across layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import asyncpg
    import asyncpg.pool

    #: An asyncpg connection, or one borrowed from a pool.
    Connection: TypeAlias = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
else:
    Connection = Any

__all__ = ["Connection"]
