"""The attacker of the security tests, written once: code that sends SQL as the runtime login.

Two channels, as the README's threat model has them:

* a raw asyncpg connection made from the runtime login's URL (:func:`attacker`),
  straight to the server, in autocommit;
* statements inside a unit of work (:func:`slack_fathom_db.testing.execute_in`),
  in the unit of work's own transaction, as the app role with its tenant set.

On either channel the attacker first becomes one of the roles the login can
reach (:data:`MOVES`): ``RESET ROLE`` (the login on a raw connection, the
directory role, the session's role, inside a unit of work on a direct
connection), or ``SET ROLE`` the login, the app role or the directory role.
Every attempt runs in a transaction that is rolled back whatever happens, so an
attack that is not refused changes nothing for the next test either; a
superuser's :func:`fingerprint` of rows and catalog shows that a refused one
changed nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from slack_sdk.oauth.installation_store import Installation

from slack_fathom_db.errors import sqlstate_of
from slack_fathom_db.models import TENANT_OWNED_TABLES
from slack_fathom_db.slack import InstallationStore
from slack_fathom_db.testing import execute_in
from tests.helpers import dsn, unique_team_id, unique_user_id

if TYPE_CHECKING:
    import uuid
    from collections.abc import AsyncIterator, Iterable

    from sqlalchemy.engine import URL

    from slack_fathom_db import Database, DatabaseSettings, TenantId

CONNECT_TIMEOUT: Final = 10.0
"""Seconds the attacker waits for a connection, and for any answer (``command_timeout``)."""
STATEMENT_TIMEOUT: Final = 30.0

MOVES: Final = ("reset", "login", "app", "directory")
"""The roles the runtime login can reach, by the statement that reaches each (:func:`become`)."""

TENANT_OWNED: Final = TENANT_OWNED_TABLES
TABLES: Final = ("tenants", *TENANT_OWNED)
_ORDER: Final = {
    "tenants": "id",
    "users": "id",
    "crm_connections": "id",
    "account_mappings": "id",
    "meeting_sessions": "id",
    "audit_logs": "id",
    "api_rate_limits": "tenant_id, resource_type, period, window_start",
    "slack_installations": "id",
    "slack_bots": "id",
    "slack_oauth_states": "state_digest",
}
SECRET_REFERENCE: Final = "arn:aws:secretsmanager:us-east-1:123456789012:secret:crm/hubspot"


def names(settings: DatabaseSettings) -> dict[str, str]:
    """The role and login names an attack's text may use: ``{owner}``, ``{app}``, ``{login}``…"""
    roles = settings.roles
    login = settings.sqlalchemy_url().username
    migrator = settings.for_migrations().sqlalchemy_url().username
    assert login is not None
    assert migrator is not None
    return {
        "owner": roles.owner,
        "app": roles.app,
        "directory": roles.directory,
        "login": login,
        "migrator": migrator,
    }


def become(move: str, settings: DatabaseSettings) -> str:
    """The statement with which the attacker becomes the role of ``move`` (see :data:`MOVES`)."""
    if move == "reset":
        return "RESET ROLE"
    return f'SET ROLE "{names(settings)[move]}"'


@contextlib.asynccontextmanager
async def attacker(url: URL) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection to ``url`` (the runtime login's, unless a test says otherwise)."""
    conn = await asyncpg.connect(
        dsn(url),
        timeout=CONNECT_TIMEOUT,
        command_timeout=STATEMENT_TIMEOUT,
        statement_cache_size=0,
    )
    try:
        yield conn
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)


@dataclass(frozen=True)
class Outcome:
    """What one attempt gave: the refusal (SQLSTATE and message) or the rows it returned."""

    channel: str
    move: str
    sqlstate: str | None
    message: str
    rows: tuple[tuple[Any, ...], ...] = ()

    def __str__(self) -> str:
        got = f"{self.sqlstate} {self.message}" if self.sqlstate else f"ran: {self.rows[:3]}"
        return f"{self.channel}, {self.move}: {got}"


def _refusal(channel: str, move: str, exc: BaseException) -> Outcome:
    first_line = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return Outcome(channel, move, sqlstate_of(exc), first_line)


async def raw_attempt(
    conn: asyncpg.Connection, settings: DatabaseSettings, move: str, sql: str
) -> Outcome:
    """``sql`` on a raw connection after ``move``, in a transaction that is rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(become(move, settings))
        rows = await conn.fetch(sql)
    except asyncpg.PostgresError as exc:
        return _refusal("raw", move, exc)
    finally:
        await transaction.rollback()
    return Outcome("raw", move, None, "", tuple(tuple(row) for row in rows))


async def uow_attempt(
    db: Database, settings: DatabaseSettings, tenant: TenantId, move: str, sql: str
) -> Outcome:
    """``sql`` inside a unit of work of ``tenant`` after ``move``; never committed."""
    try:
        async with db.unit_of_work(tenant) as uow:
            await execute_in(uow, become(move, settings))
            result = await execute_in(uow, sql)
            rows = tuple(tuple(row) for row in result.all())
            await uow.rollback()
    except asyncpg.PostgresError as exc:
        return _refusal("unit of work", move, exc)
    return Outcome("unit of work", move, None, "", rows)


async def every_attempt(
    db: Database, settings: DatabaseSettings, tenant: TenantId, sql: str
) -> list[Outcome]:
    """``sql`` as every role the login reaches, on both channels (see the module docstring)."""
    outcomes = []
    async with attacker(settings.sqlalchemy_url()) as conn:
        for move in MOVES:
            outcomes.append(await raw_attempt(conn, settings, move, sql))
    for move in MOVES:
        outcomes.append(await uow_attempt(db, settings, tenant, move, sql))
    return outcomes


def escapes(outcomes: Iterable[Outcome], *, allowed: Iterable[str] = ("42501",)) -> list[str]:
    """The outcomes that are not a refusal with one of the ``allowed`` SQLSTATEs."""
    codes = set(allowed)
    return [str(outcome) for outcome in outcomes if outcome.sqlstate not in codes]


# -- what a superuser sees -----------------------------------------------------------------

_CATALOG: Final = {
    "relations": "SELECT relname, relkind, relowner::regrole::text, relrowsecurity, "
    "relforcerowsecurity, relacl::text FROM pg_class "
    "WHERE relnamespace = 'public'::regnamespace ORDER BY relname",
    "policies": "SELECT polrelid::regclass::text, polname, polcmd, polpermissive, "
    "polroles::regrole[]::text, pg_get_expr(polqual, polrelid), "
    "pg_get_expr(polwithcheck, polrelid) FROM pg_policy ORDER BY 1, 2",
    "triggers": "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger "
    "WHERE NOT tgisinternal ORDER BY 1, 2",
    "functions": "SELECT oid::regprocedure::text, proowner::regrole::text, prosecdef, "
    "proconfig::text, proacl::text, md5(prosrc) FROM pg_proc "
    "WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    "schemas": "SELECT nspname, nspowner::regrole::text, nspacl::text FROM pg_namespace ORDER BY 1",
    "extensions": "SELECT extname, extversion FROM pg_extension ORDER BY 1",
    "database": "SELECT datname, datdba::regrole::text, datacl::text FROM pg_database "
    "WHERE datname = current_database()",
    "roles": "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, "
    "rolbypassrls, rolconnlimit, rolvaliduntil::text, md5(coalesce(rolpassword, '')) "
    "FROM pg_authid ORDER BY 1",
    "memberships": "SELECT roleid::regrole::text, member::regrole::text, admin_option "
    "FROM pg_auth_members ORDER BY 1, 2",
    "role settings": "SELECT setdatabase, setrole::regrole::text, setconfig::text "
    "FROM pg_db_role_setting ORDER BY 1, 2",
}

Fingerprint = dict[str, list[str]]


async def fingerprint(admin: asyncpg.Connection) -> Fingerprint:
    """Every row of the layer's tables and the catalog that guards them, as a superuser sees it.

    Rows are hashed table by table (a difference names the table); the catalog
    (owners, row-level security, policies, triggers, functions, schemas,
    extensions, the database's grants, roles with their password hashes,
    memberships and per-role settings) is kept as text.
    """
    seen: Fingerprint = {}
    for table in (*TABLES, "slack_oauth_states"):
        rows = await admin.fetch(
            f"SELECT row_to_json(t)::text AS j FROM {table} t ORDER BY {_ORDER[table]}"
        )
        digest = hashlib.sha256("\n".join(row["j"] for row in rows).encode()).hexdigest()
        seen[f"rows of {table}"] = [f"{len(rows)} rows, sha256 {digest}"]
    for part, sql in _CATALOG.items():
        seen[part] = [repr(tuple(row)) for row in await admin.fetch(sql)]
    return seen


def changes(before: Fingerprint, after: Fingerprint) -> list[str]:
    """The parts of two fingerprints that differ, by name."""
    return [part for part in before if before[part] != after.get(part)]


# -- a tenant with one row in every table ---------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """A tenant with a row in each tenant-owned table, made through the layer."""

    tenant: TenantId
    slack_team_id: str
    user_id: uuid.UUID


SLACK_CLIENT_ID: Final = "1111.2222"
BOT_TOKEN: Final = "xoxb-seeded-{team}"
"""The seeded workspace's bot token, as Slack would have issued it."""


async def seeded(db: Database, name: str) -> Seeded:
    """Install a workspace through Bolt's store (a Slack installation and bot), and give it
    a user, a CRM connection, a mapping, a meeting, an audit row and a rate-limit window."""
    team = unique_team_id()
    await InstallationStore(db, client_id=SLACK_CLIENT_ID).async_save(
        Installation(
            team_id=team,
            team_name=name,
            user_id=unique_user_id(),
            bot_id="B0SEEDED",
            bot_user_id="U0SEEDED",
            bot_token=BOT_TOKEN.format(team=team),
            bot_refresh_token=f"xoxe-1-seeded-{team}",
            user_token=f"xoxp-seeded-{team}",
        )
    )
    tenant = await db.directory.resolve(team)
    assert tenant is not None
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        crm = await uow.tenants.connect_crm(
            provider_type="hubspot", credentials_secret_id=SECRET_REFERENCE, is_default=True
        )
        await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain=f"{secrets.token_hex(4)}.example.com",
            crm_account_id="acct-1",
        )
        await uow.meetings.create(
            user_id=user.id, fathom_recording_id=f"rec-{secrets.token_hex(6)}", title="Call"
        )
        await uow.audit.log_event(
            event_type="meeting.created",
            event_category="data",
            action_description="seeded",
            user_id=user.id,
        )
        await uow.rate_limits.consume("seeded", limit=100)
        await uow.commit()
    return Seeded(tenant=tenant, slack_team_id=team, user_id=user.id)


# -- the world an attack runs in ------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Two tenants with a row in every table; the attacker works from tenant ``a``."""

    a: Seeded
    b: Seeded
    settings: DatabaseSettings  # the runtime login's, straight to the server

    def sql(self, template: str) -> str:
        """``template`` with the role names, ``{tenant}`` (a), ``{other}`` and ``{other_team}``."""
        return template.format(
            **names(self.settings),
            tenant=self.a.tenant,
            other=self.b.tenant,
            other_team=self.b.slack_team_id,
        )


async def refused_everywhere(
    db: Database,
    world: World,
    admin: asyncpg.Connection,
    template: str,
    *,
    allowed: tuple[str, ...] = ("42501",),
) -> list[Outcome]:
    """Run the attack as every reachable role on both channels: all refused, nothing changed."""
    before = await fingerprint(admin)
    outcomes = await every_attempt(db, world.settings, world.a.tenant, world.sql(template))
    escaped = escapes(outcomes, allowed=allowed)
    assert not escaped, "not refused:\n" + "\n".join(escaped)
    assert changes(before, await fingerprint(admin)) == []
    return outcomes
