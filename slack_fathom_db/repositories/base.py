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

Hot paths run *compiled* statements: built once per repository class by the
same helpers (the tenant is the bind parameter ``sfdb_tenant``, every other
value a named bind parameter), compiled once to PostgreSQL's SQL, and run on
the unit of work's asyncpg connection with the tenant supplied on every call.
Rows come back as ORM objects built directly from the record: detached
snapshots, read-only like every object a repository returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar, cast

from sqlalchemy import (
    BindParameter,
    Select,
    Update,
    bindparam,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import UUID, Insert, insert
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import SQLAlchemyError

from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import NotFound, translate
from slack_fathom_db.models import Tenant
from slack_fathom_db.models.base import Base, utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy import ColumnElement
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper
    from sqlalchemy.sql import ClauseElement, Executable
    from sqlalchemy.sql.compiler import SQLCompiler

    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.tenancy import TenantId
    from slack_fathom_db.uow import UnitOfWork

ModelT = TypeVar("ModelT", bound=Base)
T = TypeVar("T")

EXECUTION_OPTIONS = {"populate_existing": True}
"""Rows returned refresh objects already in the identity map: READ COMMITTED, not stale copies."""

TENANT_KEY: Final = "sfdb_tenant"
_DIALECT: Final = asyncpg_dialect()  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A statement compiled once: its SQL and the order of its named parameters."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, tenant_id: object, params: dict[str, Any]) -> list[Any]:
        """The positional arguments, the tenant included, as the driver wants them."""
        values = [tenant_id if name == TENANT_KEY else params[name] for name in self.names]
        return [
            value if process is None or value is None else process(value)
            for value, process in zip(values, self.processors, strict=True)
        ]


def compile_statement(statement: ClauseElement) -> CompiledStatement:
    """Compile for asyncpg (``$n`` placeholders); only named, value-less parameters allowed."""
    compiled = cast("SQLCompiler", statement.compile(dialect=_DIALECT))
    names = tuple(compiled.positiontup or ())
    processors = []
    for name in names:
        bind = compiled.binds.get(name)
        if bind is None or (
            name != TENANT_KEY and (bind.callable is not None or bind.value is not None)
        ):
            raise TypeError(f"compiled statements take named, value-less parameters; not {name!r}")
        # The type's own conversion, as SQLAlchemy would apply it (e.g. JSON serialisation).
        processors.append(bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT))
    return CompiledStatement(sql=str(compiled), names=names, processors=tuple(processors))


def loader(model: type[ModelT]) -> Callable[[Any], ModelT]:
    """A function that builds a detached, fully loaded ``model`` from a record."""
    mapper: Mapper[Any] = inspect(model)
    fields = [
        (column.name, prop.key, column.type.dialect_impl(_DIALECT).result_processor(_DIALECT, None))
        for prop in mapper.column_attrs
        for column in prop.columns
    ]
    new_instance = mapper.class_manager.new_instance

    def load(record: Any) -> ModelT:
        instance: ModelT = new_instance()
        values = instance.__dict__  # the instance's loaded state, as SQLAlchemy keeps it
        for column, key, process in fields:
            value = record[column]
            values[key] = value if process is None or value is None else process(value)
        return instance

    return load


class TenantRepository(Generic[ModelT]):
    """Base of every repository: tenant-scoped statement builders and execution."""

    model: type[ModelT]
    _compiled: ClassVar[dict[str, CompiledStatement]]
    _loaders: ClassVar[dict[type[Any], Callable[[Any], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._compiled = {}

    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow

    def _tenant(self) -> BindParameter[Any]:
        """The tenant as the bind parameter every helper filters and stamps with."""
        return bindparam(TENANT_KEY, self.tenant_id, type_=UUID(as_uuid=True))

    @property
    def tenant_id(self) -> TenantId:
        """The tenant this repository is scoped to."""
        return self._uow.tenant_id

    @property
    def _settings(self) -> DatabaseSettings:
        """The settings of the unit of work's ``Database`` (limits, leases)."""
        return self._uow.settings

    @property
    def _max_json_bytes(self) -> int:
        return self._settings.max_json_bytes

    def _select(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return select(target).where(target.tenant_id == self._tenant())

    def _live(self, model: type[Base] | None = None) -> Select[Any]:
        target: Any = model or self.model
        return self._select(target).where(target.deleted_at.is_(None))

    def _update(self, model: type[Base] | None = None) -> Update:
        target: Any = model or self.model
        return update(target).where(target.tenant_id == self._tenant())

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

    def _tenant_row(self) -> Select[Tenant]:
        return select(Tenant).where(Tenant.id == self._tenant(), Tenant.deleted_at.is_(None))

    def _update_tenant_row(self) -> Update:
        return update(Tenant).where(Tenant.id == self._tenant(), Tenant.deleted_at.is_(None))

    async def _execute(self, statement: Executable, *, action: str) -> Result[Any]:
        session = await self._uow._tenant_session()
        try:
            return await session.execute(statement, execution_options=EXECUTION_OPTIONS)
        except (SQLAlchemyError, *DRIVER_ERRORS) as exc:
            error = translate(exc, action=action)
            await self._uow.statement_failed(error, exc)
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

    # -- compiled statements on the driver (hot paths) ----------------------------------

    def _compiled_statement(
        self, name: str, build: Callable[[], ClauseElement]
    ) -> CompiledStatement:
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = compile_statement(build())
        return compiled

    async def _fetch(
        self, name: str, build: Callable[[], ClauseElement], *, action: str, **params: Any
    ) -> list[Any]:
        """Run the compiled statement ``name`` (built by ``build`` once) and return its records."""
        compiled = self._compiled_statement(name, build)
        driver = await self._uow._driver_connection()
        try:
            return list(
                await driver.fetch(compiled.sql, *compiled.arguments(self.tenant_id, params))
            )
        except DRIVER_ERRORS as exc:
            error = translate(exc, action=action)
            await self._uow.statement_failed(error, exc)
            raise error from exc

    async def _fetch_models(
        self,
        model: type[T],
        name: str,
        build: Callable[[], ClauseElement],
        *,
        action: str,
        **params: Any,
    ) -> list[T]:
        load = self._loaders.get(model)
        if load is None:
            load = self._loaders[model] = loader(model)
        records = await self._fetch(name, build, action=action, **params)
        instances = [load(record) for record in records]
        self._uow.track(instances)
        return instances
