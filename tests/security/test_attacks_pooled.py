"""Attack 2: poisoning a pooled connection for whoever uses it next.

The attacker leaves something on a connection — a temp table or schema that
would shadow the layer's tables (refused: no TEMPORARY, no CREATE), or session
state: ``SET ROLE``, ``default_transaction_read_only``, ``search_path``, the
tenant setting, an advisory lock, ``LISTEN``, ``PREPARE`` (under the names the
driver gives its own statements too), a holdable cursor. It does so inside a
unit of work (``execute_in``, then ``commit()``, or on the unit of work's
driver after its last commit) on a pool of one connection, on a raw runtime
connection through a real PgBouncer in transaction mode whose one server
connection it shares with the layer, and as the login's own defaults
(``ALTER ROLE CURRENT_USER SET``). The next user — ``directory.resolve``,
``db.rate_limit``, a unit of work of another tenant — must behave as on a
fresh connection: the directory role outside, the app role and its own tenant
inside, writes allowed, read committed, its own rows only, the pinned search
path, no advisory lock held.

What holds it: a unit of work whose connection served SQL the layer did not
write (the test helpers ``execute_in`` and ``driver_of``, the only way to
reach it) drops that connection when it ends, so nothing left there reaches
anyone: the next user opens another one (the probes of the next user run
through ``execute_in`` too, so its own unit of work drops its connection as
well). Every transaction sets its isolation, read/write mode, role, search path,
row security, timeouts and tenant itself, and the ``COMMIT``/``ROLLBACK`` of a
unit of work that served foreign SQL resets the session first (``RESET ALL;
RESET ROLE; UNLISTEN *; SELECT pg_advisory_unlock_all()``): that is what holds
behind a PgBouncer that does not reset sessions between clients (the layer
cannot run behind one that does). A direct connection opens with the directory
role, the pinned path, read-write, read committed, ``row_security`` on and the
layer's timeouts, which win over the login's own defaults.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.errors import SlackFathomDBError, TenantIsolationError
from slack_fathom_db.testing import (
    driver_of,
    execute_in,
    pgbouncer,
    pgbouncer_binary,
    throwaway_database,
)
from slack_fathom_db.testing import (
    probe_outside as probe_as_the_layer,
)
from slack_fathom_db.uow import UnitOfWork
from tests.helpers import dsn, on_citus, unique_user_id
from tests.security.attackers import (
    CONNECT_TIMEOUT,
    World,
    attacker,
    names,
    refused_everywhere,
    seeded,
)

PINNED_PATH: Final = "pg_catalog, public, pg_temp"
PROBE: Final = text(
    "SELECT current_user::text AS role, session_user::text AS login, "
    "current_setting('search_path') AS search_path, "
    "coalesce(current_setting('app.tenant_id', true), '') AS tenant, "
    "coalesce(split_part(current_setting('app.tenant_claim', true), '.', 3), '') AS claimed, "
    "current_setting('transaction_read_only') AS read_only, "
    "current_setting('transaction_isolation') AS isolation, "
    "current_setting('row_security') AS row_security, "
    "current_setting('statement_timeout') AS statement_timeout, "
    "current_setting('lock_timeout') AS lock_timeout, "
    "pg_backend_pid() AS pid, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    " AND pid = pg_backend_pid()) AS advisory_locks, "
    "(SELECT count(*) FROM pg_listening_channels()) AS listening"
)
PINNED_FIELDS: Final = (
    "role",
    "login",
    "search_path",
    "read_only",
    "isolation",
    "row_security",
    "statement_timeout",
    "lock_timeout",
)
"""What the layer sets itself in every transaction."""
BACKEND: Final = "SELECT pg_backend_pid()"


# -- shadowing -----------------------------------------------------------------------------

SHADOWS = {
    "temp tenants": "CREATE TEMP TABLE tenants (id uuid)",
    "temp audit_logs": "CREATE TEMP TABLE audit_logs (id uuid)",
    "temp api_rate_limits": "CREATE TEMP TABLE api_rate_limits (tenant_id uuid)",
    "pg_temp users": "CREATE TABLE pg_temp.users (id uuid, tenant_id uuid)",
    "temp view": "CREATE TEMP VIEW tenants AS SELECT gen_random_uuid() AS id",
    "temp function": "CREATE FUNCTION pg_temp.sfdb_require_tenant() RETURNS void "
    "LANGUAGE sql AS 'SELECT'",
    "another schema": "CREATE SCHEMA sfdb_shadow",
    "the login's own schema": 'CREATE SCHEMA "{login}"',
}


@pytest.mark.parametrize("template", SHADOWS.values(), ids=SHADOWS.keys())
async def test_no_reachable_role_creates_what_would_shadow_the_layers_tables(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner could make temp tables (``tenants`` shadowing the real one for the
    rest of the session). Now: no TEMPORARY and no CREATE for any reachable role (42501).

    ``"$user"`` heads PostgreSQL's default search path, hence the login's own schema.
    """
    await refused_everywhere(db, world, admin, template)


# -- the next user -------------------------------------------------------------------------


@dataclass(frozen=True)
class NextUser:
    """What the next user of a connection saw and did."""

    outside: Any  # PROBE, as the layer runs a statement outside any unit of work
    inside: Any  # PROBE, inside a unit of work of tenant a
    resolved: tuple[uuid.UUID | None, uuid.UUID | None]
    allowed: bool  # db.rate_limit for tenant a
    seen: set[uuid.UUID]  # tenant ids of the users the unit of work sees
    leftovers: set[uuid.UUID]  # tenant ids read through what the attacker prepared or held


def pinned(row: Any) -> tuple[Any, ...]:
    """The fields of a probe that the layer sets itself."""
    return tuple(getattr(row, field) for field in PINNED_FIELDS)


async def probe_outside(db: Database) -> Any:
    """:data:`PROBE` as the layer runs its statements outside units of work (pooled after)."""
    row, _ = await probe_as_the_layer(db, PROBE)
    return row


HAS_PREPARED: Final = "SELECT count(*) > 0 FROM pg_prepared_statements WHERE name = 'sfdb_attack'"
HAS_CURSOR: Final = "SELECT count(*) > 0 FROM pg_cursors WHERE name = 'sfdb_attack'"


async def next_user(db: Database, world: World, admin: asyncpg.Connection) -> NextUser:
    """Tenant a's turn on ``db``: resolve both workspaces, spend, write and read in a unit of
    work; what it wrote and spent is checked against a superuser's view.

    Its probes inside the unit of work run through ``execute_in``: that unit of
    work's connection is dropped when it ends, as the attacker's is.
    """
    outside = await probe_outside(db)
    resolved = (
        await db.directory.resolve(world.a.slack_team_id),
        await db.directory.resolve(world.b.slack_team_id),
    )
    resource = f"next-{secrets.token_hex(4)}"
    decision = await db.rate_limit(world.a.tenant, resource, limit=1000)
    slack_user = unique_user_id()
    leftovers: set[uuid.UUID] = set()
    async with db.unit_of_work(world.a.tenant) as uow:
        inside = (await execute_in(uow, PROBE)).one()
        await uow.tenants.add_user(slack_user_id=slack_user)
        seen = set((await execute_in(uow, "SELECT DISTINCT tenant_id FROM users")).scalars())
        if (await execute_in(uow, HAS_PREPARED)).scalar_one():
            leftovers |= set((await execute_in(uow, "EXECUTE sfdb_attack")).scalars())
        if (await execute_in(uow, HAS_CURSOR)).scalar_one():
            leftovers |= set((await execute_in(uow, "FETCH ALL FROM sfdb_attack")).scalars())
        await uow.commit()
    written = await admin.fetchval(
        "SELECT tenant_id FROM users WHERE slack_user_id = $1", slack_user
    )
    assert written == world.a.tenant
    charged = await admin.fetch(
        "SELECT tenant_id, request_count FROM api_rate_limits WHERE resource_type = $1", resource
    )
    assert [tuple(row) for row in charged] == [(world.a.tenant, 1)]
    return NextUser(outside, inside, resolved, decision.allowed, seen, leftovers)


def assert_as_on_a_fresh_connection(
    after: NextUser, before: NextUser, world: World, *, shared_session: bool = False
) -> None:
    """The next user behaves as it did before the attack, on a connection of its own.

    With ``shared_session`` (PgBouncer without its session reset, whose server
    session the attacker left) the layer's own per-transaction settings still
    hold; session state the layer does not set itself (the tenant outside units
    of work, advisory locks, listeners) is the attacker's until the layer's
    first unit of work ends, and is checked by the caller.
    """
    roles = names(world.settings)
    assert pinned(after.outside) == pinned(before.outside)
    assert pinned(after.inside) == pinned(before.inside)
    assert (after.outside.role, after.outside.search_path) == (roles["directory"], PINNED_PATH)
    assert (after.inside.role, after.inside.search_path) == (roles["app"], PINNED_PATH)
    assert (after.outside.read_only, after.inside.read_only) == ("off", "off")
    assert after.inside.isolation == "read committed"
    assert after.inside.claimed == str(world.a.tenant)
    assert after.resolved == (world.a.tenant, world.b.tenant)
    assert after.allowed is True
    assert after.seen == {world.a.tenant}
    assert after.leftovers <= {world.a.tenant}
    assert (after.outside.row_security, after.inside.row_security) == ("on", "on")
    assert (after.outside.lock_timeout, after.inside.lock_timeout) == ("0", "0")
    if not shared_session:
        for probe in (after.outside, after.inside):
            assert (probe.advisory_locks, probe.listening) == (0, 0)
        assert (after.outside.tenant, after.outside.claimed) == ("", "")


def one_connection(settings: DatabaseSettings, **changes: Any) -> Database:
    """A ``Database`` of ``settings`` whose pool holds one connection: the next user gets it,
    unless the unit of work that used it last dropped it."""
    return Database(settings.model_copy(update={"pool_size": 1, "max_overflow": 0, **changes}))


@pytest_asyncio.fixture
async def single(sfdb_direct_settings: DatabaseSettings) -> AsyncIterator[Database]:
    """The layer straight to the server, on one pooled connection."""
    db = one_connection(sfdb_direct_settings)
    try:
        yield db
    finally:
        await db.dispose()


async def locks_held(admin: asyncpg.Connection, pid: int) -> int:
    """Advisory locks the backend ``pid`` holds, as a superuser sees them."""
    held: int = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid
    )
    return held


async def gone(admin: asyncpg.Connection, pid: int, *, within: float = 10.0) -> bool:
    """Whether the backend ``pid`` has ended, waiting up to ``within`` seconds for it to exit
    (a dropped connection's socket is aborted; its backend notices and exits)."""
    deadline = asyncio.get_running_loop().time() + within
    while await admin.fetchval("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def backend_of(uow: UnitOfWork) -> int:
    """The backend pid of a unit of work's connection (through ``execute_in``: it is dropped)."""
    pid: int = (await execute_in(uow, BACKEND)).scalar_one()
    return pid


TAKE_A_LOCK: Final = "SELECT pg_advisory_lock((random() * 1e15)::bigint)"
"""A session-level advisory lock on a key nobody else uses: taking it never waits."""
POISONS = {
    "set role app": 'SET ROLE "{app}"',
    "set role directory": 'SET ROLE "{directory}"',
    "set role login": 'SET ROLE "{login}"',
    "read only": "SET default_transaction_read_only = on",
    "read only characteristics": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "serializable": "SET default_transaction_isolation = 'serializable'",
    "search path": "SET search_path = pg_temp, public, pg_catalog",
    "tenant": "SET app.tenant_id = '{other}'",
    "tenant by set_config": "SELECT set_config('app.tenant_id', '{other}', false)",
    "claim": "SET app.tenant_claim = 'v1.test.{other}.0000000000000.0.0'",
    "row security off": "SET row_security = off",
    "advisory lock": TAKE_A_LOCK,
    "listen": "LISTEN sfdb_attack",
    "prepare": "PREPARE sfdb_attack AS SELECT tenant_id FROM users",
    "holdable cursor": "DECLARE sfdb_attack CURSOR WITH HOLD FOR SELECT tenant_id FROM users",
}


@pytest.mark.parametrize("template", POISONS.values(), ids=POISONS.keys())
async def test_session_state_left_inside_a_unit_of_work_does_not_reach_the_next_user(
    single: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Tenant b's unit of work (the attacker's) sets session state and commits; tenant a's
    requests, on the same pool of one, behave as before it.

    Before: the connection went back to the pool and only the reset sent with
    ``COMMIT`` stood between the attacker's session and the next user (a
    prepared statement or a holdable cursor outlived it). Now the unit of work
    that ran the attacker's SQL drops its connection: its backend ends, and the
    next user gets a fresh one.
    """
    before = await next_user(single, world, admin)
    attacked: int | None = None
    try:
        async with single.unit_of_work(world.b.tenant) as uow:
            attacked = await backend_of(uow)
            await execute_in(uow, world.sql(template))
            await uow.commit()
    except TenantIsolationError:
        # On Citus the cursor is filled at commit on the worker, after the reset, as the
        # directory role: refused (42501), and the unit of work rolled back.
        if template != POISONS["holdable cursor"] or not await on_citus(admin):
            raise
    assert attacked is not None
    assert await gone(admin, attacked)
    after = await next_user(single, world, admin)
    # The next user's own connection served it outside and inside its unit of work.
    assert after.outside.pid == after.inside.pid != attacked
    assert_as_on_a_fresh_connection(after, before, world)


async def test_statements_after_the_last_commit_do_not_reach_the_next_user(
    single: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Code that reaches the connection (README, "Threat model") keeps the unit of work's
    driver and uses it after the unit of work's last commit.

    Before: the connection went back to the pool with that session (the reset
    travels only with a ``COMMIT`` or ``ROLLBACK``), and on a direct connection
    the directory's statements ran as the app role under tenant b: resolve() of
    a live workspace returned None, and the lock stayed. Now the unit of work
    drops the connection when it ends, after whatever was sent on it.
    """
    roles = names(world.settings)
    async with single.unit_of_work(world.b.tenant) as uow:
        driver = await driver_of(uow)
        await uow.commit()
        await driver.execute(
            f"SET ROLE \"{roles['app']}\"; SET app.tenant_id = '{world.b.tenant}'; " + TAKE_A_LOCK
        )
        left = await driver.fetchrow(str(PROBE))
    # The control: the session the unit of work ended with carries the attack.
    assert left is not None
    assert (left["role"], left["tenant"], left["advisory_locks"]) == (
        roles["app"],
        str(world.b.tenant),
        1,
    )
    assert driver.is_closed()
    assert await gone(admin, left["pid"])
    after = await probe_outside(single)
    resolved = await single.directory.resolve(world.a.slack_team_id)
    assert after.pid != left["pid"]
    assert (after.role, after.tenant, after.advisory_locks, resolved) == (
        roles["directory"],
        "",
        0,
        world.a.tenant,
    )


TAKE_THE_DRIVERS_NAMES: Final = """
DO $$
DECLARE
    top int;
BEGIN
    SELECT coalesce(max(('x' || lpad(substring(name FROM '^__asyncpg_stmt_([0-9a-f]+)__$'),
                                      8, '0'))::bit(32)::int), 0)
    INTO top FROM pg_prepared_statements;
    FOR n IN top + 1 .. top + 5000 LOOP
        EXECUTE format('PREPARE %I AS SELECT 1', '__asyncpg_stmt_' || to_hex(n) || '__');
    END LOOP;
END
$$
"""
TAKEN: Final = (
    "SELECT FROM pg_prepared_statements WHERE from_sql AND name LIKE '\\_\\_asyncpg\\_stmt\\_%'"
)
"""Sent as a simple query (no statement of its own to prepare): its tag counts the names."""


def the_layers_calls(db: Database, world: World) -> dict[str, Callable[[], Awaitable[object]]]:
    """What tenant a's next request does: resolve, rate limit, a unit of work that writes."""

    async def work() -> None:
        async with db.unit_of_work(world.a.tenant) as uow:
            await uow.tenants.add_user(slack_user_id=unique_user_id())
            await uow.commit()

    return {
        "resolve": lambda: db.directory.resolve(world.a.slack_team_id),
        "rate limit": lambda: db.rate_limit(world.a.tenant, "next", limit=1000),
        "unit of work": work,
    }


async def failures_of(calls: dict[str, Callable[[], Awaitable[object]]]) -> list[str]:
    """Each call in turn; the ones that failed, with the layer's error."""
    failures: list[str] = []
    for name, call in calls.items():
        try:
            await call()
        except SlackFathomDBError as exc:
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    return failures


async def test_prepared_statements_under_the_drivers_names_do_not_reach_the_next_user(
    single: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Inside a unit of work the attacker PREPAREs the next 5000 of the names asyncpg gives
    its own statements (one counter per process) and commits.

    Before: the session reset has no DEALLOCATE, the connection went back to
    the pool, and the next user's every new statement failed (42P05, prepared
    statement already exists). Now the unit of work drops the connection, and
    the names go with it. (Behind PgBouncer the layer names its statements by
    uuid or leaves them unnamed: see the PgBouncer test below.)
    """
    async with single.unit_of_work(world.b.tenant) as uow:
        attacked = await backend_of(uow)
        await execute_in(uow, TAKE_THE_DRIVERS_NAMES)  # runs: the names are free
        taken = await (await driver_of(uow)).execute(TAKEN)
        await uow.commit()  # sent as a simple query too
    assert taken == "SELECT 5000"  # the control: the session held them when the unit of work ended
    assert await gone(admin, attacked)
    assert await failures_of(the_layers_calls(single, world)) == []
    assert (await probe_outside(single)).pid != attacked


# -- through PgBouncer ---------------------------------------------------------------------

BOUNCED_POISONS: Final = (
    'SET ROLE "{directory}"',
    "SET default_transaction_read_only = on",
    "SET default_transaction_isolation = 'serializable'",
    "SET search_path = pg_temp, public, pg_catalog",
    "SET app.tenant_id = '{other}'",
    TAKE_A_LOCK,
    "LISTEN sfdb_attack",
    # Runs as whoever executes it, with their tenant: it can carry neither.
    "PREPARE sfdb_attack AS "
    "SELECT CAST(split_part(current_setting('app.tenant_claim', true), '.', 3) AS uuid)",
    # The names a driver gives its own prepared statements, taken in advance.
    "DO $$ BEGIN FOR n IN 1..2000 LOOP EXECUTE format('PREPARE %I AS SELECT 1', "
    "'__asyncpg_stmt_' || to_hex(n) || '__'); END LOOP; END $$",
    'SET ROLE "{app}"',
)
LEFT: Final = (
    "SELECT current_user::text AS role, current_setting('search_path') AS search_path, "
    "coalesce(current_setting('app.tenant_id', true), '') AS tenant, "
    "current_setting('transaction_read_only') AS read_only, "
    "current_setting('transaction_isolation') AS isolation, "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
    " AND pid = pg_backend_pid()) AS advisory_locks, "
    "(SELECT count(*) FROM pg_listening_channels()) AS listening, "
    "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared"
)
"""What a raw client of the runtime login finds on its server session, in a transaction."""


def bounced_url(bouncer: URL, settings: DatabaseSettings) -> URL:
    """The runtime login's URL of ``settings``, through PgBouncer."""
    direct = settings.sqlalchemy_url()
    return bouncer.set(database=direct.database, username=direct.username, password=direct.password)


def through(bouncer: URL, settings: DatabaseSettings) -> Database:
    """The layer of ``settings`` through PgBouncer, on one pooled connection."""
    url = bounced_url(bouncer, settings)
    return one_connection(
        settings, url=SecretStr(url.render_as_string(hide_password=False)), pgbouncer=True
    )


def require_pgbouncer() -> None:
    """Fail, in one line, when PgBouncer is not installed."""
    if pgbouncer_binary() is None:
        pytest.fail("PgBouncer is not installed", pytrace=False)


async def test_through_pgbouncer_without_its_reset_a_raw_client_leaves_nothing_for_the_layer(
    sfdb_server: URL,
    sfdb_direct_settings: DatabaseSettings,
    world: World,
    admin: asyncpg.Connection,
) -> None:
    """Why the layer needs no ``server_reset_query_always`` (and cannot run behind it: its
    driver prepares its first queries on a new connection outside a transaction).

    A raw runtime client and the layer share PgBouncer's one server connection,
    which PgBouncer hands from client to client as it is (its default). The
    attacker sets session state statement by statement (each its own PgBouncer
    transaction), and the session really carries it (the control). The layer's
    next requests behave as before: each of its transactions sets the role,
    search path, read-write and isolation itself, and the tenant in a unit of
    work. What it does not set stays until its first unit of work ends — the
    tenant outside units of work (which nothing there reads: the directory's
    functions take the workspace, the rate-limit function its tenant), the
    listener and the advisory lock (a denial of service only, to whoever waits
    for that key) — and that unit of work's ``COMMIT`` resets the session: the
    attacker's client then finds its login's own defaults again. The prepared
    statements stay, but the layer behind PgBouncer names its own by uuid.
    """
    require_pgbouncer()
    runtime = sfdb_direct_settings.sqlalchemy_url()
    roles = names(world.settings)
    with pgbouncer(sfdb_server, pool_size=1, logins=[runtime]) as bouncer:
        layer = through(bouncer.url, sfdb_direct_settings)
        try:
            before = await next_user(layer, world, admin)
            async with attacker(bounced_url(bouncer.url, sfdb_direct_settings)) as conn:
                async with conn.transaction():
                    pid = await conn.fetchval(BACKEND)
                assert pid == before.outside.pid == before.inside.pid  # one server connection
                for template in BOUNCED_POISONS:
                    await conn.execute(world.sql(template))
                async with conn.transaction():
                    left = await conn.fetchrow(LEFT)
                after = await next_user(layer, world, admin)
                async with conn.transaction():
                    cleared = await conn.fetchrow(LEFT)
        finally:
            await layer.dispose()
    assert left is not None
    assert cleared is not None
    # The control: the session really carries what the attacker left.
    assert tuple(left) == (
        roles["app"],
        "pg_temp, public, pg_catalog",
        str(world.b.tenant),
        "on",
        "serializable",
        1,
        1,
        2001,
    )
    assert after.outside.pid == after.inside.pid == pid
    assert_as_on_a_fresh_connection(after, before, world, shared_session=True)
    assert after.outside.tenant == str(world.b.tenant)
    assert (after.outside.advisory_locks, after.inside.advisory_locks) == (1, 1)
    assert (after.outside.listening, after.inside.listening) == (1, 1)
    # The layer's unit of work ended with its session reset: the login's defaults again.
    assert tuple(cleared) == (
        runtime.username,
        '"$user", public',
        "",
        "off",
        "read committed",
        0,
        0,
        2001,
    )
    assert await locks_held(admin, pid) == 0


async def test_through_pgbouncer_with_its_reset_the_next_client_gets_a_clean_session(
    sfdb_server: URL,
    sfdb_direct_settings: DatabaseSettings,
    world: World,
    admin: asyncpg.Connection,
) -> None:
    """PgBouncer with its session reset (``server_reset_query = DISCARD ALL``,
    ``server_reset_query_always = 1``), two raw clients of the runtime login.

    The first leaves every kind of session state; the next client, on the same
    server connection, finds none of it: the login's role, PostgreSQL's default
    search path, no tenant, read-write, read committed, no advisory lock, no
    listener, no prepared statement. The layer does not rely on this reset (see
    the previous test).
    """
    require_pgbouncer()
    runtime = sfdb_direct_settings.sqlalchemy_url()
    with pgbouncer(sfdb_server, pool_size=1, logins=[runtime], reset_sessions=True) as bouncer:
        url = bounced_url(bouncer.url, sfdb_direct_settings)
        async with attacker(url) as first, attacker(url) as following:
            async with first.transaction():
                pid = await first.fetchval(BACKEND)
            for template in BOUNCED_POISONS:
                await first.execute(world.sql(template))
            async with following.transaction():
                assert await following.fetchval(BACKEND) == pid
                left = await following.fetchrow(LEFT)
    assert left is not None
    assert tuple(left) == (
        runtime.username,
        '"$user", public',
        "",
        "off",
        "read committed",
        0,
        0,
        0,
    )
    assert await locks_held(admin, pid) == 0


SHARED_SESSION_SETTINGS = {
    "row security off": "row_security = off",
    "statement timeout": "statement_timeout = 1",
    "lock timeout": "lock_timeout = 1",
}


@pytest.mark.parametrize("setting", SHARED_SESSION_SETTINGS.values(), ids=SHARED_SESSION_SETTINGS)
async def test_through_pgbouncer_a_raw_clients_settings_do_not_reach_the_layer(
    sfdb_server: URL,
    sfdb_direct_settings: DatabaseSettings,
    world: World,
    admin: asyncpg.Connection,
    setting: str,
) -> None:
    """The same shared server session; the raw client changes a setting of that session.

    Before: ``SET row_security = off`` made ``db.rate_limit`` and the next unit
    of work fail (42501: forced row-level security refuses such queries) until
    a rollback reset the session, and the layer's statements outside units of
    work ran under the attacker's timeouts. Now the opener of those statements
    and every unit of work's preamble set row security and the layer's timeouts
    themselves: every call works, and the layer's transactions see its own
    settings, not the attacker's.
    """
    require_pgbouncer()
    runtime = sfdb_direct_settings.sqlalchemy_url()
    with pgbouncer(sfdb_server, pool_size=1, logins=[runtime]) as bouncer:
        layer = through(bouncer.url, sfdb_direct_settings)
        try:
            assert await failures_of(the_layers_calls(layer, world)) == []  # the control
            before = await next_user(layer, world, admin)
            async with attacker(bounced_url(bouncer.url, sfdb_direct_settings)) as conn:
                await conn.execute(f"SET {setting}")
                name, value = setting.split(" = ")
                assert await _shown(conn, name) in (value, f"{value}ms")
            failures = await failures_of(the_layers_calls(layer, world))
            after = await next_user(layer, world, admin)
        finally:
            await layer.dispose()
    assert failures == []
    assert pinned(after.outside) == pinned(before.outside)
    assert pinned(after.inside) == pinned(before.inside)


async def _shown(conn: asyncpg.Connection, name: str) -> str:
    """``SHOW name`` on a session whose statement timeout may be 1 ms: a few tries."""
    for _ in range(50):
        try:
            async with conn.transaction():
                shown: str = await conn.fetchval(f"SHOW {name}")
        except asyncpg.QueryCanceledError:
            continue
        return shown
    raise AssertionError(f"SHOW {name} never finished within the session's statement timeout")


# -- the login's own defaults --------------------------------------------------------------


@pytest_asyncio.fixture
async def other_world(sfdb_server: URL) -> AsyncIterator[World]:
    """Two tenants in a database of their own, whose runtime login a test may poison."""
    async with throwaway_database(sfdb_server) as settings:
        db = Database(settings)
        try:
            a, b = await seeded(db, "Attacker's workspace"), await seeded(db, "Victim")
        finally:
            await db.dispose()
        yield World(a=a, b=b, settings=settings)


@pytest_asyncio.fixture
async def other_admin(sfdb_server: URL, other_world: World) -> AsyncIterator[asyncpg.Connection]:
    """The suite's superuser on ``other_world``'s database; resets its login's defaults after."""
    database = other_world.settings.sqlalchemy_url().database
    conn = await asyncpg.connect(dsn(sfdb_server.set(database=database)), timeout=CONNECT_TIMEOUT)
    try:
        yield conn
    finally:
        await conn.execute(f'ALTER ROLE "{names(other_world.settings)["login"]}" RESET ALL')
        await conn.close(timeout=CONNECT_TIMEOUT)


async def set_own_default(world: World, setting: str) -> None:
    """``ALTER ROLE CURRENT_USER SET <setting>`` as the runtime login: PostgreSQL allows it."""
    async with attacker(world.settings.sqlalchemy_url()) as conn:
        await conn.execute(f"ALTER ROLE CURRENT_USER SET {world.sql(setting)}")
        defaults = await conn.fetchval(
            "SELECT setconfig FROM pg_db_role_setting WHERE setrole = "
            "(SELECT oid FROM pg_roles WHERE rolname = current_user) AND setdatabase = 0"
        )
    name = setting.split(" = ", maxsplit=1)[0]
    assert any(entry.startswith(f"{name}=") for entry in defaults), defaults


ROLE_DEFAULTS = {
    "role": "role = '{app}'",
    "search path": "search_path = pg_temp",
    "serializable": "default_transaction_isolation = 'serializable'",
    "read only": "default_transaction_read_only = on",
    "row security off": "row_security = off",
}


@pytest.mark.parametrize("setting", ROLE_DEFAULTS.values(), ids=ROLE_DEFAULTS.keys())
async def test_the_logins_own_session_defaults_do_not_reach_the_layer(
    other_world: World, other_admin: asyncpg.Connection, setting: str
) -> None:
    """``ALTER ROLE CURRENT_USER SET …``: PostgreSQL lets every role set its own defaults,
    which every later connection of that login starts with — outliving any pool.

    Before: ``default_transaction_read_only = on`` made every direct connection
    start read-only, and install and rate limits failed (25006). Now a direct
    connection opens with the directory role, the pinned path, read-write, read
    committed and ``row_security`` on, which win over the login's defaults: on
    fresh connections after the attack the layer acts as the directory role
    outside and the app role inside, and install, resolve, rate limits and
    units of work work.
    """
    world = other_world
    await set_own_default(world, setting)
    db = Database(world.settings)
    failures: list[str] = []
    try:
        try:
            fresh = await seeded(db, "Installed after the attack")
            outcome = await next_user(db, world, other_admin)
        except SlackFathomDBError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        else:
            roles = names(world.settings)
            assert fresh.tenant == await db.directory.resolve(fresh.slack_team_id)
            assert (outcome.outside.role, outcome.outside.search_path) == (
                roles["directory"],
                PINNED_PATH,
            )
            assert (outcome.inside.role, outcome.inside.search_path) == (roles["app"], PINNED_PATH)
            assert (outcome.outside.read_only, outcome.inside.read_only) == ("off", "off")
            assert (outcome.outside.isolation, outcome.inside.isolation) == (
                "read committed",
                "read committed",
            )
            assert (outcome.outside.row_security, outcome.inside.row_security) == ("on", "on")
            assert outcome.resolved == (world.a.tenant, world.b.tenant)
            assert outcome.seen == {world.a.tenant}
    finally:
        await db.dispose()
    assert failures == []


@pytest.mark.parametrize("setting", ["statement_timeout = 1", "lock_timeout = 1"])
async def test_the_logins_own_timeouts_do_not_reach_the_layer(
    other_world: World, other_admin: asyncpg.Connection, setting: str
) -> None:
    """``ALTER ROLE CURRENT_USER SET statement_timeout = 1`` (or ``lock_timeout``); an
    install of tenant a's workspace then waits 0.3 s behind a superuser's lock on its row.

    Before: every new direct connection started with the login's timeout, and
    statements outside units of work (install, resolve, uninstall,
    ``db.rate_limit``) were cancelled after 1 ms (57014). Now a direct
    connection opens with the layer's own statement and lock timeouts, which
    win over the login's: the install waits for the lock and succeeds.
    """
    world = other_world
    await set_own_default(world, setting)
    db = Database(world.settings)
    failures: list[str] = []
    try:
        lock = other_admin.transaction()
        await lock.start()
        await other_admin.execute("SELECT FROM tenants WHERE id = $1 FOR UPDATE", world.a.tenant)

        async def release() -> None:
            await asyncio.sleep(0.3)
            await lock.rollback()

        releasing = asyncio.create_task(release())
        try:
            installed = await db.directory.install(
                slack_team_id=world.a.slack_team_id, slack_team_name="Reinstalled"
            )
            assert installed == world.a.tenant
        except SlackFathomDBError as exc:
            failures.append(f"install: {type(exc).__name__}: {exc}")
        finally:
            await releasing
    finally:
        await db.dispose()
    assert failures == []
