"""Through PgBouncer in transaction pooling mode: two server connections, many tenants.

Each test here starts its own PgBouncer (``slack_fathom_db.testing.pgbouncer``)
in front of the suite's server with ``default_pool_size = 2``, so it runs in
every pass. The PgBouncer pass (``make test-pgbouncer``) also runs the
isolation, rate-limit and unit-of-work tests through a PgBouncer of
``PGBOUNCER_POOL_SIZE`` server connections.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.claims import CLAIM_PATTERN
from slack_fathom_db.testing import (
    execute_in,
    pgbouncer,
    pgbouncer_binary,
    probe_outside,
)
from slack_fathom_db.uow import UnitOfWork
from tests.helpers import unique_team_id, unique_user_id

SERVER_CONNECTIONS = 2
TENANTS = 24
UNITS_PER_TENANT = 5
CLIENTS = 16
LOG_CYCLES = 500
PIPE_CAPACITY = 64 * 1024  # Linux's default pipe buffer

PROBE = text(
    "SELECT current_user AS usr, session_user AS login, "
    "current_setting('app.tenant_claim', true) AS claim, "
    "current_setting('app.tenant_id', true) AS plain, "
    "current_setting('statement_timeout') AS timeout, pg_backend_pid() AS pid"
)
"""What a statement outside any unit of work sees: its role, no tenant claim nor plain
tenant setting, the layer's timeout, its server process."""
PROBE_INSIDE = text(
    "SELECT current_user AS usr, session_user AS login, "
    "current_setting('app.tenant_claim', true) AS claim, "
    "current_setting('app.tenant_id', true) AS plain, "
    "sfdb_claimed_tenant()::text AS tenant, "
    "current_setting('statement_timeout') AS timeout, pg_backend_pid() AS pid"
)
"""The same inside a unit of work, with the tenant the database verifies from its claim
(as the app role, which alone may ask)."""


@pytest.fixture(scope="module")
def two_connection_bouncer(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> Iterator[URL]:
    if pgbouncer_binary() is None:
        pytest.fail("pgbouncer is not installed: apt-get install pgbouncer", pytrace=False)
    runtime = sfdb_direct_settings.sqlalchemy_url()
    with pgbouncer(sfdb_server, pool_size=SERVER_CONNECTIONS, logins=[runtime]) as bouncer:
        yield bouncer.url


@pytest_asyncio.fixture
async def bounced(
    two_connection_bouncer: URL, sfdb_direct_settings: DatabaseSettings
) -> AsyncIterator[Database]:
    """The layer on the test database through PgBouncer: 16 clients, 2 server connections.

    As the suite's runtime login, which holds nothing of its own.
    """
    direct = sfdb_direct_settings.sqlalchemy_url()
    url = two_connection_bouncer.set(
        database=direct.database, username=direct.username, password=direct.password
    )
    settings = DatabaseSettings(
        url=url.render_as_string(False),
        tenant_key=sfdb_direct_settings.tenant_key,
        pgbouncer=True,
        pool_size=CLIENTS,
        max_overflow=0,
        statement_timeout_ms=7_000,
        _env_file=None,
    )
    db = Database(settings)
    try:
        yield db
    finally:
        await db.dispose()


@dataclass(frozen=True)
class Seen:
    tenant: TenantId
    probes: list[Any]
    users: set[str]
    recordings: set[str]
    raw_users: set[str]
    outside: Any


async def test_through_pgbouncer_the_server_sees_pgbouncer(
    bounced: Database, admin: asyncpg.Connection
) -> None:
    info = await bounced.info()
    assert info.pgbouncer is True
    url = bounced.settings.sqlalchemy_url()
    server_port = await admin.fetchval("SELECT inet_server_port()")
    assert url.port != server_port  # the layer talks to PgBouncer, not to the server


@pytest.mark.parametrize("probed", [True, False], ids=["probed", "repositories only"])
async def test_many_interleaved_tenants_over_two_server_connections(
    bounced: Database,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    probed: bool,
) -> None:
    """Probed, each unit of work also reads its role, its tenant claim, the tenant the
    database verifies from it and its server pid with raw SQL (which makes it reset
    the session and drop its client connection when it ends). A claim made behind
    PgBouncer names no server process (0): any of the two may run the transaction;
    with repositories only, it takes the layer's ordinary path, checked by what it
    reads and by the rows and counters a superuser sees."""
    tenants = [
        await bounced.directory.install(slack_team_id=unique_team_id(), slack_team_name=f"B{i}")
        for i in range(TENANTS)
    ]
    planned = {t: [unique_user_id() for _ in range(UNITS_PER_TENANT)] for t in tenants}
    # Round robin: consecutive units of work belong to different tenants.
    jobs = [(t, planned[t][j]) for j in range(UNITS_PER_TENANT) for t in tenants]

    async def work(tenant: TenantId, slack_user: str) -> Seen:
        probes: list[Any] = []
        raw_users: set[str] = set()

        async def probe(uow: UnitOfWork) -> None:
            if probed:
                probes.append((await execute_in(uow, PROBE_INSIDE)).one())

        async with bounced.unit_of_work(tenant) as uow:
            await probe(uow)
            user = await uow.tenants.add_user(slack_user_id=slack_user)
            await asyncio.sleep(0)
            await uow.meetings.create(
                user_id=user.id, fathom_recording_id=f"rec-{slack_user}", title="Call"
            )
            decision = await uow.rate_limits.consume("bounced", limit=1000)
            assert decision.allowed
            await probe(uow)
            await uow.commit()
            await asyncio.sleep(0)
            # A new transaction on whichever server connection PgBouncer hands out.
            await probe(uow)
            users = {u.slack_user_id for u in await uow.tenants.list_users()}
            recordings = {m.fathom_recording_id for m in await uow.meetings.recent(limit=1000)}
            if probed:
                query = "SELECT slack_user_id FROM users"
                raw_users = set((await execute_in(uow, query)).scalars())
            await probe(uow)
            await uow.commit()
        assert slack_user in users
        # Outside any unit of work, on the same client connection pool, as the layer runs a
        # statement there (in a transaction its opener starts): no tenant context.
        outside, _ = await probe_outside(bounced, PROBE)
        assert await bounced.directory.resolve("T0NOBODY") is None
        return Seen(tenant, probes, users, recordings, raw_users, outside)

    results = await asyncio.wait_for(asyncio.gather(*(work(t, s) for t, s in jobs)), timeout=120)

    login = sfdb_direct_settings.sqlalchemy_url().username
    roles = bounced.settings.roles
    pids = set()
    tenants_per_pid: dict[int, set[TenantId]] = {}
    for seen in results:
        own = set(planned[seen.tenant])
        for probe in seen.probes:
            assert (probe.usr, probe.login, probe.tenant, probe.timeout) == (
                roles.app,
                login,
                str(seen.tenant),
                "7s",
            )
            assert CLAIM_PATTERN.fullmatch(probe.claim), probe.claim
            _, _, claimed, _, backend, _ = probe.claim.split(".")
            assert (claimed, backend) == (str(seen.tenant), "0")
            assert probe.plain in (None, "")
            pids.add(probe.pid)
            tenants_per_pid.setdefault(probe.pid, set()).add(seen.tenant)
        assert seen.users <= own
        assert seen.raw_users <= own
        assert seen.recordings <= {f"rec-{u}" for u in own}
        assert (seen.outside.usr, seen.outside.login) == (roles.directory, login)
        assert seen.outside.claim in (None, "")
        assert seen.outside.plain in (None, "")
        assert seen.outside.timeout == "7s"  # set by the opener, as everything else
    # Every transaction ran on one of two server connections, each serving many tenants.
    if probed:
        assert len(pids) <= SERVER_CONNECTIONS
        assert min(len(ts) for ts in tenants_per_pid.values()) > 1
    for tenant in tenants:
        rows = await admin.fetch("SELECT slack_user_id FROM users WHERE tenant_id = $1", tenant)
        assert {r["slack_user_id"] for r in rows} == set(planned[tenant])
        spent = await admin.fetchval(
            "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 "
            "AND resource_type = 'bounced'",
            tenant,
        )
        assert spent == UNITS_PER_TENANT
    # No server connection was left inside a transaction or holding a tenant's role.
    leftover = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%'"
    )
    assert leftover == 0


async def test_rate_limits_through_two_server_connections_grant_exactly_the_limit(
    bounced: Database, make_tenant: Any, admin: asyncpg.Connection
) -> None:
    tenant = await make_tenant("Bounced")
    resource = f"bounce-{secrets.token_hex(3)}"
    decisions = await asyncio.wait_for(
        asyncio.gather(*(bounced.rate_limit(tenant, resource, limit=25) for _ in range(80))),
        timeout=120,
    )
    assert sum(d.allowed for d in decisions) == 25
    assert (
        await admin.fetchval(
            "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
            tenant,
            resource,
        )
        == 25
    )


async def test_a_failed_statement_through_pgbouncer_leaves_no_prepared_statement_errors(
    bounced: Database, make_tenant: Any
) -> None:
    tenant = await make_tenant("Bounced")
    # The same statements again and again, on server connections that change under them:
    # a prepared-statement cache would fail here ("prepared statement ... does not exist").
    for n in range(30):
        async with bounced.unit_of_work(tenant) as uow:
            await uow.tenants.add_user(slack_user_id=f"UPREP{n:04d}")
            assert await uow.tenants.get_user_by_slack_id(f"UPREP{n:04d}") is not None
            if n % 3 == 0:
                await uow.commit()
        assert await bounced.directory.resolve("T0NOBODY") is None
        assert await bounced.check_connection() is True
    async with bounced.unit_of_work(tenant) as uow:
        users = {u.slack_user_id for u in await uow.tenants.list_users()}
    assert users == {f"UPREP{n:04d}" for n in range(0, 30, 3)}


async def test_pgbouncer_keeps_answering_after_more_log_than_a_pipe_holds(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> None:
    # PgBouncer writes a log line per login and per close to its standard error. The
    # harness once sent that to a pipe nobody read: past 64 KiB PgBouncer blocked in
    # write(2) and every client hung. Log far more than a pipe holds; every cycle must
    # still be answered, each within a bound.
    database = sfdb_direct_settings.sqlalchemy_url().database
    with pgbouncer(sfdb_server, pool_size=2) as bouncer:
        dsn = bouncer.url.set(drivername="postgresql", database=database)
        for cycle in range(LOG_CYCLES):
            conn = await asyncio.wait_for(
                asyncpg.connect(dsn.render_as_string(False), statement_cache_size=0), timeout=30
            )
            try:
                assert await asyncio.wait_for(conn.fetchval("SELECT $1::int", cycle), 30) == cycle
            finally:
                await asyncio.wait_for(conn.close(), timeout=30)
        logged = bouncer.log.stat().st_size
    assert logged > 2 * PIPE_CAPACITY, f"only {logged} bytes of log; the test proves nothing"


async def test_fresh_clients_open_their_connections_while_others_are_busy(
    bounced: Database,
) -> None:
    """A new connection's set-up (SQLAlchemy's first checks, the driver's type codecs) is
    prepared and then executed: two exchanges, which PgBouncer in transaction mode may
    send to two server connections when other clients are busy. The layer sends it in a
    transaction of its own, so 16 fresh clients connect at once over 2 server connections,
    3 times over, while 16 others keep them busy, without a missing prepared statement."""
    team = unique_team_id()
    tenant = await bounced.directory.install(slack_team_id=team, slack_team_name="Fresh")

    async def busy() -> None:
        for _ in range(20):
            assert await bounced.directory.resolve(team) == tenant

    for _ in range(3):
        fresh = [Database(bounced.settings) for _ in range(CLIENTS)]
        try:
            found = await asyncio.gather(
                *(db.directory.resolve(team) for db in fresh),
                *(busy() for _ in range(CLIENTS)),
            )
        finally:
            await asyncio.gather(*(db.dispose() for db in fresh))
        assert found[:CLIENTS] == [tenant] * CLIENTS
