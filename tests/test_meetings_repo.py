"""MeetingRepo: creation, idempotency, the processing lifecycle, CRM sync and listings.

Every test commits for real and reads back in a fresh unit of work; timestamps
that must differ are set explicitly through the superuser ``admin`` connection.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from slack_fathom_db import Database, TenantId
from slack_fathom_db.errors import (
    Conflict,
    InvalidStateTransition,
    NotFound,
    SlackFathomDBError,
    ValidationError,
)
from slack_fathom_db.records import MeetingSession, User
from tests.helpers import add_user, unique_user_id


async def _meeting(
    db: Database, tenant: TenantId, user: User, rec: str | None = None
) -> MeetingSession:
    async with db.unit_of_work(tenant) as uow:
        meeting = await uow.meetings.create(
            user_id=user.id,
            fathom_recording_id=rec or f"rec-{uuid.uuid4().hex[:12]}",
            title="Weekly sync",
        )
        await uow.commit()
    return meeting


async def _set_created_at(
    admin: asyncpg.Connection, tenant: TenantId, meeting_id: uuid.UUID, when: datetime
) -> None:
    status = await admin.execute(
        "UPDATE meeting_sessions SET created_at = $3 WHERE tenant_id = $1 AND id = $2",
        tenant,
        meeting_id,
        when,
    )
    assert status == "UPDATE 1"


async def _count(admin: asyncpg.Connection, tenant: TenantId, rec: str) -> int:
    value = await admin.fetchval(
        "SELECT count(*) FROM meeting_sessions WHERE tenant_id = $1 AND fathom_recording_id = $2",
        tenant,
        rec,
    )
    assert isinstance(value, int)
    return value


# -- create -----------------------------------------------------------------------------


async def test_create_round_trips_every_field(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    async with db.unit_of_work(tenant_a) as uow:
        crm = await uow.tenants.connect_crm(
            provider_type="hubspot", credentials_secret_id="vault:crm/hubspot"
        )
        await uow.commit()
    started = datetime(2026, 3, 4, 15, 30, 12, 123456, tzinfo=timezone(timedelta(hours=2)))
    participants = [
        {"name": "Ann Example", "email": "ann@example.com", "is_host": True},
        {"name": "Bob Ünïcode", "email": "bob@acme.com", "is_host": False, "tags": ["x", 1]},
    ]
    async with db.unit_of_work(tenant_a) as uow:
        created = await uow.meetings.create(
            user_id=user.id,
            fathom_recording_id="rec-all-fields",
            title="Discovery call — Acme",
            crm_connection_id=crm.id,
            meeting_url="https://fathom.video/calls/123?x=1",
            started_at=started,
            duration_seconds=3725,
            participants=participants,
        )
        await uow.commit()
    assert created.status == "pending"
    assert created.version == 1
    assert created.processing_attempts == 0
    assert created.crm_sync_status == "not_synced"
    assert created.crm_sync_attempts == 0
    assert created.processing_lease_expires_at is None

    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(created.id)
    assert stored is not None
    assert stored.id == created.id
    assert stored.tenant_id == tenant_a
    assert stored.user_id == user.id
    assert stored.crm_connection_id == crm.id
    assert stored.fathom_recording_id == "rec-all-fields"
    assert stored.title == "Discovery call — Acme"
    assert stored.meeting_url == "https://fathom.video/calls/123?x=1"
    assert stored.started_at == started
    assert stored.started_at.tzinfo is not None
    assert stored.started_at.utcoffset() is not None
    assert stored.started_at.astimezone(UTC) == datetime(2026, 3, 4, 13, 30, 12, 123456, UTC)
    assert stored.duration_seconds == 3725
    assert stored.participants == participants
    assert stored.status == "pending"
    assert stored.summary is None
    assert stored.action_items == []
    assert stored.ai_output is None
    assert stored.deleted_at is None


async def test_create_defaults(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    async with db.unit_of_work(tenant_a) as uow:
        created = await uow.meetings.create(
            user_id=user.id, fathom_recording_id="rec-minimal", title="Minimal"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(created.id)
    assert stored is not None
    assert stored.crm_connection_id is None
    assert stored.meeting_url is None
    assert stored.started_at is None
    assert stored.duration_seconds is None
    assert stored.participants == []


async def test_create_rejects_naive_started_at(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="started_at"):
            await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id="rec-naive",
                title="Naive",
                started_at=datetime(2026, 1, 1, 12, 0),  # naive on purpose
            )
        await uow.commit()
    assert await _count(admin, tenant_a, "rec-naive") == 0


async def test_create_rejects_negative_duration(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="duration_seconds"):
            await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id="rec-negative",
                title="Negative",
                duration_seconds=-1,
            )
        await uow.commit()
    assert await _count(admin, tenant_a, "rec-negative") == 0


async def test_create_rejects_nul_in_title_and_writes_nothing(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="title"):
            await uow.meetings.create(
                user_id=user.id, fathom_recording_id="rec-nul", title="bad\x00title"
            )
        # The unit of work is still usable, and committing it writes nothing.
        assert await uow.meetings.get_by_fathom_id("rec-nul") is None
        await uow.commit()
    assert await _count(admin, tenant_a, "rec-nul") == 0
    total = await admin.fetchval(
        "SELECT count(*) FROM meeting_sessions WHERE tenant_id = $1", tenant_a
    )
    assert total == 0


async def test_create_rejects_unknown_user(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.meetings.create(
                user_id=uuid.uuid4(), fathom_recording_id="rec-nouser", title="Nobody"
            )


async def test_commit_after_a_database_error_does_not_pretend_to_succeed(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    """A write the database refused aborts the transaction; commit() must not report success.

    PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK. Either
    the unit of work raises at commit, or what it wrote before is really kept.
    """
    slack_id = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_id)
        with pytest.raises(NotFound):
            await uow.meetings.create(
                user_id=uuid.uuid4(), fathom_recording_id="rec-aborted", title="Nobody"
            )
        try:
            await uow.commit()
        except SlackFathomDBError:
            reported_committed = False
        else:
            reported_committed = True
    written = await admin.fetchval(
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant_a,
        slack_id,
    )
    assert reported_committed == (written == 1), (
        f"commit() {'returned' if reported_committed else 'raised'} but {written} rows were kept"
    )


async def test_create_is_idempotent_on_fathom_recording_id(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    first = await _meeting(db, tenant_a, user, "rec-twice")
    second = await _meeting(db, tenant_a, user, "rec-twice")
    assert second.id == first.id
    async with db.unit_of_work(tenant_a) as uow:
        # twice in the same transaction, too
        again = await uow.meetings.create(
            user_id=user.id, fathom_recording_id="rec-twice", title="Weekly sync"
        )
        await uow.commit()
    assert again.id == first.id
    assert await _count(admin, tenant_a, "rec-twice") == 1


async def test_same_recording_id_in_two_tenants_gives_two_rows(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    in_a = await _meeting(
        db, tenant_a, await add_user(db, tenant_a, display_name="Ann"), "rec-shared"
    )
    in_b = await _meeting(
        db, tenant_b, await add_user(db, tenant_b, display_name="Ann"), "rec-shared"
    )
    assert in_a.id != in_b.id
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.meetings.get_by_fathom_id("rec-shared")
        assert await uow.meetings.get(in_b.id) is None
    assert found is not None
    assert found.id == in_a.id


async def test_create_after_soft_delete_gives_a_new_row(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    first = await _meeting(db, tenant_a, user, "rec-again")
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.soft_delete(first.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.meetings.get(first.id) is None
        assert await uow.meetings.get_by_fathom_id("rec-again") is None
    second = await _meeting(db, tenant_a, user, "rec-again")
    assert second.id != first.id
    assert second.status == "pending"
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.meetings.get_by_fathom_id("rec-again")
        assert await uow.meetings.get(first.id) is None
    assert found is not None
    assert found.id == second.id
    assert await _count(admin, tenant_a, "rec-again") == 2
    live = await admin.fetchval(
        "SELECT count(*) FROM meeting_sessions "
        "WHERE tenant_id = $1 AND fathom_recording_id = $2 AND deleted_at IS NULL",
        tenant_a,
        "rec-again",
    )
    assert live == 1


async def test_soft_delete_unknown_or_deleted_meeting_is_not_found(
    db: Database, tenant_a: TenantId
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.soft_delete(meeting.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.meetings.soft_delete(meeting.id)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.meetings.soft_delete(uuid.uuid4())


# -- reads ------------------------------------------------------------------------------


async def test_get_and_get_by_fathom_id(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user, "rec-read")
    async with db.unit_of_work(tenant_a) as uow:
        by_id = await uow.meetings.get(meeting.id)
        by_rec = await uow.meetings.get_by_fathom_id("rec-read")
        assert await uow.meetings.get(uuid.uuid4()) is None
        assert await uow.meetings.get_by_fathom_id("rec-unknown") is None
        by_str = await uow.meetings.get(str(meeting.id))  # type: ignore[arg-type]
    assert by_id is not None
    assert by_rec is not None
    assert by_str is not None
    assert by_id.id == by_rec.id == by_str.id == meeting.id
    # readable after the unit of work ended
    assert by_id.title == "Weekly sync"


async def test_get_rejects_malformed_id(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="meeting_id"):
            await uow.meetings.get("not-a-uuid")  # type: ignore[arg-type]


# -- processing lifecycle ---------------------------------------------------------------


async def test_lifecycle_pending_processing_completed(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    assert meeting.version == 1
    async with db.unit_of_work(tenant_a) as uow:
        processing = await uow.meetings.start_processing(meeting.id)
        await uow.commit()
    assert processing.status == "processing"
    assert processing.processing_attempts == 1
    assert processing.processing_started_at is not None
    assert processing.processing_lease_expires_at is not None
    assert processing.version == 2

    ai_output = {"model": "m-1", "tokens": {"in": 1200, "out": 310}, "topics": ["pricing"]}
    items: list[dict[str, str] | str] = [
        {"text": "Send the proposal", "owner": "ann@example.com"},
        "Book a follow-up",
    ]
    async with db.unit_of_work(tenant_a) as uow:
        completed = await uow.meetings.complete_processing(
            meeting.id, summary="We agreed on a pilot.", action_items=items, ai_output=ai_output
        )
        await uow.commit()
    assert completed.status == "completed"
    assert completed.version == 3

    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.status == "completed"
    assert stored.summary == "We agreed on a pilot."
    assert stored.action_items == items
    assert stored.ai_output == ai_output
    assert stored.processing_attempts == 1
    assert stored.processing_error is None
    assert stored.processed_at is not None
    assert stored.processing_lease_expires_at is None
    assert stored.version == 3


async def test_pending_to_completed_directly_is_invalid(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.complete_processing(meeting.id, summary="too early")
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.fail_processing(meeting.id, error="too early")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.status == "pending"
    assert stored.summary is None
    assert stored.version == 1


async def test_fail_then_retry(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(meeting.id)
        failed = await uow.meetings.fail_processing(meeting.id, error="LLM timeout after 30s")
        await uow.commit()
    assert failed.status == "failed"
    assert failed.processing_lease_expires_at is None
    assert failed.version == 3

    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.status == "failed"
    assert stored.processing_error == "LLM timeout after 30s"
    assert stored.processing_attempts == 1

    async with db.unit_of_work(tenant_a) as uow:
        retried = await uow.meetings.start_processing(meeting.id)
        await uow.commit()
    assert retried.status == "processing"
    assert retried.processing_attempts == 2
    assert retried.processing_lease_expires_at is not None
    assert retried.version == 4

    async with db.unit_of_work(tenant_a) as uow:
        done = await uow.meetings.complete_processing(meeting.id, summary="Second time lucky")
        await uow.commit()
    assert done.status == "completed"
    assert done.processing_attempts == 2
    assert done.processing_error is None
    assert done.version == 5


async def test_completed_cannot_go_back_to_processing(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(meeting.id)
        await uow.meetings.complete_processing(meeting.id, summary="Done")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.start_processing(meeting.id)
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.fail_processing(meeting.id, error="late")
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.complete_processing(meeting.id, summary="again")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.status == "completed"
    assert stored.summary == "Done"
    assert stored.processing_attempts == 1
    assert stored.version == 3


async def test_processing_to_processing_is_invalid(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(meeting.id)
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.start_processing(meeting.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.processing_attempts == 1
    assert stored.version == 2


async def test_expected_version_detects_lost_update(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    meeting = await _meeting(db, tenant_a, user)
    async with db.unit_of_work(tenant_a) as uow:
        started = await uow.meetings.start_processing(meeting.id, expected_version=1)
        await uow.commit()
    assert started.version == 2
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(Conflict):
            await uow.meetings.complete_processing(meeting.id, summary="stale", expected_version=1)
        with pytest.raises(Conflict):
            await uow.meetings.fail_processing(meeting.id, error="stale", expected_version=7)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
        assert stored is not None
        assert stored.status == "processing"
        assert stored.summary is None
        assert stored.version == 2
        done = await uow.meetings.complete_processing(
            meeting.id, summary="fresh", expected_version=2
        )
        await uow.commit()
    assert done.status == "completed"
    assert done.version == 3


async def test_transitions_of_unknown_meeting_are_not_found(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    other = await _meeting(db, tenant_b, await add_user(db, tenant_b, display_name="Ann"))
    deleted = await _meeting(db, tenant_a, await add_user(db, tenant_a, display_name="Ann"))
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.soft_delete(deleted.id)
        await uow.commit()
    for meeting_id in (uuid.uuid4(), other.id, deleted.id):
        async with db.unit_of_work(tenant_a) as uow:
            with pytest.raises(NotFound):
                await uow.meetings.start_processing(meeting_id)
            with pytest.raises(NotFound):
                await uow.meetings.complete_processing(meeting_id, summary="x")
            with pytest.raises(NotFound):
                await uow.meetings.fail_processing(meeting_id, error="x")
            with pytest.raises(NotFound):
                await uow.meetings.record_crm_sync(meeting_id, status="synced", crm_record_id="r")
    # the other tenant's meeting is untouched
    async with db.unit_of_work(tenant_b) as uow:
        stored = await uow.meetings.get(other.id)
    assert stored is not None
    assert stored.status == "pending"
    assert stored.version == 1


# -- CRM sync ---------------------------------------------------------------------------


async def _completed(db: Database, tenant: TenantId) -> MeetingSession:
    meeting = await _meeting(db, tenant, await add_user(db, tenant, display_name="Ann"))
    async with db.unit_of_work(tenant) as uow:
        await uow.meetings.start_processing(meeting.id)
        done = await uow.meetings.complete_processing(meeting.id, summary="Summary")
        await uow.commit()
    return done


async def test_record_crm_sync_failed_then_synced(db: Database, tenant_a: TenantId) -> None:
    meeting = await _completed(db, tenant_a)
    assert meeting.version == 3
    async with db.unit_of_work(tenant_a) as uow:
        failed = await uow.meetings.record_crm_sync(
            meeting.id, status="failed", error="HubSpot 502"
        )
        await uow.commit()
    assert failed.crm_sync_status == "failed"
    assert failed.crm_sync_attempts == 1
    assert failed.crm_last_error == "HubSpot 502"
    assert failed.crm_synced_at is None
    assert failed.crm_record_id is None
    assert failed.version == 4

    async with db.unit_of_work(tenant_a) as uow:
        again = await uow.meetings.record_crm_sync(meeting.id, status="failed", error="HubSpot 429")
        await uow.commit()
    assert again.crm_sync_attempts == 2
    assert again.crm_last_error == "HubSpot 429"

    async with db.unit_of_work(tenant_a) as uow:
        synced = await uow.meetings.record_crm_sync(
            meeting.id, status="synced", crm_record_id="note-987"
        )
        await uow.commit()
    assert synced.version == 6

    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.crm_sync_status == "synced"
    assert stored.crm_record_id == "note-987"
    assert stored.crm_sync_attempts == 3
    assert stored.crm_synced_at is not None
    assert stored.crm_last_error is None
    assert stored.status == "completed"


async def test_record_crm_sync_synced_first_time(db: Database, tenant_a: TenantId) -> None:
    meeting = await _completed(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.record_crm_sync(meeting.id, status="synced", crm_record_id="rec-1")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.crm_sync_status == "synced"
    assert stored.crm_record_id == "rec-1"
    assert stored.crm_sync_attempts == 1
    assert stored.crm_synced_at is not None


async def test_record_crm_sync_requires_completed_meeting(db: Database, tenant_a: TenantId) -> None:
    meeting = await _meeting(db, tenant_a, await add_user(db, tenant_a, display_name="Ann"))
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.record_crm_sync(meeting.id, status="synced", crm_record_id="r-1")
        await uow.meetings.start_processing(meeting.id)
        with pytest.raises(InvalidStateTransition):
            await uow.meetings.record_crm_sync(meeting.id, status="failed", error="nope")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.crm_sync_status == "not_synced"
    assert stored.crm_sync_attempts == 0
    assert stored.crm_record_id is None


async def test_record_crm_sync_validation(db: Database, tenant_a: TenantId) -> None:
    meeting = await _completed(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="crm_record_id"):
            await uow.meetings.record_crm_sync(meeting.id, status="synced")
        with pytest.raises(ValidationError):
            await uow.meetings.record_crm_sync(meeting.id, status="failed")
        with pytest.raises(ValidationError, match="status"):
            await uow.meetings.record_crm_sync(meeting.id, status="done", crm_record_id="r")
        with pytest.raises(ValidationError, match="status"):
            await uow.meetings.record_crm_sync(meeting.id, status="not_synced")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.crm_sync_status == "not_synced"
    assert stored.crm_sync_attempts == 0
    assert stored.version == 3


# -- listings ---------------------------------------------------------------------------


async def test_for_user_and_recent_order_window_limit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    ann = await add_user(db, tenant_a, display_name="Ann")
    bob = await add_user(db, tenant_a, display_name="Ann")
    now = datetime.now(UTC)
    ages = {"a1": 1, "a5": 5, "a20": 20, "a45": 45, "b2": 2, "b10": 10, "gone": 3}
    ids: dict[str, uuid.UUID] = {}
    for name, hours_or_days in ages.items():
        owner = bob if name.startswith("b") else ann
        meeting = await _meeting(db, tenant_a, owner, f"rec-{name}")
        ids[name] = meeting.id
        # a1/a5/b2 are hours old, the rest days old
        age = (
            timedelta(hours=hours_or_days)
            if name in {"a1", "a5", "b2"}
            else timedelta(days=hours_or_days)
        )
        await _set_created_at(admin, tenant_a, meeting.id, now - age)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.soft_delete(ids["gone"])
        await uow.commit()
    by_id = {value: key for key, value in ids.items()}

    async with db.unit_of_work(tenant_a) as uow:
        ann_30 = await uow.meetings.for_user(ann.id)
        ann_60 = await uow.meetings.for_user(ann.id, days=60)
        ann_7 = await uow.meetings.for_user(ann.id, days=7)
        ann_limited = await uow.meetings.for_user(ann.id, days=60, limit=2)
        bob_30 = await uow.meetings.for_user(bob.id)
        recent_30 = await uow.meetings.recent()
        recent_60 = await uow.meetings.recent(days=60)
        recent_1 = await uow.meetings.recent(days=1)
        recent_limited = await uow.meetings.recent(days=60, limit=3)
        nobody = await uow.meetings.for_user(uuid.uuid4())

    def names(meetings: list[MeetingSession]) -> list[str]:
        return [by_id[m.id] for m in meetings]

    assert names(ann_30) == ["a1", "a5", "a20"]
    assert names(ann_60) == ["a1", "a5", "a20", "a45"]
    assert names(ann_7) == ["a1", "a5"]
    assert names(ann_limited) == ["a1", "a5"]
    assert names(bob_30) == ["b2", "b10"]
    assert names(recent_30) == ["a1", "b2", "a5", "b10", "a20"]
    assert names(recent_60) == ["a1", "b2", "a5", "b10", "a20", "a45"]
    assert names(recent_1) == ["a1", "b2", "a5"]
    assert names(recent_limited) == ["a1", "b2", "a5"]
    assert nobody == []


async def test_listings_exclude_other_tenants(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    mine = await _meeting(db, tenant_a, await add_user(db, tenant_a, display_name="Ann"))
    await _meeting(db, tenant_b, await add_user(db, tenant_b, display_name="Ann"))
    async with db.unit_of_work(tenant_a) as uow:
        recent = await uow.meetings.recent()
    assert [m.id for m in recent] == [mine.id]


async def test_listing_arguments_are_validated(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="days"):
            await uow.meetings.recent(days=0)
        with pytest.raises(ValidationError, match="limit"):
            await uow.meetings.recent(limit=0)
        with pytest.raises(ValidationError, match="limit"):
            await uow.meetings.for_user(uuid.uuid4(), limit=-5)
        with pytest.raises(ValidationError, match="limit"):
            await uow.meetings.claim_pending(limit=0)


# -- claim_pending ----------------------------------------------------------------------


async def test_claim_pending_oldest_first_with_limit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    user = await add_user(db, tenant_a, display_name="Ann")
    now = datetime.now(UTC)
    created: dict[str, uuid.UUID] = {}
    for name, minutes in (("new", 1), ("old", 30), ("mid", 10), ("oldest", 60)):
        meeting = await _meeting(db, tenant_a, user, f"rec-{name}")
        created[name] = meeting.id
        await _set_created_at(admin, tenant_a, meeting.id, now - timedelta(minutes=minutes))
    # one that is no longer pending, and one soft-deleted: never claimed
    busy = await _meeting(db, tenant_a, user, "rec-busy")
    gone = await _meeting(db, tenant_a, user, "rec-gone")
    for meeting_id in (busy.id, gone.id):
        await _set_created_at(admin, tenant_a, meeting_id, now - timedelta(days=1))
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.start_processing(busy.id)
        await uow.meetings.soft_delete(gone.id)
        await uow.commit()
    by_id = {value: key for key, value in created.items()}

    async with db.unit_of_work(tenant_a) as uow:
        first = await uow.meetings.claim_pending(limit=2)
        await uow.commit()
    assert [by_id[m.id] for m in first] == ["oldest", "old"]
    assert all(m.status == "processing" for m in first)
    assert all(m.processing_attempts == 1 for m in first)
    assert all(m.version == 2 for m in first)
    assert all(m.processing_started_at is not None for m in first)
    assert all(m.processing_lease_expires_at is not None for m in first)

    async with db.unit_of_work(tenant_a) as uow:
        second = await uow.meetings.claim_pending(limit=10)
        third = await uow.meetings.claim_pending(limit=10)
        await uow.commit()
    assert [by_id[m.id] for m in second] == ["mid", "new"]
    assert third == []

    async with db.unit_of_work(tenant_a) as uow:
        stored = {name: await uow.meetings.get(mid) for name, mid in created.items()}
        busy_now = await uow.meetings.get(busy.id)
    assert all(m is not None and m.status == "processing" for m in stored.values())
    assert busy_now is not None
    assert busy_now.processing_attempts == 1  # its lease has not expired: not claimed again
    deleted = await admin.fetchrow(
        "SELECT status, deleted_at FROM meeting_sessions WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        gone.id,
    )
    assert deleted is not None
    assert deleted["status"] == "pending"
    assert deleted["deleted_at"] is not None


async def test_claim_pending_is_tenant_scoped(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    other = await _meeting(db, tenant_b, await add_user(db, tenant_b, display_name="Ann"))
    async with db.unit_of_work(tenant_a) as uow:
        claimed = await uow.meetings.claim_pending(limit=100)
        await uow.commit()
    assert claimed == []
    async with db.unit_of_work(tenant_b) as uow:
        stored = await uow.meetings.get(other.id)
    assert stored is not None
    assert stored.status == "pending"


async def test_claimed_rollback_leaves_meeting_pending(db: Database, tenant_a: TenantId) -> None:
    meeting = await _meeting(db, tenant_a, await add_user(db, tenant_a, display_name="Ann"))
    async with db.unit_of_work(tenant_a) as uow:
        claimed = await uow.meetings.claim_pending(limit=5)
        assert [m.id for m in claimed] == [meeting.id]
        await uow.rollback()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get(meeting.id)
    assert stored is not None
    assert stored.status == "pending"
    assert stored.processing_attempts == 0
