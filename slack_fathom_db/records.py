"""What reads return: one read-only record per row, with the models' attribute names.

A record is built straight from the driver's row, in one step, and cannot be
changed (assigning to a field raises ``AttributeError``): rows change only
through repository methods, so nothing needs tracking, and a record stays
readable after its unit of work ends. The ORM models in
:mod:`slack_fathom_db.models` remain the schema (Alembic reads them); each
record lists the same attributes in the same order, and a test holds the two
together.

Records are typed ``NamedTuple`` s rather than frozen dataclasses: a frozen
dataclass sets each field through ``object.__setattr__``, which costs about
eight times as much per row (a read of 50 meetings spends ~140 µs building
frozen dataclasses against ~16 µs for these), and reads sit on every handler's
path. Compare records by their fields, not with plain tuples.
"""

from __future__ import annotations

import uuid  # noqa: TC003 - NamedTuple fields are evaluated at runtime
from datetime import datetime  # noqa: TC003 - as above
from ipaddress import IPv4Address, IPv6Address  # noqa: TC003 - as above
from typing import Any, NamedTuple

__all__ = [
    "AccountMapping",
    "AuditLog",
    "CrmConnection",
    "MeetingSession",
    "Tenant",
    "User",
]


class Tenant(NamedTuple):
    """A Slack workspace."""

    id: uuid.UUID
    slack_team_id: str
    slack_team_name: str
    slack_enterprise_id: str | None
    plan_tier: str
    subscription_status: str
    trial_ends_at: datetime | None
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class User(NamedTuple):
    """A Slack user of the workspace."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    slack_user_id: str
    slack_email: str | None
    display_name: str | None
    role: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class CrmConnection(NamedTuple):
    """A CRM connection; the credentials stay in the secrets manager (only a reference here)."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    provider_type: str
    credentials_secret_id: str
    connected_by_user_id: uuid.UUID | None
    is_default: bool
    status: str
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class AccountMapping(NamedTuple):
    """An email domain mapped to a CRM account of one connection."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    crm_connection_id: uuid.UUID
    email_domain: str
    crm_account_id: str
    crm_account_name: str | None
    verified: bool
    last_used_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class MeetingSession(NamedTuple):
    """A recorded meeting from Fathom, its processing and its CRM sync."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    crm_connection_id: uuid.UUID | None
    fathom_recording_id: str
    title: str
    meeting_url: str | None
    started_at: datetime | None
    duration_seconds: int | None
    participants: list[Any]
    status: str
    summary: str | None
    action_items: list[Any]
    ai_output: dict[str, Any] | None
    processing_error: str | None
    processing_attempts: int
    processing_started_at: datetime | None
    processing_lease_expires_at: datetime | None
    processed_at: datetime | None
    crm_sync_status: str
    crm_record_id: str | None
    crm_sync_attempts: int
    crm_last_error: str | None
    crm_synced_at: datetime | None
    version: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


class AuditLog(NamedTuple):
    """One audit event (append-only)."""

    tenant_id: uuid.UUID
    id: uuid.UUID
    event_type: str
    event_category: str
    action_description: str
    status: str
    user_id: uuid.UUID | None
    resource_type: str | None
    resource_id: str | None
    ip_address: IPv4Address | IPv6Address | None
    user_agent: str | None
    event_metadata: dict[str, Any]
    created_at: datetime
