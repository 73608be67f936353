"""slack_fathom_db: async, tenant-isolated PostgreSQL persistence for a Slack + Fathom + CRM app.

``Database(DatabaseSettings())`` is the entry point; see README.md.
"""

from importlib.metadata import PackageNotFoundError, version

from slack_fathom_db import records
from slack_fathom_db.database import Database, DatabaseInfo, PoolStats
from slack_fathom_db.repositories import RateLimitDecision, TenantStats
from slack_fathom_db.settings import DatabaseSettings
from slack_fathom_db.tenancy import TenantId
from slack_fathom_db.uow import UnitOfWork

try:
    __version__ = version("slack-fathom-db")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "Database",
    "DatabaseInfo",
    "DatabaseSettings",
    "PoolStats",
    "RateLimitDecision",
    "TenantId",
    "TenantStats",
    "UnitOfWork",
    "__version__",
    "records",
]
