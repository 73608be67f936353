"""The meeting aggregate: one Fathom recording and its way to a CRM note.

Processing moves pending → processing → completed | failed, and failed →
processing for a retry; CRM sync is tracked beside it. ``version`` is bumped
by every status change so a lost update is detected, not silently applied.

A meeting in ``processing`` is leased to the worker that claimed it until
``processing_lease_expires_at`` (set by the database clock, cleared when the
meeting completes or fails); once the lease has passed, another worker may
claim it again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

from sqlalchemy import CheckConstraint, ForeignKeyConstraint, Index, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import Base, SoftDelete, TenantOwned, Timestamps, one_of

MEETING_STATUSES: Final = ("pending", "processing", "completed", "failed")
CRM_SYNC_STATUSES: Final = ("not_synced", "pending", "synced", "failed")


class MeetingSession(TenantOwned, Timestamps, SoftDelete, Base):
    """A recorded meeting received from Fathom."""

    __tablename__ = "meeting_sessions"
    __table_args__ = (
        CheckConstraint(one_of("status", MEETING_STATUSES), name="status"),
        CheckConstraint(one_of("crm_sync_status", CRM_SYNC_STATUSES), name="crm_sync_status"),
        CheckConstraint("duration_seconds >= 0", name="duration_seconds_non_negative"),
        CheckConstraint(
            "processing_attempts >= 0 AND crm_sync_attempts >= 0", name="attempts_non_negative"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="RESTRICT"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "crm_connection_id"],
            ["crm_connections.tenant_id", "crm_connections.id"],
            ondelete="RESTRICT",
        ),
        Index(
            "uq_meeting_sessions_tenant_id_fathom_recording_id_live",
            "tenant_id",
            "fathom_recording_id",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index(
            "ix_meeting_sessions_tenant_id_created_at_live",
            "tenant_id",
            text("created_at DESC"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index(
            "ix_meeting_sessions_tenant_id_user_id_created_at_live",
            "tenant_id",
            "user_id",
            text("created_at DESC"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
        Index(
            "ix_meeting_sessions_tenant_id_created_at_pending",
            "tenant_id",
            "created_at",
            postgresql_where=text("status = 'pending' AND deleted_at IS NULL"),
        ),
        # Expired leases of a tenant, for the reclaim half of claim_pending.
        Index(
            "ix_meeting_sessions_tenant_id_lease_expires_at_processing",
            "tenant_id",
            "processing_lease_expires_at",
            postgresql_where=text("status = 'processing' AND deleted_at IS NULL"),
        ),
    )

    user_id: Mapped[uuid.UUID]
    crm_connection_id: Mapped[uuid.UUID | None]
    fathom_recording_id: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    meeting_url: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    duration_seconds: Mapped[int | None]
    participants: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))

    status: Mapped[str] = mapped_column(Text, server_default="pending")
    summary: Mapped[str | None] = mapped_column(Text)
    action_items: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    ai_output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    processing_error: Mapped[str | None] = mapped_column(Text)
    processing_attempts: Mapped[int] = mapped_column(server_default=text("0"))
    processing_started_at: Mapped[datetime | None]
    processing_lease_expires_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]

    crm_sync_status: Mapped[str] = mapped_column(Text, server_default="not_synced")
    crm_record_id: Mapped[str | None] = mapped_column(Text)
    crm_sync_attempts: Mapped[int] = mapped_column(server_default=text("0"))
    crm_last_error: Mapped[str | None] = mapped_column(Text)
    crm_synced_at: Mapped[datetime | None]

    version: Mapped[int] = mapped_column(server_default=text("1"))

    def __repr__(self) -> str:
        return f"MeetingSession(id={self.id}, status={self.status!r})"
