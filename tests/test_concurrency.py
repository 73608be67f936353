"""Concurrency: real commits on separate connections, racing for real.

Every test here runs many units of work (or ``db.rate_limit`` calls) at once on
a pool big enough to give each its own connection, and checks the committed
state with a superuser connection (``admin``) outside the layer.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.errors import Conflict, RateLimitExceeded
from slack_fathom_db.testing import execute_in
from tests.helpers import fetch_row, lock_waiters, unique_user_id

GATHER_TIMEOUT = 120.0
"""Generous ceiling for a whole race: a hang fails the test instead of the run."""


@pytest_asyncio.fixture(scope="module")
async def big_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A Database whose pool can hold sixty units of work open at once.

    A stock server allows 100 connections; 30 + 35 leaves room for the shared
    ``db`` fixture and the ``admin`` connection. Larger races queue on the pool.
    """
    database = Database(settings.model_copy(update={"pool_size": 30, "max_overflow": 35}))
    try:
        yield database
    finally:
        await database.dispose()


async def gather_all(coros: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run every coroutine at once; results (or exceptions) in order."""
    return await asyncio.wait_for(
        asyncio.gather(*coros, return_exceptions=True), timeout=GATHER_TIMEOUT
    )


async def barrier_wait(barrier: asyncio.Barrier) -> None:
    await asyncio.wait_for(barrier.wait(), timeout=GATHER_TIMEOUT)


async def counter_rows(
    admin: asyncpg.Connection, tenant: TenantId, resource_type: str
) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT period, request_count, tokens FROM api_rate_limits "
        "WHERE tenant_id = $1 AND resource_type = $2",
        tenant,
        resource_type,
    )


def unexpected(results: list[Any], *allowed: type[BaseException]) -> list[BaseException]:
    """Exceptions among ``results`` that are not of an allowed type."""
    return [
        r
        for r in results
        if isinstance(r, BaseException) and not (allowed and isinstance(r, allowed))
    ]


async def add_user(db: Database, tenant: TenantId) -> uuid.UUID:
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.commit()
    return user.id


async def create_meetings(
    db: Database, tenant: TenantId, user_id: uuid.UUID, count: int
) -> list[uuid.UUID]:
    ids = []
    async with db.unit_of_work(tenant) as uow:
        for n in range(count):
            meeting = await uow.meetings.create(
                user_id=user_id, fathom_recording_id=f"rec-{uuid.uuid4()}", title=f"Call {n}"
            )
            ids.append(meeting.id)
        await uow.commit()
    return ids


# -- db.rate_limit: one atomic statement per call ----------------------------------------


async def test_rate_limit_200_concurrent_callers_grant_exactly_the_limit(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    results = await gather_all([big_db.rate_limit(tenant_a, "x", limit=50) for _ in range(200)])

    assert unexpected(results) == []
    granted = [d for d in results if d.allowed]
    denied = [d for d in results if not d.allowed]
    assert len(granted) == 50
    assert len(denied) == 150
    # Each grant saw its own increment of the counter: 1, 2, …, 50, once each.
    assert sorted(d.current for d in granted) == list(range(1, 51))
    assert all(d.retry_after == 0.0 for d in granted)
    for d in denied:
        assert d.remaining == 0
        assert d.current == 50
        assert d.limit == 50
        assert d.retry_after > 0
    rows = await counter_rows(admin, tenant_a, "x")
    assert [(r["period"], r["request_count"]) for r in rows] == [("daily", 50)]
    # Still full afterwards: the denials spent nothing and nothing more is granted.
    again = await big_db.rate_limit(tenant_a, "x", limit=50)
    assert not again.allowed
    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "x")] == [50]


async def test_rate_limit_weighted_cost_grants_only_what_fits(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    results = await gather_all(
        [big_db.rate_limit(tenant_a, "exports", limit=100, cost=3) for _ in range(60)]
    )

    assert unexpected(results) == []
    granted = [d for d in results if d.allowed]
    denied = [d for d in results if not d.allowed]
    assert len(granted) == 33
    assert len(denied) == 27
    assert sorted(d.current for d in granted) == list(range(3, 100, 3))
    for d in denied:
        assert d.remaining < 3  # what is left does not fit a cost of 3
        assert d.retry_after > 0
    rows = await counter_rows(admin, tenant_a, "exports")
    assert [r["request_count"] for r in rows] == [99]
    # One unit still fits where three do not: the denials really spent nothing.
    last = await big_db.rate_limit(tenant_a, "exports", limit=100, cost=1)
    assert last.allowed
    assert last.current == 100
    assert last.remaining == 0
    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "exports")] == [100]


async def test_rate_limit_counters_are_per_tenant_under_concurrency(
    big_db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    calls = [
        big_db.rate_limit(t, "shared_name", limit=10)
        for _ in range(30)
        for t in (tenant_a, tenant_b)
    ]
    results = await gather_all(calls)

    assert unexpected(results) == []
    by_tenant = Counter(
        tenant for tenant, d in zip([tenant_a, tenant_b] * 30, results, strict=True) if d.allowed
    )
    assert by_tenant == {tenant_a: 10, tenant_b: 10}
    for tenant in (tenant_a, tenant_b):
        assert [r["request_count"] for r in await counter_rows(admin, tenant, "shared_name")] == [
            10
        ]


# -- token buckets inside units of work ---------------------------------------------------


@pytest.mark.not_through_pgbouncer(
    reason="a barrier holds 60 transactions open at once; PgBouncer's fewer server "
    "connections queue the rest behind the barrier, which then never fills"
)
async def test_token_bucket_60_concurrent_units_of_work_get_exactly_capacity(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    callers = 60
    everyone_took = asyncio.Barrier(callers)

    async def caller(n: int) -> str:
        try:
            async with big_db.unit_of_work(tenant_a) as uow:
                decision = await uow.rate_limits.take(
                    "slack_api", capacity=20, refill_per_second=0.001
                )
                await uow.audit.log_event(
                    event_type="bucket.take",
                    event_category="system",
                    action_description=f"caller {n}",
                )
                await barrier_wait(everyone_took)
                if not decision.allowed:
                    assert decision.retry_after > 0
                    return "denied"
                try:
                    await uow.commit()
                except RateLimitExceeded:
                    return "exceeded"
                return "committed"
        except BaseException:
            await everyone_took.abort()
            raise

    results = await gather_all([caller(n) for n in range(callers)])

    assert unexpected(results) == []
    outcome = Counter(results)
    # Every caller took before anyone committed, so all were told yes at first
    # and the bucket decided at commit: 20 commits, 40 refused there.
    assert outcome == {"committed": 20, "exceeded": 40}
    rows = await counter_rows(admin, tenant_a, "slack_api")
    assert len(rows) == 1
    assert rows[0]["period"] == "bucket"
    assert 0 <= rows[0]["tokens"] < 1
    # A commit refused for the bucket rolled back everything else it held.
    audits = await admin.fetchval(
        "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND event_type = 'bucket.take'",
        tenant_a,
    )
    assert audits == 20


async def test_token_bucket_db_sequential_takes_after_drain_are_denied(
    big_db: Database, tenant_a: TenantId
) -> None:
    async def take() -> bool:
        async with big_db.unit_of_work(tenant_a) as uow:
            decision = await uow.rate_limits.take("webhooks", capacity=5, refill_per_second=0.001)
            if decision.allowed:
                await uow.commit()
            return decision.allowed

    results = await gather_all([take() for _ in range(30)])
    committed = [r for r in results if r is True]
    assert unexpected(results, RateLimitExceeded) == []
    assert len(committed) == 5
    assert await take() is False


# -- fixed windows inside units of work: charged at commit ---------------------------------


@pytest.mark.not_through_pgbouncer(
    reason="a barrier holds 40 transactions open at once; PgBouncer's fewer server "
    "connections queue the rest behind the barrier, which then never fills"
)
async def test_consume_in_concurrent_units_of_work_grants_exactly_the_limit(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    callers, limit = 40, 10
    everyone_consumed = asyncio.Barrier(callers)

    async def caller(n: int) -> str:
        try:
            async with big_db.unit_of_work(tenant_a) as uow:
                decision = await uow.rate_limits.consume("meetings_processed", limit=limit)
                await uow.audit.log_event(
                    event_type="meeting.processed",
                    event_category="data",
                    action_description=f"caller {n}",
                )
                # Nobody has committed yet, so every caller was told it fits.
                await barrier_wait(everyone_consumed)
                if not decision.allowed:
                    return "denied"
                try:
                    await uow.commit()
                except RateLimitExceeded:
                    return "exceeded"
                return "committed"
        except BaseException:
            await everyone_consumed.abort()
            raise

    results = await gather_all([caller(n) for n in range(callers)])

    assert unexpected(results) == []
    outcome = Counter(results)
    assert outcome == {"committed": limit, "exceeded": callers - limit}
    rows = await counter_rows(admin, tenant_a, "meetings_processed")
    assert [r["request_count"] for r in rows] == [limit]
    audits = await admin.fetchval(
        "SELECT count(*) FROM audit_logs WHERE tenant_id = $1 AND event_type = 'meeting.processed'",
        tenant_a,
    )
    assert audits == limit


async def test_consume_in_units_of_work_without_barrier_grants_exactly_the_limit(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async def caller() -> bool:
        async with big_db.unit_of_work(tenant_a) as uow:
            decision = await uow.rate_limits.consume("summaries", limit=15, cost=1)
            if not decision.allowed:
                return False
            await uow.commit()
            return True

    results = await gather_all([caller() for _ in range(60)])

    assert unexpected(results, RateLimitExceeded) == []
    assert results.count(True) == 15
    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "summaries")] == [15]


async def test_consume_in_rolled_back_unit_of_work_spends_nothing(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with big_db.unit_of_work(tenant_a) as uow:
        decision = await uow.rate_limits.consume("crm_syncs", limit=10, cost=4)
        assert decision.allowed
        assert decision.current == 4
        # leaves without commit: rolled back

    async with big_db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume("crm_syncs", limit=10, cost=4)).allowed
        await uow.rollback()
        # the explicit rollback dropped the charge; this commit applies nothing
        await uow.commit()

    class Boom(Exception):
        pass

    async def consume_then_fail() -> None:
        async with big_db.unit_of_work(tenant_a) as uow:
            assert (await uow.rate_limits.consume("crm_syncs", limit=10, cost=4)).allowed
            raise Boom

    with pytest.raises(Boom):
        await consume_then_fail()

    assert await counter_rows(admin, tenant_a, "crm_syncs") == []
    # The whole limit is still available.
    full = await big_db.rate_limit(tenant_a, "crm_syncs", limit=10, cost=10)
    assert full.allowed
    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "crm_syncs")] == [10]


async def test_rate_limit_does_not_wait_behind_open_unit_of_work(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with big_db.unit_of_work(tenant_a) as uow:
        held = await uow.rate_limits.consume("api_calls", limit=5)
        assert held.allowed
        await uow.tenants.add_user(slack_user_id=unique_user_id())  # the transaction is live
        # The unit of work stays open; a direct charge on the same key must not block.
        direct = await asyncio.wait_for(big_db.rate_limit(tenant_a, "api_calls", limit=5), 2)
        assert direct.allowed
        assert direct.current == 1
        more = await asyncio.wait_for(big_db.rate_limit(tenant_a, "api_calls", limit=5, cost=3), 2)
        assert more.allowed
        assert more.current == 4
        assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "api_calls")] == [4]
        await uow.commit()  # 4 + 1 still fits: the deferred charge is applied now

    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "api_calls")] == [5]


async def test_open_unit_of_work_commit_fails_when_limit_filled_meanwhile(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    async with big_db.unit_of_work(tenant_a) as uow:
        assert (await uow.rate_limits.consume("reports", limit=3)).allowed
        await uow.tenants.add_user(slack_user_id=slack_user)
        for _ in range(3):
            assert (
                await asyncio.wait_for(big_db.rate_limit(tenant_a, "reports", limit=3), 2)
            ).allowed
        with pytest.raises(RateLimitExceeded):
            await uow.commit()

    assert [r["request_count"] for r in await counter_rows(admin, tenant_a, "reports")] == [3]
    users = await admin.fetchval(
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant_a,
        slack_user,
    )
    assert users == 0


# -- meetings ------------------------------------------------------------------------------


async def test_concurrent_duplicate_create_gives_one_row(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user_id = await add_user(big_db, tenant_a)
    callers = 10
    everyone_in = asyncio.Barrier(callers)

    async def deliver() -> uuid.UUID:
        try:
            async with big_db.unit_of_work(tenant_a) as uow:
                await execute_in(uow, "SELECT 1")  # the transaction is open before the race
                await barrier_wait(everyone_in)
                meeting = await uow.meetings.create(
                    user_id=user_id, fathom_recording_id="rec-dup", title="Webhook delivery"
                )
                await uow.commit()
                return meeting.id
        except BaseException:
            await everyone_in.abort()
            raise

    results = await gather_all([deliver() for _ in range(callers)])

    assert unexpected(results) == []
    assert len(set(results)) == 1
    rows = await admin.fetch(
        "SELECT id FROM meeting_sessions WHERE tenant_id = $1 AND fathom_recording_id = 'rec-dup'",
        tenant_a,
    )
    assert [r["id"] for r in rows] == [results[0]]


async def test_two_workers_claiming_at_once_share_nothing(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user_id = await add_user(big_db, tenant_a)

    async def claim_round(k: int) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        both_claimed = asyncio.Barrier(2)

        async def worker() -> list[uuid.UUID]:
            try:
                async with big_db.unit_of_work(tenant_a) as uow:
                    claimed = await uow.meetings.claim_pending(limit=k)
                    assert all(m.status == "processing" for m in claimed)
                    # Both hold their claims (row locks) before either commits.
                    await barrier_wait(both_claimed)
                    await uow.commit()
                    return [m.id for m in claimed]
            except BaseException:
                await both_claimed.abort()
                raise

        first, second = await gather_all([worker(), worker()])
        for result in (first, second):
            if isinstance(result, BaseException):
                raise result
        return first, second

    # 10 pending, k = 4: 8 claimed, none twice.
    ids = set(await create_meetings(big_db, tenant_a, user_id, 10))
    first, second = await claim_round(4)
    assert len(first) == 4
    assert len(second) == 4
    assert not set(first) & set(second)
    assert set(first) | set(second) <= ids
    pending = await admin.fetchval(
        "SELECT count(*) FROM meeting_sessions WHERE tenant_id = $1 AND status = 'pending'",
        tenant_a,
    )
    assert pending == 2

    # 2 pending left, k = 4: together they claim both, still none twice.
    first, second = await claim_round(4)
    assert len(first) + len(second) == 2
    assert not set(first) & set(second)
    statuses = await admin.fetch(
        "SELECT status, processing_attempts, count(*) AS n FROM meeting_sessions "
        "WHERE tenant_id = $1 GROUP BY status, processing_attempts",
        tenant_a,
    )
    assert [(r["status"], r["processing_attempts"], r["n"]) for r in statuses] == [
        ("processing", 1, 10)
    ]


async def test_four_workers_claim_every_pending_meeting_exactly_once(
    big_db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    user_a = await add_user(big_db, tenant_a)
    user_b = await add_user(big_db, tenant_b)
    ids = set(await create_meetings(big_db, tenant_a, user_a, 60))
    other_tenant = set(await create_meetings(big_db, tenant_b, user_b, 5))

    async def worker() -> list[uuid.UUID]:
        mine: list[uuid.UUID] = []
        while True:
            async with big_db.unit_of_work(tenant_a) as uow:
                claimed = await uow.meetings.claim_pending(limit=3)
                await uow.commit()
            if not claimed:
                return mine
            mine.extend(m.id for m in claimed)

    results = await gather_all([worker() for _ in range(4)])

    assert unexpected(results) == []
    counts = Counter(mid for result in results for mid in result)
    assert set(counts) == ids
    assert set(counts.values()) == {1}
    rows = await admin.fetch(
        "SELECT status, processing_attempts, count(*) AS n FROM meeting_sessions "
        "WHERE tenant_id = $1 GROUP BY status, processing_attempts",
        tenant_a,
    )
    assert [(r["status"], r["processing_attempts"], r["n"]) for r in rows] == [
        ("processing", 1, 60)
    ]
    # The other tenant's pending work was not touched.
    untouched = await admin.fetch(
        "SELECT id FROM meeting_sessions WHERE tenant_id = $1 AND status = 'pending'", tenant_b
    )
    assert {r["id"] for r in untouched} == other_tenant


async def _processing_meeting(db: Database, tenant: TenantId) -> tuple[uuid.UUID, int]:
    user_id = await add_user(db, tenant)
    (meeting_id,) = await create_meetings(db, tenant, user_id, 1)
    async with db.unit_of_work(tenant) as uow:
        meeting = await uow.meetings.start_processing(meeting_id)
        await uow.commit()
    assert meeting.status == "processing"
    return meeting_id, meeting.version


async def _wait_for_lock_waiter(admin: asyncpg.Connection) -> None:
    """Until some backend of this database waits on a lock (the blocked UPDATE)."""
    for _ in range(3000):  # 30 s at most
        if await lock_waiters(admin, updating="meeting_sessions"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the second UPDATE never waited on the row lock")


async def test_concurrent_status_change_loser_gets_conflict(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    meeting_id, version = await _processing_meeting(big_db, tenant_a)
    first_updated = asyncio.Event()
    second_blocked = asyncio.Event()

    async def first() -> str:
        async with big_db.unit_of_work(tenant_a) as uow:
            seen = await uow.meetings.get(meeting_id)
            assert seen is not None
            assert seen.version == version
            await uow.meetings.complete_processing(
                meeting_id, summary="first", expected_version=seen.version
            )
            first_updated.set()
            await asyncio.wait_for(second_blocked.wait(), timeout=60)
            await uow.commit()
            return "first committed"

    async def second() -> str:
        async with big_db.unit_of_work(tenant_a) as uow:
            seen = await uow.meetings.get(meeting_id)
            assert seen is not None
            assert seen.version == version  # read before the first one commits
            await asyncio.wait_for(first_updated.wait(), timeout=60)
            await uow.meetings.complete_processing(
                meeting_id, summary="second", expected_version=seen.version
            )
            await uow.commit()
            return "second committed"

    async def referee() -> None:
        await asyncio.wait_for(first_updated.wait(), timeout=60)
        await _wait_for_lock_waiter(admin)  # the second UPDATE waits on the row lock
        second_blocked.set()

    first_result, second_result, referee_result = await gather_all([first(), second(), referee()])

    assert referee_result is None
    assert first_result == "first committed"
    assert isinstance(second_result, Conflict), second_result
    assert not isinstance(second_result, RateLimitExceeded)
    row = await fetch_row(
        admin, "SELECT status, summary, version FROM meeting_sessions WHERE id = $1", meeting_id
    )
    assert (row["status"], row["summary"], row["version"]) == ("completed", "first", version + 1)


async def test_concurrent_status_change_symmetric_race_exactly_one_wins(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    meeting_id, version = await _processing_meeting(big_db, tenant_a)
    both_read = asyncio.Barrier(2)

    async def contender(name: str) -> str:
        try:
            async with big_db.unit_of_work(tenant_a) as uow:
                seen = await uow.meetings.get(meeting_id)
                assert seen is not None
                await barrier_wait(both_read)
                await uow.meetings.complete_processing(
                    meeting_id, summary=name, expected_version=seen.version
                )
                await uow.commit()
                return name
        except BaseException:
            await both_read.abort()
            raise

    results = await gather_all([contender("alpha"), contender("beta")])

    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if isinstance(r, Conflict)]
    assert len(winners) == 1, results
    assert len(losers) == 1, results
    row = await fetch_row(
        admin, "SELECT status, summary, version FROM meeting_sessions WHERE id = $1", meeting_id
    )
    assert (row["status"], row["summary"], row["version"]) == ("completed", winners[0], version + 1)


async def test_blocked_status_change_succeeds_when_holder_rolls_back(
    big_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    meeting_id, version = await _processing_meeting(big_db, tenant_a)
    first_updated = asyncio.Event()
    second_blocked = asyncio.Event()

    async def first() -> None:
        async with big_db.unit_of_work(tenant_a) as uow:
            await uow.meetings.fail_processing(meeting_id, error="boom", expected_version=version)
            first_updated.set()
            await asyncio.wait_for(second_blocked.wait(), timeout=60)
            # leaves without commit: the row lock goes, the version stays

    async def second() -> int:
        await asyncio.wait_for(first_updated.wait(), timeout=60)
        async with big_db.unit_of_work(tenant_a) as uow:
            done = await uow.meetings.complete_processing(
                meeting_id, summary="second", expected_version=version
            )
            await uow.commit()
        return done.version

    async def referee() -> None:
        await asyncio.wait_for(first_updated.wait(), timeout=60)
        await _wait_for_lock_waiter(admin)
        second_blocked.set()

    first_result, second_result, referee_result = await gather_all([first(), second(), referee()])

    assert first_result is None
    assert referee_result is None
    assert second_result == version + 1
    row = await fetch_row(
        admin,
        "SELECT status, summary, processing_error FROM meeting_sessions WHERE id = $1",
        meeting_id,
    )
    assert (row["status"], row["summary"], row["processing_error"]) == (
        "completed",
        "second",
        None,
    )
