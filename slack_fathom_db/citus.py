"""Distributing a migrated database with Citus: ``await distribute(settings)``, ``sfdb distribute``.

``tenants`` becomes a reference table (a copy on every node); the
tenant-owned tables are distributed by ``tenant_id`` and colocated (the
partitioned ``audit_logs`` with its monthly partitions; a partition made later
is distributed as it is made, by the owner's function, with the triggers it
clones), so every
statement of a unit of work is routed to the one node that holds the tenant.
``sfdb_consume_rate_limit()`` is distributed by its tenant argument, so
``db.rate_limit`` runs, whole, on that node (one statement, as on a single
server). Besides the tables, Citus needs:

* the layer's roles to be able to log in: after ``SET LOCAL ROLE`` the
  coordinator opens its connections to the workers as that role (how they
  authenticate between nodes is the cluster's ``pg_hba.conf``, or
  ``pg_dist_authinfo``; none of them has a password);
* ``citus.propagate_set_commands = 'local'`` for the database, so the tenant
  claim and role set by ``SET LOCAL`` reach the workers (row-level security
  runs there);
* on every worker, the function that verifies tenant claims and a copy of the
  tenant keys (a table of the node's own: the function cannot read a
  distributed one).

Idempotent: what is already done is skipped. It runs on the owner's side
(``DATABASE_MIGRATION_URL``) on the coordinator, after ``sfdb migrate``; later migrations run on
the coordinator as usual, and Citus applies their DDL to every shard. A table that a later
migration adds is distributed by running it again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import asyncpg

from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import ConfigurationError, translate
from slack_fathom_db.maintenance import has_citus, sync_tenant_keys
from slack_fathom_db.models import AUDIT_CHAIN_TABLES, TENANT_OWNED_TABLES

if TYPE_CHECKING:
    from slack_fathom_db.roles import LayerRoles
    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["DISTRIBUTED_TABLES", "distribute", "is_distributed"]

REFERENCE_TABLE: Final = "tenants"
DISTRIBUTED_TABLES: Final = (*TENANT_OWNED_TABLES, *AUDIT_CHAIN_TABLES)
"""Distributed by ``tenant_id``, colocated: a table after those it references."""
RATE_LIMIT_FUNCTION: Final = (
    "sfdb_consume_rate_limit(uuid, text, text, timestamptz, integer, integer, integer)"
)
CLAIM_FUNCTION: Final = "sfdb_claimed_tenant()"
# What the audit chain's triggers call on the shards, beside the triggers' own functions
# (which Citus brings to the workers with the triggers).
CHAIN_FUNCTIONS: Final = (
    "sfdb_audit_personal(bytea, uuid, inet, text, text, jsonb)",
    "sfdb_audit_content(uuid, uuid, bigint, text, text, text, text, text, timestamptz, bytea)",
)
_ACTION: Final = "distribute"


async def distribute(settings: DatabaseSettings) -> list[str]:
    """Distribute the database of ``settings`` over its Citus cluster; return what was done.

    Raises :class:`ConfigurationError` (and changes nothing) when Citus is not
    installed in the database, no worker node is registered, or the database
    is not migrated.
    """
    url = settings.for_migrations().sqlalchemy_url().set(drivername="postgresql")
    try:
        conn = await asyncpg.connect(
            url.render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            statement_cache_size=0,
        )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_ACTION) from exc
    try:
        await _check_ready(conn)
        return await _distribute(conn, roles=settings.roles, database=url.database or "")
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_ACTION) from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def is_distributed(conn: asyncpg.Connection) -> bool:
    """Whether the database of ``conn`` has Citus and its tables are distributed."""
    if not await has_citus(conn):
        return False
    distributed: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_dist_partition WHERE logicalrelid = 'users'::regclass)"
    )
    return distributed


async def _check_ready(conn: asyncpg.Connection) -> None:
    if not await has_citus(conn):
        raise ConfigurationError(
            f"{_ACTION}: Citus is not installed in this database (CREATE EXTENSION citus "
            "on the coordinator and every worker, in this database)"
        )
    workers = await conn.fetchval(
        "SELECT count(*) FROM pg_dist_node WHERE noderole = 'primary' AND isactive AND groupid <> 0"
    )
    if workers == 0:
        raise ConfigurationError(
            f"{_ACTION}: no worker node is registered (on the coordinator: SELECT "
            "citus_set_coordinator_host(...); SELECT citus_add_node(<worker host>, <port>))"
        )
    if await conn.fetchval("SELECT to_regclass('public.tenants') IS NULL"):
        raise ConfigurationError(f"{_ACTION}: the database is not migrated (run sfdb migrate)")


async def _distribute(conn: asyncpg.Connection, *, roles: LayerRoles, database: str) -> list[str]:
    done: list[str] = []
    placed = {
        row["name"]: row["method"]
        for row in await conn.fetch(
            "SELECT logicalrelid::regclass::text AS name, partmethod::text AS method "
            "FROM pg_dist_partition"
        )
    }
    # tenants is referenced by every other table: as a reference table it would turn
    # them into Citus-local tables first, which cannot then be distributed.
    await conn.execute("SET citus.enable_local_reference_table_foreign_keys TO off")
    # The audit log's append-only triggers only raise: safe to run on every shard.
    await conn.execute("SET citus.enable_unsafe_triggers TO on")
    if placed.get(REFERENCE_TABLE) != "n":
        await conn.execute("SELECT create_reference_table($1)", REFERENCE_TABLE)
        done.append(f"{REFERENCE_TABLE}: reference table")
    for table in DISTRIBUTED_TABLES:
        if placed.get(table) == "h":
            continue
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}"):
            continue  # a revision before the table: distributed once a later migration makes it
        colocate = "default" if table == DISTRIBUTED_TABLES[0] else DISTRIBUTED_TABLES[0]
        await conn.execute(
            "SELECT create_distributed_table($1, 'tenant_id', colocate_with => $2)", table, colocate
        )
        done.append(f"{table}: distributed by tenant_id")
    if await _copy_column_grants(conn):
        done.append("column privileges copied to the shards")
    delegated = await conn.fetchval(
        "SELECT distribution_argument_index IS NOT NULL FROM pg_dist_object "
        "WHERE classid = 'pg_proc'::regclass AND objid = $1::regprocedure",
        RATE_LIMIT_FUNCTION,
    )
    if not delegated:
        # Called as ``SELECT sfdb_consume_rate_limit(...)`` the whole function runs on the
        # node of its tenant, also inside a transaction block (PgBouncer wraps it in one).
        await conn.execute(
            "SELECT create_distributed_function($1, '$1', colocate_with => 'api_rate_limits', "
            "force_delegation => true)",
            RATE_LIMIT_FUNCTION,
        )
        done.append("sfdb_consume_rate_limit: runs on the node of its tenant")
    # Every worker checks tenant claims (its shards' policies call the function) with its
    # own copy of the keys, and chains the audit events of its shards.
    for function in (CLAIM_FUNCTION, *CHAIN_FUNCTIONS):
        if await conn.fetchval(
            "SELECT to_regprocedure($1) IS NOT NULL AND NOT EXISTS (SELECT FROM pg_dist_object "
            "WHERE classid = 'pg_proc'::regclass AND objid = to_regprocedure($1))",
            function,
        ):
            await conn.execute("SELECT create_distributed_function($1)", function)
            done.append(f"{function.partition('(')[0]}(): on every node")
    claims = await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", CLAIM_FUNCTION)
    if claims and await sync_tenant_keys(conn):
        done.append("tenant keys copied to every worker")
    # The coordinator connects to the workers as the role in effect: the app role in a
    # unit of work, the directory role outside one, the owner during migrations.
    for role in (roles.app, roles.directory, roles.owner):
        # False: exists and may not log in yet (None: a revision before the role was made).
        if (
            await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role)
            is False
        ):
            await conn.execute(f'ALTER ROLE "{role}" LOGIN')
            done.append(f"{role}: may log in (the coordinator connects to workers as it)")
    setting = await conn.fetchval(
        "SELECT setconfig FROM pg_db_role_setting JOIN pg_database d ON d.oid = setdatabase "
        "WHERE d.datname = current_database() AND setrole = 0"
    )
    if "citus.propagate_set_commands=local" not in (setting or []):
        quoted = database.replace('"', '""')  # an identifier: double any quote inside
        await conn.execute(
            f"ALTER DATABASE \"{quoted}\" SET citus.propagate_set_commands = 'local'"
        )
        done.append("citus.propagate_set_commands = local (for new connections)")
    return done


async def _copy_column_grants(conn: asyncpg.Connection) -> bool:
    """Give every shard the column privileges of its table; ``True`` if any were missing.

    ``create_distributed_table`` copies a table's privileges to its shards, but not
    its column privileges (the layer grants INSERT and UPDATE column by column).
    Granting them again on the distributed table makes Citus send them to every
    shard; doing so when they are already there changes nothing.
    """
    tables = [
        table
        for table in (REFERENCE_TABLE, *DISTRIBUTED_TABLES)
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}")
    ]
    rows = await conn.fetch(
        "SELECT c.relname AS table_name, g.rolname AS grantee, x.privilege_type AS privilege, "
        "array_agg(quote_ident(a.attname::text) ORDER BY a.attnum) AS columns "
        "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "CROSS JOIN LATERAL aclexplode(a.attacl) x JOIN pg_roles g ON g.oid = x.grantee "
        "WHERE c.relname = ANY($1::text[]) AND c.relnamespace = 'public'::regnamespace "
        "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        tables,
    )
    missing = False
    for table in tables:
        expected = await conn.fetchval(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = $1::regclass "
            "AND attacl IS NOT NULL",
            table,
        )
        missing = missing or await conn.fetchval(
            "SELECT coalesce(bool_or(NOT success OR result::int < $2), false) "
            "FROM run_command_on_shards($1, 'SELECT count(*) FROM pg_attribute "
            "WHERE attrelid = ''%s''::regclass AND attacl IS NOT NULL')",
            table,
            expected,
        )
    if not missing:
        return False
    for row in rows:
        columns = ", ".join(row["columns"])
        await conn.execute(
            f'GRANT {row["privilege"]} ({columns}) ON {row["table_name"]} TO "{row["grantee"]}"'
        )
    return True
