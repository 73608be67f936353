"""The isolation matrix: tenant B, acting on tenant A's ids and data, through every public method.

Tenant A gets a full set of rows through the public API (users, CRM connections
with secret references, account mappings, meetings in every state, audit
events, rate-limit counters and a token bucket). Tenant B then calls every
public repository method (and ``db.rate_limit``) with A's ids, Slack user ids,
Fathom recording ids, email domains and rate-limit resource names:

* reads return ``None`` / empty / B's own figures;
* writes that name A's rows raise ``NotFound`` (a composite foreign key for
  creations that reference A's user or connection);
* B's own creations with A's natural keys make B's own rows.

After every case (committed for real when the method writes) every row of
tenant A in all seven tables is read back by a superuser connection, which
bypasses row-level security, and compared byte for byte with the snapshot
taken before. Beyond the repositories: raw SQL inside a unit of work (RLS
alone hides and refuses A's rows), the role and signed tenant claim of every
transaction and their reset on a pooled connection, and many tenants'
units of work interleaved on a two-connection pool.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import TextClause, event, text

from slack_fathom_db import Database, DatabaseSettings, TenantId, TenantStats, UnitOfWork
from slack_fathom_db.claims import CLAIM_PATTERN
from slack_fathom_db.errors import NotFound, TenantIsolationError, TransactionAborted, sqlstate_of
from slack_fathom_db.records import CrmConnection, MeetingSession, User
from slack_fathom_db.repositories import AuditRepo, MeetingRepo, RateLimitRepo, TenantRepo
from slack_fathom_db.testing import engine_of, execute_in, probe_outside
from tests.helpers import fetch_row, on_citus, unique_team_id, unique_user_id

# -- snapshots ---------------------------------------------------------------------------

SNAPSHOT_ORDER = {
    "tenants": "id",
    "users": "id",
    "crm_connections": "id",
    "meeting_sessions": "id",
    "account_mappings": "id",
    "audit_logs": "created_at, id",
    "api_rate_limits": "resource_type, period, window_start",
}
TENANT_OWNED = [table for table in SNAPSHOT_ORDER if table != "tenants"]

Snapshot = dict[str, list[str]]


async def snapshot(admin: asyncpg.Connection, tenant: uuid.UUID) -> Snapshot:
    """Every row of ``tenant`` in all seven tables, as JSON text (the superuser bypasses RLS)."""
    rows: Snapshot = {}
    for table, order in SNAPSHOT_ORDER.items():
        column = "id" if table == "tenants" else "tenant_id"
        found = await admin.fetch(
            f"SELECT row_to_json(t)::text AS j FROM {table} t WHERE {column} = $1 ORDER BY {order}",
            tenant,
        )
        rows[table] = [r["j"] for r in found]
    return rows


def bound(sql: str, **values: object) -> TextClause:
    """``sql`` as a statement with those of ``values`` it names (``:name``) bound."""
    return text(sql).bindparams(
        **{name: value for name, value in values.items() if re.search(rf":{name}\b", sql)}
    )


def assert_refused_by_database(exc: BaseException) -> None:
    """A cross-tenant write refused by RLS or grants: TenantIsolationError or SQLSTATE 42501."""
    assert isinstance(exc, TenantIsolationError | asyncpg.PostgresError), repr(exc)
    assert sqlstate_of(exc) == "42501", (type(exc), sqlstate_of(exc))


# -- the two tenants' data -----------------------------------------------------------------


@dataclass
class World:
    a: TenantId
    b: TenantId
    a_team: str
    b_team: str
    a_domain: str
    a_users: dict[str, User]
    a_conns: dict[str, CrmConnection]
    a_meetings: dict[str, MeetingSession]
    a_bucket: str
    b_user: User
    b_conn: CrmConnection
    b_meeting: MeetingSession
    b_events: dict[str, uuid.UUID] = field(default_factory=dict)


A_DAILY = "slack_events"  # A has spent its whole daily limit of 3
A_DAILY_LIMIT = 3
A_HOURLY = "meetings_processed"  # A has spent 1 of its hourly limit


async def build_world(db: Database) -> World:
    suffix = secrets.token_hex(4)
    a_team, b_team = unique_team_id(), unique_team_id()
    a = await db.directory.install(
        slack_team_id=a_team, slack_team_name="Tenant A", plan_tier="pro"
    )
    b = await db.directory.install(slack_team_id=b_team, slack_team_name="Tenant B")
    a_domain = f"a-corp-{suffix}.example"
    a_bucket = f"slack_api_{suffix}"

    async with db.unit_of_work(a) as uow:
        await uow.tenants.update(
            settings={"timezone": "Europe/Paris"}, subscription_status="trialing"
        )
        owner = await uow.tenants.add_user(
            slack_user_id=unique_user_id(),
            slack_email=f"alice@{a_domain}",
            display_name="Alice A",
            role="owner",
        )
        member = await uow.tenants.add_user(
            slack_user_id=unique_user_id(), slack_email=f"bob@{a_domain}", display_name="Bob A"
        )
        removed = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Gone A")
        await uow.tenants.remove_user(removed.id)

        hubspot = await uow.tenants.connect_crm(
            provider_type="hubspot",
            credentials_secret_id="vault:crm/hubspot/a",
            connected_by_user_id=owner.id,
            is_default=True,
        )
        salesforce = await uow.tenants.connect_crm(
            provider_type="salesforce", credentials_secret_id="vault:crm/salesforce/a"
        )
        old = await uow.tenants.connect_crm(
            provider_type="crono", credentials_secret_id="vault:crm/crono/a"
        )
        await uow.tenants.disconnect_crm(old.id)

        await uow.tenants.map_account(
            crm_connection_id=hubspot.id,
            email_domain=a_domain,
            crm_account_id="acct-a-1",
            crm_account_name="A Corp",
            verified=True,
        )
        await uow.tenants.map_account(
            crm_connection_id=hubspot.id, email_domain=f"eu.{a_domain}", crm_account_id="acct-a-2"
        )
        await uow.tenants.map_account(
            crm_connection_id=salesforce.id,
            email_domain=a_domain,
            crm_account_id="sf-a-1",
            verified=True,
        )

        meetings: dict[str, MeetingSession] = {}

        async def meeting(state: str, user: User = owner) -> MeetingSession:
            return await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id=f"rec-a-{suffix}-{state}",
                title=f"A {state} call",
                crm_connection_id=hubspot.id,
                participants=[{"email": f"carol@{a_domain}"}],
            )

        meetings["pending"] = await meeting("pending")
        meetings["processing"] = await meeting("processing")
        await uow.meetings.start_processing(meetings["processing"].id)
        meetings["completed"] = await meeting("completed")
        await uow.meetings.start_processing(meetings["completed"].id)
        await uow.meetings.complete_processing(
            meetings["completed"].id, summary="Went well", action_items=["send deck"]
        )
        meetings["failed"] = await meeting("failed", member)
        await uow.meetings.start_processing(meetings["failed"].id)
        await uow.meetings.fail_processing(meetings["failed"].id, error="LLM timeout")
        meetings["synced"] = await meeting("synced", member)
        await uow.meetings.start_processing(meetings["synced"].id)
        await uow.meetings.complete_processing(meetings["synced"].id, summary="Synced call")
        await uow.meetings.record_crm_sync(
            meetings["synced"].id, status="synced", crm_record_id="hs-note-1"
        )
        meetings["deleted"] = await meeting("deleted")
        await uow.meetings.soft_delete(meetings["deleted"].id)
        for state, stale in list(meetings.items()):
            fresh = await uow.meetings.get_by_fathom_id(stale.fathom_recording_id)
            if fresh is not None:
                meetings[state] = fresh

        await uow.audit.log_event(
            event_type="meeting.created",
            event_category="data",
            action_description="Meeting received from Fathom",
            user_id=owner.id,
            resource_type="meeting_session",
            resource_id=meetings["pending"].id,
            ip_address="10.0.0.1",
            metadata={"source": "webhook"},
        )
        await uow.audit.log_event(
            event_type="crm.sync",
            event_category="integration",
            action_description="CRM sync failed",
            status="failure",
            user_id=member.id,
        )
        await uow.audit.log_event(
            event_type="auth.denied",
            event_category="security",
            action_description="Denied",
            status="denied",
        )
        assert (await uow.rate_limits.consume(A_HOURLY, limit=100, period="hourly")).allowed
        assert (
            await uow.rate_limits.take(a_bucket, capacity=5, refill_per_second=0.001, tokens=5)
        ).allowed
        await uow.commit()
    for _ in range(A_DAILY_LIMIT):
        assert (await db.rate_limit(a, A_DAILY, limit=A_DAILY_LIMIT)).allowed
    assert not (await db.rate_limit(a, A_DAILY, limit=A_DAILY_LIMIT)).allowed

    async with db.unit_of_work(b) as uow:
        b_user = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Bea B")
        b_conn = await uow.tenants.connect_crm(
            provider_type="hubspot", credentials_secret_id="vault:crm/hubspot/b", is_default=True
        )
        b_meeting = await uow.meetings.create(
            user_id=b_user.id, fathom_recording_id=f"rec-b-{suffix}", title="B call"
        )
        ok = await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="B meeting"
        )
        bad = await uow.audit.log_event(
            event_type="crm.sync",
            event_category="integration",
            action_description="B failure",
            status="failure",
        )
        await uow.commit()

    return World(
        a=a,
        b=b,
        a_team=a_team,
        b_team=b_team,
        a_domain=a_domain,
        a_users={"owner": owner, "member": member, "removed": removed},
        a_conns={"default": hubspot, "other": salesforce, "disconnected": old},
        a_meetings=meetings,
        a_bucket=a_bucket,
        b_user=b_user,
        b_conn=b_conn,
        b_meeting=b_meeting,
        b_events={"success": ok.id, "failure": bad.id},
    )


@pytest_asyncio.fixture
async def world(db: Database, admin: asyncpg.Connection) -> World:
    built = await build_world(db)
    rows = await snapshot(admin, built.a)
    # The matrix is only meaningful if A has rows everywhere.
    assert {table: len(found) for table, found in rows.items()} == {
        "tenants": 1,
        "users": 3,
        "crm_connections": 3,
        "meeting_sessions": 6,
        "account_mappings": 3,
        "audit_logs": 3,
        "api_rate_limits": 3,
    }
    return built


# -- the matrix --------------------------------------------------------------------------

Call = Callable[[UnitOfWork, World], Awaitable[Any]]
KeyedCall = Callable[[UnitOfWork, World, str], Awaitable[Any]]


def keyed(call: KeyedCall, key: str) -> Call:
    """``call`` for one key of A's rows (a lambda made in a loop would see the loop's last key)."""
    return lambda u, w: call(u, w, key)


@dataclass(frozen=True)
class Case:
    method: str
    variant: str
    call: Call
    # The refusal comes from a composite foreign key, so PostgreSQL aborted the transaction.
    aborts: bool = False

    @property
    def id(self) -> str:
        return f"{self.method}[{self.variant}]"


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


USER_KEYS = ("owner", "member", "removed")
CONN_KEYS = ("default", "other", "disconnected")
MEETING_KEYS = ("pending", "processing", "completed", "failed", "synced", "deleted")


# Reads naming A's rows: the answer is None (or an empty list), as for a missing row.
READ_CASES: list[Case] = [
    *(
        Case("tenants.get_user", k, keyed(lambda u, w, k: u.tenants.get_user(w.a_users[k].id), k))
        for k in USER_KEYS
    ),
    *(
        Case(
            "tenants.get_user_by_slack_id",
            k,
            keyed(lambda u, w, k: u.tenants.get_user_by_slack_id(w.a_users[k].slack_user_id), k),
        )
        for k in USER_KEYS
    ),
    *(
        Case(
            "tenants.get_crm_connection",
            k,
            keyed(lambda u, w, k: u.tenants.get_crm_connection(w.a_conns[k].id), k),
        )
        for k in CONN_KEYS
    ),
    *(
        Case("meetings.get", k, keyed(lambda u, w, k: u.meetings.get(w.a_meetings[k].id), k))
        for k in MEETING_KEYS
    ),
    *(
        Case(
            "meetings.get_by_fathom_id",
            k,
            keyed(
                lambda u, w, k: u.meetings.get_by_fathom_id(w.a_meetings[k].fathom_recording_id), k
            ),
        )
        for k in MEETING_KEYS
    ),
    *(
        Case(
            "meetings.for_user",
            k,
            keyed(lambda u, w, k: u.meetings.for_user(w.a_users[k].id, days=3650, limit=1000), k),
        )
        for k in ("owner", "member")
    ),
    # find_account touches last_used_at of what it finds, so its cases commit (see OWN_CASES).
]

# Writes naming A's rows (or referencing them by a composite foreign key): NotFound.
NOT_FOUND_CASES: list[Case] = [
    *(
        Case(
            "tenants.remove_user",
            k,
            keyed(lambda u, w, k: u.tenants.remove_user(w.a_users[k].id), k),
        )
        for k in USER_KEYS
    ),
    Case(
        "tenants.connect_crm",
        "connected_by_a_user",
        lambda u, w: u.tenants.connect_crm(
            provider_type="hubspot",
            credentials_secret_id="vault:crm/hubspot/b2",
            connected_by_user_id=w.a_users["owner"].id,
        ),
        aborts=True,
    ),
    Case(
        "tenants.connect_crm",
        "connected_by_a_user_as_default",
        lambda u, w: u.tenants.connect_crm(
            provider_type="salesforce",
            credentials_secret_id="vault:crm/salesforce/a",
            connected_by_user_id=w.a_users["member"].id,
            is_default=True,
        ),
        aborts=True,
    ),
    *(
        Case(
            "tenants.set_default_crm_connection",
            k,
            keyed(lambda u, w, k: u.tenants.set_default_crm_connection(w.a_conns[k].id), k),
        )
        for k in CONN_KEYS
    ),
    *(
        Case(
            "tenants.disconnect_crm",
            k,
            keyed(lambda u, w, k: u.tenants.disconnect_crm(w.a_conns[k].id), k),
        )
        for k in CONN_KEYS
    ),
    *(
        Case(
            "tenants.map_account",
            f"a_{k}_connection",
            keyed(
                lambda u, w, k: u.tenants.map_account(
                    crm_connection_id=w.a_conns[k].id,
                    email_domain=w.a_domain,
                    crm_account_id="evil-1",
                ),
                k,
            ),
        )
        for k in ("default", "other")
    ),
    Case(
        "meetings.create",
        "a_user",
        lambda u, w: u.meetings.create(
            user_id=w.a_users["owner"].id, fathom_recording_id="rec-b-new", title="B call"
        ),
        aborts=True,
    ),
    Case(
        "meetings.create",
        "a_crm_connection",
        lambda u, w: u.meetings.create(
            user_id=w.b_user.id,
            fathom_recording_id="rec-b-new",
            title="B call",
            crm_connection_id=w.a_conns["default"].id,
        ),
        aborts=True,
    ),
    *(
        Case(
            "meetings.start_processing",
            k,
            keyed(lambda u, w, k: u.meetings.start_processing(w.a_meetings[k].id), k),
        )
        for k in ("pending", "failed", "completed")
    ),
    *(
        Case(
            "meetings.complete_processing",
            k,
            keyed(
                lambda u, w, k: u.meetings.complete_processing(w.a_meetings[k].id, summary="pwned"),
                k,
            ),
        )
        for k in ("processing", "pending")
    ),
    *(
        Case(
            "meetings.fail_processing",
            k,
            keyed(lambda u, w, k: u.meetings.fail_processing(w.a_meetings[k].id, error="pwned"), k),
        )
        for k in ("processing", "pending")
    ),
    Case(
        "meetings.record_crm_sync",
        "completed_synced",
        lambda u, w: u.meetings.record_crm_sync(
            w.a_meetings["completed"].id, status="synced", crm_record_id="evil"
        ),
    ),
    Case(
        "meetings.record_crm_sync",
        "completed_failed",
        lambda u, w: u.meetings.record_crm_sync(
            w.a_meetings["completed"].id, status="failed", error="pwned"
        ),
    ),
    Case(
        "meetings.record_crm_sync",
        "synced_pending",
        lambda u, w: u.meetings.record_crm_sync(w.a_meetings["synced"].id, status="pending"),
    ),
    *(
        Case(
            "meetings.soft_delete",
            k,
            keyed(lambda u, w, k: u.meetings.soft_delete(w.a_meetings[k].id), k),
        )
        for k in ("pending", "completed", "deleted")
    ),
    Case(
        "audit.log_event",
        "a_user",
        lambda u, w: u.audit.log_event(
            event_type="auth.login",
            event_category="auth",
            action_description="B names A's user",
            user_id=w.a_users["owner"].id,
        ),
        aborts=True,
    ),
]


# Calls that answer with B's own rows, or create B's own rows from A's natural keys.
# Each returns a check to run once the unit of work has committed (or None).
Post = Callable[[asyncpg.Connection], Awaitable[None]] | None


async def _own_tenant(u: UnitOfWork, w: World, db: Database) -> Post:
    tenant = await u.tenants.get()
    assert tenant is not None
    assert (tenant.id, tenant.slack_team_id, tenant.slack_team_name) == (w.b, w.b_team, "Tenant B")
    return None


async def _update_own(u: UnitOfWork, w: World, db: Database) -> Post:
    tenant = await u.tenants.update(
        slack_team_name="Tenant A",
        plan_tier="enterprise",
        subscription_status="past_due",
        settings={"timezone": "UTC"},
    )
    assert tenant.id == w.b

    async def post(admin: asyncpg.Connection) -> None:
        row = await fetch_row(
            admin, "SELECT slack_team_name, plan_tier FROM tenants WHERE id = $1", w.b
        )
        assert tuple(row) == ("Tenant A", "enterprise")

    return post


async def _soft_delete_own(u: UnitOfWork, w: World, db: Database) -> Post:
    await u.tenants.soft_delete()

    async def post(admin: asyncpg.Connection) -> None:
        deleted = await admin.fetchval(
            "SELECT deleted_at IS NOT NULL FROM tenants WHERE id = $1", w.b
        )
        assert deleted is True

    return post


async def _add_user_with_a_slack_id(u: UnitOfWork, w: World, db: Database) -> Post:
    a_owner = w.a_users["owner"]
    user = await u.tenants.add_user(
        slack_user_id=a_owner.slack_user_id,
        slack_email="mallory@evil.example",
        display_name="Mallory",
        role="owner",
    )
    assert user.id != a_owner.id
    assert (user.tenant_id, user.display_name) == (w.b, "Mallory")

    async def post(admin: asyncpg.Connection) -> None:
        count = await admin.fetchval(
            "SELECT count(*) FROM users WHERE slack_user_id = $1", a_owner.slack_user_id
        )
        assert count == 2  # A's and B's own

    return post


async def _add_user_with_a_email(u: UnitOfWork, w: World, db: Database) -> Post:
    a_member = w.a_users["member"]
    user = await u.tenants.add_user(
        slack_user_id=unique_user_id(), slack_email=a_member.slack_email
    )
    assert user.id != a_member.id
    assert user.tenant_id == w.b
    return None


async def _list_users(u: UnitOfWork, w: World, db: Database) -> Post:
    assert [x.id for x in await u.tenants.list_users()] == [w.b_user.id]
    return None


async def _connect_crm_with_a_secret(u: UnitOfWork, w: World, db: Database) -> Post:
    conn = await u.tenants.connect_crm(
        provider_type="hubspot", credentials_secret_id="vault:crm/hubspot/a", is_default=True
    )
    assert conn.tenant_id == w.b
    assert conn.id not in {c.id for c in w.a_conns.values()}
    default = await u.tenants.default_crm_connection()
    assert default is not None
    assert default.id == conn.id
    return None


async def _default_crm_connection(u: UnitOfWork, w: World, db: Database) -> Post:
    default = await u.tenants.default_crm_connection()
    assert default is not None
    assert default.id == w.b_conn.id
    return None


async def _list_crm_connections(u: UnitOfWork, w: World, db: Database) -> Post:
    assert [c.id for c in await u.tenants.list_crm_connections()] == [w.b_conn.id]
    return None


async def _map_account_a_domain(u: UnitOfWork, w: World, db: Database) -> Post:
    mapping = await u.tenants.map_account(
        crm_connection_id=w.b_conn.id,
        email_domain=w.a_domain,
        crm_account_id="acct-b-1",
        verified=True,
    )
    assert (mapping.tenant_id, mapping.crm_connection_id) == (w.b, w.b_conn.id)
    found = await u.tenants.find_account(f"alice@{w.a_domain}")
    assert found is not None
    assert found.id == mapping.id
    return None


def _find_none(**kwargs: Any) -> OwnRun:
    async def run(u: UnitOfWork, w: World, db: Database) -> Post:
        email = kwargs.get("email", "alice@{d}").format(d=w.a_domain)
        conn_key = kwargs.get("conn")
        conn_id = None if conn_key is None else w.a_conns[conn_key].id
        found = await u.tenants.find_account(
            email, crm_connection_id=conn_id, verified_only=kwargs.get("verified_only", False)
        )
        assert found is None
        return None

    return run


async def _stats(u: UnitOfWork, w: World, db: Database) -> Post:
    assert await u.tenants.stats() == TenantStats(
        users=1, crm_connections=1, meetings_total=1, meetings_last_30_days=1, account_mappings=0
    )
    return None


async def _create_with_a_fathom_id(u: UnitOfWork, w: World, db: Database) -> Post:
    theirs = w.a_meetings["pending"]
    mine = await u.meetings.create(
        user_id=w.b_user.id, fathom_recording_id=theirs.fathom_recording_id, title="B copy"
    )
    assert mine.id != theirs.id
    assert (mine.tenant_id, mine.user_id, mine.status, mine.title) == (
        w.b,
        w.b_user.id,
        "pending",
        "B copy",
    )

    async def post(admin: asyncpg.Connection) -> None:
        tenants = await admin.fetch(
            "SELECT tenant_id FROM meeting_sessions WHERE fathom_recording_id = $1",
            theirs.fathom_recording_id,
        )
        assert sorted(str(r["tenant_id"]) for r in tenants) == sorted([str(w.a), str(w.b)])

    return post


async def _create_with_a_deleted_fathom_id(u: UnitOfWork, w: World, db: Database) -> Post:
    theirs = w.a_meetings["deleted"]
    mine = await u.meetings.create(
        user_id=w.b_user.id, fathom_recording_id=theirs.fathom_recording_id, title="B copy"
    )
    assert mine.id != theirs.id
    assert mine.tenant_id == w.b
    return None


async def _claim_pending(u: UnitOfWork, w: World, db: Database) -> Post:
    claimed = await u.meetings.claim_pending(limit=1000)
    assert [m.id for m in claimed] == [w.b_meeting.id]
    return None


async def _recent_meetings(u: UnitOfWork, w: World, db: Database) -> Post:
    assert [m.id for m in await u.meetings.recent(days=3650, limit=1000)] == [w.b_meeting.id]
    return None


async def _log_event_about_a(u: UnitOfWork, w: World, db: Database) -> Post:
    event = await u.audit.log_event(
        event_type="meeting.viewed",
        event_category="data",
        action_description="B mentions A's meeting id",
        resource_type="meeting_session",
        resource_id=w.a_meetings["pending"].id,
        user_id=w.b_user.id,
    )
    assert event.tenant_id == w.b

    async def post(admin: asyncpg.Connection) -> None:
        tenant = await admin.fetchval("SELECT tenant_id FROM audit_logs WHERE id = $1", event.id)
        assert tenant == w.b

    return post


async def _audit_recent(u: UnitOfWork, w: World, db: Database) -> Post:
    events = await u.audit.recent(days=3650, limit=1000)
    assert {e.id for e in events} == set(w.b_events.values())
    return None


async def _audit_recent_failures(u: UnitOfWork, w: World, db: Database) -> Post:
    events = await u.audit.recent_failures(hours=24 * 3650, limit=1000)
    assert [e.id for e in events] == [w.b_events["failure"]]
    return None


async def _consume_a_daily(u: UnitOfWork, w: World, db: Database) -> Post:
    decision = await u.rate_limits.consume(A_DAILY, limit=A_DAILY_LIMIT)
    assert (decision.allowed, decision.current, decision.remaining) == (True, 1, A_DAILY_LIMIT - 1)

    async def post(admin: asyncpg.Connection) -> None:
        counts = await admin.fetch(
            "SELECT tenant_id, request_count FROM api_rate_limits WHERE resource_type = $1 "
            "AND period = 'daily' AND tenant_id = ANY($2::uuid[])",
            A_DAILY,
            [w.a, w.b],
        )
        assert {r["tenant_id"]: r["request_count"] for r in counts} == {
            w.a: A_DAILY_LIMIT,
            w.b: 1,
        }

    return post


async def _consume_a_hourly(u: UnitOfWork, w: World, db: Database) -> Post:
    decision = await u.rate_limits.consume(A_HOURLY, limit=1, period="hourly")
    assert (decision.allowed, decision.current) == (True, 1)
    return None


async def _peek_a_daily(u: UnitOfWork, w: World, db: Database) -> Post:
    decision = await u.rate_limits.peek(A_DAILY, limit=A_DAILY_LIMIT)
    assert (decision.allowed, decision.current, decision.remaining) == (True, 0, A_DAILY_LIMIT)
    return None


async def _take_a_bucket(u: UnitOfWork, w: World, db: Database) -> Post:
    decision = await u.rate_limits.take(w.a_bucket, capacity=5, refill_per_second=0.001, tokens=5)
    assert (decision.allowed, decision.remaining) == (True, 0)

    async def post(admin: asyncpg.Connection) -> None:
        tenants = await admin.fetch(
            "SELECT tenant_id FROM api_rate_limits WHERE resource_type = $1", w.a_bucket
        )
        assert sorted(str(r["tenant_id"]) for r in tenants) == sorted([str(w.a), str(w.b)])

    return post


async def _db_rate_limit_a_daily(u: UnitOfWork, w: World, db: Database) -> Post:
    # A separate Database call, in its own transaction, beside B's open unit of work.
    decision = await db.rate_limit(w.b, A_DAILY, limit=A_DAILY_LIMIT)
    assert (decision.allowed, decision.current) == (True, 1)
    return None


OwnRun = Callable[[UnitOfWork, World, Database], Awaitable[Post]]


@dataclass(frozen=True)
class OwnCase:
    method: str
    variant: str
    run: OwnRun
    writes: bool

    @property
    def id(self) -> str:
        return f"{self.method}[{self.variant}]"


OWN_CASES: list[OwnCase] = [
    OwnCase("tenants.get", "own_row_only", _own_tenant, writes=False),
    OwnCase("tenants.update", "own_row_with_a_name", _update_own, writes=True),
    OwnCase("tenants.soft_delete", "own_row_only", _soft_delete_own, writes=True),
    OwnCase("tenants.add_user", "a_slack_user_id", _add_user_with_a_slack_id, writes=True),
    OwnCase("tenants.add_user", "a_email", _add_user_with_a_email, writes=True),
    OwnCase("tenants.list_users", "own_only", _list_users, writes=False),
    OwnCase("tenants.connect_crm", "a_secret_as_default", _connect_crm_with_a_secret, writes=True),
    OwnCase("tenants.default_crm_connection", "own_only", _default_crm_connection, writes=False),
    OwnCase("tenants.list_crm_connections", "own_only", _list_crm_connections, writes=False),
    OwnCase("tenants.map_account", "own_connection_a_domain", _map_account_a_domain, writes=True),
    OwnCase("tenants.find_account", "a_email_default_connection", _find_none(), writes=True),
    OwnCase("tenants.find_account", "a_subdomain", _find_none(email="dave@eu.{d}"), writes=True),
    OwnCase("tenants.find_account", "a_domain_bare", _find_none(email="{d}"), writes=True),
    OwnCase(
        "tenants.find_account", "a_default_connection", _find_none(conn="default"), writes=True
    ),
    OwnCase(
        "tenants.find_account",
        "a_other_connection_verified_only",
        _find_none(conn="other", verified_only=True),
        writes=True,
    ),
    OwnCase("tenants.stats", "own_counts", _stats, writes=False),
    OwnCase("meetings.create", "a_fathom_id", _create_with_a_fathom_id, writes=True),
    OwnCase(
        "meetings.create", "a_deleted_fathom_id", _create_with_a_deleted_fathom_id, writes=True
    ),
    OwnCase("meetings.claim_pending", "own_only", _claim_pending, writes=True),
    OwnCase("meetings.recent", "own_only", _recent_meetings, writes=False),
    OwnCase("audit.log_event", "a_meeting_as_resource", _log_event_about_a, writes=True),
    OwnCase("audit.recent", "own_only", _audit_recent, writes=False),
    OwnCase("audit.recent_failures", "own_only", _audit_recent_failures, writes=False),
    OwnCase("rate_limits.consume", "a_resource_at_limit", _consume_a_daily, writes=True),
    OwnCase("rate_limits.consume", "a_hourly_resource", _consume_a_hourly, writes=True),
    OwnCase("rate_limits.peek", "a_resource_at_limit", _peek_a_daily, writes=False),
    OwnCase("rate_limits.take", "a_empty_bucket", _take_a_bucket, writes=True),
    OwnCase("db.rate_limit", "a_resource_at_limit", _db_rate_limit_a_daily, writes=True),
]


@pytest.mark.parametrize("case", _params(READ_CASES))
async def test_read_of_a_row_finds_nothing(
    case: Case, db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin, world.a)
    async with db.unit_of_work(world.b) as uow:
        result = await case.call(uow, world)
        assert result in (None, [])
    assert await snapshot(admin, world.a) == before


@pytest.mark.parametrize("case", _params(NOT_FOUND_CASES))
async def test_write_naming_a_row_raises_not_found(
    case: Case, db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before_a = await snapshot(admin, world.a)
    before_b = await snapshot(admin, world.b)
    async with db.unit_of_work(world.b) as uow:
        with pytest.raises(NotFound):
            await case.call(uow, world)
        # A caller that catches the error and carries on commits what is left, if anything:
        # after a foreign-key violation PostgreSQL keeps nothing, and commit says so.
        if case.aborts:
            with pytest.raises(TransactionAborted):
                await uow.commit()
        else:
            await uow.commit()
    assert await snapshot(admin, world.a) == before_a, "tenant A's rows changed"
    # A refused write changes nothing in the caller's own tenant either.
    assert await snapshot(admin, world.b) == before_b, "tenant B's rows changed"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in OWN_CASES])
async def test_own_answers_and_creations_never_touch_a(
    case: OwnCase, db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin, world.a)
    async with db.unit_of_work(world.b) as uow:
        post = await case.run(uow, world, db)
        if case.writes:
            await uow.commit()
    assert await snapshot(admin, world.a) == before
    if post is not None:
        await post(admin)
    # A still works as before: its workspace resolves and its unit of work opens.
    assert await db.directory.resolve(world.a_team) == world.a
    async with db.unit_of_work(world.a) as uow:
        assert (await uow.tenants.stats()).meetings_total == 5


ALL_CASE_IDS = [c.id for c in READ_CASES + NOT_FOUND_CASES] + [c.id for c in OWN_CASES]

# Public methods that are plumbing between the unit of work and the rate-limit repository,
# not part of the repository contract (DESIGN.md "Public API").
NOT_IN_CONTRACT = {
    "rate_limits.apply_deferred_charges",
    "rate_limits.discard_deferred_charges",
    "rate_limits.charge_now",
}


def test_matrix_covers_every_public_method() -> None:
    public: set[str] = {"db.rate_limit"}
    for prefix, repo in (
        ("tenants", TenantRepo),
        ("meetings", MeetingRepo),
        ("audit", AuditRepo),
        ("rate_limits", RateLimitRepo),
    ):
        for name, _member in inspect.getmembers(repo, inspect.iscoroutinefunction):
            if not name.startswith("_"):
                public.add(f"{prefix}.{name}")
    covered = {case_id.split("[")[0] for case_id in ALL_CASE_IDS}
    assert covered == public - NOT_IN_CONTRACT
    assert len(ALL_CASE_IDS) == len(set(ALL_CASE_IDS))
    assert len(covered) == 35
    assert len(ALL_CASE_IDS) >= 2 * len(covered)


# -- raw SQL inside a unit of work: RLS alone ------------------------------------------------


async def test_raw_selects_see_only_own_rows_without_a_where(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    own = {
        table: await admin.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", world.b)
        for table in TENANT_OWNED
    }
    theirs = {
        table: await admin.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", world.a)
        for table in TENANT_OWNED
    }
    assert all(theirs.values()), theirs
    async with db.unit_of_work(world.b) as uow:
        for table in TENANT_OWNED:
            seen = (await execute_in(uow, f"SELECT count(*) FROM {table}")).scalar_one()
            assert seen == own[table], table
            named = (
                await execute_in(
                    uow,
                    bound(f"SELECT count(*) FROM {table} WHERE tenant_id = :a", a=world.a),
                )
            ).scalar_one()
            assert named == 0, table
        tenant_ids = (await execute_in(uow, "SELECT id FROM tenants")).scalars()
        assert tenant_ids == [world.b]
        fathom_ids = (
            await execute_in(uow, "SELECT fathom_recording_id FROM meeting_sessions")
        ).scalars()
        assert fathom_ids == [world.b_meeting.fathom_recording_id]


RAW_INSERTS = {
    "tenants": "INSERT INTO tenants (id, slack_team_id, slack_team_name) "
    "VALUES (:a, 'TEVIL0001', 'Evil')",
    "users": "INSERT INTO users (tenant_id, slack_user_id) VALUES (:a, 'UEVIL0001')",
    "crm_connections": "INSERT INTO crm_connections (tenant_id, provider_type, "
    "credentials_secret_id) VALUES (:a, 'hubspot', 'vault:crm/hubspot/evil')",
    "meeting_sessions": "INSERT INTO meeting_sessions (tenant_id, user_id, "
    "fathom_recording_id, title) VALUES (:a, :a_user, 'rec-evil', 'Evil')",
    "account_mappings": "INSERT INTO account_mappings (tenant_id, crm_connection_id, "
    "email_domain, crm_account_id) VALUES (:a, :a_conn, 'evil.example', 'evil')",
    "audit_logs": "INSERT INTO audit_logs (tenant_id, event_type, event_category, "
    "action_description) VALUES (:a, 'evil', 'security', 'Evil')",
    "api_rate_limits": "INSERT INTO api_rate_limits (tenant_id, resource_type, period, "
    "window_start, request_count) VALUES (:a, 'evil', 'daily', now(), 1)",
}


@pytest.mark.parametrize("table", list(RAW_INSERTS))
async def test_raw_insert_stamped_with_a_is_refused(
    table: str, db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin, world.a)
    params = {
        "a": world.a,
        "a_user": world.a_users["owner"].id,
        "a_conn": world.a_conns["default"].id,
    }
    with pytest.raises((TenantIsolationError, asyncpg.PostgresError)) as raised:  # noqa: PT012
        async with db.unit_of_work(world.b) as uow:
            await execute_in(uow, bound(RAW_INSERTS[table], **params))
            await uow.commit()
    assert_refused_by_database(raised.value)
    assert await snapshot(admin, world.a) == before


@pytest.mark.parametrize("table", TENANT_OWNED)
async def test_raw_update_of_a_rows_changes_nothing(
    table: str, db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin, world.a)
    own = await admin.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", world.b)
    async with db.unit_of_work(world.b) as uow:
        # Nobody at runtime may write tenant_id: the column grant refuses it before
        # row-level security sees a row, with or without a WHERE.
        for moving in (
            f"UPDATE {table} SET tenant_id = tenant_id WHERE tenant_id = :a",
            f"UPDATE {table} SET tenant_id = tenant_id",
        ):
            with pytest.raises(asyncpg.PostgresError) as raised:
                await execute_in(uow, bound(moving, a=world.a))
            assert_refused_by_database(raised.value)
            assert f"permission denied for table {table}" in str(raised.value)
            await uow.rollback()
        if table == "audit_logs":  # the app role may not UPDATE audit rows at all
            with pytest.raises(asyncpg.PostgresError) as raised:
                await execute_in(
                    uow,
                    bound("UPDATE audit_logs SET status = status WHERE tenant_id = :a", a=world.a),
                )
            assert_refused_by_database(raised.value)
        else:
            # A column the app role may write: RLS alone keeps A's rows out of reach.
            named = f"UPDATE {table} SET updated_at = updated_at WHERE tenant_id = :a"
            result: Any = await execute_in(uow, bound(named, a=world.a))
            assert result.rowcount == 0
            result = await execute_in(uow, f"UPDATE {table} SET updated_at = updated_at")
            assert result.rowcount == own  # RLS alone narrows an UPDATE without a WHERE
            await uow.commit()
    assert await snapshot(admin, world.a) == before


async def test_raw_move_of_own_row_into_a_is_refused(
    db: Database, world: World, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin, world.a)
    with pytest.raises((TenantIsolationError, asyncpg.PostgresError)) as raised:  # noqa: PT012
        async with db.unit_of_work(world.b) as uow:
            await execute_in(
                uow,
                bound(
                    "UPDATE users SET tenant_id = :a WHERE id = :b_user",
                    a=world.a,
                    b_user=world.b_user.id,
                ),
            )
            await uow.commit()
    if await on_citus(admin):
        # The distribution column never changes on Citus: refused before any policy runs.
        assert sqlstate_of(raised.value) == "0A000", repr(raised.value)
    else:
        # The column grant refuses it before row-level security sees the row.
        assert_refused_by_database(raised.value)
        assert "permission denied for table users" in str(raised.value)
    assert await snapshot(admin, world.a) == before


# -- the role and tenant of every transaction, and their reset ---------------------------------

_SESSION = (
    "SELECT current_user AS role, session_user AS login, "
    "current_setting('app.tenant_claim', true) AS claim, "
    "current_setting('app.tenant_id', true) AS plain, "
    "pg_backend_pid() AS pid, txid_current() AS txid"
)
PROBE = text(_SESSION)
"""The role, the tenant claim, the plain tenant setting, the backend and the transaction."""
PROBE_INSIDE = text(f"{_SESSION}, sfdb_claimed_tenant()::text AS tenant")
"""The same, in a unit of work: with the tenant the database verifies from the claim, the
one row-level security admits (the app role alone may ask)."""


def claim_fields(claim: str | None) -> list[str]:
    """A claim's fields: version, key id, tenant, issued (ms), backend (0: any), mac."""
    assert claim is not None
    assert CLAIM_PATTERN.fullmatch(claim), claim
    return claim.split(".")


async def test_every_transaction_is_scoped_and_the_connection_is_reset_after(
    settings: DatabaseSettings, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    """Every transaction of a unit of work runs as the app role under a claim of its tenant
    that the database verifies (on a direct connection to a single server, a claim
    for that server process alone), never with the plain ``app.tenant_id``; outside a
    unit of work, and on the pooled connection after one, there is neither."""
    login = settings.sqlalchemy_url().username
    roles = settings.roles
    assert login not in (roles.app, roles.directory, roles.owner)
    direct = not settings.pgbouncer  # behind PgBouncer a backend is not a client's own
    # Only there does a claim name its server process; behind PgBouncer or on Citus, 0.
    bound_to_backend = direct and not await on_citus(admin)
    single = Database(settings.model_copy(update={"pool_size": 1, "max_overflow": 0}))
    try:

        async def outside() -> tuple[Any, asyncpg.Connection]:
            # The pool's one connection, as the layer runs a statement outside any tenant
            # (behind PgBouncer, in a transaction its opener starts).
            return await probe_outside(single, PROBE)

        def assert_outside(row: Any) -> None:
            assert (row.role, row.login) == (roles.directory, login)
            assert row.claim in (None, "")
            assert row.plain in (None, "")

        def assert_inside(row: Any, tenant: TenantId, pid: int) -> None:
            assert (row.role, row.login, row.tenant) == (roles.app, login, str(tenant))
            fields = claim_fields(row.claim)
            assert fields[2] == str(tenant)
            assert fields[4] == (str(row.pid) if bound_to_backend else "0")
            assert row.plain in (None, "")
            if direct:
                assert row.pid == pid  # the pooled connection serves the unit of work

        first, pooled = await outside()
        assert_outside(first)
        pid = first.pid

        for tenant in (tenant_a, tenant_b):
            # Probed in every transaction. The probe is SQL the layer did not write: the
            # unit of work drops its connection when it ends, and the pool opens another.
            txids = []
            async with single.unit_of_work(tenant) as uow:
                # First transaction, before and after a repository call.
                row = (await execute_in(uow, PROBE_INSIDE)).one()
                assert_inside(row, tenant, pid)
                txids.append(row.txid)
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                await uow.commit()
                # Second transaction: opened by a repository call after the commit.
                assert (await uow.tenants.get()) is not None
                row = (await execute_in(uow, PROBE_INSIDE)).one()
                assert_inside(row, tenant, pid)
                txids.append(row.txid)
                await uow.rollback()
                # Third transaction: opened by a raw statement after a rollback.
                row = (await execute_in(uow, PROBE_INSIDE)).one()
                assert_inside(row, tenant, pid)
                txids.append(row.txid)
                await uow.commit()
            assert len(set(txids)) == 3  # three distinct transactions, each scoped
            after, driver = await outside()
            assert_outside(after)
            assert driver is not pooled
            assert pooled.is_closed()
            pooled, pid = driver, after.pid

            # The same work, not probed: the connection goes back to the pool, reset.
            async with single.unit_of_work(tenant) as uow:
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                await uow.commit()
                assert (await uow.tenants.get()) is not None
                await uow.rollback()
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                # leaves with a transaction open: rolled back on the way out
            after, driver = await outside()
            assert_outside(after)
            assert driver is pooled
            if direct:
                assert after.pid == pid

        # Leaving on an exception (inside an open transaction) resets the connection too.
        with pytest.raises(RuntimeError, match="boom"):  # noqa: PT012
            async with single.unit_of_work(tenant_a) as uow:
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                raise RuntimeError("boom")
        after, driver = await outside()
        assert_outside(after)
        assert driver is pooled
        # ... and, probed, it is dropped.
        with pytest.raises(RuntimeError, match="boom"):  # noqa: PT012
            async with single.unit_of_work(tenant_a) as uow:
                row = (await execute_in(uow, PROBE_INSIDE)).one()
                assert_inside(row, tenant_a, pid)
                raise RuntimeError("boom")
        after, driver = await outside()
        assert_outside(after)
        assert driver is not pooled
    finally:
        await single.dispose()


# -- many tenants interleaved on a small pool ---------------------------------------------------


@dataclass
class Seen:
    tenant: TenantId
    slack_user_id: str
    users_before_commit: set[str]
    users_after_commit: set[str]
    raw_users: set[str]
    raw_recordings: set[str]
    raw_tenants: set[uuid.UUID]
    role: str
    claimed: str
    """The tenant the transaction's claim names."""
    verified: str | None
    """The tenant the database verified from it."""
    plain: str | None


@dataclass(frozen=True)
class Checkout:
    """A connection the pool handed out, to which task, and whether that task probes with it."""

    driver: asyncpg.Connection
    task: asyncio.Task[Any] | None
    probed: bool


def record_checkouts(db: Database, probing: set[asyncio.Task[Any]]) -> list[Checkout]:
    """Every checkout from ``db``'s pool from now on, in order (the listener runs in the task
    that takes the connection)."""
    checkouts: list[Checkout] = []

    def on_checkout(dbapi_connection: Any, _record: object, _proxy: object) -> None:
        task = asyncio.current_task()
        checkouts.append(Checkout(dbapi_connection.driver_connection, task, task in probing))

    event.listen(engine_of(db).sync_engine, "checkout", on_checkout)
    return checkouts


async def test_interleaved_units_of_work_of_many_tenants_see_only_their_own(
    settings: DatabaseSettings, db: Database
) -> None:
    tenants_n, per_tenant = 8, 4
    small = Database(settings.model_copy(update={"pool_size": 2, "max_overflow": 0}))
    tenants = [
        await db.directory.install(slack_team_id=unique_team_id(), slack_team_name=f"T{i}")
        for i in range(tenants_n)
    ]
    planned = {t: [unique_user_id() for _ in range(per_tenant)] for t in tenants}
    recordings = {t: {f"rec-{slack}" for slack in planned[t]} for t in tenants}
    # Round robin over the tenants, so consecutive checkouts belong to different tenants.
    jobs = [(t, planned[t][j]) for j in range(per_tenant) for t in tenants]

    tenant_of: dict[asyncio.Task[Any] | None, TenantId] = {}
    probing: set[asyncio.Task[Any]] = set()
    checkouts = record_checkouts(small, probing)
    everyone_worked = asyncio.Barrier(len(jobs))

    async def work(tenant: TenantId, slack_user_id: str) -> Seen:
        task = asyncio.current_task()
        assert task is not None
        tenant_of[task] = tenant
        # Through repositories only: the connection goes back to the pool for the next job.
        async with small.unit_of_work(tenant) as uow:
            user = await uow.tenants.add_user(slack_user_id=slack_user_id)
            await asyncio.sleep(0)
            meeting = await uow.meetings.create(
                user_id=user.id, fathom_recording_id=f"rec-{slack_user_id}", title="Call"
            )
            await uow.audit.log_event(
                event_type="meeting.created",
                event_category="data",
                action_description="marker",
                resource_id=meeting.id,
                user_id=user.id,
            )
            before = {u.slack_user_id for u in await uow.tenants.list_users()}
            await uow.commit()
            await asyncio.sleep(0.001)
            after = {u.slack_user_id for u in await uow.tenants.list_users()}
            await uow.commit()
        # Every job's repository work first, so the two pooled connections pass from
        # tenant to tenant before any of them is probed (and dropped).
        await everyone_worked.wait()
        # Raw SQL on the layer's connection, as the app role under RLS alone (this unit of
        # work drops its connection when it ends: it served SQL the layer did not write).
        probing.add(task)
        async with small.unit_of_work(tenant) as uow:
            raw_users = set((await execute_in(uow, "SELECT slack_user_id FROM users")).scalars())
            raw_recordings = set(
                (
                    await execute_in(uow, "SELECT fathom_recording_id FROM meeting_sessions")
                ).scalars()
            )
            raw_tenants = set((await execute_in(uow, "SELECT id FROM tenants")).scalars())
            probe = (await execute_in(uow, PROBE_INSIDE)).one()
            await uow.commit()
        return Seen(
            tenant,
            slack_user_id,
            before,
            after,
            raw_users,
            raw_recordings,
            raw_tenants,
            probe.role,
            claim_fields(probe.claim)[2],
            probe.tenant,
            probe.plain,
        )

    try:
        results = await asyncio.gather(*(asyncio.create_task(work(t, s)) for t, s in jobs))
        assert len(results) == tenants_n * per_tenant
        for seen in results:
            own = set(planned[seen.tenant])
            assert seen.slack_user_id in seen.users_before_commit
            assert seen.users_before_commit <= own
            assert seen.slack_user_id in seen.users_after_commit
            assert seen.users_after_commit <= own
            assert seen.slack_user_id in seen.raw_users
            assert seen.raw_users <= own
            assert f"rec-{seen.slack_user_id}" in seen.raw_recordings
            assert seen.raw_recordings <= recordings[seen.tenant]
            assert seen.raw_tenants == {seen.tenant}
            assert (seen.role, seen.claimed, seen.verified) == (
                settings.roles.app,
                str(seen.tenant),
                str(seen.tenant),
            )
            assert seen.plain in (None, "")
        # Two pooled connections served the tenants' jobs: the same connection changed
        # tenants, and one that was probed was never handed out again (it was replaced).
        jobs_checkouts = [c for c in checkouts if c.task in tenant_of]
        drivers = {id(c.driver): c.driver for c in jobs_checkouts}
        tenants_per_driver = {
            key: {tenant_of[c.task] for c in jobs_checkouts if id(c.driver) == key}
            for key in drivers
        }
        assert max(len(ts) for ts in tenants_per_driver.values()) > 1
        probed = [n for n, c in enumerate(jobs_checkouts) if c.probed]
        assert len(probed) == len(jobs)
        for n in probed:
            later = jobs_checkouts[n + 1 :]
            assert all(c.driver is not jobs_checkouts[n].driver for c in later)
            assert jobs_checkouts[n].driver.is_closed()
        assert len(drivers) <= 2 + len(probed)
        for tenant in tenants:
            async with small.unit_of_work(tenant) as uow:
                users = {u.slack_user_id for u in await uow.tenants.list_users()}
                assert users == set(planned[tenant])
                meetings = await uow.meetings.recent(limit=1000)
                assert {m.fathom_recording_id for m in meetings} == recordings[tenant]
                assert len(await uow.audit.recent(limit=1000)) == per_tenant
                stats = await uow.tenants.stats()
                assert (stats.users, stats.meetings_total) == (per_tenant, per_tenant)
    finally:
        await small.dispose()
