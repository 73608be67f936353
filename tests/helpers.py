"""Helpers the tests share, written once: users, DSNs, typed reads, pool figures, and the
server's view.

Reads through a superuser connection come back typed (a missing row or a value
of the wrong type fails the test where it is read). What tests ask of the
server beyond the layer is written to hold on one server and on Citus.

On a Citus cluster a statement on a distributed table runs on the worker that
holds the tenant's shard: a lock wait shows there (the coordinator's backend
only waits for the worker's answer), and an error raised there reaches the
client as a message only, naming the shard's constraint (the schema's name
with ``_<shard id>`` appended). ``lock_waiters`` and ``reported_constraint`` see
through that, so one test holds in every pass. ``reported_constraint`` also names a
partitioned table (``audit_logs``) where the error names its partition.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, TypeVar

import asyncpg
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from slack_fathom_db import Database
from slack_fathom_db.claims import TenantKey

if TYPE_CHECKING:
    import uuid
    from collections.abc import Sequence

    from slack_fathom_db.records import User
    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.tenancy import TenantId

T = TypeVar("T")


def claim_for(settings: DatabaseSettings, tenant: uuid.UUID, **how: int) -> str:
    """A claim for ``tenant`` signed with the test database's key, as a unit of work signs
    one (``how``: ``backend_pid``, ``issued_ms``; by default for any backend, issued now)."""
    return TenantKey.from_settings(settings).sign(tenant, **how)


def set_local(name: str, value: str) -> str:
    """``SET LOCAL name = 'value'``: what Citus passes on to its workers (set_config() not)."""
    quoted = value.replace("'", "''")
    return f"SET LOCAL {name} = '{quoted}'"


def claim_statement(settings: DatabaseSettings, tenant: TenantId) -> str:
    """The ``SET LOCAL`` of a claim for ``tenant`` signed now with the database's key, as a
    unit of work's transaction opens (its rows visible to the app role)."""
    return set_local("app.tenant_claim", claim_for(settings, tenant))


def unique_team_id() -> str:
    """A Slack team id no other test uses."""
    return "T" + secrets.token_hex(6).upper()


def unique_user_id() -> str:
    """A Slack user id no other test uses."""
    return "U" + secrets.token_hex(6).upper()


def unique_enterprise_id() -> str:
    """A Slack Enterprise Grid id no other test uses."""
    return "E" + secrets.token_hex(6).upper()


async def add_user(db: Database, tenant: TenantId, **fields: str) -> User:
    """A new, committed user of ``tenant`` (a fresh Slack id; ``fields`` as ``add_user`` takes)."""
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id(), **fields)
        await uow.commit()
    return user


async def count_live_users(admin: asyncpg.Connection, tenant: TenantId, slack_user: str) -> int:
    """Live (not soft-deleted) users of ``tenant`` with that Slack id, as a superuser sees them."""
    return await fetch_value(
        admin,
        int,
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2 "
        "AND deleted_at IS NULL",
        tenant,
        slack_user,
    )


def dsn(source: URL | DatabaseSettings) -> str:
    """A libpq ``postgresql://`` URL (password included) for asyncpg or a subprocess."""
    url = source if isinstance(source, URL) else source.sqlalchemy_url()
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def fetch_row(conn: asyncpg.Connection, sql: str, *args: object) -> asyncpg.Record:
    """The first row ``sql`` returns; fails the test when it returns none."""
    row = await conn.fetchrow(sql, *args)
    assert row is not None, f"no row: {sql}"
    return row


async def fetch_value(conn: asyncpg.Connection, kind: type[T], sql: str, *args: object) -> T:
    """The first column of the first row ``sql`` returns; fails the test unless it is a ``kind``."""
    value = await conn.fetchval(sql, *args)
    assert isinstance(value, kind), f"{sql} returned {value!r}, not a {kind.__name__}"
    return value


def queue_pool(db: Database) -> QueuePool:
    """The pool of ``db``'s engine, whose figures tests read (a ``Database`` pools in a queue)."""
    pool = db._pool().pool  # engine_of(db).pool; the plugin module is for pytest to import
    assert isinstance(pool, QueuePool), pool
    return pool


def checked_out(db: Database) -> int:
    """Connections of ``db``'s pool that are checked out now."""
    return queue_pool(db).checkedout()


async def pooled_backend_pid(db: Database) -> int:
    """The backend of a connection taken from ``db``'s pool and put back, as it is.

    Nothing of a unit of work runs on it (``execute_in`` would have the unit of work
    drop its connection): with a one-connection pool, it is the connection the next
    unit of work gets, or the one the last gave back.
    """
    async with db._pool().connect() as conn:
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
    assert isinstance(pid, int), pid
    return pid


async def on_citus(conn: asyncpg.Connection) -> bool:
    """Whether the database of ``conn`` has the Citus extension."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
    )
    return found


async def lock_waiters(conn: asyncpg.Connection, *, updating: str | None = None) -> list[int]:
    """The backends of this database that wait on a lock, by the pid of the client's session.

    On Citus, waits on every node count, each by the pid of the coordinator
    session it works for. ``updating`` keeps only waits in ``UPDATE`` of that
    table (on a worker, of one of its shards).
    """
    pattern = rf"^\s*UPDATE\s+(public\.)?{updating}(_[0-9]+)?\s" if updating else ""
    if await on_citus(conn):
        sql = (
            "SELECT DISTINCT citus_pid_for_gpid(global_pid) AS pid FROM citus_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND citus_nodeid_for_gpid(global_pid) = (SELECT nodeid FROM pg_dist_node "
            "WHERE groupid = 0) AND query ~* $1"
        )
    else:
        sql = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query ~* $1"
        )
    return [row["pid"] for row in await conn.fetch(sql, pattern)]


async def reported_constraint(
    conn: asyncpg.Connection, exc: asyncpg.PostgresError
) -> tuple[str, str]:
    """The table and the constraint (or unique index) a violation reports, as the schema has them.

    On Citus the name is only in the message (the coordinator passes on the
    worker's message, not its fields) and is the shard's: the schema's name and
    ``_<shard id>``, which Citus shortens to a prefix and a hash when it would
    outgrow PostgreSQL's 63 bytes.
    """
    if not await on_citus(conn):
        assert exc.table_name, f"the error names no table: {exc!r}"
        assert exc.constraint_name, f"the error names no constraint: {exc!r}"
        qualified = f'"{exc.schema_name}"."{exc.table_name}"'
        return await _partitioned_table(conn, qualified), exc.constraint_name
    quoted = re.fullmatch(r'.*constraint "(.+)_([0-9]+)"', str(exc).splitlines()[0])
    assert quoted, f"the error names no constraint of a shard: {exc!r}"
    name, shard = quoted.group(1), int(quoted.group(2))
    table = await conn.fetchval(
        "SELECT logicalrelid::regclass::text FROM pg_dist_shard WHERE shardid = $1", shard
    )
    assert table, f"{shard} is not a shard: {exc!r}"
    names = {
        row["name"]
        for row in await conn.fetch(
            "SELECT conname::text AS name FROM pg_constraint WHERE conrelid = $1::regclass "
            "UNION SELECT relname::text FROM pg_class WHERE oid IN "
            "(SELECT indexrelid FROM pg_index WHERE indrelid = $1::regclass)",
            table,
        )
    }
    shortened = re.fullmatch(r"(.+)_[0-9a-f]{8}", name)
    found = [name] if name in names else []
    if not found and shortened:
        found = [n for n in names if n.startswith(shortened.group(1))]
    assert len(found) == 1, (name, table, found)
    return await _partitioned_table(conn, table), found[0]


async def _partitioned_table(conn: asyncpg.Connection, table: str) -> str:
    """``table``, or the partitioned table it is a partition of (a partition reports the
    constraints it took from that table under their names)."""
    root: str = await conn.fetchval(
        "SELECT coalesce(pg_partition_root($1::regclass), $1::regclass)::regclass::text", table
    )
    return root


async def refused_to_every_runtime_role(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    tenant: TenantId,
    statements: Sequence[str],
) -> None:
    """Each statement, sent with ``tenant``'s claim as the app role, the directory role and
    the runtime login itself (what code that can send SQL as the login may become), is
    refused for want of a privilege (SQLSTATE 42501); ``admin`` is a superuser's."""
    login = settings.sqlalchemy_url().username
    assert login, "the test database's URL names no login"
    for role in (settings.roles.app, settings.roles.directory, login):
        for sql in statements:
            async with admin.transaction():
                await admin.execute(f'SET LOCAL ROLE "{role}"')
                await admin.execute(claim_statement(settings, tenant))
                try:
                    await admin.execute(sql)
                except asyncpg.InsufficientPrivilegeError:
                    continue
                raise AssertionError(f"{role} was allowed: {sql}")
