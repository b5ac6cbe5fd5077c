"""SQL files shipped with the package: named queries and ordered migrations.

Files are read once with :mod:`importlib.resources`. The only text ever substituted into SQL is the schema
name, validated and quoted by :func:`quote_schema`; every value travels as a bind parameter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources

from ..errors import ConfigurationError

__all__ = ["Migration", "Queries", "Query", "contractions", "migrations", "partitioned_layout", "quote_schema"]

_PLACEHOLDER = "__schema__"
#: At most 54 characters: the wake-up channel ``eventbus_<schema>`` must fit PostgreSQL's 63-byte identifiers (a
#: longer one is cut by the server, and NOTIFY on the full name fails after the transaction committed).
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,53}")
_NAME_HEADER = re.compile(r"^-- name: (\w+)\s*$")
_PARAM_LINE = re.compile(r"^-- \$(\d+) ")


def quote_schema(name: str) -> str:
    """Validate a schema name and return it quoted for SQL. The one place identifiers enter SQL text."""
    if isinstance(name, str) and (name.startswith("pg_") or name == "information_schema"):
        raise ConfigurationError(
            f"schema {name!r} is one of PostgreSQL's own: eventbus keeps its tables in a schema of its own "
            "(for example 'eventbus', the default)"
        )
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ConfigurationError(
            f"schema name {name!r} is not allowed: use 1-54 lowercase letters, digits or underscores, "
            "starting with a letter or underscore (for example 'eventbus'); 54, so that the wake-up channel "
            "'eventbus_<schema>' fits PostgreSQL's 63-byte names"
        )
    return f'"{name}"'


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    purpose: str
    declared_params: int
    sql: str


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    #: A contract step (see :func:`contractions`), recorded as ``-version``.
    contract: bool = False


def _package_text(*parts: str) -> str:
    return resources.files(__package__).joinpath(*parts).read_text(encoding="utf-8")


@functools.cache
def _parse_queries() -> dict[str, Query]:
    queries: dict[str, Query] = {}
    name: str | None = None
    header: list[str] = []
    body: list[str] = []

    def flush() -> None:
        if name is None:
            return
        purpose = next((line[3:].strip() for line in header if not _PARAM_LINE.match(line)), "")
        params = sum(1 for line in header if _PARAM_LINE.match(line))
        queries[name] = Query(name, purpose, params, "\n".join(body).strip())

    for line in _package_text("queries.sql").splitlines():
        match = _NAME_HEADER.match(line)
        if match:
            flush()
            name, header, body = match.group(1), [], []
        elif name is not None and not body and line.startswith("--"):
            header.append(line)
        elif name is not None and (body or line.strip()):
            body.append(line)
    flush()
    return queries


@functools.cache
def _migration_files(suffix: str = "") -> tuple[Migration, ...]:
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = re.fullmatch(rf"(\d{{4}})_(\w+){re.escape(suffix)}\.sql", entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return tuple(found)


def migrations(schema: str) -> list[Migration]:
    """The package's migrations in version order, rendered for ``schema``."""
    quoted = quote_schema(schema)
    return [Migration(m.version, m.name, m.sql.replace(_PLACEHOLDER, quoted)) for m in _migration_files()]


def contractions(schema: str) -> list[Migration]:
    """The contract steps of the package's migrations (``NNNN_name.contract.sql``), rendered for ``schema``: what
    a migration leaves in place for the release before it (an index its claims use, say) and a later
    ``eventbus migrate --contract`` removes, once no process of that release runs."""
    quoted = quote_schema(schema)
    return [
        Migration(m.version, m.name, m.sql.replace(_PLACEHOLDER, quoted), contract=True)
        for m in _migration_files(".contract")
    ]


def partitioned_layout(schema: str, period: str) -> str:
    """The conversion to the partitioned outbox layout (``partitioned.sql``) for ``schema``, with settled
    partitions spanning ``period`` ('day' or 'hour')."""
    if period not in ("day", "hour"):
        raise ConfigurationError(f"period {period!r} is not 'day' or 'hour'")
    # The period first: a schema name may hold "__period__" too.
    return _package_text("partitioned.sql").replace("__period__", period).replace(_PLACEHOLDER, quote_schema(schema))


class Queries:
    """The named queries rendered for one schema; attribute access returns the SQL text."""

    def __init__(self, schema: str) -> None:
        quoted = quote_schema(schema)
        self.schema = schema
        self.by_name = {
            name: Query(q.name, q.purpose, q.declared_params, q.sql.replace(_PLACEHOLDER, quoted))
            for name, q in _parse_queries().items()
        }

    def __getattr__(self, name: str) -> str:
        try:
            return self.by_name[name].sql
        except KeyError:
            raise AttributeError(f"no query named {name!r} in queries.sql") from None
