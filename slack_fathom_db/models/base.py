"""Declarative base, naming convention and the column shapes every table shares.

Tenant-owned tables lead every key with ``tenant_id``: the primary key is
``(tenant_id, id)``, every unique index starts with ``tenant_id`` and every
foreign key between tenant-owned tables is composite, so a row can never
point at another tenant's row and the schema can be distributed by
``tenant_id`` (Citus) without change.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import DateTime, ForeignKey, MetaData, func, text
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


INTERNAL: Final = {"internal": True}
"""``info`` of a column that no repository reads or returns (:func:`row_columns` skips it)."""


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every model; its MetaData carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: DateTime(timezone=True),
        uuid.UUID: UUID(as_uuid=True),
    }


class Timestamps:
    """``created_at`` and ``updated_at``, both ``timestamptz``; the server sets them on insert,
    and every UPDATE a repository builds (``TenantRepository._update``) stamps ``updated_at``."""

    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), sort_order=90)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), sort_order=91)


class SoftDelete:
    """``deleted_at``: a row with a value is gone for every lookup and live uniqueness."""

    deleted_at: Mapped[datetime | None] = mapped_column(sort_order=92)


class TenantOwned:
    """``tenant_id`` + ``id``, the composite primary key of every tenant-owned table."""

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), primary_key=True, sort_order=-2
    )
    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, server_default=text("gen_random_uuid()"), sort_order=-1
    )


def one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL for a CHECK that ``column`` takes one of ``values`` (enumerations stay ``text``)."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"
