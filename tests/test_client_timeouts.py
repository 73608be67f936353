"""A proxy or network that stops answering fails the caller in bounded time; it never hangs.

A real PgBouncer of this test's own stands in front of the suite's server and
is frozen (``SIGSTOP``): its sockets stay open, nothing is answered, exactly as
a hung proxy or a dropped network path looks to a client. Every call must fail
with :class:`DatabaseUnavailable` within the client bound (the statement timeout
plus a margin, or the connect timeout), leave nothing half-written, and the
layer must work again once PgBouncer goes on (``SIGCONT``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import event
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.errors import DatabaseUnavailable
from slack_fathom_db.testing import PgBouncer, engine_of, pgbouncer
from tests.helpers import fetch_value, unique_team_id, unique_user_id

T = TypeVar("T")

STATEMENT_TIMEOUT_MS = 1_000
CONNECT_TIMEOUT = 2.0
SLACK = 3.0
"""Seconds allowed beyond a bound for scheduling on a busy machine (not a speed target)."""
HANG = 60.0


@pytest.fixture
def bouncer(sfdb_server: URL, sfdb_direct_settings: DatabaseSettings) -> Iterator[PgBouncer]:
    runtime = sfdb_direct_settings.sqlalchemy_url()
    with pgbouncer(sfdb_server, pool_size=4, logins=[runtime]) as running:
        try:
            yield running
        finally:
            running.thaw()  # a test that failed while frozen must not leave it stopped


@pytest_asyncio.fixture
async def bounced(
    bouncer: PgBouncer, sfdb_direct_settings: DatabaseSettings
) -> AsyncIterator[Database]:
    # The suite's runtime login, through this test's PgBouncer.
    direct = sfdb_direct_settings.sqlalchemy_url()
    url = bouncer.url.set(
        database=direct.database, username=direct.username, password=direct.password
    )
    settings = DatabaseSettings(
        url=url.render_as_string(False),
        tenant_key=sfdb_direct_settings.tenant_key,
        pgbouncer=True,
        pool_size=4,
        max_overflow=0,
        statement_timeout_ms=STATEMENT_TIMEOUT_MS,
        connect_timeout=CONNECT_TIMEOUT,
        _env_file=None,
    )
    db = Database(settings)
    try:
        yield db
    finally:
        await asyncio.wait_for(db.dispose(), HANG)


async def timed(call: Awaitable[T]) -> tuple[BaseException | None, float]:
    """The exception ``call`` raised (or None) and the seconds it took; never hangs."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(call, HANG)
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def statement_bound(db: Database) -> float:
    bound = db.settings.client_timeout
    assert bound is not None
    return bound


async def users_named(admin: asyncpg.Connection, tenant: TenantId, slack_user: str) -> int:
    return await fetch_value(
        admin,
        int,
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant,
        slack_user,
    )


async def test_the_client_bound_is_a_little_above_the_statement_timeout(
    bounced: Database,
) -> None:
    bound = statement_bound(bounced)
    assert STATEMENT_TIMEOUT_MS / 1000 < bound <= STATEMENT_TIMEOUT_MS / 1000 + 5


async def test_a_statement_to_a_frozen_proxy_fails_within_the_bound_and_writes_nothing(
    bounced: Database, bouncer: PgBouncer, admin: asyncpg.Connection
) -> None:
    tenant = await bounced.directory.install(slack_team_id=unique_team_id(), slack_team_name="F")
    lost_user = unique_user_id()

    async def unit_of_work_frozen_halfway() -> None:
        async with bounced.unit_of_work(tenant) as uow:
            user = await uow.tenants.add_user(slack_user_id=lost_user)
            bouncer.freeze()
            await uow.meetings.create(user_id=user.id, fathom_recording_id="rec-f", title="Call")
            await uow.commit()

    error, took = await timed(unit_of_work_frozen_halfway())
    assert isinstance(error, DatabaseUnavailable), error
    assert "did not answer" in str(error)
    assert took < statement_bound(bounced) + SLACK

    bouncer.thaw()
    # Nothing of the failed unit of work was kept; the next one works.
    saved_user = unique_user_id()
    async with bounced.unit_of_work(tenant) as uow:
        await uow.tenants.add_user(slack_user_id=saved_user)
        await uow.commit()
    assert await users_named(admin, tenant, lost_user) == 0
    assert await users_named(admin, tenant, saved_user) == 1
    assert (
        await admin.fetchval("SELECT count(*) FROM meeting_sessions WHERE tenant_id = $1", tenant)
        == 0
    )


async def test_every_entry_point_fails_within_the_bound_while_the_proxy_is_frozen(
    bounced: Database, bouncer: PgBouncer, admin: asyncpg.Connection
) -> None:
    team = unique_team_id()
    tenant = await bounced.directory.install(slack_team_id=team, slack_team_name="F")
    # Two pooled connections that answered a moment ago, and room for new ones.
    async with bounced.unit_of_work(tenant) as one, bounced.unit_of_work(tenant) as two:
        await one.tenants.get()
        await two.tenants.get()
    bound = statement_bound(bounced)
    calls: dict[str, Any] = {
        "resolve": lambda: bounced.directory.resolve(team),
        "rate_limit": lambda: bounced.rate_limit(tenant, "frozen", limit=10),
        "install": lambda: bounced.directory.install(
            slack_team_id=unique_team_id(), slack_team_name="F"
        ),
        "unit_of_work": lambda: _open_and_read(bounced, tenant),
        "check_connection": None,  # answers False rather than raising
    }
    bouncer.freeze()
    try:
        for name, call in calls.items():
            if call is None:
                started = time.monotonic()
                assert await asyncio.wait_for(bounced.check_connection(), HANG) is False
                took = time.monotonic() - started
            else:
                error, took = await timed(call())
                assert isinstance(error, DatabaseUnavailable), (name, error)
            # A pooled connection waits for the statement bound, a new one for the connect bound.
            assert took < max(bound, CONNECT_TIMEOUT) + SLACK, (name, took)
    finally:
        bouncer.thaw()
    assert await bounced.directory.resolve(team) == tenant
    assert (await bounced.rate_limit(tenant, "frozen", limit=10)).current == 1
    spent = await admin.fetchval(
        "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
        tenant,
        "frozen",
    )
    assert spent == 1  # the frozen call spent nothing


async def _open_and_read(db: Database, tenant: TenantId) -> None:
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.get()


async def test_dispose_aborts_connections_that_a_frozen_proxy_never_lets_close(
    bounced: Database, bouncer: PgBouncer
) -> None:
    drivers: list[asyncpg.Connection] = []
    event.listen(
        engine_of(bounced).sync_engine,
        "connect",
        lambda dbapi_connection, _record: drivers.append(dbapi_connection.driver_connection),
    )
    tenant = await bounced.directory.install(slack_team_id=unique_team_id(), slack_team_name="F")
    async with bounced.unit_of_work(tenant) as one, bounced.unit_of_work(tenant) as two:
        await one.tenants.get()
        await two.tenants.get()
    assert len(drivers) == 2
    bouncer.freeze()
    try:
        error, took = await timed(bounced.dispose())
    finally:
        bouncer.thaw()
    assert error is None
    assert took < CONNECT_TIMEOUT + SLACK
    assert all(driver.is_closed() for driver in drivers)
    # The next use builds a fresh pool that works.
    assert await bounced.check_connection() is True
