"""Erasure: an uninstalled workspace's rows after its grace period, one user's on request.

Both run on the owner's side (``DATABASE_MIGRATION_URL``, acting as the owner):
the runtime roles can neither delete rows for good nor touch an audit row, and
must not be able to. Every transaction names the one workspace it erases
(``sfdb.lifecycle_tenant``, migration 0010: the owner's policies then admit
that workspace's users, connections, mappings, meetings and counters, and the
de-identification of its audit events), and so does every statement.

Audit rows are never deleted here: they are de-identified. Their personal
fields (actor, address, user agent, description, metadata) are emptied and
their ``personal_salt`` erased; ``personal_digest`` stays, so every chain
still verifies, and without its salt it reveals nothing of what was erased.
The database refuses any other change to an audit row (migration 0012).
Each erasure leaves a record in the workspace's own audit chain
(``tenant.purged``, ``user.erased``) that counts what went.

:func:`purge_uninstalled_tenants` erases the workspaces that the directory
uninstalled (``db.directory.uninstall``, the installation store's
``app_uninstalled``) more than ``DATABASE_PURGE_GRACE_DAYS`` days ago, by
``tenants.uninstalled_at``, which only those functions start (a unit of work's
``soft_delete()`` hides a workspace but starts no clock): their audit rows de-identified, then
every other row deleted, children before parents and each table in key
order, a batch per transaction; last, in one transaction, the ``tenants`` row
is emptied of its name and settings, stamped ``purged_at`` and the record
written. It is idempotent and resumable: a purge cut short leaves rows the
next run deletes, and every batch first checks, holding the workspace's row,
that the workspace is still uninstalled and due, so a reinstall stops it.
:func:`erase_user` erases one Slack user of a workspace in one transaction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from slack_fathom_db import validation
from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import TenantNotFound, translate
from slack_fathom_db.maintenance import lifecycle_scope, owner_connection, rows_affected
from slack_fathom_db.models import TENANT_OWNED_TABLES, Base

if TYPE_CHECKING:
    from collections.abc import Callable

    import asyncpg

    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["TenantPurge", "UserErasure", "erase_user", "purge_uninstalled_tenants"]

_MAX_BATCH: Final = 100_000
# What an erased audit row holds in its personal fields (what verify accepts without salt).
_DEIDENTIFY: Final = (
    "user_id = NULL, ip_address = NULL, user_agent = NULL, action_description = '', "
    "metadata = '{}'::jsonb, personal_salt = NULL"
)
_ERASED: Final = (
    "(user_id IS NULL AND ip_address IS NULL AND user_agent IS NULL "
    "AND action_description = '' AND metadata = '{}'::jsonb AND personal_salt IS NULL)"
)
# Uninstalled by the directory, past its grace period, not erased since (uninstalled_at is
# the owner's, kept by a trigger: the app role cannot start or move the clock).
_DUE: Final = (
    "deleted_at IS NOT NULL AND uninstalled_at <= now() - make_interval(days => {days}) "
    "AND (purged_at IS NULL OR purged_at < uninstalled_at)"
)
_DUE_TENANTS: Final = (
    f"SELECT id, slack_team_id FROM public.tenants WHERE {_DUE.format(days='$1')} ORDER BY id"  # noqa: S608
)
_HOLD_DUE: Final = (
    f"SELECT id FROM public.tenants WHERE id = $1 AND {_DUE.format(days='$2')} FOR UPDATE"  # noqa: S608
)
# In key order from where the last batch ended (its erased rows are not read again).
_DEIDENTIFY_BATCH: Final = (
    f"UPDATE public.audit_logs SET {_DEIDENTIFY} "  # noqa: S608 - fixed text
    "WHERE tenant_id = $1 AND id IN (SELECT id FROM public.audit_logs "
    f"WHERE tenant_id = $1 AND id > $3 AND NOT {_ERASED} ORDER BY id LIMIT $2) RETURNING id"
)
_RECORD: Final = (
    "INSERT INTO public.audit_logs (tenant_id, event_type, event_category, "
    "action_description, status, resource_type, resource_id, metadata) "
    "VALUES ($1, $2, 'admin', $3, 'success', $4, $5, $6::jsonb)"
)
# A participant entry naming one of the emails: an object with that "email", or the email.
_NAMES: Final = (
    "lower(coalesce(p ->> 'email', CASE WHEN jsonb_typeof(p) = 'string' THEN p #>> '{}' END, "
    "'')) = ANY($2::text[])"
)
_FORGET_PARTICIPANT: Final = (
    "UPDATE public.meeting_sessions m SET updated_at = now(), participants = coalesce(("  # noqa: S608
    "SELECT jsonb_agg(p ORDER BY n) FROM jsonb_array_elements(m.participants) "
    f"WITH ORDINALITY AS e(p, n) WHERE NOT {_NAMES}), '[]'::jsonb) "
    "WHERE tenant_id = $1 AND jsonb_typeof(participants) = 'array' AND EXISTS ("
    f"SELECT FROM jsonb_array_elements(m.participants) AS e(p) WHERE {_NAMES})"
)
_EMPTY_TENANT: Final = (
    "UPDATE public.tenants SET slack_team_name = '', settings = '{}'::jsonb, "
    "purged_at = now(), updated_at = now() WHERE id = $1"
)


@dataclass(frozen=True, slots=True)
class TenantPurge:
    """What :func:`purge_uninstalled_tenants` erased of one workspace."""

    tenant_id: uuid.UUID
    slack_team_id: str
    deleted: dict[str, int] = field(default_factory=dict)
    """Rows deleted, by table (this run's)."""
    deidentified: int = 0
    """Audit rows de-identified (this run's)."""
    outcome: Literal["erased", "erased by another run", "reinstalled", "failed"] = "failed"
    """``reinstalled``: installed again meanwhile, the purge stopped (what it deleted
    stays deleted); ``failed``: the database refused (``error`` says why; the next run
    resumes)."""
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the workspace is erased now (by this run or another)."""
        return self.outcome in ("erased", "erased by another run")


@dataclass(frozen=True, slots=True)
class UserErasure:
    """What :func:`erase_user` erased."""

    tenant_id: uuid.UUID
    users: int
    """User rows deleted: every row of that Slack user, removed ones included."""
    meetings: int
    """Meetings they recorded, deleted."""
    mentions: int
    """Other meetings whose participants named them by email: those entries removed."""
    installations: int
    """Slack installations the user authorized, deleted (their user tokens with them)."""
    deidentified: int
    """Audit rows of the user de-identified."""


def _purge_order() -> tuple[str, ...]:
    # Children before parents: the audit rows let go of their users before the users go.
    return tuple(reversed(TENANT_OWNED_TABLES))


def _delete_batch(table: str) -> str:
    key = ", ".join(column.name for column in Base.metadata.tables[table].primary_key.columns)
    return (
        f"DELETE FROM public.{table} WHERE tenant_id = $1 AND ({key}) IN ("  # noqa: S608
        f"SELECT {key} FROM public.{table} WHERE tenant_id = $1 ORDER BY {key} LIMIT $2)"
    )


async def purge_uninstalled_tenants(
    settings: DatabaseSettings,
    *,
    grace_days: int | None = None,
    batch_size: int = 5_000,
    on_batch: Callable[[str, int], None] | None = None,
) -> list[TenantPurge]:
    """Erase every workspace uninstalled more than ``grace_days`` days ago (by default
    ``DATABASE_PURGE_GRACE_DAYS``); see the module docstring.

    ``on_batch(table, rows)`` is called after every batch that committed.
    Returns one :class:`TenantPurge` per workspace that was due, by id; a workspace the
    database refuses to erase (``outcome == "failed"``) does not stop the others.
    """
    days = validation.integer(
        settings.purge_grace_days if grace_days is None else grace_days,
        field="grace_days",
        maximum=36_600,
    )
    batch = validation.integer(batch_size, field="batch_size", minimum=1, maximum=_MAX_BATCH)
    conn = await owner_connection(settings, action="purge uninstalled workspaces")
    try:
        done: list[TenantPurge] = []
        for row in await conn.fetch(_DUE_TENANTS, days):
            try:
                done.append(
                    await _purge(
                        conn,
                        row["id"],
                        row["slack_team_id"],
                        days=days,
                        batch=batch,
                        on_batch=on_batch,
                    )
                )
            except DRIVER_ERRORS as exc:
                error = translate(exc, action=f"purge workspace {row['slack_team_id']}")
                done.append(TenantPurge(row["id"], row["slack_team_id"], error=str(error)))
        return done
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="purge uninstalled workspaces") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def _purge(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    slack_team_id: str,
    *,
    days: int,
    batch: int,
    on_batch: Callable[[str, int], None] | None,
) -> TenantPurge:
    deleted: dict[str, int] = {}
    deidentified = 0
    for table in _purge_order():
        after = uuid.UUID(int=0)
        while True:
            async with conn.transaction():
                if not await _hold(conn, tenant, days):
                    return await _stopped(conn, tenant, slack_team_id, deleted, deidentified)
                if table == "audit_logs":
                    ids = [
                        row["id"]
                        for row in await conn.fetch(_DEIDENTIFY_BATCH, tenant, batch, after)
                    ]
                    count = len(ids)
                    after = max(ids, default=after)
                else:
                    count = rows_affected(await conn.execute(_delete_batch(table), tenant, batch))
            if table == "audit_logs":
                deidentified += count
            else:
                deleted[table] = deleted.get(table, 0) + count
            if on_batch is not None and count:
                on_batch(table, count)
            if count < batch:
                break
    async with conn.transaction():
        if not await _hold(conn, tenant, days):
            return await _stopped(conn, tenant, slack_team_id, deleted, deidentified)
        await conn.execute(_EMPTY_TENANT, tenant)
        await conn.execute(
            _RECORD,
            tenant,
            "tenant.purged",
            "Workspace data erased after uninstall",
            "tenant",
            str(tenant),
            json.dumps({"deleted": deleted, "audit_events_deidentified": deidentified}),
        )
    return TenantPurge(tenant, slack_team_id, deleted, deidentified, outcome="erased")


async def _stopped(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    slack_team_id: str,
    deleted: dict[str, int],
    deidentified: int,
) -> TenantPurge:
    """A purge that found its workspace no longer due: live again, or erased by another."""
    live = await conn.fetchval(
        "SELECT deleted_at IS NULL FROM public.tenants WHERE id = $1", tenant
    )
    outcome: Literal["erased by another run", "reinstalled"] = (
        "reinstalled" if live else "erased by another run"
    )
    return TenantPurge(tenant, slack_team_id, deleted, deidentified, outcome=outcome)


async def _hold(conn: asyncpg.Connection, tenant: uuid.UUID, days: int) -> bool:
    await conn.execute(lifecycle_scope(tenant))
    return await conn.fetchval(_HOLD_DUE, tenant, days) is not None


async def erase_user(
    settings: DatabaseSettings, slack_team_id: str, slack_user_id: str
) -> UserErasure:
    """Erase one Slack user of a workspace, in one transaction: every row of that user
    (removed ones too), the meetings they recorded and the Slack installations they
    authorized deleted, their entries (by email) removed from other meetings'
    participants, CRM connections they made kept without them, and their audit
    events (theirs by ``user_id``, or naming them as ``metadata.slack_user_id``, as the
    layer's own Slack events do) de-identified; a ``user.erased`` record counts it.

    Idempotent: a user already erased (or never known) erases nothing and writes no
    record. Free text that names the user elsewhere (a summary, another user's event) is
    not searched; ``event_type`` and ``resource_id`` are chained as they are and must
    never hold personal data. The workspace's
    bot token stays (it is the workspace's, not the user's).
    :class:`TenantNotFound` if no workspace has that Slack team id.
    """
    team = validation.slack_team_id(slack_team_id)
    person = validation.slack_user_id(slack_user_id)
    conn = await owner_connection(settings, action="erase user")
    try:
        async with conn.transaction():
            tenant = await conn.fetchval(
                "SELECT id FROM public.tenants WHERE slack_team_id = $1 FOR UPDATE", team
            )
            if tenant is None:
                raise TenantNotFound(f"erase user: no workspace with slack_team_id {team}")
            await conn.execute(lifecycle_scope(tenant))
            done = await _erase_user(conn, tenant, person)
            if done.users or done.installations or done.deidentified:
                await conn.execute(
                    _RECORD,
                    tenant,
                    "user.erased",
                    "User erased on request",
                    "user",
                    None,
                    json.dumps(
                        {
                            "users": done.users,
                            "meetings": done.meetings,
                            "participant_entries": done.mentions,
                            "slack_installations": done.installations,
                            "audit_events": done.deidentified,
                        }
                    ),
                )
        return done
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="erase user") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def _erase_user(conn: asyncpg.Connection, tenant: uuid.UUID, person: str) -> UserErasure:
    rows = await conn.fetch(
        "SELECT id, lower(slack_email) AS email FROM public.users "
        "WHERE tenant_id = $1 AND slack_user_id = $2 ORDER BY id FOR UPDATE",
        tenant,
        person,
    )
    users = [row["id"] for row in rows]
    emails = sorted({row["email"] for row in rows if row["email"]})
    deidentified = rows_affected(
        await conn.execute(
            f"UPDATE public.audit_logs SET {_DEIDENTIFY} "  # noqa: S608 - fixed text
            "WHERE tenant_id = $1 AND (user_id = ANY($2::uuid[]) "
            f"OR metadata ->> 'slack_user_id' = $3) AND NOT {_ERASED}",
            tenant,
            users,
            person,
        )
    )
    await conn.execute(
        "UPDATE public.crm_connections SET connected_by_user_id = NULL, updated_at = now() "
        "WHERE tenant_id = $1 AND connected_by_user_id = ANY($2::uuid[])",
        tenant,
        users,
    )
    meetings = rows_affected(
        await conn.execute(
            "DELETE FROM public.meeting_sessions "
            "WHERE tenant_id = $1 AND user_id = ANY($2::uuid[])",
            tenant,
            users,
        )
    )
    mentions = (
        rows_affected(await conn.execute(_FORGET_PARTICIPANT, tenant, emails)) if emails else 0
    )
    installations = rows_affected(
        await conn.execute(
            "DELETE FROM public.slack_installations WHERE tenant_id = $1 AND user_id = $2",
            tenant,
            person,
        )
    )
    await conn.execute(
        "DELETE FROM public.users WHERE tenant_id = $1 AND id = ANY($2::uuid[])", tenant, users
    )
    return UserErasure(tenant, len(users), meetings, mentions, installations, deidentified)
