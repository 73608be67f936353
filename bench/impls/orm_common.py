"""Statements and objects shared by the two ORM baselines (what an ORM team writes first)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Select, TextClause, select, text

from bench.impls.base import (
    RECENT_DAYS,
    RECENT_LIMIT,
    SLACK_CLIENT_ID,
    TOKEN_KEYS,
    day_start,
    since,
)
from slack_fathom_db.models import ApiRateLimit, AuditLog, MeetingSession, Tenant, User
from slack_fathom_db.tokens import TokenCipher, parse_keys

if TYPE_CHECKING:
    import uuid

PERIOD: Final = "daily"
FIND_INSTALLATION: Final = text(
    "SELECT * FROM sfdb_find_slack_installation(:client_id, :key, :enterprise_id, :team_id, "
    ":user_id)"
)
"""The layer store's statement: the installation is an owner's function, not a mapped query."""


def cipher() -> TokenCipher:
    """A cipher of the run's token key, as the layer's store builds from its settings."""
    return TokenCipher(parse_keys(TOKEN_KEYS))


def find_installation(slack_team_id: str) -> tuple[TextClause, dict[str, str | None]]:
    """The lookup of a workspace install (the tenant key is the team id) and its parameters."""
    return FIND_INSTALLATION, {
        "client_id": SLACK_CLIENT_ID,
        "key": slack_team_id,
        "enterprise_id": None,
        "team_id": slack_team_id,
        "user_id": None,
    }


def resolve(slack_team_id: str) -> Select[Any]:
    """The tenant of a Slack team (as the owner role, outside any tenant context)."""
    return select(Tenant.id).where(
        Tenant.slack_team_id == slack_team_id, Tenant.deleted_at.is_(None)
    )


def user_by_slack_id(tenant_id: uuid.UUID, slack_user_id: str) -> Select[Any]:
    """A live user by Slack id."""
    return select(User).where(
        User.tenant_id == tenant_id,
        User.slack_user_id == slack_user_id,
        User.deleted_at.is_(None),
    )


def recent(tenant_id: uuid.UUID, user_id: uuid.UUID | None = None) -> Select[Any]:
    """Live meetings of the last 30 days, newest first, 50 at most (of one user if given)."""
    statement = select(MeetingSession).where(
        MeetingSession.tenant_id == tenant_id,
        MeetingSession.deleted_at.is_(None),
        MeetingSession.created_at >= since(RECENT_DAYS),
    )
    if user_id is not None:
        statement = statement.where(MeetingSession.user_id == user_id)
    return statement.order_by(MeetingSession.created_at.desc()).limit(RECENT_LIMIT)


def rate_key(tenant_id: uuid.UUID, resource: str) -> tuple[uuid.UUID, str, str, datetime]:
    """The primary key of today's counter row."""
    return (tenant_id, resource, PERIOD, day_start())


def new_counter(key: tuple[uuid.UUID, str, str, datetime]) -> ApiRateLimit:
    """The first charge of a window."""
    return ApiRateLimit(
        tenant_id=key[0], resource_type=key[1], period=key[2], window_start=key[3], request_count=1
    )


def spend(counter: ApiRateLimit, limit: int) -> bool:
    """Read-modify-write on a row locked with SELECT … FOR UPDATE."""
    if counter.request_count + 1 > limit:
        return False
    counter.request_count += 1
    counter.updated_at = datetime.now(UTC)
    return True


def new_meeting(
    tenant_id: uuid.UUID, user_id: uuid.UUID, fathom_recording_id: str, title: str
) -> MeetingSession:
    """A meeting as received from Fathom."""
    return MeetingSession(
        tenant_id=tenant_id,
        user_id=user_id,
        fathom_recording_id=fathom_recording_id,
        title=title,
    )


def meeting_created(tenant_id: uuid.UUID, user_id: uuid.UUID, meeting_id: uuid.UUID) -> AuditLog:
    """The handler's audit event."""
    return AuditLog(
        tenant_id=tenant_id,
        event_type="meeting.created",
        event_category="data",
        action_description="Meeting received from Fathom",
        resource_type="meeting_session",
        resource_id=str(meeting_id),
        user_id=user_id,
    )


def denied(tenant_id: uuid.UUID, user_id: uuid.UUID) -> AuditLog:
    """The audit-burst event."""
    return AuditLog(
        tenant_id=tenant_id,
        event_type="security.denied",
        event_category="security",
        action_description="Request refused",
        status="denied",
        user_id=user_id,
        resource_type="slack_event",
    )
