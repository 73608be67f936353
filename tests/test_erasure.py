"""Erasure (:mod:`slack_fathom_db.erasure`): a workspace purged after its grace period, a user
erased on request; audit rows de-identified, never deleted, and every chain still verifying."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from slack_sdk.oauth.installation_store import Installation

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.audit_chain import verify_audit_chains
from slack_fathom_db.erasure import erase_user, purge_uninstalled_tenants
from slack_fathom_db.errors import TenantNotFound, ValidationError
from slack_fathom_db.models import TENANT_OWNED_TABLES
from slack_fathom_db.slack import InstallationStore
from tests.helpers import (
    add_user,
    claim_statement,
    dsn,
    set_local,
    unique_team_id,
    unique_user_id,
)
from tests.test_cli import owner_env, sfdb, url_of

# Bob's meeting, which Ann attended (named by her email, in either form).
PARTICIPANTS = (
    {"name": "Ann", "email": "ANN@acme.example"},
    "ann@acme.example",
    {"name": "Carl", "email": "carl@client.example"},
)


@dataclass(frozen=True)
class Workspace:
    """A workspace with a row in every tenant-owned table."""

    tenant_id: TenantId
    slack_team_id: str
    slack_user_id: str
    user_id: uuid.UUID
    other_user_id: uuid.UUID
    crm_connection_id: uuid.UUID


async def populate(db: Database, *, name: str = "Acme") -> Workspace:
    """A new workspace with users, a CRM connection made by one of them, a mapping,
    meetings, audit events with personal fields, a rate-limit counter and an installation."""
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name=name)
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(
            slack_user_id=slack_user, slack_email="ann@acme.example", display_name="Ann"
        )
        other = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Bob")
        crm = await uow.tenants.connect_crm(
            provider_type="hubspot",
            credentials_secret_id="arn:aws:secretsmanager:eu-west-1:123456789012:secret:hub",
            connected_by_user_id=user.id,
            is_default=True,
        )
        await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="client.example", crm_account_id="42"
        )
        for who in (user, other):
            meeting = await uow.meetings.create(
                user_id=who.id,
                fathom_recording_id=f"rec-{uuid.uuid4()}",
                title="Intro call",
                participants=PARTICIPANTS if who is other else (),
            )
            await uow.audit.log_event(
                event_type="meeting.created",
                event_category="data",
                action_description=f"{who.display_name} recorded a meeting",
                user_id=who.id,
                resource_type="meeting_session",
                resource_id=str(meeting.id),
                ip_address="10.1.2.3",
                user_agent="Slack/1.0",
                metadata={"title": "Intro call"},
            )
        await uow.rate_limits.consume("meetings_processed", limit=100)
        await uow.commit()
    await InstallationStore(db, client_id=f"111.{uuid.uuid4().int % 10**9}").async_save(
        Installation(
            app_id="A111",
            team_id=team,
            user_id=slack_user,
            bot_id="B111",
            bot_token="xoxb-111",
            bot_scopes=["chat:write"],
            bot_user_id="U222",
        )
    )
    return Workspace(tenant, team, slack_user, user.id, other.id, crm.id)


async def rows_of(admin: asyncpg.Connection, tenant: uuid.UUID) -> dict[str, int]:
    """How many rows of each tenant-owned table belong to ``tenant``."""
    return {
        table: await admin.fetchval(
            f"SELECT count(*) FROM {table} WHERE tenant_id = $1",
            tenant,
        )
        for table in TENANT_OWNED_TABLES
    }


async def uninstall(db: Database, admin: asyncpg.Connection, team: str, *, days_ago: int) -> None:
    """Uninstall ``team`` as Slack's event would, ``days_ago`` days back."""
    assert await db.directory.uninstall(team) is not None
    await backdate(admin, team, days_ago=days_ago)


async def backdate(admin: asyncpg.Connection, team: str, *, days_ago: int) -> None:
    """Move an uninstalled workspace's clock ``days_ago`` days back, past the trigger that
    keeps it (as time passing would)."""
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        await admin.execute(
            "UPDATE tenants SET deleted_at = now() - make_interval(days => $2), "
            "uninstalled_at = now() - make_interval(days => $2) WHERE slack_team_id = $1",
            team,
            days_ago,
        )


async def audit_rows(admin: asyncpg.Connection, tenant: uuid.UUID) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT event_type, user_id, ip_address, user_agent, action_description, metadata, "
        "personal_salt FROM audit_logs WHERE tenant_id = $1 ORDER BY created_at, id",
        tenant,
    )


def erased(row: asyncpg.Record) -> bool:
    return (
        row["user_id"] is None
        and row["ip_address"] is None
        and row["user_agent"] is None
        and row["action_description"] == ""
        and row["metadata"] == "{}"
        and row["personal_salt"] is None
    )


async def test_purge_erases_a_workspace_past_its_grace_period_and_nothing_else(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """Every row of a workspace uninstalled 31 days ago goes but its audit rows, which are
    de-identified and joined by a ``tenant.purged`` record; a workspace uninstalled 5 days
    ago and a live one keep every row; every chain verifies; a second run finds nothing."""
    due, recent, live = [await populate(db) for _ in range(3)]
    await uninstall(db, admin, due.slack_team_id, days_ago=31)
    await uninstall(db, admin, recent.slack_team_id, days_ago=5)
    kept = {ws.tenant_id: await rows_of(admin, ws.tenant_id) for ws in (recent, live)}
    events_before = len(await audit_rows(admin, due.tenant_id))

    purged = await purge_uninstalled_tenants(settings)

    mine = [done for done in purged if done.tenant_id == due.tenant_id]
    assert len(mine) == 1
    assert mine[0].finished
    assert mine[0].deidentified == events_before
    assert {ws.tenant_id for ws in (recent, live)}.isdisjoint(done.tenant_id for done in purged)
    left = await rows_of(admin, due.tenant_id)
    assert {table: n for table, n in left.items() if table != "audit_logs"} == {
        table: 0 for table in TENANT_OWNED_TABLES if table != "audit_logs"
    }
    assert left["audit_logs"] == events_before + 1
    events = await audit_rows(admin, due.tenant_id)
    assert all(erased(row) for row in events[:-1])
    record = events[-1]
    assert record["event_type"] == "tenant.purged"
    assert record["user_id"] is None
    assert '"meeting_sessions": 2' in record["metadata"]
    tenant = await admin.fetchrow(
        "SELECT slack_team_name, settings, purged_at, deleted_at FROM tenants WHERE id = $1",
        due.tenant_id,
    )
    assert tenant is not None
    assert (tenant["slack_team_name"], tenant["settings"]) == ("", "{}")
    assert tenant["purged_at"] > tenant["deleted_at"]
    for ws in (recent, live):
        assert await rows_of(admin, ws.tenant_id) == kept[ws.tenant_id]
    for ws in (due, recent, live):
        found = await verify_audit_chains(settings, slack_team_id=ws.slack_team_id)
        assert found.ok, [chain.broken for chain in found.broken]
    again = await purge_uninstalled_tenants(settings)
    assert due.tenant_id not in {done.tenant_id for done in again}


async def test_a_purge_cut_short_is_finished_by_the_next_run(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """A purge that dies after two batches leaves the rest for the next run, which ends
    with the same state as an uninterrupted purge."""
    ws = await populate(db)
    await uninstall(db, admin, ws.slack_team_id, days_ago=40)
    events = len(await audit_rows(admin, ws.tenant_id))
    batches: list[tuple[str, int]] = []

    def crash(table: str, rows: int) -> None:
        batches.append((table, rows))
        if len(batches) == 2:
            raise RuntimeError("the purge's process dies")

    with pytest.raises(RuntimeError, match="dies"):
        await purge_uninstalled_tenants(settings, batch_size=1, on_batch=crash)
    assert batches == [("slack_bots", 1), ("slack_installations", 1)]
    partway = await rows_of(admin, ws.tenant_id)
    assert partway["slack_installations"] == 0
    assert partway["users"] == 2
    purged = await purge_uninstalled_tenants(settings, batch_size=1)
    assert [done.finished for done in purged if done.tenant_id == ws.tenant_id] == [True]
    left = await rows_of(admin, ws.tenant_id)
    assert sum(left.values()) == left["audit_logs"] == events + 1
    assert all(erased(row) for row in (await audit_rows(admin, ws.tenant_id))[:-1])
    assert (await verify_audit_chains(settings, slack_team_id=ws.slack_team_id)).ok


async def test_a_reinstall_stops_a_purge_cut_short_and_a_new_uninstall_starts_the_clock_again(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """A workspace installed again after a purge was cut short keeps what is left of it, is
    not marked purged, and works; uninstalled again, it waits out a new grace period."""
    ws = await populate(db)
    await uninstall(db, admin, ws.slack_team_id, days_ago=40)

    def crash(table: str, rows: int) -> None:
        raise RuntimeError(f"the purge's process dies after {rows} row of {table}")

    with pytest.raises(RuntimeError, match="dies"):
        await purge_uninstalled_tenants(settings, batch_size=1, on_batch=crash)
    assert await db.directory.install(slack_team_id=ws.slack_team_id, slack_team_name="Acme")
    purged = await purge_uninstalled_tenants(settings, batch_size=1)
    assert ws.tenant_id not in {done.tenant_id for done in purged}
    left = await rows_of(admin, ws.tenant_id)
    assert left["slack_bots"] == 0
    assert left["users"] == 2
    assert await admin.fetchval("SELECT purged_at FROM tenants WHERE id = $1", ws.tenant_id) is None
    async with db.unit_of_work(ws.tenant_id) as uow:
        assert len(await uow.tenants.list_users()) == 2
    assert await db.directory.uninstall(ws.slack_team_id) == ws.tenant_id
    purged = await purge_uninstalled_tenants(settings)
    assert ws.tenant_id not in {done.tenant_id for done in purged}
    await backdate(admin, ws.slack_team_id, days_ago=31)
    purged = await purge_uninstalled_tenants(settings)
    assert [done.finished for done in purged if done.tenant_id == ws.tenant_id] == [True]


async def test_erase_user_deletes_their_rows_and_de_identifies_their_audit_events(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """Every row of the Slack user (a removed one too), their meetings and the
    installation they authorized go; the CRM connection they made stays without them;
    their audit events are de-identified, the others' untouched; a ``user.erased``
    record is written; the chain verifies; a second request erases nothing, writes
    nothing."""
    ws = await populate(db)
    async with db.unit_of_work(ws.tenant_id) as uow:
        await uow.tenants.remove_user(ws.user_id)
        again = await uow.tenants.add_user(slack_user_id=ws.slack_user_id, display_name="Ann")
        await uow.audit.log_event(
            event_type="auth.login",
            event_category="auth",
            action_description="Ann again",
            user_id=again.id,
            ip_address="10.9.9.9",
        )
        await uow.commit()

    done = await erase_user(settings, ws.slack_team_id, ws.slack_user_id)

    assert (done.tenant_id, done.users, done.meetings, done.installations) == (
        ws.tenant_id,
        2,
        1,
        1,
    )
    assert done.deidentified == 3  # two events as the user, one naming them (the install)
    users = await admin.fetch("SELECT id FROM users WHERE tenant_id = $1", ws.tenant_id)
    assert [row["id"] for row in users] == [ws.other_user_id]
    meetings = await admin.fetch(
        "SELECT user_id, participants FROM meeting_sessions WHERE tenant_id = $1", ws.tenant_id
    )
    assert [row["user_id"] for row in meetings] == [ws.other_user_id]
    assert json.loads(meetings[0]["participants"]) == [
        {"name": "Carl", "email": "carl@client.example"}
    ]
    assert done.mentions == 1
    crm = await admin.fetchrow(
        "SELECT connected_by_user_id, deleted_at FROM crm_connections WHERE id = $1",
        ws.crm_connection_id,
    )
    assert crm is not None
    assert tuple(crm) == (None, None)
    events = await audit_rows(admin, ws.tenant_id)
    assert [row["event_type"] for row in events if erased(row)] == [
        "meeting.created",
        "slack.installed",
        "auth.login",
    ]
    theirs = [row for row in events if row["user_id"] == ws.other_user_id]
    assert len(theirs) == 1
    assert theirs[0]["ip_address"] is not None
    assert events[-1]["event_type"] == "user.erased"
    assert ws.slack_user_id not in str([tuple(row) for row in events])
    assert (await verify_audit_chains(settings, slack_team_id=ws.slack_team_id)).ok
    repeat = await erase_user(settings, ws.slack_team_id, ws.slack_user_id)
    assert (repeat.users, repeat.meetings, repeat.installations, repeat.deidentified) == (
        0,
        0,
        0,
        0,
    )
    assert len(await audit_rows(admin, ws.tenant_id)) == len(events)


async def test_erase_user_refuses_an_unknown_workspace_and_a_malformed_id(
    settings: DatabaseSettings,
) -> None:
    with pytest.raises(TenantNotFound, match="no workspace"):
        await erase_user(settings, unique_team_id(), unique_user_id())
    with pytest.raises(ValidationError, match="slack_user_id"):
        await erase_user(settings, unique_team_id(), "'; DROP TABLE users; --")


OWNER_UPDATES = {
    "a field left": "user_id = NULL, ip_address = NULL, user_agent = NULL, "
    "action_description = '', metadata = '{}', personal_salt = NULL, resource_id = 'x'",
    "the salt kept": "user_id = NULL, ip_address = NULL, user_agent = NULL, "
    "action_description = '', metadata = '{}'",
    "a personal field kept": "ip_address = NULL, user_agent = NULL, "
    "action_description = '', metadata = '{}', personal_salt = NULL",
    "the digest changed": "user_id = NULL, ip_address = NULL, user_agent = NULL, "
    "action_description = '', metadata = '{}', personal_salt = NULL, "
    "personal_digest = sha256('x')",
    "an event rewritten": "event_type = 'auth.logout'",
}


@pytest.mark.parametrize("update", OWNER_UPDATES.values(), ids=OWNER_UPDATES.keys())
async def test_the_owner_may_only_de_identify_an_audit_row(
    db: Database,
    settings: DatabaseSettings,
    as_owner: asyncpg.Connection,
    tenant_a: TenantId,
    update: str,
) -> None:
    """Even the owner, its workspace named, can make no other change to an audit row; a
    delete stays refused."""
    user = await add_user(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="auth.login",
            event_category="auth",
            action_description="in",
            ip_address="10.0.0.1",
            user_id=user.id,
        )
        await uow.commit()
    await as_owner.execute(f'SET ROLE "{settings.roles.owner}"')
    async with as_owner.transaction():
        await as_owner.execute(set_local("sfdb.lifecycle_tenant", str(tenant_a)))
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await as_owner.execute(f"UPDATE audit_logs SET {update} WHERE tenant_id = $1", tenant_a)
    async with as_owner.transaction():
        await as_owner.execute(set_local("sfdb.lifecycle_tenant", str(tenant_a)))
        # No policy lets the owner delete: row security leaves nothing to delete.
        assert await as_owner.execute("DELETE FROM audit_logs WHERE tenant_id = $1", tenant_a) == (
            "DELETE 0"
        )


async def test_the_owner_de_identifies_only_the_workspace_it_names(  # noqa: PLR0917 - fixtures
    db: Database,
    settings: DatabaseSettings,
    as_owner: asyncpg.Connection,
    admin: asyncpg.Connection,
    tenant_a: TenantId,
    tenant_b: TenantId,
) -> None:
    for tenant in (tenant_a, tenant_b):
        async with db.unit_of_work(tenant) as uow:
            await uow.audit.log_event(
                event_type="auth.login", event_category="auth", action_description="in"
            )
            await uow.commit()
    await as_owner.execute(f'SET ROLE "{settings.roles.owner}"')
    erase_all = (
        "UPDATE audit_logs SET user_id = NULL, ip_address = NULL, user_agent = NULL, "
        "action_description = '', metadata = '{}', personal_salt = NULL "
        "WHERE tenant_id = ANY($1::uuid[])"
    )
    async with as_owner.transaction():
        assert await as_owner.execute(erase_all, [tenant_a, tenant_b]) == "UPDATE 0"
    async with as_owner.transaction():
        await as_owner.execute(set_local("sfdb.lifecycle_tenant", str(tenant_a)))
        assert await as_owner.execute(erase_all, [tenant_a, tenant_b]) == "UPDATE 1"
    assert [erased(row) for row in await audit_rows(admin, tenant_b)] == [False]
    assert [erased(row) for row in await audit_rows(admin, tenant_a)] == [True]


async def test_the_runtime_login_can_erase_nothing(
    db: Database, settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    """The app role, as the runtime login, with raw SQL and the lifecycle setting set, may
    neither de-identify an audit row nor call the erasure as the owner does."""
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="auth.login", event_category="auth", action_description="in"
        )
        await uow.commit()
    conn = await asyncpg.connect(
        settings.sqlalchemy_url().set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        for role in (settings.roles.app, settings.roles.directory):
            async with conn.transaction():
                await conn.execute(f'SET LOCAL ROLE "{role}"')
                await conn.execute(set_local("sfdb.lifecycle_tenant", str(tenant_a)))
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(
                        "UPDATE audit_logs SET user_id = NULL, ip_address = NULL, "
                        "user_agent = NULL, action_description = '', metadata = '{}', "
                        "personal_salt = NULL WHERE tenant_id = $1",
                        tenant_a,
                    )
    finally:
        await conn.close()


async def test_sfdb_tenant_purge_and_erase_user(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection, tmp_path: Path
) -> None:
    """As README runs them: the runtime login's DATABASE_URL and the owner's
    DATABASE_MIGRATION_URL; one line per workspace or user, exit 0; bad input exits 2 or
    1 with one line."""
    ws = await populate(db)
    other = await populate(db)
    env = owner_env(settings)
    erased_user = sfdb(
        "tenant",
        "erase-user",
        other.slack_team_id,
        other.slack_user_id,
        url=url_of(settings),
        cwd=tmp_path,
        extra_env=env,
    )
    assert erased_user.returncode == 0, erased_user.stderr
    assert f"{other.slack_user_id} erased from {other.slack_team_id}: 1 user row(s)" in (
        erased_user.stdout
    )
    await uninstall(db, admin, ws.slack_team_id, days_ago=3)
    kept = sfdb("tenant", "purge", url=url_of(settings), cwd=tmp_path, extra_env=env)
    assert kept.returncode == 0, kept.stderr
    assert ws.slack_team_id not in kept.stdout
    assert "uninstalled more than 30 days ago" in kept.stdout
    purged = sfdb(
        "tenant",
        "purge",
        "--grace-days",
        "2",
        url=url_of(settings),
        cwd=tmp_path,
        extra_env=env,
    )
    assert purged.returncode == 0, purged.stderr
    assert f"{ws.slack_team_id}: erased;" in purged.stdout
    assert (await rows_of(admin, ws.tenant_id))["users"] == 0
    unknown = sfdb(
        "tenant",
        "erase-user",
        unique_team_id(),
        unique_user_id(),
        url=url_of(settings),
        cwd=tmp_path,
        extra_env=env,
    )
    assert (unknown.returncode, unknown.stderr.count("\n")) == (1, 1)
    assert "no workspace with slack_team_id" in unknown.stderr
    refused = sfdb(
        "tenant", "purge", "--grace-days", "-1", url=url_of(settings), cwd=tmp_path, extra_env=env
    )
    assert refused.returncode == 2


async def test_the_app_role_can_neither_start_nor_move_the_purge_clock(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """As the runtime login with its workspace's claim, raw SQL may soft-delete the
    workspace at any time it likes, but the purge goes by when the directory uninstalled
    it: a workspace soft-deleted "ten years ago" by its own app role is not purged, nor is
    one the directory uninstalled yesterday, however far back the app role then moves its
    soft delete; the clock itself is out of the app role's reach."""
    own, uninstalled = await populate(db), await populate(db)
    await uninstall(db, admin, uninstalled.slack_team_id, days_ago=1)
    conn = await asyncpg.connect(dsn(settings))
    try:
        for ws in (own, uninstalled):
            async with conn.transaction():
                await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
                await conn.execute(claim_statement(settings, ws.tenant_id))
                await conn.execute(
                    "UPDATE tenants SET deleted_at = now() - interval '10 years', "
                    "updated_at = now() - interval '10 years' WHERE id = $1",
                    ws.tenant_id,
                )
            async with conn.transaction():
                await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
                await conn.execute(claim_statement(settings, ws.tenant_id))
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(
                        "UPDATE tenants SET uninstalled_at = now() - interval '10 years' "
                        "WHERE id = $1",
                        ws.tenant_id,
                    )
    finally:
        await conn.close()
    clocks = {
        row["id"]: (row["deleted_at"], row["uninstalled_at"])
        for row in await admin.fetch(
            "SELECT id, deleted_at, uninstalled_at FROM tenants WHERE id = ANY($1::uuid[])",
            [own.tenant_id, uninstalled.tenant_id],
        )
    }
    assert clocks[own.tenant_id][0] is not None  # the app role's soft delete happened
    assert clocks[own.tenant_id][1] is None
    assert clocks[uninstalled.tenant_id][1] is not None
    assert clocks[uninstalled.tenant_id][1] > clocks[uninstalled.tenant_id][0]
    purged = await purge_uninstalled_tenants(settings)
    assert {own.tenant_id, uninstalled.tenant_id}.isdisjoint(done.tenant_id for done in purged)
    assert (await rows_of(admin, own.tenant_id))["users"] == 2
    assert (await rows_of(admin, uninstalled.tenant_id))["users"] == 2


@pytest.mark.not_on_citus("the refusal is a trigger on a distributed table, added by the test")
async def test_a_workspace_the_database_refuses_to_erase_does_not_stop_the_others(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """The failing workspace is reported (``failed``, with the database's reason) and
    resumed by a later run; the other is erased in the same run."""
    stuck, fine = await populate(db), await populate(db)
    for ws in (stuck, fine):
        await uninstall(db, admin, ws.slack_team_id, days_ago=40)
    await admin.execute(
        f"""
        CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.tenant_id = '{stuck.tenant_id}' THEN
                RAISE EXCEPTION 'held for a legal hold' USING ERRCODE = 'check_violation';
            END IF;
            RETURN OLD;
        END $$;
        CREATE TRIGGER zz_refuse BEFORE DELETE ON users
        FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse();
        """
    )
    try:
        purged = {done.tenant_id: done for done in await purge_uninstalled_tenants(settings)}
    finally:
        await admin.execute("DROP TRIGGER zz_refuse ON users")
    assert purged[stuck.tenant_id].outcome == "failed"
    assert "[23514]" in (purged[stuck.tenant_id].error or "")
    assert purged[fine.tenant_id].outcome == "erased"
    again = {done.tenant_id: done for done in await purge_uninstalled_tenants(settings)}
    assert again[stuck.tenant_id].outcome == "erased"
    assert fine.tenant_id not in again


async def test_two_purges_at_once_erase_a_workspace_once(
    db: Database, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """Both finish; one erased it, the other says another run did; one record."""
    ws = await populate(db)
    await uninstall(db, admin, ws.slack_team_id, days_ago=40)
    runs = await asyncio.gather(
        *(purge_uninstalled_tenants(settings, batch_size=1) for _ in range(2))
    )
    outcomes = sorted(
        done.outcome for run in runs for done in run if done.tenant_id == ws.tenant_id
    )
    assert outcomes == ["erased", "erased by another run"]
    events = await audit_rows(admin, ws.tenant_id)
    assert [row["event_type"] for row in events].count("tenant.purged") == 1
    assert (await verify_audit_chains(settings, slack_team_id=ws.slack_team_id)).ok
