"""Tenant identity and the directory of workspaces: the only surface not scoped to a tenant.

Invariants:

* A :data:`TenantId` is minted only here, by :class:`TenantDirectory` (and by
  :func:`tenant_id_from_trusted` for values read back from the database).
  Everything scoped to a tenant takes one, so the type checker shows where a
  tenant comes from.
* The directory reads and writes ``tenants`` only, one autocommitted
  statement per call, as the connecting (owner) role.
* :func:`transaction_preamble` renders the statements that open every tenant
  transaction: ``BEGIN``, ``SET LOCAL ROLE <app role>``, ``SET LOCAL
  app.tenant_id = '<uuid>'``, the statement and idle-in-transaction timeouts,
  sent as one simple-protocol message (three on Citus, see there). ``SET
  LOCAL`` (rather than ``set_config()``) is what Citus propagates to its
  workers; the literal comes from a validated :class:`uuid.UUID` and the role
  name from a validated identifier, so no input reaches the text unchecked.
"""

from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Final, NewType

from sqlalchemy import Text, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert

from slack_fathom_db import validation
from slack_fathom_db.connections import (
    connect,
    execute_outside_tenant,
    fetchrow_outside_tenant,
)
from slack_fathom_db.models import Tenant
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.models.tenants import PLAN_TIERS
from slack_fathom_db.repositories.base import compile_statement

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = [
    "TenantDirectory",
    "TenantId",
    "has_citus",
    "tenant_id_from_trusted",
    "transaction_preamble",
]

TenantId = NewType("TenantId", uuid.UUID)
"""The id of a live tenant, as resolved or installed by the directory."""


def tenant_id_from_trusted(value: uuid.UUID) -> TenantId:
    """Wrap a tenant id read back from the database (never from user input)."""
    return TenantId(value)


def transaction_preamble(
    tenant_id: uuid.UUID,
    *,
    role: str,
    statement_timeout_ms: int,
    idle_timeout_ms: int,
    check_tenant: bool,
    citus: bool = False,
) -> tuple[str, ...]:
    """The messages that open a tenant transaction (see the module docstring).

    On a single server, one message. On Citus, whose coordinator replays the
    whole text of a message holding ``SET LOCAL`` at the start of every remote
    transaction, ``BEGIN`` and the tenant check go in messages of their own.
    """
    if not isinstance(tenant_id, uuid.UUID):  # a str would be injected verbatim
        raise TypeError("tenant_id must be a uuid.UUID")
    tenant_id = validation.canonical_uuid(tenant_id)  # a subclass's __str__ is never used
    settings = "; ".join(
        [
            f'SET LOCAL ROLE "{role}"',
            f"SET LOCAL app.tenant_id = '{tenant_id}'",
            f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}",
            # A caller that awaits something slow inside a unit of work loses its
            # connection (and its locks) after this, instead of holding them for ever.
            f"SET LOCAL idle_in_transaction_session_timeout = {int(idle_timeout_ms)}",
        ]
    )
    check = ("SELECT sfdb_require_tenant()",) if check_tenant else ()
    if citus:
        return ("BEGIN", settings, *check)
    return ("; ".join(["BEGIN", settings, *check]),)


async def has_citus(conn: AsyncConnection, *, pgbouncer: bool) -> bool:
    """Whether the database behind ``conn`` has the Citus extension; asked once per connection.

    The answer is kept in the pooled connection's ``info``, so a connection
    answers it once in its life, not once per unit of work.
    """
    known = conn.info.get(_CITUS_KEY)
    if known is None:
        row = await fetchrow_outside_tenant(
            conn, _HAS_CITUS, pgbouncer=pgbouncer, action="inspect the database"
        )
        known = conn.info[_CITUS_KEY] = bool(row[0])
    return bool(known)


_CITUS_KEY: Final = "sfdb_citus"
_HAS_CITUS: Final = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"


class TenantDirectory:
    """Maps Slack workspaces to tenants: ``install`` and ``resolve``."""

    def __init__(self, engine: AsyncEngine, *, pgbouncer: bool = False) -> None:
        self._engine = engine
        self._pgbouncer = pgbouncer

    async def install(
        self,
        *,
        slack_team_id: str,
        slack_team_name: str,
        plan_tier: str = "free",
        slack_enterprise_id: str | None = None,
    ) -> TenantId:
        """Create the tenant of a workspace, or return the existing one.

        Idempotent: a second install of a live workspace returns the same id
        and updates its name; installing a soft-deleted workspace reactivates
        it (same id, ``deleted_at`` cleared). One atomic statement.
        """
        team_id = validation.slack_team_id(slack_team_id)
        name = validation.text(slack_team_name, field="slack_team_name", max_length=255)
        tier = validation.choice(plan_tier, field="plan_tier", allowed=PLAN_TIERS)
        enterprise = validation.slack_enterprise_id(slack_enterprise_id)
        upsert = insert(Tenant).values(
            slack_team_id=team_id,
            slack_team_name=name,
            plan_tier=tier,
            slack_enterprise_id=enterprise,
        )
        statement = upsert.on_conflict_do_update(
            index_elements=[Tenant.slack_team_id],
            set_={
                "slack_team_name": upsert.excluded.slack_team_name,
                "slack_enterprise_id": upsert.excluded.slack_enterprise_id,
                "deleted_at": None,
                "updated_at": utcnow(),
            },
        ).returning(Tenant.id)
        async with connect(self._engine, action="install tenant") as conn:
            result = await execute_outside_tenant(
                conn, statement, pgbouncer=self._pgbouncer, action="install tenant"
            )
        return TenantId(result.scalar_one())

    async def uninstall(self, slack_team_id: str) -> TenantId | None:
        """Soft-delete the tenant of a workspace; idempotent (``None`` if none was live).

        For ``app_uninstalled`` events, which Slack may deliver more than once.
        The rows stay; :meth:`install` reactivates the same tenant.
        """
        team_id = validation.slack_team_id(slack_team_id)
        statement = (
            update(Tenant)
            .where(Tenant.slack_team_id == team_id, Tenant.deleted_at.is_(None))
            .values(deleted_at=utcnow())
            .returning(Tenant.id)
        )
        async with connect(self._engine, action="uninstall tenant") as conn:
            result = await execute_outside_tenant(
                conn, statement, pgbouncer=self._pgbouncer, action="uninstall tenant"
            )
        value = result.scalar_one_or_none()
        return None if value is None else TenantId(value)

    async def resolve(self, slack_team_id: str) -> TenantId | None:
        """The tenant of a workspace; ``None`` if unknown or soft-deleted."""
        team_id = validation.slack_team_id(slack_team_id)
        async with connect(self._engine, action="resolve tenant") as conn:
            return await resolve_on(conn, team_id, pgbouncer=self._pgbouncer)


async def resolve_on(
    conn: AsyncConnection, slack_team_id: str, *, pgbouncer: bool
) -> TenantId | None:
    """Resolve a validated Slack team id on an open connection (autocommit)."""
    row = await fetchrow_outside_tenant(
        conn, _resolve_sql(), slack_team_id, pgbouncer=pgbouncer, action="resolve tenant"
    )
    return None if row is None else TenantId(row[0])


@functools.cache
def _resolve_sql() -> str:
    """The lookup every Slack event starts with, compiled once."""
    statement = select(Tenant.id).where(
        Tenant.slack_team_id == bindparam("slack_team_id", type_=Text),
        Tenant.deleted_at.is_(None),
    )
    return compile_statement(statement).sql
