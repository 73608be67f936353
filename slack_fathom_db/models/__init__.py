"""ORM models, one module per aggregate; importing this package registers all seven tables."""

from slack_fathom_db.models.audit import AuditLog
from slack_fathom_db.models.base import Base
from slack_fathom_db.models.meetings import MeetingSession
from slack_fathom_db.models.rate_limits import ApiRateLimit
from slack_fathom_db.models.tenants import AccountMapping, CrmConnection, Tenant, User

__all__ = [
    "AccountMapping",
    "ApiRateLimit",
    "AuditLog",
    "Base",
    "CrmConnection",
    "MeetingSession",
    "Tenant",
    "User",
]
