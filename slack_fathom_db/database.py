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
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from slack_fathom_db import validation
from slack_fathom_db.connections import (
    DRIVER_ERRORS,
    connect,
    execute_outside_tenant,
    fetchrow_outside_tenant,
    install_pool_guards,
)
from slack_fathom_db.errors import SlackFathomDBError
from slack_fathom_db.repositories.audit import audit_values
from slack_fathom_db.repositories.rate_limits import (
    RateLimitDecision,
    window,
    window_charge,
    window_decision,
)
from slack_fathom_db.retries import retry_conflicts
from slack_fathom_db.settings import DatabaseSettings
from slack_fathom_db.tenancy import (
    TenantDirectory,
    TenantId,
    outside_opener,
    session_settings,
)
from slack_fathom_db.uow import UnitOfWork

if TYPE_CHECKING:
    from types import TracebackType

    import asyncpg

    from slack_fathom_db.models import AuditLog
from slack_fathom_db.models.base import utcnow

__all__ = ["Database", "DatabaseInfo"]

APPLICATION_NAME = "slack_fathom_db"
_log = logging.getLogger(__name__)
# ``SELECT f(...)`` (not ``SELECT … FROM f(...)``): the form Citus runs whole on the
# node of the tenant once the function is distributed (sfdb distribute).
_CONSUME_SQL = "SELECT sfdb_consume_rate_limit($1, $2, $3, $4, $5, $6, $7)"


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

    @property
    def _opener(self) -> str | None:
        return outside_opener(self.settings)

    @property
    def directory(self) -> TenantDirectory:
        """Slack workspaces ↔ tenants: ``install`` and ``resolve``."""
        if self._directory is None:
            self._directory = TenantDirectory(self._pool(), opener=self._opener)
        return self._directory

    def unit_of_work(
        self, tenant_id: TenantId | None = None, *, slack_team_id: str | None = None
    ) -> UnitOfWork:
        """One tenant, one transaction: ``async with db.unit_of_work(tenant_id) as uow:``."""
        return UnitOfWork(
            self._pool(), self.settings, tenant_id=tenant_id, slack_team_id=slack_team_id
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

        async def attempt() -> RateLimitDecision:
            # One statement in autocommit (sfdb_consume_rate_limit, migration 0002): it
            # switches to the app role and the tenant itself, so the counter's row lock
            # lasts as long as the statement, not a client round trip.
            now = utcnow()
            start, end = window(charge.period, now)
            async with connect(self._pool(), action="rate limit") as conn:
                row = await fetchrow_outside_tenant(
                    conn,
                    _CONSUME_SQL,
                    tenant,
                    charge.resource_type,
                    charge.period,
                    start,
                    charge.cost,
                    charge.limit,
                    self.settings.statement_timeout_ms,
                    opener=self._opener,
                    action="rate limit",
                )
            granted, prior = row[0]
            if granted is not None:
                return window_decision(charge, spent=granted, allowed=True, now=now, end=end)
            return window_decision(charge, spent=prior or 0, allowed=False, now=now, end=end)

        return await retry_conflicts(attempt)

    async def log_security_event(
        self,
        tenant_id: TenantId,
        *,
        event_type: str,
        event_category: str,
        action_description: str,
        status: str = "denied",
        user_id: uuid.UUID | None = None,
        resource_type: str | None = None,
        resource_id: uuid.UUID | str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AuditLog:
        """Write an audit event in its own short transaction, so it survives a rollback.

        Same fields as ``AuditRepo.log_event``; for denials (a cross-tenant
        attempt, a rate-limit refusal) that must be kept even when the caller's
        unit of work rolls back.
        """
        event = audit_values(
            event_type=event_type,
            event_category=event_category,
            action_description=action_description,
            status=status,
            user_id=user_id,
            resource_type=resource_type,
            resource_id=resource_id,
            ip_address=ip_address,
            user_agent=user_agent,
            metadata=metadata,
            max_json_bytes=self.settings.max_json_bytes,
        )  # validated before a connection is taken
        async with self.unit_of_work(tenant_id) as uow:
            logged = await uow.audit._insert_event(event)
            await uow.commit()
        return logged

    async def check_connection(self) -> bool:
        """``True`` if a connection can be had and answers ``SELECT 1``."""
        try:
            async with connect(self._pool(), action="check connection") as conn:
                await execute_outside_tenant(
                    conn, text("SELECT 1"), opener=self._opener, action="check"
                )
        except (SlackFathomDBError, SQLAlchemyError, *DRIVER_ERRORS):
            return False
        return True

    async def info(self) -> DatabaseInfo:
        """Server version, database, user and pool figures; the URL with its password masked."""
        statement = text(
            "SELECT current_setting('server_version') AS version, "
            "current_database() AS database, session_user AS user"
        )
        async with connect(self._pool(), action="read database info") as conn:
            result = await execute_outside_tenant(
                conn, statement, opener=self._opener, action="read database info"
            )
            row = result.one()
        pool = self._pool().pool
        checked_out = pool.checkedout() if isinstance(pool, QueuePool) else 0
        overflow = max(0, pool.overflow()) if isinstance(pool, QueuePool) else 0
        return DatabaseInfo(
            url=self.settings.masked_url or "",
            server_version=row.version,
            database=row.database,
            user=row.user,
            app_role=self.settings.roles.app,
            pool_size=self.settings.pool_size,
            checked_out=checked_out,
            overflow=overflow,
            pgbouncer=self.settings.pgbouncer,
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
            echo=settings.echo,
            hide_parameters=True,
            isolation_level="AUTOCOMMIT",
            connect_args=connect_args,
        )
        install_pool_guards(engine)
        drivers = self._drivers

        def remember(dbapi_connection: Any, _record: object) -> None:
            drivers.add(dbapi_connection.driver_connection)

        event.listen(engine.sync_engine, "connect", remember)
        return engine


def _unique_statement_name() -> str:
    return f"__sfdb_{uuid.uuid4().hex}__"
