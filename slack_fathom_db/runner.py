"""The one way statements run: a runner per pooled connection.

A :class:`Runner` holds one pooled connection for as long as a unit of work (or
one call outside any tenant) lasts, and is the only code that sends SQL on it.

Invariants:

* **The transaction is the runner's.** A tenant runner opens each transaction
  on its first statement with the messages its ``begin`` gives (the tenant
  preamble, :func:`slack_fathom_db.tenancy.transaction_preamble`), and ends it
  with ``COMMIT`` or ``ROLLBACK``; a retried step runs in a savepoint. A
  runner outside any tenant runs each statement on its own (autocommitted, or
  behind PgBouncer in a transaction its ``begin`` opens and it commits).
* **An aborted transaction stays aborted.** After a failed statement
  PostgreSQL keeps nothing of the transaction: every later statement raises
  :class:`TransactionAborted` until ``rollback()``.
* **One error boundary.** Every driver error is translated here, once
  (:func:`slack_fathom_db.errors.translate`), and chained; a connection left in
  an unknown state (lost, or silent past the client timeout) is discarded.
* **Observable.** ``DATABASE_ECHO`` logs the SQL of every statement on the
  ``slack_fathom_db.sql`` logger (never a parameter; the tenant's literal in
  the preamble is masked), and a statement slower than
  ``DATABASE_SLOW_STATEMENT_MS`` is logged as a warning.

Statements are SQLAlchemy Core compiled for asyncpg (``$n`` placeholders):
fixed-shape ones once per name (:func:`compile_statement`, a repository keeps
them), dynamic ones on every call (:func:`render`). Rows come back as the
driver's records; repositories turn them into :mod:`slack_fathom_db.records`.
"""

from __future__ import annotations

import logging
import re
import time
from asyncio import current_task
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, cast

from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from slack_fathom_db.connections import (
    COMMIT,
    COMMIT_AND_RESET,
    DRIVER_ERRORS,
    ROLLBACK,
    ROLLBACK_AND_RESET,
    checkin,
    checkout,
    connection_lost,
    discard,
)
from slack_fathom_db.errors import (
    DatabaseUnavailable,
    SerializationConflict,
    SlackFathomDBError,
    TransactionAborted,
    UsageError,
    translate,
)
from slack_fathom_db.retries import retry_conflicts

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import Pool, PoolProxiedConnection
    from sqlalchemy.sql import ClauseElement
    from sqlalchemy.sql.compiler import SQLCompiler

    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "CompiledStatement",
    "Renewal",
    "Runner",
    "compile_statement",
    "fetch_outside",
    "outside_tenant",
    "render",
]

T = TypeVar("T")

TENANT_KEY: Final = "sfdb_tenant"
"""The name of the tenant's bind parameter in every tenant-scoped statement."""

_DIALECT: Final = asyncpg_dialect()  # type: ignore[no-untyped-call]
_sql_log = logging.getLogger("slack_fathom_db.sql")
# What the SQL log and the slow-statement warning mask: a tenant's literal, a claim.
_TENANT_LITERAL: Final = re.compile(r"'(?:v1\.[^']*|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})'")


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A statement compiled for asyncpg: its SQL and how to order its parameters."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, tenant_id: object, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments, the tenant included, as the driver wants them."""
        values = [tenant_id if name == TENANT_KEY else params[name] for name in self.names]
        if not any(self.processors):
            return values
        return [
            value if process is None or value is None else process(value)
            for value, process in zip(values, self.processors, strict=True)
        ]


def compile_statement(statement: ClauseElement) -> CompiledStatement:
    """Compile a fixed-shape statement once: every parameter named and given per call.

    Only the tenant's parameter may carry a value (it is replaced on every call).
    """
    compiled = cast("SQLCompiler", statement.compile(dialect=_DIALECT))
    names = tuple(compiled.positiontup or ())
    for name in names:
        bind = compiled.binds[name]
        valued = bind.callable is not None or bind.value is not None
        if (name != TENANT_KEY and valued) or bind.expanding or bind.literal_execute:
            raise TypeError(f"compiled statements take named, value-less parameters; not {name!r}")
    processors = tuple(
        compiled.binds[name].type.dialect_impl(_DIALECT).bind_processor(_DIALECT) for name in names
    )
    return CompiledStatement(sql=str(compiled), names=names, processors=processors)


def render(statement: ClauseElement) -> tuple[str, list[Any]]:
    """Compile a dynamic statement with the values it carries: its SQL and arguments.

    Lists (``IN``) are expanded into one parameter per item, as SQLAlchemy does.
    """
    compiled = cast("SQLCompiler", statement.compile(dialect=_DIALECT))
    state = compiled.construct_expanded_state()
    original = {item: name for name, items in state.parameter_expansion.items() for item in items}
    arguments = []
    for name in state.positiontup or ():
        bind = compiled.binds[original.get(name, name)]
        process = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
        value = state.parameters[name]
        arguments.append(value if process is None or value is None else process(value))
    return state.statement, arguments


class Renewal(Protocol):
    """What a runner asks before each statement of a transaction (a tenant's claims)."""

    def refresh(self) -> str | None:
        """A message to send before the next statement, or ``None``."""

    def undone(self) -> None:
        """What was sent since the last savepoint was rolled back."""


class Runner:
    """Statements on one pooled connection; see the module docstring.

    ``begin`` gives the messages that open a transaction (``None``: statements
    run autocommitted); ``autocommit`` commits after every statement the
    transaction ``begin`` opened (work outside a unit of work).
    """

    def __init__(
        self,
        pool: Pool,
        pooled: PoolProxiedConnection,
        driver: asyncpg.Connection,
        settings: DatabaseSettings,
        *,
        begin: Callable[[], Sequence[str]] | None,
        autocommit: bool,
    ) -> None:
        self._pool = pool
        self._pooled = pooled
        self._driver = driver
        self._begin_messages = begin
        self._autocommit = autocommit
        self._renewal: Renewal | None = None
        self._in_transaction = False
        self._aborted_by: str | None = None
        self._task = current_task()
        self._closed = False
        self._discarded = False
        self._echo = settings.echo
        self._slow = settings.slow_statement_ms / 1000 if settings.slow_statement_ms else None
        self.exposed = False
        """Set when SQL the layer did not write ran here (``slack_fathom_db.testing``):
        the session is reset with the transaction and the connection never pooled again."""

    @property
    def info(self) -> dict[Any, Any]:
        """The pooled connection's own dictionary: what it answered once in its life."""
        return self._pooled.info

    @property
    def driver(self) -> asyncpg.Connection:
        """The driver connection (its identity and backend, for probes in tests)."""
        return self._driver

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on this runner."""
        return self._in_transaction

    @property
    def aborted(self) -> bool:
        """Whether a statement of the open transaction failed (nothing of it can commit)."""
        return self._aborted_by is not None

    def rescope(
        self,
        *,
        begin: Callable[[], Sequence[str]] | None,
        autocommit: bool,
        renewal: Renewal | None = None,
    ) -> None:
        """Change how transactions open (e.g. from the directory's to a tenant's).

        ``renewal`` is asked before each statement inside a transaction; a
        message it returns (a fresh tenant claim) is sent first. A rollback to
        a savepoint undoes what was sent after it: the renewal is told so.
        """
        if self._in_transaction:
            raise UsageError("a runner changes scope only between transactions")
        self._begin_messages = begin
        self._autocommit = autocommit
        self._renewal = renewal

    # -- statements ------------------------------------------------------------------

    async def fetch(self, sql: str, args: Sequence[Any], *, action: str) -> list[asyncpg.Record]:
        """Run one statement (inside the runner's transaction) and return its rows."""
        ready = self._in_transaction or self._begin_messages is None
        if not ready or self._aborted_by is not None or current_task() is not self._task:
            await self._ensure_transaction(action)  # begins, or raises what is wrong
        elif self._closed:
            self.check_usable()
        if self._renewal is not None and self._in_transaction:
            renewed = self._renewal.refresh()
            if renewed is not None:
                await self._send(renewed, action=action)
        started = time.perf_counter()
        if self._echo:
            _sql_log.info("%s  -- %s", sql, action)
        try:
            rows = await self._driver.fetch(sql, *args)
        except DRIVER_ERRORS as exc:
            error = self._failed(exc, action)
            if self._autocommit:
                await self._rollback_quietly()
            raise error from exc
        except BaseException:
            self._interrupted()
            raise
        finally:
            self._timed(sql, action, started)
        if self._autocommit and self._in_transaction:
            await self._end(COMMIT, action)
        return rows

    async def fetch_statement(
        self, statement: ClauseElement, *, action: str
    ) -> list[asyncpg.Record]:
        """Compile a dynamic statement with its values, run it, return its rows."""
        sql, args = render(statement)
        return await self.fetch(sql, args, action=action)

    async def _send(self, sql: str, *, action: str) -> str:
        """Send ``sql`` (statements without parameters) in one simple-protocol message.

        Returns the command tag of the last statement. For the runner's own
        transaction control (preamble, savepoints, ``COMMIT``, ``ROLLBACK``) only.
        """
        if self._echo:
            _sql_log.info("%s  -- %s", _TENANT_LITERAL.sub("'…'", sql), action)
        started = time.perf_counter()
        try:
            return await self._driver.execute(sql)
        except DRIVER_ERRORS as exc:
            raise self._failed(exc, action) from exc
        except BaseException:
            self._interrupted()
            raise
        finally:
            self._timed(sql, action, started)

    # -- the transaction -------------------------------------------------------------

    async def begin(self, action: str = "begin") -> None:
        """Open a transaction now (it opens by itself on the first statement)."""
        if self._begin_messages is None:
            raise UsageError("this runner runs statements autocommitted")
        try:
            for message in self._begin_messages():
                await self._send(message, action=action)
        except BaseException:
            self._in_transaction = True  # a part of the messages may have opened one
            await self._rollback_quietly()
            raise
        self._in_transaction = True

    async def commit(self) -> None:
        """Commit the open transaction, if any.

        Raises :class:`TransactionAborted` (after rolling back) if a statement
        of it failed: PostgreSQL keeps nothing of an aborted transaction.
        """
        self.check_usable()
        if self._aborted_by is not None:
            reason = self._aborted_by
            await self.rollback()
            raise TransactionAborted(
                f"commit: nothing was committed; the transaction was aborted by an earlier "
                f"error ({reason})"
            )
        if self._in_transaction:
            tag = await self._end(COMMIT_AND_RESET if self.exposed else COMMIT, "commit")
            if tag != "COMMIT":
                raise TransactionAborted(
                    "commit: the server rolled the transaction back (a statement of it failed)"
                )

    async def rollback(self) -> None:
        """Roll back the open transaction, if any; the runner can begin again."""
        self.check_usable()
        self._aborted_by = None
        if self._in_transaction:
            self._in_transaction = False
            if not self._discarded:
                await self._send(
                    ROLLBACK_AND_RESET if self.exposed else ROLLBACK, action="rollback"
                )

    async def retrying(self, operation: Callable[[], Awaitable[T]], *, action: str) -> T:
        """Run ``operation`` in a savepoint; after a serialization failure or deadlock,
        roll back to the savepoint and run it again (bounded, with jitter).

        The rest of the transaction is untouched by a retry; any other error
        propagates and leaves the transaction aborted as usual.
        """
        await self._ensure_transaction(action)

        async def attempt() -> T:
            await self._send("SAVEPOINT sfdb_retry", action=action)
            try:
                result = await operation()
            except SerializationConflict:
                await self._send("ROLLBACK TO SAVEPOINT sfdb_retry", action=action)
                self._aborted_by = None
                if self._renewal is not None:
                    self._renewal.undone()  # a claim set since the savepoint is gone
                raise
            await self._send("RELEASE SAVEPOINT sfdb_retry", action=action)
            return result

        return await retry_conflicts(attempt)

    def check_usable(self) -> None:
        """Raise :class:`UsageError` once closed, or when used from another task."""
        if self._closed:
            raise UsageError("the unit of work is not open: use it inside its `async with` block")
        if current_task() is not self._task:
            raise UsageError("a unit of work belongs to the task that entered it; do not share it")

    async def _ensure_transaction(self, action: str) -> None:
        self.check_usable()
        if self._aborted_by is not None:
            raise TransactionAborted(
                f"{action}: the transaction was aborted by an earlier error "
                f"({self._aborted_by}); call rollback() and start again"
            )
        if not self._in_transaction and self._begin_messages is not None:
            await self.begin(action)

    async def _end(self, message: str, action: str) -> str:
        self._in_transaction = False
        return await self._send(message, action=action)

    def _failed(self, exc: BaseException, action: str) -> SlackFathomDBError:
        """Translate a statement's error: a lost or silent link is dropped first (nothing
        more is sent on it), and the open transaction is aborted."""
        error = translate(exc, action=action)
        if connection_lost(error, self._driver):
            self._discard(exc)
        if self._in_transaction and self._aborted_by is None:
            self._aborted_by = f"{type(error).__name__}: {error}"
        return error

    def _interrupted(self) -> None:
        """A statement was cancelled while in flight: its effect is unknown, so the
        transaction counts as aborted (``commit()`` refuses; ``rollback()`` clears it)."""
        if self._in_transaction and self._aborted_by is None:
            self._aborted_by = "a statement was cancelled before it finished"

    def _discard(self, cause: BaseException) -> None:
        self._discarded = True
        discard(self._pooled, self._driver, cause)

    async def _rollback_quietly(self) -> None:
        """Roll back after a failure that is being raised: a lost link is no second error."""
        with suppress(SlackFathomDBError):
            await self.rollback()

    def _timed(self, sql: str, action: str, started: float) -> None:
        if self._slow is not None:
            elapsed = time.perf_counter() - started
            if elapsed >= self._slow:
                _sql_log.warning(
                    "slow statement: %.0f ms (%s): %s",
                    elapsed * 1000,
                    action,
                    _TENANT_LITERAL.sub("'…'", sql)[:500],
                )

    # -- the connection --------------------------------------------------------------

    async def expose(self) -> asyncpg.Connection:
        """The driver connection, inside the open transaction, for SQL the layer did not write.

        Only :mod:`slack_fathom_db.testing` uses it (probes and attacks in tests).
        The runner is marked: its session is reset with the transaction, and its
        connection is dropped at the end, never pooled again.
        """
        await self._ensure_transaction("probe")
        self.exposed = True
        return self._driver

    async def close(self, *, quiet: bool) -> None:
        """Roll back what is open and return the connection (drop it if it was exposed).

        With ``quiet``, a failed rollback (the connection is gone: nothing was
        committed) is not raised, so the caller's own exception stays the one
        that is seen.
        """
        try:
            if self._in_transaction:
                await self.rollback()
        except SlackFathomDBError:
            if not quiet:
                raise
        finally:
            self._closed = True
            try:
                if self.exposed:
                    # It ran SQL the layer did not write: whatever that left on the session
                    # (a prepared statement, a cursor, a setting) goes with the connection.
                    self._discard(UsageError("the connection served foreign SQL"))
            finally:
                await checkin(self._pooled, self._driver, self._pool)

    @property
    def closed(self) -> bool:
        """Whether the runner has returned its connection."""
        return self._closed

    @property
    def discarded(self) -> bool:
        """Whether the connection was dropped (lost, silent, or exposed): never pooled again."""
        return self._discarded


async def open_runner(
    engine: AsyncEngine,
    settings: DatabaseSettings,
    *,
    begin: Callable[[], Sequence[str]] | None,
    autocommit: bool,
    action: str,
) -> Runner:
    """A runner on a pooled connection of ``engine``."""
    pooled, driver = await checkout(engine, action=action)
    return Runner(engine.pool, pooled, driver, settings, begin=begin, autocommit=autocommit)


async def fetch_outside(
    engine: AsyncEngine,
    settings: DatabaseSettings,
    sql: str,
    args: Sequence[Any],
    *,
    begin: str | None,
    action: str,
) -> list[asyncpg.Record]:
    """Run one statement outside any tenant on a pooled connection (see :func:`outside_tenant`)."""
    runner = await open_runner(
        engine,
        settings,
        begin=None if begin is None else (lambda: (begin,)),
        autocommit=True,
        action=action,
    )
    try:
        return await runner.fetch(sql, args, action=action)
    finally:
        await runner.close(quiet=True)


@asynccontextmanager
async def outside_tenant(
    engine: AsyncEngine, settings: DatabaseSettings, *, begin: str | None, action: str
) -> AsyncIterator[Runner]:
    """A runner for work outside any tenant: each statement on its own.

    ``begin`` (behind PgBouncer in transaction mode) opens a transaction around
    each statement, which the runner commits: the driver prepares and executes
    in two exchanges, which must reach the same server connection.
    """
    messages = None if begin is None else (begin,)
    runner = await open_runner(
        engine,
        settings,
        begin=None if messages is None else (lambda: messages),
        autocommit=True,
        action=action,
    )
    try:
        yield runner
    finally:
        await runner.close(quiet=True)


def stale(error: DatabaseUnavailable, runner: Runner) -> bool:
    """Whether ``error`` came from a pooled connection that died since its last use.

    Such a failure happened before anything was done: one attempt on a fresh
    connection is safe. A server that did not answer in time is not retried: it
    would only double the wait.
    """
    return runner.discarded and not isinstance(error.__cause__, TimeoutError)
