"""The unit of work: one tenant, one session, one connection, one task.

Invariants:

* Repositories exist only here and take the tenant and the session from the
  unit of work; they may execute statements, they never commit.
* Every transaction of a unit of work starts with the tenant preamble
  (``BEGIN; SET LOCAL ROLE <app role>; SET LOCAL app.tenant_id = '<uuid>'``,
  one round trip; on Citus ``BEGIN``, the ``SET LOCAL`` s and the tenant check
  are three), so row-level security scopes every statement, and the settings
  vanish at ``COMMIT`` or ``ROLLBACK``. The first transaction also checks
  that the tenant is live (:class:`TenantNotFound` otherwise).
* Leaving the block without :meth:`UnitOfWork.commit` rolls back. After a
  commit, the next statement opens a new transaction, scoped again.
* Rate-limit charges made inside are applied atomically at commit, so they
  count only if the unit of work commits and never hold a counter's row lock
  while the caller works.
* Single use, one task: entering twice, or using it from another task, raises
  :class:`UsageError`. Objects it returned stay readable after it ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm.attributes import instance_state

from slack_fathom_db import validation
from slack_fathom_db.connections import (
    COMMIT,
    COMMIT_AND_RESET,
    ROLLBACK,
    ROLLBACK_AND_RESET,
    connect,
    connection_lost,
    discard,
    send,
)
from slack_fathom_db.errors import (
    DatabaseUnavailable,
    SerializationConflict,
    SlackFathomDBError,
    TenantNotFound,
    TransactionAborted,
    UsageError,
)
from slack_fathom_db.repositories.audit import AuditRepo
from slack_fathom_db.repositories.meetings import MeetingRepo
from slack_fathom_db.repositories.rate_limits import RateLimitRepo
from slack_fathom_db.repositories.tenants import TenantRepo
from slack_fathom_db.retries import retry_conflicts
from slack_fathom_db.tenancy import (
    TenantId,
    has_citus,
    outside_opener,
    resolve_on,
    transaction_preamble,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from contextlib import AbstractAsyncContextManager
    from types import TracebackType

    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine

    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["UnitOfWork"]

T = TypeVar("T")


class UnitOfWork:
    """``async with db.unit_of_work(tenant_id) as uow:`` — see the module docstring."""

    tenants: TenantRepo
    meetings: MeetingRepo
    audit: AuditRepo
    rate_limits: RateLimitRepo

    def __init__(
        self,
        engine: AsyncEngine,
        settings: DatabaseSettings,
        *,
        tenant_id: TenantId | None = None,
        slack_team_id: str | None = None,
    ) -> None:
        if (tenant_id is None) == (slack_team_id is None):
            raise UsageError("unit_of_work() takes exactly one of tenant_id and slack_team_id")
        self._engine = engine
        self._settings = settings
        self._opener = outside_opener(settings)
        self._tenant_id = (
            None
            if tenant_id is None
            else TenantId(validation.uuid_value(tenant_id, field="tenant_id"))
        )
        self._slack_team_id = (
            None if slack_team_id is None else validation.slack_team_id(slack_team_id)
        )
        self._state = "new"
        self._task: asyncio.Task[object] | None = None
        self._connection_cm: AbstractAsyncContextManager[AsyncConnection] | None = None
        self._conn: AsyncConnection | None = None
        self._session: AsyncSession | None = None
        self._driver: asyncpg.Connection | None = None
        self._returned: list[object] = []  # objects built from records, to keep read-only
        self._citus = False
        self._exposed = False
        """Set when the connection was handed out (slack_fathom_db.testing): never pooled again."""
        self._in_transaction = False
        self._aborted_by: str | None = None

    @property
    def tenant_id(self) -> TenantId:
        """The tenant every statement of this unit of work is scoped to."""
        if self._tenant_id is None:
            raise UsageError("the tenant is known once the unit of work is entered")
        return self._tenant_id

    @property
    def settings(self) -> DatabaseSettings:
        """The settings of the ``Database`` this unit of work belongs to (limits, timeouts)."""
        return self._settings

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise UsageError("a UnitOfWork is single use: create a new one for each block")
        self._state = "open"
        self._task = asyncio.current_task()
        try:
            await self._open()
        except BaseException:
            self._state = "closed"
            raise
        self.tenants = TenantRepo(self)
        self.meetings = MeetingRepo(self)
        self.audit = AuditRepo(self)
        self.rate_limits = RateLimitRepo(self)
        return self

    async def _open(self) -> None:
        for attempt in (1, 2):
            self._connection_cm = connect(self._engine, action="open unit of work")
            conn = self._conn = await self._connection_cm.__aenter__()
            try:
                if self._slack_team_id is not None:
                    self._tenant_id = await resolve_on(
                        conn, self._slack_team_id, opener=self._opener
                    )
                    if self._tenant_id is None:
                        raise TenantNotFound("unit_of_work: no live tenant for that slack_team_id")
                raw = await conn.get_raw_connection()
                self._driver = raw.driver_connection
                self._citus = await has_citus(conn, opener=self._opener)
                await self._begin(check_tenant=True)
            except DatabaseUnavailable as exc:
                # A pooled connection that died since its last use fails here, before
                # anything was done: one attempt on a fresh connection is safe. A server
                # that did not answer in time is not retried: it would only double the wait.
                stale = conn.invalidated and not isinstance(exc.__cause__, TimeoutError)
                await self._release()
                if attempt == 2 or not stale:
                    raise
            except BaseException:
                await self._release()
                raise
            else:
                return

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._in_transaction:
                await self._rollback_transaction()
        except SlackFathomDBError:
            # The connection is gone (and invalidated): nothing was committed. Let the
            # block's own exception, if any, be the one the caller sees.
            if exc is None:
                raise
        finally:
            await self._close()

    async def commit(self) -> None:
        """Commit the current transaction, applying deferred rate-limit charges first.

        Raises :class:`TransactionAborted` (after rolling back) if a statement of
        the transaction failed: PostgreSQL keeps nothing of an aborted transaction.
        """
        self._check_usable()
        session = self._session
        if self._aborted_by is not None:
            reason = self._aborted_by
            await self._rollback_transaction()
            raise TransactionAborted(
                f"commit: nothing was committed; the transaction was aborted by an earlier "
                f"error ({reason})"
            )
        if (session is not None and (session.new or session.dirty or session.deleted)) or any(
            instance_state(instance).modified for instance in self._returned
        ):
            raise UsageError(
                "objects returned by repositories are read-only; change rows through "
                "repository methods (e.g. uow.meetings.complete_processing)"
            )
        try:
            await self.rate_limits.apply_deferred_charges()
        except BaseException:
            await self._rollback_transaction()
            raise
        if self._in_transaction:
            self._in_transaction = False
            try:
                message = COMMIT_AND_RESET if self._exposed else COMMIT
                tag = await send(self._connection(), message, action="commit", driver=self._driver)
            except BaseException:
                await self._forget_session_state()
                raise
            if tag != "COMMIT":
                await self._forget_session_state()
                raise TransactionAborted(
                    "commit: the server rolled the transaction back (a statement of it failed)"
                )
        if session is not None:
            await session.commit()

    async def rollback(self) -> None:
        """Roll back the current transaction; deferred rate-limit charges are dropped."""
        self._check_usable()
        await self._rollback_transaction()

    async def _tenant_session(self) -> AsyncSession:
        """The session, inside an open, tenant-scoped transaction (for repositories)."""
        await self._ensure_transaction()
        if self._session is None:
            self._session = AsyncSession(
                bind=self._connection(), expire_on_commit=False, autoflush=False
            )
        return self._session

    async def _driver_connection(self) -> asyncpg.Connection:
        """The asyncpg connection, inside an open, tenant-scoped transaction (hot paths)."""
        await self._ensure_transaction()
        if self._driver is None:
            raise UsageError("the unit of work is not open")
        return self._driver

    def track(self, instances: list[Any]) -> None:
        """Remember objects a repository built, so ``commit()`` can refuse changes to them."""
        self._returned.extend(instances)

    async def statement_failed(self, error: SlackFathomDBError, cause: BaseException) -> None:
        """A statement failed: the transaction is aborted; a lost or silent link is dropped."""
        self.transaction_failed(error)
        if self._conn is not None and connection_lost(error, self._driver):
            await discard(self._conn, cause, driver=self._driver)

    async def _ensure_transaction(self) -> None:
        self._check_usable()
        if self._aborted_by is not None:
            raise TransactionAborted(
                f"the transaction was aborted by an earlier error ({self._aborted_by}); "
                "call rollback() and start again"
            )
        if not self._in_transaction:
            await self._begin(check_tenant=False)

    async def retrying(self, operation: Callable[[], Awaitable[T]], *, action: str) -> T:
        """Run ``operation`` in a savepoint; after a serialization failure or deadlock,
        roll back to the savepoint and run it again (bounded, with jitter).

        The rest of the transaction is untouched by a retry; any other error
        propagates and leaves the transaction aborted as usual.
        """
        await self._tenant_session()
        conn = self._connection()

        async def attempt() -> T:
            await send(conn, "SAVEPOINT sfdb_retry", action=action, driver=self._driver)
            try:
                result = await operation()
            except SerializationConflict:
                await send(
                    conn, "ROLLBACK TO SAVEPOINT sfdb_retry", action=action, driver=self._driver
                )
                self._aborted_by = None
                raise
            await send(conn, "RELEASE SAVEPOINT sfdb_retry", action=action, driver=self._driver)
            return result

        return await retry_conflicts(attempt)

    def transaction_failed(self, error: BaseException) -> None:
        """Record that a statement failed, which aborts the transaction in PostgreSQL."""
        if self._in_transaction and self._aborted_by is None:
            self._aborted_by = f"{type(error).__name__}: {error}"

    async def _begin(self, *, check_tenant: bool) -> None:
        preamble = transaction_preamble(
            self.tenant_id,
            role=self._settings.roles.app,
            statement_timeout_ms=self._settings.statement_timeout_ms,
            idle_timeout_ms=self._settings.idle_in_transaction_timeout_ms,
            check_tenant=check_tenant,
            citus=self._citus,
        )
        try:
            for message in preamble:
                await send(self._connection(), message, action="unit_of_work", driver=self._driver)
        except BaseException:
            await self._rollback_transaction()
            raise
        self._in_transaction = True

    async def _rollback_transaction(self) -> None:
        if hasattr(self, "rate_limits"):
            self.rate_limits.discard_deferred_charges()
        self._in_transaction = False
        self._aborted_by = None
        conn = self._connection()
        try:
            if not conn.invalidated:
                message = ROLLBACK_AND_RESET if self._exposed else ROLLBACK
                await send(conn, message, action="rollback", driver=self._driver)
        finally:
            await self._forget_session_state()

    async def _forget_session_state(self) -> None:
        # Detach instead of expiring, so objects already returned stay readable.
        if self._session is not None:
            self._session.expunge_all()
            await self._session.rollback()

    async def _close(self) -> None:
        self._state = "closed"
        await self._release()

    async def _release(self) -> None:
        try:
            if self._session is not None:
                self._session.expunge_all()
                await self._session.close()
            if self._exposed and self._conn is not None:
                # It ran SQL the layer did not write: whatever that left on the session
                # (a prepared statement, a cursor, a setting) goes with the connection.
                await discard(self._conn, UsageError("the connection served foreign SQL"))
        finally:
            if self._connection_cm is not None:
                await self._connection_cm.__aexit__(None, None, None)
            self._connection_cm = None
            self._session = None
            self._driver = None
            self._conn = None

    def _connection(self) -> AsyncConnection:
        if self._conn is None:
            raise UsageError("the unit of work is not open")
        return self._conn

    def _check_usable(self) -> None:
        if self._state != "open" or self._conn is None:
            raise UsageError("the unit of work is not open: use it inside its `async with` block")
        if asyncio.current_task() is not self._task:
            raise UsageError("a unit of work belongs to the task that entered it; do not share it")
