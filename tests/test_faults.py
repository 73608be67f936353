"""Faults, injected for real: killed backends, a restarted or stopped server, an exhausted
pool, cancelled tasks, statement timeouts, deadlocks and serialization failures.

Tests that restart or stop PostgreSQL do it to a throwaway cluster of their own
(``local_cluster_control``), never to the suite's server. The others kill or
lock only their own backends. No timing is asserted except generous upper
bounds that prove a call does not hang.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

import slack_fathom_db.database as database_module
import slack_fathom_db.runner as runner_module
from slack_fathom_db import Database, DatabaseSettings, TenantId, UnitOfWork, retries
from slack_fathom_db.connections import connection_lost
from slack_fathom_db.errors import (
    DatabaseUnavailable,
    PoolExhausted,
    SerializationConflict,
    StatementTimeout,
    TransactionAborted,
    translate,
)
from slack_fathom_db.repositories.rate_limits import window
from slack_fathom_db.retries import ATTEMPTS
from slack_fathom_db.testing import (
    CitusCluster,
    LocalCluster,
    engine_of,
    execute_in,
    local_cluster_control,
    runner_of,
    throwaway_database,
)
from tests.conftest import superuser_connection, superuser_dsn
from tests.helpers import (
    checked_out,
    count_live_users,
    fetch_row,
    fetch_value,
    lock_waiters,
    pooled_backend_pid,
    queue_pool,
    unique_team_id,
    unique_user_id,
)

T = TypeVar("T")

HANG = 60.0
"""Upper bound for anything that must not hang (a generous one: machines are noisy)."""


# -- helpers --------------------------------------------------------------------------


async def backend_pid(uow: UnitOfWork) -> int:
    pid = (await execute_in(uow, "SELECT pg_backend_pid()")).scalar_one()
    assert isinstance(pid, int), pid
    return pid


async def create_meeting(db: Database, tenant: TenantId) -> uuid.UUID:
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        meeting = await uow.meetings.create(
            user_id=user.id, fathom_recording_id=f"rec-{secrets.token_hex(6)}", title="Call"
        )
        await uow.commit()
    return meeting.id


async def eventually(check: Callable[[], Awaitable[bool]], *, what: str) -> None:
    """Poll ``check`` until it holds; fail (not hang) after ``HANG`` seconds."""
    deadline = time.monotonic() + HANG
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: {what}")
        await asyncio.sleep(0.01)


async def wait_until_waiting_on_a_lock(observer: asyncpg.Connection, *, besides: int) -> int:
    """The pid of the one backend of this database (other than ``besides``) waiting on a lock."""
    found: list[int] = []

    async def waiting() -> bool:
        found[:] = [pid for pid in await lock_waiters(observer) if pid != besides]
        return len(found) == 1

    await eventually(waiting, what="a unit of work blocked on a lock")
    return found[0]


async def open_transactions(admin: asyncpg.Connection) -> int:
    """Backends of the layer (application_name) on ``admin``'s database inside a transaction."""
    return await fetch_value(
        admin,
        int,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'slack_fathom_db' AND state LIKE 'idle in transaction%'",
    )


@pytest_asyncio.fixture
async def tiny_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """One pooled connection, no overflow: a leaked or stale connection shows at once."""
    database = Database(
        settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 10.0})
    )
    try:
        yield database
    finally:
        await database.dispose()


@pytest_asyncio.fixture
async def observer(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> AsyncIterator[asyncpg.Connection]:
    """A second superuser connection, to watch pg_stat_activity while ``admin`` holds locks."""
    async with superuser_connection(sfdb_server, sfdb_direct_settings) as conn:
        yield conn


@pytest_asyncio.fixture
async def locker(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> AsyncIterator[asyncpg.Connection]:
    """A second superuser connection, to hold a lock while ``admin`` watches and kills."""
    async with superuser_connection(sfdb_server, sfdb_direct_settings) as conn:
        yield conn


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def own_cluster() -> AsyncIterator[tuple[LocalCluster, DatabaseSettings]]:
    """A throwaway cluster of this module (it gets restarted and stopped) and a migrated DB."""
    manager = local_cluster_control()
    cluster = await asyncio.to_thread(manager.__enter__)
    try:
        async with throwaway_database(cluster.url) as settings:
            yield cluster, settings
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


# -- a backend killed in the middle of a unit of work ----------------------------------


@pytest.mark.not_through_pgbouncer(
    reason="kills the server backend of the unit of work; through PgBouncer the client "
    "connection survives and PgBouncer, not the layer, sees the kill"
)
@pytest.mark.parametrize("where", ["between statements", "during a statement", "before commit"])
async def test_backend_killed_mid_unit_of_work(
    tiny_db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    locker: asyncpg.Connection,
    where: str,
) -> None:
    slack_user = unique_user_id()
    pids: list[int] = []
    meeting_id = await create_meeting(tiny_db, tenant_a)

    async def kill(pid: int) -> None:
        assert await admin.fetchval("SELECT pg_terminate_backend($1::integer, 30000)", pid)

    await locker.execute("BEGIN")
    await locker.execute(
        "SELECT 1 FROM meeting_sessions WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_a,
        meeting_id,
    )
    with pytest.raises(DatabaseUnavailable) as caught:  # noqa: PT012
        async with asyncio.timeout(HANG), tiny_db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)
            pids.append(await backend_pid(uow))
            if where == "between statements":
                await kill(pids[0])
                await uow.meetings.recent()
            elif where == "during a statement":

                async def kill_when_blocked(pid: int) -> None:
                    async def blocked() -> bool:
                        return pid in await lock_waiters(admin)

                    await eventually(blocked, what="the statement to wait for the locked meeting")
                    await kill(pid)

                killer = asyncio.create_task(kill_when_blocked(pids[0]))
                try:
                    await uow.meetings.start_processing(meeting_id)  # blocked, then killed
                finally:
                    await killer
            else:
                await kill(pids[0])
                await uow.commit()
    await locker.execute("ROLLBACK")
    assert not isinstance(caught.value, StatementTimeout)
    assert "unreachable" in str(caught.value)

    # Nothing of that transaction is stored, the pool holds nothing, and the next unit of
    # work succeeds on a fresh connection.
    assert await count_live_users(admin, tenant_a, slack_user) == 0
    assert checked_out(tiny_db) == 0
    async with asyncio.timeout(HANG), tiny_db.unit_of_work(tenant_a) as uow:
        fresh_pid = await backend_pid(uow)
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.commit()
    assert fresh_pid != pids[0]
    assert await count_live_users(admin, tenant_a, slack_user) == 1
    assert checked_out(tiny_db) == 0
    assert await open_transactions(admin) == 0


@pytest.mark.not_through_pgbouncer(reason="kills the server backend behind a pooled connection")
async def test_backend_killed_while_pooled_is_replaced_transparently(
    tiny_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with tiny_db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.get() is not None
    pid = await pooled_backend_pid(tiny_db)  # the pool's one connection, back in it
    assert await admin.fetchval("SELECT pg_terminate_backend($1::integer, 30000)", pid)

    # Every entry point finds the dead connection and replaces it, without an error.
    assert await asyncio.wait_for(tiny_db.check_connection(), HANG) is True
    assert await admin.fetchval(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'slack_fathom_db' AND pid <> "
        "pg_backend_pid() AND datname = current_database() LIMIT 1"
    )
    slack_user = unique_user_id()
    async with asyncio.timeout(HANG), tiny_db.unit_of_work(tenant_a) as uow:
        assert await backend_pid(uow) != pid
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.commit()
    assert await count_live_users(admin, tenant_a, slack_user) == 1


# -- a restarted server, a stopped server, a server that never answers ----------------


async def test_restart_while_the_pool_holds_connections_recovers(
    own_cluster: tuple[LocalCluster, DatabaseSettings],
) -> None:
    cluster, own = own_cluster
    db = Database(own.model_copy(update={"pool_size": 3, "max_overflow": 0, "pool_timeout": 10.0}))
    try:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="R")
        held = asyncio.Event()
        ready: list[TenantId] = []

        async def hold() -> None:
            async with db.unit_of_work(tenant) as uow:
                assert await uow.tenants.get() is not None
                ready.append(uow.tenant_id)
                if len(ready) == 3:
                    held.set()
                await held.wait()

        await asyncio.wait_for(asyncio.gather(hold(), hold(), hold()), HANG)
        assert queue_pool(db).checkedin() == 3  # the pool holds three live connections
        before = await _layer_backends(cluster, own)
        assert len(before) == 3

        await asyncio.to_thread(cluster.restart)

        # The next calls recover, on new backends, without a new Database or process.
        async with asyncio.timeout(HANG):
            assert await db.check_connection() is True
            assert await db.directory.resolve(await _team_of(cluster, own, tenant)) == tenant
            decision = await db.rate_limit(tenant, "restart", limit=5)
            assert decision.allowed
            slack_user = unique_user_id()
            async with db.unit_of_work(tenant) as uow:
                after = await backend_pid(uow)
                await uow.tenants.add_user(slack_user_id=slack_user)
                await uow.commit()
            info = await db.info()
        assert after not in before
        assert info.checked_out == 0
        async with db.unit_of_work(tenant) as uow:
            assert await uow.tenants.get_user_by_slack_id(slack_user) is not None
    finally:
        await db.dispose()


async def _layer_backends(cluster: LocalCluster, settings: DatabaseSettings) -> set[int]:
    """The backends the layer holds open on the database of ``settings``."""
    conn = await asyncpg.connect(superuser_dsn(cluster.url, settings))
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'slack_fathom_db'"
        )
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


async def _team_of(cluster: LocalCluster, settings: DatabaseSettings, tenant: TenantId) -> str:
    conn = await asyncpg.connect(superuser_dsn(cluster.url, settings))
    try:
        return await fetch_value(
            conn, str, "SELECT slack_team_id FROM tenants WHERE id = $1", tenant
        )
    finally:
        await conn.close()


async def test_restart_during_a_unit_of_work_fails_it_and_the_next_succeeds(
    own_cluster: tuple[LocalCluster, DatabaseSettings],
) -> None:
    cluster, own = own_cluster
    db = Database(own.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 10.0}))
    try:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="R")
        slack_user = unique_user_id()
        with pytest.raises(DatabaseUnavailable):  # noqa: PT012
            async with asyncio.timeout(HANG), db.unit_of_work(tenant) as uow:
                await uow.tenants.add_user(slack_user_id=slack_user)
                await asyncio.to_thread(cluster.restart)
                await uow.commit()
        assert checked_out(db) == 0
        async with asyncio.timeout(HANG), db.unit_of_work(tenant) as uow:
            assert await uow.tenants.get_user_by_slack_id(slack_user) is None
            await uow.tenants.add_user(slack_user_id=slack_user)
            await uow.commit()
        async with db.unit_of_work(tenant) as uow:
            assert await uow.tenants.get_user_by_slack_id(slack_user) is not None
    finally:
        await db.dispose()


async def test_a_stopped_server_gives_database_unavailable_quickly_then_recovers(
    own_cluster: tuple[LocalCluster, DatabaseSettings],
) -> None:
    cluster, own = own_cluster
    db = Database(own.model_copy(update={"pool_size": 2, "max_overflow": 0, "pool_timeout": 2.0}))
    try:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="S")
        async with db.unit_of_work(tenant):  # the pool holds a connection
            pass
        await asyncio.to_thread(cluster.stop)
        try:
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "unit_of_work": lambda: _enter(db, tenant),
                "resolve": lambda: db.directory.resolve("T0DOWN"),
                "install": lambda: db.directory.install(
                    slack_team_id="T0DOWN", slack_team_name="Down"
                ),
                "rate_limit": lambda: db.rate_limit(tenant, "down", limit=5),
                "info": db.info,
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable) as caught:
                    await asyncio.wait_for(call(), HANG)
                assert time.monotonic() - started < HANG, name
                assert "unreachable" in str(caught.value), name
                assert not isinstance(caught.value, PoolExhausted), name
            assert await asyncio.wait_for(db.check_connection(), HANG) is False
            assert checked_out(db) == 0
        finally:
            await asyncio.to_thread(cluster.start)
        async with asyncio.timeout(HANG):
            assert await db.check_connection() is True
            async with db.unit_of_work(tenant) as uow:
                assert (await uow.tenants.get()) is not None
    finally:
        await db.dispose()


async def _enter(db: Database, tenant: TenantId) -> None:
    async with db.unit_of_work(tenant):
        pass


async def test_a_server_that_never_answers_times_out_with_database_unavailable(
    settings: DatabaseSettings,
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept the connection, never say a word

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = settings.sqlalchemy_url().set(host="127.0.0.1", port=port)
    black_hole = DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        tenant_key=settings.tenant_key,
        connect_timeout=1.0,
        _env_file=None,
    )
    db = Database(black_hole)
    try:
        for call in (lambda: _enter(db, TenantId(uuid.uuid4())), db.info):
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as caught:
                await asyncio.wait_for(call(), HANG)
            assert time.monotonic() - started < HANG  # DATABASE_CONNECT_TIMEOUT, not a hang
            assert "did not answer in time" in str(caught.value)
        assert await asyncio.wait_for(db.check_connection(), HANG) is False
        assert accepted  # it really connected, and then waited for the timeout
        assert checked_out(db) == 0
    finally:
        await db.dispose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# -- pool exhaustion --------------------------------------------------------------------


@dataclass
class Holders:
    """Units of work held open until ``release`` is set."""

    release: asyncio.Event
    tasks: list[asyncio.Task[None]]


async def hold_open(db: Database, tenant: TenantId, n: int) -> Holders:
    release = asyncio.Event()
    inside = asyncio.Semaphore(0)

    async def hold() -> None:
        async with db.unit_of_work(tenant) as uow:
            await uow.tenants.get()
            inside.release()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(n)]
    for _ in range(n):
        await asyncio.wait_for(inside.acquire(), HANG)
    return Holders(release, tasks)


async def test_pool_exhaustion_fails_typed_after_the_pool_timeout_and_leaks_nothing(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    db = Database(
        settings.model_copy(update={"pool_size": 2, "max_overflow": 1, "pool_timeout": 1.0})
    )
    try:
        holders = await hold_open(db, tenant_a, 3)  # pool size + overflow
        info = await _info_outside_pool(db)
        assert (info["checked_out"], info["overflow"]) == (3, 1)

        excess: dict[str, Callable[[], Awaitable[Any]]] = {
            "unit_of_work": lambda: _enter(db, tenant_a),
            "rate_limit": lambda: db.rate_limit(tenant_a, "exhausted", limit=5),
            "resolve": lambda: db.directory.resolve("T0EXHAUST"),
            "log_security_event": lambda: db.log_security_event(
                tenant_a,
                event_type="security.denied",
                event_category="security",
                action_description="no room",
            ),
        }
        for name, call in excess.items():
            started = time.monotonic()
            with pytest.raises(PoolExhausted) as caught:
                await asyncio.wait_for(call(), HANG)
            assert time.monotonic() - started < HANG, name
            assert isinstance(caught.value, DatabaseUnavailable)
            assert "pool is exhausted" in str(caught.value), name
            assert "DATABASE_POOL_TIMEOUT" in str(caught.value), name
        assert await asyncio.wait_for(db.check_connection(), HANG) is False
        assert (
            await admin.fetchval(
                "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND event_type = $2",
                tenant_a,
                "security.denied",
            )
            == 0
        )

        holders.release.set()
        await asyncio.wait_for(asyncio.gather(*holders.tasks), HANG)
        # Back to idle: nothing checked out, no overflow, no open transaction on the server.
        info = await _info_outside_pool(db)
        assert (info["checked_out"], info["overflow"]) == (0, 0)
        assert checked_out(db) == 0
        assert await open_transactions(admin) == 0
        async with db.unit_of_work(tenant_a) as uow:  # and it serves again
            assert await uow.tenants.get() is not None
    finally:
        await db.dispose()


async def _info_outside_pool(db: Database) -> dict[str, int]:
    pool = queue_pool(db)
    return {"checked_out": pool.checkedout(), "overflow": max(0, pool.overflow())}


async def test_a_waiter_gets_the_connection_freed_before_the_pool_timeout(
    settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    db = Database(
        settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 30.0})
    )
    try:
        holders = await hold_open(db, tenant_a, 1)
        waiter = asyncio.create_task(_enter(db, tenant_a))
        await asyncio.sleep(0.2)
        assert not waiter.done()  # it waits for the pool ...
        holders.release.set()
        await asyncio.wait_for(waiter, HANG)  # ... and gets the connection once it is free
        await asyncio.wait_for(asyncio.gather(*holders.tasks), HANG)
        assert checked_out(db) == 0
    finally:
        await db.dispose()


# -- cancelled and timed-out tasks --------------------------------------------------------


async def test_cancelled_while_waiting_for_the_pool_leaks_nothing(
    tiny_db: Database, tenant_a: TenantId
) -> None:
    holders = await hold_open(tiny_db, tenant_a, 1)
    waiters = [asyncio.create_task(_enter(tiny_db, tenant_a)) for _ in range(5)]
    await asyncio.sleep(0.2)
    for waiter in waiters:
        waiter.cancel()
    for waiter in waiters:
        with pytest.raises(asyncio.CancelledError):
            await waiter
    holders.release.set()
    await asyncio.wait_for(asyncio.gather(*holders.tasks), HANG)
    assert checked_out(tiny_db) == 0
    # The pool's only connection is free: a leak would make this wait out the pool timeout.
    async with asyncio.timeout(HANG), tiny_db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.get() is not None


async def test_timeout_while_blocked_on_a_lock_rolls_back_and_returns_the_connection(
    tiny_db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    observer: asyncpg.Connection,
) -> None:
    await tiny_db.rate_limit(tenant_a, "locked", limit=100)  # the counter row exists
    slack_user = unique_user_id()
    await admin.execute("BEGIN")
    await admin.execute(
        "SELECT 1 FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = 'locked' "
        "FOR UPDATE",
        tenant_a,
    )
    try:

        async def handler() -> None:
            async with tiny_db.unit_of_work(tenant_a) as uow:
                await uow.tenants.add_user(slack_user_id=slack_user)
                await uow.rate_limits.consume("locked", limit=100)
                await uow.commit()  # the charge waits for admin's row lock

        task = asyncio.create_task(handler())
        await wait_until_waiting_on_a_lock(
            observer, besides=await admin.fetchval("SELECT pg_backend_pid()")
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await task  # cancelling the wait cancels the handler's task too
    finally:
        await admin.execute("ROLLBACK")
    assert checked_out(tiny_db) == 0
    assert await count_live_users(admin, tenant_a, slack_user) == 0
    assert await open_transactions(admin) == 0
    async with asyncio.timeout(HANG), tiny_db.unit_of_work(tenant_a) as uow:
        decision = await uow.rate_limits.consume("locked", limit=100)
        await uow.commit()
    assert decision.current == 2  # the abandoned charge was never applied


async def test_many_units_of_work_cancelled_at_random_points_leak_nothing(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    db = Database(
        settings.model_copy(update={"pool_size": 3, "max_overflow": 2, "pool_timeout": 30.0})
    )
    try:

        async def handler(n: int) -> None:
            async with db.unit_of_work(tenant_a) as uow:
                user = await uow.tenants.add_user(slack_user_id=f"UCANCEL{n:04d}")
                await uow.audit.log_event(
                    event_type="cancel.test",
                    event_category="system",
                    action_description=f"attempt {n}",
                    user_id=user.id,
                )
                await uow.rate_limits.consume("cancelled", limit=10_000)
                await uow.commit()

        async def bounded(n: int) -> str:
            try:
                async with asyncio.timeout(0.001 * (n % 25)):
                    await handler(n)
            except TimeoutError:
                return "timed out"
            return "committed"

        outcomes = await asyncio.wait_for(asyncio.gather(*(bounded(n) for n in range(60))), HANG)
        assert "timed out" in outcomes
        assert checked_out(db) == 0
        assert await open_transactions(admin) == 0
        # Every committed handler is whole; no abandoned one left a part behind.
        users = await admin.fetchval(
            "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id LIKE 'UCANCEL%'",
            tenant_a,
        )
        events = await admin.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND event_type = 'cancel.test'",
            tenant_a,
        )
        spent = await admin.fetchval(
            "SELECT coalesce(sum(request_count), 0) FROM api_rate_limits "
            "WHERE tenant_id = $1 AND resource_type = 'cancelled'",
            tenant_a,
        )
        assert users == events == spent
        assert users >= outcomes.count("committed")
        async with asyncio.timeout(HANG), db.unit_of_work(tenant_a) as uow:
            assert await uow.tenants.get() is not None
    finally:
        await db.dispose()


# -- statement timeouts ---------------------------------------------------------------


@pytest_asyncio.fixture
async def timeout_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    database = Database(
        settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "statement_timeout_ms": 300})
    )
    try:
        yield database
    finally:
        await database.dispose()


async def test_statement_timeout_is_set_per_transaction_not_per_connection(
    timeout_db: Database, tenant_a: TenantId
) -> None:
    async with timeout_db.unit_of_work(tenant_a) as uow:
        inside = (await execute_in(uow, "SHOW statement_timeout")).scalar_one()
        await uow.commit()
        # the next transaction, scoped again
        again = (await execute_in(uow, "SHOW statement_timeout")).scalar_one()
    assert inside == again == "300ms"
    # Between transactions: a direct connection opened with the layer's timeout (it wins
    # over the login's own default); behind PgBouncer, which would drop or leak a startup
    # parameter, nothing is sent when connecting and the server session keeps its own.
    engine = engine_of(timeout_db)
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        if timeout_db.settings.pgbouncer:
            await driver.execute("BEGIN")  # simple protocol, as the layer does
        outside = await driver.fetchval("SHOW statement_timeout")
        if timeout_db.settings.pgbouncer:
            await driver.execute("COMMIT")
    assert (outside == "300ms") is not timeout_db.settings.pgbouncer


async def test_slow_statement_raises_statement_timeout_and_the_connection_stays_usable(
    timeout_db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    observer: asyncpg.Connection,
) -> None:
    async with timeout_db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        meeting = await uow.meetings.create(
            user_id=user.id, fathom_recording_id=f"rec-{secrets.token_hex(4)}", title="Slow"
        )
        await uow.commit()
    slack_user = unique_user_id()
    await admin.execute("BEGIN")
    await admin.execute(
        "SELECT 1 FROM meeting_sessions WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_a,
        meeting.id,
    )
    # The pool's one connection, which the next unit of work gets.
    pid = None if timeout_db.settings.pgbouncer else await pooled_backend_pid(timeout_db)
    try:
        async with asyncio.timeout(HANG), timeout_db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)
            with pytest.raises(StatementTimeout) as caught:
                await uow.meetings.start_processing(meeting.id)  # waits for admin's lock
            assert isinstance(caught.value, DatabaseUnavailable)
            assert "statement timeout" in str(caught.value)
            with pytest.raises(TransactionAborted):
                await uow.commit()
    finally:
        await admin.execute("ROLLBACK")
    assert await count_live_users(admin, tenant_a, slack_user) == 0
    # The same connection went back to the pool and serves the next unit of work.
    if pid is not None:
        assert await pooled_backend_pid(timeout_db) == pid
    async with asyncio.timeout(HANG), timeout_db.unit_of_work(tenant_a) as uow:
        started = await uow.meetings.start_processing(meeting.id)
        await uow.commit()
    assert started.status == "processing"


# -- retries: real deadlocks and serialization failures --------------------------------


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Attempts per retried operation, by kind: ``transaction`` (db.rate_limit) and
    ``savepoint`` (Runner.retrying). A spy around the real ``retry_conflicts``."""
    seen: dict[str, list[int]] = defaultdict(list)

    def spy(kind: str, real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def retry_conflicts(operation: Callable[[], Awaitable[T]]) -> T:
            seen[kind].append(0)
            slot = len(seen[kind]) - 1

            async def counted() -> T:
                seen[kind][slot] += 1
                return await operation()

            result: T = await real(counted)
            return result

        return retry_conflicts

    monkeypatch.setattr(
        database_module, "retry_conflicts", spy("transaction", retries.retry_conflicts)
    )
    monkeypatch.setattr(runner_module, "retry_conflicts", spy("savepoint", retries.retry_conflicts))
    return seen


@dataclass(frozen=True)
class Cycle:
    """Where the test's own side of a deadlock runs, and the tables it locks and writes.

    On one server: the database. On Citus: the worker that holds the tenant's
    shards, on the shards themselves. The foreign-key check of a new counter
    row runs there and reads the worker's copy of the tenant row, which the
    coordinator's ``SELECT … FOR UPDATE`` on the reference table leaves unlocked.
    """

    conn: asyncpg.Connection
    tenants: str
    counters: str


@pytest_asyncio.fixture
async def cycle(
    admin: asyncpg.Connection,
    sfdb_citus: CitusCluster | None,
    sfdb_direct_settings: DatabaseSettings,
    tenant_a: TenantId,
) -> AsyncIterator[Cycle]:
    """The connection and tables of this test's side of a deadlock with ``tenant_a``."""
    if sfdb_citus is None:
        yield Cycle(conn=admin, tenants="tenants", counters="api_rate_limits")
        return
    shards = await fetch_row(
        admin,
        "SELECT shard_name('tenants'::regclass, get_shard_id_for_distribution_column('tenants'))"
        " AS tenants, shard_name('api_rate_limits'::regclass, "
        "get_shard_id_for_distribution_column('api_rate_limits', $1::uuid)) AS counters",
        tenant_a,
    )
    worker = sfdb_citus.worker.url.set(database=sfdb_direct_settings.sqlalchemy_url().database)
    conn = await asyncpg.connect(worker.set(drivername="postgresql").render_as_string(False))
    try:
        yield Cycle(conn=conn, tenants=shards["tenants"], counters=shards["counters"])
    finally:
        await conn.close()


async def deadlock_partner(cycle: Cycle, tenant: TenantId) -> int:
    """Open a transaction on ``cycle`` that locks the tenant row; its pid.

    A new rate-limit row's foreign-key check then waits for it. The partner
    never detects the deadlock itself (a long deadlock_timeout), so the layer's
    transaction is always the one PostgreSQL aborts.
    """
    await cycle.conn.execute("SET deadlock_timeout = '60s'")
    await cycle.conn.execute("BEGIN")
    await cycle.conn.execute(f"SELECT 1 FROM {cycle.tenants} WHERE id = $1 FOR UPDATE", tenant)
    return await fetch_value(cycle.conn, int, "SELECT pg_backend_pid()")


async def close_the_cycle(cycle: Cycle, tenant: TenantId, resource: str, count: int) -> None:
    """Insert the counter row the layer is inserting: waits for it, which makes a deadlock."""
    start, _ = window("daily", datetime.now(UTC))
    await cycle.conn.execute(
        f"INSERT INTO {cycle.counters} (tenant_id, resource_type, period, window_start, "
        "request_count) VALUES ($1, $2, 'daily', $3, $4)",
        tenant,
        resource,
        start,
        count,
    )
    await cycle.conn.execute("COMMIT")


async def test_deadlock_in_db_rate_limit_is_retried_transparently(
    db: Database,
    tenant_a: TenantId,
    observer: asyncpg.Connection,
    attempts: dict[str, list[int]],
    cycle: Cycle,
) -> None:
    resource = f"dl-{secrets.token_hex(4)}"
    partner = await deadlock_partner(cycle, tenant_a)
    try:
        call = asyncio.create_task(db.rate_limit(tenant_a, resource, limit=10))
        await wait_until_waiting_on_a_lock(observer, besides=partner)
        # The layer holds its new row and waits for the tenant row; the partner now waits
        # for the layer's row: PostgreSQL aborts the layer's transaction (40P01), the
        # partner's insert goes through, and the retry adds to the partner's row.
        await asyncio.wait_for(close_the_cycle(cycle, tenant_a, resource, 5), HANG)
        decision = await asyncio.wait_for(call, HANG)
    finally:
        if cycle.conn.is_in_transaction():
            await cycle.conn.execute("ROLLBACK")
    assert decision.allowed
    assert decision.current == 6
    assert attempts["transaction"] == [2]
    stored = await observer.fetchval(
        "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
        tenant_a,
        resource,
    )
    assert stored == 6


async def test_deadlock_in_a_charge_at_commit_is_retried_in_its_savepoint(
    db: Database,
    tenant_a: TenantId,
    observer: asyncpg.Connection,
    attempts: dict[str, list[int]],
    cycle: Cycle,
) -> None:
    tag = secrets.token_hex(4)
    first, second = f"a-{tag}", f"b-{tag}"  # charges are applied in key order
    await db.rate_limit(tenant_a, first, limit=10)
    commit_now = asyncio.Event()

    async def handler() -> None:
        async with db.unit_of_work(tenant_a) as uow:
            assert (await uow.rate_limits.consume(first, limit=10)).allowed
            assert (await uow.rate_limits.consume(second, limit=10)).allowed
            await commit_now.wait()
            await uow.commit()

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    partner = await deadlock_partner(cycle, tenant_a)
    try:
        commit_now.set()
        await wait_until_waiting_on_a_lock(observer, besides=partner)
        await asyncio.wait_for(close_the_cycle(cycle, tenant_a, second, 5), HANG)
        await asyncio.wait_for(task, HANG)
    finally:
        if cycle.conn.is_in_transaction():
            await cycle.conn.execute("ROLLBACK")
    # The first charge ran once; the second deadlocked once and its retry succeeded,
    # without redoing (or losing) the first.
    assert attempts["savepoint"] == [1, 2]
    assert attempts["transaction"] == [1]  # the setup call above
    counts = {
        resource: count
        for resource, count in await observer.fetch(
            "SELECT resource_type, request_count FROM api_rate_limits WHERE tenant_id = $1 "
            "AND resource_type = ANY($2::text[])",
            tenant_a,
            [first, second],
        )
    }
    assert counts == {first: 2, second: 6}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def repeatable_read(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """A database of its own whose transactions default to REPEATABLE READ.

    Under REPEATABLE READ a concurrent update fails a statement with a real
    serialization failure (40001), deterministically; under READ COMMITTED it
    never does. The database's default does not reach the layer: its
    connections open READ COMMITTED, and a unit of work begins READ COMMITTED
    explicitly. So a test raises the isolation itself, on a connection of the
    layer's pool (``SET default_transaction_isolation``) or in a transaction of
    a unit of work (``SET TRANSACTION``), and first shows that the default
    alone changed nothing.
    """
    async with throwaway_database(sfdb_server) as own:
        conn = await asyncpg.connect(superuser_dsn(sfdb_server, own))
        try:
            await conn.execute(
                f'ALTER DATABASE "{own.sqlalchemy_url().database}" '
                "SET default_transaction_isolation = 'repeatable read'"
            )
        finally:
            await conn.close()
        yield own


async def test_serialization_failure_in_db_rate_limit_is_retried_transparently(
    repeatable_read: DatabaseSettings, sfdb_server: URL, attempts: dict[str, list[int]]
) -> None:
    one_connection = repeatable_read.model_copy(update={"pool_size": 1, "max_overflow": 0})
    async with Database(one_connection) as db:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="RR")
        await db.rate_limit(tenant, "serial", limit=10)
        # The pool's one connection, which db.rate_limit uses: READ COMMITTED whatever the
        # database's default, until its session is made REPEATABLE READ.
        async with engine_of(db).connect() as conn:
            shown = await conn.exec_driver_sql("SHOW default_transaction_isolation")
            assert shown.scalar_one() == "read committed"
            await conn.exec_driver_sql("SET default_transaction_isolation = 'repeatable read'")
        admin = await asyncpg.connect(superuser_dsn(sfdb_server, repeatable_read))
        observer = await asyncpg.connect(superuser_dsn(sfdb_server, repeatable_read))
        try:
            await admin.execute("BEGIN")
            await admin.execute(
                "UPDATE api_rate_limits SET request_count = request_count + 1 "
                "WHERE tenant_id = $1 AND resource_type = 'serial'",
                tenant,
            )
            call = asyncio.create_task(db.rate_limit(tenant, "serial", limit=10))
            await wait_until_waiting_on_a_lock(
                observer, besides=await admin.fetchval("SELECT pg_backend_pid()")
            )
            await admin.execute("COMMIT")  # the waiting charge now fails with 40001 ...
            decision = await asyncio.wait_for(call, HANG)  # ... and its rerun succeeds
            assert decision.allowed
            assert decision.current == 3
            assert attempts["transaction"][-1] == 2
            stored = await admin.fetchval(
                "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1", tenant
            )
            assert stored == 3
        finally:
            await admin.close()
            await observer.close()


async def test_serialization_failures_on_the_claim_path_are_retried_a_bounded_number_of_times(
    repeatable_read: DatabaseSettings, sfdb_server: URL, attempts: dict[str, list[int]]
) -> None:
    async with Database(repeatable_read) as db:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="RR")
        async with db.unit_of_work(tenant) as uow:
            user = await uow.tenants.add_user(slack_user_id=unique_user_id())
            meeting = await uow.meetings.create(
                user_id=user.id, fathom_recording_id="rec-serial", title="Before"
            )
            await uow.commit()
        admin = await asyncpg.connect(superuser_dsn(sfdb_server, repeatable_read))
        try:
            with pytest.raises(SerializationConflict) as caught:  # noqa: PT012
                async with asyncio.timeout(HANG), db.unit_of_work(tenant) as uow:
                    # A transaction of the unit of work, REPEATABLE READ before its first
                    # query; its snapshot is taken, then a concurrent update commits after it.
                    await uow.commit()
                    assert (
                        await execute_in(uow, "SELECT current_setting('transaction_isolation')")
                    ).scalar_one() == "read committed"  # the database's default did not apply
                    await uow.commit()
                    await execute_in(uow, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    assert (
                        await execute_in(uow, "SELECT current_setting('transaction_isolation')")
                    ).scalar_one() == "repeatable read"
                    await admin.execute(
                        "UPDATE meeting_sessions SET title = 'After' WHERE id = $1", meeting.id
                    )
                    await uow.meetings.claim_pending(limit=10)
            # A claim is two retried statements. Giving up exhausted meetings finds none and
            # succeeds at once; every attempt of the claim in the same snapshot fails the same
            # way: it gave up after ATTEMPTS.
            assert attempts["savepoint"] == [1, ATTEMPTS]
            assert "40001" in str(caught.value)
            row = await fetch_row(
                admin,
                "SELECT status, processing_attempts, title FROM meeting_sessions WHERE id = $1",
                meeting.id,
            )
            assert dict(row) == {"status": "pending", "processing_attempts": 0, "title": "After"}
            # A new unit of work (a new snapshot) claims it.
            async with db.unit_of_work(tenant) as uow:
                claimed = await uow.meetings.claim_pending(limit=10)
                await uow.commit()
            assert [m.id for m in claimed] == [meeting.id]
            assert attempts["savepoint"][-1] == 1
        finally:
            await admin.close()


async def test_a_statement_timeout_in_db_rate_limit_is_not_retried(
    timeout_db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    attempts: dict[str, list[int]],
) -> None:
    await timeout_db.rate_limit(tenant_a, "held", limit=10)
    await admin.execute("BEGIN")
    await admin.execute(
        "SELECT 1 FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = 'held' FOR UPDATE",
        tenant_a,
    )
    try:
        with pytest.raises(StatementTimeout):
            await asyncio.wait_for(timeout_db.rate_limit(tenant_a, "held", limit=10), HANG)
    finally:
        await admin.execute("ROLLBACK")
    assert attempts["transaction"] == [1, 1]


async def test_a_statement_timeout_on_the_claim_path_is_not_retried(
    timeout_db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    attempts: dict[str, list[int]],
) -> None:
    await admin.execute("BEGIN")
    await admin.execute("LOCK TABLE meeting_sessions IN EXCLUSIVE MODE")
    try:
        with pytest.raises(StatementTimeout):
            async with asyncio.timeout(HANG), timeout_db.unit_of_work(tenant_a) as uow:
                await uow.meetings.claim_pending(limit=5)
    finally:
        await admin.execute("ROLLBACK")
    assert attempts["savepoint"] == [1]


async def test_a_non_conflict_error_inside_retrying_is_raised_at_once(
    db: Database, tenant_a: TenantId, attempts: dict[str, list[int]]
) -> None:
    calls = 0
    slack_user = unique_user_id()

    async def duplicate_meeting_of_another_user(uow: UnitOfWork) -> None:
        nonlocal calls
        calls += 1
        await uow.tenants.connect_crm(
            provider_type="hubspot", credentials_secret_id="not a reference"
        )

    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user)
        with pytest.raises(ValueError, match="credentials_secret_id"):
            await runner_of(uow).retrying(
                lambda: duplicate_meeting_of_another_user(uow), action="test"
            )
    assert calls == 1
    assert attempts["savepoint"] == [1]


async def test_retry_gives_up_after_attempts_and_raises_the_conflict() -> None:
    from slack_fathom_db.retries import retry_conflicts  # noqa: PLC0415

    calls = 0

    async def always_conflicts() -> None:
        nonlocal calls
        calls += 1
        raise SerializationConflict("lost a race [40P01]")

    with suppress(SerializationConflict):
        await retry_conflicts(always_conflicts)
    assert calls == ATTEMPTS


def test_a_broken_driver_protocol_state_is_a_lost_connection() -> None:
    # asyncpg raises this when the server ended the session while the connection sat idle
    # in a transaction and the next statement found the protocol mid-way (seen on Citus).
    error = translate(
        asyncpg.InternalClientError("cannot switch to state 11; another operation is in progress"),
        action="get meeting",
    )
    assert isinstance(error, DatabaseUnavailable)
    assert connection_lost(error, None)
