"""AuditRepo: append-only audit events of one workspace.

There is no update or delete here, and the database refuses both anyway
(grants and a trigger). Events written inside a unit of work are kept only if
it commits; :meth:`slack_fathom_db.Database.log_security_event` writes one in
its own short transaction when it must survive the caller's rollback.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import bindparam

from slack_fathom_db import validation
from slack_fathom_db.models import AuditLog
from slack_fathom_db.models.audit import EVENT_CATEGORIES, EVENT_STATUSES
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.repositories.base import TenantRepository

__all__ = ["AuditRepo", "audit_values"]

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


def audit_values(
    *,
    event_type: str,
    event_category: str,
    action_description: str,
    status: str = "success",
    user_id: uuid.UUID | None = None,
    resource_type: str | None = None,
    resource_id: uuid.UUID | str | None = None,
    ip_address: str | None = None,
    user_agent: str | None = None,
    metadata: dict[str, Any] | None = None,
    max_json_bytes: int = validation.DEFAULT_MAX_JSON_BYTES,
) -> dict[str, Any]:
    """The validated column values of one audit event."""
    return {
        "event_type": validation.resource_name(event_type, field="event_type"),
        "event_category": validation.choice(
            event_category, field="event_category", allowed=EVENT_CATEGORIES
        ),
        "action_description": validation.text(
            action_description, field="action_description", max_length=2000
        ),
        "status": validation.choice(status, field="status", allowed=EVENT_STATUSES),
        "user_id": validation.optional_uuid(user_id, field="user_id"),
        "resource_type": validation.optional_text(
            resource_type, field="resource_type", max_length=64
        ),
        "resource_id": None
        if resource_id is None
        else str(resource_id)
        if isinstance(resource_id, uuid.UUID)
        else validation.text(resource_id, field="resource_id", max_length=validation.MAX_NAME),
        "ip_address": validation.ip_address(ip_address),
        "user_agent": validation.optional_text(user_agent, field="user_agent", max_length=1000),
        "event_metadata": {}
        if metadata is None
        else validation.json_object(metadata, field="metadata", max_bytes=max_json_bytes),
    }


class AuditRepo(TenantRepository[AuditLog]):
    """``uow.audit``."""

    model = AuditLog

    async def log_event(
        self,
        *,
        event_type: str,
        event_category: str,
        action_description: str,
        status: str = "success",
        user_id: uuid.UUID | None = None,
        resource_type: str | None = None,
        resource_id: uuid.UUID | str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> AuditLog:
        """Append one event; it is kept if the unit of work commits."""
        values = audit_values(
            event_type=event_type,
            event_category=event_category,
            action_description=action_description,
            status=status,
            user_id=user_id,
            resource_type=resource_type,
            resource_id=resource_id,
            ip_address=ip_address,
            user_agent=user_agent,
            metadata=metadata,
            max_json_bytes=self._max_json_bytes,
        )
        return await self._insert_event(values)

    async def _insert_event(self, values: dict[str, Any]) -> AuditLog:
        """Insert an event whose values :func:`audit_values` already validated."""
        (event,) = await self._fetch_models(
            AuditLog, "insert_event", self._insert_statement, action="log audit event", **values
        )
        return event

    def _insert_statement(self) -> Any:
        columns = AuditLog.__table__.c
        values = {key: bindparam(key, type_=columns[name].type) for key, name in _COLUMNS.items()}
        return self._insert(AuditLog, **values).returning(*AuditLog.__table__.c)

    async def recent(self, *, days: int = 7, limit: int = 100) -> list[AuditLog]:
        """Events of the last ``days`` days, newest first."""
        window = timedelta(days=validation.integer(days, field="days", minimum=1, maximum=3660))
        return await self._since(window, limit)

    async def recent_failures(self, *, hours: int = 24, limit: int = 100) -> list[AuditLog]:
        """Events whose status is not ``success``, of the last ``hours`` hours, newest first."""
        window = timedelta(
            hours=validation.integer(hours, field="hours", minimum=1, maximum=24 * 3660)
        )
        return await self._since(window, limit, AuditLog.status != "success")

    async def _since(self, window: timedelta, limit: int, *conditions: Any) -> list[AuditLog]:
        count = validation.list_limit(limit)
        statement = (
            self._select()
            .where(AuditLog.created_at >= utcnow() - window, *conditions)
            .order_by(AuditLog.created_at.desc(), AuditLog.id)
            .limit(count)
        )
        return await self._all(statement, action="list audit events")
