"""AuditRepo: append-only audit events of one workspace.

There is no update or delete here, and the database refuses both anyway
(grants and a trigger). Events written inside a unit of work are kept only if
it commits; :meth:`slack_fathom_db.Database.log_security_event` writes one in
its own short transaction when it must survive the caller's rollback.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, Required, TypedDict, Unpack

from sqlalchemy import DateTime, Integer, Text, bindparam

from slack_fathom_db import records, validation
from slack_fathom_db.models import AuditLog
from slack_fathom_db.models.audit import EVENT_CATEGORIES, EVENT_STATUSES
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.repositories.base import TenantRepository, row_columns

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address

__all__ = ["AuditRepo", "EventFields", "audit_values"]


class EventFields(TypedDict, total=False):
    """The fields of one audit event, as ``log_event`` takes them (keyword arguments)."""

    event_type: Required[str]
    """Dotted name of what happened, e.g. ``meeting.created``."""
    event_category: Required[str]
    action_description: Required[str]
    status: str
    """``success`` unless given (``denied`` for ``Database.log_security_event``)."""
    user_id: uuid.UUID | None
    resource_type: str | None
    resource_id: uuid.UUID | str | None
    ip_address: str | IPv4Address | IPv6Address | None
    user_agent: str | None
    metadata: dict[str, Any] | None


_COLUMNS: Final = {  # attribute -> column, of what audit_values() returns
    "event_type": "event_type",
    "event_category": "event_category",
    "action_description": "action_description",
    "status": "status",
    "user_id": "user_id",
    "resource_type": "resource_type",
    "resource_id": "resource_id",
    "ip_address": "ip_address",
    "user_agent": "user_agent",
    "event_metadata": "metadata",
}


def audit_values(fields: EventFields, *, max_json_bytes: int) -> dict[str, Any]:
    """The validated column values of one audit event (by attribute name)."""
    resource_id = fields.get("resource_id")
    metadata = fields.get("metadata")
    return {
        "event_type": validation.resource_name(fields["event_type"], field="event_type"),
        "event_category": validation.choice(
            fields["event_category"], field="event_category", allowed=EVENT_CATEGORIES
        ),
        "action_description": validation.text(
            fields["action_description"], field="action_description", max_length=2000
        ),
        "status": validation.choice(
            fields.get("status", "success"), field="status", allowed=EVENT_STATUSES
        ),
        "user_id": validation.optional_uuid(fields.get("user_id"), field="user_id"),
        "resource_type": validation.optional_text(
            fields.get("resource_type"), field="resource_type", max_length=64
        ),
        "resource_id": None
        if resource_id is None
        else str(resource_id)
        if isinstance(resource_id, uuid.UUID)
        else validation.text(resource_id, field="resource_id", max_length=validation.MAX_NAME),
        "ip_address": validation.ip_address(fields.get("ip_address")),
        "user_agent": validation.optional_text(
            fields.get("user_agent"), field="user_agent", max_length=1000
        ),
        "event_metadata": {}
        if metadata is None
        else validation.json_object(metadata, field="metadata", max_bytes=max_json_bytes),
    }


class AuditRepo(TenantRepository[AuditLog]):
    """``uow.audit``."""

    model = AuditLog
    span_prefix = "audit"

    async def log_event(self, **event: Unpack[EventFields]) -> records.AuditLog:
        """Append one event (the fields of :class:`EventFields`); kept if the unit of work
        commits. Every field is validated before anything is sent."""
        values = audit_values(event, max_json_bytes=self._max_json_bytes)
        (logged,) = await self._fetch_records(
            records.AuditLog,
            "insert_event",
            self._insert_statement,
            action="log audit event",
            **values,
        )
        return logged

    def _insert_statement(self) -> Any:
        columns = AuditLog.__table__.c
        values = {key: bindparam(key, type_=columns[name].type) for key, name in _COLUMNS.items()}
        return self._insert(AuditLog, **values).returning(*row_columns(AuditLog))

    async def recent(self, *, days: int = 7, limit: int = 100) -> list[records.AuditLog]:
        """Events of the last ``days`` days, newest first."""
        window = timedelta(days=validation.integer(days, field="days", minimum=1, maximum=3660))
        return await self._fetch_records(
            records.AuditLog,
            "recent",
            self._recent,
            action="list audit events",
            **self._page(window, limit),
        )

    async def recent_failures(self, *, hours: int = 24, limit: int = 100) -> list[records.AuditLog]:
        """Events whose status is not ``success``, of the last ``hours`` hours, newest first."""
        window = timedelta(
            hours=validation.integer(hours, field="hours", minimum=1, maximum=24 * 3660)
        )
        return await self._fetch_records(
            records.AuditLog,
            "recent_failures",
            self._recent_failures,
            action="list audit events",
            success="success",
            **self._page(window, limit),
        )

    @staticmethod
    def _page(window: timedelta, limit: int) -> dict[str, Any]:
        return {"since": utcnow() - window, "limit": validation.list_limit(limit)}

    def _recent(self) -> Any:
        return (
            self._select()
            .where(AuditLog.created_at >= bindparam("since", type_=DateTime(timezone=True)))
            .order_by(AuditLog.created_at.desc(), AuditLog.id)
            .limit(bindparam("limit", type_=Integer))
        )

    def _recent_failures(self) -> Any:
        return self._recent().where(AuditLog.status != bindparam("success", type_=Text))
