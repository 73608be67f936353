"""Attacks by code that can send SQL as the runtime login, each run the way an attacker works.

The attacker (``tests/security/attackers.py``) has two channels: a raw
connection made from the runtime login's URL, and statements inside a unit of
work (``execute_in``: the unit of work's own transaction, as the app role with
its tenant set). On each it first becomes every role the login can reach —
``RESET ROLE``, ``SET ROLE`` the login, the app role, the directory role — and
then attacks. A refusal is SQLSTATE 42501 (permission denied, must be owner;
on Citus a new ``tenant_id`` is refused earlier, 0A000), another tenant's rows
are never seen, and a superuser's fingerprint of every row and of the catalog
that guards them (owners, row-level security, policies, triggers, functions,
schemas, grants, roles and their passwords, memberships, role settings) is the
same after the attack as before. Before the least-privilege roles the layer
logged in as the schema owner, and every attack below worked.

1. Back to the owner (here): become the owner, the migrating login or a
   superuser; list every tenant (the directory role included: it holds no
   table, only the directory's functions of the owner, which take a
   workspace by its Slack team id); disable or drop row-level security;
   rewrite, delete or truncate audit rows; create roles; ``COPY`` to or from a
   program or a file, read server files; create tables, views, functions,
   schemas, extensions.
2. Pooled-connection poisoning (``test_attacks_pooled.py``): temp tables and
   schemas that would shadow the layer's tables; session-level ``SET ROLE``,
   read-only, isolation, ``search_path``, tenant, advisory locks, ``LISTEN``,
   ``PREPARE`` (the driver's own statement names too), cursors, left inside a
   unit of work or on its driver after its last commit (the connection is
   dropped, never pooled again), and on a raw connection through a PgBouncer
   shared with the layer; role-level defaults (``ALTER ROLE CURRENT_USER SET``).
3. The rate-limit function (here): only the directory role may run it; its
   ``search_path`` is pinned; it leaves its caller's role and tenant as they were.
4. Columns nobody changes (here): ids, ``tenant_id``, ``created_at``,
   ``slack_team_id``; an audit row takes the server's ``id`` and
   ``created_at`` whatever an insert names, and no ``status`` outside its CHECK.
5. Another database on the same cluster (``test_attacks_cluster.py``): its
   logins cannot connect here, nor read anything when a superuser lets them in,
   nor take this database's roles (PostgreSQL 16 and later).
6. ``sfdb check`` (``test_attacks_cluster.py``): fails, one line per problem,
   for the migrating login, a superuser and a login that may create temp
   tables; passes for the runtime login.

What does not hold (README, "Threat model"): such code can run the
rate-limit function as the directory role for any tenant, spending its quota,
and the directory's functions for any workspace it names: resolve, install or
uninstall it, delete its Slack tokens, and read them as ciphertexts, which it
cannot decrypt without the application's key
(:func:`test_the_directory_role_reads_slack_tokens_only_as_ciphertexts`).
Another tenant's rows it reaches only through a signed claim of that tenant
that it reads within the claim's 10 s life (``test_claims.py``).
Every role may change its own password; on PostgreSQL 15 a login with
``CREATEROLE`` may take over the layer's roles
(``test_attacks_cluster.py``, a strict xfail there).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Final

import asyncpg
import pytest
from sqlalchemy import text

from slack_fathom_db import Database
from slack_fathom_db.testing import execute_in
from tests.helpers import on_citus
from tests.security.attackers import (
    TABLES,
    TENANT_OWNED,
    Outcome,
    World,
    attacker,
    changes,
    every_attempt,
    fingerprint,
    names,
    refused_everywhere,
)

RATE_LIMIT_FUNCTION: Final = (
    "sfdb_consume_rate_limit(uuid, text, text, timestamp with time zone, integer, integer, integer)"
)
PINNED_PATH: Final = "search_path=pg_catalog, public, pg_temp"


# -- 1. back to the owner ------------------------------------------------------------------

BECOME_THE_OWNER = {
    "set role owner": 'SET ROLE "{owner}"',
    "set role migrator": 'SET ROLE "{migrator}"',
    "set_config role": "SELECT set_config('role', '{owner}', false)",
    "session authorization": 'SET SESSION AUTHORIZATION "{migrator}"',
    "grant the owner to oneself": 'GRANT "{owner}" TO CURRENT_USER',
    "grant the owner to the login": 'GRANT "{owner}" TO "{login}"',
    "superuser": "ALTER ROLE CURRENT_USER SUPERUSER",
    "bypassrls": "ALTER ROLE CURRENT_USER BYPASSRLS",
    "createrole": "ALTER ROLE CURRENT_USER CREATEROLE",
}


@pytest.mark.parametrize("template", BECOME_THE_OWNER.values(), ids=BECOME_THE_OWNER.keys())
async def test_no_reachable_role_becomes_the_owner_or_a_superuser(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: ``RESET ROLE`` gave the owner back. Now no role the login reaches gets there."""
    await refused_everywhere(db, world, admin, template)


LIST_WORKSPACES: Final = "SELECT current_user::text, id::text FROM public.tenants"


def _seen_tenants(outcome: Outcome) -> set[str]:
    return {str(row[1]) for row in outcome.rows}


async def test_no_reachable_role_reads_another_tenants_rows(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Before: the owner listed every tenant's rows. Now: refused, or the own tenant's only.

    The raw connection sets no tenant, so the app role sees nothing there; the
    directory role holds no table at all (see the next test).
    """
    before = await fingerprint(admin)
    own = {str(world.a.tenant)}
    for table in TABLES:
        outcomes = await every_attempt(
            db,
            world.settings,
            world.a.tenant,
            f"SELECT DISTINCT current_user::text, {_TENANT_OF[table]}::text FROM public.{table}",
        )
        for outcome in outcomes:
            assert outcome.sqlstate == "42501" or _seen_tenants(outcome) <= own, (table, outcome)
        # The app role inside the unit of work does see its own rows: the query ran.
        assert any(_seen_tenants(o) == own for o in outcomes if o.channel == "unit of work")
    assert changes(before, await fingerprint(admin)) == []


_TENANT_OF: Final = {"tenants": "id"} | {table: "tenant_id" for table in TENANT_OWNED}

DIRECTORY_FUNCTIONS: Final = (
    "sfdb_resolve_tenant(text)",
    "sfdb_install_tenant(text, text, text, text)",
    "sfdb_uninstall_tenant(text)",
    "sfdb_find_slack_installation(text, text, text, text, text)",
    "sfdb_find_slack_bot(text, text, text, text)",
    "sfdb_save_slack_installation(text, text, text, jsonb, jsonb)",
    "sfdb_delete_slack_installations(text, text, text, text, text, text)",
    "sfdb_issue_slack_oauth_state(bytea, integer)",
    "sfdb_consume_slack_oauth_state(bytea)",
)
RESOLVE: Final = (
    "SELECT public.sfdb_resolve_tenant('{other_team}')::text, "
    "public.sfdb_resolve_tenant('%')::text, public.sfdb_resolve_tenant('')::text"
)
"""The directory role names tenant b's workspace, then a pattern and nothing: b's id only."""


async def test_the_directory_role_does_not_list_every_workspace(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Before: the directory role's policy on ``tenants`` (``USING (true)``) showed it every
    workspace's row. Now it holds no table and no policy names it: reached on either
    channel, its listing is refused (42501 on ``tenants``). What it may run are the
    directory's functions of the owner (SECURITY DEFINER), which take one
    workspace by its Slack team id: it resolves a workspace it names, never a pattern.
    """
    roles = names(world.settings)
    for table in TABLES:
        held = await admin.fetchval(
            "SELECT has_table_privilege($1, $2, "
            "'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')",
            roles["directory"],
            f"public.{table}",
        )
        assert held is False, table
    naming = await admin.fetch(
        "SELECT polrelid::regclass::text, polname FROM pg_policy "
        "WHERE $1::regrole = ANY (polroles)",
        roles["directory"],
    )
    assert [tuple(row) for row in naming] == []
    for function in DIRECTORY_FUNCTIONS:
        row = await admin.fetchrow(
            "SELECT prosecdef, proowner::regrole::text AS owner, ARRAY(SELECT coalesce("
            "g.rolname, 'PUBLIC') FROM aclexplode(proacl) a LEFT JOIN pg_roles g "
            "ON g.oid = a.grantee WHERE a.privilege_type = 'EXECUTE' ORDER BY 1) AS runs "
            "FROM pg_proc WHERE oid = $1::regprocedure",
            function,
        )
        assert row is not None, function
        assert (row["prosecdef"], row["owner"]) == (True, roles["owner"]), function
        assert set(row["runs"]) == {roles["owner"], roles["directory"]}, function
    before = await fingerprint(admin)
    listed = await every_attempt(db, world.settings, world.a.tenant, LIST_WORKSPACES)
    resolved = await every_attempt(db, world.settings, world.a.tenant, world.sql(RESOLVE))
    assert changes(before, await fingerprint(admin)) == []
    as_directory = {("raw", "directory"), ("unit of work", "directory")}
    for outcome in listed:
        if (outcome.channel, outcome.move) in as_directory:
            assert outcome.sqlstate == "42501", outcome
            assert "permission denied for table tenants" in outcome.message, outcome
    ran = {(o.channel, o.move): o.rows for o in resolved if o.sqlstate is None}
    # Inside a unit of work on a direct connection RESET ROLE gives the session's role back,
    # the directory role; behind PgBouncer the login's, which may run nothing.
    assert as_directory <= set(ran) <= {*as_directory, ("unit of work", "reset")}, resolved
    assert set(ran.values()) == {((str(world.b.tenant), None, None),)}
    assert {o.sqlstate for o in resolved if o.sqlstate is not None} == {"42501"}, resolved


TURN_OFF_ROW_SECURITY = {
    **{
        f"disable on {table}": f"ALTER TABLE public.{table} DISABLE ROW LEVEL SECURITY"
        for table in ("tenants", *TENANT_OWNED)
    },
    "no force": "ALTER TABLE public.users NO FORCE ROW LEVEL SECURITY",
    "drop policy": "DROP POLICY tenant_isolation ON public.users",
    "alter policy": "ALTER POLICY tenant_isolation ON public.users USING (true)",
    "create policy": "CREATE POLICY sfdb_attack ON public.users USING (true)",
    "take the table": "ALTER TABLE public.users OWNER TO CURRENT_USER",
}


@pytest.mark.parametrize(
    "template", TURN_OFF_ROW_SECURITY.values(), ids=TURN_OFF_ROW_SECURITY.keys()
)
async def test_no_reachable_role_turns_off_row_level_security(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner disabled row-level security. Now: must be owner (42501)."""
    await refused_everywhere(db, world, admin, template)


REWRITE_THE_AUDIT_LOG = {
    "delete": "DELETE FROM public.audit_logs",
    "update": "UPDATE public.audit_logs SET action_description = 'nothing happened'",
    "truncate": "TRUNCATE public.audit_logs",
    "disable the trigger": "ALTER TABLE public.audit_logs DISABLE TRIGGER audit_logs_append_only",
    "drop the trigger": "DROP TRIGGER audit_logs_append_only ON public.audit_logs",
}


@pytest.mark.parametrize(
    "template", REWRITE_THE_AUDIT_LOG.values(), ids=REWRITE_THE_AUDIT_LOG.keys()
)
async def test_no_reachable_role_rewrites_the_audit_log(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner deleted and updated audit rows. Now: refused by the grants (42501)."""
    await refused_everywhere(db, world, admin, template)


ROLES_AND_PROGRAMS = {
    "create role": "CREATE ROLE sfdb_attacker LOGIN PASSWORD 'attacker'",
    "create superuser": "CREATE USER sfdb_attacker SUPERUSER",
    "copy from program": "COPY public.audit_logs (action_description) FROM PROGRAM 'id'",
    "copy to program": "COPY (SELECT 1) TO PROGRAM 'cat'",
    "copy to file": "COPY (SELECT 1) TO '/tmp/sfdb_attack.csv'",
    "copy from file": "COPY public.audit_logs (action_description) FROM '/etc/hostname'",
    "read a server file": "SELECT pg_read_file('/etc/hostname')",
    "list a server directory": "SELECT pg_ls_dir('.')",
}


@pytest.mark.parametrize("template", ROLES_AND_PROGRAMS.values(), ids=ROLES_AND_PROGRAMS.keys())
async def test_no_reachable_role_creates_roles_or_reaches_the_server(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner could create roles (CREATEROLE). Now: no role, program or file."""
    await refused_everywhere(db, world, admin, template)


CREATE_OBJECTS = {
    "table": "CREATE TABLE public.sfdb_attack (id int)",
    "view": "CREATE VIEW public.sfdb_attack AS SELECT 1 AS one",
    "function": "CREATE FUNCTION public.sfdb_attack() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "schema": "CREATE SCHEMA sfdb_attack",
    "extension": "CREATE EXTENSION pgcrypto SCHEMA public",
}


@pytest.mark.parametrize("template", CREATE_OBJECTS.values(), ids=CREATE_OBJECTS.keys())
async def test_no_reachable_role_creates_objects(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner created tables, functions and schemas. Now: refused (42501)."""
    await refused_everywhere(db, world, admin, template)


# -- 3. the rate-limit function ------------------------------------------------------------

CONSUME: Final = (
    # The form the layer sends (db.rate_limit), constants only: on Citus it runs whole on
    # the tenant's node (a distributed function with force_delegation).
    "SELECT public.sfdb_consume_rate_limit('{tenant}'::uuid, 'attack', 'daily', "
    "'2026-01-01 00:00:00+00'::timestamptz, 1, 1000, 1000)"
)


async def test_only_the_directory_role_may_run_the_rate_limit_function(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Not PUBLIC, the app role or the login itself: the directory role alone (42501 else).

    The directory role's calls ran (and were rolled back): it still charges
    whichever tenant it is given (README, "Threat model").
    """
    roles = names(world.settings)
    grantees = await admin.fetch(
        "SELECT coalesce(g.rolname, 'PUBLIC') AS grantee FROM pg_proc p, "
        "aclexplode(p.proacl) a LEFT JOIN pg_roles g ON g.oid = a.grantee "
        "WHERE p.oid = $1::regprocedure AND a.privilege_type = 'EXECUTE'",
        RATE_LIMIT_FUNCTION,
    )
    assert {row["grantee"] for row in grantees} == {roles["owner"], roles["directory"]}
    for role, may in [
        ("public", False),
        (roles["app"], False),
        (roles["login"], False),
        (roles["directory"], True),
    ]:
        held = await admin.fetchval(
            "SELECT has_function_privilege($1, $2, 'EXECUTE')", role, RATE_LIMIT_FUNCTION
        )
        assert held is may, role
    before = await fingerprint(admin)
    outcomes = await every_attempt(db, world.settings, world.a.tenant, world.sql(CONSUME))
    for outcome in outcomes:
        if outcome.sqlstate is None:
            assert tuple(outcome.rows[0][0]) == (1, None), outcome  # granted, nothing before
        else:
            assert outcome.sqlstate == "42501", outcome
    ran = {(o.channel, o.move) for o in outcomes if o.sqlstate is None}
    assert ("raw", "directory") in ran
    # On Citus the call runs on the worker, over a connection opened as the directory role
    # that replays the unit of work's SET LOCAL ROLE <app>: refused there (42501) as well.
    assert ("unit of work", "directory") in ran or await on_citus(admin)
    assert ran <= {("raw", "directory"), ("unit of work", "directory"), ("unit of work", "reset")}
    assert changes(before, await fingerprint(admin)) == []


async def test_the_rate_limit_function_pins_its_search_path(
    world: World, admin: asyncpg.Connection
) -> None:
    """SECURITY DEFINER as the owner, so its search path is its own, whatever the caller's."""
    row = await admin.fetchrow(
        "SELECT prosecdef, proowner::regrole::text AS owner, proconfig FROM pg_proc "
        "WHERE oid = $1::regprocedure",
        RATE_LIMIT_FUNCTION,
    )
    assert row is not None
    assert row["prosecdef"] is True
    assert row["owner"] == names(world.settings)["owner"]
    assert PINNED_PATH in row["proconfig"]
    # Every function of the schema pins its path, but the two whose SQL-standard bodies were
    # bound when they were made (the audit chain's canonical forms): no path reaches those.
    unpinned = await admin.fetch(
        "SELECT proname, prosqlbody IS NOT NULL AS bound FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace AND NOT ($1 = ANY (coalesce(proconfig, "
        "'{}')))",
        PINNED_PATH,
    )
    assert sorted((r["proname"], r["bound"]) for r in unpinned) == [
        ("sfdb_audit_content", True),
        ("sfdb_audit_personal", True),
    ]
    # A caller's search path that finds none of the layer's tables changes nothing inside:
    # the function still charges public.api_rate_limits (rolled back here).
    directory = names(world.settings)["directory"]
    async with attacker(world.settings.sqlalchemy_url()) as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(f'SET LOCAL ROLE "{directory}"; SET LOCAL search_path = pg_temp')
            assert tuple(await conn.fetchval(world.sql(CONSUME))) == (1, None)
            assert await conn.fetchval("SELECT current_user") == directory
            assert await conn.fetchval("SELECT current_setting('search_path')") == "pg_temp"
        finally:
            await transaction.rollback()


CALLER: Final = text(
    "SELECT current_user::text, current_setting('app.tenant_claim', true), "
    "coalesce(current_setting('app.tenant_id', true), ''), "
    "current_setting('lock_timeout'), current_setting('search_path')"
)
CHARGE: Final = text(  # the layer's form (see CONSUME)
    "SELECT sfdb_consume_rate_limit(:tenant, :resource, 'daily', :start, 1, 1000, 1000)"
)


def _today() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def _charged(admin: asyncpg.Connection, resource: str) -> set[tuple[object, int]]:
    rows = await admin.fetch(
        "SELECT tenant_id, request_count FROM api_rate_limits WHERE resource_type = $1",
        resource,
    )
    return {(row["tenant_id"], row["request_count"]) for row in rows}


@pytest.mark.not_on_citus(
    reason="on Citus the function runs on the worker (force_delegation), over a connection "
    "the coordinator opens as the role in effect, the directory role after SET LOCAL ROLE, "
    "and on which it replays the transaction's SET LOCAL commands, the unit of work's SET "
    "LOCAL ROLE <app> among them: the directory role may not become the app role (42501), "
    "so no call gets that far; the raw caller's transaction below runs there"
)
async def test_the_rate_limit_function_leaves_the_callers_role_and_tenant_alone(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Called inside a unit of work as the directory role, for its own tenant and another.

    ``current_user``, the tenant claim, ``app.tenant_id`` (which the function sets
    for itself), ``lock_timeout`` and ``search_path`` are what they were before each
    call. What does not hold (README): it charges whichever tenant it is given —
    here tenant b's window, committed, as the superuser sees.
    """
    roles = names(world.settings)
    resource = f"attack-{secrets.token_hex(4)}"
    async with db.unit_of_work(world.a.tenant) as uow:
        await execute_in(uow, "SET LOCAL lock_timeout = '4321ms'")
        await execute_in(uow, f'SET LOCAL ROLE "{roles["directory"]}"')
        before = (await execute_in(uow, CALLER)).one()
        assert (before[0], before[2], before[3]) == (roles["directory"], "", "4321ms")
        assert str(before[1]).split(".")[2] == str(world.a.tenant)  # a's claim
        for tenant in (world.a.tenant, world.b.tenant):
            granted = await execute_in(
                uow, CHARGE.bindparams(tenant=tenant, resource=resource, start=_today())
            )
            assert tuple(granted.scalar_one()) == (1, None)  # granted, nothing before
            assert (await execute_in(uow, CALLER)).one() == before
        await execute_in(uow, f'SET LOCAL ROLE "{roles["app"]}"')
        seen = await execute_in(uow, "SELECT DISTINCT tenant_id FROM api_rate_limits")
        assert set(seen.scalars()) == {world.a.tenant}
        await uow.commit()
    assert await _charged(admin, resource) == {
        (world.a.tenant, 1),
        (world.b.tenant, 1),  # not held yet: another tenant's quota, spent
    }


async def test_the_rate_limit_function_leaves_a_raw_callers_role_and_tenant_alone(
    world: World, admin: asyncpg.Connection
) -> None:
    """The same from a raw connection's transaction: the directory role, tenant a set by
    hand. Both calls are committed; tenant b's quota is spent too (not held yet)."""
    roles = names(world.settings)
    resource = f"attack-{secrets.token_hex(4)}"
    caller = str(CALLER)
    async with attacker(world.settings.sqlalchemy_url()) as conn, conn.transaction():
        await conn.execute(
            f"SET LOCAL ROLE \"{roles['directory']}\"; SET LOCAL lock_timeout = '4321ms'; "
            f"SET LOCAL app.tenant_id = '{world.a.tenant}'"
        )
        before = await conn.fetchrow(caller)
        assert before is not None
        assert (before[0], before[2], before[3]) == (
            roles["directory"],
            str(world.a.tenant),
            "4321ms",
        )
        for tenant in (world.a.tenant, world.b.tenant):
            granted = await conn.fetchval(
                "SELECT sfdb_consume_rate_limit($1, $2, 'daily', $3, 1, 1000, 1000)",
                tenant,
                resource,
                _today(),
            )
            assert tuple(granted) == (1, None)
            assert await conn.fetchrow(caller) == before
    assert await _charged(admin, resource) == {(world.a.tenant, 1), (world.b.tenant, 1)}


# -- 4. columns nobody changes -------------------------------------------------------------

# Constants: Citus refuses a volatile function in an UPDATE of a distributed table before
# any privilege is checked.
NEW_ID: Final = "00000000-0000-4000-8000-00000000beef"
CHOSEN_TIME: Final = "2001-01-01 00:00:00+00"
NEVER_UPDATED = {
    "tenants.id": f"UPDATE public.tenants SET id = '{NEW_ID}'",
    "tenants.slack_team_id": "UPDATE public.tenants SET slack_team_id = '{other_team}'",
    "tenants.created_at": f"UPDATE public.tenants SET created_at = '{CHOSEN_TIME}'",
    **{
        f"{table}.{column}": f"UPDATE public.{table} SET {column} = {value}"
        for table in TENANT_OWNED
        for column, value in (
            ("id", f"'{NEW_ID}'"),
            ("tenant_id", "'{other}'"),
            ("created_at", f"'{CHOSEN_TIME}'"),
        )
        if not (table == "api_rate_limits" and column == "id")
    },
}


@pytest.mark.parametrize("template", NEVER_UPDATED.values(), ids=NEVER_UPDATED.keys())
async def test_no_reachable_role_updates_ids_tenants_creation_times_or_team_ids(
    db: Database, world: World, admin: asyncpg.Connection, template: str
) -> None:
    """Before: the owner renamed a workspace's slack_team_id (capturing its next install) or
    moved rows. Now the column grants refuse it to the app and the directory role (42501).

    On Citus a new ``tenant_id`` is refused even before: the distribution column
    never changes (0A000).
    """
    allowed: tuple[str, ...] = ("42501",)
    if "SET tenant_id" in template and await on_citus(admin):
        allowed = ("42501", "0A000")
    await refused_everywhere(db, world, admin, template, allowed=allowed)


AUDIT_COLUMNS: Final = "tenant_id, event_type, event_category, action_description"
CHOSEN_ID: Final = "00000000-0000-4000-8000-00000000dead"
FORGED_AUDIT_ROW: Final = (
    f"INSERT INTO public.audit_logs (id, {AUDIT_COLUMNS}) "
    f"VALUES ('{CHOSEN_ID}', '{{tenant}}', 'auth.login', 'auth', 'forged') "
    "RETURNING id, created_at"
)
BACKDATED_AUDIT_ROW: Final = (
    f"INSERT INTO public.audit_logs (created_at, {AUDIT_COLUMNS}) "
    f"VALUES ('{CHOSEN_TIME}', '{{tenant}}', 'auth.login', 'auth', 'backdated') "
    "RETURNING id, created_at"
)


async def test_audit_rows_take_their_id_from_the_server(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Before: the owner wrote audit rows with any id and time. Now the app role, which may
    insert audit rows, gets the server's id and transaction time whatever id it names (a
    trigger); every other role is refused (42501), as is the app role without a tenant.
    """
    before = await fingerprint(admin)
    outcomes = await every_attempt(db, world.settings, world.a.tenant, world.sql(FORGED_AUDIT_ROW))
    inserted = [o for o in outcomes if o.sqlstate is None]
    assert {(o.channel, o.move) for o in inserted} == {("unit of work", "app")}, outcomes
    ((row_id, created_at),) = inserted[0].rows
    assert str(row_id) != CHOSEN_ID
    assert created_at != dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    refused = [o for o in outcomes if o.sqlstate is not None]
    assert {o.sqlstate for o in refused} == {"42501"}, refused
    assert changes(before, await fingerprint(admin)) == []  # each attempt was rolled back


async def test_a_backdated_audit_row_is_refused_to_every_role(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """Since the audit log is partitioned by month, a row goes to the partition of the time
    it names before the server gives it its own, and cannot move partition then: the app
    role's row dated in another month is refused (42501), as every other role's is."""
    before = await fingerprint(admin)
    outcomes = await every_attempt(
        db, world.settings, world.a.tenant, world.sql(BACKDATED_AUDIT_ROW)
    )
    assert {o.sqlstate for o in outcomes} == {"42501"}, outcomes
    assert changes(before, await fingerprint(admin)) == []


async def test_no_reachable_role_plants_audit_rows_in_another_tenant(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """An audit row of another tenant: refused by row-level security or the grants (42501)."""
    await refused_everywhere(
        db,
        world,
        admin,
        f"INSERT INTO public.audit_logs ({AUDIT_COLUMNS}) "
        "VALUES ('{other}', 'auth.login', 'auth', 'planted')",
    )


async def test_audit_status_is_limited_to_its_check_values(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """The app role, which may insert audit rows, gets the CHECK's refusal (23514)."""
    outcomes = await refused_everywhere(
        db,
        world,
        admin,
        f"INSERT INTO public.audit_logs ({AUDIT_COLUMNS}, status) "
        "VALUES ('{tenant}', 'auth.login', 'auth', 'logged in', 'erased')",
        allowed=("42501", "23514"),
    )
    by_app = [o for o in outcomes if o.channel == "unit of work" and o.move == "app"]
    assert [o.sqlstate for o in by_app] == ["23514"], by_app
    assert "status" in by_app[0].message


# -- what does not hold ----------------------------------------------------------------------


FIND_OTHERS_TOKENS: Final = (
    "SELECT encode(bot_token, 'escape'), encode(user_token, 'escape'), "
    "encode(bot_refresh_token, 'escape'), encode(latest_bot_token, 'escape') "
    "FROM public.sfdb_find_slack_installation('1111.2222', '{other_team}', NULL, "
    "'{other_team}', NULL)"
)


async def test_the_directory_role_reads_slack_tokens_only_as_ciphertexts(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    """The lookup Bolt makes before it knows the tenant is the directory's, for a workspace
    it names: the attacker, as every reachable role, gets tenant b's row at most, and in
    it ciphertexts that hold none of b's tokens (the key is the application's)."""
    before = await fingerprint(admin)
    outcomes = await every_attempt(
        db, world.settings, world.a.tenant, world.sql(FIND_OTHERS_TOKENS)
    )
    assert changes(before, await fingerprint(admin)) == []
    reached = [outcome for outcome in outcomes if outcome.sqlstate is None]
    assert reached, "the directory role may run the lookup"
    for outcome in outcomes:
        assert outcome.sqlstate in (None, "42501"), outcome
    team = world.b.slack_team_id
    for outcome in reached:
        assert len(outcome.rows) == 1, outcome
        text = " ".join(str(value) for value in outcome.rows[0])
        for token in (f"xoxb-seeded-{team}", f"xoxp-seeded-{team}", f"xoxe-1-seeded-{team}"):
            assert token not in text, outcome.move
