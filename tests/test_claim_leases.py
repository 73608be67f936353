"""Claim leases: a meeting whose worker died is reclaimed, at most a bounded number of times.

Every test commits for real and checks the stored rows through the superuser
``admin`` connection. Leases are made to pass either for real (a short lease
and a bounded wait until the server's clock is past it) or by moving
``processing_lease_expires_at`` into the past through ``admin``. No duration
is asserted; every wait has a generous upper bound.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.errors import Conflict, DatabaseUnavailable, ValidationError
from slack_fathom_db.records import MeetingSession
from slack_fathom_db.testing import driver_of
from tests.helpers import fetch_row, unique_user_id

HANG = 60.0
"""Upper bound for anything that must not hang (a generous one: machines are noisy)."""
LEASE = 2.0
"""Seconds of the lease in the test that waits for one to pass."""
MAX_LEASE = 7 * 86_400


# -- helpers --------------------------------------------------------------------------


def _settings_with(settings: DatabaseSettings, **changes: Any) -> DatabaseSettings:
    """The suite's database, with other lease or attempt settings."""
    return DatabaseSettings(
        url=settings.sqlalchemy_url().render_as_string(False),
        app_role=settings.app_role,
        tenant_key=settings.tenant_key,
        pgbouncer=settings.pgbouncer,
        _env_file=None,
        **changes,
    )


@pytest_asyncio.fixture
async def two_attempts_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A ``Database`` that gives up on a meeting after two claims."""
    database = Database(_settings_with(settings, max_processing_attempts=2))
    try:
        yield database
    finally:
        await database.dispose()


@pytest_asyncio.fixture
async def long_lease_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A ``Database`` whose default lease is 1200 seconds."""
    database = Database(_settings_with(settings, claim_lease_seconds=1200))
    try:
        yield database
    finally:
        await database.dispose()


async def _create(db: Database, tenant: TenantId, count: int) -> list[uuid.UUID]:
    """``count`` pending meetings of a new user, in creation order."""
    async with db.unit_of_work(tenant) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        ids = [
            (
                await uow.meetings.create(
                    user_id=user.id, fathom_recording_id=f"rec-{uuid.uuid4().hex}", title="Call"
                )
            ).id
            for _ in range(count)
        ]
        await uow.commit()
    return ids


async def _claim(db: Database, tenant: TenantId, *, limit: int) -> list[uuid.UUID]:
    """One worker's claim, committed: the ids it got, oldest first."""
    async with db.unit_of_work(tenant) as uow:
        claimed = await uow.meetings.claim_pending(limit=limit)
        await uow.commit()
    return [meeting.id for meeting in claimed]


async def _expire(admin: asyncpg.Connection, tenant: TenantId, ids: list[uuid.UUID]) -> None:
    """Move the leases of ``ids`` into the past, as if their workers had died long ago."""
    status = await admin.execute(
        "UPDATE meeting_sessions SET processing_lease_expires_at = now() - interval '1 second' "
        "WHERE tenant_id = $1 AND id = ANY($2::uuid[]) AND status = 'processing'",
        tenant,
        ids,
    )
    assert status == f"UPDATE {len(ids)}"


async def _row(
    admin: asyncpg.Connection, tenant: TenantId, meeting_id: uuid.UUID
) -> asyncpg.Record:
    return await fetch_row(
        admin,
        "SELECT status, processing_attempts, processing_error, processed_at, version, "
        "processing_lease_expires_at, "
        "extract(epoch FROM processing_lease_expires_at - now()) AS lease_left "
        "FROM meeting_sessions WHERE tenant_id = $1 AND id = $2",
        tenant,
        meeting_id,
    )


async def _set_created_at(
    admin: asyncpg.Connection, tenant: TenantId, meeting_id: uuid.UUID, minutes_ago: int
) -> None:
    status = await admin.execute(
        "UPDATE meeting_sessions SET created_at = now() - make_interval(mins => $3) "
        "WHERE tenant_id = $1 AND id = $2",
        tenant,
        meeting_id,
        minutes_ago,
    )
    assert status == "UPDATE 1"


async def _wait_until_passed(admin: asyncpg.Connection, moment: datetime) -> None:
    """Wait until the server's clock is past ``moment``; fail (not hang) after ``HANG``."""
    deadline = time.monotonic() + HANG
    while not await admin.fetchval("SELECT now() > $1", moment):
        if time.monotonic() > deadline:
            pytest.fail("the server's clock never passed the lease")
        await asyncio.sleep(0.05)


# -- a worker dies ----------------------------------------------------------------------


@pytest.mark.not_through_pgbouncer(
    reason="kills the server backend of a worker; through PgBouncer the client connection "
    "survives and PgBouncer, not the layer, sees the kill"
)
async def test_a_dead_workers_meeting_is_reclaimed_exactly_once_after_its_lease(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    (meeting_id,) = await _create(db, tenant_a, 1)
    claimed: list[MeetingSession] = []
    with pytest.raises(DatabaseUnavailable):  # noqa: PT012
        async with asyncio.timeout(HANG), db.unit_of_work(tenant_a) as worker:
            claimed = await worker.meetings.claim_pending(limit=10, lease_seconds=LEASE)
            await worker.commit()
            # The worker goes on to its next transaction and dies in the middle of it.
            driver = await driver_of(worker)
            assert await admin.fetchval(
                "SELECT pg_terminate_backend($1::integer, 30000)", driver.get_server_pid()
            )
            await worker.meetings.get(meeting_id)
    assert [m.id for m in claimed] == [meeting_id]
    lease_end = claimed[0].processing_lease_expires_at
    assert lease_end is not None
    row = await _row(admin, tenant_a, meeting_id)
    assert (row["status"], row["processing_attempts"], row["version"]) == ("processing", 1, 2)
    assert row["processing_lease_expires_at"] == lease_end

    # Before the lease ends, nobody gets the meeting. The check is made only if the
    # server's clock is still short of the lease end now, so it was when that claim
    # ran: a slow machine makes the check vacuous, never wrong.
    early = await _claim(db, tenant_a, limit=10)
    if await admin.fetchval("SELECT now() < $1", lease_end):
        assert early == []

    # After it, racing workers: exactly one of them gets it, as a second attempt.
    await _wait_until_passed(admin, lease_end)
    late = await asyncio.wait_for(
        asyncio.gather(*(_claim(db, tenant_a, limit=10) for _ in range(3))), HANG
    )
    everything = [mid for ids in [early, *late] for mid in ids]
    assert everything == [meeting_id]
    row = await _row(admin, tenant_a, meeting_id)
    assert (row["status"], row["processing_attempts"], row["version"]) == ("processing", 2, 3)
    assert row["processing_lease_expires_at"] > lease_end
    assert row["processing_error"] is None


async def test_a_worker_that_outlived_its_lease_gets_conflict_instead_of_overwriting(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    (meeting_id,) = await _create(db, tenant_a, 1)
    async with db.unit_of_work(tenant_a) as slow:
        (first,) = await slow.meetings.claim_pending(limit=1)
        await slow.commit()
    await _expire(admin, tenant_a, [meeting_id])
    async with db.unit_of_work(tenant_a) as other:
        (second,) = await other.meetings.claim_pending(limit=1)
        await other.commit()
    assert (first.version, second.version) == (2, 3)
    assert second.processing_attempts == 2

    async with db.unit_of_work(tenant_a) as slow:
        with pytest.raises(Conflict, match="version 3, expected 2"):
            await slow.meetings.complete_processing(
                meeting_id, summary="stale", expected_version=first.version
            )
    async with db.unit_of_work(tenant_a) as other:
        done = await other.meetings.complete_processing(
            meeting_id, summary="fresh", expected_version=second.version
        )
        await other.commit()
    assert (done.status, done.summary, done.processing_lease_expires_at) == (
        "completed",
        "fresh",
        None,
    )


# -- racing workers ---------------------------------------------------------------------


async def test_racing_workers_reclaim_every_expired_meeting_exactly_once(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    ids = await _create(db, tenant_a, 12)
    assert sorted(await _claim(db, tenant_a, limit=12)) == sorted(ids)
    await _expire(admin, tenant_a, ids)
    (theirs,) = await _create(db, tenant_b, 1)
    assert await _claim(db, tenant_b, limit=1) == [theirs]
    await _expire(admin, tenant_b, [theirs])

    both_claimed = asyncio.Barrier(2)

    async def holding_worker() -> list[uuid.UUID]:
        try:
            async with db.unit_of_work(tenant_a) as uow:
                claimed = await uow.meetings.claim_pending(limit=4)
                # Both hold their claims (row locks) before either commits.
                await asyncio.wait_for(both_claimed.wait(), HANG)
                await uow.commit()
        except BaseException:
            await both_claimed.abort()
            raise
        return [meeting.id for meeting in claimed]

    async def draining_worker() -> list[uuid.UUID]:
        mine: list[uuid.UUID] = []
        while claimed := await _claim(db, tenant_a, limit=2):
            mine.extend(claimed)
        return mine

    first, second = await asyncio.wait_for(asyncio.gather(holding_worker(), holding_worker()), HANG)
    assert len(first) == len(second) == 4
    assert not set(first) & set(second)
    rest = await asyncio.wait_for(asyncio.gather(*(draining_worker() for _ in range(4))), HANG)

    counts = Counter([*first, *second, *(mid for mine in rest for mid in mine)])
    assert set(counts) == set(ids)
    assert set(counts.values()) == {1}
    rows = await admin.fetch(
        "SELECT status, processing_attempts, count(*) AS n FROM meeting_sessions "
        "WHERE tenant_id = $1 AND processing_lease_expires_at > now() "
        "GROUP BY status, processing_attempts",
        tenant_a,
    )
    assert [(r["status"], r["processing_attempts"], r["n"]) for r in rows] == [
        ("processing", 2, 12)
    ]
    # The other tenant's expired meeting waits for a worker of its own tenant.
    other = await _row(admin, tenant_b, theirs)
    assert (other["processing_attempts"], other["version"]) == (1, 2)
    assert other["lease_left"] < 0


async def test_claims_take_pending_and_expired_meetings_oldest_first(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    names = ("leased_oldest", "expired_old", "pending_mid", "expired_new", "pending_new")
    ages = (90, 60, 30, 5, 1)
    ids = dict(zip(names, await _create(db, tenant_a, len(names)), strict=True))
    for name, minutes in zip(names, ages, strict=True):
        await _set_created_at(admin, tenant_a, ids[name], minutes)
    async with db.unit_of_work(tenant_a) as uow:
        for name in ("leased_oldest", "expired_old", "expired_new"):
            await uow.meetings.start_processing(ids[name])
        await uow.commit()
    await _expire(admin, tenant_a, [ids["expired_old"], ids["expired_new"]])
    by_id = {mid: name for name, mid in ids.items()}

    first = await _claim(db, tenant_a, limit=2)
    second = await _claim(db, tenant_a, limit=10)
    third = await _claim(db, tenant_a, limit=10)
    assert [by_id[mid] for mid in first] == ["expired_old", "pending_mid"]
    assert [by_id[mid] for mid in second] == ["expired_new", "pending_new"]
    assert third == []
    leased = await _row(admin, tenant_a, ids["leased_oldest"])
    assert (leased["processing_attempts"], leased["version"]) == (1, 2)


# -- the maximum number of attempts ------------------------------------------------------


async def test_past_the_maximum_attempts_an_expired_meeting_fails_and_is_not_returned(
    two_attempts_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    db = two_attempts_db
    stuck, retried, waiting = await _create(db, tenant_a, 3)
    for meeting_id, minutes in ((stuck, 30), (retried, 20), (waiting, 10)):
        await _set_created_at(admin, tenant_a, meeting_id, minutes)
    assert await _claim(db, tenant_a, limit=2) == [stuck, retried]
    await _expire(admin, tenant_a, [stuck, retried])
    assert await _claim(db, tenant_a, limit=2) == [stuck, retried]
    await _expire(admin, tenant_a, [stuck])

    # The oldest expired meeting has used both attempts: it is given up on (failed, not
    # returned), and the one place of this claim goes to the pending meeting.
    assert await _claim(db, tenant_a, limit=1) == [waiting]
    row = await _row(admin, tenant_a, stuck)
    assert row["status"] == "failed"
    assert row["processing_error"] == (
        "abandoned after 2 attempts: the lease of its last claim expired"
    )
    assert row["processing_attempts"] == 2
    assert row["processed_at"] is not None
    assert row["processing_lease_expires_at"] is None
    assert row["version"] == 4

    # Later claims pass it by; the unexpired ones stay with their workers.
    assert await _claim(db, tenant_a, limit=10) == []
    assert (await _row(admin, tenant_a, stuck))["version"] == 4
    assert (await _row(admin, tenant_a, retried))["processing_attempts"] == 2

    # The cap is on reclaiming: a deliberate retry of the failed meeting still works.
    async with db.unit_of_work(tenant_a) as uow:
        retry = await uow.meetings.start_processing(stuck, expected_version=4)
        await uow.commit()
    assert (retry.status, retry.processing_attempts, retry.processing_error) == (
        "processing",
        3,
        None,
    )
    assert retry.processing_lease_expires_at is not None


async def test_an_expired_meeting_under_the_maximum_is_claimed_in_the_same_call(
    two_attempts_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    db = two_attempts_db
    spent, fresh = await _create(db, tenant_a, 2)
    await _set_created_at(admin, tenant_a, spent, 20)
    await _set_created_at(admin, tenant_a, fresh, 10)
    assert await _claim(db, tenant_a, limit=2) == [spent, fresh]
    await _expire(admin, tenant_a, [spent])
    assert await _claim(db, tenant_a, limit=1) == [spent]
    await _expire(admin, tenant_a, [spent, fresh])

    assert await _claim(db, tenant_a, limit=5) == [fresh]
    assert (await _row(admin, tenant_a, spent))["status"] == "failed"
    claimed = await _row(admin, tenant_a, fresh)
    assert (claimed["status"], claimed["processing_attempts"]) == ("processing", 2)


# -- the lease itself -------------------------------------------------------------------


BAD_LEASES: list[Any] = [0, 0.0, -1, -0.5, float("nan"), float("inf"), MAX_LEASE + 1, True, "60"]


@pytest.mark.parametrize("bad", BAD_LEASES, ids=repr)
async def test_lease_seconds_is_validated_before_any_sql(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, bad: Any
) -> None:
    (meeting_id,) = await _create(db, tenant_a, 1)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="lease_seconds"):
            await uow.meetings.claim_pending(limit=5, lease_seconds=bad)
        with pytest.raises(ValidationError, match="lease_seconds"):
            await uow.meetings.start_processing(meeting_id, lease_seconds=bad)
        # Nothing reached the server: the transaction is not aborted.
        still = await uow.meetings.get(meeting_id)
        await uow.commit()
    assert still is not None
    assert still.status == "pending"
    row = await _row(admin, tenant_a, meeting_id)
    assert (row["status"], row["processing_attempts"], row["version"]) == ("pending", 0, 1)


async def test_the_lease_is_the_argument_or_the_setting_from_the_servers_clock(
    db: Database, long_lease_db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    explicit, configured, default, shortest, longest = await _create(db, tenant_a, 5)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(explicit, lease_seconds=600)
        await uow.meetings.start_processing(default)
        await uow.meetings.start_processing(shortest, lease_seconds=0.5)
        await uow.meetings.start_processing(longest, lease_seconds=MAX_LEASE)
        await uow.commit()
    async with long_lease_db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(configured)
        await uow.commit()

    # What is left of each lease by the server's clock: at most the lease, and not much less.
    for meeting_id, seconds in (
        (explicit, 600),
        (configured, 1200),
        (default, 900),
        (longest, MAX_LEASE),
    ):
        left = (await _row(admin, tenant_a, meeting_id))["lease_left"]
        assert seconds - HANG < left <= seconds, (meeting_id, seconds, left)
    assert (await _row(admin, tenant_a, shortest))["lease_left"] <= 0.5


async def test_claim_pending_leases_each_claim_for_the_given_seconds(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    ids = await _create(db, tenant_a, 2)
    async with db.unit_of_work(tenant_a) as uow:
        claimed = await uow.meetings.claim_pending(limit=2, lease_seconds=300)
        await uow.commit()
    assert sorted(m.id for m in claimed) == sorted(ids)
    assert all(m.processing_lease_expires_at is not None for m in claimed)
    for meeting_id in ids:
        left = (await _row(admin, tenant_a, meeting_id))["lease_left"]
        assert 300 - HANG < left <= 300


async def test_an_unexpired_lease_is_not_reclaimed(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    started, claimed = await _create(db, tenant_a, 2)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(started)
        await uow.commit()
    assert await _claim(db, tenant_a, limit=10) == [claimed]
    assert await _claim(db, tenant_a, limit=10) == []
    for meeting_id in (started, claimed):
        row = await _row(admin, tenant_a, meeting_id)
        assert (row["status"], row["processing_attempts"], row["version"]) == ("processing", 1, 2)


async def test_completing_or_failing_clears_the_lease(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    completed, failed = await _create(db, tenant_a, 2)
    async with db.unit_of_work(tenant_a) as uow:
        leased = await uow.meetings.claim_pending(limit=2)
        assert all(m.processing_lease_expires_at is not None for m in leased)
        done = await uow.meetings.complete_processing(completed, summary="Notes")
        gone = await uow.meetings.fail_processing(failed, error="model timed out")
        await uow.commit()
    assert done.processing_lease_expires_at is None
    assert gone.processing_lease_expires_at is None
    for meeting_id in (completed, failed):
        assert (await _row(admin, tenant_a, meeting_id))["processing_lease_expires_at"] is None

    # A failed meeting retried by hand is leased again.
    async with db.unit_of_work(tenant_a) as uow:
        retried = await uow.meetings.start_processing(failed)
        await uow.commit()
    assert retried.processing_lease_expires_at is not None
    assert (await _row(admin, tenant_a, failed))["lease_left"] > 0
