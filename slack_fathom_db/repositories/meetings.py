"""MeetingRepo: meetings from Fathom, their processing lifecycle and CRM sync.

Processing moves pending → processing → completed | failed, and failed →
processing for a retry. Every transition is one guarded ``UPDATE … WHERE
status IN (…)`` that bumps ``version``; a caller that passes
``expected_version`` gets :class:`Conflict` if someone else changed the
meeting first (a lost update), and :class:`InvalidStateTransition` if the
move is not allowed from the current status.

Claims are leases. :meth:`MeetingRepo.start_processing` and
:meth:`MeetingRepo.claim_pending` set ``processing_lease_expires_at`` to the
database's clock plus the lease (``DATABASE_CLAIM_LEASE_SECONDS`` unless the
call names one); completing or failing the meeting clears it. A meeting whose
lease has passed is claimable again, as if it were pending: the worker that
held it is presumed dead. Every claim counts an attempt, and an expired lease
on a meeting that has used ``DATABASE_MAX_PROCESSING_ATTEMPTS`` attempts is
not claimed again: ``claim_pending`` moves it to ``failed`` instead, saying
why. A worker that outlives its lease and then completes the meeting with
``expected_version`` gets :class:`Conflict` rather than overwriting the work
of the worker that reclaimed it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    DateTime,
    Integer,
    Interval,
    Text,
    Uuid,
    and_,
    bindparam,
    cast,
    func,
    literal,
    or_,
)

from slack_fathom_db import records, validation
from slack_fathom_db.errors import Conflict, InvalidStateTransition, NotFound
from slack_fathom_db.models import MeetingSession
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.models.meetings import CRM_SYNC_STATUSES
from slack_fathom_db.repositories.base import TenantRepository, row_columns

if TYPE_CHECKING:
    import uuid
    from collections.abc import Iterable, Mapping

    from sqlalchemy import ColumnElement


__all__ = ["MeetingRepo"]

_ALLOWED_FROM: Final = {
    "processing": ("pending", "failed"),
    "completed": ("processing",),
    "failed": ("processing",),
}
_MAX_DAYS: Final = 3660
_CREATE_COLUMNS: Final = (
    "user_id",
    "fathom_recording_id",
    "title",
    "crm_connection_id",
    "meeting_url",
    "started_at",
    "duration_seconds",
    "participants",
)
_MAX_LEASE_SECONDS: Final = 7 * 86_400


class MeetingRepo(TenantRepository[MeetingSession]):
    """``uow.meetings``."""

    model = MeetingSession
    span_prefix = "meetings"

    async def create(
        self,
        *,
        user_id: uuid.UUID,
        fathom_recording_id: str,
        title: str,
        crm_connection_id: uuid.UUID | None = None,
        meeting_url: str | None = None,
        started_at: datetime | None = None,
        duration_seconds: int | None = None,
        participants: Iterable[Mapping[str, Any] | str] = (),
    ) -> records.MeetingSession:
        """Record a meeting as ``pending``; a second delivery of the same recording returns it.

        Idempotent on ``fathom_recording_id`` among live meetings, also under
        concurrency: two deliveries racing give one row, and both get it.
        """
        recording = validation.text(
            fathom_recording_id, field="fathom_recording_id", max_length=validation.MAX_NAME
        )
        values = {
            "user_id": validation.uuid_value(user_id, field="user_id"),
            "fathom_recording_id": recording,
            "title": validation.text(title, field="title", max_length=1000),
            "crm_connection_id": validation.optional_uuid(
                crm_connection_id, field="crm_connection_id"
            ),
            "meeting_url": validation.optional_text(
                meeting_url, field="meeting_url", max_length=2048
            ),
            "started_at": validation.aware_datetime(started_at, field="started_at"),
            "duration_seconds": None
            if duration_seconds is None
            else validation.integer(duration_seconds, field="duration_seconds"),
            "participants": validation.json_items(
                participants, field="participants", max_bytes=self._max_json_bytes
            ),
        }
        for _ in range(2):  # a racing delivery rolled back in between: try once more
            created = await self._fetch_records(
                records.MeetingSession,
                "create",
                self._create_statement,
                action="create meeting",
                **values,
            )
            if created:
                return created[0]
            existing = await self.get_by_fathom_id(recording)
            if existing is not None:
                return existing
        raise Conflict("create meeting: the recording is being created concurrently; retry")

    def _create_statement(self) -> Any:
        columns = MeetingSession.__table__.c
        return (
            self._insert(
                MeetingSession,
                **{name: bindparam(name, type_=columns[name].type) for name in _CREATE_COLUMNS},
            )
            .on_conflict_do_nothing(
                index_elements=[MeetingSession.tenant_id, MeetingSession.fathom_recording_id],
                index_where=MeetingSession.deleted_at.is_(None),
            )
            .returning(*row_columns(MeetingSession))
        )

    async def get(self, meeting_id: uuid.UUID) -> records.MeetingSession | None:
        """A live meeting by id."""
        mid = validation.uuid_value(meeting_id, field="meeting_id")
        return await self._fetch_record(
            records.MeetingSession, "get", self._by_id, action="get meeting", meeting_id=mid
        )

    def _by_id(self) -> Any:
        return self._live().where(MeetingSession.id == bindparam("meeting_id", type_=Uuid))

    async def get_by_fathom_id(self, fathom_recording_id: str) -> records.MeetingSession | None:
        """A live meeting by its Fathom recording id."""
        rec = validation.text(
            fathom_recording_id, field="fathom_recording_id", max_length=validation.MAX_NAME
        )
        return await self._fetch_record(
            records.MeetingSession,
            "by_fathom_id",
            self._by_fathom_id,
            action="get meeting",
            rec=rec,
        )

    def _by_fathom_id(self) -> Any:
        return self._live().where(
            MeetingSession.fathom_recording_id == bindparam("rec", type_=Text)
        )

    async def start_processing(
        self,
        meeting_id: uuid.UUID,
        *,
        expected_version: int | None = None,
        lease_seconds: float | None = None,
    ) -> records.MeetingSession:
        """pending or failed → processing; counts an attempt and leases the meeting.

        The lease ends ``lease_seconds`` (default ``DATABASE_CLAIM_LEASE_SECONDS``)
        from now by the database's clock; after that, :meth:`claim_pending` may
        give the meeting to another worker.
        """
        lease_end = self._lease_end(lease_seconds)
        return await self._transition(
            meeting_id,
            "processing",
            expected_version,
            processing_attempts=MeetingSession.processing_attempts + 1,
            processing_started_at=utcnow(),
            processing_lease_expires_at=lease_end,
            processing_error=None,
        )

    async def complete_processing(
        self,
        meeting_id: uuid.UUID,
        *,
        summary: str,
        action_items: Iterable[Mapping[str, Any] | str] = (),
        ai_output: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> records.MeetingSession:
        """processing → completed, with the summary, action items and raw AI output."""
        return await self._transition(
            meeting_id,
            "completed",
            expected_version,
            summary=validation.text(summary, field="summary", max_length=validation.MAX_LONG_TEXT),
            action_items=validation.json_items(
                action_items, field="action_items", max_bytes=self._max_json_bytes
            ),
            ai_output=None
            if ai_output is None
            else validation.json_object(
                ai_output, field="ai_output", max_bytes=self._max_json_bytes
            ),
            processed_at=utcnow(),
            processing_error=None,
            processing_lease_expires_at=None,
        )

    async def fail_processing(
        self, meeting_id: uuid.UUID, *, error: str, expected_version: int | None = None
    ) -> records.MeetingSession:
        """processing → failed, keeping the error; :meth:`start_processing` retries it."""
        return await self._transition(
            meeting_id,
            "failed",
            expected_version,
            processing_error=validation.text(error, field="error", max_length=validation.MAX_TEXT),
            processed_at=utcnow(),
            processing_lease_expires_at=None,
        )

    async def claim_pending(
        self, *, limit: int, lease_seconds: float | None = None
    ) -> list[records.MeetingSession]:
        """Claim up to ``limit`` meetings, oldest first, for this worker and return them.

        Claimable are pending meetings and meetings in processing whose lease
        has expired (their worker is presumed dead). Each claimed meeting moves
        to processing, counts an attempt and is leased for ``lease_seconds``
        (default ``DATABASE_CLAIM_LEASE_SECONDS``) by the database's clock.

        First, up to ``limit`` expired meetings that have already used
        ``DATABASE_MAX_PROCESSING_ATTEMPTS`` attempts are given up on: they move
        to failed, with a ``processing_error`` that says so, and are not
        returned. Then the claim. Two statements, each with ``FOR UPDATE SKIP
        LOCKED``: concurrent workers never claim or give up the same meeting.
        """
        count = validation.list_limit(limit)
        lease_end = self._lease_end(lease_seconds)
        max_attempts = self._settings.max_processing_attempts
        expired = and_(
            MeetingSession.status == "processing",
            MeetingSession.processing_lease_expires_at < func.now(),
        )
        # Plain values only in the SETs (no CASE): Citus refuses functions that are not
        # IMMUTABLE inside CASE, or applied to a column, in an UPDATE of a distributed table.
        abandon = self._update_oldest(
            "exhausted", and_(expired, MeetingSession.processing_attempts >= max_attempts), count
        ).values(
            status="failed",
            processing_error=_abandoned_error(),
            processing_lease_expires_at=None,
            processed_at=func.statement_timestamp(),
            version=MeetingSession.version + 1,
        )
        claim = self._update_oldest(
            "claimable",
            or_(
                MeetingSession.status == "pending",
                and_(expired, MeetingSession.processing_attempts < max_attempts),
            ),
            count,
        ).values(
            status="processing",
            processing_attempts=MeetingSession.processing_attempts + 1,
            processing_started_at=utcnow(),
            processing_lease_expires_at=lease_end,
            processing_error=None,
            version=MeetingSession.version + 1,
        )
        await self._retrying(
            lambda: self._rows(abandon.returning(MeetingSession.id), action="give up meetings"),
            action="give up meetings",
        )
        claimed: list[records.MeetingSession] = await self._retrying(
            lambda: self._all(
                claim.returning(*row_columns(MeetingSession)), action="claim pending meetings"
            ),
            action="claim pending meetings",
        )
        return sorted(claimed, key=lambda meeting: meeting.created_at)

    def _lease_end(self, lease_seconds: float | None) -> ColumnElement[Any]:
        """The end of a lease starting now, by the database's clock (never this process's)."""
        seconds = (
            self._settings.claim_lease_seconds
            if lease_seconds is None
            else validation.positive_number(
                lease_seconds, field="lease_seconds", maximum=_MAX_LEASE_SECONDS
            )
        )
        return func.statement_timestamp() + literal(timedelta(seconds=seconds), Interval())

    async def record_crm_sync(
        self,
        meeting_id: uuid.UUID,
        *,
        status: str,
        crm_record_id: str | None = None,
        error: str | None = None,
    ) -> records.MeetingSession:
        """Record a CRM sync attempt of a completed meeting.

        ``synced`` needs ``crm_record_id`` and ``failed`` needs ``error``; both
        count an attempt. ``pending`` marks the meeting as queued for sync.
        """
        sync_status = validation.choice(
            status, field="status", allowed=[s for s in CRM_SYNC_STATUSES if s != "not_synced"]
        )
        values: dict[str, Any] = {"crm_sync_status": sync_status}
        if sync_status == "synced":
            values["crm_record_id"] = validation.text(
                crm_record_id, field="crm_record_id", max_length=validation.MAX_NAME
            )
            values["crm_synced_at"] = utcnow()
            values["crm_last_error"] = None
        elif sync_status == "failed":
            values["crm_last_error"] = validation.text(error, field="error")
        if sync_status != "pending":
            values["crm_sync_attempts"] = MeetingSession.crm_sync_attempts + 1
        mid = validation.uuid_value(meeting_id, field="meeting_id")
        statement = (
            self._update()
            .where(
                MeetingSession.id == mid,
                MeetingSession.deleted_at.is_(None),
                MeetingSession.status == "completed",
            )
            .values(**values, version=MeetingSession.version + 1)
            .returning(*row_columns(MeetingSession))
        )
        meeting: records.MeetingSession | None = await self._one_or_none(
            statement, action="record CRM sync"
        )
        if meeting is None:
            current = await self.get(mid)
            if current is None:
                raise NotFound("record CRM sync: no live meeting with that id")
            raise InvalidStateTransition(
                f"record CRM sync: the meeting is {current.status}; only completed meetings sync"
            )
        return meeting

    async def for_user(
        self, user_id: uuid.UUID, *, days: int = 30, limit: int = 50
    ) -> list[records.MeetingSession]:
        """A user's live meetings of the last ``days`` days, newest first."""
        uid = validation.uuid_value(user_id, field="user_id")
        return await self._fetch_records(
            records.MeetingSession,
            "for_user",
            self._for_user_statement,
            action="list a user's meetings",
            user_id=uid,
            **_page(days, limit),
        )

    async def recent(self, *, days: int = 30, limit: int = 50) -> list[records.MeetingSession]:
        """The tenant's live meetings of the last ``days`` days, newest first."""
        return await self._fetch_records(
            records.MeetingSession,
            "recent",
            self._recent_statement,
            action="list recent meetings",
            **_page(days, limit),
        )

    async def soft_delete(self, meeting_id: uuid.UUID) -> None:
        """Soft-delete a meeting; its recording id may then be delivered again."""
        mid = validation.uuid_value(meeting_id, field="meeting_id")
        await self._soft_delete(MeetingSession, mid, action="delete meeting")

    def _recent_statement(self) -> Any:
        return (
            self._live()
            .where(MeetingSession.created_at >= bindparam("since", type_=DateTime(timezone=True)))
            .order_by(MeetingSession.created_at.desc())
            .limit(bindparam("limit", type_=Integer))
        )

    def _for_user_statement(self) -> Any:
        return self._recent_statement().where(
            MeetingSession.user_id == bindparam("user_id", type_=Uuid)
        )

    async def _transition(
        self,
        meeting_id: uuid.UUID,
        target: str,
        expected_version: int | None,
        **values: Any,
    ) -> records.MeetingSession:
        mid = validation.uuid_value(meeting_id, field="meeting_id")
        allowed = _ALLOWED_FROM[target]
        statement = self._update().where(
            MeetingSession.id == mid,
            MeetingSession.deleted_at.is_(None),
            MeetingSession.status.in_(allowed),
        )
        if expected_version is not None:
            version = validation.integer(expected_version, field="expected_version", minimum=1)
            statement = statement.where(MeetingSession.version == version)
        statement = statement.values(
            status=target, version=MeetingSession.version + 1, **values
        ).returning(*row_columns(MeetingSession))
        meeting: records.MeetingSession | None = await self._one_or_none(
            statement, action=f"move meeting to {target}"
        )
        if meeting is not None:
            return meeting
        current = await self.get(mid)
        if current is None:
            raise NotFound(f"move meeting to {target}: no live meeting with that id")
        if expected_version is not None and current.version != expected_version:
            raise Conflict(
                f"move meeting to {target}: the meeting changed concurrently "
                f"(version {current.version}, expected {expected_version}); reload and retry"
            )
        raise InvalidStateTransition(
            f"move meeting to {target}: not allowed from {current.status} "
            f"(allowed from {', '.join(allowed)})"
        )


def _page(days: int, limit: int) -> dict[str, Any]:
    """The ``since`` and ``limit`` parameters of a recency listing, validated."""
    window = validation.integer(days, field="days", minimum=1, maximum=_MAX_DAYS)
    return {
        "since": utcnow() - timedelta(days=window),
        "limit": validation.list_limit(limit),
    }


def _abandoned_error() -> ColumnElement[str]:
    """``processing_error`` of a meeting given up on, naming its attempts (immutable SQL)."""
    return (
        literal("abandoned after ", Text)
        + cast(MeetingSession.processing_attempts, Text)
        + literal(" attempts: the lease of its last claim expired", Text)
    )
