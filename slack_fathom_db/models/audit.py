"""The audit aggregate: an append-only log of what happened in a workspace.

The database keeps it append-only by itself: the app role may only INSERT and
SELECT, and a trigger rejects UPDATE, DELETE and TRUNCATE for everybody.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from sqlalchemy import CheckConstraint, ForeignKeyConstraint, Index, Text, func, text
from sqlalchemy.dialects.postgresql import INET, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import Base, TenantOwned, one_of

EVENT_CATEGORIES: Final = ("auth", "data", "integration", "admin", "security", "billing", "system")
EVENT_STATUSES: Final = ("success", "failure", "denied")


class AuditLog(TenantOwned, Base):
    """One audit event."""

    __tablename__ = "audit_logs"
    __table_args__ = (
        CheckConstraint(one_of("event_category", EVENT_CATEGORIES), name="event_category"),
        CheckConstraint(one_of("status", EVENT_STATUSES), name="status"),
        ForeignKeyConstraint(
            ["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="RESTRICT"
        ),
        Index("ix_audit_logs_tenant_id_created_at", "tenant_id", text("created_at DESC")),
        Index(
            "ix_audit_logs_tenant_id_created_at_failures",
            "tenant_id",
            text("created_at DESC"),
            postgresql_where=text("status <> 'success'"),
        ),
    )

    event_type: Mapped[str] = mapped_column(Text)
    event_category: Mapped[str] = mapped_column(Text)
    action_description: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="success")
    user_id: Mapped[uuid.UUID | None]
    resource_type: Mapped[str | None] = mapped_column(Text)
    resource_id: Mapped[str | None] = mapped_column(Text)
    # asyncpg returns inet as ipaddress objects; they are written as given or as text.
    ip_address: Mapped[IPv4Address | IPv6Address | None] = mapped_column(INET)
    user_agent: Mapped[str | None] = mapped_column(Text)
    event_metadata: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), sort_order=90)

    def __repr__(self) -> str:
        return f"AuditLog(id={self.id}, event_type={self.event_type!r})"
