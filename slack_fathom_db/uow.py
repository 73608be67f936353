"""The unit of work: one tenant, one runner (one connection), one task.

Invariants:

* Repositories exist only here, built from the unit of work's runner, tenant
  and settings; they run statements, they never commit.
* Every transaction starts with the tenant preamble (``BEGIN; SET LOCAL ROLE
  <app role>; SET LOCAL app.tenant_claim = '<signed claim>'; …``, one round
  trip; three on Citus), so row-level security scopes every statement to the
  tenant the database verified, and the settings vanish at ``COMMIT`` or
  ``ROLLBACK``. A transaction older than the claim's refresh age sets a fresh
  claim before its next statement. The first transaction also checks the
  claim and that the tenant is live (:class:`TenantClaimRefused`,
  :class:`TenantNotFound`).
* Leaving the block without :meth:`UnitOfWork.commit` rolls back. After a
  commit, the next statement opens a new transaction, scoped again.
* Before each commit, the rate-limit charges made inside are applied
  atomically, so they count only if the unit of work commits and never hold a
  counter's row lock while the caller works.
* Single use, one task: entering twice, or using it from another task, raises
  :class:`UsageError`. Records it returned are read-only and stay readable.
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING, Self

from slack_fathom_db import tracing, validation
from slack_fathom_db.errors import SlackFathomDBError, UsageError
from slack_fathom_db.repositories import AuditRepo, MeetingRepo, RateLimitRepo, TenantRepo
from slack_fathom_db.tenancy import TenantId, open_tenant

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.ext.asyncio import AsyncEngine

    from slack_fathom_db.claims import TenantKey
    from slack_fathom_db.runner import Runner
    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["UnitOfWork"]


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
        key: TenantKey,
        tenant_id: TenantId | None = None,
        slack_team_id: str | None = None,
    ) -> None:
        if (tenant_id is None) == (slack_team_id is None):
            raise UsageError("unit_of_work() takes exactly one of tenant_id and slack_team_id")
        self._engine = engine
        self._settings = settings
        self._key = key
        self._tenant_id = (
            None
            if tenant_id is None
            else TenantId(validation.uuid_value(tenant_id, field="tenant_id"))
        )
        self._slack_team_id = (
            None if slack_team_id is None else validation.slack_team_id(slack_team_id)
        )
        self._runner: Runner | None = None
        self._entered = False
        self._span = tracing.unit_of_work_span()

    @property
    def tenant_id(self) -> TenantId:
        """The tenant every statement of this unit of work is scoped to."""
        if self._tenant_id is None:
            raise UsageError("the tenant is known once the unit of work is entered")
        return self._tenant_id

    async def __aenter__(self) -> Self:
        if self._entered:
            raise UsageError("a UnitOfWork is single use: create a new one for each block")
        self._entered = True
        span = self._span.__enter__()
        try:
            runner, tenant = await open_tenant(
                self._engine,
                self._settings,
                key=self._key,
                tenant_id=self._tenant_id,
                slack_team_id=self._slack_team_id,
            )
        except BaseException as exc:
            self._span.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._runner, self._tenant_id, settings = runner, tenant, self._settings
        tracing.tag_tenant(span, settings, tenant)
        self.tenants = TenantRepo(runner, tenant, settings)
        self.meetings = MeetingRepo(runner, tenant, settings)
        self.audit = AuditRepo(runner, tenant, settings)
        self.rate_limits = RateLimitRepo(runner, tenant, settings)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                self.rate_limits.discard_deferred_charges()
                await runner.close(quiet=exc is not None)
        finally:
            self._span.__exit__(exc_type, exc, tb)

    async def commit(self) -> None:
        """Commit the current transaction, applying deferred rate-limit charges first.

        Raises :class:`~slack_fathom_db.errors.TransactionAborted` (after rolling
        back) if a statement of the transaction failed, and
        :class:`~slack_fathom_db.errors.RateLimitExceeded` (after rolling back)
        if a deferred charge no longer fits.
        """
        runner = self._usable()
        if runner.aborted or not runner.in_transaction:
            self.rate_limits.discard_deferred_charges()  # nothing of it will be committed
        else:
            try:
                await self.rate_limits.apply_deferred_charges()
            except BaseException:
                with suppress(SlackFathomDBError):  # the charge's own error is the one to see
                    await runner.rollback()
                raise
        await runner.commit()

    async def rollback(self) -> None:
        """Roll back the current transaction; deferred rate-limit charges are dropped."""
        runner = self._usable()
        self.rate_limits.discard_deferred_charges()
        await runner.rollback()

    def _usable(self) -> Runner:
        if self._runner is None:
            raise UsageError("the unit of work is not open: use it inside its `async with` block")
        self._runner.check_usable()
        return self._runner
