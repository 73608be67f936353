"""The one way in for SQL: tenant-scoped statement helpers shared by every repository.

Invariants:

* A repository is built by a unit of work from its runner, its tenant and its
  settings; no public method takes a ``tenant_id``.
* Every statement a repository runs is built here: ``_select`` / ``_live``
  filter on ``tenant_id = :tenant``, ``_update`` does too (and stamps
  ``updated_at``), ``_insert`` stamps the tenant on the row, and
  ``_tenant_row`` / ``_update_tenant_row`` address the tenant's own row in the
  global ``tenants`` table. A test reads the repository sources and fails if a
  statement is built any other way.
* Row-level security scopes the same statements again in the database, so a
  mistake here yields no rows rather than another tenant's rows.
* Statements run only through the runner (:mod:`slack_fathom_db.runner`),
  which translates errors; reads come back as :mod:`slack_fathom_db.records`.

Fixed-shape statements (every read, a meeting's creation, an audit event, the
rate-limit reads and charges) are compiled once per repository class, by name
(``_fetch`` / ``_fetch_records``: the tenant is the bind parameter
``sfdb_tenant``, every other value a named bind parameter), and run with the
tenant supplied on every call; those whose shape or values depend on the call
(``tenants.update``, ``find_account``, transitions, upserts, soft deletes) are
compiled with their values on each call (``_rows`` / ``_all`` /
``_one_or_none`` / ``_scalar``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, NamedTuple, TypeVar

from sqlalchemy import BindParameter, Select, Update, bindparam, inspect, select, tuple_, update
from sqlalchemy.dialects.postgresql import UUID, Insert, insert

from slack_fathom_db import models, records, tracing
from slack_fathom_db.errors import NotFound
from slack_fathom_db.models.base import Base, Timestamps, utcnow
from slack_fathom_db.runner import TENANT_KEY, CompiledStatement, compile_statement

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import asyncpg
    from sqlalchemy import ColumnElement
    from sqlalchemy.sql import ClauseElement

    from slack_fathom_db.runner import Runner
    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.tenancy import TenantId

ModelT = TypeVar("ModelT", bound=Base)
RecordT = TypeVar("RecordT", bound=NamedTuple)
T = TypeVar("T")

RECORDS: Final[dict[type[Base], type[Any]]] = {
    models.Tenant: records.Tenant,
    models.User: records.User,
    models.CrmConnection: records.CrmConnection,
    models.AccountMapping: records.AccountMapping,
    models.MeetingSession: records.MeetingSession,
    models.AuditLog: records.AuditLog,
}
"""The record each model's rows are read into (same attributes, same order)."""


def row_columns(model: type[Base]) -> list[ColumnElement[Any]]:
    """Every column of ``model`` but the internal ones, in the order of its attributes (and of
    its record)."""
    columns = (prop.columns[0] for prop in inspect(model).column_attrs)
    return [column for column in columns if not column.info.get("internal")]


class TenantRepository(Generic[ModelT]):
    """Base of every repository: tenant-scoped statement builders and execution."""

    model: type[ModelT]
    span_prefix: ClassVar[str]
    """Its name on the unit of work (``uow.<name>``): tracing spans are ``sfdb.<name>.<method>``."""
    _compiled: ClassVar[dict[str, CompiledStatement]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._compiled = {}
        tracing.trace_methods(cls, cls.span_prefix)

    def __init__(self, runner: Runner, tenant_id: TenantId, settings: DatabaseSettings) -> None:
        self._run = runner
        self._tenant_id = tenant_id
        self._settings = settings

    @property
    def tenant_id(self) -> TenantId:
        """The tenant this repository is scoped to."""
        return self._tenant_id

    @property
    def _max_json_bytes(self) -> int:
        return self._settings.max_json_bytes

    # -- statement builders ----------------------------------------------------------

    def _tenant(self) -> BindParameter[Any]:
        """The tenant as the bind parameter every helper filters and stamps with."""
        return bindparam(TENANT_KEY, self._tenant_id, type_=UUID(as_uuid=True))

    def _select(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return select(*row_columns(target)).where(target.tenant_id == self._tenant())

    def _live(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return self._select(target).where(target.deleted_at.is_(None))

    def _update(self, model: type[Base] | None = None) -> Update:
        target: Any = model or self.model
        statement = update(target).where(target.tenant_id == self._tenant())
        if issubclass(target, Timestamps):  # not api_rate_limits: its updated_at is a refill time
            statement = statement.values(updated_at=utcnow())
        return statement

    def _insert(self, model: type[Base] | None = None, **values: Any) -> Insert:
        if "tenant_id" in values:
            raise TypeError("the tenant is stamped by the repository, never passed in")
        return insert(model or self.model).values(tenant_id=self._tenant(), **values)

    def _update_oldest(self, name: str, where: ColumnElement[bool], count: int) -> Update:
        """An UPDATE of the ``count`` oldest live rows matching ``where``, skipping locked ones.

        For work queues: concurrent callers never take the same row
        (``FOR UPDATE SKIP LOCKED`` in a materialized CTE, which runs once
        whatever the plan).
        """
        target: Any = self.model
        chosen = (
            self._live()
            .with_only_columns(target.tenant_id, target.id)
            .where(where)
            .order_by(target.created_at)
            .limit(count)
            .with_for_update(skip_locked=True)
            .cte(name)
            .prefix_with("MATERIALIZED")
        )
        return self._update().where(
            tuple_(target.tenant_id, target.id).in_(select(chosen.c.tenant_id, chosen.c.id))
        )

    def _tenant_row(self) -> Select[Any]:
        tenant = models.Tenant
        return select(*row_columns(tenant)).where(
            tenant.id == self._tenant(), tenant.deleted_at.is_(None)
        )

    def _update_tenant_row(self) -> Update:
        tenant = models.Tenant
        return (
            update(tenant)
            .where(tenant.id == self._tenant(), tenant.deleted_at.is_(None))
            .values(updated_at=utcnow())
        )

    # -- execution -------------------------------------------------------------------

    async def _rows(self, statement: ClauseElement, *, action: str) -> list[asyncpg.Record]:
        """Run a dynamic statement (compiled with its values) and return its rows."""
        return await self._run.fetch_statement(statement, action=action)

    async def _all(self, statement: ClauseElement, *, action: str) -> list[Any]:
        """Run a dynamic statement that returns rows of this repository's model: records."""
        make = RECORDS[self._model_of(statement)]._make
        return [make(row) for row in await self._rows(statement, action=action)]

    async def _one_or_none(self, statement: ClauseElement, *, action: str) -> Any:
        """The record of the one row a dynamic statement returns, or ``None``."""
        found = await self._all(statement, action=action)
        return found[0] if found else None

    async def _scalar(self, statement: ClauseElement, *, action: str) -> Any:
        """The first column of the first row a dynamic statement returns, or ``None``."""
        rows = await self._rows(statement, action=action)
        return rows[0][0] if rows else None

    async def _fetch(
        self, name: str, build: Callable[[], ClauseElement], *, action: str, **params: Any
    ) -> list[asyncpg.Record]:
        """Run the compiled statement ``name`` (built by ``build`` once) and return its rows."""
        compiled = self._compiled_statement(name, build)
        return await self._run.fetch(
            compiled.sql, compiled.arguments(self._tenant_id, params), action=action
        )

    async def _fetch_records(
        self,
        record: type[RecordT],
        name: str,
        build: Callable[[], ClauseElement],
        *,
        action: str,
        **params: Any,
    ) -> list[RecordT]:
        """Like :meth:`_fetch`, the rows read into ``record`` s."""
        compiled = self._compiled_statement(name, build)
        rows = await self._run.fetch(
            compiled.sql, compiled.arguments(self._tenant_id, params), action=action
        )
        make = record._make
        return [make(row) for row in rows]

    async def _fetch_record(
        self,
        record: type[RecordT],
        name: str,
        build: Callable[[], ClauseElement],
        *,
        action: str,
        **params: Any,
    ) -> RecordT | None:
        """Like :meth:`_fetch_records`, for a statement of one row at most: it, or ``None``."""
        found = await self._fetch_records(record, name, build, action=action, **params)
        return found[0] if found else None

    def _compiled_statement(
        self, name: str, build: Callable[[], ClauseElement]
    ) -> CompiledStatement:
        """The statement ``name`` of this repository class, built and compiled on first use."""
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = compile_statement(build())
        return compiled

    async def _retrying(self, operation: Callable[[], Awaitable[T]], *, action: str) -> T:
        """Run ``operation`` in a savepoint, again after a serialization failure or deadlock."""
        return await self._run.retrying(operation, action=action)

    async def _soft_delete(self, model: Any, row_id: Any, *, action: str, **extra: Any) -> None:
        statement = (
            self._update(model)
            .where(model.id == row_id, model.deleted_at.is_(None))
            .values(deleted_at=utcnow(), **extra)
            .returning(model.id)
        )
        if await self._scalar(statement, action=action) is None:
            raise NotFound(f"{action}: no live row with that id")

    def _model_of(self, statement: ClauseElement) -> type[Base]:
        """The model whose row a statement returns (its table, or the returning table)."""
        table = getattr(statement, "table", None)
        if table is None:
            froms = statement.get_final_froms()  # type: ignore[attr-defined]
            table = froms[0]
        return _MODEL_OF_TABLE[table.name]


_MODEL_OF_TABLE: Final = {model.__tablename__: model for model in RECORDS}
