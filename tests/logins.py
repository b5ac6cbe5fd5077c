"""Login roles for row-level security tests: members of the schema's group roles (``eventbus.roles``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

#: The tenants the tests' roles act for.
TENANTS = ["acme", "beta"]


def as_role(dsn: str, role: str) -> str:
    """``dsn`` with ``role`` as its user (the servers the tests use trust local connections)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@dataclass
class Logins:
    """Login roles made for one test, each a member of one of the schema's group roles."""

    relay: str
    producer: dict[str, str]
    operator: dict[str, str]
