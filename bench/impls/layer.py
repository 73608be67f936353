"""slack_fathom_db through its public API only; and the same on a database that trusts the
claim's tenant unverified (what verifying claims costs), or that does not chain audit events
(what the chain costs)."""

from __future__ import annotations

import abc
import re
from typing import TYPE_CHECKING, Final, Generic, TypeVar

import asyncpg

from bench import claims
from bench.impls.base import (
    APP_ROLE,
    HANDLER_RESOURCE,
    NEVER_DENY,
    RECENT_DAYS,
    RECENT_LIMIT,
    SLACK_CLIENT_ID,
    STATEMENT_TIMEOUT_MS,
    TENANT_KEY,
    TOKEN_KEYS,
    Implementation,
)
from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.slack import InstallationStore
from slack_fathom_db.tenancy import tenant_id_from_trusted

if TYPE_CHECKING:
    import uuid

    from slack_sdk.oauth.installation_store.models.installation import Installation

    from bench.impls.base import BenchTenant, HandlerEvent


class LayerImpl(Implementation):
    """``Database`` + ``unit_of_work`` + ``rate_limit``, as the design's handler sketch."""

    key = "layer"
    title = "slack_fathom_db"
    isolation = (
        "the layer's own: one simple-protocol message `BEGIN; SET LOCAL ROLE; "
        "SET LOCAL search_path; SET LOCAL app.tenant_claim (signed for the backend); SET LOCAL "
        "row_security, statement_timeout, lock_timeout, idle_in_transaction_session_timeout; "
        "SELECT sfdb_require_claim()` per unit of work; `db.rate_limit` is one autocommitted "
        "statement, `sfdb_consume_rate_limit()`, a function of the owner that sets the tenant "
        "for itself; `InstallationStore.async_find_installation` is one autocommitted "
        "`sfdb_find_slack_installation()`, the same kind of function"
    )

    def __init__(self, *, app_role: str | None = APP_ROLE) -> None:
        """``app_role``: the role units of work run as (``None``: the database's own,
        ``<database>_app``; the bench's databases are migrated with :data:`APP_ROLE`)."""
        self._app_role = app_role
        self._db: Database | None = None
        self._store: InstallationStore | None = None

    @property
    def db(self) -> Database:
        """The open ``Database``."""
        if self._db is None:
            raise RuntimeError("open() first")
        return self._db

    async def open(self, dsn: str, *, pool_size: int) -> None:
        settings = DatabaseSettings(
            url=dsn,
            pool_size=pool_size,
            max_overflow=0,
            app_role=self._app_role,
            statement_timeout_ms=STATEMENT_TIMEOUT_MS,
            token_keys=TOKEN_KEYS,
            tenant_key=TENANT_KEY,
            _env_file=None,
        )
        self._db = Database(settings)
        self._store = InstallationStore(self._db, client_id=SLACK_CLIENT_ID)

    async def close(self) -> None:
        self._store = None
        if self._db is not None:
            await self._db.dispose()
            self._db = None

    async def handler(self, event: HandlerEvent) -> None:
        db = self.db
        tenant_id = await db.directory.resolve(event.slack_team_id)
        if tenant_id is None:
            raise RuntimeError("unknown team")
        decision = await db.rate_limit(
            tenant_id, HANDLER_RESOURCE, limit=NEVER_DENY, period="daily"
        )
        if not decision.allowed:
            raise RuntimeError("rate limited")
        async with db.unit_of_work(tenant_id) as uow:
            user = await uow.tenants.get_user_by_slack_id(event.slack_user_id)
            if user is None:
                raise RuntimeError("unknown user")
            meeting = await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id=event.fathom_recording_id,
                title=event.title,
            )
            await uow.audit.log_event(
                event_type="meeting.created",
                event_category="data",
                action_description="Meeting received from Fathom",
                resource_type="meeting_session",
                resource_id=meeting.id,
                user_id=user.id,
            )
            await uow.commit()

    async def recent_meetings(self, tenant: BenchTenant) -> int:
        async with self.db.unit_of_work(tenant_id_from_trusted(tenant.id)) as uow:
            meetings = await uow.meetings.recent(days=RECENT_DAYS, limit=RECENT_LIMIT)
        return len(meetings)

    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        async with self.db.unit_of_work(tenant_id_from_trusted(tenant.id)) as uow:
            meetings = await uow.meetings.for_user(user_id, days=RECENT_DAYS, limit=RECENT_LIMIT)
        return len(meetings)

    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        decision = await self.db.rate_limit(
            tenant_id_from_trusted(tenant.id), resource, limit=NEVER_DENY, period="daily"
        )
        return decision.allowed

    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        async with self.db.unit_of_work(tenant_id_from_trusted(tenant.id)) as uow:
            await uow.audit.log_event(
                event_type="security.denied",
                event_category="security",
                action_description="Request refused",
                status="denied",
                user_id=user_id,
                resource_type="slack_event",
            )
            await uow.commit()

    async def find_installation(self, tenant: BenchTenant) -> Installation | None:
        if self._store is None:
            raise RuntimeError("open() first")
        return await self._store.async_find_installation(
            enterprise_id=None, team_id=tenant.slack_team_id
        )


Saved = TypeVar("Saved")
"""What a variant keeps of a database it switched, to switch it back."""


class SwitchedLayerImpl(LayerImpl, Generic[Saved]):
    """The layer on a database switched for its turns: ``open`` switches it before the pool
    opens (keeping what it replaced), ``close`` switches it back once the pool is closed,
    whatever happened; :meth:`restore` does so for every database still switched."""

    variant_of = "layer"

    def __init__(self) -> None:
        super().__init__()
        self._switched: dict[str, Saved] = {}

    @abc.abstractmethod
    async def _switch(self, dsn: str) -> Saved:
        """Switch the database at ``dsn``; what to switch it back with."""

    @abc.abstractmethod
    async def _switch_back(self, dsn: str, saved: Saved) -> None:
        """Switch the database at ``dsn`` back with what :meth:`_switch` kept."""

    async def open(self, dsn: str, *, pool_size: int) -> None:
        if dsn in self._switched:
            await self.restore()
        self._switched[dsn] = await self._switch(dsn)
        try:
            await super().open(dsn, pool_size=pool_size)
        except BaseException:
            await self.restore()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self.restore()

    async def restore(self) -> None:
        """Switch back every database this switched (idempotent)."""
        for dsn, saved in list(self._switched.items()):
            await self._switch_back(dsn, saved)
            del self._switched[dsn]


class UnverifiedLayerImpl(SwitchedLayerImpl[claims.Verified]):
    """The same layer, on a database that trusts the claim's tenant without verifying it.

    Its turns measure what verifying claims costs (:mod:`bench.claims`): ``open``
    switches the database's tenant policies and ``sfdb_require_claim()`` to read
    the claim's tenant unverified before the pool opens, ``close`` puts the
    verified definitions back once it is closed, whatever happened.
    """

    key = "unverified"
    title = "slack_fathom_db, claim unverified"
    isolation = (
        "the layer, unchanged (the same code, the same messages, the claim signed and set); "
        "for its turns the database trusts the claim without verifying it: every policy "
        "calling `sfdb_claimed_tenant()` (`tenant_isolation` on each tenant-owned table, "
        "`tenant_self` on `tenants`) compares with `NULLIF(split_part(current_setting("
        "'app.tenant_claim', true), '.', 3), '')::uuid` instead, and `sfdb_require_claim()` "
        "only checks that this tenant is live; the verified definitions are put back after "
        "each turn"
    )

    async def _switch(self, dsn: str) -> claims.Verified:
        return await claims.trust(dsn)

    async def _switch_back(self, dsn: str, saved: claims.Verified) -> None:
        await claims.restore(dsn, saved)


UNCHAINED: Final = "unchained"
"""The key of the layer's variant without the audit chain."""

# Without the chain (migration 0009): its trigger off, and the inserting role's trigger
# without the lines that commit to the personal fields (an event's digest is then empty).
_CHAIN_TRIGGER: Final = "audit_logs_chain"
_SERVER_FIELDS: Final = "public.sfdb_audit_logs_server_fields()"
_COMMITMENT: Final = re.compile(
    r"\n\s*NEW\.personal_salt := .*?;\n\s*NEW\.personal_digest := .*?\);", re.DOTALL
)


class UnchainedLayerImpl(SwitchedLayerImpl[str]):
    """The same layer, on a database whose audit events are not chained.

    Its turns measure what the audit chain costs: ``open`` turns the chain's
    trigger off and takes the commitment out of ``sfdb_audit_logs_server_fields()``
    (no salt, digest or place; an event's digest is empty) before the pool opens,
    ``close`` puts both back once it is closed, whatever happened. The events of
    its turns stay outside their chains: ``sfdb audit verify`` reports them on a
    benchmark database.
    """

    key = UNCHAINED
    title = "slack_fathom_db, audit unchained"
    isolation = (
        "the layer, unchanged; for its turns the audit chain's trigger (`audit_logs_chain`) "
        "is disabled and the insert trigger computes no commitment"
    )

    async def _switch(self, dsn: str) -> str:
        return await _unchain(dsn)

    async def _switch_back(self, dsn: str, saved: str) -> None:
        await _switch(
            dsn,
            saved,
            f"ALTER TABLE public.audit_logs ENABLE TRIGGER {_CHAIN_TRIGGER}, "
            "ALTER COLUMN personal_digest DROP DEFAULT",
        )


async def _unchain(dsn: str) -> str:
    """Take the chain off the database at ``dsn``; the insert trigger's definition as it was."""
    conn = await asyncpg.connect(dsn)
    try:
        definition = str(
            await conn.fetchval(f"SELECT pg_get_functiondef('{_SERVER_FIELDS}'::regprocedure)")
        )
    finally:
        await conn.close()
    without, found = _COMMITMENT.subn("", definition)
    if found != 1:
        raise RuntimeError(f"{_SERVER_FIELDS} does not commit to the personal fields as expected")
    await _switch(
        dsn,
        without,
        f"ALTER TABLE public.audit_logs DISABLE TRIGGER {_CHAIN_TRIGGER}, "
        "ALTER COLUMN personal_digest SET DEFAULT ''::bytea",
    )
    return definition


async def _switch(dsn: str, definition: str, alter: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{claims.LOCK_TIMEOUT}'")
            await conn.execute(definition)
            await conn.execute(alter)
    finally:
        await conn.close()
