"""Pooled connections and the wire protocol of a tenant transaction.

The engine's connections run in driver-level autocommit, so a statement
outside a transaction (a directory lookup) costs one round trip, and a
tenant transaction is opened by one simple-protocol message that holds
``BEGIN`` and the ``SET LOCAL`` statements together (three messages on
Citus; see :func:`slack_fathom_db.tenancy.transaction_preamble`). Every
statement, ``COMMIT`` and ``ROLLBACK`` included, is sent on the asyncpg
connection by a :class:`slack_fathom_db.runner.Runner`.

Invariant: a connection never returns to the pool inside a transaction. A
pool ``reset`` listener rolls back whatever a cancelled or failed caller left
open, and a connection whose state is unknown (lost, or silent past the
client timeout) is discarded: its socket is aborted at once, because a
graceful close would wait on a server that may never answer, and the pool
opens a fresh one next time.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import greenlet_spawn

from slack_fathom_db.errors import (
    DatabaseUnavailable,
    SlackFathomDBError,
    StatementTimeout,
    translate,
)

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, PoolResetState

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
"""Every transaction's search path: pg_temp last, so no temp object shadows anything."""
BEGIN: Final = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
COMMIT: Final = "COMMIT"
ROLLBACK: Final = "ROLLBACK"
_SESSION_RESET: Final = "RESET ALL; RESET ROLE; UNLISTEN *; SELECT pg_advisory_unlock_all()"
COMMIT_AND_RESET: Final = f"{_SESSION_RESET}; COMMIT"
"""Ends a transaction that ran SQL the layer did not write: the session goes back to what it
was when it opened (settings, role, listeners, advisory locks) in the same message, before
the commit, so behind PgBouncer the server session returns clean; the reply's tag is still
the commit's. (The layer's own statements set nothing beyond their transaction.)"""
ROLLBACK_AND_RESET: Final = f"ROLLBACK; {_SESSION_RESET}"
"""The same for a rollback."""


DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # The driver's protocol state broke (seen when the server ends the session while the
    # connection is idle in a transaction): the connection is unusable, like a lost one.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


async def checkout(
    engine: AsyncEngine, *, action: str
) -> tuple[PoolProxiedConnection, asyncpg.Connection]:
    """A pooled connection and its driver connection, errors of getting one translated.

    Straight from the pool (no SQLAlchemy ``Connection`` around it): the runner
    is the only code that uses it. Give it back with :func:`checkin`.
    """
    pool = engine.pool
    if isinstance(pool, QueuePool) and pool.checkedin() == 0 and _at_capacity(pool):
        _waits[pool] = _waits.get(pool, 0) + 1
    try:
        pooled = await engine.raw_connection()
    except Exception as exc:  # the pool's, the driver's or its SQLAlchemy adapter's errors
        raise translate(exc, action=action) from exc
    driver: asyncpg.Connection | None = pooled.driver_connection
    if driver is None:  # a pooled connection always has its driver
        await greenlet_spawn(pooled.close)
        raise DatabaseUnavailable(f"{action}: the pooled connection has no driver connection")
    return pooled, driver


_waits: weakref.WeakKeyDictionary[Pool, int] = weakref.WeakKeyDictionary()


def _at_capacity(pool: QueuePool) -> bool:
    """Whether no connection may be opened: a checkout must wait for one to come back."""
    return pool.checkedout() >= pool.size() + max(0, pool._max_overflow)


def waits(pool: Pool) -> int:
    """How many checkouts from ``pool`` found every connection busy and had to wait."""
    return _waits.get(pool, 0)


async def checkin(pooled: PoolProxiedConnection, driver: asyncpg.Connection, pool: Pool) -> None:
    """Return a connection to the pool (a transaction left open is rolled back there).

    A healthy, idle connection that fits back into the queue is returned at once:
    that does no I/O (the pool's rollback-on-return is a no-op outside a transaction),
    so it needs none of SQLAlchemy's greenlet machinery. Anything else (a transaction
    still open, an overflow connection to close, an invalidated one) goes the long way.
    """
    idle = pooled.is_valid and not driver.is_closed() and not driver.is_in_transaction()
    if idle and isinstance(pool, QueuePool) and pool.checkedin() < pool.size():
        pooled.close()
    else:
        await greenlet_spawn(pooled.close)


def connection_lost(error: SlackFathomDBError, driver: asyncpg.Connection | None) -> bool:
    """Whether a failed statement left its connection unusable (or in an unknown state).

    A statement the server cancelled (:class:`StatementTimeout`) leaves the
    connection usable; a lost link or a server silent past the client
    timeout does not.
    """
    if driver is not None and driver.is_closed():  # None: judge by the error alone
        return True
    return isinstance(error, DatabaseUnavailable) and not isinstance(error, StatementTimeout)


def discard(
    pooled: PoolProxiedConnection, driver: asyncpg.Connection, cause: BaseException
) -> None:
    """Drop a pooled connection: abort its socket now, then invalidate it.

    No I/O waits on the server: after a client timeout the server (or a
    proxy) may never answer a graceful close.
    """
    if not pooled.is_valid:
        return
    driver.terminate()
    pooled.invalidate(cause)


def install_pool_guards(engine: AsyncEngine, *, pgbouncer: bool) -> None:
    """Keep broken and mid-transaction connections out of the pool.

    * On checkout, a connection whose socket is already closed (a killed
      backend, a restarted server) is replaced before anyone uses it; no I/O.
    * On return, a transaction left open (a cancelled or failed caller) is
      rolled back; if that fails the pool invalidates the connection.
    * Behind PgBouncer in transaction mode, what SQLAlchemy and the driver send
      when a connection opens (type codecs, the dialect's first checks: each a
      prepare, then an execute) runs in one transaction, so both halves reach
      the same server connection even while other clients are busy.
    """

    def _checkout(
        dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry, _proxy: object
    ) -> None:
        adapted: Any = dbapi_connection
        if adapted.driver_connection.is_closed():
            raise DisconnectionError("the server closed this pooled connection")

    def _reset(
        dbapi_connection: DBAPIConnection,
        _record: ConnectionPoolEntry,
        reset_state: PoolResetState,
    ) -> None:
        if reset_state.terminate_only or not reset_state.asyncio_safe:
            return
        adapted: Any = dbapi_connection
        driver: asyncpg.Connection = adapted.driver_connection
        if not driver.is_closed() and driver.is_in_transaction():
            # Raising here makes the pool invalidate the connection instead of reusing it.
            adapted.run_async(lambda connection: connection.execute(ROLLBACK))

    event.listen(engine.sync_engine, "checkout", _checkout)
    event.listen(engine.sync_engine, "reset", _reset)
    if pgbouncer:
        event.listen(engine.sync_engine, "connect", _pin_setup, insert=True)  # before the rest
        event.listen(engine.sync_engine, "connect", _unpin_setup)  # after the dialect's


def _pin_setup(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    adapted: Any = dbapi_connection
    adapted.run_async(lambda connection: connection.execute(BEGIN))


def _unpin_setup(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    adapted: Any = dbapi_connection
    if adapted.driver_connection.is_in_transaction():
        adapted.run_async(lambda connection: connection.execute(COMMIT))
