"""The one way in for SQL: tenant-scoped statement helpers shared by every repository.

Invariants:

* A repository is built by a unit of work and reads its tenant and session
  from it; no public method takes a ``tenant_id``.
* Every statement a repository runs is built here: ``_select`` / ``_live``
  filter on ``tenant_id = :tenant``, ``_update`` does too, ``_insert`` stamps
  the tenant on the row, and ``_tenant_row`` / ``_update_tenant_row`` address
  the tenant's own row in the global ``tenants`` table. A test reads the
  repository sources and fails if a statement is built any other way.
* Row-level security scopes the same statements again in the database, so a
  mistake here yields no rows rather than another tenant's rows.
* Database errors are translated here, at the boundary, and chained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import Select, Update, select, update
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.exc import SQLAlchemyError

from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import NotFound, translate
from slack_fathom_db.models import Tenant
from slack_fathom_db.models.base import Base, utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.engine import Result
    from sqlalchemy.sql import Executable

    from slack_fathom_db.tenancy import TenantId
    from slack_fathom_db.uow import UnitOfWork

ModelT = TypeVar("ModelT", bound=Base)
T = TypeVar("T")

EXECUTION_OPTIONS = {"populate_existing": True}
"""Rows returned refresh objects already in the identity map: READ COMMITTED, not stale copies."""


class TenantRepository(Generic[ModelT]):
    """Base of every repository: tenant-scoped statement builders and execution."""

    model: type[ModelT]

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow

    @property
    def tenant_id(self) -> TenantId:
        """The tenant this repository is scoped to."""
        return self._uow.tenant_id

    def _select(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return select(target).where(target.tenant_id == self.tenant_id)

    def _live(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return self._select(target).where(target.deleted_at.is_(None))

    def _update(self, model: type[Base] | None = None) -> Update:
        target: Any = model or self.model
        return update(target).where(target.tenant_id == self.tenant_id)

    def _insert(self, model: type[Base] | None = None, **values: Any) -> Insert:
        if "tenant_id" in values:
            raise TypeError("the tenant is stamped by the repository, never passed in")
        return insert(model or self.model).values(tenant_id=self.tenant_id, **values)

    def _tenant_row(self) -> Select[Tenant]:
        return select(Tenant).where(Tenant.id == self.tenant_id, Tenant.deleted_at.is_(None))

    def _update_tenant_row(self) -> Update:
        return update(Tenant).where(Tenant.id == self.tenant_id, Tenant.deleted_at.is_(None))

    async def _execute(self, statement: Executable, *, action: str) -> Result[Any]:
        session = await self._uow.session()
        try:
            return await session.execute(statement, execution_options=EXECUTION_OPTIONS)
        except (SQLAlchemyError, *DRIVER_ERRORS) as exc:
            error = translate(exc, action=action)
            self._uow.transaction_failed(error)
            raise error from exc

    async def _retrying(self, operation: Callable[[], Awaitable[T]], *, action: str) -> T:
        """Run ``operation`` in a savepoint, again after a serialization failure or deadlock."""
        return await self._uow.retrying(operation, action=action)

    async def _one_or_none(self, statement: Executable, *, action: str) -> Any:
        return (await self._execute(statement, action=action)).scalar_one_or_none()

    async def _all(self, statement: Executable, *, action: str) -> list[Any]:
        return list((await self._execute(statement, action=action)).scalars().all())

    async def _soft_delete(self, model: Any, row_id: Any, *, action: str, **extra: Any) -> None:
        statement = (
            self._update(model)
            .where(model.id == row_id, model.deleted_at.is_(None))
            .values(deleted_at=utcnow(), **extra)
            .returning(model.id)
        )
        if await self._one_or_none(statement, action=action) is None:
            raise NotFound(f"{action}: no live row with that id")
