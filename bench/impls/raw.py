"""Raw asyncpg: the layer's statements written by hand, with a pool (the practical lower bound).

The same statements and round trips as the layer, on the same roles:
connections open as the directory role with the layer's session settings;
a team resolves with ``sfdb_resolve_tenant()`` and a rate limit is one
autocommitted ``sfdb_consume_rate_limit()``; one simple-protocol message
opens each tenant transaction (the layer's preamble, ``SET LOCAL`` s, a claim
signed by hand with the bench's tenant key, and ``SELECT sfdb_require_claim()``
included), then the statements (prepared
once per connection by asyncpg's statement cache, each one round trip), then
``COMMIT``. The INSERTs return the whole row, as the layer's do, and
``jsonb`` is decoded to Python objects, as the layer does. The pool's
per-release reset query (``RESET ALL`` …) is replaced by a
rollback-if-needed check, because nothing here sets session state: a
careful hand-written version would do the same. Bolt's installation lookup
is the store's one autocommitted ``sfdb_find_slack_installation()``, its
ciphertexts opened with a ``TokenCipher`` of the same key and the same
``Installation`` built (:func:`bench.impls.base.installation_from_row`).
"""

from __future__ import annotations

import json
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from bench.impls.base import (
    APP_ROLE,
    FIND_INSTALLATION,
    HANDLER_RESOURCE,
    NEVER_DENY,
    RECENT_DAYS,
    RECENT_LIMIT,
    SLACK_CLIENT_ID,
    STATEMENT_TIMEOUT_MS,
    TOKEN_KEYS,
    Implementation,
    day_start,
    installation_from_row,
    session_settings,
    since,
    tenant_preamble,
)
from slack_fathom_db.settings import DatabaseSettings
from slack_fathom_db.tokens import TokenCipher, parse_keys

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from slack_sdk.oauth.installation_store.models.installation import Installation

    from bench.impls.base import BenchTenant, HandlerEvent

MEETING_COLUMNS: Final = (
    "tenant_id, id, user_id, crm_connection_id, fathom_recording_id, title, meeting_url, "
    "started_at, duration_seconds, participants, status, summary, action_items, ai_output, "
    "processing_error, processing_attempts, processing_started_at, processed_at, "
    "crm_sync_status, crm_record_id, crm_sync_attempts, crm_last_error, crm_synced_at, "
    "version, created_at, updated_at, deleted_at"
)
USER_COLUMNS: Final = (
    "tenant_id, id, slack_user_id, slack_email, display_name, role, created_at, updated_at, "
    "deleted_at"
)
AUDIT_COLUMNS: Final = (
    "tenant_id, id, event_type, event_category, action_description, status, user_id, "
    "resource_type, resource_id, ip_address, user_agent, metadata, created_at"
)

RESOLVE: Final = "SELECT sfdb_resolve_tenant($1)"
CHARGE: Final = "SELECT sfdb_consume_rate_limit($1, $2, $3, $4, $5, $6, $7)"
USER_BY_SLACK_ID: Final = (
    f"SELECT {USER_COLUMNS} FROM users "  # noqa: S608 - constant column list
    "WHERE tenant_id = $1 AND deleted_at IS NULL AND slack_user_id = $2"
)
CREATE_MEETING: Final = (
    "INSERT INTO meeting_sessions (tenant_id, id, user_id, crm_connection_id, "  # noqa: S608
    "fathom_recording_id, title, meeting_url, started_at, duration_seconds, participants) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
    "ON CONFLICT (tenant_id, fathom_recording_id) WHERE deleted_at IS NULL DO NOTHING "
    f"RETURNING {MEETING_COLUMNS}"
)
MEETING_BY_FATHOM_ID: Final = (
    f"SELECT {MEETING_COLUMNS} FROM meeting_sessions "  # noqa: S608 - constant column list
    "WHERE tenant_id = $1 AND deleted_at IS NULL AND fathom_recording_id = $2"
)
LOG_EVENT: Final = (
    "INSERT INTO audit_logs (tenant_id, id, event_type, event_category, action_description, "  # noqa: S608
    "status, user_id, resource_type, resource_id, ip_address, user_agent, metadata) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
    f"RETURNING {AUDIT_COLUMNS}"
)
RECENT: Final = (
    f"SELECT {MEETING_COLUMNS} FROM meeting_sessions "  # noqa: S608 - constant column list
    "WHERE tenant_id = $1 AND deleted_at IS NULL AND created_at >= $2 "
    "ORDER BY created_at DESC LIMIT $3"
)
FOR_USER: Final = (
    f"SELECT {MEETING_COLUMNS} FROM meeting_sessions "  # noqa: S608 - constant column list
    "WHERE tenant_id = $1 AND deleted_at IS NULL AND created_at >= $2 AND user_id = $3 "
    "ORDER BY created_at DESC LIMIT $4"
)


async def _init(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _reset(conn: asyncpg.Connection) -> None:
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class RawAsyncpgImpl(Implementation):
    """The same statements by hand on an asyncpg pool."""

    key = "raw"
    title = "raw asyncpg"
    isolation = (
        "by hand, the layer's statements: connections open as the directory role; "
        "`sfdb_resolve_tenant()` and `sfdb_consume_rate_limit()` autocommitted; one "
        "simple-protocol `conn.execute()` of the layer's preamble (`BEGIN; SET LOCAL ROLE "
        f"{APP_ROLE}; SET LOCAL search_path, app.tenant_claim (signed by hand, pid 0), "
        "row_security, timeouts; SELECT sfdb_require_claim()`), then the statements, then "
        "`COMMIT`; "
        "`sfdb_find_slack_installation()` autocommitted"
    )

    def __init__(self) -> None:
        self._pool: asyncpg.Pool | None = None
        self._cipher = TokenCipher(parse_keys(TOKEN_KEYS))

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        if self._pool is None:
            raise RuntimeError("open() first")
        return self._pool

    async def open(self, dsn: str, *, pool_size: int) -> None:
        roles = DatabaseSettings(url=dsn, app_role=APP_ROLE, _env_file=None).roles
        self._pool = await asyncpg.create_pool(
            dsn,
            min_size=pool_size,
            max_size=pool_size,
            init=_init,
            reset=_reset,
            server_settings={
                "application_name": "sfdb_bench_raw",
                **session_settings(roles.directory),
            },
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _transaction(self, tenant_id: uuid.UUID) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            await conn.execute(tenant_preamble(tenant_id, begin=True))
            try:
                yield conn
            except BaseException:
                if not conn.is_closed() and conn.is_in_transaction():
                    await conn.execute("ROLLBACK")
                raise

    async def _charge(self, tenant_id: uuid.UUID, resource: str) -> bool:
        granted, _prior = await self.pool.fetchval(
            CHARGE, tenant_id, resource, "daily", day_start(), 1, NEVER_DENY, STATEMENT_TIMEOUT_MS
        )
        return granted is not None

    async def handler(self, event: HandlerEvent) -> None:
        tenant_id = await self.pool.fetchval(RESOLVE, event.slack_team_id)
        if tenant_id is None:
            raise RuntimeError("unknown team")
        if not await self._charge(tenant_id, HANDLER_RESOURCE):
            raise RuntimeError("rate limited")
        async with self._transaction(tenant_id) as conn:
            user = await conn.fetchrow(USER_BY_SLACK_ID, tenant_id, event.slack_user_id)
            if user is None:
                raise RuntimeError("unknown user")
            meeting = await conn.fetchrow(
                CREATE_MEETING,
                tenant_id,
                uuid.uuid4(),
                user["id"],
                None,
                event.fathom_recording_id,
                event.title,
                None,
                None,
                None,
                [],
            )
            if meeting is None:  # a second delivery of the same recording
                meeting = await conn.fetchrow(
                    MEETING_BY_FATHOM_ID, tenant_id, event.fathom_recording_id
                )
            if meeting is None:
                raise RuntimeError("meeting vanished")
            await conn.fetchrow(
                LOG_EVENT,
                tenant_id,
                uuid.uuid4(),
                "meeting.created",
                "data",
                "Meeting received from Fathom",
                "success",
                user["id"],
                "meeting_session",
                str(meeting["id"]),
                None,
                None,
                {},
            )
            await conn.execute("COMMIT")

    async def recent_meetings(self, tenant: BenchTenant) -> int:
        async with self._transaction(tenant.id) as conn:
            rows = await conn.fetch(RECENT, tenant.id, since(RECENT_DAYS), RECENT_LIMIT)
            await conn.execute("ROLLBACK")
        return len(rows)

    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        async with self._transaction(tenant.id) as conn:
            rows = await conn.fetch(FOR_USER, tenant.id, since(RECENT_DAYS), user_id, RECENT_LIMIT)
            await conn.execute("ROLLBACK")
        return len(rows)

    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        return await self._charge(tenant.id, resource)

    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        async with self._transaction(tenant.id) as conn:
            await conn.fetchrow(
                LOG_EVENT,
                tenant.id,
                uuid.uuid4(),
                "security.denied",
                "security",
                "Request refused",
                "denied",
                user_id,
                "slack_event",
                None,
                None,
                None,
                {},
            )
            await conn.execute("COMMIT")

    async def find_installation(self, tenant: BenchTenant) -> Installation | None:
        # A workspace install: the tenant's key is the team id, no enterprise, no user.
        row = await self.pool.fetchrow(
            FIND_INSTALLATION,
            SLACK_CLIENT_ID,
            tenant.slack_team_id,
            None,
            tenant.slack_team_id,
            None,
        )
        return (
            None if row is None else installation_from_row(row, self._cipher, tenant.slack_team_id)
        )
