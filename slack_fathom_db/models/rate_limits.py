"""Rate-limit counters: one row per tenant, resource, period and UTC window.

Fixed windows (``minute``, ``hourly``, ``daily``, ``monthly``) count
``request_count`` in the row of the window's start. Token buckets use the
period ``bucket``, a fixed ``window_start`` (the epoch) and keep ``tokens``
with the time they were last refilled in ``updated_at``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from sqlalchemy import CheckConstraint, ForeignKey, Index, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import Base, one_of

WINDOW_PERIODS: Final = ("minute", "hourly", "daily", "monthly")
"""The fixed windows, aligned to UTC."""
BUCKET: Final = "bucket"
"""The period of a token bucket's row."""
RATE_LIMIT_PERIODS: Final = (*WINDOW_PERIODS, BUCKET)


class ApiRateLimit(Base):
    """A counter (fixed window) or a token bucket for one tenant and resource."""

    __tablename__ = "api_rate_limits"
    __table_args__ = (
        CheckConstraint(one_of("period", RATE_LIMIT_PERIODS), name="period"),
        CheckConstraint("request_count >= 0", name="request_count_non_negative"),
        # Finds windows that ended long ago, for the purge (fixed windows only).
        Index(
            "ix_api_rate_limits_window_start_windows",
            "window_start",
            postgresql_where=text("period <> 'bucket'"),
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), primary_key=True
    )
    resource_type: Mapped[str] = mapped_column(Text, primary_key=True)
    period: Mapped[str] = mapped_column(Text, primary_key=True)
    window_start: Mapped[datetime] = mapped_column(primary_key=True)
    request_count: Mapped[int] = mapped_column(server_default=text("0"))
    tokens: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())

    def __repr__(self) -> str:
        return f"ApiRateLimit(resource_type={self.resource_type!r}, period={self.period!r})"
