"""Real PostgreSQL for tests: a pytest plugin and the functions behind it.

Load it with ``pytest -p slack_fathom_db.testing`` (or ``pytest_plugins`` in a
``conftest.py``). A server is found in this order:

1. ``SFDB_TEST_DATABASE_URL`` — an explicit server (any database on it; the
   role must be allowed to create databases and roles);
2. a throwaway cluster started from local PostgreSQL binaries (``initdb``,
   ``pg_ctl``; run as the ``postgres`` system user when the tests run as root);
3. a Docker container through testcontainers, when a Docker daemon answers;
4. the embedded server of the ``pgserver`` package, when it is installed.

If none can be had the run fails with a message that says how to get one; it
never skips. Each run creates a fresh database, migrates it with ``alembic
upgrade head`` and drops it at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import schema
from slack_fathom_db.database import Database
from slack_fathom_db.settings import DatabaseSettings, normalize_url

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

__all__ = [
    "NoPostgreSQL",
    "find_server",
    "local_cluster",
    "throwaway_database",
]

ENV_URL = "SFDB_TEST_DATABASE_URL"
HOW_TO_GET_ONE = (
    "No PostgreSQL server for the tests. Do one of: "
    f"export {ENV_URL}=postgresql://postgres@127.0.0.1:5432/postgres; "
    "install the PostgreSQL server binaries (Debian: apt-get install postgresql); "
    "start a Docker daemon (testcontainers); "
    "or pip install 'slack-fathom-db[embedded]'."
)


class NoPostgreSQL(RuntimeError):
    """No PostgreSQL server could be found or started for the tests."""


def _pg_bin_dirs() -> list[Path]:
    found = [Path(p).parent for p in filter(None, [shutil.which("pg_ctl")])]
    found += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return [d for d in found if (d / "initdb").exists() and (d / "pg_ctl").exists()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def local_cluster() -> Iterator[URL]:
    """Start a throwaway cluster from local binaries on a free loopback port; stop it after."""
    dirs = _pg_bin_dirs()
    if not dirs:
        raise NoPostgreSQL("no initdb/pg_ctl found")
    bin_dir = dirs[0]
    root = Path(tempfile.mkdtemp(prefix="sfdb-pg-"))
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb and pg_ctl refuse to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(sockets, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    options = (
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    try:
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(  # noqa: S603
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-w",
                "-l",
                str(root / "server.log"),
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise NoPostgreSQL(f"could not start a local cluster: {exc}") from exc
    try:
        yield URL.create(
            "postgresql+asyncpg",
            username="postgres",
            host="127.0.0.1",
            port=port,
            database="postgres",
        )
    finally:
        subprocess.run(  # noqa: S603
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _docker_container() -> Iterator[URL]:
    try:
        import docker  # type: ignore[import-untyped]  # noqa: PLC0415
        from testcontainers.community.postgres import (  # noqa: PLC0415
            PostgresContainer,
        )
    except ImportError as exc:
        raise NoPostgreSQL("testcontainers is not installed") from exc
    try:
        docker.from_env().ping()
    except Exception as exc:
        raise NoPostgreSQL("no Docker daemon answers") from exc
    with PostgresContainer("postgres:16-alpine", driver=None) as container:
        yield normalize_url(container.get_connection_url())


@contextlib.contextmanager
def _embedded() -> Iterator[URL]:
    try:
        from pgserver.postgres_server import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
            get_server,
        )
    except ImportError as exc:
        raise NoPostgreSQL("pgserver is not installed") from exc
    root = Path(tempfile.mkdtemp(prefix="sfdb-embedded-"))
    server: Any = get_server(root, cleanup_mode="stop")
    try:
        yield normalize_url(server.get_uri())
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def find_server() -> Iterator[URL]:
    """A server URL (to an existing database), by the order in the module docstring."""
    explicit = os.environ.get(ENV_URL)
    if explicit:
        yield normalize_url(explicit)
        return
    reasons: list[str] = []
    for candidate in (local_cluster, _docker_container, _embedded):
        try:
            manager = candidate()
            url = manager.__enter__()
        except NoPostgreSQL as exc:
            reasons.append(f"{candidate.__name__.strip('_')}: {exc}")
            continue
        try:
            yield url
        finally:
            manager.__exit__(None, None, None)
        return
    raise NoPostgreSQL(f"{HOW_TO_GET_ONE} (tried: {'; '.join(reasons)})")


async def _admin_execute(server: URL, sql: str) -> None:
    import asyncpg  # noqa: PLC0415

    conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def throwaway_database(
    server: URL, *, app_role: str = "sfdb_app", migrate: bool = True
) -> AsyncIterator[DatabaseSettings]:
    """A fresh database on ``server``, migrated to head unless told not to; dropped after."""
    name = f"sfdb_test_{uuid.uuid4().hex[:12]}"
    await _admin_execute(server, f'CREATE DATABASE "{name}"')
    settings = DatabaseSettings(
        url=server.set(database=name).render_as_string(hide_password=False),
        app_role=app_role,
        pool_size=10,
        max_overflow=20,
        _env_file=None,
    )
    try:
        if migrate:
            await schema.upgrade(settings)
        yield settings
    finally:
        await _admin_execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the pytest plugin ----------------------------------------------------------------


@pytest.fixture(scope="session")
def sfdb_server() -> Iterator[URL]:
    """The URL of a PostgreSQL server for this run (see the module docstring)."""
    try:
        with find_server() as url:
            yield url
    except NoPostgreSQL as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_settings(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """Settings of a fresh database migrated to head, dropped after the run."""
    async with throwaway_database(sfdb_server) as settings:
        yield settings


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_database(sfdb_settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A ``Database`` on the migrated test database, disposed after the run."""
    async with Database(sfdb_settings) as db:
        yield db
