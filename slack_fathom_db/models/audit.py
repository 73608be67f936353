"""The audit aggregate: an append-only, tamper-evident log of what happened in a workspace.

The database keeps it append-only by itself: the app role may only INSERT and
SELECT, and a trigger rejects UPDATE, DELETE and TRUNCATE for everybody, but
for one update by the owner: erasure (:mod:`slack_fathom_db.erasure`) empties
an event's personal fields and erases its salt, every other column as it was.
Events leave only with their month's partition (``sfdb audit retain``).

Each workspace's events form a hash chain that the database computes as the
transaction writing them commits, whatever the inserts said: ``audit_chain``
gives each event its place (``chain_seq``, from 1) and ``row_hash``, SHA-256
over the previous place's hash and the event's canonical content. The personal
fields (actor, address, user agent, free text) enter that content only
through ``personal_digest``, SHA-256 over a random ``personal_salt`` and the
fields: once the fields and the salt are erased the digest still closes the
chain and reveals nothing. ``audit_chain_heads`` keeps each chain's newest
place; committing writers of one workspace take their turn on its row.
``sfdb audit verify`` walks the chains
(:func:`slack_fathom_db.audit_chain.verify_audit_chains`).

``audit_logs`` is partitioned by month of ``created_at`` (UTC; migration
0011): the partitions are no models, they live in the owner's schema
``audit_partitions`` and come and go with ``sfdb audit retain``
(:mod:`slack_fathom_db.audit_retention`), which records what it dropped
(``audit_retention``) and where each chain now starts (``audit_chain_starts``).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    Date,
    ForeignKeyConstraint,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import BYTEA, INET, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import INTERNAL, Base, TenantOwned, one_of

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
        {"postgresql_partition_by": "RANGE (created_at)"},
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
    # Part of the primary key, as a partitioned table's keys must hold its partition key.
    created_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), primary_key=True, sort_order=90
    )
    # Set by the database's trigger on every insert (NOT NULL is checked after it runs): the
    # commitment to the personal fields, the chain's business rather than a reader's.
    personal_digest: Mapped[bytes] = mapped_column(BYTEA, sort_order=95, info=INTERNAL)
    personal_salt: Mapped[bytes | None] = mapped_column(BYTEA, sort_order=96, info=INTERNAL)

    def __repr__(self) -> str:
        return f"AuditLog(id={self.id}, event_type={self.event_type!r})"


class AuditChainLink(Base):
    """One event's place in its workspace's audit chain, written as the event's transaction
    commits; the owner's alone (the chain's trigger writes it, as the owner)."""

    __tablename__ = "audit_chain"

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_id: Mapped[uuid.UUID]
    row_hash: Mapped[bytes] = mapped_column(BYTEA)

    def __repr__(self) -> str:
        return f"AuditChainLink(chain_seq={self.chain_seq}, event_id={self.event_id})"


class AuditChainHead(Base):
    """The newest position of one workspace's audit chain; the owner's alone (the chain's
    trigger moves it, as the owner)."""

    __tablename__ = "audit_chain_heads"

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger)

    def __repr__(self) -> str:
        return f"AuditChainHead(tenant_id={self.tenant_id}, chain_seq={self.chain_seq})"


class AuditChainStart(Base):
    """Where one workspace's audit chain starts since retention dropped its oldest events;
    the owner's alone (``sfdb audit retain`` writes it)."""

    __tablename__ = "audit_chain_starts"

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    chain_seq: Mapped[int] = mapped_column(BigInteger)
    """The chain's first place now."""
    previous_hash: Mapped[bytes] = mapped_column(BYTEA)
    """The hash of the place before it, which the first place's hash follows from."""
    dropped_places: Mapped[list[int]] = mapped_column(
        ARRAY(BigInteger), server_default=text("'{}'")
    )
    """Places from ``chain_seq`` on whose events retention dropped (their hashes kept)."""
    moved_at: Mapped[datetime] = mapped_column(server_default=func.now())

    def __repr__(self) -> str:
        return f"AuditChainStart(tenant_id={self.tenant_id}, chain_seq={self.chain_seq})"


class AuditRetention(Base):
    """One monthly partition of the audit log that retention dropped; the owner's alone."""

    __tablename__ = "audit_retention"

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, server_default=text("gen_random_uuid()")
    )
    partition: Mapped[str] = mapped_column(Text)
    month: Mapped[date] = mapped_column(Date)
    events: Mapped[int] = mapped_column(BigInteger)
    workspaces: Mapped[int] = mapped_column(Integer)
    months_kept: Mapped[int] = mapped_column(Integer)
    dropped_at: Mapped[datetime] = mapped_column(server_default=func.now())

    def __repr__(self) -> str:
        return f"AuditRetention(partition={self.partition!r}, events={self.events})"
