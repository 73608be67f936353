"""``Database``: the engine, the tenant directory, units of work and rate limits.

Nothing connects at import or construction: the engine is built on first use
and connects lazily. One ``Database`` per process (per event loop) is the
intended shape; ``dispose()`` (or ``async with``) closes its pool.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Self, Unpack

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from slack_fathom_db import tracing, validation
from slack_fathom_db.claims import TenantKey
from slack_fathom_db.connections import install_pool_guards, waits
from slack_fathom_db.errors import SlackFathomDBError
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.repositories.audit import EventFields, audit_values
from slack_fathom_db.repositories.rate_limits import (
    RateLimitDecision,
    window,
    window_charge,
    window_decision,
)
from slack_fathom_db.retries import retry_conflicts
from slack_fathom_db.runner import Runner, fetch_outside, outside_tenant
from slack_fathom_db.settings import DatabaseSettings
from slack_fathom_db.tenancy import (
    TenantDirectory,
    TenantId,
    outside_opener,
    session_settings,
)
from slack_fathom_db.uow import UnitOfWork

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    import asyncpg

    from slack_fathom_db.records import AuditLog

__all__ = ["Database", "DatabaseInfo", "PoolStats"]

APPLICATION_NAME = "slack_fathom_db"
_log = logging.getLogger(__name__)
# ``SELECT f(...)`` (not ``SELECT … FROM f(...)``): the form Citus runs whole on the
# node of the tenant once the function is distributed (sfdb distribute).
_CONSUME_SQL = "SELECT sfdb_consume_rate_limit($1, $2, $3, $4, $5, $6, $7)"
_INFO_SQL = (
    "SELECT current_setting('server_version') AS version, "
    "current_database() AS database, session_user AS user"
)


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The connection pool's figures at one moment."""

    size: int
    """Connections the pool keeps (``DATABASE_POOL_SIZE``)."""
    checked_out: int
    """Connections in use now."""
    overflow: int
    """Connections open beyond ``size`` now (at most ``DATABASE_MAX_OVERFLOW``)."""
    waits: int
    """Checkouts so far that found every allowed connection busy and had to wait."""


@dataclass(frozen=True, slots=True)
class DatabaseInfo:
    """What the layer is connected to; safe to print (the password is masked)."""

    url: str
    server_version: str
    database: str
    user: str
    app_role: str
    pool_size: int
    checked_out: int
    overflow: int
    pgbouncer: bool


class Database:
    """Entry point of the layer: ``Database(DatabaseSettings())``."""

    def __init__(self, settings: DatabaseSettings | None = None) -> None:
        self.settings = settings if settings is not None else DatabaseSettings()
        # Signs every tenant transaction's claim: a start without it fails here, clearly.
        self._tenant_key = TenantKey.from_settings(self.settings)
        self._engine: AsyncEngine | None = None
        self._directory: TenantDirectory | None = None
        # Every driver connection the pool opened, so dispose() can abort what will not close.
        self._drivers: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"Database(url={self.settings.masked_url!r})"

    def _pool(self) -> AsyncEngine:
        """The engine and its pool, built on first use (building opens no connection).

        Not public: every statement goes through the directory, units of work
        and rate limits, which set the role, the tenant and the search path.
        """
        if self._engine is None:
            self._engine = self._build_engine()
        return self._engine

    @cached_property
    def _opener(self) -> str | None:
        """How a statement outside any tenant opens its transaction (behind PgBouncer)."""
        return outside_opener(self.settings)

    def _outside(self, action: str) -> AbstractAsyncContextManager[Runner]:
        """A runner for statements outside any tenant (as the directory role), each its own."""
        return outside_tenant(self._pool(), self.settings, begin=self._opener, action=action)

    async def _fetch_outside(
        self, sql: str, args: Sequence[object], *, action: str
    ) -> list[asyncpg.Record]:
        """One statement outside any tenant (as the directory role)."""
        return await fetch_outside(
            self._pool(),
            self.settings,
            sql,
            args,
            begin=self._opener,
            action=action,
        )

    @property
    def directory(self) -> TenantDirectory:
        """Slack workspaces ↔ tenants: ``install``, ``resolve`` and ``uninstall``."""
        if self._directory is None:
            self._directory = TenantDirectory(self._pool(), self.settings)
        return self._directory

    def unit_of_work(
        self, tenant_id: TenantId | None = None, *, slack_team_id: str | None = None
    ) -> UnitOfWork:
        """One tenant, one transaction: ``async with db.unit_of_work(tenant_id) as uow:``."""
        return UnitOfWork(
            self._pool(),
            self.settings,
            key=self._tenant_key,
            tenant_id=tenant_id,
            slack_team_id=slack_team_id,
        )

    async def rate_limit(
        self,
        tenant_id: TenantId,
        resource_type: str,
        *,
        limit: int,
        period: str = "daily",
        cost: int = 1,
    ) -> RateLimitDecision:
        """Spend ``cost`` of ``limit`` now, in a short transaction of its own.

        One atomic statement; committed at once when allowed; a denial spends
        nothing. It never waits behind a unit of work (their charges are
        applied at their commit).
        """
        charge = window_charge(resource_type, limit=limit, period=period, cost=cost)
        tenant = validation.uuid_value(tenant_id, field="tenant_id")
        timeout = self.settings.statement_timeout_ms

        async def attempt() -> RateLimitDecision:
            # One statement in autocommit (sfdb_consume_rate_limit, migration 0002): it
            # switches to the app role and the tenant itself, so the counter's row lock
            # lasts as long as the statement, not a client round trip.
            now = utcnow()
            start, end = window(charge.period, now)
            arguments = (tenant, *charge.key, start, charge.cost, charge.limit, timeout)
            (row,) = await self._fetch_outside(_CONSUME_SQL, arguments, action="rate limit")
            granted, prior = row[0]
            if granted is not None:
                return window_decision(charge, spent=granted, allowed=True, now=now, end=end)
            return window_decision(charge, spent=prior or 0, allowed=False, now=now, end=end)

        return await retry_conflicts(attempt)

    async def log_security_event(
        self, tenant_id: TenantId, **event: Unpack[EventFields]
    ) -> AuditLog:
        """Write an audit event in its own short transaction, so it survives a rollback.

        The fields of ``AuditRepo.log_event``, with ``status`` ``denied`` unless
        given; for denials (a cross-tenant attempt, a rate-limit refusal) that
        must be kept even when the caller's unit of work rolls back.
        """
        event.setdefault("status", "denied")
        audit_values(event, max_json_bytes=self.settings.max_json_bytes)  # before connecting
        async with self.unit_of_work(tenant_id) as uow:
            logged = await uow.audit.log_event(**event)
            await uow.commit()
        return logged

    async def check_connection(self) -> bool:
        """``True`` if a connection can be had and answers ``SELECT 1``."""
        try:
            await self._fetch_outside("SELECT 1", (), action="check connection")
        except SlackFathomDBError:
            return False
        return True

    async def info(self) -> DatabaseInfo:
        """Server version, database, user and pool figures; the URL with its password masked."""
        (row,) = await self._fetch_outside(_INFO_SQL, (), action="read database info")
        pool = self.pool_stats()
        return DatabaseInfo(
            url=self.settings.masked_url or "",
            server_version=row["version"],
            database=row["database"],
            user=row["user"],
            app_role=self.settings.roles.app,
            pool_size=pool.size,
            checked_out=pool.checked_out,
            overflow=pool.overflow,
            pgbouncer=self.settings.pgbouncer,
        )

    def pool_stats(self) -> PoolStats:
        """The pool's figures now (zeros before the first connection)."""
        pool = None if self._engine is None else self._engine.pool
        if not isinstance(pool, QueuePool):
            return PoolStats(size=self.settings.pool_size, checked_out=0, overflow=0, waits=0)
        return PoolStats(
            size=self.settings.pool_size,
            checked_out=pool.checkedout(),
            overflow=max(0, pool.overflow()),
            waits=waits(pool),
        )

    async def dispose(self) -> None:
        """Close every pooled connection; the next use builds a fresh pool.

        Each connection is closed gracefully (the server is told, and logs no
        error), which waits for the server to answer. A server, proxy or
        network that does not answer within ``DATABASE_CONNECT_TIMEOUT`` would
        otherwise hang shutdown: then the connections still open are aborted
        (their sockets closed at once), never left to the garbage collector.
        """
        engine, self._engine, self._directory = self._engine, None, None
        drivers, self._drivers = self._drivers, weakref.WeakSet()
        if engine is None:
            return
        try:
            await asyncio.wait_for(engine.dispose(), timeout=self.settings.connect_timeout)
        except TimeoutError:
            open_ = [driver for driver in drivers if not driver.is_closed()]
            _log.warning(
                "dispose: the server did not answer a graceful close within "
                "DATABASE_CONNECT_TIMEOUT; %d connection(s) aborted",
                len(open_),
            )
            for driver in open_:
                driver.terminate()
            await engine.dispose(close=False)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()

    def _build_engine(self) -> AsyncEngine:
        settings = self.settings
        connect_args: dict[str, Any] = {
            "server_settings": {"application_name": APPLICATION_NAME, **session_settings(settings)},
            # Client-side bounds: a proxy or network that stops answering fails the
            # caller with DatabaseUnavailable instead of hanging it.
            "timeout": settings.connect_timeout,
            "command_timeout": settings.client_timeout,
        }
        if settings.pgbouncer:
            # Transaction pooling: a prepared statement may not outlive its transaction.
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = _unique_statement_name
        engine = create_async_engine(
            settings.sqlalchemy_url(),
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            # The connection used last is the next one out, as asyncpg's own pool does: a
            # quiet application keeps reusing a few warm server processes, and the rest
            # sit idle (and are recycled) instead of each being woken in turn.
            pool_use_lifo=True,
            isolation_level="AUTOCOMMIT",
            connect_args=connect_args,
        )
        install_pool_guards(engine, pgbouncer=settings.pgbouncer)
        tracing.observe_pool(
            f"{settings.roles.app.removesuffix('_app')}#{id(self):x}", self.pool_stats
        )
        drivers = self._drivers

        def remember(dbapi_connection: Any, _record: object) -> None:
            drivers.add(dbapi_connection.driver_connection)

        event.listen(engine.sync_engine, "connect", remember)
        return engine


def _unique_statement_name() -> str:
    return f"__sfdb_{uuid.uuid4().hex}__"
