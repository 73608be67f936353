"""The ``sfdb`` command: migrate, check, inspect, and a demo of the whole layer.

Exit codes: 0 success, 1 a check failed or the database refused or could not
be reached, 2 bad usage or configuration. Expected failures print one line on
stderr, never a traceback.

With ``DATABASE_URL`` unset, ``sfdb`` runs on an embedded PostgreSQL (the
``embedded`` extra, ``pgserver``) whose data lives in a local directory; it
says so in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import hashlib
import os
import secrets
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from pydantic import SecretStr
from pydantic import ValidationError as SettingsError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from slack_fathom_db import __version__, citus, demo, logins, schema
from slack_fathom_db.audit_chain import KeptHead, parse_kept_heads, verify_audit_chains
from slack_fathom_db.audit_retention import (
    DEFAULT_MONTHS_AHEAD,
    ensure_audit_partitions,
    retain_audit_log,
)
from slack_fathom_db.claims import TenantKey, generate_tenant_key
from slack_fathom_db.database import Database
from slack_fathom_db.erasure import erase_user, purge_uninstalled_tenants
from slack_fathom_db.errors import ConfigurationError, SlackFathomDBError, ValidationError
from slack_fathom_db.export import ProgressCallback, export_tenant, import_tenant
from slack_fathom_db.maintenance import (
    DEFAULT_PURGE_AFTER_DAYS,
    finish_tenant_key_rotation,
    install_tenant_key,
    purge_rate_limit_windows,
    rotate_tenant_key,
    rotate_token_keys,
)
from slack_fathom_db.models import TENANT_OWNED_TABLES
from slack_fathom_db.settings import DatabaseSettings, normalize_url
from slack_fathom_db.tokens import generate_key

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator, Sequence

    from sqlalchemy.engine import URL

    from slack_fathom_db.tenancy import TenantId

__all__ = ["main"]

EMBEDDED_DATABASE = "slack_fathom_db"
EMBEDDED_MIGRATOR = "slack_fathom_db_migrator"
EMBEDDED_RUNTIME = "slack_fathom_db_runtime"
# The revision that made tenant keys (revision ids are zero-padded numbers).
_FIRST_CLAIMS_REVISION = "0008"
DEFAULT_AUDIT_DAYS = 7
DEFAULT_AUDIT_LIMIT = 50

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CommandError(Exception):
    """An expected failure: printed as one line, exit code 1."""


class UsageProblem(Exception):
    """Bad configuration or arguments: printed as one line, exit code 2."""


# -- the parser ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfdb",
        description=(
            "slack_fathom_db: migrate, check and inspect the database. Reads DATABASE_URL "
            "(and .env); without it, runs on an embedded PostgreSQL."
        ),
    )
    parser.add_argument("--version", action="version", version=f"sfdb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate = commands.add_parser(
        "migrate", help="create the database if missing and upgrade it (default: to head)"
    )
    migrate.add_argument("revision", nargs="?", default="head", help="target revision")
    downgrade = commands.add_parser("downgrade", help="downgrade to REVISION (e.g. base)")
    downgrade.add_argument("revision", help="target revision, e.g. base or -1")
    commands.add_parser("current", help="print the revision the database is at")
    commands.add_parser(
        "check",
        help="connection, server version, the runtime login, the app and directory roles, "
        "row-level security and migrations",
    )
    commands.add_parser("info", help="print server, database, user and pool figures")
    demo = commands.add_parser(
        "demo", help="migrate, then run a demo workspace through the whole layer"
    )
    demo.add_argument(
        "--meetings", type=_positive, default=20, help="meetings to ingest (default 20)"
    )
    stats = commands.add_parser("stats", help="statistics of one workspace")
    stats.add_argument("slack_team_id", metavar="SLACK_TEAM_ID")
    audit = commands.add_parser(
        "audit",
        help="recent audit events of one workspace; 'audit verify [SLACK_TEAM_ID]' checks "
        "the audit chains, 'audit retain --months N' drops the months that ended more than "
        "N months ago (both as the schema owner)",
        usage="sfdb audit [-h] [--failures] [--days N] [--limit N] SLACK_TEAM_ID\n"
        "       sfdb audit verify [SLACK_TEAM_ID] [--kept FILE]\n"
        "       sfdb audit retain --months N [--ahead N]",
    )
    audit.add_argument("slack_team_id", metavar="SLACK_TEAM_ID", help="or: verify, retain")
    audit.add_argument(
        "verified_team_id",
        metavar="VERIFY_TEAM_ID",
        nargs="?",
        default=None,
        help="after verify: only this workspace's chain",
    )
    audit.add_argument(
        "--kept",
        type=Path,
        metavar="FILE",
        help="with verify: heads an earlier verify printed, which the chains must still hold",
    )
    audit.add_argument(
        "--months",
        type=_positive,
        metavar="N",
        help="with retain: drop the monthly partitions whose month ended more than N months ago",
    )
    audit.add_argument(
        "--ahead",
        type=_non_negative,
        default=DEFAULT_MONTHS_AHEAD,
        metavar="N",
        help=f"with retain: make partitions N months ahead (default {DEFAULT_MONTHS_AHEAD})",
    )
    audit.add_argument("--failures", action="store_true", help="only events that did not succeed")
    audit.add_argument(
        "--days",
        type=_positive,
        default=DEFAULT_AUDIT_DAYS,
        help=f"look back N days (default {DEFAULT_AUDIT_DAYS})",
    )
    audit.add_argument(
        "--limit",
        type=_positive,
        default=DEFAULT_AUDIT_LIMIT,
        help=f"at most N events (default {DEFAULT_AUDIT_LIMIT})",
    )
    login = commands.add_parser(
        "create-login",
        help="create the runtime login (or set its password again), as the schema owner",
    )
    login.add_argument("name", metavar="NAME", help="the login's name, e.g. sfdb_runtime")
    login.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password from standard input (never from the command line)",
    )
    commands.add_parser(
        "distribute",
        help="distribute the migrated database over its Citus cluster (idempotent)",
    )
    purge = commands.add_parser(
        "purge-rate-limits",
        help="delete rate-limit windows that ended more than N days ago (as the schema owner)",
    )
    purge.add_argument(
        "--older-than-days",
        type=_non_negative,
        default=DEFAULT_PURGE_AFTER_DAYS,
        metavar="N",
        help=f"windows that ended more than N days ago (default {DEFAULT_PURGE_AFTER_DAYS})",
    )
    commands.add_parser(
        "rotate-token-keys",
        help="re-encrypt stored Slack tokens with the first DATABASE_TOKEN_KEYS key "
        "(as the schema owner)",
    )
    key = commands.add_parser(
        "generate-token-key",
        help="print a new key for DATABASE_TOKEN_KEYS (no database is used)",
    )
    key.add_argument("--id", dest="key_id", default=None, help="the key's id (default: random)")
    tenant_key = commands.add_parser(
        "generate-tenant-key",
        help="print a new key for DATABASE_TENANT_KEY (no database is used)",
    )
    tenant_key.add_argument(
        "--id", dest="key_id", default=None, help="the key's id (default: random)"
    )
    rotate = commands.add_parser(
        "rotate-tenant-key",
        help="add a new tenant key beside the current one and print it; with --finish, keep "
        "only the key of DATABASE_TENANT_KEY (as the schema owner)",
    )
    rotate.add_argument(
        "--finish",
        action="store_true",
        help="end the rotation: every application signs with DATABASE_TENANT_KEY now",
    )
    _tenant_parser(
        commands.add_parser(
            "tenant",
            help="one workspace's rows: export, import elsewhere, purge after uninstall, "
            "erase a user (as the schema owner)",
        )
    )
    return parser


def _tenant_parser(tenant: argparse.ArgumentParser) -> None:
    """``sfdb tenant ACTION``: what the owner does to one workspace at a time."""
    actions = tenant.add_subparsers(dest="tenant_action", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write every row of one workspace to DIR: JSON Lines, one file per table, "
        "and manifest.json",
    )
    export.add_argument("slack_team_id", metavar="SLACK_TEAM_ID")
    export.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="a new or empty directory"
    )
    restore = actions.add_parser(
        "import",
        help="restore the workspace exported to DIR, in one transaction (needs the same "
        "schema revision, and the same DATABASE_TOKEN_KEYS for its Slack tokens)",
    )
    restore.add_argument(
        "in_dir", type=Path, metavar="DIR", help="a directory of sfdb tenant export"
    )
    restore.add_argument(
        "--kept",
        type=Path,
        metavar="FILE",
        help="heads sfdb audit verify printed on the source, kept where the export's carrier "
        "cannot write: the export's audit chain must hold its workspace's (an export is not "
        "authenticated: this refuses one whose chain was rewritten or cut)",
    )
    purge = actions.add_parser(
        "purge",
        help="erase the workspaces uninstalled more than the grace period ago (audit "
        "events are de-identified, never deleted)",
    )
    purge.add_argument(
        "--grace-days",
        type=_non_negative,
        default=None,
        metavar="N",
        help="workspaces uninstalled more than N days ago (default DATABASE_PURGE_GRACE_DAYS)",
    )
    erase = actions.add_parser(
        "erase-user",
        help="erase one Slack user of a workspace: their rows and meetings deleted, their "
        "audit events de-identified",
    )
    erase.add_argument("slack_team_id", metavar="SLACK_TEAM_ID")
    erase.add_argument("slack_user_id", metavar="SLACK_USER_ID")


def _non_negative(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- where the database is ---------------------------------------------------------------


def _embedded_data_dir() -> Path:
    """Project-local data, except as root (see README: pgserver opens parent folders)."""
    override = os.environ.get("SFDB_EMBEDDED_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        tag = hashlib.sha256(str(Path.cwd()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / "sfdb-embedded" / tag
    return Path.cwd() / ".sfdb" / "pgdata"


@contextlib.contextmanager
def _settings() -> Iterator[DatabaseSettings]:
    try:
        settings = DatabaseSettings()
    except (SettingsError, ValueError) as exc:
        raise UsageProblem(f"configuration error: {_first_line(exc)}") from None
    if settings.url is not None:
        yield settings
        return
    # pgserver's platformdirs complains when XDG_RUNTIME_DIR is unset (containers, CI).
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        from pgserver.postgres_server import (  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
            get_server,
        )
    except ImportError:
        raise UsageProblem(
            "DATABASE_URL is not set and the embedded server is not installed: "
            "export DATABASE_URL=postgresql://… or pip install 'slack-fathom-db[embedded]'"
        ) from None
    data_dir = _embedded_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    err.print(f"DATABASE_URL is not set: using the embedded PostgreSQL in {data_dir}")
    server: Any = get_server(data_dir, cleanup_mode="stop")
    try:
        superuser = normalize_url(server.get_uri())
        asyncio.run(_prepare_embedded(superuser))
        # As everywhere else: migrations as a login that owns the database (not the
        # superuser), the layer as a runtime login (sfdb migrate creates it).
        migration = superuser.set(username=EMBEDDED_MIGRATOR, database=EMBEDDED_DATABASE)
        runtime = superuser.set(username=EMBEDDED_RUNTIME, database=EMBEDDED_DATABASE)
        yield settings.model_copy(
            update={
                "url": SecretStr(runtime.render_as_string(False)),
                "migration_url": SecretStr(migration.render_as_string(False)),
                "token_keys": settings.token_keys or SecretStr(_embedded_token_keys(data_dir)),
                "tenant_key": settings.tenant_key or SecretStr(_embedded_tenant_key(data_dir)),
            }
        )
    finally:
        server.cleanup()


def _embedded_token_keys(data_dir: Path) -> str:
    """The embedded database's token key: made once, kept beside its data, readable by its
    owner alone (a real deployment keeps DATABASE_TOKEN_KEYS in a secrets manager)."""
    return _embedded_key(data_dir.with_name(data_dir.name + ".token-keys"), generate_key)


def _embedded_tenant_key(data_dir: Path) -> str:
    """The embedded database's tenant key, kept as its token key is."""
    return _embedded_key(data_dir.with_name(data_dir.name + ".tenant-key"), generate_tenant_key)


def _embedded_key(path: Path, generate: Callable[[str], str]) -> str:
    if not path.exists():
        # Written whole under a name of its own, then linked into place: a run that stops
        # half-way leaves no empty key, and of two first runs the second keeps the first's.
        draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(generate("embedded"))
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            draft.unlink()
    return path.read_text().strip()


async def _prepare_embedded(superuser: URL) -> None:
    """The embedded database, owned by its migrating login; remade if an older layout made it."""
    conn = await asyncpg.connect(superuser.set(drivername="postgresql").render_as_string(False))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", EMBEDDED_MIGRATOR):
            await conn.execute(f'CREATE ROLE "{EMBEDDED_MIGRATOR}" LOGIN CREATEROLE')
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
            EMBEDDED_DATABASE,
        )
        if owner not in (None, EMBEDDED_MIGRATOR):
            err.print("the embedded database was made by an older version of sfdb: made anew")
            await conn.execute(f'DROP DATABASE "{EMBEDDED_DATABASE}" WITH (FORCE)')
            owner = None
        if owner is None:
            await conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE}" OWNER "{EMBEDDED_MIGRATOR}"')
    finally:
        await conn.close()


def _is_embedded(settings: DatabaseSettings) -> bool:
    return settings.sqlalchemy_url().username == EMBEDDED_RUNTIME


# -- commands --------------------------------------------------------------------------


async def _ensure_database(settings: DatabaseSettings) -> None:
    url = settings.for_migrations().sqlalchemy_url()
    name = url.database or ""  # normalize_url refuses a URL without one
    maintenance = url.set(drivername="postgresql", database="postgres")
    conn = await asyncpg.connect(maintenance.render_as_string(hide_password=False))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            quoted = name.replace('"', '""')  # an identifier: double any quote inside
            await conn.execute(f'CREATE DATABASE "{quoted}"')
            out.print(f"created database {name}", markup=False)
    finally:
        await conn.close()


async def _migrate(settings: DatabaseSettings, revision: str) -> None:
    _warn_if_owner_falls_back(settings)
    await _ensure_database(settings)
    await schema.upgrade(settings, revision)
    current = await schema.current(settings)
    where = settings.for_migrations().masked_url
    out.print(f"{where} is at revision {current}")
    if current is not None and current >= _FIRST_CLAIMS_REVISION:
        if settings.tenant_key is None:
            err.print(
                "DATABASE_TENANT_KEY is not set: no tenant key was installed, and units of "
                "work need one (sfdb generate-tenant-key makes one; run sfdb migrate again "
                "with it set)",
                markup=False,
            )
        elif await install_tenant_key(settings):
            out.print(f"installed tenant key {TenantKey.from_settings(settings).key_id}")
    made = await ensure_audit_partitions(settings)
    if made:
        out.print(f"made audit log partitions {', '.join(made)}", markup=False)
    if _is_embedded(settings) and current == schema.head():
        # Local socket, trust: the password is never asked for; a fresh one each time.
        await logins.create_login(settings, EMBEDDED_RUNTIME, secrets.token_urlsafe(24))


async def _downgrade(settings: DatabaseSettings, revision: str) -> None:
    _warn_if_owner_falls_back(settings)
    await schema.downgrade(settings, revision)
    where = settings.for_migrations().masked_url
    out.print(f"{where} is at revision {await schema.current(settings) or 'base'}")


async def _current(settings: DatabaseSettings) -> None:
    out.print(await schema.current(settings) or "base (no revision applied)")


async def _check(settings: DatabaseSettings) -> bool:
    results: list[tuple[str, bool, str]] = []
    url = settings.sqlalchemy_url().set(drivername="postgresql")
    try:
        conn = await asyncio.wait_for(
            asyncpg.connect(url.render_as_string(hide_password=False), statement_cache_size=0),
            timeout=settings.connect_timeout,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _print_checks([("connection", False, _first_line(exc))])
        return False
    try:
        results.append(("connection", True, settings.masked_url or ""))
        version = await conn.fetchval("SHOW server_version_num")
        results.append(
            (
                "server version >= 15",
                int(version) >= 150000,
                await conn.fetchval("SHOW server_version"),
            )
        )
        results += await _role_checks(conn, settings)
        rows = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relname = ANY($1::text[]) "
            "AND relkind IN ('r', 'p') AND relrowsecurity AND relforcerowsecurity "
            "AND relnamespace = 'public'::regnamespace",
            list(TENANT_OWNED_TABLES),
        )
        missing = sorted(set(TENANT_OWNED_TABLES) - {row["relname"] for row in rows})
        results.append(
            (
                "row-level security forced on tenant-owned tables",
                not missing,
                f"missing on {', '.join(missing)}"
                if missing
                else f"{len(TENANT_OWNED_TABLES)} tables",
            )
        )
        current = await _current_on(conn, settings)
        head = schema.head()
        results.append(("migrations at head", current == head, f"at {current}, head {head}"))
        if current is not None and current >= _FIRST_CLAIMS_REVISION:
            results.append(await _tenant_key_check(conn, settings))
    finally:
        await conn.close()
    _print_checks(results)
    return all(ok for _, ok, _ in results)


async def _tenant_key_check(
    conn: asyncpg.Connection, settings: DatabaseSettings
) -> tuple[str, bool, str]:
    """Whether the database verifies a claim signed with ``DATABASE_TENANT_KEY``: one made
    for a tenant that does not exist passes the signature and fails only as unknown."""
    name = "the database accepts DATABASE_TENANT_KEY"
    try:
        key = TenantKey.from_settings(settings)
    except ConfigurationError as exc:
        return name, False, str(exc).split(":", 1)[0]
    claim = key.sign(uuid.uuid4())
    try:
        async with conn.transaction():
            await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
            await conn.execute("SELECT set_config('app.tenant_claim', $1, true)", claim)
            await conn.execute("SELECT sfdb_require_claim()")
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == "P0002":  # verified; no such tenant, as expected
            return name, True, f"key {key.key_id}"
        return name, False, _first_line(exc)
    return name, False, "a claim for a tenant that does not exist was accepted"


_ROLES = """
SELECT r.rolname AS name, r.rolsuper AS superuser, r.rolbypassrls AS bypassrls,
       r.rolcreaterole AS createrole, r.rolcreatedb AS createdb, r.rolinherit AS inherit,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = r.oid
               AND NOT (r.rolname = session_user AND g.rolname IN ($1, $2))
             ORDER BY g.rolname) AS member_of
FROM pg_roles r WHERE r.rolname IN (session_user, $1, $2)
"""
"""Powers and memberships of the runtime login (``session_user``) and of the app (``$1``)
and directory (``$2``) roles: the login may be a member of those two, none of anything else."""

_LOGIN = """
SELECT r.rolname AS name,
       EXISTS (SELECT FROM pg_class WHERE relowner = r.oid)
         OR EXISTS (SELECT FROM pg_proc WHERE proowner = r.oid)
         OR EXISTS (SELECT FROM pg_namespace WHERE nspowner = r.oid)
         OR EXISTS (SELECT FROM pg_database WHERE datdba = r.oid
                    AND datname = current_database()) AS owns,
       coalesce(pg_has_role(r.oid, (SELECT oid FROM pg_roles WHERE rolname = $1), 'MEMBER'),
                false) AS is_owner,
       (SELECT array_agg(rolname ORDER BY rolname) FROM pg_roles
        WHERE rolname IN (r.rolname, $2, $3)
          AND has_database_privilege(oid, current_database(), 'TEMPORARY')) AS temp_roles,
       (SELECT count(*) = 2 FROM pg_roles
        WHERE rolname IN ($2, $3) AND pg_has_role(r.oid, oid, 'MEMBER')) AS can_become
FROM pg_roles r WHERE r.rolname = session_user
"""


async def _role_checks(
    conn: asyncpg.Connection, settings: DatabaseSettings
) -> list[tuple[str, bool, str]]:
    """The runtime login holds nothing of its own; the app and directory roles hold no power.

    One line per problem: a missing app or directory role is one line, not six.
    """
    layer = settings.roles
    login = await conn.fetchrow(_LOGIN, layer.owner, layer.app, layer.directory)
    assert login is not None  # noqa: S101 - the session's own role exists
    found = {row["name"]: row for row in await conn.fetch(_ROLES, layer.app, layer.directory)}
    name = login["name"]
    temp = ", ".join(login["temp_roles"] or [])
    results = [
        *_powers("runtime login", found[name]),
        ("runtime login is NOINHERIT", not found[name]["inherit"], name),
        ("runtime login owns nothing", not login["owns"], name),
        ("runtime login is not the owner", not login["is_owner"], name),
        ("no runtime role can create temp tables", not temp, temp or name),
        (
            "runtime login may become the app and directory roles",
            bool(login["can_become"]),
            f"{layer.app}, {layer.directory}",
        ),
    ]
    for kind, role in (("app role", layer.app), ("directory role", layer.directory)):
        results.append((f"{kind} present", role in found, role))
        if role in found:
            results += _powers(kind, found[role])
    return results


def _powers(who: str, role: asyncpg.Record) -> list[tuple[str, bool, str]]:
    """What no role of the layer may be: powerful, or a member of another role."""
    name, others = role["name"], ", ".join(role["member_of"])
    return [
        (f"{who} is not a superuser", not role["superuser"], name),
        (f"{who} does not bypass row-level security", not role["bypassrls"], name),
        (f"{who} cannot create roles", not role["createrole"], name),
        (f"{who} cannot create databases", not role["createdb"], name),
        (f"{who} is a member of no other role", not others, others or name),
    ]


async def _current_on(conn: asyncpg.Connection, settings: DatabaseSettings) -> str | None:
    # The revision table is the owner's; the directory role may read it (the runtime
    # login itself, holding nothing, cannot even see the schema).
    directory = settings.roles.directory
    async with conn.transaction():
        if await conn.fetchval(
            "SELECT coalesce(pg_has_role(session_user, oid, 'MEMBER'), false) "
            "FROM pg_roles WHERE rolname = $1",
            directory,
        ):
            await conn.execute(f'SET LOCAL ROLE "{directory}"')
        if not await conn.fetchval(
            "SELECT CASE WHEN has_schema_privilege('public', 'USAGE') "
            "THEN to_regclass('public.alembic_version') IS NOT NULL ELSE false END"
        ):
            return None
        value: str | None = await conn.fetchval("SELECT version_num FROM alembic_version")
    return value


def _print_checks(results: list[tuple[str, bool, str]]) -> None:
    for name, ok, detail in results:
        mark = "[green]pass[/green]" if ok else "[red]FAIL[/red]"
        out.print(f"{mark}  {name}  [dim]{detail}[/dim]")


async def _info(settings: DatabaseSettings) -> None:
    async with Database(settings) as db:
        info = await db.info()
    table = Table(show_header=False, box=None)
    for name in info.__dataclass_fields__:
        table.add_row(name, str(getattr(info, name)))
    out.print(table)


def _read_password() -> str:
    """The password from standard input: prompted without echo on a terminal, else read."""
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.read().rstrip("\r\n")


async def _create_login(settings: DatabaseSettings, name: str, password: str) -> None:
    _warn_if_owner_falls_back(settings)
    created = await logins.create_login(settings, name, password)
    what = "created login" if created else "set a new password for login"
    out.print(f"{what} {name}: a member of {settings.roles.app} and {settings.roles.directory}")


def _warn_if_owner_falls_back(settings: DatabaseSettings) -> None:
    if settings.migration_falls_back:
        err.print(
            "DATABASE_MIGRATION_URL is not set: doing the owner's work with DATABASE_URL "
            "(give the runtime its own login: sfdb create-login)"
        )


async def _distribute(settings: DatabaseSettings) -> None:
    done = await citus.distribute(settings)
    for step in done:
        out.print(step)
    out.print(f"{settings.masked_url} is distributed" + ("" if done else " (nothing to do)"))


async def _purge_rate_limits(settings: DatabaseSettings, older_than_days: int) -> None:
    deleted = await purge_rate_limit_windows(settings, older_than_days=older_than_days)
    out.print(
        f"deleted {deleted} rate-limit window(s) that ended more than {older_than_days} days ago"
    )


async def _tenant_purge(settings: DatabaseSettings, args: argparse.Namespace) -> None:
    days = settings.purge_grace_days if args.grace_days is None else args.grace_days
    purged = await purge_uninstalled_tenants(settings, grace_days=days)
    for done in purged:
        _line(
            f"{done.slack_team_id}: {done.error or done.outcome}; "
            f"{sum(done.deleted.values())} row(s) deleted, "
            f"{done.deidentified} audit event(s) de-identified"
        )
    _line(f"{len(purged)} workspace(s) uninstalled more than {days} days ago")
    failed = [done.slack_team_id for done in purged if done.outcome == "failed"]
    if failed:
        raise CommandError(f"{len(failed)} workspace(s) not erased, the next run resumes them")


async def _tenant_erase_user(settings: DatabaseSettings, args: argparse.Namespace) -> None:
    slack_team_id, slack_user_id = args.slack_team_id, args.slack_user_id
    done = await erase_user(settings, slack_team_id, slack_user_id)
    if not (done.users or done.installations or done.deidentified):
        _line(f"no trace of {slack_user_id} in {slack_team_id}: nothing to erase")
        return
    _line(
        f"{slack_user_id} erased from {slack_team_id}: {done.users} user row(s), "
        f"{done.meetings} meeting(s) and {done.installations} Slack installation(s) deleted, "
        f"{done.mentions} participant list(s) and {done.deidentified} audit event(s) "
        "de-identified"
    )


async def _rotate_token_keys(settings: DatabaseSettings) -> None:
    done = await rotate_token_keys(settings)
    out.print(
        f"{done.rows_read} row(s) read; {done.secrets_rewritten} secret(s) in "
        f"{done.rows_rewritten} row(s) re-encrypted with key {done.key_id}",
        markup=False,
    )
    if done.unreadable:
        raise CommandError(
            f"{len(done.unreadable)} row(s) left as they were: no configured key decrypts "
            f"them (a key dropped too early, or the row was altered): "
            f"{', '.join(done.unreadable[:5])}{' …' if len(done.unreadable) > 5 else ''}"
        )


async def _rotate_tenant_key(settings: DatabaseSettings, *, finish: bool) -> None:
    if finish:
        removed = await finish_tenant_key_rotation(settings)
        err.print(
            f"tenant keys removed: {', '.join(removed) or 'none'}; the database accepts "
            "claims signed with DATABASE_TENANT_KEY only",
            markup=False,
        )
        return
    new = await rotate_tenant_key(settings)
    # The key goes to standard output alone, for a secrets manager; the rest to stderr.
    out.print(new, markup=False, highlight=False, soft_wrap=True)
    err.print(
        "the database accepts claims signed with the new key and the current one: set "
        "DATABASE_TENANT_KEY to the new key in every application, then run "
        "sfdb rotate-tenant-key --finish",
        markup=False,
    )


async def _tenant_export(settings: DatabaseSettings, args: argparse.Namespace) -> None:
    _warn_if_owner_falls_back(settings)
    try:
        with _table_progress("exporting") as progress:
            manifest = await export_tenant(
                settings, args.slack_team_id, args.out, progress=progress
            )
    except ValidationError as exc:  # the team id's shape, or a directory in use
        raise UsageProblem(str(exc)) from None
    _line(
        f"exported workspace {manifest.slack_team_id} ({manifest.tenant_id}): "
        f"{manifest.rows} rows of {len(manifest.tables)} tables to {args.out}"
    )


async def _tenant_import(settings: DatabaseSettings, args: argparse.Namespace) -> None:
    _warn_if_owner_falls_back(settings)
    kept = _kept_heads(args.kept, command="tenant import")
    with _table_progress("importing") as progress:
        imported = await import_tenant(settings, args.in_dir, kept=kept, progress=progress)
    manifest = imported.manifest
    held = sum(head.slack_team_id == manifest.slack_team_id for head in kept)
    _line(
        f"imported workspace {manifest.slack_team_id} ({manifest.tenant_id}): "
        f"{manifest.rows} rows of {len(manifest.tables)} tables, at schema revision "
        f"{manifest.schema_revision}"
        + (f"; its audit chain holds the {held} kept head(s)" if held else "")
    )
    if imported.audit_head is not None:
        _line(_head_line(manifest.slack_team_id, *imported.audit_head))


_TENANT_ACTIONS: dict[
    str, Callable[[DatabaseSettings, argparse.Namespace], Coroutine[Any, Any, None]]
] = {
    "export": _tenant_export,
    "import": _tenant_import,
    "purge": _tenant_purge,
    "erase-user": _tenant_erase_user,
}
"""``sfdb tenant ACTION``, by action (each parsed in :func:`_tenant_parser`)."""


async def _tenant_of(db: Database, slack_team_id: str) -> TenantId:
    tenant_id = await db.directory.resolve(slack_team_id)
    if tenant_id is None:
        raise CommandError(f"no live workspace with slack_team_id {slack_team_id}")
    return tenant_id


async def _stats(settings: DatabaseSettings, slack_team_id: str) -> None:
    async with Database(settings) as db:
        tenant_id = await _tenant_of(db, slack_team_id)
        async with db.unit_of_work(tenant_id) as uow:
            tenant = await uow.tenants.get()
            stats = await uow.tenants.stats()
    table = Table(title=f"{tenant.slack_team_name if tenant else slack_team_id} ({slack_team_id})")
    table.add_column("")
    table.add_column("count", justify="right")
    for name in stats.__dataclass_fields__:
        table.add_row(name.replace("_", " "), str(getattr(stats, name)))
    out.print(table)


async def _audit(
    settings: DatabaseSettings, slack_team_id: str, *, failures: bool, days: int, limit: int
) -> None:
    async with Database(settings) as db:
        tenant_id = await _tenant_of(db, slack_team_id)
        async with db.unit_of_work(tenant_id) as uow:
            if failures:
                events = await uow.audit.recent_failures(hours=days * 24, limit=limit)
            else:
                events = await uow.audit.recent(days=days, limit=limit)
    out.print(_audit_table(events, title=f"audit events of {slack_team_id}, last {days} days"))


def _kept_heads(path: Path | None, *, command: str = "audit verify") -> list[KeptHead]:
    if path is None:
        return []
    try:
        return parse_kept_heads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValidationError) as exc:
        raise UsageProblem(f"{command} --kept {path}: {exc}") from None


def _head_line(slack_team_id: str, chain_seq: int, row_hash: bytes) -> str:
    """A chain's head as ``--kept FILE`` reads it back (:func:`parse_kept_heads`)."""
    return f"head {slack_team_id} {chain_seq} {row_hash.hex()}"


async def _verify_audit(
    settings: DatabaseSettings, slack_team_id: str | None, kept: Sequence[KeptHead]
) -> bool:
    found = await verify_audit_chains(settings, slack_team_id=slack_team_id, kept=kept)
    for _head, why in found.lost:
        _line(f"LOST {why}")
    for _head, why in found.retired:
        _line(f"RETIRED {why}")
    for chain in found.chains:
        if (broken := chain.broken) is None:
            continue
        where = "an event" if broken.chain_seq is None else f"place {broken.chain_seq}"
        event = "" if broken.event_id is None else f" (event {broken.event_id})"
        _line(f"BROKEN {chain.slack_team_id or chain.tenant_id}: {where}{event}: {broken.problem}")
    verdict = "verify" if not found.broken else "verify, the others do not" if found.chains else ""
    lost = f"; {len(found.lost)} kept heads lost" if found.lost else ""
    _line(
        f"{len(found.chains) - len(found.broken)} of {len(found.chains)} audit chains "
        f"({found.events} events) {verdict}".rstrip()
        + lost
    )
    if found.lost:
        return False  # no new heads to keep from chains that lost the old ones
    for chain in found.chains:
        if chain.head is not None and chain.broken is None and chain.slack_team_id:
            _line(_head_line(chain.slack_team_id, *chain.head))
    return found.ok


async def _retain_audit(settings: DatabaseSettings, months: int, ahead: int) -> None:
    done = await retain_audit_log(settings, months=months, months_ahead=ahead)
    for name in done.made:
        _line(f"made partition {name}")
    for partition in done.dropped:
        _line(
            f"dropped partition {partition.partition} ({partition.month:%Y-%m}: "
            f"{partition.events} events of {partition.workspaces} workspaces)"
        )
    for start in done.starts:
        _line(f"chain of {start.tenant_id} now starts at place {start.chain_seq}")
    _line(
        f"{len(done.dropped)} monthly partitions ({done.events} events) dropped; "
        f"the months that ended more than {months} months ago are gone"
    )


def _line(text: str) -> None:
    """One line of output, never wrapped (another run of the command may read it back)."""
    out.print(text, markup=False, highlight=False, soft_wrap=True)


def _audit_table(events: Sequence[Any], *, title: str) -> Table:
    table = Table(title=title)
    for column in ("when (UTC)", "event", "category", "status", "description"):
        table.add_column(column)
    for event in events:
        style = "" if event.status == "success" else "red"
        table.add_row(
            event.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            event.event_type,
            event.event_category,
            event.status,
            event.action_description,
            style=style,
        )
    return table


# -- the demo --------------------------------------------------------------------------


async def _demo(settings: DatabaseSettings, meetings: int) -> None:
    await _migrate(settings, "head")
    async with Database(settings) as db:
        with _progress(meetings) as advance:
            report = await demo.run(db, meetings, advance=advance)
    outcome = report.outcome
    out.print(
        f"\ningested {report.meetings} meetings: {outcome['completed']} completed "
        f"({outcome['retried']} after a failed first attempt), "
        f"{outcome['synced']} synced to the CRM, {outcome['sync_failed']} CRM syncs failed"
    )
    table = Table(title=f"workspace {demo.DEMO_TEAM_ID}")
    table.add_column("")
    table.add_column("count", justify="right")
    for name in report.stats.__dataclass_fields__:
        table.add_row(name.replace("_", " "), str(getattr(report.stats, name)))
    out.print(table)
    out.print(_audit_table(report.events, title="last audit events"))
    limits = Table(title="rate limit demo_exports (5 per minute)")
    for column in ("call", "allowed", "current", "remaining", "retry after (s)"):
        limits.add_column(column, justify="right")
    for n, decision in enumerate(report.decisions, start=1):
        limits.add_row(
            str(n),
            "yes" if decision.allowed else "[red]no[/red]",
            str(decision.current),
            str(decision.remaining),
            f"{decision.retry_after:.0f}",
        )
    out.print(limits)


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[], None]]:
    """One bar of meetings ingested, as :func:`_table_progress` draws it."""
    done = 0
    with _table_progress("ingesting") as bars:

        def advance() -> None:
            nonlocal done
            done += 1
            bars("meetings", done, total)

        yield advance


@contextlib.contextmanager
def _table_progress(verb: str) -> Iterator[ProgressCallback]:
    """A bar per table on stderr that appears only if the work takes more than a second."""
    started = time.monotonic()
    progress = Progress(
        TextColumn(f"{verb} " + "{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}
    shown = False

    def advance(table: str, done: int, total: int) -> None:
        nonlocal shown
        if table not in tasks:
            tasks[table] = progress.add_task(table, total=total)
        progress.update(tasks[table], completed=done, total=total)
        if not shown and time.monotonic() - started > 1.0:
            progress.start()
            shown = True

    try:
        yield advance
    finally:
        if shown:
            progress.stop()


# -- entry point -----------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    if args.command in ("generate-token-key", "generate-tenant-key"):
        generate = generate_key if args.command == "generate-token-key" else generate_tenant_key
        try:
            out.print(generate(args.key_id), markup=False, highlight=False, soft_wrap=True)
        except ConfigurationError as exc:
            raise UsageProblem(str(exc)) from None
        return 0
    with _settings() as settings:
        if args.command == "migrate":
            asyncio.run(_migrate(settings, args.revision))
        elif args.command == "downgrade":
            asyncio.run(_downgrade(settings, args.revision))
        elif args.command == "current":
            asyncio.run(_current(settings))
        elif args.command == "check":
            return 0 if asyncio.run(_check(settings)) else 1
        elif args.command == "info":
            asyncio.run(_info(settings))
        elif args.command == "demo":
            asyncio.run(_demo(settings, args.meetings))
        elif args.command == "create-login":
            password = _read_password()
            asyncio.run(_create_login(settings, args.name, password))
        elif args.command == "distribute":
            asyncio.run(_distribute(settings))
        elif args.command == "purge-rate-limits":
            asyncio.run(_purge_rate_limits(settings, args.older_than_days))
        elif args.command == "rotate-token-keys":
            asyncio.run(_rotate_token_keys(settings))
        elif args.command == "rotate-tenant-key":
            asyncio.run(_rotate_tenant_key(settings, finish=args.finish))
        elif args.command == "tenant":
            asyncio.run(_TENANT_ACTIONS[args.tenant_action](settings, args))
        elif args.command == "stats":
            asyncio.run(_stats(settings, args.slack_team_id))
        elif args.command == "audit":
            return _run_audit(settings, args)
    return 0


def _run_audit(settings: DatabaseSettings, args: argparse.Namespace) -> int:
    """``sfdb audit``: list one workspace's events, ``verify`` or ``retain``."""
    listing = (args.failures, args.days, args.limit) != (
        False,
        DEFAULT_AUDIT_DAYS,
        DEFAULT_AUDIT_LIMIT,
    )
    retaining = args.months is not None or args.ahead != DEFAULT_MONTHS_AHEAD
    if args.slack_team_id == "retain":
        if listing or args.kept is not None or args.verified_team_id is not None:
            raise UsageProblem("audit retain: only --months N and --ahead N")
        if args.months is None:
            raise UsageProblem("audit retain: --months N is required (N >= 1)")
        asyncio.run(_retain_audit(settings, args.months, args.ahead))
        return 0
    if args.slack_team_id == "verify":
        if listing:
            raise UsageProblem("audit verify: --failures, --days and --limit list events")
        if retaining:
            raise UsageProblem("audit verify: --months and --ahead are for retain")
        kept = _kept_heads(args.kept)
        return 0 if asyncio.run(_verify_audit(settings, args.verified_team_id, kept)) else 1
    if args.verified_team_id is not None or args.kept is not None or retaining:
        raise UsageProblem("audit: one workspace, verify [SLACK_TEAM_ID] or retain --months N")
    asyncio.run(
        _audit(
            settings, args.slack_team_id, failures=args.failures, days=args.days, limit=args.limit
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sfdb``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UsageProblem as exc:
        err.print(f"sfdb: {exc}", markup=False)
        return 2
    except (
        CommandError,
        SlackFathomDBError,
        SQLAlchemyError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
        TimeoutError,
    ) as exc:
        err.print(f"sfdb {args.command}: {_first_line(exc)}", markup=False)
        return 1
    except KeyboardInterrupt:
        return 130


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
