"""The ``sfdb`` command, run as a subprocess against real PostgreSQL."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import DatabaseSettings, schema
from slack_fathom_db.cli import main
from slack_fathom_db.testing import throwaway_database

DEMO_TEAM = "TDEMO00001"


def sfdb(
    *args: str, url: str | None, cwd: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``sfdb`` in a clean environment (no DATABASE_* from outside, no .env)."""
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
    return settings.sqlalchemy_url().render_as_string(hide_password=False)


async def admin_execute(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="module")
async def demo_url(sfdb_server: URL) -> AsyncIterator[str]:
    """A database name that does not exist yet; ``sfdb migrate`` creates it."""
    name = f"sfdb_cli_{secrets.token_hex(6)}"
    yield sfdb_server.set(database=name).render_as_string(hide_password=False)
    await admin_execute(sfdb_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "command", ["migrate", "downgrade", "current", "check", "info", "demo", "stats", "audit"]
)
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: sfdb {command}" in capsys.readouterr().out


def test_help_as_a_subprocess(tmp_path: Path) -> None:
    result = sfdb("--help", url=None, cwd=tmp_path)
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


def test_migrate_creates_and_upgrades_then_current(demo_url: str, tmp_path: Path) -> None:
    first = sfdb("migrate", url=demo_url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout
    assert f"is at revision {schema.head()}" in first.stdout
    again = sfdb("migrate", url=demo_url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "created database" not in again.stdout
    current = sfdb("current", url=demo_url, cwd=tmp_path)
    assert current.returncode == 0, current.stderr
    assert current.stdout.strip() == schema.head()


def test_check_passes_on_a_migrated_database(demo_url: str, tmp_path: Path) -> None:
    assert sfdb("migrate", url=demo_url, cwd=tmp_path).returncode == 0
    result = sfdb("check", url=demo_url, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6
    assert all(line.startswith("pass") for line in lines), result.stdout


async def test_check_fails_when_the_app_role_bypasses_rls(sfdb_server: URL, tmp_path: Path) -> None:
    role = f"sfdb_chk_{secrets.token_hex(4)}"
    try:
        async with throwaway_database(sfdb_server, app_role=role) as settings:
            await admin_execute(sfdb_server, f'ALTER ROLE "{role}" BYPASSRLS')
            result = sfdb(
                "check", url=url_of(settings), cwd=tmp_path, extra_env={"DATABASE_APP_ROLE": role}
            )
    finally:
        await admin_execute(sfdb_server, f'DROP ROLE IF EXISTS "{role}"')
    assert result.returncode == 1, result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [f"FAIL  app role is NOSUPERUSER NOBYPASSRLS  {role}"]


async def test_check_fails_on_an_empty_database(sfdb_server: URL, tmp_path: Path) -> None:
    async with throwaway_database(sfdb_server, migrate=False) as settings:
        result = sfdb("check", url=url_of(settings), cwd=tmp_path)
    assert result.returncode == 1
    assert f"FAIL  migrations at head  at None, head {schema.head()}" in result.stdout


def test_demo_then_stats_and_audit(demo_url: str, tmp_path: Path) -> None:
    demo = sfdb("demo", "--meetings", "50", url=demo_url, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "ingested 50 meetings: 50 completed" in demo.stdout
    assert "rate_limit.denied" in demo.stdout

    stats = sfdb("stats", DEMO_TEAM, url=demo_url, cwd=tmp_path)
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

    audit = sfdb("audit", DEMO_TEAM, "--failures", "--days", "1", url=demo_url, cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    assert "CRM sync failed" in audit.stdout
    assert "rate_limit.denied" in audit.stdout
    assert "note sent to the CRM" not in audit.stdout  # successes are not failures

    unknown = sfdb("stats", "TNOSUCHTEAM", url=demo_url, cwd=tmp_path)
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "sfdb stats: no live workspace with slack_team_id TNOSUCHTEAM"


def test_downgrade_to_base_and_back(demo_url: str, tmp_path: Path) -> None:
    # Runs last in this module: the demo data goes with the tables.
    assert sfdb("migrate", url=demo_url, cwd=tmp_path).returncode == 0
    down = sfdb("downgrade", "base", url=demo_url, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "is at revision base" in down.stdout
    assert sfdb("current", url=demo_url, cwd=tmp_path).stdout.startswith("base")
    up = sfdb("migrate", url=demo_url, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert sfdb("check", url=demo_url, cwd=tmp_path).returncode == 0


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
