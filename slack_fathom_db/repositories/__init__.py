"""One repository per aggregate, each built by a unit of work and scoped to its tenant."""

from slack_fathom_db.repositories.audit import AuditRepo
from slack_fathom_db.repositories.meetings import MeetingRepo
from slack_fathom_db.repositories.rate_limits import RateLimitDecision, RateLimitRepo
from slack_fathom_db.repositories.tenants import TenantRepo, TenantStats

__all__ = [
    "AuditRepo",
    "MeetingRepo",
    "RateLimitDecision",
    "RateLimitRepo",
    "TenantRepo",
    "TenantStats",
]
