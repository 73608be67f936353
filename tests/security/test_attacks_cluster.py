"""Attacks 5 and 6: another database on the same cluster, and what ``sfdb check`` says.

Roles are cluster-wide. Before the least-privilege roles every database's app
role was called ``sfdb_app``, so the app of one database was a member of the
roles that guarded another. Now each database has roles named after it; a
second database made on the same server (``throwaway_database``) has its own
owner, app and directory roles, its own migrating login (``CREATEROLE``, as
on a managed service) and its own runtime login. Neither login may connect
here (``CONNECT`` is revoked from PUBLIC); let in by a superuser, neither
reads anything, whatever role it becomes. ``sfdb create-login`` named after
any of its roles refuses and changes nothing (its owner, say, would otherwise
become a login with a password known here).

A documented limitation on PostgreSQL 15 (README, "Threat model";
``xfail(strict=True)`` there, with its diagnosis): a login with ``CREATEROLE``
may take over any role that is not a superuser, the layer's included, so the
other database's migrating login grants itself this database's roles.

``sfdb check`` (run as ``python -m slack_fathom_db.cli check``) fails, one line
per problem, when ``DATABASE_URL`` is the migrating login, a superuser, a
login that may create temp tables, inherits, or is a member of other roles
(``pg_write_all_data``, another database's), and passes for the runtime login.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import DatabaseSettings
from slack_fathom_db.testing import throwaway_database
from tests.conftest import superuser_dsn
from tests.helpers import dsn
from tests.security.attackers import (
    CONNECT_TIMEOUT,
    TABLES,
    World,
    attacker,
    changes,
    fingerprint,
    names,
)
from tests.test_cli import create_login, failed_lines, owner_env, role_state, sfdb, url_of

# -- 5. another database on the same cluster -----------------------------------------------


@pytest_asyncio.fixture
async def other(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """A second database on the same server, migrated, with its own roles and logins."""
    async with throwaway_database(sfdb_server) as settings:
        yield settings


def logins_of(settings: DatabaseSettings) -> dict[str, URL]:
    """The migrating login's and the runtime login's URLs of ``settings``."""
    return {
        "migrator": settings.for_migrations().sqlalchemy_url(),
        "runtime": settings.sqlalchemy_url(),
    }


def here(url: URL, settings: DatabaseSettings) -> URL:
    """``url``'s login and password, on the database of ``settings``."""
    return url.set(database=settings.sqlalchemy_url().database)


async def test_another_databases_logins_cannot_connect_here(
    other: DatabaseSettings, sfdb_direct_settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """Before: PUBLIC had CONNECT. Now: refused at the door (42501), for both logins."""
    for who, url in logins_of(other).items():
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await asyncpg.connect(dsn(here(url, sfdb_direct_settings)), timeout=CONNECT_TIMEOUT)
        assert refused.value.sqlstate == "42501", who
        assert "permission denied for database" in str(refused.value), who
        assert not await admin.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'CONNECT')", url.username
        ), who


async def test_let_in_another_databases_logins_read_nothing_here(
    sfdb_server: URL,
    other: DatabaseSettings,
    sfdb_direct_settings: DatabaseSettings,
    world: World,
    admin: asyncpg.Connection,
) -> None:
    """A superuser grants both CONNECT here: as themselves, as any role of their own database
    and trying this database's roles, they read no table and run no function, the
    rate-limit function and the directory's included (42501)."""
    theirs = other.roles
    ours = names(world.settings)
    moves = [
        "RESET ROLE",
        *(f'SET ROLE "{role}"' for role in (theirs.owner, theirs.app, theirs.directory)),
        *(f'SET ROLE "{ours[role]}"' for role in ("owner", "app", "directory", "login")),
    ]
    attacks = [
        *(f"SELECT count(*) FROM public.{table}" for table in TABLES),
        "SELECT public.sfdb_consume_rate_limit(gen_random_uuid(), 'x', 'daily', now(), 1, 1, 1)",
        "SELECT public.sfdb_resolve_tenant('T0')",
        "CREATE TEMP TABLE tenants (id uuid)",
    ]
    logins = logins_of(other)
    granted = ", ".join(f'"{url.username}"' for url in logins.values())
    database = sfdb_direct_settings.sqlalchemy_url().database
    before = await fingerprint(admin)
    # From the server's first database: on Citus, a GRANT made in this one would be sent to
    # the worker, which does not know the other database's logins.
    superuser = await asyncpg.connect(dsn(sfdb_server), timeout=CONNECT_TIMEOUT)
    await superuser.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {granted}')
    escaped: list[str] = []
    try:
        for who, url in logins.items():
            async with attacker(here(url, sfdb_direct_settings)) as conn:
                for move in moves:
                    for attack in attacks:
                        outcome = await _attempt(conn, move, attack)
                        allowed = outcome == "42501" or (
                            move.startswith("SET ROLE") and outcome == "refused: SET ROLE"
                        )
                        if not allowed:
                            escaped.append(f"{who}, {move}, {attack}: {outcome}")
    finally:
        await superuser.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM {granted}')
        await superuser.close(timeout=CONNECT_TIMEOUT)
    assert escaped == []
    assert changes(before, await fingerprint(admin)) == []


async def _attempt(conn: asyncpg.Connection, move: str, attack: str) -> str:
    """``move`` then ``attack`` in a transaction that is rolled back: the SQLSTATE, or "ran"."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        try:
            await conn.execute(move)
        except asyncpg.PostgresError as exc:
            return "refused: SET ROLE" if exc.sqlstate == "42501" else f"{exc.sqlstate} {exc}"
        await conn.fetch(attack)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    finally:
        await transaction.rollback()
    return "ran"


async def test_create_login_refuses_another_databases_roles(
    other: DatabaseSettings,
    sfdb_direct_settings: DatabaseSettings,
    admin: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """Before: the other database's owner (NOLOGIN, a member of nothing) passed, and became a
    login with the password given here. Now: each of its roles and logins is refused, with
    the reason, and left exactly as it was."""
    theirs = other.roles
    logins = logins_of(other)
    group = "cannot log in (a group role)"
    refusals = {
        theirs.owner: group,
        theirs.app: group,
        theirs.directory: group,
        logins["migrator"].username: "is a superuser, bypasses row-level security or may "
        "create roles or databases",
        logins["runtime"].username: f"is a member of other roles ({theirs.app}, "
        f"{theirs.directory})",
    }
    for name, reason in refusals.items():
        assert name is not None
        before = await role_state(admin, name)
        refused = create_login(
            name,
            "known-to-the-attacker",
            url=url_of(sfdb_direct_settings),
            cwd=tmp_path,
            env=owner_env(sfdb_direct_settings),
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.strip().splitlines() == [
            f"sfdb create-login: create login: role {name} exists and {reason}; choose another name"
        ]
        assert await role_state(admin, name) == before, name


TAKE_THIS_DATABASES_ROLES: Final = (
    "A DOCUMENTED LIMITATION (README, 'Threat model'): on PostgreSQL 15 a login with "
    "CREATEROLE may take over any role that is not a superuser, the layer's included: give "
    "CREATEROLE only to the migrating login of a cluster that serves this application "
    "alone, or use PostgreSQL 16 or later (which asks for ADMIN OPTION on the role). Here "
    "the migrating login of another database on the cluster (CREATEROLE, as the README's "
    "setup and the test harness make it) runs GRANT <this db>_owner, <this db>_app TO "
    "CURRENT_USER, connects here through the app role's CONNECT, SET ROLE <this db>_owner, "
    "and turns row-level security off; it could also reset this runtime login's password."
)


async def test_another_databases_migrator_cannot_take_this_databases_roles(
    other: DatabaseSettings,
    sfdb_direct_settings: DatabaseSettings,
    world: World,
    admin: asyncpg.Connection,
    request: pytest.FixtureRequest,
) -> None:
    """The other database's migrating login (CREATEROLE) tries to make this database's roles
    its own, then to connect here as their member and read every tenant as the owner."""
    if await admin.fetchval("SELECT current_setting('server_version_num')::int") < 160000:
        request.applymarker(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=TAKE_THIS_DATABASES_ROLES)
        )
    ours = names(world.settings)
    migrator = logins_of(other)["migrator"]
    escaped: list[str] = []
    async with attacker(migrator) as conn:
        # Rolled back whatever happens: nothing of it may outlive the test.
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(f"ALTER ROLE \"{ours['login']}\" PASSWORD 'stolen'")
            escaped.append("altered this runtime login's password")
        except asyncpg.InsufficientPrivilegeError:
            pass
        finally:
            await transaction.rollback()
        try:
            await conn.execute(f'GRANT "{ours["owner"]}", "{ours["app"]}" TO CURRENT_USER')
            escaped.append("granted itself this database's owner and app roles")
        except asyncpg.InsufficientPrivilegeError:
            pass
    try:
        async with attacker(here(migrator, sfdb_direct_settings)) as conn:
            escaped.append("connected here")
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(
                    f'SET LOCAL ROLE "{ours["owner"]}"; '
                    "ALTER TABLE users NO FORCE ROW LEVEL SECURITY"
                )
                seen = {row[0] for row in await conn.fetch("SELECT tenant_id FROM users")}
                if {world.a.tenant, world.b.tenant} <= seen:
                    escaped.append("read every tenant's users as this database's owner")
            except asyncpg.PostgresError as exc:
                escaped.append(f"(then stopped: {exc.sqlstate} {exc})")
            finally:
                await transaction.rollback()
    except asyncpg.InsufficientPrivilegeError:
        pass
    finally:
        for role in (ours["owner"], ours["app"]):
            await admin.execute(f'REVOKE "{role}" FROM "{migrator.username}"')
    assert escaped == []


# -- 6. sfdb check -------------------------------------------------------------------------


def key_env(settings: DatabaseSettings) -> dict[str, str]:
    """``DATABASE_TENANT_KEY`` of ``settings``, as the application has it."""
    assert settings.tenant_key is not None
    return {"DATABASE_TENANT_KEY": settings.tenant_key.get_secret_value()}


async def test_check_fails_for_the_migrating_login(
    sfdb_direct_settings: DatabaseSettings, tmp_path: Path
) -> None:
    """It owns the database and may create roles: the app must never log in as it."""
    url = sfdb_direct_settings.for_migrations().sqlalchemy_url()
    done = sfdb(
        "check",
        url=url.render_as_string(hide_password=False),
        cwd=tmp_path,
        extra_env=key_env(sfdb_direct_settings),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    login = url.username
    roles = sfdb_direct_settings.roles
    assert failed_lines(done.stdout) == [
        f"FAIL  runtime login cannot create roles  {login}",
        f"FAIL  runtime login is a member of no other role  {roles.owner}",
        f"FAIL  runtime login is NOINHERIT  {login}",
        f"FAIL  runtime login owns nothing  {login}",
        f"FAIL  runtime login is not the owner  {login}",
        f"FAIL  no runtime role can create temp tables  {login}",
        f"FAIL  runtime login may become the app and directory roles  {roles.app}, "
        f"{roles.directory}",
    ]


async def test_check_fails_for_a_superuser(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings, tmp_path: Path
) -> None:
    """Before: nothing said so. Now: one line for each power it holds."""
    url = superuser_dsn(sfdb_server, sfdb_direct_settings)
    done = sfdb("check", url=url, cwd=tmp_path, extra_env=key_env(sfdb_direct_settings))
    assert done.returncode == 1, done.stdout + done.stderr
    login = sfdb_server.username or "postgres"
    assert failed_lines(done.stdout) == [
        f"FAIL  runtime login is not a superuser  {login}",
        f"FAIL  runtime login does not bypass row-level security  {login}",
        f"FAIL  runtime login cannot create roles  {login}",
        f"FAIL  runtime login cannot create databases  {login}",
        f"FAIL  runtime login is NOINHERIT  {login}",
        f"FAIL  runtime login owns nothing  {login}",
        f"FAIL  runtime login is not the owner  {login}",
        f"FAIL  no runtime role can create temp tables  {login}",
    ]


@pytest.mark.parametrize("grantee", ["login", "app", "directory", "PUBLIC"])
async def test_check_fails_for_a_login_that_may_create_temp_tables(
    sfdb_server: URL, tmp_path: Path, grantee: str
) -> None:
    """TEMPORARY granted, on a database of its own, to the runtime login, one of the roles it
    may become, or PUBLIC: one line, naming every role that now may make temp tables."""
    async with throwaway_database(sfdb_server) as settings:
        roles = names(settings)
        target = "PUBLIC" if grantee == "PUBLIC" else f'"{roles[grantee]}"'
        database = settings.sqlalchemy_url().database
        superuser = await asyncpg.connect(
            dsn(sfdb_server.set(database=database)), timeout=CONNECT_TIMEOUT
        )
        try:
            await superuser.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO {target}')
            url = settings.sqlalchemy_url().render_as_string(hide_password=False)
            done = sfdb("check", url=url, cwd=tmp_path, extra_env=key_env(settings))
            await superuser.execute(f'REVOKE TEMPORARY ON DATABASE "{database}" FROM {target}')
        finally:
            await superuser.close(timeout=CONNECT_TIMEOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    may = [roles[grantee]] if grantee != "PUBLIC" else [roles[r] for r in MAY_BECOME]
    assert failed_lines(done.stdout) == [
        f"FAIL  no runtime role can create temp tables  {', '.join(sorted(may))}"
    ]


MAY_BECOME: Final = ("login", "app", "directory")


async def test_check_fails_for_a_login_that_inherits_or_is_a_member_of_other_roles(
    sfdb_server: URL,
    other: DatabaseSettings,
    sfdb_direct_settings: DatabaseSettings,
    tmp_path: Path,
) -> None:
    """Before: a runtime login that a superuser made INHERIT, and a member of
    pg_read_all_data, pg_write_all_data and another database's roles, passed every line.
    Now: one line for the roles it should not be a member of, one for INHERIT."""
    login = sfdb_direct_settings.sqlalchemy_url().username
    extra = ["pg_read_all_data", "pg_write_all_data", other.roles.owner, other.roles.app]
    granted = ", ".join(f'"{role}"' for role in extra)
    # From the server's first database: on Citus, a GRANT made in the suite's one would be
    # sent to the worker, which does not know the other database's roles.
    superuser = await asyncpg.connect(dsn(sfdb_server), timeout=CONNECT_TIMEOUT)
    try:
        await superuser.execute(f'GRANT {granted} TO "{login}"')
        await superuser.execute(f'ALTER ROLE "{login}" INHERIT')
        url = sfdb_direct_settings.sqlalchemy_url().render_as_string(hide_password=False)
        done = sfdb("check", url=url, cwd=tmp_path, extra_env=key_env(sfdb_direct_settings))
    finally:
        await superuser.execute(f'ALTER ROLE "{login}" NOINHERIT')
        await superuser.execute(f'REVOKE {granted} FROM "{login}"')
        await superuser.close(timeout=CONNECT_TIMEOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed_lines(done.stdout) == [
        f"FAIL  runtime login is a member of no other role  {', '.join(sorted(extra))}",
        f"FAIL  runtime login is NOINHERIT  {login}",
    ]


def test_check_passes_for_the_runtime_login(
    sfdb_direct_settings: DatabaseSettings, tmp_path: Path
) -> None:
    """The login the layer runs as: every line passes."""
    url = sfdb_direct_settings.sqlalchemy_url().render_as_string(hide_password=False)
    done = sfdb("check", url=url, cwd=tmp_path, extra_env=key_env(sfdb_direct_settings))
    assert done.returncode == 0, done.stdout + done.stderr
    assert failed_lines(done.stdout) == []
    assert "pass  runtime login owns nothing" in done.stdout
