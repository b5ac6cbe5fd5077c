"""Database roles for a schema's processes, and the tenants a role acts for (``eventbus migrate --roles``).

Roles are group roles without LOGIN: grant them to the login roles your processes use
(``GRANT orders_producer_acme TO app_acme``). Two see every tenant: ``<schema>_relay`` (claims, settles,
delivers, retention) and ``<schema>_consumer`` (a NATS consumer process: dead letters, the inbox, follow-up
events). Per tenant, ``<schema>_producer_<tenant>`` publishes for that tenant only, and
``<schema>_operator_<tenant>`` runs ``eventbus status`` and ``eventbus dlq list/show/replay/purge`` on that
tenant's rows only. A per-tenant role is recorded in ``eventbus_tenant_roles``: the row-level security policies
confine a role listed there (or a member of one) to its tenants, and within them to the session's
``eventbus.tenant``.

Creating roles needs CREATEROLE; granting on the tables needs their owner (or a superuser).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ._typing import Connection
from .sql import Queries, quote_schema

__all__ = ["partitioned_grants", "Role", "apply_roles", "role_sql", "roles_for"]

_UNSAFE = re.compile(r"[^a-z0-9_]")
_PLAIN = re.compile(r"[a-z0-9_]{1,24}")

_TABLES = ("eventbus_outbox", "eventbus_dead_letters", "eventbus_inbox", "eventbus_relays", "eventbus_partitions",
           "eventbus_subscriptions", "eventbus_migrations", "eventbus_tenant_roles")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Role:
    """A role :func:`apply_roles` makes: its name, what it is for, the tenant it is confined to (None: every
    tenant) and its privileges, as ``{table: "SELECT, INSERT"}``."""

    name: str
    kind: str
    tenant: str | None
    privileges: dict[str, str]


def _token(tenant: str) -> str:
    """A tenant as a role-name part: itself when it is 1-24 lowercase letters, digits and underscores without a
    double underscore; else its usable characters, ``__`` and a 64-bit hash of it (which no plain name has)."""
    if _PLAIN.fullmatch(tenant) and "__" not in tenant:
        return tenant
    plain = _UNSAFE.sub("_", tenant.lower())[:16].rstrip("_")
    return f"{plain}__{hashlib.blake2b(tenant.encode(), digest_size=8).hexdigest()}"


def roles_for(schema: str, tenants: list[str]) -> list[Role]:
    """The roles of ``schema``: the relay's and the consumer's, and a producer and an operator per tenant."""
    quote_schema(schema)  # validated
    everything = {table: "SELECT, INSERT, UPDATE, DELETE" for table in _TABLES if table != "eventbus_tenant_roles"}
    everything["eventbus_tenant_roles"] = "SELECT"
    roles = [
        Role(f"{schema}_relay", "relay", None, everything),
        Role(f"{schema}_consumer", "consumer", None, {
            "eventbus_outbox": "SELECT, INSERT", "eventbus_dead_letters": "SELECT, INSERT",
            "eventbus_inbox": "SELECT, INSERT", "eventbus_subscriptions": "SELECT", "eventbus_migrations": "SELECT",
            "eventbus_tenant_roles": "SELECT",
        }),
    ]  # fmt: skip
    for tenant in tenants:
        token = _token(tenant)
        roles.append(Role(f"{schema}_producer_{token}", "producer", tenant, {
            "eventbus_outbox": "SELECT, INSERT", "eventbus_migrations": "SELECT", "eventbus_tenant_roles": "SELECT",
        }))  # fmt: skip
        roles.append(Role(f"{schema}_operator_{token}", "operator", tenant, {
            "eventbus_outbox": "SELECT, INSERT", "eventbus_dead_letters": "SELECT, UPDATE, DELETE",
            "eventbus_relays": "SELECT", "eventbus_subscriptions": "SELECT", "eventbus_migrations": "SELECT",
            "eventbus_tenant_roles": "SELECT",
        }))  # fmt: skip
    names = [role.name for role in roles]
    if len(set(names)) != len(names):
        raise ValueError("two tenants map to the same role name: list each tenant once")
    for role in roles:
        if len(role.name) > 63:
            raise ValueError(f"role name {role.name!r} is longer than PostgreSQL's 63 bytes: use a shorter schema name")
    return roles


def _statements(schema: str, role: Role) -> list[str]:
    quoted, name = quote_schema(schema), f'"{role.name}"'
    made = [
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{role.name}') THEN "
        f"CREATE ROLE {name} NOLOGIN; END IF; END$$",
        f"GRANT USAGE ON SCHEMA {quoted} TO {name}",
    ]
    made += [f"GRANT {privileges} ON {quoted}.{table} TO {name}" for table, privileges in role.privileges.items()]
    if role.kind == "relay":
        made.append(partitioned_grants(schema))
    elif "INSERT" in role.privileges.get("eventbus_outbox", ""):
        # An outbox row offered with an idempotency key takes it, as the role offering it (partitioned layout).
        made.append(f"DO $$BEGIN IF to_regclass('{quoted}.eventbus_idempotency_keys') IS NOT NULL THEN "
                    f"GRANT INSERT ON {quoted}.eventbus_idempotency_keys TO {name}; END IF; END$$")  # fmt: skip
    return made


def partitioned_grants(schema: str) -> str:
    """What the relay role needs of the partitioned outbox layout, granted when the schema has it (by the
    conversion, and with the roles): its partition upkeep, and the purge of what it drops in batches."""
    quoted, name = quote_schema(schema), f'"{schema}_relay"'
    return (
        f"DO $$BEGIN IF to_regclass('{quoted}.eventbus_layout') IS NOT NULL AND EXISTS (SELECT FROM "
        f"pg_catalog.pg_roles WHERE rolname = '{schema}_relay') THEN "
        f"GRANT SELECT ON {quoted}.eventbus_layout TO {name}; "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {quoted}.eventbus_idempotency_keys, "
        f"{quoted}.eventbus_outbox_settled_default TO {name}; "
        f"GRANT EXECUTE ON FUNCTION {quoted}.eventbus_outbox_extend(timestamptz), "
        f"{quoted}.eventbus_outbox_drop_settled(timestamptz) TO {name}; END IF; END$$"
    )


def role_sql(schema: str, tenants: list[str]) -> list[str]:
    """The statements :func:`apply_roles` runs (the tenants' entries in ``eventbus_tenant_roles`` aside)."""
    return [statement for role in roles_for(schema, tenants) for statement in _statements(schema, role)]


async def apply_roles(conn: Connection, schema: str, tenants: list[str]) -> list[Role]:
    """Create (or complete) the roles of ``schema`` for ``tenants``, in one transaction; return them."""
    roles = roles_for(schema, tenants)
    queries = Queries(schema)
    async with conn.transaction():
        for role in roles:
            if role.tenant is not None:
                listed = await conn.fetchval(queries.tenant_role_other, role.name, role.tenant)
                if listed is not None:
                    raise ValueError(f"role {role.name} acts for tenant {listed!r} already: it cannot be "
                                     f"{role.tenant!r}'s too")  # fmt: skip
            for statement in _statements(schema, role):
                await conn.execute(statement)
            if role.tenant is not None:
                await conn.execute(queries.tenant_role_add, role.name, role.tenant)
    return roles
