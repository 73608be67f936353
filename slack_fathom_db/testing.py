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
``pgbouncer=True``; migrations and ``sfdb_direct_settings`` (the same
runtime login) still go straight to the server. Tests
marked ``not_through_pgbouncer`` say why they cannot run that way.

With ``SFDB_TEST_CITUS=1`` the run starts a throwaway Citus cluster from the
local binaries instead of finding a server (:func:`citus_cluster`: a
coordinator and one worker, PostgreSQL with Citus installed), and
``sfdb_server`` is the coordinator. The suite's database
(``sfdb_direct_settings``) is created on both nodes with the Citus extension,
the nodes are registered in it, and it is migrated and distributed
(:func:`citus_database`); it is dropped on both nodes at the end. Other
databases that tests make (``throwaway_database``) are plain databases on the
coordinator. Tests marked ``not_on_citus`` say why they cannot run on Citus.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy.engine import URL

from slack_fathom_db import citus, schema
from slack_fathom_db.claims import generate_tenant_key
from slack_fathom_db.database import Database
from slack_fathom_db.errors import UsageError
from slack_fathom_db.logins import create_login
from slack_fathom_db.maintenance import install_tenant_key
from slack_fathom_db.runner import render
from slack_fathom_db.settings import DatabaseSettings, normalize_url
from slack_fathom_db.tokens import generate_key

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping, Sequence

    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.sql import ClauseElement, TextClause

    from slack_fathom_db.runner import Runner
    from slack_fathom_db.uow import UnitOfWork

__all__ = [
    "CITUS_SETTINGS",
    "CitusCluster",
    "LocalCluster",
    "NoPostgreSQL",
    "PgBouncer",
    "ProbeResult",
    "citus_cluster",
    "citus_database",
    "citus_library",
    "citus_requested",
    "driver_of",
    "engine_of",
    "execute_in",
    "find_server",
    "local_cluster",
    "local_cluster_control",
    "pgbouncer",
    "pgbouncer_binary",
    "pgbouncer_requested",
    "probe_outside",
    "runner_of",
    "throwaway_database",
]

ENV_URL = "SFDB_TEST_DATABASE_URL"
ENV_PGBOUNCER = "SFDB_TEST_PGBOUNCER"
ENV_CITUS = "SFDB_TEST_CITUS"
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


_SERVER_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
"""Settings of every throwaway cluster: loopback only, durability off (nothing here is kept)."""


@contextlib.contextmanager
def local_cluster_control(
    *, bin_dir: Path | None = None, settings: Mapping[str, str] | None = None
) -> Iterator[LocalCluster]:
    """Start a throwaway cluster from local binaries on a free loopback port; stop it after.

    ``bin_dir`` picks the PostgreSQL (the newest found by default); ``settings``
    add to or override the server settings (``-c name=value``; plain words only).
    A server that does not start raises :class:`NoPostgreSQL` with the end of its log.
    """
    if bin_dir is None:
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
    # pg_ctl hands the options to a shell: only plain words get through unchanged.
    options = f"-p {port} -k {sockets} " + " ".join(
        f"-c {name}={value}" for name, value in {**_SERVER_SETTINGS, **(settings or {})}.items()
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
        detail = _tail(cluster.log) or _tail_of_output(exc)
        cluster._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
        raise NoPostgreSQL(f"could not start a local cluster: {exc}; {detail}") from exc
    try:
        yield cluster
    finally:
        cluster._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def _tail(log: Path, size: int = 2000) -> str:
    """The end of a server's log, or an empty string when it wrote none."""
    try:
        return log.read_text(errors="replace")[-size:].strip()
    except OSError:
        return ""


def _tail_of_output(exc: BaseException, size: int = 2000) -> str:
    """The end of what a failed command printed (initdb fails before any log exists)."""
    output = getattr(exc, "stderr", None) or getattr(exc, "stdout", None) or b""
    text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
    return text[-size:].strip()


@contextlib.contextmanager
def local_cluster() -> Iterator[URL]:
    """Start a throwaway cluster from local binaries on a free loopback port; stop it after."""
    with local_cluster_control() as cluster:
        yield cluster.url


CITUS_SETTINGS: Mapping[str, str] = {
    "shared_preload_libraries": "citus",
    "wal_level": "logical",
    # The coordinator commits a transaction that wrote on several nodes in two phases.
    "max_prepared_transactions": "100",
    # Every client of the coordinator may hold a connection to the worker as well.
    "max_connections": "300",
}
"""Server settings of both nodes of :func:`citus_cluster`."""


def citus_library(bin_dir: Path) -> Path | None:
    """Citus' shared library for the PostgreSQL of ``bin_dir`` (``citus.so``), if installed."""
    lib_dir = bin_dir.parent / "lib"
    pg_config = bin_dir / "pg_config"
    if pg_config.exists():
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            found = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [str(pg_config), "--pkglibdir"],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            lib_dir = Path(found) if found else lib_dir
    library = lib_dir / "citus.so"
    return library if library.exists() else None


@dataclasses.dataclass(frozen=True)
class CitusCluster:
    """A throwaway Citus cluster of :func:`citus_cluster`: a coordinator and one worker.

    Both are :class:`LocalCluster` s on loopback ports that trust every local
    connection, so the coordinator reaches the worker as any role.
    """

    coordinator: LocalCluster
    worker: LocalCluster


@contextlib.contextmanager
def citus_cluster() -> Iterator[CitusCluster]:
    """Start a Citus coordinator and one worker from local binaries; stop both after.

    Each node is a cluster of :func:`local_cluster_control` with
    :data:`CITUS_SETTINGS`. Nodes are registered per database (see
    :func:`citus_database`). Raises :class:`NoPostgreSQL` when no local
    PostgreSQL has Citus installed.
    """
    dirs = _pg_bin_dirs()
    if not dirs:
        raise NoPostgreSQL("no initdb/pg_ctl found")
    with_citus = [d for d in dirs if citus_library(d) is not None]
    if not with_citus:
        versions = ", ".join(str(d.parent) for d in dirs)
        raise NoPostgreSQL(
            f"Citus is not installed for this PostgreSQL (citus.so missing; looked in {versions})"
        )
    bin_dir = with_citus[0]
    with (
        local_cluster_control(bin_dir=bin_dir, settings=CITUS_SETTINGS) as coordinator,
        local_cluster_control(bin_dir=bin_dir, settings=CITUS_SETTINGS) as worker,
    ):
        yield CitusCluster(coordinator=coordinator, worker=worker)


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
def pgbouncer(
    server: URL,
    *,
    pool_size: int = PGBOUNCER_POOL_SIZE,
    logins: Sequence[URL] = (),
    reset_sessions: bool = False,
) -> Iterator[PgBouncer]:
    """PgBouncer in transaction pooling mode in front of ``server``, on a free loopback port.

    Every database of the server is reachable through it, with at most
    ``pool_size`` server connections per database and user. Clients are
    trusted (loopback only), but only as a user of PgBouncer's auth file: the
    server URL's own, and the user of each URL of ``logins`` (a test
    database's runtime login); PgBouncer logs into the server as the client's
    user, with the password given there. Yields a :class:`PgBouncer` whose
    ``url`` is ``server`` with host and port replaced; stops PgBouncer after.

    With ``reset_sessions`` every server session is reset (``DISCARD ALL``,
    ``server_reset_query_always``) before another client gets it. Without (the
    default, PgBouncer's own), what a client leaves on a session reaches the
    next one; the layer does not rely on it: each of its transactions sets
    role, search path, mode, row security, timeouts and tenant itself. (The
    driver prepares its first queries on a new connection outside a
    transaction, so the layer cannot connect through a PgBouncer that resets
    sessions after every transaction.)

    PgBouncer, not daemonized, writes every log line to its standard error:
    that goes to a file (``log``), never to a pipe that nobody reads (a full
    pipe would block PgBouncer in ``write(2)``, and with it every client).
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise NoPostgreSQL("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    root = Path(tempfile.mkdtemp(prefix="sfdb-pgbouncer-"))
    port = _free_port()
    users = {server.username or "postgres": server.password or ""}
    users.update({url.username: url.password or "" for url in logins if url.username})
    (root / "userlist.txt").write_text(
        "".join(f'"{user}" "{password}"\n' for user, password in users.items()),
        encoding="utf-8",
    )
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
                # As the README recommends: no session state passes between clients.
                f"server_reset_query = {'DISCARD ALL' if reset_sessions else ''}",
                f"server_reset_query_always = {int(reset_sessions)}",
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


@dataclasses.dataclass(frozen=True)
class _Logins:
    """The two logins of a test database: its migrating owner and its runtime login."""

    name: str
    migrator: str
    migrator_password: str
    runtime: str
    runtime_password: str
    token_keys: str
    """The database's ``DATABASE_TOKEN_KEYS``: one key made for it."""
    tenant_key: str
    """The database's ``DATABASE_TENANT_KEY``: made for it, installed when it is migrated."""

    @classmethod
    def for_database(cls, name: str, *, token_keys: str | None = None) -> _Logins:
        return cls(
            name=name,
            migrator=f"{name}_migrator",
            migrator_password=secrets.token_urlsafe(24),
            runtime=f"{name}_runtime",
            runtime_password=secrets.token_urlsafe(24),
            token_keys=token_keys or generate_key("test"),
            tenant_key=generate_tenant_key("test"),
        )

    def migration_url(self, server: URL) -> URL:
        return server.set(
            username=self.migrator, password=self.migrator_password, database=self.name
        )

    def runtime_url(self, server: URL) -> URL:
        return server.set(username=self.runtime, password=self.runtime_password, database=self.name)


def _database_settings(server: URL, logins: _Logins, *, runtime: bool) -> DatabaseSettings:
    """Settings of a test database: the runtime login's, or (before it exists) the migrator's."""
    migration = logins.migration_url(server)
    url = logins.runtime_url(server) if runtime else migration
    return DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        migration_url=migration.render_as_string(hide_password=False),
        token_keys=logins.token_keys,
        tenant_key=logins.tenant_key,
        pool_size=10,
        max_overflow=20,
        _env_file=None,
    )


async def _create_database(node: URL, logins: _Logins) -> None:
    """The database and its migrating owner: a login that may create roles, nothing more."""
    await _admin_execute(
        node,
        f"CREATE ROLE \"{logins.migrator}\" LOGIN CREATEROLE PASSWORD '{logins.migrator_password}'",
    )
    await _admin_execute(node, f'CREATE DATABASE "{logins.name}" OWNER "{logins.migrator}"')


async def _drop_database(node: URL, logins: _Logins, layer: list[str]) -> None:
    await _admin_execute(node, f'DROP DATABASE IF EXISTS "{logins.name}" WITH (FORCE)')
    for role in (logins.runtime, *layer, logins.migrator):
        await _admin_execute(node, f'DROP ROLE IF EXISTS "{role}"')


async def _open_to_runtime(settings: DatabaseSettings, logins: _Logins) -> DatabaseSettings:
    """Create the runtime login (as ``sfdb create-login`` does) and return its settings."""
    await create_login(settings, logins.runtime, logins.runtime_password)
    return settings.model_copy(
        update={"url": _database_settings(_server_of(settings), logins, runtime=True).url}
    )


def _server_of(settings: DatabaseSettings) -> URL:
    return settings.for_migrations().sqlalchemy_url()


def _layer_roles(settings: DatabaseSettings) -> list[str]:
    roles = settings.roles
    return [roles.app, roles.directory, roles.owner]


@contextlib.asynccontextmanager
async def throwaway_database(
    server: URL, *, migrate: bool = True, token_keys: str | None = None
) -> AsyncIterator[DatabaseSettings]:
    """A fresh database on ``server``, as an application would have it; dropped after.

    It belongs to a login made for it that may create roles and is no superuser,
    as on a managed service. Migrated to head (unless ``migrate=False``) with
    that login's credentials (``migration_url``), and used through a runtime
    login made by :func:`slack_fathom_db.logins.create_login` (``url``).
    Without ``migrate`` the runtime login does not exist yet: ``url`` is the
    migrating login's. ``token_keys`` (``DATABASE_TOKEN_KEYS``) defaults to a key
    made for it: give another database's to read the Slack tokens of a workspace
    imported from there. Everything, roles included, is dropped afterwards.
    """
    logins = _Logins.for_database(f"sfdb_test_{uuid.uuid4().hex[:12]}", token_keys=token_keys)
    settings = _database_settings(server, logins, runtime=False)
    await _create_database(server, logins)
    try:
        if migrate:
            await schema.upgrade(settings)
            await install_tenant_key(settings)
            settings = await _open_to_runtime(settings, logins)
        yield settings
    finally:
        await _drop_database(server, logins, _layer_roles(settings))


@contextlib.asynccontextmanager
async def citus_database(
    cluster: CitusCluster, *, revision: str = "head", token_keys: str | None = None
) -> AsyncIterator[DatabaseSettings]:
    """A fresh database on ``cluster``, migrated to ``revision`` and distributed; dropped after.

    Citus propagates neither ``CREATE DATABASE`` nor ``DROP DATABASE``, and keeps
    its node list per database: the database (owned by a migrating login, as
    :func:`throwaway_database` makes it) and the extension are made on every
    node, then the nodes are registered in it on the coordinator. The settings
    point at the coordinator, as the runtime login once the schema is at head.
    ``token_keys`` as for :func:`throwaway_database`.
    """
    logins = _Logins.for_database(f"sfdb_test_{uuid.uuid4().hex[:12]}", token_keys=token_keys)
    coordinator, worker = cluster.coordinator.url, cluster.worker.url
    settings = _database_settings(coordinator, logins, runtime=False)
    created: list[URL] = []
    try:
        for node in (coordinator, worker):
            created.append(node)
            await _admin_execute(node, f'CREATE DATABASE "{logins.name}"')
            await _admin_execute(node.set(database=logins.name), "CREATE EXTENSION citus")
        on_coordinator = coordinator.set(database=logins.name)
        await _admin_execute(
            on_coordinator,
            f"SELECT citus_set_coordinator_host('127.0.0.1', {int(coordinator.port or 0)}); "
            f"SELECT citus_add_node('127.0.0.1', {int(worker.port or 0)})",
        )
        # The migrating login is made through the coordinator, so Citus knows it on every
        # node: a role it had to copy to a worker later would need a superuser to alter.
        await _admin_execute(
            on_coordinator,
            f'CREATE ROLE "{logins.migrator}" LOGIN CREATEROLE '
            f"PASSWORD '{logins.migrator_password}'",
        )
        for node in (coordinator, worker):
            await _admin_execute(
                node, f'ALTER DATABASE "{logins.name}" OWNER TO "{logins.migrator}"'
            )
        await schema.upgrade(settings, revision)
        if revision == "head":
            await install_tenant_key(settings)
        await citus.distribute(settings)
        if revision == "head":
            settings = await _open_to_runtime(settings, logins)
        yield settings
    finally:
        for node in created:
            await _drop_database(node, logins, _layer_roles(settings))


# -- inside the layer, for tests only ---------------------------------------------------


def engine_of(db: Database) -> AsyncEngine:
    """The engine behind ``db``: for tests that count pooled connections or listen to events.

    Not part of the public API on purpose: statements sent on it run as the
    directory role (or the runtime login behind PgBouncer), outside any tenant.
    """
    return db._pool()


class ProbeResult:
    """The rows of a probe run by :func:`execute_in`, read the way SQLAlchemy's results are."""

    def __init__(self, rows: list[asyncpg.Record], status: str | None) -> None:
        self._values = [tuple(row.values()) for row in rows]
        self._rows: list[Any] = []
        if rows:
            names = list(rows[0].keys())
            row_type: Any = collections.namedtuple("Row", names, rename=True)  # type: ignore[misc]
            self._rows = [row_type._make(values) for values in self._values]
        self.rowcount = int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else -1
        """Rows the statement changed (``UPDATE 3`` → 3), or -1."""

    def all(self) -> list[Any]:
        """Every row (a named tuple: its columns as attributes)."""
        return list(self._rows)

    def one(self) -> Any:
        """The one row; raises if there is not exactly one."""
        (row,) = self._rows
        return row

    def scalar(self) -> Any:
        """The first column of the first row, or ``None``."""
        return self._values[0][0] if self._values else None

    def scalar_one(self) -> Any:
        """The first column of the one row; raises if there is not exactly one."""
        (values,) = self._values
        return values[0]

    def scalars(self) -> list[Any]:
        """The first column of every row."""
        return [values[0] for values in self._values]


async def execute_in(uow: UnitOfWork, statement: str | ClauseElement) -> ProbeResult:
    """Run ``statement`` in the open, tenant-scoped transaction of ``uow``: for probes.

    What code that can send SQL on the layer's connection could do, and what
    a test needs to prove it changes nothing: it runs as the app role, under
    the unit of work's tenant, exactly as the repositories' statements do, and
    raises the driver's own errors (nothing translates them). The connection is
    dropped when the unit of work ends, never pooled again: nothing such SQL
    leaves on the session reaches the next user.
    """
    driver = await runner_of(uow).expose()
    sql, arguments = (statement, []) if isinstance(statement, str) else render(statement)
    prepared = await driver.prepare(sql)
    rows = await prepared.fetch(*arguments)
    return ProbeResult(rows, prepared.get_statusmsg())


async def driver_of(uow: UnitOfWork) -> asyncpg.Connection:
    """The asyncpg connection of ``uow``, inside its open transaction (a backend pid, a kill).

    Like :func:`execute_in`, it marks the unit of work: its connection is dropped when
    the unit of work ends, never pooled again.
    """
    return await runner_of(uow).expose()


async def probe_outside(db: Database, sql: str | TextClause) -> tuple[Any, asyncpg.Connection]:
    """Run ``sql`` as the layer runs a statement outside any unit of work (as the directory
    role; behind PgBouncer in a transaction its opener starts): the first row, with its
    columns as attributes, and the driver connection it ran on (pooled again after)."""
    text_ = sql if isinstance(sql, str) else sql.text
    async with db._outside("probe") as runner:
        rows = await runner.fetch(text_, (), action="probe")
        return SimpleNamespace(**dict(rows[0])), runner.driver


def runner_of(uow: UnitOfWork) -> Runner:
    """The runner of an open unit of work (savepoints and retries in tests)."""
    runner = uow._runner
    if runner is None:
        raise UsageError("the unit of work is not open")
    return runner


# -- the pytest plugin ----------------------------------------------------------------


def citus_requested() -> bool:
    """Whether this run is the Citus pass (``SFDB_TEST_CITUS=1``)."""
    return _flag(ENV_CITUS)


@pytest.fixture(scope="session")
def sfdb_citus() -> Iterator[CitusCluster | None]:
    """The Citus cluster of the run when ``SFDB_TEST_CITUS=1``, else ``None``."""
    if not citus_requested():
        yield None
        return
    try:
        manager = citus_cluster()
        cluster = manager.__enter__()
    except NoPostgreSQL as exc:
        pytest.fail(f"{ENV_CITUS}=1: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session")
def sfdb_server(sfdb_citus: CitusCluster | None) -> Iterator[URL]:
    """The URL of a PostgreSQL server for this run (see the module docstring)."""
    if sfdb_citus is not None:
        yield sfdb_citus.coordinator.url
        return
    try:
        with find_server() as url:
            yield url
    except NoPostgreSQL as exc:
        pytest.fail(str(exc), pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers of tests that cannot run through PgBouncer or on Citus."""
    config.addinivalue_line(
        "markers",
        "not_through_pgbouncer(reason): cannot work through PgBouncer in transaction mode "
        f"with {PGBOUNCER_POOL_SIZE} server connections; the PgBouncer pass deselects it "
        "with -m 'not not_through_pgbouncer'",
    )
    config.addinivalue_line(
        "markers",
        "not_on_citus(reason): cannot run on a Citus cluster (a coordinator and a worker); "
        "the Citus pass deselects it with -m 'not not_on_citus'",
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def pgbouncer_requested() -> bool:
    """Whether this run goes through PgBouncer (``SFDB_TEST_PGBOUNCER=1``)."""
    return _flag(ENV_PGBOUNCER)


@pytest.fixture(scope="session")
def sfdb_pgbouncer(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> Iterator[URL | None]:
    """PgBouncer (transaction mode) in front of the server when ``SFDB_TEST_PGBOUNCER=1``.

    It lets the test database's runtime login in, as which the layer runs.
    """
    if not pgbouncer_requested():
        yield None
        return
    try:
        manager = pgbouncer(sfdb_server, logins=[sfdb_direct_settings.sqlalchemy_url()])
        bouncer = manager.__enter__()
    except NoPostgreSQL as exc:
        pytest.fail(f"{ENV_PGBOUNCER}=1: {exc}", pytrace=False)
    try:
        yield bouncer.url
    finally:
        manager.__exit__(None, None, None)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_direct_settings(
    sfdb_server: URL, sfdb_citus: CitusCluster | None
) -> AsyncIterator[DatabaseSettings]:
    """Settings of a fresh database migrated to head, straight to the server; dropped after.

    In the Citus pass the database is made on every node and distributed.
    """
    if sfdb_citus is not None:
        async with citus_database(sfdb_citus) as settings:
            yield settings
        return
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
    return sfdb_direct_settings.model_copy(
        update={
            "url": SecretStr(
                sfdb_pgbouncer.set(
                    database=direct.database, username=direct.username, password=direct.password
                ).render_as_string(hide_password=False)
            ),
            "pgbouncer": True,
        }
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sfdb_database(sfdb_settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A ``Database`` on the migrated test database, disposed after the run."""
    db = Database(sfdb_settings)
    try:
        yield db
    finally:
        await db.dispose()
