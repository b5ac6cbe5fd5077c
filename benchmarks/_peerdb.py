"""pgqueuer plumbing shared by peer.py and the pgqueuer producer of _producer.py (a leaf: no benchmark imports).

pgqueuer is a benchmark-only dependency: it is imported when a benchmark asks for it, not with this module.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import asyncpg

ENTRYPOINT = "bench_noop"


def load_pgqueuer() -> SimpleNamespace:
    """pgqueuer's pieces, imported when the benchmark runs (it is a benchmark-only dependency)."""
    try:
        from pgqueuer.adapters.persistence import qb
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.errors import FailingListenerError
        from pgqueuer.qm import QueueManager
        from pgqueuer.queries import Queries
    except ImportError as exc:
        raise RuntimeError("the peer benchmark needs pgqueuer: pip install 'eventbus[bench]'") from exc
    return SimpleNamespace(qb=qb, AsyncpgDriver=AsyncpgDriver, FailingListenerError=FailingListenerError,
                           QueueManager=QueueManager, Queries=Queries)  # fmt: skip


def queries_for(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, settings: Any) -> Any:
    """A pgqueuer ``Queries`` on ``conn`` for the installation ``settings`` describes.

    Each of its three query builders takes the settings separately; one left out falls back to the process-wide
    defaults (the ``public`` schema and the default channel).
    """
    pgq = load_pgqueuer()
    return pgq.Queries(
        pgq.AsyncpgDriver(conn),
        qbe=pgq.qb.QueryBuilderEnvironment(settings),
        qbq=pgq.qb.QueryQueueBuilder(settings),
        qbs=pgq.qb.QuerySchedulerBuilder(settings),
    )
