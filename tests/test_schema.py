"""The schema after ``upgrade head``, read back from the PostgreSQL catalog, and enforced by it.

Nothing here looks at the SQLAlchemy models: the catalog (``pg_class``,
``pg_constraint``, ``pg_index``/``pg_indexes``, ``pg_policy``, ``pg_trigger``,
``pg_proc``, ``pg_roles``, ``information_schema``) is what the migrations
actually built: tables, policies, and the least-privilege roles (owner, app,
directory, the runtime login), their ownership and their grants, column by
column, with nothing for PUBLIC. The second half writes real rows with raw SQL
on a superuser connection and shows that the database itself refuses what the
design forbids, and that row-level security scopes the app role to the one
tenant of a signed claim the database verifies (``app.tenant_claim``, made here
with the test database's ``DATABASE_TENANT_KEY`` as a unit of work makes it).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import DatabaseSettings
from slack_fathom_db.claims import TenantKey, generate_tenant_key
from slack_fathom_db.models import TENANT_OWNED_TABLES, Base
from tests.conftest import superuser_connection
from tests.helpers import (
    claim_for,
    on_citus,
    reported_constraint,
    set_local,
    unique_team_id,
    unique_user_id,
)

TABLES = frozenset(
    {
        "tenants",
        "users",
        "crm_connections",
        "meeting_sessions",
        "account_mappings",
        "audit_logs",
        "api_rate_limits",
        "slack_installations",
        "slack_bots",
    }
)
GLOBAL_TABLES = frozenset({"tenants", "slack_oauth_states"})
OWNER_TABLES = frozenset(
    {
        "tenant_claim_keys",
        "audit_chain",
        "audit_chain_heads",
        "audit_chain_starts",
        "audit_retention",
    }
)
"""The layer's tables no runtime role holds anything of: the owner's alone."""
ALL_TABLES = TABLES | GLOBAL_TABLES | OWNER_TABLES
TENANT_OWNED = sorted(TABLES - {"tenants"})
SOFT_DELETED = ("tenants", "users", "crm_connections", "meeting_sessions", "account_mappings")

CLAIMED_TENANT = "sfdb_claimed_tenant()"
"""What the app role's tenant policies compare with: the tenant of a verified claim."""
PLAIN_TENANT = "NULLIF(current_setting('app.tenant_id', true), '')::uuid"
"""What the owner's own rate-limit policy compares with (its function sets it)."""

# TRIGGER_TYPE_* bits of pg_trigger.tgtype (src/include/catalog/pg_trigger.h).
TRIGGER_ROW, TRIGGER_BEFORE, TRIGGER_INSERT, TRIGGER_DELETE, TRIGGER_UPDATE, TRIGGER_TRUNCATE = (
    1,
    2,
    4,
    8,
    16,
    32,
)

INDEXES_SQL = """
SELECT c.relname AS table_name,
       ic.relname AS index_name,
       i.indisunique AS is_unique,
       i.indisprimary AS is_primary,
       ARRAY(
           SELECT coalesce(a.attname::text, '<expression>')
           FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           WHERE k.ord <= i.indnkeyatts
           ORDER BY k.ord
       ) AS columns,
       pg_get_expr(i.indpred, i.indrelid) AS predicate
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE c.relnamespace = 'public'::regnamespace
"""

CONSTRAINTS_SQL = """
SELECT con.conname AS name,
       con.contype AS kind,
       c.relname AS table_name,
       rc.relname AS ref_table,
       ARRAY(
           SELECT a.attname::text
           FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
           ORDER BY k.ord
       ) AS columns,
       ARRAY(
           SELECT a.attname::text
           FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
           ORDER BY k.ord
       ) AS ref_columns,
       con.confdeltype AS on_delete,
       con.confupdtype AS on_update,
       pg_get_constraintdef(con.oid) AS definition
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
LEFT JOIN pg_class rc ON rc.oid = con.confrelid
WHERE con.connamespace = 'public'::regnamespace
"""


OWNER_POLICIES = {
    ("api_rate_limits", "select_ended_windows", b"r"),
    ("api_rate_limits", "delete_ended_windows", b"d"),
}
# The owner's own policies of migration 0007: its functions (Bolt's lookups and saves, run
# for the directory role) and sfdb rotate-token-keys read and write the installation tables,
# and its saves add audit rows. ``(table, name, command): (USING, WITH CHECK)``.
OWNER_MAINTENANCE = {
    ("slack_installations", "owner_maintains", b"*"): ("true", "true"),
    ("slack_bots", "owner_maintains", b"*"): ("true", "true"),
    ("audit_logs", "owner_records", b"a"): (None, "true"),
    # sfdb audit verify (migration 0009) reads every chain as the owner.
    ("audit_logs", "audit_verifier", b"r"): ("true", None),
}
ENDED_WINDOWS = "period <> 'bucket' AND sfdb_window_end(period, window_start) <= now()"
# The owner's policy of migration 0008 for sfdb_consume_rate_limit(), which sets the plain
# setting itself from its argument: the one table the owner writes a tenant's rows of so.
OWNER_SCOPED = {("api_rate_limits", "owner_scoped", b"*")}
# The owner's policies of migration 0010 for the lifecycle commands (export, import,
# erasure): the one workspace that ``sfdb.lifecycle_tenant`` names.
LIFECYCLE_TENANT = "NULLIF(current_setting('sfdb.lifecycle_tenant', true), '')::uuid"
OWNER_LIFECYCLE = {
    # Migration 0012: the owner's erasure (a trigger allows only the de-identifying update).
    ("audit_logs", "owner_erases", b"w"),
    *(
        (table, "owner_lifecycle", b"*")
        for table in (
            "users",
            "crm_connections",
            "account_mappings",
            "meeting_sessions",
            "api_rate_limits",
        )
    ),
}


def _normalise(expression: str) -> str:
    """An SQL expression without casts to text, parentheses and blanks, for comparison."""
    return re.sub(r"[()\s]", "", expression.replace("::text", ""))


@contextlib.asynccontextmanager
async def rolled_back(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A transaction that is always rolled back, so a test leaves nothing behind."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield conn
    finally:
        await transaction.rollback()


@contextlib.asynccontextmanager
async def as_app_role(
    conn: asyncpg.Connection,
    settings: DatabaseSettings,
    tenant: uuid.UUID | None,
    *,
    claim: str | None = None,
    plain: str | None = None,
) -> AsyncIterator[asyncpg.Connection]:
    """``BEGIN; SET LOCAL ROLE <app role>; SET LOCAL app.tenant_claim = ...``, rolled back after.

    The claim is one for ``tenant`` signed with the test database's key, or ``claim``
    as it is (none when both are ``None``); ``plain`` sets the plain ``app.tenant_id``
    besides, which the app role's policies no longer read.
    """
    async with rolled_back(conn):
        await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
        if tenant is not None:
            claim = claim_for(settings, tenant)
        if claim is not None:
            await conn.execute(set_local("app.tenant_claim", claim))
        if plain is not None:
            await conn.execute(set_local("app.tenant_id", plain))
        yield conn


def insert_sql(table: str, values: dict[str, object]) -> tuple[str, list[object]]:
    """``INSERT INTO table (...) VALUES ($1, ...)`` and its arguments."""
    placeholders = ", ".join(f"${n}" for n in range(1, len(values) + 1))
    return f"INSERT INTO {table} ({', '.join(values)}) VALUES ({placeholders})", list(
        values.values()
    )


async def insert(conn: asyncpg.Connection, table: str, values: dict[str, object]) -> None:
    """Insert one row with raw SQL."""
    sql, args = insert_sql(table, values)
    await conn.execute(sql, *args)


# -- seeded rows ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seeded:
    """One tenant with a row in every tenant-owned table."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    crm_connection_id: uuid.UUID
    meeting_id: uuid.UUID
    account_mapping_id: uuid.UUID
    audit_id: uuid.UUID


def minimal_row(table: str, seed: Seeded) -> dict[str, object]:
    """A valid new row of ``table`` for ``seed``'s tenant (a new tenant for ``tenants``)."""
    tag = secrets.token_hex(4)
    rows: dict[str, dict[str, object]] = {
        "tenants": {"slack_team_id": unique_team_id(), "slack_team_name": "Schema test"},
        "users": {"tenant_id": seed.tenant_id, "slack_user_id": unique_user_id()},
        "crm_connections": {
            "tenant_id": seed.tenant_id,
            "provider_type": "hubspot",
            "credentials_secret_id": "vault:crm/acme",
        },
        "meeting_sessions": {
            "tenant_id": seed.tenant_id,
            "user_id": seed.user_id,
            "fathom_recording_id": f"rec-{tag}",
            "title": "Pipeline review",
        },
        "account_mappings": {
            "tenant_id": seed.tenant_id,
            "crm_connection_id": seed.crm_connection_id,
            "email_domain": f"d{tag}.example.com",
            "crm_account_id": f"acct-{tag}",
        },
        "audit_logs": {
            "tenant_id": seed.tenant_id,
            "event_type": "schema.test",
            "event_category": "data",
            "action_description": "Inserted by the schema tests",
        },
        "api_rate_limits": {
            "tenant_id": seed.tenant_id,
            "resource_type": f"schema-{tag}",
            "period": "daily",
            "window_start": datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
            "request_count": 1,
        },
        # No token: tokens are ciphertexts only the application makes (and key rotation
        # in other tests reads every row).
        "slack_installations": {
            "tenant_id": seed.tenant_id,
            "client_id": "1111.2222",
            "team_id": unique_team_id(),
            "user_id": unique_user_id(),
            "installed_at": datetime.now(UTC),
        },
        "slack_bots": {
            "tenant_id": seed.tenant_id,
            "client_id": "1111.2222",
            "team_id": unique_team_id(),
            "installed_at": datetime.now(UTC),
        },
    }
    return rows[table]


async def seed_tenant(conn: asyncpg.Connection, name: str) -> Seeded:
    """Insert, as superuser, a tenant with one row in each tenant-owned table."""
    tenant_id = await conn.fetchval(
        "INSERT INTO tenants (slack_team_id, slack_team_name) VALUES ($1, $2) RETURNING id",
        unique_team_id(),
        name,
    )
    user_id = await conn.fetchval(
        "INSERT INTO users (tenant_id, slack_user_id, slack_email, display_name) "
        "VALUES ($1, $2, 'ana@acme.example.com', 'Ana') RETURNING id",
        tenant_id,
        unique_user_id(),
    )
    crm_id = await conn.fetchval(
        "INSERT INTO crm_connections "
        "(tenant_id, provider_type, credentials_secret_id, connected_by_user_id, is_default) "
        "VALUES ($1, 'hubspot', 'vault:crm/acme', $2, true) RETURNING id",
        tenant_id,
        user_id,
    )
    mapping_id = await conn.fetchval(
        "INSERT INTO account_mappings (tenant_id, crm_connection_id, email_domain, crm_account_id) "
        "VALUES ($1, $2, 'acme.example.com', 'acct-1') RETURNING id",
        tenant_id,
        crm_id,
    )
    meeting_id = await conn.fetchval(
        "INSERT INTO meeting_sessions "
        "(tenant_id, user_id, crm_connection_id, fathom_recording_id, title) "
        "VALUES ($1, $2, $3, $4, 'Discovery call') RETURNING id",
        tenant_id,
        user_id,
        crm_id,
        f"rec-{secrets.token_hex(6)}",
    )
    audit_id = await conn.fetchval(
        "INSERT INTO audit_logs (tenant_id, user_id, event_type, event_category, "
        "action_description, resource_type, resource_id, ip_address) "
        "VALUES ($1, $2, 'meeting.created', 'data', 'Meeting received from Fathom', "
        "'meeting_session', $3, '192.0.2.10') RETURNING id",
        tenant_id,
        user_id,
        str(meeting_id),
    )
    await insert(
        conn,
        "api_rate_limits",
        {
            "tenant_id": tenant_id,
            "resource_type": "meetings_processed",
            "period": "daily",
            "window_start": datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
            "request_count": 3,
        },
    )
    for table in ("slack_installations", "slack_bots"):
        await insert(conn, table, minimal_row(table, Seeded(tenant_id, user_id, *[user_id] * 4)))
    return Seeded(tenant_id, user_id, crm_id, meeting_id, mapping_id, audit_id)


@pytest_asyncio.fixture(scope="module")
async def seeded(sfdb_server: URL, sfdb_direct_settings: DatabaseSettings) -> tuple[Seeded, Seeded]:
    """Two tenants, A and B, each with a committed row in every tenant-owned table."""
    async with superuser_connection(sfdb_server, sfdb_direct_settings) as conn:
        return await seed_tenant(conn, "Tenant A"), await seed_tenant(conn, "Tenant B")


@pytest.fixture
def seed_a(seeded: tuple[Seeded, Seeded]) -> Seeded:
    """Tenant A of the module."""
    return seeded[0]


@pytest.fixture
def seed_b(seeded: tuple[Seeded, Seeded]) -> Seeded:
    """Tenant B of the module."""
    return seeded[1]


@pytest_asyncio.fixture
async def fresh(admin: asyncpg.Connection) -> Seeded:
    """A tenant of this test alone, for tests that change its rows."""
    return await seed_tenant(admin, "Fresh")


# -- the catalog ----------------------------------------------------------------------


async def test_the_layers_tables_exist_and_nothing_else(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT relname FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
    )
    assert {r["relname"] for r in rows} == ALL_TABLES | {"alembic_version"}


@pytest.mark.parametrize("table", TENANT_OWNED)
async def test_tenant_id_is_a_non_null_uuid(admin: asyncpg.Connection, table: str) -> None:
    row = await admin.fetchrow(
        "SELECT format_type(atttypid, atttypmod) AS type, attnotnull FROM pg_attribute "
        "WHERE attrelid = $1::regclass AND attname = 'tenant_id' AND NOT attisdropped",
        f"public.{table}",
    )
    assert row is not None, f"{table} has no tenant_id column"
    assert row["type"] == "uuid"
    assert row["attnotnull"] is True


async def test_primary_keys_lead_with_tenant_id(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(CONSTRAINTS_SQL + " AND con.contype = 'p'")
    primary = {r["table_name"]: list(r["columns"]) for r in rows}
    assert set(primary) == ALL_TABLES | {"alembic_version"}
    assert primary["tenants"] == ["id"]
    for table in TENANT_OWNED:
        assert primary[table][0] == "tenant_id", (table, primary[table])
        assert len(primary[table]) >= 2, (table, primary[table])


async def test_every_unique_index_of_a_tenant_owned_table_leads_with_tenant_id(
    admin: asyncpg.Connection,
) -> None:
    indexes = await admin.fetch(INDEXES_SQL + " AND i.indisunique")
    constraints = await admin.fetch(CONSTRAINTS_SQL + " AND con.contype IN ('u', 'p', 'x')")
    owned = [r for r in indexes if r["table_name"] in TENANT_OWNED]
    # Every tenant-owned table has its primary key; four have more unique indexes besides.
    assert len(owned) >= len(TENANT_OWNED) + 4
    for row in owned:
        assert row["columns"][0] == "tenant_id", (row["index_name"], row["columns"])
    for row in constraints:
        if row["table_name"] in TENANT_OWNED:
            assert row["columns"][0] == "tenant_id", (row["name"], row["columns"])


async def test_tenants_is_global_with_a_unique_slack_team_id(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(INDEXES_SQL + " AND i.indisunique AND c.relname = 'tenants'")
    unique = [list(r["columns"]) for r in rows]
    assert ["id"] in unique
    assert ["slack_team_id"] in unique


async def test_foreign_keys_between_tenant_owned_tables_are_composite(
    admin: asyncpg.Connection,
) -> None:
    rows = await admin.fetch(CONSTRAINTS_SQL + " AND con.contype = 'f'")
    found: set[tuple[str, str, str]] = set()
    to_tenants: set[str] = set()
    for row in rows:
        columns, ref_columns = list(row["columns"]), list(row["ref_columns"])
        if row["ref_table"] == "tenants":
            assert (columns, ref_columns) == (["tenant_id"], ["id"]), row["definition"]
            to_tenants.add(row["table_name"])
            continue
        assert row["table_name"] in TENANT_OWNED, row["definition"]
        assert row["ref_table"] in TENANT_OWNED, row["definition"]
        assert len(columns) == 2, row["definition"]
        assert columns[0] == "tenant_id", row["definition"]
        assert ref_columns == ["tenant_id", "id"], row["definition"]
        found.add((row["table_name"], columns[1], row["ref_table"]))
    assert to_tenants == set(TENANT_OWNED)
    assert found >= {
        ("crm_connections", "connected_by_user_id", "users"),
        ("meeting_sessions", "user_id", "users"),
        ("meeting_sessions", "crm_connection_id", "crm_connections"),
        ("account_mappings", "crm_connection_id", "crm_connections"),
        ("audit_logs", "user_id", "users"),
    }


async def test_no_foreign_key_sets_null(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(CONSTRAINTS_SQL + " AND con.contype = 'f'")
    assert rows, "no foreign keys at all"
    for row in rows:
        assert row["on_delete"] != b"n", row["definition"]
        assert row["on_update"] != b"n", row["definition"]
        assert "SET NULL" not in row["definition"], row["definition"]


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("users", ["tenant_id", "slack_user_id"]),
        ("meeting_sessions", ["tenant_id", "fathom_recording_id"]),
        ("account_mappings", ["tenant_id", "crm_connection_id", "email_domain"]),
    ],
)
async def test_re_creatable_uniqueness_is_a_partial_index_on_live_rows(
    admin: asyncpg.Connection, table: str, columns: list[str]
) -> None:
    rows = await admin.fetch(INDEXES_SQL + " AND i.indisunique AND c.relname = $1", table)
    matching = [r for r in rows if list(r["columns"]) == columns]
    assert len(matching) == 1, [(r["index_name"], r["columns"]) for r in rows]
    assert matching[0]["predicate"] is not None
    assert _normalise(matching[0]["predicate"]) == "deleted_atISNULL"


async def test_one_default_crm_connection_per_tenant_is_a_partial_unique_index(
    admin: asyncpg.Connection,
) -> None:
    rows = await admin.fetch(INDEXES_SQL + " AND i.indisunique AND c.relname = 'crm_connections'")
    matching = [r for r in rows if list(r["columns"]) == ["tenant_id"]]
    assert len(matching) == 1, [(r["index_name"], r["columns"]) for r in rows]
    predicate = matching[0]["predicate"]
    assert predicate is not None
    assert "is_default" in predicate
    assert "deleted_at IS NULL" in predicate


ENUMERATIONS = [
    ("tenants", "plan_tier", {"free", "starter", "pro", "enterprise"}),
    ("tenants", "subscription_status", {"trialing", "active", "past_due", "canceled"}),
    ("users", "role", {"owner", "admin", "member"}),
    ("crm_connections", "provider_type", {"hubspot", "salesforce", "crono"}),
    ("crm_connections", "status", {"active", "error"}),
    ("meeting_sessions", "status", {"pending", "processing", "completed", "failed"}),
    ("meeting_sessions", "crm_sync_status", {"not_synced", "pending", "synced", "failed"}),
    (
        "audit_logs",
        "event_category",
        {"auth", "data", "integration", "admin", "security", "billing", "system"},
    ),
    ("audit_logs", "status", {"success", "failure", "denied"}),
    ("api_rate_limits", "period", {"minute", "hourly", "daily", "monthly", "bucket"}),
]


@pytest.mark.parametrize(("table", "column", "allowed"), ENUMERATIONS)
async def test_enumerations_are_text_with_a_check_constraint(
    admin: asyncpg.Connection, table: str, column: str, allowed: set[str]
) -> None:
    data_type = await admin.fetchval(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
        table,
        column,
    )
    assert data_type == "text"
    rows = await admin.fetch(CONSTRAINTS_SQL + " AND con.contype = 'c' AND c.relname = $1", table)
    checks = [r for r in rows if list(r["columns"]) == [column]]
    assert len(checks) == 1, [r["definition"] for r in rows]
    assert set(re.findall(r"'([^']*)'::text", checks[0]["definition"])) == allowed


async def test_timestamps_are_timestamptz(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name <> 'alembic_version'"
    )
    types = {(r["table_name"], r["column_name"]): r["data_type"] for r in rows}
    timestamps = {key: t for key, t in types.items() if t.startswith("timestamp")}
    assert set(timestamps.values()) == {"timestamp with time zone"}, timestamps
    for table in TABLES:
        assert types[(table, "created_at")] == "timestamp with time zone"
        if table != "audit_logs":  # append-only: there is nothing to update
            assert types[(table, "updated_at")] == "timestamp with time zone"
    for table in SOFT_DELETED:
        assert types[(table, "deleted_at")] == "timestamp with time zone"
    for key, data_type in types.items():
        if key[1].endswith("_at"):
            assert data_type == "timestamp with time zone", key


async def test_audit_ip_is_inet_and_metadata_jsonb(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'audit_logs'"
    )
    types = {r["column_name"]: r["data_type"] for r in rows}
    assert types["ip_address"] == "inet"
    assert types["metadata"] == "jsonb"


NAMED_INDEXES = {
    "users": ["uq_users_tenant_id_slack_user_id_live"],
    "crm_connections": ["uq_crm_connections_tenant_id_default_live"],
    "account_mappings": ["uq_account_mappings_tenant_id_connection_domain_live"],
    "audit_logs": [
        "ix_audit_logs_tenant_id_created_at",
        "ix_audit_logs_tenant_id_created_at_failures",
    ],
    "meeting_sessions": [
        "ix_meeting_sessions_tenant_id_created_at_live",
        "ix_meeting_sessions_tenant_id_created_at_pending",
        "ix_meeting_sessions_tenant_id_lease_expires_at_processing",
        "ix_meeting_sessions_tenant_id_user_id_created_at_live",
        "uq_meeting_sessions_tenant_id_fathom_recording_id_live",
    ],
}


async def test_the_named_indexes_exist(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    )
    present = {(r["tablename"], r["indexname"]): r["indexdef"] for r in rows}
    for table, names in NAMED_INDEXES.items():
        for name in names:
            assert (table, name) in present, f"missing index {name} on {table}"
            assert "(tenant_id" in present[(table, name)], present[(table, name)]


async def test_indexes_serve_recency_user_pending_and_lease_queries(
    admin: asyncpg.Connection,
) -> None:
    rows = await admin.fetch(INDEXES_SQL)
    keyed = {(r["table_name"], tuple(r["columns"]), r["predicate"] or "") for r in rows}
    tables_columns = {(table, columns) for table, columns, _ in keyed}
    assert ("audit_logs", ("tenant_id", "created_at")) in tables_columns
    assert ("meeting_sessions", ("tenant_id", "created_at")) in tables_columns
    assert ("meeting_sessions", ("tenant_id", "user_id", "created_at")) in tables_columns
    pending = [
        predicate
        for table, columns, predicate in keyed
        if table == "meeting_sessions" and columns[0] == "tenant_id" and "pending" in predicate
    ]
    assert pending, "no index for pending meetings"
    leases = [
        _normalise(predicate)
        for table, columns, predicate in keyed
        if table == "meeting_sessions" and columns == ("tenant_id", "processing_lease_expires_at")
    ]
    assert leases == ["status='processing'ANDdeleted_atISNULL"], "no index for expired leases"


async def test_the_claim_lease_is_a_nullable_timestamptz(admin: asyncpg.Connection) -> None:
    row = await admin.fetchrow(
        "SELECT data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'meeting_sessions' "
        "AND column_name = 'processing_lease_expires_at'"
    )
    assert row is not None
    assert dict(row) == {
        "data_type": "timestamp with time zone",
        "is_nullable": "YES",
        "column_default": None,
    }


POLICIES_SQL = """
SELECT polname, polcmd, polpermissive,
       ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END
             FROM unnest(polroles) AS r ORDER BY 1) AS roles,
       pg_get_expr(polqual, polrelid) AS using_expr,
       pg_get_expr(polwithcheck, polrelid) AS check_expr
FROM pg_policy WHERE polrelid = $1::regclass
"""


@pytest.mark.parametrize("table", TENANT_OWNED)
async def test_row_level_security_is_forced_and_scopes_the_app_role_by_the_verified_claim(
    admin: asyncpg.Connection, settings: DatabaseSettings, table: str
) -> None:
    """Every policy of a tenant-owned table is one of the owner's maintenance policies or
    the app role's ``tenant_isolation``, which compares ``tenant_id`` with the verified
    claim (both USING and WITH CHECK). No policy is for PUBLIC or the directory role, and
    none compares with the plain ``app.tenant_id`` but the owner's ``owner_scoped``; the
    owner's ``owner_lifecycle`` admits the workspace ``sfdb.lifecycle_tenant`` names."""
    flags = await admin.fetchrow(
        "SELECT relrowsecurity, relforcerowsecurity, pg_get_userbyid(relowner) AS owner "
        "FROM pg_class WHERE oid = $1::regclass",
        f"public.{table}",
    )
    assert flags is not None
    assert flags["relrowsecurity"] is True
    assert flags["relforcerowsecurity"] is True
    assert flags["owner"] == settings.roles.owner
    policies = await admin.fetch(POLICIES_SQL, f"public.{table}")
    assert policies, f"{table} has no policy"
    claimed = _normalise(f"tenant_id = {CLAIMED_TENANT}")
    for policy in policies:
        key = (table, policy["polname"], policy["polcmd"])
        maintenance = OWNER_MAINTENANCE.get(key)
        if maintenance is not None:
            assert list(policy["roles"]) == [settings.roles.owner], policy["polname"]
            assert (policy["using_expr"], policy["check_expr"]) == maintenance
            continue
        assert policy["using_expr"] is not None, policy["polname"]
        if key in OWNER_POLICIES:
            # The owner's purge of ended rate-limit windows (read and delete, no more). For
            # the owner role, which owns the table, not for whichever login ran migration
            # 0004: the purge must not depend on that login, nor keep it from being dropped.
            assert list(policy["roles"]) == [settings.roles.owner], policy["polname"]
            assert _normalise(policy["using_expr"]) == _normalise(ENDED_WINDOWS)
            assert policy["check_expr"] is None
            continue
        if key in OWNER_SCOPED or key in OWNER_LIFECYCLE:
            setting = PLAIN_TENANT if key in OWNER_SCOPED else LIFECYCLE_TENANT
            scoped = _normalise(f"tenant_id = {setting}")
            assert list(policy["roles"]) == [settings.roles.owner], policy["polname"]
            assert _normalise(policy["using_expr"]) == scoped
            assert _normalise(policy["check_expr"]) == scoped
            continue
        # The app role's policy. Permissive policies are OR-ed: a single wider one, or one
        # for PUBLIC on the plain setting, would open the table.
        assert policy["polname"] == "tenant_isolation"
        assert list(policy["roles"]) == [settings.roles.app], policy["polname"]
        assert _normalise(policy["using_expr"]) == claimed, policy["using_expr"]
        assert _normalise(policy["check_expr"]) == claimed, policy["check_expr"]
    app = [p for p in policies if settings.roles.app in p["roles"]]
    assert [(p["polname"], p["polcmd"], p["polpermissive"]) for p in app] == [
        ("tenant_isolation", b"*", True)
    ]


async def test_tenants_show_the_app_role_its_own_row_and_nobody_every_row(
    admin: asyncpg.Connection, settings: DatabaseSettings
) -> None:
    enabled = await admin.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.tenants'::regclass"
    )
    assert enabled is True
    own_row = _normalise(f"id = {CLAIMED_TENANT}")
    policies = {
        p["polname"]: (
            list(p["roles"]),
            p["polcmd"],
            p["polpermissive"],
            _normalise(p["using_expr"]),
            _normalise(p["check_expr"]),
        )
        for p in await admin.fetch(POLICIES_SQL, "public.tenants")
    }
    # The directory holds no table: it resolves and installs workspaces through the
    # owner's functions, one workspace it names at a time, and can never list them. The
    # app role sees the row of its verified claim's tenant only.
    assert policies == {
        "tenant_self": ([settings.roles.app], b"*", True, own_row, own_row),
    }


async def test_tenant_claim_keys_holds_the_pads_of_well_named_keys_and_no_policy_opens_it(
    admin: asyncpg.Connection, settings: DatabaseSettings
) -> None:
    """The key table (migration 0008): the owner's, no row-level security (no runtime role
    may read it at all, see the grants below), the key id's shape and the pads' length
    checked by the database, and the suite's key installed as its pads, never the key."""
    flags = await admin.fetchrow(
        "SELECT relrowsecurity, pg_get_userbyid(relowner) AS owner FROM pg_class "
        "WHERE oid = 'public.tenant_claim_keys'::regclass"
    )
    assert flags is not None
    assert (flags["relrowsecurity"], flags["owner"]) == (False, settings.roles.owner)
    assert await admin.fetch(POLICIES_SQL, "public.tenant_claim_keys") == []
    key = TenantKey.from_settings(settings)
    inner, outer = key.pads()
    stored = await admin.fetch("SELECT key_id, inner_pad, outer_pad FROM tenant_claim_keys")
    assert (key.key_id, inner, outer) in [
        (r["key_id"], r["inner_pad"], r["outer_pad"]) for r in stored
    ]
    good: dict[str, object] = {"key_id": "schema-test", "inner_pad": inner, "outer_pad": outer}
    async with rolled_back(admin):
        await insert(admin, "tenant_claim_keys", good)
    bad_rows: list[dict[str, object]] = [
        {"key_id": "no spaces"},
        {"key_id": "x" * 33},
        {"inner_pad": inner[:32]},
        {"outer_pad": outer + b"\0"},
    ]
    for bad in bad_rows:
        async with rolled_back(admin):
            with pytest.raises(asyncpg.CheckViolationError):
                await insert(admin, "tenant_claim_keys", good | bad)


# -- roles, ownership and grants (migration 0006) ---------------------------------------


def runtime_login(settings: DatabaseSettings) -> str:
    """The name of the runtime login the layer connects as (``sfdb create-login``)."""
    name = settings.sqlalchemy_url().username
    assert name, "the test database's URL names no login"
    return name


def migrating_login(settings: DatabaseSettings) -> str:
    """The name of the login that migrated the test database (``DATABASE_MIGRATION_URL``)."""
    name = settings.for_migrations().sqlalchemy_url().username
    assert name, "the test database's migration URL names no login"
    return name


MEMBER_OF_SQL = """
SELECT g.rolname FROM pg_auth_members m
JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
WHERE r.rolname = $1
"""


async def test_the_layer_roles_hold_no_power_and_only_the_runtime_logs_in(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    runtime = runtime_login(sfdb_direct_settings)
    rows = {
        row["rolname"]: row
        for row in await admin.fetch(
            "SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin, "
            "rolinherit FROM pg_roles WHERE rolname = ANY($1::text[])",
            [roles.owner, roles.app, roles.directory, runtime],
        )
    }
    assert set(rows) == {roles.owner, roles.app, roles.directory, runtime}
    for name, row in rows.items():
        powers = [p for p in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb") if row[p]]
        assert powers == [], name
    # On Citus, distribute lets the layer's roles log in: the coordinator connects to the
    # workers as the role in effect. Nowhere else do they log in.
    logs_in = await on_citus(admin)
    for name in (roles.owner, roles.app, roles.directory):
        assert rows[name]["rolcanlogin"] is logs_in, name
    assert rows[runtime]["rolcanlogin"] is True
    assert rows[runtime]["rolinherit"] is False  # holds nothing until it SET ROLEs


async def test_the_runtime_login_may_become_the_app_and_directory_roles_and_nothing_else(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    runtime = runtime_login(sfdb_direct_settings)
    member_of = {r["rolname"] for r in await admin.fetch(MEMBER_OF_SQL, runtime)}
    assert member_of == {roles.app, roles.directory}
    for role in (roles.owner, roles.app, roles.directory):
        assert {r["rolname"] for r in await admin.fetch(MEMBER_OF_SQL, role)} == set(), role
    for role in (runtime, roles.app, roles.directory):
        assert not await admin.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", role, roles.owner)
    # Only the migrating login may become the owner.
    owners = await admin.fetch(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
        "WHERE m.roleid = $1::regrole",
        roles.owner,
    )
    assert [r["rolname"] for r in owners] == [migrating_login(sfdb_direct_settings)]


async def test_every_table_and_function_is_the_owners(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    # Objects of an extension (Citus puts views in public) are the extension's.
    relations = await admin.fetch(
        "SELECT relname, pg_get_userbyid(relowner) AS owner FROM pg_class c "
        "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f') "
        "AND NOT EXISTS (SELECT FROM pg_depend WHERE classid = 'pg_class'::regclass "
        "AND objid = c.oid AND deptype = 'e')"
    )
    assert {r["relname"] for r in relations} == ALL_TABLES | {"alembic_version"}
    functions = await admin.fetch(
        "SELECT proname, pg_get_userbyid(proowner) AS owner FROM pg_proc p "
        "WHERE pronamespace = 'public'::regnamespace "
        "AND NOT EXISTS (SELECT FROM pg_depend WHERE classid = 'pg_proc'::regclass "
        "AND objid = p.oid AND deptype = 'e')"
    )
    assert functions
    owner = sfdb_direct_settings.roles.owner
    assert {(r["relname"], r["owner"]) for r in relations} == {
        (r["relname"], owner) for r in relations
    }
    assert {(r["proname"], r["owner"]) for r in functions} == {
        (r["proname"], owner) for r in functions
    }
    runtime = runtime_login(sfdb_direct_settings)
    owned_by_runtime = await admin.fetchval(
        "SELECT (SELECT count(*) FROM pg_class WHERE relowner = $1::regrole) "
        "+ (SELECT count(*) FROM pg_proc WHERE proowner = $1::regrole) "
        "+ (SELECT count(*) FROM pg_namespace WHERE nspowner = $1::regrole)",
        runtime,
    )
    assert owned_by_runtime == 0


EVERY_COLUMN = frozenset({"*"})
# What the app and directory roles may do, column by column ("*": the whole table). Written
# out here rather than read from migration 0006, so that a grant too many there fails here.
# Neither holds anything of tenant_claim_keys: the claim functions read it as the owner.
# UPDATE is granted column by column: nobody at runtime updates an id, a tenant_id,
# created_at or slack_team_id. INSERT is granted on whole tables (a Citus coordinator sends
# every column of a new row to the shard); audit rows get their id and creation time from
# a trigger instead (test_audit_integrity).
APP_GRANTS: dict[str, dict[str, frozenset[str]]] = {
    "tenants": {
        "SELECT": EVERY_COLUMN,
        "UPDATE": frozenset(
            {
                "slack_team_name",
                "plan_tier",
                "subscription_status",
                "trial_ends_at",
                "settings",
                "updated_at",
                "deleted_at",
            }
        ),
    },
    "users": {
        "SELECT": EVERY_COLUMN,
        "INSERT": EVERY_COLUMN,
        "UPDATE": frozenset({"slack_email", "display_name", "role", "updated_at", "deleted_at"}),
    },
    "crm_connections": {
        "SELECT": EVERY_COLUMN,
        "INSERT": EVERY_COLUMN,
        "UPDATE": frozenset({"is_default", "status", "updated_at", "deleted_at"}),
    },
    "account_mappings": {
        "SELECT": EVERY_COLUMN,
        "INSERT": EVERY_COLUMN,
        "UPDATE": frozenset(
            {
                "crm_account_id",
                "crm_account_name",
                "verified",
                "last_used_at",
                "updated_at",
                "deleted_at",
            }
        ),
    },
    "meeting_sessions": {
        "SELECT": EVERY_COLUMN,
        "INSERT": EVERY_COLUMN,
        "UPDATE": frozenset(
            {
                "status",
                "summary",
                "action_items",
                "ai_output",
                "processing_error",
                "processing_attempts",
                "processing_started_at",
                "processing_lease_expires_at",
                "processed_at",
                "crm_sync_status",
                "crm_record_id",
                "crm_sync_attempts",
                "crm_last_error",
                "crm_synced_at",
                "version",
                "updated_at",
                "deleted_at",
            }
        ),
    },
    "audit_logs": {"SELECT": EVERY_COLUMN, "INSERT": EVERY_COLUMN},
    "api_rate_limits": {
        "SELECT": EVERY_COLUMN,
        "INSERT": EVERY_COLUMN,
        "UPDATE": frozenset({"request_count", "tokens", "updated_at"}),
    },
    # Installs are written by the owner's functions; a unit of work only refreshes tokens.
    "slack_installations": {
        "SELECT": EVERY_COLUMN,
        "UPDATE": frozenset(
            {
                "bot_token",
                "bot_refresh_token",
                "bot_token_expires_at",
                "user_token",
                "user_refresh_token",
                "user_token_expires_at",
                "updated_at",
            }
        ),
    },
    "slack_bots": {
        "SELECT": EVERY_COLUMN,
        "UPDATE": frozenset(
            {"bot_token", "bot_refresh_token", "bot_token_expires_at", "updated_at"}
        ),
    },
}
DIRECTORY_GRANTS: dict[str, dict[str, frozenset[str]]] = {
    # No table of the layer: the directory's functions (EXECUTE, below) read and write
    # tenants for it.
    "alembic_version": {"SELECT": EVERY_COLUMN},  # sfdb check reads the revision as it
}
COLUMN_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "REFERENCES")
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
FROZEN_COLUMNS = ("id", "tenant_id", "created_at", "slack_team_id")


async def columns_of_tables(admin: asyncpg.Connection) -> dict[str, set[str]]:
    """Every column of every table in schema public."""
    rows = await admin.fetch(
        "SELECT c.relname, a.attname FROM pg_class c "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
    )
    columns: dict[str, set[str]] = {}
    for row in rows:
        columns.setdefault(row["relname"], set()).add(row["attname"])
    return columns


async def column_privileges(admin: asyncpg.Connection, role: str) -> set[tuple[str, str, str]]:
    """``(table, column, privilege)`` that ``role`` (or ``public``) holds, granted or inherited."""
    rows = await admin.fetch(
        "SELECT c.relname, a.attname, p.privilege FROM pg_class c "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "CROSS JOIN unnest($2::text[]) AS p(privilege) "
        "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') "
        "AND has_column_privilege($1, c.oid, a.attnum, p.privilege)",
        role,
        list(COLUMN_PRIVILEGES),
    )
    return {(r["relname"], r["attname"], r["privilege"]) for r in rows}


async def table_privileges(admin: asyncpg.Connection, role: str) -> set[tuple[str, str]]:
    """``(table, privilege)`` that ``role`` (or ``public``) holds on the whole table."""
    rows = await admin.fetch(
        "SELECT c.relname, p.privilege FROM pg_class c "
        "CROSS JOIN unnest($2::text[]) AS p(privilege) "
        "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p') "
        "AND has_table_privilege($1, c.oid, p.privilege)",
        role,
        list(TABLE_PRIVILEGES),
    )
    return {(r["relname"], r["privilege"]) for r in rows}


def expand(
    grants: dict[str, dict[str, frozenset[str]]], columns: dict[str, set[str]]
) -> set[tuple[str, str, str]]:
    """``grants`` as ``(table, column, privilege)``, ``*`` read as every column of the table."""
    expanded: set[tuple[str, str, str]] = set()
    for table, privileges in grants.items():
        for privilege, named in privileges.items():
            assert named == EVERY_COLUMN or named <= columns[table], (table, named)
            for column in columns[table] if named == EVERY_COLUMN else named:
                expanded.add((table, column, privilege))
    return expanded


@pytest.mark.parametrize("kind", ["app", "directory"])
async def test_the_app_and_directory_roles_hold_exactly_their_column_grants(
    admin: asyncpg.Connection, settings: DatabaseSettings, kind: str
) -> None:
    role, grants = {
        "app": (settings.roles.app, APP_GRANTS),
        "directory": (settings.roles.directory, DIRECTORY_GRANTS),
    }[kind]
    columns = await columns_of_tables(admin)
    assert await column_privileges(admin, role) == expand(grants, columns)
    # On whole tables, what the map grants on whole tables and nothing else: no DELETE
    # (rows are soft-deleted), TRUNCATE, REFERENCES or TRIGGER anywhere, and no table-wide
    # UPDATE that a column added later would fall under.
    assert await table_privileges(admin, role) == {
        (table, privilege)
        for table, privileges in grants.items()
        for privilege, columns in privileges.items()
        if columns == EVERY_COLUMN
    }


async def test_nobody_at_runtime_may_change_ids_tenants_creation_times_or_team_ids(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    columns = await columns_of_tables(admin)
    frozen = {(t, c) for t, names in columns.items() for c in names if c in FROZEN_COLUMNS}
    assert ("tenants", "slack_team_id") in frozen
    chain = {t for t in OWNER_TABLES if "tenant_id" in columns.get(t, ())}
    assert {t for t, c in frozen if c == "tenant_id"} == set(TENANT_OWNED) | chain
    for role in (roles.app, roles.directory, runtime_login(sfdb_direct_settings), "public"):
        updatable = {(t, c) for t, c, p in await column_privileges(admin, role) if p == "UPDATE"}
        assert updatable & frozen == set(), role


async def test_public_and_the_runtime_login_hold_nothing_on_any_table(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    # The runtime login is NOINHERIT: what its roles hold is not its own until it SET ROLEs.
    for role in ("public", runtime_login(sfdb_direct_settings)):
        assert await column_privileges(admin, role) == set(), role
        assert await table_privileges(admin, role) == set(), role


SEARCH_PATH = "search_path=pg_catalog, public, pg_temp"
# Who besides the owner may call each function of the layer.
EXECUTE: dict[str, set[str]] = {
    "sfdb_claimed_tenant": {"app"},  # its policies call it as the app role
    "sfdb_require_claim": {"app"},  # the check of a unit of work's first transaction
    "sfdb_require_tenant": set(),  # the owner's rate-limit function's check only
    "sfdb_consume_rate_limit": {"directory"},
    "sfdb_resolve_tenant": {"directory"},
    "sfdb_install_tenant": {"directory"},
    "sfdb_uninstall_tenant": {"directory"},
    "sfdb_find_slack_installation": {"directory"},
    "sfdb_find_slack_bot": {"directory"},
    "sfdb_save_slack_installation": {"directory"},
    "sfdb_delete_slack_installations": {"directory"},
    "sfdb_issue_slack_oauth_state": {"directory"},
    "sfdb_consume_slack_oauth_state": {"directory"},
    "sfdb_record_slack_event": set(),  # called by the owner's functions only
    "sfdb_window_end": set(),
    "sfdb_audit_logs_append_only": set(),  # triggers: called by no one
    "sfdb_audit_logs_server_fields": set(),
    "sfdb_audit_logs_chain": set(),
    "sfdb_audit_personal": {"app"},  # the insert trigger's commitment, as the inserting role
    "sfdb_audit_content": set(),  # the chain's trigger and sfdb audit verify, as the owner
    "sfdb_audit_partitions_ensure": set(),  # the owner's maintenance (sfdb migrate, retain)
    "sfdb_audit_partition_make": set(),
    "sfdb_tenants_uninstalled_at": set(),  # the trigger that keeps the purge's clock
}
# The functions that run as the owner (SECURITY DEFINER): the directory's, and the two that
# read the tenant keys for the app role.
BOUND = {"sfdb_audit_personal", "sfdb_audit_content"}
DEFINERS = {name for name, callers in EXECUTE.items() if callers == {"directory"}} | {
    "sfdb_claimed_tenant",
    "sfdb_require_claim",
    "sfdb_audit_logs_chain",  # the audit chain's trigger, which writes its tables
}


async def test_every_function_pins_its_search_path_and_only_its_caller_may_execute_it(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    callers = {
        "app": roles.app,
        "directory": roles.directory,
        "runtime": runtime_login(sfdb_direct_settings),
        "public": "public",
    }
    functions = await admin.fetch(
        "SELECT oid, proname, proconfig, prosecdef, prosqlbody IS NOT NULL AS bound "
        "FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
    )
    assert {f["proname"] for f in functions} == set(EXECUTE)
    for function in functions:
        name = function["proname"]
        paths = [c for c in function["proconfig"] or [] if c.startswith("search_path=")]
        # A body bound as it was made (SQL-standard) calls what it called then, whatever the
        # path: only the audit chain's two, which the planner must be free to inline.
        assert paths == ([] if name in BOUND else [SEARCH_PATH]), name
        assert function["bound"] is (name in BOUND), name
        assert function["prosecdef"] is (name in DEFINERS), name
        may_execute = {
            kind
            for kind, role in callers.items()
            if await admin.fetchval(
                "SELECT has_function_privilege($1, $2::oid, 'EXECUTE')", role, function["oid"]
            )
        }
        assert may_execute == EXECUTE[name], name


async def test_a_function_the_owner_creates_later_is_not_executable_by_public(
    admin: asyncpg.Connection, settings: DatabaseSettings
) -> None:
    roles = settings.roles
    async with rolled_back(admin):
        await admin.execute(f'SET LOCAL ROLE "{roles.owner}"')
        await admin.execute(
            "CREATE FUNCTION sfdb_schema_test_later() RETURNS integer "
            "LANGUAGE sql IMMUTABLE AS 'SELECT 1'"
        )
        for role in ("public", roles.app, roles.directory):
            assert not await admin.fetchval(
                "SELECT has_function_privilege($1, 'sfdb_schema_test_later()', 'EXECUTE')", role
            ), role


async def test_public_may_not_connect_make_temp_tables_or_use_schema_public(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    runtime = runtime_login(sfdb_direct_settings)

    async def database(role: str, privilege: str) -> bool:
        allowed: bool = await admin.fetchval(
            "SELECT has_database_privilege($1, current_database(), $2)", role, privilege
        )
        return allowed

    async def schema(role: str, privilege: str) -> bool:
        allowed: bool = await admin.fetchval(
            "SELECT has_schema_privilege($1, 'public', $2)", role, privilege
        )
        return allowed

    for role in ("public", roles.owner, roles.app, roles.directory, runtime):
        # No temp table can shadow the layer's tables; nobody at runtime creates anything.
        assert not await database(role, "TEMPORARY"), role
        assert not await database(role, "CREATE"), role
    assert not await database("public", "CONNECT")  # a role of another database cannot
    # The owner too: on Citus the coordinator reaches the workers as the role in effect,
    # the owner's during migrations and the purge.
    for role in (roles.owner, roles.app, roles.directory, runtime):
        assert await database(role, "CONNECT"), role
    assert not await schema("public", "USAGE")
    assert not await schema("public", "CREATE")
    for role in (roles.app, roles.directory):
        assert await schema(role, "USAGE"), role
        assert not await schema(role, "CREATE"), role
    assert not await schema(runtime, "USAGE")  # NOINHERIT: only once it has SET ROLE
    assert not await schema(runtime, "CREATE")
    assert await schema(roles.owner, "CREATE")


async def test_the_runtime_login_on_its_own_can_only_become_the_app_and_directory_roles(
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    # Connects as the runtime login on purpose, without the directory role the layer's
    # connections open with: what SQL injected anywhere in the application could do.
    roles = sfdb_direct_settings.roles
    url = sfdb_direct_settings.sqlalchemy_url().set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    denied = asyncpg.InsufficientPrivilegeError
    try:
        assert await conn.fetchval("SELECT current_user") == runtime_login(sfdb_direct_settings)
        for statement in (
            "SELECT count(*) FROM public.tenants",
            "CREATE TEMPORARY TABLE tenants (id uuid)",
            "CREATE TABLE public.shadow (id uuid)",
            f'SET ROLE "{roles.owner}"',
        ):
            with pytest.raises(denied):
                await conn.execute(statement)
        for role, statement in (
            (roles.directory, "CREATE TEMPORARY TABLE tenants (id uuid)"),
            (roles.directory, "CREATE TABLE public.shadow (id uuid)"),
            (roles.directory, "SELECT sfdb_require_tenant()"),
            (roles.directory, "SELECT count(*) FROM public.tenants"),  # never lists them
            (roles.directory, "SELECT sfdb_claimed_tenant()"),
            (roles.directory, "SELECT key_id FROM public.tenant_claim_keys"),
            (roles.app, "CREATE TEMPORARY TABLE tenants (id uuid)"),
            (roles.app, "SELECT sfdb_require_tenant()"),
            (roles.app, "SELECT inner_pad FROM public.tenant_claim_keys"),
            (roles.app, "DELETE FROM public.tenant_claim_keys"),
            (
                roles.app,
                "INSERT INTO public.tenant_claim_keys (key_id, inner_pad, outer_pad) "
                "VALUES ('mine', decode(repeat('00', 64), 'hex'), decode(repeat('00', 64), 'hex'))",
            ),
            (roles.app, "SELECT sfdb_install_tenant('TSHADOW', 'x', 'free', NULL)"),
            (roles.app, "DELETE FROM public.users"),
            (
                roles.app,
                "SELECT sfdb_consume_rate_limit(gen_random_uuid(), 'r', 'daily', now(), 1, 1, 0)",
            ),
        ):
            async with rolled_back(conn):
                await conn.execute(f'SET LOCAL ROLE "{role}"')
                with pytest.raises(denied):
                    await conn.execute(statement)
    finally:
        await conn.close()


async def test_audit_logs_has_append_only_triggers(admin: asyncpg.Connection) -> None:
    rows = await admin.fetch(
        "SELECT t.tgname, t.tgtype, t.tgenabled, p.proname, l.lanname "
        "FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid "
        "JOIN pg_language l ON l.oid = p.prolang "
        "WHERE t.tgrelid = 'public.audit_logs'::regclass AND NOT t.tgisinternal"
    )
    assert rows
    covered = 0
    for row in rows:
        assert row["tgenabled"] in (b"O", b"A"), row["tgname"]  # enabled (origin or always)
        if row["tgname"] == "audit_logs_chain":  # the chain's, as a transaction commits
            assert row["tgtype"] == TRIGGER_ROW | TRIGGER_INSERT, row["tgtype"]
            continue
        assert row["tgtype"] & TRIGGER_BEFORE, row["tgname"]
        covered |= row["tgtype"]
    assert covered & TRIGGER_UPDATE
    assert covered & TRIGGER_DELETE
    assert covered & TRIGGER_TRUNCATE
    row_level = [r for r in rows if r["tgtype"] & TRIGGER_ROW]
    assert any(r["tgtype"] & TRIGGER_UPDATE and r["tgtype"] & TRIGGER_DELETE for r in row_level)
    functions = await admin.fetch(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
        "AND proname LIKE 'sfdb\\_%'"
    )
    assert {r["proname"] for r in rows} <= {f["proname"] for f in functions}


# -- what the database refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "column", "target"),
    [
        ("meeting_sessions", "user_id", "user_id"),
        ("meeting_sessions", "crm_connection_id", "crm_connection_id"),
        ("account_mappings", "crm_connection_id", "crm_connection_id"),
        ("audit_logs", "user_id", "user_id"),
        ("crm_connections", "connected_by_user_id", "user_id"),
    ],
)
async def test_a_row_cannot_reference_another_tenants_row(
    admin: asyncpg.Connection, seeded: tuple[Seeded, Seeded], table: str, column: str, target: str
) -> None:
    seed_a, seed_b = seeded
    own = minimal_row(table, seed_a) | {column: getattr(seed_a, target)}
    async with rolled_back(admin):  # the same row pointing at its own tenant is fine
        await insert(admin, table, own)
    foreign = minimal_row(table, seed_a) | {column: getattr(seed_b, target)}
    with pytest.raises(asyncpg.ForeignKeyViolationError) as caught:
        await insert(admin, table, foreign)
    assert caught.value.sqlstate == "23503"
    owner, constraint = await reported_constraint(admin, caught.value)
    assert owner == table
    columns = await admin.fetchval(
        "SELECT ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o) "
        "JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o) "
        "FROM pg_constraint con WHERE con.conname = $1 AND con.conrelid = $2::regclass",
        constraint,
        f"public.{table}",
    )
    assert columns == ["tenant_id", column]


async def test_a_second_live_default_crm_connection_is_refused(
    admin: asyncpg.Connection, fresh: Seeded, seed_b: Seeded
) -> None:
    crm = minimal_row("crm_connections", fresh)
    await insert(admin, "crm_connections", crm | {"is_default": False})  # non-default: fine
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await insert(admin, "crm_connections", crm | {"is_default": True})
    assert caught.value.sqlstate == "23505"
    assert (await reported_constraint(admin, caught.value))[0] == "crm_connections"
    # Another tenant's default does not count (seed_b has one too).
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM crm_connections WHERE tenant_id = $1 AND is_default "
            "AND deleted_at IS NULL",
            seed_b.tenant_id,
        )
        == 1
    )
    # Once the default is soft-deleted, a new default may be set.
    await admin.execute(
        "UPDATE crm_connections SET deleted_at = now() WHERE tenant_id = $1 AND id = $2",
        fresh.tenant_id,
        fresh.crm_connection_id,
    )
    await insert(admin, "crm_connections", crm | {"is_default": True})
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM crm_connections WHERE tenant_id = $1 AND is_default",
            fresh.tenant_id,
        )
        == 2
    )


async def test_a_slack_user_is_unique_among_live_users_of_a_tenant(
    admin: asyncpg.Connection, fresh: Seeded, seed_b: Seeded
) -> None:
    slack_user = unique_user_id()
    row = {"tenant_id": fresh.tenant_id, "slack_user_id": slack_user}
    await insert(admin, "users", row)
    with pytest.raises(asyncpg.UniqueViolationError) as caught:
        await insert(admin, "users", row)
    assert caught.value.sqlstate == "23505"
    assert (await reported_constraint(admin, caught.value))[0] == "users"
    # The same Slack user id in another tenant is another user.
    await insert(admin, "users", row | {"tenant_id": seed_b.tenant_id})
    # After a soft delete the id can be used again.
    await admin.execute(
        "UPDATE users SET deleted_at = now() WHERE tenant_id = $1 AND slack_user_id = $2",
        fresh.tenant_id,
        slack_user,
    )
    await insert(admin, "users", row)
    counts = await admin.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE deleted_at IS NULL) AS live "
        "FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        fresh.tenant_id,
        slack_user,
    )
    assert counts is not None
    assert (counts["total"], counts["live"]) == (2, 1)


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("tenants", "plan_tier", "platinum"),
        ("tenants", "subscription_status", "free_forever"),
        ("users", "role", "superadmin"),
        ("crm_connections", "provider_type", "pipedrive"),
        ("meeting_sessions", "status", "archived"),
        ("meeting_sessions", "crm_sync_status", "maybe"),
        ("audit_logs", "event_category", "gossip"),
        ("audit_logs", "status", "ok"),
        ("api_rate_limits", "period", "weekly"),
    ],
)
async def test_unknown_enumeration_values_are_refused(
    admin: asyncpg.Connection, seed_a: Seeded, table: str, column: str, value: str
) -> None:
    row = minimal_row(table, seed_a)
    async with rolled_back(admin):  # the row itself is valid
        await insert(admin, table, row)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert(admin, table, minimal_row(table, seed_a) | {column: value})
    assert caught.value.sqlstate == "23514"


async def test_an_existing_tenant_cannot_move_to_an_unknown_plan_tier(
    admin: asyncpg.Connection, fresh: Seeded
) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await admin.execute(
            "UPDATE tenants SET plan_tier = 'platinum' WHERE id = $1", fresh.tenant_id
        )
    assert (
        await admin.fetchval("SELECT plan_tier FROM tenants WHERE id = $1", fresh.tenant_id)
        == "free"
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_logs SET action_description = 'rewritten' WHERE tenant_id = $1 AND id = $2",
        "UPDATE audit_logs SET tenant_id = tenant_id WHERE tenant_id = $1 AND id = $2",
        "DELETE FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        "TRUNCATE audit_logs",
        "TRUNCATE audit_logs CASCADE",
    ],
)
async def test_audit_rows_cannot_be_changed_even_by_a_superuser(
    admin: asyncpg.Connection, seed_a: Seeded, statement: str
) -> None:
    assert await admin.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    args = [] if statement.startswith("TRUNCATE") else [seed_a.tenant_id, seed_a.audit_id]
    async with rolled_back(admin):  # should the trigger be missing, nothing is lost
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await admin.execute(statement, *args)
    assert caught.value.sqlstate == "42501"
    stored = await admin.fetchval(
        "SELECT action_description FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        seed_a.tenant_id,
        seed_a.audit_id,
    )
    assert stored == "Meeting received from Fathom"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_logs SET action_description = 'rewritten' WHERE tenant_id = $1 AND id = $2",
        "DELETE FROM audit_logs WHERE tenant_id = $1 AND id = $2",
    ],
)
async def test_the_app_role_cannot_change_its_own_audit_rows(
    admin: asyncpg.Connection, settings: DatabaseSettings, seed_a: Seeded, statement: str
) -> None:
    async with as_app_role(admin, settings, seed_a.tenant_id):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await admin.execute(statement, seed_a.tenant_id, seed_a.audit_id)


# -- row-level security as the app role -------------------------------------------------


@pytest.mark.parametrize("table", TENANT_OWNED)
async def test_another_tenants_rows_are_invisible(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    seed_a: Seeded,
    seed_b: Seeded,
    table: str,
) -> None:
    count_of = f"SELECT count(*) FROM {table} WHERE tenant_id = $1"
    own = await admin.fetchval(count_of, seed_a.tenant_id)
    assert own >= 1
    assert await admin.fetchval(count_of, seed_b.tenant_id) >= 1  # as superuser: visible
    async with as_app_role(admin, settings, seed_a.tenant_id):
        assert await admin.fetchval("SELECT current_user") == settings.roles.app
        assert await admin.fetchval(count_of, seed_b.tenant_id) == 0
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") == own
        visible = await admin.fetch(f"SELECT DISTINCT tenant_id FROM {table}")
        assert [r["tenant_id"] for r in visible] == [seed_a.tenant_id]


# Installations are written by the owner's functions only (migration 0007).
APP_INSERTS = [table for table in TENANT_OWNED if not table.startswith("slack_")]


@pytest.mark.parametrize("table", ["slack_installations", "slack_bots"])
async def test_the_app_role_inserts_no_installation_even_its_own(
    admin: asyncpg.Connection, settings: DatabaseSettings, seed_a: Seeded, table: str
) -> None:
    async with as_app_role(admin, settings, seed_a.tenant_id):
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await insert(admin, table, minimal_row(table, seed_a))
    assert f"permission denied for table {table}" in str(caught.value)


@pytest.mark.parametrize("table", APP_INSERTS)
async def test_an_insert_for_another_tenant_is_refused(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    seed_a: Seeded,
    seed_b: Seeded,
    table: str,
) -> None:
    async with as_app_role(admin, settings, seed_a.tenant_id):
        await insert(admin, table, minimal_row(table, seed_a))  # its own tenant: allowed
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
            await insert(admin, table, minimal_row(table, seed_b))
    assert caught.value.sqlstate == "42501"
    assert "row-level security" in str(caught.value)


async def test_a_row_cannot_be_moved_to_another_tenant(
    admin: asyncpg.Connection, settings: DatabaseSettings, seed_a: Seeded, seed_b: Seeded
) -> None:
    async with as_app_role(admin, settings, seed_a.tenant_id):
        # Another tenant's rows are not there to update.
        assert (
            await admin.execute(
                "UPDATE users SET display_name = 'hijacked' WHERE tenant_id = $1",
                seed_b.tenant_id,
            )
            == "UPDATE 0"
        )
    move = "UPDATE api_rate_limits SET tenant_id = $1 WHERE tenant_id = $2"
    # The app role may not update tenant_id at all: the column grant refuses the move
    # before any row-level security policy runs. On Citus the distribution column never
    # changes at all, and the coordinator refuses it before it checks any privilege.
    citus = await on_citus(admin)
    refused = asyncpg.FeatureNotSupportedError if citus else asyncpg.InsufficientPrivilegeError
    async with as_app_role(admin, settings, seed_a.tenant_id):
        with pytest.raises(refused) as granted:
            await admin.execute(move, seed_b.tenant_id, seed_a.tenant_id)
    if not citus:
        assert granted.value.sqlstate == "42501"
        assert "permission denied for table api_rate_limits" in str(granted.value)
    # The owner holds every column, and row-level security's WITH CHECK still refuses the
    # move (on Citus, the coordinator again): its own policy of the table, owner_scoped,
    # reads the plain setting its rate-limit function sets.
    async with rolled_back(admin):
        await admin.execute(f'SET LOCAL ROLE "{settings.roles.owner}"')
        await admin.execute(f"SET LOCAL app.tenant_id = '{seed_a.tenant_id}'")
        with pytest.raises(refused) as checked:
            await admin.execute(move, seed_b.tenant_id, seed_a.tenant_id)
    if not citus:
        assert "violates row-level security policy" in str(checked.value)
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM users WHERE tenant_id = $1 AND display_name = 'hijacked'",
            seed_b.tenant_id,
        )
        == 0
    )
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM api_rate_limits WHERE tenant_id = $1", seed_a.tenant_id
        )
        >= 1
    )


def now_ms() -> int:
    """The time now in epoch milliseconds, as claims say when they were issued."""
    return time.time_ns() // 1_000_000


# What sfdb_require_claim() says of each claim the database refuses (a pattern).
LATE = r" s after it was issued \(accepted: -2 to 10 s\)"
REFUSED_CLAIMS = {
    "unset": "no well-formed claim is set",
    "empty": "no well-formed claim is set",
    "plain setting only": "no well-formed claim is set",
    "not a claim": "no well-formed claim is set",
    "another version": "no well-formed claim is set",
    "no signature": "no well-formed claim is set",
    "truncated signature": "(no well-formed claim is set|its signature does not verify)",
    "unknown key id": "the database holds no tenant key other ",
    "another key of the same id": "its signature does not verify",
    "another tenant under the signature": "its signature does not verify",
    "expired": r"it reached the database 6[0-9]\.[0-9]" + LATE,
    "from the future": r"it reached the database -(59|60)\.[0-9]" + LATE,
    "another backend": "it was made for another server connection",
}


def refused_claim(
    case: str, settings: DatabaseSettings, tenant: uuid.UUID, other: uuid.UUID, backend: int
) -> tuple[str | None, str | None]:
    """``app.tenant_claim`` and ``app.tenant_id`` of a case of :data:`REFUSED_CLAIMS`, each
    meant to admit ``tenant`` (``other``: another tenant; ``backend``: this connection's)."""
    key = TenantKey.from_settings(settings)
    good = key.sign(tenant)
    made: dict[str, tuple[str | None, str | None]] = {
        "unset": (None, None),
        "empty": ("", None),
        "plain setting only": (None, str(tenant)),
        "not a claim": ("v1.'; SELECT 1; --", None),
        "another version": ("v2" + good.removeprefix("v1"), None),
        "no signature": (good.rsplit(".", 1)[0], None),
        "truncated signature": (good[:-1], None),
        "unknown key id": (TenantKey.parse(generate_tenant_key("other")).sign(tenant), None),
        "another key of the same id": (
            TenantKey.parse(generate_tenant_key(key.key_id)).sign(tenant),
            None,
        ),
        "another tenant under the signature": (good.replace(str(tenant), str(other)), None),
        "expired": (key.sign(tenant, issued_ms=now_ms() - 60_000), None),
        "from the future": (key.sign(tenant, issued_ms=now_ms() + 60_000), None),
        "another backend": (key.sign(tenant, backend_pid=backend + 1), None),
    }
    return made[case]


@pytest.mark.parametrize("case", list(REFUSED_CLAIMS))
async def test_without_a_verified_claim_no_rows_are_visible_and_nothing_fails(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    seed_a: Seeded,
    seed_b: Seeded,
    case: str,
) -> None:
    """A claim the database does not verify (or none, or only the plain ``app.tenant_id``
    that scoped rows before migration 0008) shows the app role no row of any tenant and
    lets it write none; reading does not fail, and the layer's check says why."""
    for table in [*TENANT_OWNED, "tenants"]:
        assert await admin.fetchval(f"SELECT count(*) FROM {table}") >= 1, table
    backend = await admin.fetchval("SELECT pg_backend_pid()")
    claim, plain = refused_claim(case, settings, seed_a.tenant_id, seed_b.tenant_id, backend)
    async with as_app_role(admin, settings, None, claim=claim, plain=plain):
        assert await admin.fetchval("SELECT current_user") == settings.roles.app
        assert await admin.fetchval("SELECT sfdb_claimed_tenant()") is None
        for table in [*TENANT_OWNED, "tenants"]:
            assert await admin.fetch(f"SELECT * FROM {table}") == [], table
            assert await admin.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    async with as_app_role(admin, settings, None, claim=claim, plain=plain):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await insert(admin, "users", minimal_row("users", seed_a))
    async with as_app_role(admin, settings, None, claim=claim, plain=plain):
        with pytest.raises(asyncpg.PostgresError) as refused:
            await admin.execute("SELECT sfdb_require_claim()")
    assert refused.value.sqlstate == "SF001"
    assert re.match(f"tenant claim refused: {REFUSED_CLAIMS[case]}", str(refused.value))
    assert str(seed_a.tenant_id) not in str(refused.value)  # it never quotes the claim


async def test_a_verified_claim_names_its_tenant_for_any_backend_or_for_this_one(
    admin: asyncpg.Connection, settings: DatabaseSettings, seed_a: Seeded
) -> None:
    """A claim made for backend 0 holds on any connection (behind PgBouncer, on Citus);
    one made for this connection's backend holds here, and only here."""
    backend = await admin.fetchval("SELECT pg_backend_pid()")
    for pid in (0, backend):
        async with as_app_role(
            admin, settings, None, claim=claim_for(settings, seed_a.tenant_id, backend_pid=pid)
        ):
            assert await admin.fetchval("SELECT sfdb_claimed_tenant()") == seed_a.tenant_id
            await admin.execute("SELECT sfdb_require_claim()")
            assert await admin.fetchval("SELECT id FROM tenants") == seed_a.tenant_id


# Offsets of a claim's issue time from now (ms) and whether the database accepts it: from
# 2 s before the issue (the application's clock ahead) to 10 s after, a second inside each.
WINDOW = [(-9_000, True), (1_000, True), (-11_000, False), (3_000, False)]


@pytest.mark.parametrize(("offset", "accepted"), WINDOW, ids=[str(o) for o, _ in WINDOW])
async def test_a_claim_holds_from_two_seconds_before_to_ten_seconds_after_its_issue(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    seed_a: Seeded,
    offset: int,
    accepted: bool,
) -> None:
    claim = claim_for(settings, seed_a.tenant_id, issued_ms=now_ms() + offset)
    async with as_app_role(admin, settings, None, claim=claim):
        found = await admin.fetchval("SELECT sfdb_claimed_tenant()")
        visible = await admin.fetchval("SELECT count(*) FROM users")
    assert found == (seed_a.tenant_id if accepted else None)
    assert (visible >= 1) is accepted


async def test_the_check_refuses_a_verified_claim_of_an_unknown_or_soft_deleted_tenant(
    admin: asyncpg.Connection, settings: DatabaseSettings, fresh: Seeded
) -> None:
    """The signature verifies, and the tenant is named; the first transaction's check says
    it is unknown or soft-deleted (TenantNotFound in the layer)."""
    await admin.execute("UPDATE tenants SET deleted_at = now() WHERE id = $1", fresh.tenant_id)
    for tenant in (uuid.uuid4(), fresh.tenant_id):
        async with as_app_role(admin, settings, tenant):
            assert await admin.fetchval("SELECT sfdb_claimed_tenant()") == tenant
            with pytest.raises(asyncpg.NoDataFoundError, match="unknown or soft-deleted"):
                await admin.execute("SELECT sfdb_require_claim()")


async def test_tenant_settings_do_not_outlive_the_transaction(
    admin: asyncpg.Connection, settings: DatabaseSettings, seed_a: Seeded
) -> None:
    superuser = await admin.fetchval("SELECT current_user")
    claim = claim_for(settings, seed_a.tenant_id)
    async with as_app_role(admin, settings, None, claim=claim):
        assert await admin.fetchval("SELECT current_setting('app.tenant_claim')") == claim
        assert await admin.fetchval("SELECT sfdb_claimed_tenant()") == seed_a.tenant_id
    assert await admin.fetchval("SELECT current_user") == superuser
    assert await admin.fetchval("SELECT current_setting('app.tenant_claim', true)") in (None, "")


def test_the_tenant_owned_tables_are_named_once_in_foreign_key_order() -> None:
    keyed = {
        table.name
        for table in Base.metadata.tables.values()
        if "tenant_id" in table.c and table.name not in OWNER_TABLES
    }
    assert set(TENANT_OWNED_TABLES) == keyed
    assert len(TENANT_OWNED_TABLES) == len(keyed)
    seen = {"tenants"}
    for name in TENANT_OWNED_TABLES:
        referenced = {fk.column.table.name for fk in Base.metadata.tables[name].foreign_keys}
        assert referenced <= seen, (name, referenced - seen)
        seen.add(name)
