"""What every implementation does, and the values the workloads hand it.

Each implementation performs the same logical work per operation, with the
same transaction shape: a tenant's statements run inside a transaction that
first switches to the app role and sets ``app.tenant_id`` (row-level security
is FORCEd on tenant-owned tables, so the superuser login must drop to the app
role for the comparison to be fair). How each one does that is stated in its
``isolation`` text, which the report prints.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

APP_ROLE: Final = "sfdb_app"
STATEMENT_TIMEOUT_MS: Final = 30_000
HANDLER_RESOURCE: Final = "meetings_processed"
# High enough never to deny: every measured call does the whole piece of work.
NEVER_DENY: Final = 2_000_000_000
RECENT_DAYS: Final = 30
RECENT_LIMIT: Final = 50


@dataclass(frozen=True, slots=True)
class BenchTenant:
    """A tenant of a benchmark dataset, as read back from the database after loading."""

    id: uuid.UUID
    slack_team_id: str
    user_ids: tuple[uuid.UUID, ...]
    slack_user_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandlerEvent:
    """What a Slack event handler receives (the design's handler sketch)."""

    slack_team_id: str
    slack_user_id: str
    fathom_recording_id: str
    title: str


def day_start(now: datetime | None = None) -> datetime:
    """The start of the current UTC day: the window of a ``daily`` rate limit."""
    now = now or datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def since(days: int = RECENT_DAYS) -> datetime:
    """``now - days``, timezone-aware."""
    return datetime.now(UTC) - timedelta(days=days)


IDLE_TIMEOUT_MS: Final = 60_000
SEARCH_PATH: Final = "pg_catalog, public, pg_temp"


def session_settings(directory_role: str) -> dict[str, str]:
    """What a connection opens with, as the layer's direct connections do: outside any
    tenant it acts as the directory role, with a pinned path, row security and timeouts."""
    return {
        "role": directory_role,
        "search_path": SEARCH_PATH,
        "row_security": "on",
        "statement_timeout": str(STATEMENT_TIMEOUT_MS),
        "lock_timeout": "0",
        "default_transaction_read_only": "off",
        "default_transaction_isolation": "read committed",
    }


def tenant_preamble(tenant_id: uuid.UUID, *, begin: bool, check_tenant: bool = True) -> str:
    """The statements that open a tenant transaction, the layer's own, for implementations
    that send them by hand.

    ``tenant_id`` must be a :class:`uuid.UUID` (read back from the database), so
    the literal cannot carry anything else.
    """
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    statements = [
        *(["BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"] if begin else []),
        f'SET LOCAL ROLE "{APP_ROLE}"',
        f"SET LOCAL search_path = {SEARCH_PATH}",
        f"SET LOCAL app.tenant_id = '{tenant_id}'",
        "SET LOCAL row_security = on",
        f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}",
        "SET LOCAL lock_timeout = 0",
        f"SET LOCAL idle_in_transaction_session_timeout = {IDLE_TIMEOUT_MS}",
        *(["SELECT sfdb_require_tenant()"] if check_tenant else []),
    ]
    return "; ".join(statements)


class Implementation(abc.ABC):
    """One way of doing the benchmark's work; opened on a database, closed after."""

    key: str
    """Short name, used on the command line and in table headers."""
    title: str
    isolation: str
    """How it sets the tenant context (printed in the report)."""

    @abc.abstractmethod
    async def open(self, dsn: str, *, pool_size: int) -> None:
        """Build the pool (or engine) on ``dsn`` (a ``postgresql://`` URL)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    @abc.abstractmethod
    async def handler(self, event: HandlerEvent) -> None:
        """Resolve team → rate limit → user by Slack id, create meeting, audit event, commit."""

    @abc.abstractmethod
    async def recent_meetings(self, tenant: BenchTenant) -> int:
        """The tenant's live meetings of the last 30 days, newest first, 50 at most."""

    @abc.abstractmethod
    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        """A user's live meetings of the last 30 days, newest first, 50 at most."""

    @abc.abstractmethod
    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        """Spend one unit of ``resource`` (daily window) in a short transaction of its own."""

    @abc.abstractmethod
    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        """Write one audit event in a transaction of its own."""
