"""AuditRepo (append-only events) and rate limits (fixed windows and token buckets).

Every test commits for real. Counters are read through the superuser
``admin`` connection, and audit rows from the past are inserted there with an
explicit ``created_at`` (the append-only trigger refuses UPDATE for everybody).
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from slack_fathom_db import Database, TenantId
from slack_fathom_db.errors import (
    Conflict,
    NotFound,
    RateLimitExceeded,
    TransactionAborted,
    ValidationError,
)
from slack_fathom_db.records import AuditLog
from slack_fathom_db.repositories.audit import AuditRepo
from tests.helpers import add_user, unique_user_id


async def _audit_count(admin: asyncpg.Connection, tenant: TenantId) -> int:
    value = await admin.fetchval("SELECT count(*) FROM audit_logs WHERE tenant_id = $1", tenant)
    assert isinstance(value, int)
    return value


async def _insert_old_event(
    admin: asyncpg.Connection,
    tenant: TenantId,
    event_type: str,
    created_at: datetime,
    status: str = "success",
) -> None:
    await admin.execute(
        "INSERT INTO audit_logs "
        "(tenant_id, event_type, event_category, action_description, status, created_at) "
        "VALUES ($1, $2, 'data', 'inserted by the test', $3, $4)",
        tenant,
        event_type,
        status,
        created_at,
    )


# -- audit: log_event -------------------------------------------------------------------


async def test_log_event_round_trips_every_field(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a)
    resource = uuid.uuid4()
    metadata = {
        "provider": "hubspot",
        "attempt": 3,
        "ratio": 0.25,
        "ok": False,
        "nothing": None,
        "nested": {"list": [1, "two", {"three": [3.0, True]}], "empty": {}},
        "unicode": "Zürich — 東京",
    }
    async with db.unit_of_work(tenant_a) as uow:
        logged = await uow.audit.log_event(
            event_type="crm.connected",
            event_category="integration",
            action_description="Connected HubSpot",
            status="failure",
            user_id=user.id,
            resource_type="crm_connection",
            resource_id=resource,
            ip_address="2001:db8::1",
            user_agent="Slackbot 1.0 (+https://api.slack.com/robots)",
            metadata=metadata,
        )
        await uow.commit()
    assert logged.tenant_id == tenant_a
    assert logged.created_at is not None

    async with db.unit_of_work(tenant_a) as uow:
        events = await uow.audit.recent()
    assert [e.id for e in events] == [logged.id]
    event = events[0]
    assert event.event_type == "crm.connected"
    assert event.event_category == "integration"
    assert event.action_description == "Connected HubSpot"
    assert event.status == "failure"
    assert event.user_id == user.id
    assert event.resource_type == "crm_connection"
    assert event.resource_id == str(resource)
    assert ipaddress.ip_address(str(event.ip_address)) == ipaddress.ip_address("2001:db8::1")
    assert event.user_agent == "Slackbot 1.0 (+https://api.slack.com/robots)"
    assert event.event_metadata == metadata
    assert event.created_at.utcoffset() is not None


async def test_log_event_defaults_and_ipv4(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        logged = await uow.audit.log_event(
            event_type="user.login",
            event_category="auth",
            action_description="Signed in",
            resource_id="ext-42",
            ip_address="10.0.0.1",
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        (event,) = await uow.audit.recent()
    assert event.id == logged.id
    assert event.status == "success"
    assert event.user_id is None
    assert event.resource_type is None
    assert event.resource_id == "ext-42"
    assert event.user_agent is None
    assert event.event_metadata == {}
    assert ipaddress.ip_address(str(event.ip_address)) == ipaddress.ip_address("10.0.0.1")
    # stored as inet, not as text
    row = await admin.fetchrow(
        "SELECT pg_typeof(ip_address)::text AS type, family(ip_address) AS family, "
        "host(ip_address) AS host FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        logged.id,
    )
    assert row is not None
    assert row["type"] == "inet"
    assert row["family"] == 4
    assert row["host"] == "10.0.0.1"


async def test_ipv6_is_stored_as_inet(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        logged = await uow.audit.log_event(
            event_type="user.login",
            event_category="auth",
            action_description="Signed in",
            ip_address="2001:DB8:0:0:0:0:0:1",
        )
        await uow.commit()
    row = await admin.fetchrow(
        "SELECT family(ip_address) AS family, host(ip_address) AS host "
        "FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        logged.id,
    )
    assert row is not None
    assert row["family"] == 6
    assert row["host"] == "2001:db8::1"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_category", "gossip"),
        ("event_category", "DATA"),
        ("status", "ok"),
        ("status", "Success"),
        ("ip_address", "999.1.1.1"),
        ("ip_address", "not-an-ip"),
        ("ip_address", "10.0.0.1/33"),
        ("ip_address", ""),
        ("event_type", "Meeting Created"),
        ("event_type", ""),
        ("action_description", ""),
        ("metadata", {"note": "nul \x00 inside"}),
        ("metadata", {"deep": {"er": ["nul\x00"]}}),
        ("metadata", {"bad\x00key": 1}),
        ("metadata", {"nan": float("nan")}),
        ("metadata", ["not", "a", "mapping"]),
    ],
)
async def test_log_event_validation_writes_nothing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, field: str, value: object
) -> None:
    event: dict[str, object] = {
        "event_type": "meeting.created",
        "event_category": "data",
        "action_description": "Meeting received",
        field: value,
    }
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match=field):
            await uow.audit.log_event(**event)  # type: ignore[arg-type]
        await uow.commit()
    assert await _audit_count(admin, tenant_a) == 0


async def test_audit_events_are_kept_only_on_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="x"
        )
    assert await _audit_count(admin, tenant_a) == 0
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="x"
        )
        await uow.rollback()
        await uow.audit.log_event(
            event_type="meeting.kept", event_category="data", action_description="y"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        events = await uow.audit.recent()
    assert [e.event_type for e in events] == ["meeting.kept"]


def test_audit_repo_has_no_update_or_delete() -> None:
    for name in ("update", "delete", "soft_delete", "remove", "update_event", "delete_event"):
        assert not hasattr(AuditRepo, name)
    public = [name for name in dir(AuditRepo) if not name.startswith("_")]
    assert not [
        name
        for name in public
        if name.startswith(("update", "delete", "remove", "soft", "purge", "truncate", "edit"))
    ]


async def test_uow_audit_has_no_update_or_delete(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        for name in ("update", "delete", "soft_delete", "remove"):
            assert not hasattr(uow.audit, name)


# -- audit: recent / recent_failures ----------------------------------------------------


async def test_recent_orders_newest_first_within_the_window(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="e.now", event_category="data", action_description="now"
        )
        await uow.commit()
    await _insert_old_event(admin, tenant_a, "e.3d", now - timedelta(days=3))
    await _insert_old_event(admin, tenant_a, "e.2d", now - timedelta(days=2))
    await _insert_old_event(admin, tenant_a, "e.10d", now - timedelta(days=10))
    await _insert_old_event(admin, tenant_a, "e.40d", now - timedelta(days=40))
    await _insert_old_event(admin, tenant_b, "e.other", now - timedelta(hours=1))

    async with db.unit_of_work(tenant_a) as uow:
        week = await uow.audit.recent()
        month = await uow.audit.recent(days=30)
        quarter = await uow.audit.recent(days=90)
        day = await uow.audit.recent(days=1)
        limited = await uow.audit.recent(days=90, limit=2)

    def types(events: list[AuditLog]) -> list[str]:
        return [e.event_type for e in events]

    assert types(week) == ["e.now", "e.2d", "e.3d"]
    assert types(month) == ["e.now", "e.2d", "e.3d", "e.10d"]
    assert types(quarter) == ["e.now", "e.2d", "e.3d", "e.10d", "e.40d"]
    assert types(day) == ["e.now"]
    assert types(limited) == ["e.now", "e.2d"]
    assert all(e.tenant_id == tenant_a for e in quarter)


async def test_recent_failures_returns_only_non_success(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="ok.now", event_category="auth", action_description="fine"
        )
        await uow.audit.log_event(
            event_type="denied.now",
            event_category="security",
            action_description="cross-tenant attempt",
            status="denied",
        )
        await uow.commit()
    await _insert_old_event(admin, tenant_a, "fail.1h", now - timedelta(hours=1), "failure")
    await _insert_old_event(admin, tenant_a, "ok.2h", now - timedelta(hours=2))
    await _insert_old_event(admin, tenant_a, "denied.3h", now - timedelta(hours=3), "denied")
    await _insert_old_event(admin, tenant_a, "fail.48h", now - timedelta(hours=48), "failure")

    async with db.unit_of_work(tenant_a) as uow:
        day = await uow.audit.recent_failures()
        three_days = await uow.audit.recent_failures(hours=72)
        two_hours = await uow.audit.recent_failures(hours=2)
        limited = await uow.audit.recent_failures(hours=72, limit=1)

    assert [e.event_type for e in day] == ["denied.now", "fail.1h", "denied.3h"]
    assert [e.event_type for e in three_days] == ["denied.now", "fail.1h", "denied.3h", "fail.48h"]
    assert [e.event_type for e in two_hours] == ["denied.now", "fail.1h"]
    assert [e.event_type for e in limited] == ["denied.now"]
    assert all(e.status != "success" for e in three_days)


async def test_recent_arguments_are_validated(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="days"):
            await uow.audit.recent(days=0)
        with pytest.raises(ValidationError, match="limit"):
            await uow.audit.recent(limit=0)
        with pytest.raises(ValidationError, match="hours"):
            await uow.audit.recent_failures(hours=0)


# -- rate limits: fixed windows ---------------------------------------------------------


async def _away_from_window_edge() -> None:
    """Keep the test inside one UTC minute (every window boundary is a minute boundary)."""
    now = datetime.now(UTC)
    if now.second >= 55:
        await asyncio.sleep(60 - now.second - now.microsecond / 1e6 + 0.05)


def _window_end(period: str, now: datetime) -> datetime:
    if period == "minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if period == "hourly":
        return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    if now.month == 12:
        return datetime(now.year + 1, 1, 1, tzinfo=UTC)
    return datetime(now.year, now.month + 1, 1, tzinfo=UTC)


def _window_start(period: str, now: datetime) -> datetime:
    if period == "minute":
        return now.replace(second=0, microsecond=0)
    if period == "hourly":
        return now.replace(minute=0, second=0, microsecond=0)
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


async def _counter(
    admin: asyncpg.Connection, tenant: TenantId, resource: str, period: str = "daily"
) -> int | None:
    value = await admin.fetchval(
        "SELECT sum(request_count) FROM api_rate_limits "
        "WHERE tenant_id = $1 AND resource_type = $2 AND period = $3",
        tenant,
        resource,
        period,
    )
    return None if value is None else int(value)


async def test_rate_limit_counts_current_and_remaining(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    results = [
        await db.rate_limit(tenant_a, "meetings_processed", limit=3, period="daily")
        for _ in range(3)
    ]
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.current for r in results] == [1, 2, 3]
    assert [r.remaining for r in results] == [2, 1, 0]
    assert all(r.limit == 3 for r in results)
    assert all(r.retry_after == 0.0 for r in results)

    denied = await db.rate_limit(tenant_a, "meetings_processed", limit=3, period="daily")
    assert denied.allowed is False
    assert denied.current == 3
    assert denied.remaining == 0
    assert denied.retry_after > 0
    assert denied.resets_at == results[0].resets_at
    assert await _counter(admin, tenant_a, "meetings_processed") == 3


async def test_rate_limit_cost(db: Database, tenant_a: TenantId, admin: asyncpg.Connection) -> None:
    await _away_from_window_edge()
    first = await db.rate_limit(tenant_a, "tokens", limit=10, cost=4)
    assert first.allowed
    assert first.current == 4
    assert first.remaining == 6
    second = await db.rate_limit(tenant_a, "tokens", limit=10, cost=6)
    assert second.allowed
    assert second.current == 10
    assert second.remaining == 0
    third = await db.rate_limit(tenant_a, "tokens", limit=10, cost=1)
    assert not third.allowed
    assert await _counter(admin, tenant_a, "tokens") == 10


async def test_denied_call_spends_nothing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    assert (await db.rate_limit(tenant_a, "exports", limit=5, cost=3)).allowed
    assert await _counter(admin, tenant_a, "exports") == 3
    denied = await db.rate_limit(tenant_a, "exports", limit=5, cost=3)
    assert not denied.allowed
    assert denied.current == 3
    assert denied.remaining == 2
    assert await _counter(admin, tenant_a, "exports") == 3
    # the room left is still there for a request that fits
    fits = await db.rate_limit(tenant_a, "exports", limit=5, cost=2)
    assert fits.allowed
    assert fits.current == 5
    assert await _counter(admin, tenant_a, "exports") == 5


async def test_cost_above_limit_is_denied_without_writing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    denied = await db.rate_limit(tenant_a, "bulk", limit=2, cost=3)
    assert not denied.allowed
    assert denied.remaining <= 2
    assert denied.retry_after > 0
    assert await _counter(admin, tenant_a, "bulk") is None
    rows = await admin.fetchval(
        "SELECT count(*) FROM api_rate_limits WHERE tenant_id = $1", tenant_a
    )
    assert rows == 0


async def test_limit_zero_denies(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    denied = await db.rate_limit(tenant_a, "disabled", limit=0)
    assert not denied.allowed
    assert denied.remaining == 0
    assert denied.limit == 0
    assert await _counter(admin, tenant_a, "disabled") is None
    async with db.unit_of_work(tenant_a) as uow:
        inside = await uow.rate_limits.consume("disabled", limit=0)
        await uow.commit()
    assert not inside.allowed
    assert await _counter(admin, tenant_a, "disabled") is None


@pytest.mark.parametrize("period", ["minute", "hourly", "daily", "monthly"])
async def test_resets_at_is_the_utc_window_end(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, period: str
) -> None:
    await _away_from_window_edge()
    now = datetime.now(UTC)
    decision = await db.rate_limit(tenant_a, "windows", limit=10, period=period)
    assert decision.allowed
    assert decision.resets_at == _window_end(period, now)
    assert decision.resets_at.utcoffset() == timedelta(0)
    start = await admin.fetchval(
        "SELECT window_start FROM api_rate_limits "
        "WHERE tenant_id = $1 AND resource_type = 'windows' AND period = $2",
        tenant_a,
        period,
    )
    assert start == _window_start(period, now)
    denied = await db.rate_limit(tenant_a, "windows", limit=1, period=period)
    assert not denied.allowed
    assert 0 < denied.retry_after <= (decision.resets_at - now).total_seconds() + 1


def test_window_ends_at_the_right_boundaries() -> None:
    assert _window_end("daily", datetime(2026, 3, 4, 23, 59, tzinfo=UTC)) == datetime(
        2026, 3, 5, tzinfo=UTC
    )
    assert _window_end("monthly", datetime(2026, 12, 31, 12, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC
    )
    assert _window_end("monthly", datetime(2026, 2, 10, tzinfo=UTC)) == datetime(
        2026, 3, 1, tzinfo=UTC
    )


async def test_periods_count_separately(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    plan = {"minute": 3, "hourly": 1, "daily": 2, "monthly": 4}
    last: dict[str, int] = {}
    for period, times in plan.items():
        for _ in range(times):
            decision = await db.rate_limit(tenant_a, "api_calls", limit=100, period=period)
            assert decision.allowed
            last[period] = decision.current
    assert last == plan
    rows = await admin.fetch(
        "SELECT period, request_count FROM api_rate_limits "
        "WHERE tenant_id = $1 AND resource_type = 'api_calls'",
        tenant_a,
    )
    assert {row["period"]: row["request_count"] for row in rows} == plan
    # another tenant and another resource start from zero
    other_tenant = await db.rate_limit(tenant_b, "api_calls", limit=100, period="daily")
    other_resource = await db.rate_limit(tenant_a, "api_calls.v2", limit=100, period="daily")
    assert other_tenant.current == 1
    assert other_resource.current == 1
    assert await _counter(admin, tenant_a, "api_calls", "daily") == 2


async def test_peek_does_not_spend(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    async with db.unit_of_work(tenant_a) as uow:
        first = await uow.rate_limits.peek("searches", limit=3)
        again = await uow.rate_limits.peek("searches", limit=3)
        await uow.commit()
    # A fresh window: nothing spent, all of it remains, and the peek spent nothing.
    assert (first.allowed, first.current, first.remaining) == (True, 0, 3)
    assert first.retry_after == 0.0
    assert (again.allowed, again.current, again.remaining) == (True, 0, 3)
    assert await _counter(admin, tenant_a, "searches") is None

    await db.rate_limit(tenant_a, "searches", limit=3, cost=2)
    async with db.unit_of_work(tenant_a) as uow:
        fits = await uow.rate_limits.peek("searches", limit=3)
        too_much = await uow.rate_limits.peek("searches", limit=3, cost=2)
        await uow.commit()
    assert (fits.allowed, fits.current, fits.remaining) == (True, 2, 1)
    assert (too_much.allowed, too_much.current, too_much.remaining) == (False, 2, 1)
    assert too_much.retry_after > 0
    assert await _counter(admin, tenant_a, "searches") == 2


async def test_peek_counts_this_unit_of_works_charges_and_forgets_rolled_back_ones(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    await db.rate_limit(tenant_a, "exports", limit=5)
    async with db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume("exports", limit=5, cost=2)).current == 3
        inside = await uow.rate_limits.peek("exports", limit=5, cost=2)
        last = await uow.rate_limits.peek("exports", limit=5, cost=3)
        await uow.rollback()
        after_rollback = await uow.rate_limits.peek("exports", limit=5)
    # Committed 1 plus this unit of work's 2; 2 more fit, 3 more would not.
    assert (inside.allowed, inside.current, inside.remaining) == (True, 3, 2)
    assert (last.allowed, last.current, last.remaining) == (False, 3, 2)
    # The rolled-back charge is not counted: the window stands at what was committed.
    assert (after_rollback.allowed, after_rollback.current, after_rollback.remaining) == (
        True,
        1,
        4,
    )
    assert await _counter(admin, tenant_a, "exports") == 1


async def test_consume_in_uow_counts_only_after_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    async with db.unit_of_work(tenant_a) as uow:
        one = await uow.rate_limits.consume("summaries", limit=2)
        two = await uow.rate_limits.consume("summaries", limit=2)
        three = await uow.rate_limits.consume("summaries", limit=2)
        peeked = await uow.rate_limits.peek("summaries", limit=2)
        assert await _counter(admin, tenant_a, "summaries") is None
        await uow.commit()
    assert (one.allowed, one.current, one.remaining) == (True, 1, 1)
    assert (two.allowed, two.current, two.remaining) == (True, 2, 0)
    assert (three.allowed, three.remaining) == (False, 0)
    assert (peeked.allowed, peeked.current, peeked.remaining) == (False, 2, 0)
    assert await _counter(admin, tenant_a, "summaries") == 2
    assert not (await db.rate_limit(tenant_a, "summaries", limit=2)).allowed


async def test_rolled_back_uow_spends_nothing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    async with db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume("summaries", limit=5, cost=3)).allowed
    assert await _counter(admin, tenant_a, "summaries") is None
    async with db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume("summaries", limit=5, cost=3)).allowed
        await uow.rollback()
        # after the rollback the earlier charge is forgotten, in the counter and here
        decision = await uow.rate_limits.consume("summaries", limit=5, cost=1)
        await uow.commit()
    assert decision.current == 1
    assert await _counter(admin, tenant_a, "summaries") == 1

    async def failing_handler() -> None:
        async with db.unit_of_work(tenant_a) as uow:
            assert (await uow.rate_limits.consume("summaries", limit=5, cost=4)).allowed
            raise RuntimeError("the handler failed")

    with pytest.raises(RuntimeError, match="the handler failed"):
        await failing_handler()
    assert await _counter(admin, tenant_a, "summaries") == 1


async def test_limit_used_up_meanwhile_fails_the_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    await _away_from_window_edge()
    assert issubclass(RateLimitExceeded, Conflict)
    user = await add_user(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        decision = await uow.rate_limits.consume("meetings_processed", limit=1)
        assert decision.allowed
        await uow.meetings.create(
            user_id=user.id, fathom_recording_id="rec-over-limit", title="Over the limit"
        )
        await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="x"
        )
        outside = await db.rate_limit(tenant_a, "meetings_processed", limit=1)
        assert outside.allowed
        with pytest.raises(RateLimitExceeded):
            await uow.commit()
    assert await _counter(admin, tenant_a, "meetings_processed") == 1
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.meetings.get_by_fathom_id("rec-over-limit") is None
        assert await uow.audit.recent() == []
    stored = await admin.fetchval(
        "SELECT count(*) FROM meeting_sessions WHERE tenant_id = $1", tenant_a
    )
    assert stored == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"period": "weekly"},
        {"period": "Daily"},
        {"period": "bucket"},
        {"cost": -1},
        {"cost": 0},
        {"cost": 1.5},
        {"limit": -1},
        {"limit": 1.5},
        {"limit": "10"},
        {"limit": True},
        {"resource_type": "Meetings"},
        {"resource_type": "meetings processed"},
        {"resource_type": ""},
        {"resource_type": "x; DROP TABLE tenants"},
    ],
)
async def test_rate_limit_arguments_are_validated(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, kwargs: dict[str, object]
) -> None:
    call: dict[str, object] = {"resource_type": "meetings_processed", "limit": 10, **kwargs}
    resource = call.pop("resource_type")
    with pytest.raises(ValidationError):
        await db.rate_limit(tenant_a, resource, **call)  # type: ignore[arg-type]
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError):
            await uow.rate_limits.consume(resource, **call)  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await uow.rate_limits.peek(resource, **call)  # type: ignore[arg-type]
        await uow.commit()
    rows = await admin.fetchval(
        "SELECT count(*) FROM api_rate_limits WHERE tenant_id = $1", tenant_a
    )
    assert rows == 0


# -- rate limits: token buckets ---------------------------------------------------------


@pytest.mark.parametrize("rate", [5e-324, 1e-10, 0.0, -1.0, float("nan"), 1e13])
async def test_a_refill_rate_out_of_bounds_is_refused_before_any_sql(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, rate: float
) -> None:
    bucket = f"b{uuid.uuid4().hex[:10]}"
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="refill_per_second"):
            await uow.rate_limits.take(bucket, capacity=5, refill_per_second=rate)
        slowest = await uow.rate_limits.take(bucket, capacity=5, refill_per_second=1e-9)
        await uow.commit()  # a subnormal rate would have underflowed here, in the database
    assert slowest.allowed
    assert (
        await admin.fetchval(
            "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
            tenant_a,
            bucket,
        )
        == 0
    )


async def _take(
    db: Database, tenant: TenantId, bucket: str, *, capacity: int, refill: float, tokens: int = 1
) -> tuple[bool, int, float]:
    async with db.unit_of_work(tenant) as uow:
        decision = await uow.rate_limits.take(
            bucket, capacity=capacity, refill_per_second=refill, tokens=tokens
        )
        await uow.commit()
    assert decision.limit == capacity
    return decision.allowed, decision.remaining, decision.retry_after


async def _bucket_tokens(admin: asyncpg.Connection, tenant: TenantId, bucket: str) -> float | None:
    value = await admin.fetchval(
        "SELECT tokens FROM api_rate_limits "
        "WHERE tenant_id = $1 AND resource_type = $2 AND period = 'bucket'",
        tenant,
        bucket,
    )
    return None if value is None else float(value)


async def _age_bucket(
    admin: asyncpg.Connection, tenant: TenantId, bucket: str, by: timedelta
) -> None:
    """Move the bucket's last refill back by ``by``.

    The new time is computed here: Citus refuses a STABLE function on a column in an
    UPDATE, and ``timestamptz - interval`` is one.
    """
    where = "WHERE tenant_id = $1 AND resource_type = $2 AND period = 'bucket'"
    refilled = await admin.fetchval(
        f"SELECT updated_at FROM api_rate_limits {where}", tenant, bucket
    )
    assert refilled is not None
    await admin.execute(
        f"UPDATE api_rate_limits SET updated_at = $3 {where}", tenant, bucket, refilled - by
    )


async def test_token_bucket_capacity_and_retry_after(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    results = [await _take(db, tenant_a, "crm:hubspot", capacity=3, refill=0.001) for _ in range(3)]
    assert [allowed for allowed, _, _ in results] == [True, True, True]
    assert [remaining for _, remaining, _ in results] == [2, 1, 0]
    assert all(retry == 0.0 for _, _, retry in results)

    allowed, remaining, retry_after = await _take(
        db, tenant_a, "crm:hubspot", capacity=3, refill=0.001
    )
    assert not allowed
    assert remaining == 0
    assert 0 < retry_after <= 1000
    left = await _bucket_tokens(admin, tenant_a, "crm:hubspot")
    assert left is not None
    assert left < 1


async def test_token_bucket_refills(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    for _ in range(2):
        assert (await _take(db, tenant_a, "slack.post", capacity=2, refill=0.001))[0]
    assert not (await _take(db, tenant_a, "slack.post", capacity=2, refill=0.001))[0]
    # 1500 s ago at 0.001 tokens/s: 1.5 tokens are back
    await _age_bucket(admin, tenant_a, "slack.post", timedelta(seconds=1500))
    assert (await _take(db, tenant_a, "slack.post", capacity=2, refill=0.001))[0]
    assert not (await _take(db, tenant_a, "slack.post", capacity=2, refill=0.001))[0]
    # a long time ago: full again, but never above capacity
    await _age_bucket(admin, tenant_a, "slack.post", timedelta(days=30))
    results = [await _take(db, tenant_a, "slack.post", capacity=2, refill=0.001) for _ in range(3)]
    assert [allowed for allowed, _, _ in results] == [True, True, False]


async def test_token_bucket_refills_with_time(db: Database, tenant_a: TenantId) -> None:
    # 200 tokens/s: a bucket of 1 is empty right after a take and full again 50 ms later.
    assert (await _take(db, tenant_a, "fast", capacity=1, refill=200.0))[0]
    await asyncio.sleep(0.05)
    assert (await _take(db, tenant_a, "fast", capacity=1, refill=200.0))[0]


async def test_token_bucket_in_uow_counts_only_on_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        first = await uow.rate_limits.take("jobs", capacity=2, refill_per_second=0.001)
        second = await uow.rate_limits.take("jobs", capacity=2, refill_per_second=0.001)
        third = await uow.rate_limits.take("jobs", capacity=2, refill_per_second=0.001)
        assert await _bucket_tokens(admin, tenant_a, "jobs") is None
        await uow.rollback()
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert third.retry_after > 0
    assert await _bucket_tokens(admin, tenant_a, "jobs") is None

    async with db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.take("jobs", capacity=2, refill_per_second=0.001)).allowed
        await uow.commit()
    left = await _bucket_tokens(admin, tenant_a, "jobs")
    assert left is not None
    assert 1 <= left < 1.5


async def test_token_bucket_more_than_capacity_is_denied_without_writing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    allowed, _, retry_after = await _take(db, tenant_a, "big", capacity=2, refill=1.0, tokens=3)
    assert not allowed
    assert retry_after > 0
    assert await _bucket_tokens(admin, tenant_a, "big") is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bucket": "Bad Bucket"},
        {"bucket": ""},
        {"capacity": 0},
        {"capacity": -1},
        {"capacity": 1.5},
        {"refill_per_second": 0},
        {"refill_per_second": -1.0},
        {"refill_per_second": float("inf")},
        {"refill_per_second": float("nan")},
        {"tokens": 0},
        {"tokens": -2},
    ],
)
async def test_token_bucket_arguments_are_validated(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, kwargs: dict[str, object]
) -> None:
    call: dict[str, object] = {"bucket": "ok", "capacity": 5, "refill_per_second": 1.0, **kwargs}
    bucket = call.pop("bucket")
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError):
            await uow.rate_limits.take(bucket, **call)  # type: ignore[arg-type]
        await uow.commit()
    rows = await admin.fetchval(
        "SELECT count(*) FROM api_rate_limits WHERE tenant_id = $1", tenant_a
    )
    assert rows == 0


async def test_a_charge_of_an_aborted_transaction_is_not_applied_by_a_later_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    resource = f"r{uuid.uuid4().hex[:10]}"
    async with db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume(resource, limit=10)).allowed
        with pytest.raises(NotFound):  # a failed statement aborts the transaction
            await uow.meetings.create(user_id=uuid.uuid4(), fathom_recording_id="r", title="t")
        with pytest.raises(TransactionAborted):
            await uow.commit()
        await add_user(db, tenant_a)  # meanwhile, elsewhere
        await uow.tenants.add_user(slack_user_id=unique_user_id())  # a new transaction
        await uow.commit()
    spent = await admin.fetchval(
        "SELECT request_count FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
        tenant_a,
        resource,
    )
    assert spent is None  # the charge went with the transaction it was made in
