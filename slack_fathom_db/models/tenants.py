"""The tenant aggregate: a Slack workspace, its users, CRM connections and domain mappings.

``tenants`` is the one global table (a reference table under Citus); the
other three are tenant-owned. Users, connections and mappings are soft
deleted, and their live uniqueness is a partial unique index
``WHERE deleted_at IS NULL`` so a removed row can be created again.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    CheckConstraint,
    ForeignKeyConstraint,
    Index,
    LargeBinary,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import INTERNAL, Base, SoftDelete, TenantOwned, Timestamps, one_of

PLAN_TIERS: Final = ("free", "starter", "pro", "enterprise")
SUBSCRIPTION_STATUSES: Final = ("trialing", "active", "past_due", "canceled")
USER_ROLES: Final = ("owner", "admin", "member")
CRM_PROVIDERS: Final = ("hubspot", "salesforce", "crono")
CRM_CONNECTION_STATUSES: Final = ("active", "error")

_LIVE: Final = text("deleted_at IS NULL")


class Tenant(Timestamps, SoftDelete, Base):
    """One Slack workspace; the root every other row hangs from."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint(one_of("plan_tier", PLAN_TIERS), name="plan_tier"),
        CheckConstraint(
            one_of("subscription_status", SUBSCRIPTION_STATUSES), name="subscription_status"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(
        primary_key=True, server_default=text("gen_random_uuid()")
    )
    slack_team_id: Mapped[str] = mapped_column(String(32), unique=True)
    slack_team_name: Mapped[str] = mapped_column(Text)
    slack_enterprise_id: Mapped[str | None] = mapped_column(String(32))
    plan_tier: Mapped[str] = mapped_column(Text, server_default="free")
    subscription_status: Mapped[str] = mapped_column(Text, server_default="active")
    trial_ends_at: Mapped[datetime | None]
    settings: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # When ``sfdb tenant purge`` last erased the workspace's rows (slack_fathom_db.erasure).
    purged_at: Mapped[datetime | None] = mapped_column(sort_order=95, info=INTERNAL)
    # When the directory uninstalled it (the purge's clock); kept by a trigger (revision 0012).
    uninstalled_at: Mapped[datetime | None] = mapped_column(sort_order=96, info=INTERNAL)

    def __repr__(self) -> str:
        return f"Tenant(id={self.id}, slack_team_id={self.slack_team_id!r})"


class User(TenantOwned, Timestamps, SoftDelete, Base):
    """A Slack user of one workspace."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint(one_of("role", USER_ROLES), name="role"),
        Index(
            "uq_users_tenant_id_slack_user_id_live",
            "tenant_id",
            "slack_user_id",
            unique=True,
            postgresql_where=_LIVE,
        ),
    )

    slack_user_id: Mapped[str] = mapped_column(String(32))
    slack_email: Mapped[str | None] = mapped_column(String(320))
    display_name: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text, server_default="member")

    def __repr__(self) -> str:
        return f"User(id={self.id}, slack_user_id={self.slack_user_id!r})"


class CrmConnection(TenantOwned, Timestamps, SoftDelete, Base):
    """A CRM account the workspace writes notes to; credentials live in a secrets manager."""

    __tablename__ = "crm_connections"
    __table_args__ = (
        CheckConstraint(one_of("provider_type", CRM_PROVIDERS), name="provider_type"),
        CheckConstraint(one_of("status", CRM_CONNECTION_STATUSES), name="status"),
        ForeignKeyConstraint(
            ["tenant_id", "connected_by_user_id"],
            ["users.tenant_id", "users.id"],
            ondelete="RESTRICT",
        ),
        Index(
            "uq_crm_connections_tenant_id_default_live",
            "tenant_id",
            unique=True,
            postgresql_where=text("is_default AND deleted_at IS NULL"),
        ),
    )

    provider_type: Mapped[str] = mapped_column(Text)
    credentials_secret_id: Mapped[str] = mapped_column(Text)
    connected_by_user_id: Mapped[uuid.UUID | None]
    is_default: Mapped[bool] = mapped_column(server_default=text("false"))
    status: Mapped[str] = mapped_column(Text, server_default="active")

    def __repr__(self) -> str:
        # credentials_secret_id is a reference, but a reference is still nobody's business here
        return f"CrmConnection(id={self.id}, provider_type={self.provider_type!r})"


class AccountMapping(TenantOwned, Timestamps, SoftDelete, Base):
    """An email domain mapped to a CRM account of one connection."""

    __tablename__ = "account_mappings"
    __table_args__ = (
        CheckConstraint("email_domain = lower(email_domain)", name="email_domain_lower"),
        ForeignKeyConstraint(
            ["tenant_id", "crm_connection_id"],
            ["crm_connections.tenant_id", "crm_connections.id"],
            ondelete="RESTRICT",
        ),
        Index(
            "uq_account_mappings_tenant_id_connection_domain_live",
            "tenant_id",
            "crm_connection_id",
            "email_domain",
            unique=True,
            postgresql_where=_LIVE,
        ),
    )

    crm_connection_id: Mapped[uuid.UUID]
    email_domain: Mapped[str] = mapped_column(String(253))
    crm_account_id: Mapped[str] = mapped_column(Text)
    crm_account_name: Mapped[str | None] = mapped_column(Text)
    verified: Mapped[bool] = mapped_column(server_default=text("false"))
    last_used_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"AccountMapping(id={self.id}, email_domain={self.email_domain!r})"


class TenantClaimKey(Base):
    """The database's copy of a tenant key, as the HMAC's pads (``slack_fathom_db.claims``):
    as secret as the key. No role but the owner reads it; the function that verifies
    claims does, as the owner."""

    __tablename__ = "tenant_claim_keys"
    __table_args__ = (
        CheckConstraint("key_id ~ '^[A-Za-z0-9_-]{1,32}$'", name="key_id"),
        CheckConstraint("length(inner_pad) = 64 AND length(outer_pad) = 64", name="pads"),
    )

    key_id: Mapped[str] = mapped_column(Text, primary_key=True)
    inner_pad: Mapped[bytes] = mapped_column(LargeBinary)
    outer_pad: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    def __repr__(self) -> str:
        return f"TenantClaimKey(key_id={self.key_id!r})"
