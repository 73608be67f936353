"""The ``sfdb`` command against real PostgreSQL: in this process, and as a process of its own
where only a process shows it (the entry point, the embedded server)."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import hmac
import io
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from rich.console import Console
from sqlalchemy.engine import URL

from slack_fathom_db import DatabaseSettings, cli, schema
from slack_fathom_db.claims import TenantKey, generate_tenant_key
from slack_fathom_db.cli import main
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.logins import scram_verifier
from slack_fathom_db.testing import throwaway_database
from tests.conftest import superuser_dsn
from tests.helpers import fetch_row

DEMO_TEAM = "TDEMO00001"


def sfdb(
    *args: str,
    url: str | None,
    cwd: Path,
    extra_env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``sfdb`` in a clean environment (no DATABASE_* from outside, no .env).

    In this process (a fresh process costs more than a second): ``main()`` runs on a
    thread of its own with its own event loop, while the environment, working
    directory, standard input and output are swapped for its run. The test's event
    loop is blocked meanwhile, so nothing else sees them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "SFDB_"))}
    env["COLUMNS"] = "200"
    if url is not None:
        env["DATABASE_URL"] = url
    env.update(extra_env or {})
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(_run_cli, list(args), env, cwd, stdin).result(timeout=300)
    finally:
        pool.shutdown(wait=False)  # a run past the timeout fails the test instead of hanging it


def _run_cli(
    args: list[str], env: dict[str, str], cwd: Path, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            _stdin(stdin),
            _consoles_of(stdout, stderr),
        ):
            try:
                code = cli.main(args)
            except SystemExit as exited:  # argparse: --help, bad usage
                code = exited.code if isinstance(exited.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["sfdb", *args], code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def _stdin(text: str | None) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text or "")
    try:
        yield
    finally:
        sys.stdin = saved


@contextlib.contextmanager
def _consoles_of(stdout: io.StringIO, stderr: io.StringIO) -> Iterator[None]:
    """The CLI's consoles write to the captured streams, 200 columns wide, no colour."""
    saved = cli.out, cli.err
    cli.out = Console(file=stdout, width=200, highlight=False, no_color=True)
    cli.err = Console(file=stderr, width=200, highlight=False, soft_wrap=True, no_color=True)
    try:
        yield
    finally:
        cli.out, cli.err = saved


def sfdb_process(
    *args: str, url: str | None, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m slack_fathom_db.cli`` in a process of its own, for what only a process shows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "SFDB_"))}
    env["COLUMNS"] = "200"
    if url is not None:
        env["DATABASE_URL"] = url
    env.update(extra_env or {})
    return subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "slack_fathom_db.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def url_of(settings: DatabaseSettings) -> str:
    """``DATABASE_URL`` of ``settings``: the runtime login's, once the database is migrated."""
    return settings.sqlalchemy_url().render_as_string(hide_password=False)


def owner_env(settings: DatabaseSettings) -> dict[str, str]:
    """``DATABASE_MIGRATION_URL`` of ``settings`` (its migrating login's: the owner's side),
    and its ``DATABASE_TENANT_KEY`` when it has one, as a deployment sets both."""
    url = settings.for_migrations().sqlalchemy_url()
    env = {"DATABASE_MIGRATION_URL": url.render_as_string(hide_password=False)}
    if settings.tenant_key is not None:
        env["DATABASE_TENANT_KEY"] = settings.tenant_key.get_secret_value()
    return env


async def admin_execute(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass(frozen=True)
class CliDatabase:
    """A database ``sfdb migrate`` is to create, as README sets one up.

    Its migrating login may create roles and databases and is no superuser; the
    runtime login is made by ``sfdb create-login``.
    """

    name: str
    migration_url: URL
    runtime_url: URL
    tenant_key: str
    """``DATABASE_TENANT_KEY``: ``sfdb migrate`` installs it, units of work sign with it."""

    @property
    def env(self) -> dict[str, str]:
        """``DATABASE_MIGRATION_URL`` (the owner's side) and ``DATABASE_TENANT_KEY``."""
        return {
            "DATABASE_MIGRATION_URL": self.migration_url.render_as_string(False),
            "DATABASE_TENANT_KEY": self.tenant_key,
        }

    @property
    def url(self) -> str:
        """``DATABASE_URL``: the runtime login's."""
        return self.runtime_url.render_as_string(hide_password=False)

    @property
    def runtime(self) -> str:
        """The runtime login's name."""
        return self.runtime_url.username or ""

    @property
    def runtime_password(self) -> str:
        """The runtime login's password (sent to ``sfdb create-login`` on stdin)."""
        return self.runtime_url.password or ""


@pytest_asyncio.fixture(scope="module")
async def cli_db(sfdb_server: URL) -> AsyncIterator[CliDatabase]:
    """A database that does not exist yet, and its migrating login; all dropped after."""
    name = f"sfdb_cli_{secrets.token_hex(6)}"
    migrator, password = f"{name}_migrator", secrets.token_urlsafe(16)
    await admin_execute(
        sfdb_server, f"CREATE ROLE \"{migrator}\" LOGIN CREATEROLE CREATEDB PASSWORD '{password}'"
    )
    database = sfdb_server.set(database=name)
    created = CliDatabase(
        name=name,
        migration_url=database.set(username=migrator, password=password),
        runtime_url=database.set(username=f"{name}_runtime", password=secrets.token_urlsafe(16)),
        tenant_key=generate_tenant_key("cli"),
    )
    try:
        yield created
    finally:
        await admin_execute(sfdb_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        roles = DatabaseSettings(url=created.url, _env_file=None).roles
        for role in (created.runtime, roles.app, roles.directory, roles.owner, migrator):
            await admin_execute(sfdb_server, f'DROP ROLE IF EXISTS "{role}"')


def create_login(
    name: str, password: str, *, url: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``sfdb create-login NAME --password-stdin``, the password on standard input only."""
    return sfdb(
        "create-login", name, "--password-stdin", url=url, cwd=cwd, extra_env=env, stdin=password
    )


async def ready(cli_db: CliDatabase, sfdb_server: URL, cwd: Path) -> None:
    """``sfdb migrate``, then ``sfdb create-login`` unless the runtime login exists already."""
    migrated = sfdb("migrate", url=cli_db.url, cwd=cwd, extra_env=cli_db.env)
    assert migrated.returncode == 0, migrated.stderr
    admin = await asyncpg.connect(sfdb_server.set(drivername="postgresql").render_as_string(False))
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", cli_db.runtime)
    finally:
        await admin.close()
    if not exists:
        login = create_login(
            cli_db.runtime, cli_db.runtime_password, url=cli_db.url, cwd=cwd, env=cli_db.env
        )
        assert login.returncode == 0, login.stderr


@pytest.mark.parametrize(
    "command",
    [
        "migrate",
        "downgrade",
        "current",
        "check",
        "info",
        "demo",
        "stats",
        "audit",
        "create-login",
        "distribute",
        "purge-rate-limits",
        "tenant",
        "generate-tenant-key",
        "rotate-tenant-key",
    ],
)
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: sfdb {command}" in capsys.readouterr().out


def test_help_as_a_subprocess(tmp_path: Path) -> None:
    result = sfdb_process("--help", url=None, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "migrate" in result.stdout
    assert "demo" in result.stdout


def test_bad_usage_exits_2_with_one_line(tmp_path: Path) -> None:
    result = sfdb("demo", "--meetings", "zero", url=None, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = sfdb("current", url="postgresql://nobody:pw@127.0.0.1:9/none", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "pw@" not in result.stderr


def test_migrate_creates_and_upgrades_then_current(cli_db: CliDatabase, tmp_path: Path) -> None:
    first = sfdb("migrate", url=cli_db.url, cwd=tmp_path, extra_env=cli_db.env)
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout
    assert f"is at revision {schema.head()}" in first.stdout
    assert "installed tenant key cli" in first.stdout.splitlines()
    # DATABASE_MIGRATION_URL and DATABASE_TENANT_KEY are set: no word of falling back, nor
    # of a missing key; and the key's secret is never shown.
    assert first.stderr == ""
    assert cli_db.tenant_key.split(":")[1] not in first.stdout
    again = sfdb("migrate", url=cli_db.url, cwd=tmp_path, extra_env=cli_db.env)
    assert again.returncode == 0, again.stderr
    assert "created database" not in again.stdout
    assert "installed tenant key" not in again.stdout  # held already: nothing new
    current = sfdb("current", url=cli_db.url, cwd=tmp_path, extra_env=cli_db.env)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == schema.head()


async def tenant_keys_held(sfdb_server: URL, settings: DatabaseSettings) -> list[str]:
    """The ids of the tenant keys the database of ``settings`` holds, read as the superuser."""
    conn = await asyncpg.connect(superuser_dsn(sfdb_server, settings))
    try:
        return [r["key_id"] for r in await conn.fetch("SELECT key_id FROM tenant_claim_keys")]
    finally:
        await conn.close()


def tenant_key_env(settings: DatabaseSettings, key: str | None = None) -> dict[str, str]:
    """``owner_env`` and ``DATABASE_TENANT_KEY``: ``key``, or the one of ``settings``."""
    if key is None:
        assert settings.tenant_key is not None
        key = settings.tenant_key.get_secret_value()
    return owner_env(settings) | {"DATABASE_TENANT_KEY": key}


async def test_migrate_without_a_tenant_key_warns_and_installs_it_once_it_is_set(
    sfdb_server: URL, tmp_path: Path
) -> None:
    """Without DATABASE_TENANT_KEY the schema is migrated all the same, stderr says units
    of work need a key, and the database holds none; run again with the key set, it is
    installed, and a third run installs nothing new."""
    async with throwaway_database(sfdb_server, migrate=False) as settings:
        url = url_of(settings)
        keyless = {"DATABASE_MIGRATION_URL": owner_env(settings)["DATABASE_MIGRATION_URL"]}
        bare = sfdb("migrate", url=url, cwd=tmp_path, extra_env=keyless)
        assert bare.returncode == 0, bare.stderr
        assert f"is at revision {schema.head()}" in bare.stdout
        assert "installed tenant key" not in bare.stdout
        assert bare.stderr.startswith("DATABASE_TENANT_KEY is not set: no tenant key was installed")
        assert await tenant_keys_held(sfdb_server, settings) == []

        keyed = sfdb("migrate", url=url, cwd=tmp_path, extra_env=tenant_key_env(settings))
        assert keyed.returncode == 0, keyed.stderr
        assert keyed.stderr == ""
        assert "installed tenant key test" in keyed.stdout.splitlines()
        assert await tenant_keys_held(sfdb_server, settings) == ["test"]

        again = sfdb("migrate", url=url, cwd=tmp_path, extra_env=tenant_key_env(settings))
        assert again.returncode == 0, again.stderr
        assert "installed tenant key" not in again.stdout
        assert await tenant_keys_held(sfdb_server, settings) == ["test"]


def test_generate_tenant_key_prints_an_id_and_32_random_bytes(tmp_path: Path) -> None:
    """One line, ``<id>:<base64 of 32 bytes>``, that DATABASE_TENANT_KEY takes; a new key each
    time; a random id without ``--id``; an id of the wrong shape is a usage error."""
    named = sfdb("generate-tenant-key", "--id", "prod-2026", url=None, cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    (line,) = named.stdout.split()
    key_id, encoded = line.split(":")
    assert key_id == "prod-2026"
    assert len(base64.urlsafe_b64decode(encoded)) == 32
    assert TenantKey.parse(line).key_id == "prod-2026"
    other = sfdb("generate-tenant-key", "--id", "prod-2026", url=None, cwd=tmp_path)
    assert other.stdout.split() != [line]
    unnamed = sfdb("generate-tenant-key", url=None, cwd=tmp_path)
    assert unnamed.returncode == 0, unnamed.stderr
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", TenantKey.parse(unnamed.stdout).key_id)
    bad = sfdb("generate-tenant-key", "--id", "no spaces", url=None, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stdout == ""


async def test_rotate_tenant_key_prints_a_new_key_and_finish_keeps_only_the_configured_one(
    sfdb_server: URL, tmp_path: Path
) -> None:
    """``sfdb rotate-tenant-key`` adds a key and prints it alone on stdout; a second rotation
    is refused until the first is finished; ``--finish`` refuses (and removes nothing) when
    DATABASE_TENANT_KEY is a key the database does not hold, and with the new key removes
    the old one."""
    async with throwaway_database(sfdb_server) as settings:
        url = url_of(settings)
        assert settings.tenant_key is not None
        current = settings.tenant_key.get_secret_value()

        rotated = sfdb(
            "rotate-tenant-key", url=url, cwd=tmp_path, extra_env=tenant_key_env(settings)
        )
        assert rotated.returncode == 0, rotated.stderr
        (new,) = rotated.stdout.split()
        new_id = TenantKey.parse(new).key_id
        assert new_id != "test"
        assert "sfdb rotate-tenant-key --finish" in rotated.stderr
        assert current.split(":")[1] not in rotated.stdout + rotated.stderr
        assert sorted(await tenant_keys_held(sfdb_server, settings)) == sorted(["test", new_id])

        again = sfdb("rotate-tenant-key", url=url, cwd=tmp_path, extra_env=tenant_key_env(settings))
        assert again.returncode == 1
        assert again.stdout == ""
        assert "finish it first (sfdb rotate-tenant-key --finish)" in again.stderr
        assert "Traceback" not in again.stderr
        assert sorted(await tenant_keys_held(sfdb_server, settings)) == sorted(["test", new_id])

        stranger = generate_tenant_key("stranger")
        refused = sfdb(
            "rotate-tenant-key",
            "--finish",
            url=url,
            cwd=tmp_path,
            extra_env=tenant_key_env(settings, stranger),
        )
        assert refused.returncode == 1
        assert "does not hold the key of DATABASE_TENANT_KEY (stranger); nothing was removed" in (
            refused.stderr
        )
        assert stranger.split(":")[1] not in refused.stdout + refused.stderr
        assert sorted(await tenant_keys_held(sfdb_server, settings)) == sorted(["test", new_id])

        finished = sfdb(
            "rotate-tenant-key",
            "--finish",
            url=url,
            cwd=tmp_path,
            extra_env=tenant_key_env(settings, new),
        )
        assert finished.returncode == 0, finished.stderr
        assert finished.stdout == ""
        assert "tenant keys removed: test;" in finished.stderr
        assert await tenant_keys_held(sfdb_server, settings) == [new_id]


CHECKS = 27
"""Lines of ``sfdb check``: connection, version, ten on the runtime login, six on each of the
app and directory roles, row-level security, migrations, the tenant key."""


async def test_check_passes_on_a_migrated_database(
    cli_db: CliDatabase, sfdb_server: URL, tmp_path: Path
) -> None:
    await ready(cli_db, sfdb_server, tmp_path)
    result = sfdb("check", url=cli_db.url, cwd=tmp_path, extra_env=cli_db.env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == CHECKS, result.stdout
    assert all(line.startswith("pass") for line in lines), result.stdout
    assert f"pass  runtime login owns nothing  {cli_db.runtime}" in lines
    assert any(line.startswith("pass  the database accepts DATABASE_TENANT_KEY") for line in lines)


@pytest.mark.parametrize("key", ["cli", "other"], ids=["same id, another key", "unknown id"])
async def test_check_fails_when_the_database_does_not_accept_the_tenant_key(
    cli_db: CliDatabase, sfdb_server: URL, tmp_path: Path, key: str
) -> None:
    """``sfdb check`` signs a claim with ``DATABASE_TENANT_KEY`` and asks the database: a key
    it does not hold fails that line, with the database's reason and never the key."""
    await ready(cli_db, sfdb_server, tmp_path)
    wrong = generate_tenant_key(key)
    result = sfdb(
        "check",
        url=cli_db.url,
        cwd=tmp_path,
        extra_env={**cli_db.env, "DATABASE_TENANT_KEY": wrong},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "DATABASE_TENANT_KEY" in line]
    assert line.startswith("FAIL"), line
    reason = "signature does not verify" if key == "cli" else "holds no tenant key other"
    assert reason in line, line
    assert wrong.split(":", 1)[1] not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["app", "directory"])
async def test_check_fails_when_a_layer_role_holds_a_power_or_another_role(
    sfdb_server: URL, tmp_path: Path, kind: str
) -> None:
    """Before: only SUPERUSER and BYPASSRLS of the app role were checked. Now: one line for
    each power and for membership of another role, of the app and the directory role."""
    async with throwaway_database(sfdb_server) as settings:
        role = getattr(settings.roles, kind)
        await admin_execute(
            sfdb_server, f'ALTER ROLE "{role}" SUPERUSER BYPASSRLS CREATEROLE CREATEDB'
        )
        await admin_execute(sfdb_server, f'GRANT pg_write_all_data TO "{role}"')
        result = sfdb("check", url=url_of(settings), cwd=tmp_path, extra_env=owner_env(settings))
    assert result.returncode == 1, result.stdout
    assert failed_lines(result.stdout) == [
        # A superuser may create temp tables, and the runtime login may become it.
        f"FAIL  no runtime role can create temp tables  {role}",
        f"FAIL  {kind} role is not a superuser  {role}",
        f"FAIL  {kind} role does not bypass row-level security  {role}",
        f"FAIL  {kind} role cannot create roles  {role}",
        f"FAIL  {kind} role cannot create databases  {role}",
        f"FAIL  {kind} role is a member of no other role  pg_write_all_data",
    ]


def failed_lines(stdout: str) -> list[str]:
    """The lines of ``sfdb check`` that report a problem."""
    return [line for line in stdout.splitlines() if line.startswith("FAIL")]


async def test_check_fails_when_database_url_is_the_migrating_login(
    sfdb_server: URL, tmp_path: Path
) -> None:
    # The login that migrates owns the database, may create roles and is a member of the
    # owner: the application must never run as it.
    async with throwaway_database(sfdb_server) as settings:
        migrator = settings.for_migrations()
        result = sfdb("check", url=url_of(migrator), cwd=tmp_path, extra_env=owner_env(settings))
    name = migrator.sqlalchemy_url().username
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == CHECKS, result.stdout
    assert failed_lines(result.stdout) == [
        f"FAIL  runtime login cannot create roles  {name}",
        f"FAIL  runtime login is a member of no other role  {settings.roles.owner}",
        f"FAIL  runtime login is NOINHERIT  {name}",
        f"FAIL  runtime login owns nothing  {name}",
        f"FAIL  runtime login is not the owner  {name}",
        f"FAIL  no runtime role can create temp tables  {name}",
        # It was granted the app role when it migrated, never the directory role.
        f"FAIL  runtime login may become the app and directory roles  "
        f"{settings.roles.app}, {settings.roles.directory}",
    ]


async def test_check_fails_on_an_empty_database(sfdb_server: URL, tmp_path: Path) -> None:
    async with throwaway_database(sfdb_server, migrate=False) as settings:
        result = sfdb("check", url=url_of(settings), cwd=tmp_path)
    assert result.returncode == 1
    assert f"FAIL  migrations at head  at None, head {schema.head()}" in result.stdout


async def test_demo_then_stats_and_audit(
    cli_db: CliDatabase, sfdb_server: URL, tmp_path: Path
) -> None:
    await ready(cli_db, sfdb_server, tmp_path)
    env = cli_db.env
    demo = sfdb("demo", "--meetings", "50", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert demo.returncode == 0, demo.stderr
    assert "ingested 50 meetings: 50 completed" in demo.stdout
    assert "rate_limit.denied" in demo.stdout

    stats = sfdb("stats", DEMO_TEAM, url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert stats.returncode == 0, stats.stderr
    rows = {
        line.split("│")[1].strip(): int(line.split("│")[2])
        for line in stats.stdout.splitlines()
        if line.count("│") == 3 and line.split("│")[2].strip().isdigit()
    }
    assert rows["users"] == 3
    assert rows["crm connections"] == 1
    assert rows["account mappings"] == 3
    assert rows["meetings total"] >= 50  # another test of this module may have run the demo

    audit = sfdb(
        "audit", DEMO_TEAM, "--failures", "--days", "1", url=cli_db.url, cwd=tmp_path, extra_env=env
    )
    assert audit.returncode == 0, audit.stderr
    assert "CRM sync failed" in audit.stdout
    assert "rate_limit.denied" in audit.stdout
    assert "note sent to the CRM" not in audit.stdout  # successes are not failures

    # The demo's audit chain verifies, alone and among all (as the owner).
    verified = sfdb("audit", "verify", DEMO_TEAM, url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert verified.returncode == 0, verified.stderr
    assert "1 of 1 audit chains" in verified.stdout
    assert f"head {DEMO_TEAM} " in verified.stdout
    every = sfdb("audit", "verify", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert every.returncode == 0, every.stderr
    assert "BROKEN" not in every.stdout
    narrow = sfdb(  # what a file or a pipe receives: lines never cut, whatever the width
        "audit", "verify", url=cli_db.url, cwd=tmp_path, extra_env={**env, "COLUMNS": "40"}
    )
    assert narrow.stdout == every.stdout
    heads = tmp_path / "heads.txt"
    heads.write_text(every.stdout)
    kept = sfdb(
        "audit", "verify", "--kept", str(heads), url=cli_db.url, cwd=tmp_path, extra_env=env
    )
    assert (kept.returncode, "LOST" in kept.stdout) == (0, False), kept.stderr
    one = sfdb(  # as the usage line has it: the workspace, then the kept heads
        "audit",
        "verify",
        DEMO_TEAM,
        "--kept",
        str(heads),
        url=cli_db.url,
        cwd=tmp_path,
        extra_env=env,
    )
    assert (one.returncode, "1 of 1 audit chains" in one.stdout) == (0, True), one.stderr
    heads.write_text("nothing kept here\n")
    unreadable = sfdb(
        "audit", "verify", "--kept", str(heads), url=cli_db.url, cwd=tmp_path, extra_env=env
    )
    assert unreadable.returncode == 2
    missing = sfdb("audit", "verify", "TNOSUCHTEAM", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "sfdb audit: no workspace TNOSUCHTEAM in this database",
    )
    both = sfdb("audit", DEMO_TEAM, DEMO_TEAM, url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert both.returncode == 2
    listing = sfdb("audit", "verify", "--days", "3", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert listing.returncode == 2
    # A superuser edits an event past the triggers: verify names it and exits 1.
    database = sfdb_server.set(drivername="postgresql", database=cli_db.name)
    superuser = await asyncpg.connect(database.render_as_string(False))
    try:
        async with superuser.transaction():
            await superuser.execute("SET LOCAL session_replication_role = replica")
            edited = await superuser.fetchval(
                "UPDATE audit_logs SET event_type = 'tampered' WHERE id = (SELECT c.event_id "
                "FROM audit_chain c JOIN tenants t ON t.id = c.tenant_id "
                "WHERE t.slack_team_id = $1 ORDER BY c.chain_seq LIMIT 1) RETURNING id",
                DEMO_TEAM,
            )
    finally:
        await superuser.close()
    tampered = sfdb("audit", "verify", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert tampered.returncode == 1
    assert f"BROKEN {DEMO_TEAM}: place 1 (event {edited}): its event is not" in tampered.stdout

    unknown = sfdb("stats", "TNOSUCHTEAM", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "sfdb stats: no live workspace with slack_team_id TNOSUCHTEAM"


async def test_downgrade_to_base_and_back(
    cli_db: CliDatabase, sfdb_server: URL, tmp_path: Path
) -> None:
    # Runs last of the tests on cli_db: the demo data goes with the tables.
    await ready(cli_db, sfdb_server, tmp_path)
    env = cli_db.env
    down = sfdb("downgrade", "base", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert down.returncode == 0, down.stderr
    assert "is at revision base" in down.stdout
    current = sfdb("current", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert current.stdout.startswith("base")
    up = sfdb("migrate", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert up.returncode == 0, up.stderr
    # The tenant keys went with their table: the key is installed anew.
    assert "installed tenant key cli" in up.stdout.splitlines()
    # The downgrade dropped the layer's roles, and with them the runtime login's
    # memberships: as README says, create-login again (it keeps the login, sets its
    # password and grants the new roles).
    again = create_login(
        cli_db.runtime, cli_db.runtime_password, url=cli_db.url, cwd=tmp_path, env=env
    )
    assert again.returncode == 0, again.stderr
    check = sfdb("check", url=cli_db.url, cwd=tmp_path, extra_env=env)
    assert check.returncode == 0, check.stdout + check.stderr


ROLE_STATE = """
SELECT a.rolpassword, a.rolcanlogin, a.rolinherit, a.rolsuper, a.rolbypassrls,
       a.rolcreaterole, a.rolcreatedb,
       ARRAY(SELECT roleid::regrole::text FROM pg_auth_members WHERE member = a.oid
             ORDER BY 1) AS member_of,
       has_database_privilege(a.oid, current_database(), 'CONNECT') AS may_connect,
       ARRAY(SELECT setdatabase || ': ' || setconfig::text FROM pg_db_role_setting
             WHERE setrole = a.oid ORDER BY 1) AS defaults
FROM pg_authid a WHERE a.rolname = $1
"""


async def role_state(admin: asyncpg.Connection, name: str) -> dict[str, object]:
    """What ``sfdb create-login`` may change of the role ``name``, read as a superuser."""
    return dict(await fetch_row(admin, ROLE_STATE, name))


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether ``verifier`` (``SCRAM-SHA-256$<i>:<salt>$<stored>:<server>``) is of ``password``."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match, "not a SCRAM-SHA-256 verifier"
    iterations, salt = int(match.group(1)), base64.b64decode(match.group(2))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return base64.b64encode(hashlib.sha256(client_key).digest()).decode() == match.group(3)


async def test_create_login_takes_the_password_on_stdin_and_makes_a_login_that_holds_nothing(
    sfdb_server: URL, tmp_path: Path
) -> None:
    async with throwaway_database(sfdb_server) as settings:
        roles, env = settings.roles, owner_env(settings)
        name = f"{settings.sqlalchemy_url().database}_cli"  # dropped below
        first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        login_url = settings.sqlalchemy_url().set(username=name, password=first)
        admin = await asyncpg.connect(superuser_dsn(sfdb_server, settings))
        try:
            created = create_login(name, first, url=url_of(settings), cwd=tmp_path, env=env)
            assert created.returncode == 0, created.stderr
            assert created.stdout.strip() == (
                f"created login {name}: a member of {roles.app} and {roles.directory}"
            )
            assert first not in created.stdout + created.stderr
            stored = await admin.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", name
            )
            assert isinstance(stored, str)
            assert first not in stored  # a verifier reached the server, not the password
            assert _scram_matches(stored, first)
            login = await fetch_row(
                admin,
                "SELECT rolcanlogin, rolinherit, rolsuper, rolbypassrls, rolcreaterole, "
                "rolcreatedb FROM pg_roles WHERE rolname = $1",
                name,
            )
            assert dict(login) == {
                "rolcanlogin": True,
                "rolinherit": False,
                "rolsuper": False,
                "rolbypassrls": False,
                "rolcreaterole": False,
                "rolcreatedb": False,
            }
            member_of = await admin.fetch(
                "SELECT roleid::regrole::text AS role FROM pg_auth_members "
                "WHERE member = $1::regrole",
                name,
            )
            assert {r["role"] for r in member_of} == {roles.app, roles.directory}

            # The login works, holds nothing of its own, and may become the layer's roles.
            conn = await asyncpg.connect(
                login_url.set(drivername="postgresql").render_as_string(hide_password=False)
            )
            try:
                assert await conn.fetchval("SELECT current_user") == name
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval("SELECT count(*) FROM public.tenants")
                async with conn.transaction():
                    await conn.execute(f'SET LOCAL ROLE "{roles.directory}"')
                    assert await conn.fetchval("SELECT sfdb_resolve_tenant('TNOSUCHTEAM')") is None
            finally:
                await conn.close()
            check = sfdb(
                "check",
                url=login_url.render_as_string(hide_password=False),
                cwd=tmp_path,
                extra_env=env,
            )
            assert check.returncode == 0, check.stdout + check.stderr

            # The login gives itself defaults; run again, create-login keeps the login, sets
            # the new password and drops those defaults.
            conn = await asyncpg.connect(
                login_url.set(drivername="postgresql").render_as_string(hide_password=False)
            )
            try:
                await conn.execute("ALTER ROLE CURRENT_USER SET statement_timeout = '1ms'")
                await conn.execute(
                    f'ALTER ROLE CURRENT_USER IN DATABASE "{login_url.database}" '
                    "SET search_path = pg_temp"
                )
            finally:
                await conn.close()
            assert (await role_state(admin, name))["defaults"]
            again = create_login(name, second, url=url_of(settings), cwd=tmp_path, env=env)
            assert again.returncode == 0, again.stderr
            assert again.stdout.startswith(f"set a new password for login {name}:")
            assert second not in again.stdout + again.stderr
            renewed = await admin.fetchval(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1", name
            )
            assert isinstance(renewed, str)
            assert _scram_matches(renewed, second)
            assert not _scram_matches(renewed, first)
            assert (await role_state(admin, name))["defaults"] == []
        finally:
            await admin.close()
    await admin_execute(sfdb_server, f'DROP ROLE IF EXISTS "{name}"')


async def test_create_login_refuses_the_name_of_a_superuser(
    sfdb_server: URL, tmp_path: Path
) -> None:
    async with throwaway_database(sfdb_server) as settings:
        admin = await asyncpg.connect(superuser_dsn(sfdb_server, settings))
        try:
            superuser = await admin.fetchval("SELECT current_user")
            read = "SELECT rolsuper, rolpassword FROM pg_authid WHERE rolname = $1"
            before = await fetch_row(admin, read, superuser)
            memberships = (
                "SELECT array_agg(roleid::regrole::text ORDER BY roleid) "
                "FROM pg_auth_members WHERE member = $1::regrole"
            )
            member_of = await admin.fetchval(memberships, superuser)
            refused = create_login(
                superuser,
                secrets.token_urlsafe(24),
                url=url_of(settings),
                cwd=tmp_path,
                env=owner_env(settings),
            )
            assert refused.returncode == 1
            assert refused.stdout == ""
            assert refused.stderr.strip().splitlines() == [
                f"sfdb create-login: create login: role {superuser} exists and is a superuser, "
                "bypasses row-level security or may create roles or databases; "
                "choose another name"
            ]
            assert await fetch_row(admin, read, superuser) == before
            assert await admin.fetchval(memberships, superuser) == member_of
        finally:
            await admin.close()


UNFIT_LOGINS = {
    "owns a schema in another database": (
        'CREATE SCHEMA "{name}_thing" AUTHORIZATION "{name}"',
        'DROP SCHEMA IF EXISTS "{name}_thing"',
        "owns objects in database {server_database}",
    ),
    "owns a database": (
        'CREATE DATABASE "{name}_thing" OWNER "{name}"',
        'DROP DATABASE IF EXISTS "{name}_thing"',
        "owns database {name}_thing",
    ),
    "has a member": (
        'CREATE ROLE "{name}_member" IN ROLE "{name}"',
        'DROP ROLE IF EXISTS "{name}_member"',
        "has members ({name}_member)",
    ),
    "holds a privilege in another database": (
        'GRANT CREATE ON SCHEMA public TO "{name}"',
        'REVOKE ALL ON SCHEMA public FROM "{name}"',
        "holds privileges on objects in database {server_database}",
    ),
}
"""How an existing login is unfit, made and undone as the superuser in the server's first
database (not the one of the login), and the reason create-login gives."""


@pytest.mark.parametrize("case", UNFIT_LOGINS.values(), ids=UNFIT_LOGINS.keys())
async def test_create_login_refuses_a_login_that_owns_or_holds_something_on_the_cluster(
    sfdb_server: URL,
    sfdb_direct_settings: DatabaseSettings,
    admin: asyncpg.Connection,
    tmp_path: Path,
    case: tuple[str, str, str],
) -> None:
    """Before: a login, a member of nothing, that owned a schema of another database or a
    database, had members (who would inherit the app and directory roles) or held a
    privilege was taken over with a new password. Now: refused, naming why, unchanged."""
    name = f"sfdb_unfit_{secrets.token_hex(4)}"
    make, undo, reason = (
        part.format(name=name, server_database=sfdb_server.database) for part in case
    )
    await admin_execute(sfdb_server, f'CREATE ROLE "{name}" LOGIN NOINHERIT')
    try:
        await admin_execute(sfdb_server, make)
        before = await role_state(admin, name)
        refused = create_login(
            name,
            secrets.token_urlsafe(24),
            url=url_of(sfdb_direct_settings),
            cwd=tmp_path,
            env=owner_env(sfdb_direct_settings),
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [
            f"sfdb create-login: create login: role {name} exists and {reason}; choose another name"
        ]
        assert await role_state(admin, name) == before
    finally:
        await admin_execute(sfdb_server, undo)
        await admin_execute(sfdb_server, f'DROP ROLE IF EXISTS "{name}"')


NOT_ASCII = {
    "full-width letters": "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44",
    "no-break space": "correct\u00a0horse",
    "soft hyphen": "correct\u00adhorse",
    "accented letters": "p\u00e4ssw\u00f6rd-2026",
}
"""Passwords PostgreSQL would normalise (SASLprep) before hashing: the soft hyphen is
dropped, the others become ASCII letters or a space."""


@pytest.mark.parametrize("password", list(NOT_ASCII.values()), ids=list(NOT_ASCII))
async def test_create_login_refuses_a_password_that_is_not_ascii(
    sfdb_direct_settings: DatabaseSettings,
    admin: asyncpg.Connection,
    tmp_path: Path,
    password: str,
) -> None:
    """Before: hashed as it was, giving a login that could never sign in. Now: refused, the
    password never repeated, no role made."""
    name = f"sfdb_unicode_{secrets.token_hex(4)}"
    refused = create_login(
        name,
        password,
        url=url_of(sfdb_direct_settings),
        cwd=tmp_path,
        env=owner_env(sfdb_direct_settings),
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "sfdb create-login: password: must be ASCII (PostgreSQL normalises other characters "
        "before hashing, so the login could never sign in); choose an ASCII password"
    ]
    assert not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
    with pytest.raises(ValidationError) as bad:
        scram_verifier(password)
    assert password not in str(bad.value)


def test_scram_verifier_takes_every_printable_ascii_password() -> None:
    password = "".join(chr(c) for c in range(0x20, 0x7F))
    assert _scram_matches(scram_verifier(password), password)


def test_create_login_takes_no_password_on_the_command_line(tmp_path: Path) -> None:
    for argv in (
        ["create-login", "sfdb_runtime"],
        ["create-login", "sfdb_runtime", "--password", "pw"],
    ):
        refused = sfdb(*argv, url="postgresql://nobody@127.0.0.1:9/none", cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "pw" not in refused.stdout


def test_demo_without_database_url_runs_on_the_embedded_server(tmp_path: Path) -> None:
    data = tmp_path / "embedded"
    result = sfdb(
        "demo",
        "--meetings",
        "5",
        url=None,
        cwd=tmp_path,
        extra_env={"SFDB_EMBEDDED_DIR": str(data)},
    )
    assert result.returncode == 0, result.stderr
    assert f"using the embedded PostgreSQL in {data}" in result.stderr.replace("\n", "")
    assert "ingested 5 meetings: 5 completed" in result.stdout
    assert (data / "PG_VERSION").exists()
    # And again on the same data (make demo twice): the runtime login exists by now, and
    # the embedded migrating login, no superuser, sets its password anew.
    again = sfdb(
        "demo",
        "--meetings",
        "1",
        url=None,
        cwd=tmp_path,
        extra_env={"SFDB_EMBEDDED_DIR": str(data)},
    )
    assert again.returncode == 0, again.stderr
    assert "ingested 1 meetings: 1 completed" in again.stdout
