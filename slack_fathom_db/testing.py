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

With ``SFDB_TEST_PGBOUNCER=1`` the layer under test (``sfdb_settings``) reaches
that database through PgBouncer in transaction pooling mode, started on a free
loopback port with ``PGBOUNCER_POOL_SIZE`` server connections, and with
``pgbouncer=True``; migrations and ``sfdb_direct_settings`` (the superuser
``admin`` connection of the suite) still go straight to the server. Tests
marked ``not_through_pgbouncer`` say why they cannot run that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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
    "LocalCluster",
    "NoPostgreSQL",
    "PgBouncer",
    "find_server",
    "local_cluster",
    "local_cluster_control",
    "pgbouncer",
    "pgbouncer_binary",
    "throwaway_database",
]

ENV_URL = "SFDB_TEST_DATABASE_URL"
ENV_PGBOUNCER = "SFDB_TEST_PGBOUNCER"
PGBOUNCER_POOL_SIZE = 20
"""Server connections per database of the PgBouncer pass: fewer than the suite's clients."""
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


@dataclasses.dataclass(frozen=True)
class LocalCluster:
    """A throwaway cluster of :func:`local_cluster_control`: its URL, and stop/start/restart.

    For fault tests (a restarted or stopped server); never used on a shared server.
    """

    url: URL
    data: Path
    bin_dir: Path
    options: str
    log: Path
    as_user: tuple[str, ...]

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), *args],
            check=check,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        """Start the server (same port and options) and wait until it accepts connections."""
        self._pg_ctl("-o", self.options, "-w", "-l", str(self.log), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients; ``immediate``: no shutdown checkpoint)."""
        self._pg_ctl("-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop and start again on the same port: every existing connection is closed."""
        self.stop()
        self.start()


@contextlib.contextmanager
def local_cluster_control() -> Iterator[LocalCluster]:
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
    cluster = LocalCluster(
        url=URL.create(
            "postgresql+asyncpg",
            username="postgres",
            host="127.0.0.1",
            port=port,
            database="postgres",
        ),
        data=data,
        bin_dir=bin_dir,
        options=options,
        log=root / "server.log",
        as_user=tuple(as_user),
    )
    try:
        subprocess.run(  # noqa: S603 - fixed argv, no shell
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        cluster.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise NoPostgreSQL(f"could not start a local cluster: {exc}") from exc
    try:
        yield cluster
    finally:
        cluster._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def local_cluster() -> Iterator[URL]:
    """Start a throwaway cluster from local binaries on a free loopback port; stop it after."""
    with local_cluster_control() as cluster:
        yield cluster.url


def pgbouncer_binary() -> Path | None:
    """PgBouncer's executable (Debian: ``apt-get install pgbouncer``), if installed."""
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    path = Path(found)
    return path if path.exists() else None


@dataclasses.dataclass(frozen=True)
class PgBouncer:
    """A PgBouncer of :func:`pgbouncer`: its URL, its log, and a way to freeze it.

    ``freeze()`` stops the process (``SIGSTOP``) as a hung proxy or a frozen
    network would look to a client: connections stay open and nothing is
    answered. ``thaw()`` lets it go on (``SIGCONT``).
    """

    url: URL
    log: Path
    pid: int

    def freeze(self) -> None:
        """Stop the process: it accepts bytes into its sockets but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen PgBouncer go on where it stopped."""
        os.kill(self.pid, signal.SIGCONT)


@contextlib.contextmanager
def pgbouncer(server: URL, *, pool_size: int = PGBOUNCER_POOL_SIZE) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of ``server``, on a free loopback port.

    Every database of the server is reachable through it, with at most
    ``pool_size`` server connections per database and user. Clients are
    trusted (loopback only); PgBouncer logs into the server with the
    server URL's own credentials. Yields a :class:`PgBouncer` whose ``url``
    is ``server`` with host and port replaced; stops PgBouncer after.

    PgBouncer, not daemonized, writes every log line to its standard error:
    that goes to a file (``log``), never to a pipe that nobody reads (a full
    pipe would block PgBouncer in ``write(2)``, and with it every client).
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise NoPostgreSQL("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    root = Path(tempfile.mkdtemp(prefix="sfdb-pgbouncer-"))
    port = _free_port()
    user = server.username or "postgres"
    password = server.password or ""
    (root / "userlist.txt").write_text(f'"{user}" "{password}"\n', encoding="utf-8")
    (root / "userlist.txt").chmod(0o600)
    ini = root / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={server.host or '127.0.0.1'} port={server.port or 5432}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {root / 'userlist.txt'}",
                "pool_mode = transaction",
                f"default_pool_size = {pool_size}",
                f"max_db_connections = {pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                "max_client_conn = 2000",
                "ignore_startup_parameters = extra_float_digits",
                "server_login_retry = 1",
                # A client queued for a server connection fails after this, never hangs.
                "query_wait_timeout = 30",
                "",
            ]
        ),
        encoding="utf-8",
    )
    drop: dict[str, Any] = {}
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        owner = pwd.getpwnam("postgres")
        for path in (root, root / "userlist.txt", ini):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        # Switch user in the child itself (no runuser in between), so that terminate(),
        # wait() and the signals of PgBouncer.freeze() reach PgBouncer itself.
        drop = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    log = root / "pgbouncer.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(binary), str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            **drop,
        )
    try:
        _wait_for_port(port, process, log=log)
        yield PgBouncer(url=server.set(host="127.0.0.1", port=port), log=log, pid=process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a frozen PgBouncer cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], *, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            detail = log.read_text(errors="replace") if log.exists() else ""
            raise NoPostgreSQL(f"pgbouncer exited at start: {detail[-2000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise NoPostgreSQL("pgbouncer did not listen within 30 s")


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


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of tests that cannot run through PgBouncer."""
    config.addinivalue_line(
        "markers",
        "not_through_pgbouncer(reason): cannot work through PgBouncer in transaction mode "
        f"with {PGBOUNCER_POOL_SIZE} server connections; the PgBouncer pass deselects it "
        "with -m 'not not_through_pgbouncer'",
    )


def pgbouncer_requested() -> bool:
    """Whether this run goes through PgBouncer (``SFDB_TEST_PGBOUNCER=1``)."""
    return os.environ.get(ENV_PGBOUNCER, "").strip().lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def sfdb_pgbouncer(sfdb_server: URL) -> Iterator[URL | None]:
    """PgBouncer (transaction mode) in front of the server when ``SFDB_TEST_PGBOUNCER=1``."""
    if not pgbouncer_requested():
        yield None
        return
    try:
        manager = pgbouncer(sfdb_server)
        bouncer = manager.__enter__()
    except NoPostgreSQL as exc:
        pytest.fail(f"{ENV_PGBOUNCER}=1: {exc}", pytrace=False)
    try:
        yield bouncer.url
    finally:
        manager.__exit__(None, None, None)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_direct_settings(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """Settings of a fresh database migrated to head, straight to the server; dropped after."""
    async with throwaway_database(sfdb_server) as settings:
        yield settings


@pytest.fixture(scope="session")
def sfdb_settings(
    sfdb_direct_settings: DatabaseSettings, sfdb_pgbouncer: URL | None
) -> DatabaseSettings:
    """Settings the layer uses in tests: the test database, through PgBouncer in that pass."""
    if sfdb_pgbouncer is None:
        return sfdb_direct_settings
    direct = sfdb_direct_settings.sqlalchemy_url()
    return DatabaseSettings(
        url=sfdb_pgbouncer.set(database=direct.database).render_as_string(hide_password=False),
        app_role=sfdb_direct_settings.app_role,
        pool_size=sfdb_direct_settings.pool_size,
        max_overflow=sfdb_direct_settings.max_overflow,
        pgbouncer=True,
        _env_file=None,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_database(sfdb_settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A ``Database`` on the migrated test database, disposed after the run."""
    db = Database(sfdb_settings)
    try:
        yield db
    finally:
        await db.dispose()
