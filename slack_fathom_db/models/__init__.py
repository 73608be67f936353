"""ORM models, one module per aggregate; importing this package registers every table."""

from typing import Final

from slack_fathom_db.models.audit import (
    AuditChainHead,
    AuditChainLink,
    AuditChainStart,
    AuditLog,
    AuditRetention,
)
from slack_fathom_db.models.base import Base
from slack_fathom_db.models.meetings import MeetingSession
from slack_fathom_db.models.rate_limits import ApiRateLimit
from slack_fathom_db.models.slack import SlackBot, SlackInstallation, SlackOAuthState
from slack_fathom_db.models.tenants import (
    AccountMapping,
    CrmConnection,
    Tenant,
    TenantClaimKey,
    User,
)

TENANT_OWNED_TABLES: Final = (
    "users",
    "crm_connections",
    "account_mappings",
    "meeting_sessions",
    "audit_logs",
    "api_rate_limits",
    "slack_installations",
    "slack_bots",
)
"""The tables keyed by tenant (all but ``tenants``), a table after those it references."""
AUDIT_CHAIN_TABLES: Final = ("audit_chain_heads", "audit_chain", "audit_chain_starts")
"""The audit chain's tables: keyed by tenant too, but the owner's alone (no row security)."""

__all__ = [
    "AUDIT_CHAIN_TABLES",
    "TENANT_OWNED_TABLES",
    "AccountMapping",
    "ApiRateLimit",
    "AuditChainHead",
    "AuditChainLink",
    "AuditChainStart",
    "AuditLog",
    "AuditRetention",
    "Base",
    "CrmConnection",
    "MeetingSession",
    "SlackBot",
    "SlackInstallation",
    "SlackOAuthState",
    "Tenant",
    "TenantClaimKey",
    "User",
]
