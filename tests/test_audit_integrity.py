"""Audit integrity: audit rows cannot be changed, and denials outlive the caller's rollback.

Append-only is enforced by the database itself (grants for the app and
directory roles, a trigger for everyone, the owner included), and an inserted
row takes its id and creation time from the server; so each attempt here is
raw SQL outside the layer, as the role it names (``SET ROLE`` from the suite's
superuser, the tenant's rows shown to the app role by a claim signed with the
test database's key, as a unit of work signs one): the layer has no update or
delete to try.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.errors import NotFound, ValidationError
from tests.helpers import claim_statement, on_citus, unique_user_id

ATTEMPTS = {
    "update": "UPDATE audit_logs SET action_description = 'rewritten' WHERE tenant_id = $1",
    "update status": "UPDATE audit_logs SET status = 'success' WHERE tenant_id = $1",
    "delete": "DELETE FROM audit_logs WHERE tenant_id = $1",
    "delete by id": "DELETE FROM audit_logs WHERE tenant_id = $1 AND id IS NOT NULL",
    "upsert": (
        # The whole key, its partition key included (revision 0011).
        "INSERT INTO audit_logs (tenant_id, id, created_at, event_type, event_category, "
        "action_description) SELECT tenant_id, id, created_at, 'x', 'data', 'x' FROM audit_logs "
        "WHERE tenant_id = $1 ON CONFLICT (tenant_id, id, created_at) "
        "DO UPDATE SET event_type = 'rewritten'"
    ),
    "truncate": "TRUNCATE audit_logs",
    "truncate cascade": "TRUNCATE audit_logs CASCADE",
}


async def snapshot(admin: asyncpg.Connection, tenant: TenantId) -> list[str]:
    rows = await admin.fetch(
        "SELECT to_jsonb(a) AS row FROM audit_logs a WHERE tenant_id = $1 ORDER BY id", tenant
    )
    return [json.dumps(json.loads(r["row"]), sort_keys=True) for r in rows]


@pytest_asyncio.fixture
async def logged(db: Database, tenant_a: TenantId, admin: asyncpg.Connection) -> list[str]:
    """Two committed audit events of tenant A; the table's rows of A as stored."""
    async with db.unit_of_work(tenant_a) as uow:
        for n in range(2):
            await uow.audit.log_event(
                event_type="auth.login",
                event_category="auth",
                action_description=f"login {n}",
                status="failure",
                metadata={"n": n},
            )
        await uow.commit()
    rows = await snapshot(admin, tenant_a)
    assert len(rows) == 2
    return rows


async def _attempt_as_app_role(
    admin: asyncpg.Connection, settings: DatabaseSettings, tenant: TenantId, sql: str
) -> asyncpg.PostgresError:
    """Run ``sql`` as the app role, scoped to ``tenant`` like a unit of work; its error."""
    return await _attempt_as(admin, settings, settings.roles.app, tenant, sql)


async def _attempt_as(
    admin: asyncpg.Connection,
    settings: DatabaseSettings,
    role: str,
    tenant: TenantId,
    sql: str,
    *,
    lift_row_security: bool = False,
) -> asyncpg.PostgresError:
    """Run ``sql`` as ``role`` with a claim for ``tenant`` (its rows visible to the app role),
    rolled back; its error. ``lift_row_security``: the table's owner first stops forcing
    row-level security on itself, which it may, and sees every row of the table."""
    args = [] if "$1" not in sql else [tenant]
    transaction = admin.transaction()
    await transaction.start()
    try:
        await admin.execute(f'SET LOCAL ROLE "{role}"')
        await admin.execute(claim_statement(settings, tenant))
        assert await admin.fetchval("SELECT current_user") == role
        if lift_row_security:
            await admin.execute("ALTER TABLE audit_logs NO FORCE ROW LEVEL SECURITY")
            visible = await admin.fetchval(
                "SELECT count(*) FROM audit_logs WHERE tenant_id = $1", tenant
            )
            assert visible > 0, "no row to change is visible: the attempt would prove nothing"
        await admin.execute(sql, *args)
    except asyncpg.PostgresError as exc:
        return exc
    finally:
        await transaction.rollback()  # also when it was allowed: the test fails, nothing stays
    pytest.fail(f"{role} was allowed to run: {sql}")


async def _attempt_as_owner(
    admin: asyncpg.Connection, settings: DatabaseSettings, tenant: TenantId, sql: str
) -> asyncpg.PostgresError:
    """Run ``sql`` as the table's owner, every row visible to it; its error.

    The owner holds every privilege on the table. Forced row-level security shows it no
    audit row (no policy of the table reads rows for it, see below), but it owns the
    table and may stop forcing that on itself: so it does first, and only the
    append-only trigger stands in its way.
    """
    owner = await admin.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'audit_logs'")
    assert owner == settings.roles.owner
    return await _attempt_as(admin, settings, owner, tenant, sql, lift_row_security=True)


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
async def test_app_role_cannot_change_audit_rows(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    attempt: str,
) -> None:
    error = await _attempt_as_app_role(admin, sfdb_direct_settings, tenant_a, ATTEMPTS[attempt])
    assert error.sqlstate == "42501"  # insufficient_privilege: no UPDATE/DELETE/TRUNCATE grant
    assert "permission denied for table audit_logs" in str(error)
    assert await snapshot(admin, tenant_a) == logged


# An audit row's id and creation time come from the server, whatever an insert of the app
# role says: a row cannot be back-dated, nor made to collide with (and upsert over) another.
CHOSEN = {
    "id": "'00000000-0000-4000-8000-000000000001'::uuid",
    # The start of this month (UTC): the row's partition is the server time's (revision 0011).
    "created_at": "date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
}


@pytest.mark.parametrize("column", list(CHOSEN))
async def test_an_audit_row_gets_its_id_and_time_from_the_server_whatever_the_app_role_says(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    column: str,
) -> None:
    transaction = admin.transaction()
    await transaction.start()
    try:
        await admin.execute(f'SET LOCAL ROLE "{sfdb_direct_settings.roles.app}"')
        await admin.execute(claim_statement(sfdb_direct_settings, tenant_a))
        chosen = await admin.fetchval(f"SELECT {CHOSEN[column]}")
        began = await admin.fetchval("SELECT now()")
        row = await admin.fetchrow(
            f"INSERT INTO audit_logs (tenant_id, {column}, event_type, event_category, "
            f"action_description) VALUES ($1, {CHOSEN[column]}, 'x', 'data', 'x') "
            "RETURNING id, created_at",
            tenant_a,
        )
        inserted = await admin.fetchval("SELECT clock_timestamp()")
    finally:
        await transaction.rollback()  # append-only: what is committed stays
    assert row is not None
    assert row[column] != chosen
    # The server's time of the insert (on Citus, the worker's transaction began a little
    # after the coordinator's).
    assert began <= row["created_at"] <= inserted
    assert await snapshot(admin, tenant_a) == logged


async def test_an_audit_row_of_the_app_role_dated_in_another_month_is_refused(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    """A row goes to the partition of the month its insert names before the server gives it
    its time, and cannot move partition then: a time of another month is refused (the
    layer never names one)."""
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{sfdb_direct_settings.roles.app}"')
        await admin.execute(claim_statement(sfdb_direct_settings, tenant_a))
        with pytest.raises(asyncpg.PostgresError, match="creation time from the server") as caught:
            await admin.execute(
                "INSERT INTO audit_logs (tenant_id, created_at, event_type, event_category, "
                "action_description) VALUES ($1, now() - interval '1 year', 'x', 'data', 'x')",
                tenant_a,
            )
    if not await on_citus(admin):  # there the worker's error reaches the client as text
        assert caught.value.sqlstate == "42501"
    assert await snapshot(admin, tenant_a) == logged


DIRECTORY_ATTEMPTS = {
    **ATTEMPTS,
    "insert": (
        "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description) "
        "VALUES ($1, 'x', 'data', 'x')"
    ),
}


@pytest.mark.parametrize("attempt", list(DIRECTORY_ATTEMPTS))
async def test_directory_role_cannot_touch_audit_rows(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    attempt: str,
) -> None:
    directory = sfdb_direct_settings.roles.directory
    error = await _attempt_as(
        admin, sfdb_direct_settings, directory, tenant_a, DIRECTORY_ATTEMPTS[attempt]
    )
    assert error.sqlstate == "42501"
    assert "permission denied for table audit_logs" in str(error)
    assert await snapshot(admin, tenant_a) == logged


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
async def test_table_owner_cannot_change_audit_rows(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    attempt: str,
) -> None:
    error = await _attempt_as_owner(admin, sfdb_direct_settings, tenant_a, ATTEMPTS[attempt])
    assert error.sqlstate == "42501"
    assert "append-only" in str(error)  # the trigger, not a missing grant, refused it
    assert await snapshot(admin, tenant_a) == logged


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_logs SET metadata = '{}' WHERE id = $1",
        "DELETE FROM audit_logs WHERE id = $1",
    ],
)
async def test_owner_update_of_a_single_row_by_id_is_refused(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    statement: str,
) -> None:
    row_id = await admin.fetchval(
        "SELECT id FROM audit_logs WHERE tenant_id = $1 LIMIT 1", tenant_a
    )
    transaction = admin.transaction()
    await transaction.start()
    try:
        await admin.execute(f'SET LOCAL ROLE "{sfdb_direct_settings.roles.owner}"')
        # As the table's owner may: every row visible to it, the trigger alone in its way.
        await admin.execute("ALTER TABLE audit_logs NO FORCE ROW LEVEL SECURITY")
        assert await admin.fetchval("SELECT count(*) FROM audit_logs WHERE id = $1", row_id) == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin.execute(statement, row_id)
    finally:
        await transaction.rollback()  # the table's row-level security forced again
    assert await snapshot(admin, tenant_a) == logged


@pytest.mark.parametrize("scope", ["plain setting", "claim"])
async def test_under_forced_row_level_security_the_owner_reads_but_changes_no_audit_row(
    logged: list[str],
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    scope: str,
) -> None:
    """The tenant policies are the app role's alone: the owner, whatever tenant it sets,
    reads every audit row (``audit_verifier``, for ``sfdb audit verify``) and its update or
    delete reaches none (its other policy of the table is for the inserts of its
    functions)."""
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{sfdb_direct_settings.roles.owner}"')
        if scope == "claim":
            await admin.execute(claim_statement(sfdb_direct_settings, tenant_a))
        else:
            await admin.execute(f"SET LOCAL app.tenant_id = '{uuid.UUID(str(tenant_a))}'")
        seen = await admin.fetchval(
            "SELECT count(*) FROM audit_logs WHERE tenant_id = $1", tenant_a
        )
        assert seen == len(logged)
        assert await admin.execute(ATTEMPTS["update"], tenant_a) == "UPDATE 0"
        assert await admin.execute(ATTEMPTS["delete"], tenant_a) == "DELETE 0"
    assert await snapshot(admin, tenant_a) == logged


async def test_append_only_triggers_are_enabled(admin: asyncpg.Connection) -> None:
    triggers: dict[str, object] = {
        name: enabled
        for name, enabled in await admin.fetch(
            "SELECT tgname, tgenabled FROM pg_trigger "
            "WHERE tgrelid = 'audit_logs'::regclass AND NOT tgisinternal"
        )
    }
    # 'O': fires in origin and local mode; also 'A' (always) would do. Never 'D' (disabled).
    assert triggers.get("audit_logs_append_only") in (b"O", b"A", "O", "A")
    assert triggers.get("audit_logs_no_truncate") in (b"O", b"A", "O", "A")


async def _privileges(admin: asyncpg.Connection, role: str) -> dict[str, set[str]]:
    """The privileges ``role`` (or ``public``) holds on audit_logs: per column, and on the table."""
    rows = await admin.fetch(
        "SELECT a.attname AS target, p.privilege FROM pg_attribute a "
        "CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES']) AS p(privilege) "
        "WHERE a.attrelid = 'public.audit_logs'::regclass AND a.attnum > 0 "
        "AND NOT a.attisdropped AND has_column_privilege($1, a.attrelid, a.attnum, p.privilege) "
        "UNION ALL SELECT '<table>', p.privilege FROM unnest(ARRAY['SELECT', 'INSERT', "
        "'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p(privilege) "
        "WHERE has_table_privilege($1, 'public.audit_logs', p.privilege)",
        role,
    )
    privileges: dict[str, set[str]] = {}
    for row in rows:
        privileges.setdefault(row["privilege"], set()).add(row["target"])
    return privileges


async def test_app_role_has_only_insert_and_select_on_audit_logs(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    roles = sfdb_direct_settings.roles
    columns = {
        row["attname"]
        for row in await admin.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.audit_logs'::regclass "
            "AND attnum > 0 AND NOT attisdropped"
        )
    }
    # SELECT and INSERT, no UPDATE, DELETE or TRUNCATE of anything, not even of one column.
    assert await _privileges(admin, roles.app) == {
        "SELECT": columns | {"<table>"},
        "INSERT": columns | {"<table>"},
    }
    # Nobody else at runtime holds anything on the audit log.
    runtime = sfdb_direct_settings.sqlalchemy_url().username
    assert runtime is not None
    for role in (roles.directory, runtime, "public"):
        assert await _privileges(admin, role) == {}, role


# -- security events survive the caller's rollback -----------------------------------------


async def _events(
    admin: asyncpg.Connection, tenant: TenantId, event_type: str
) -> list[dict[str, Any]]:
    rows = await admin.fetch(
        "SELECT event_type, event_category, status, action_description, resource_type, "
        "resource_id, metadata FROM audit_logs WHERE tenant_id = $1 AND event_type = $2",
        tenant,
        event_type,
    )
    return [dict(row) for row in rows]


class Denied(Exception):
    """The handler's refusal, raised after logging it."""


async def test_cross_tenant_write_attempt_is_logged_and_survives_the_rollback(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_b) as uow:
        crm_of_b = await uow.tenants.connect_crm(
            provider_type="hubspot", credentials_secret_id="vault:b/hubspot"
        )
        await uow.commit()
    slack_user = unique_user_id()

    with pytest.raises(Denied):  # noqa: PT012
        async with db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)  # rolled back below
            try:
                await uow.tenants.map_account(
                    crm_connection_id=crm_of_b.id,
                    email_domain="acme.com",
                    crm_account_id="001",
                )
            except NotFound:
                event = await db.log_security_event(
                    tenant_a,
                    event_type="security.cross_tenant_write",
                    event_category="security",
                    action_description="map_account named a CRM connection of no live row here",
                    status="denied",
                    resource_type="crm_connection",
                    resource_id=crm_of_b.id,
                )
                # Committed already, while the caller's transaction is still open.
                assert len(await _events(admin, tenant_a, "security.cross_tenant_write")) == 1
                raise Denied from None

    assert event.status == "denied"
    assert await _events(admin, tenant_a, "security.cross_tenant_write") == [
        {
            "event_type": "security.cross_tenant_write",
            "event_category": "security",
            "status": "denied",
            "action_description": "map_account named a CRM connection of no live row here",
            "resource_type": "crm_connection",
            "resource_id": str(crm_of_b.id),
            "metadata": "{}",
        }
    ]
    # The caller's own writes were rolled back; tenant B saw nothing at all.
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
            tenant_a,
            slack_user,
        )
        == 0
    )
    assert (
        await admin.fetchval("SELECT count(*) FROM audit_logs WHERE tenant_id = $1", tenant_b) == 0
    )
    assert (
        await admin.fetchval("SELECT count(*) FROM account_mappings WHERE tenant_id = $1", tenant_a)
        == 0
    )


async def test_rate_limit_denial_is_logged_and_survives_the_rollback(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    assert (await db.rate_limit(tenant_a, "exports", limit=1)).allowed
    with pytest.raises(Denied):  # noqa: PT012
        async with db.unit_of_work(tenant_a) as uow:
            await uow.audit.log_event(
                event_type="export.started", event_category="data", action_description="x"
            )
            decision = await db.rate_limit(tenant_a, "exports", limit=1)
            if not decision.allowed:
                await db.log_security_event(
                    tenant_a,
                    event_type="rate_limit.denied",
                    event_category="security",
                    action_description="exports: daily limit reached",
                    metadata={"limit": decision.limit, "retry_after": decision.retry_after},
                )
                raise Denied
    events = await _events(admin, tenant_a, "rate_limit.denied")
    assert len(events) == 1
    assert events[0]["status"] == "denied"  # the default of log_security_event
    assert json.loads(events[0]["metadata"])["limit"] == 1
    assert await _events(admin, tenant_a, "export.started") == []


async def test_log_security_event_validates_before_taking_a_connection(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    # A pool with one connection, held by the caller: an invalid event must fail at once
    # (validation), not wait for the pool.
    small = Database(
        settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 30.0})
    )
    try:
        async with small.unit_of_work(tenant_a):
            with pytest.raises(ValidationError, match="event_category"):
                await small.log_security_event(
                    tenant_a,
                    event_type="security.denied",
                    event_category="not-a-category",
                    action_description="x",
                )
    finally:
        await small.dispose()
    assert await _events(admin, tenant_a, "security.denied") == []
