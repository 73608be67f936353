"""The owner may read and write one named workspace's rows: export, import and erasure.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04

Row-level security binds the owner too (``FORCE``), and until now it reached a
workspace's users, CRM connections, account mappings, meetings and rate-limit
counters only through the functions that set ``app.tenant_id``
(``owner_scoped``). The lifecycle commands (``sfdb tenant export``,
``import``, ``purge``) act on the owner's side for one workspace at a time:
the ``owner_lifecycle`` policies let the owner reach the rows of the workspace
that ``sfdb.lifecycle_tenant`` names (a transaction-local setting, as the app
role's claim is) and no other. No other role gains anything: the app role may
set the same setting, but the policies are not for it.

``downgrade()`` drops them.
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import migration_roles

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES: Final = (
    "users",
    "crm_connections",
    "account_mappings",
    "meeting_sessions",
    "api_rate_limits",
)
LIFECYCLE_TENANT: Final = "NULLIF(current_setting('sfdb.lifecycle_tenant', true), '')::uuid"


def upgrade() -> None:
    owner = migration_roles(context.config.attributes).owner
    # As the migrating login, as revisions 0006 to 0009: on a distributed Citus cluster the
    # coordinator opens its connections to the workers as the role in effect.
    op.execute("RESET ROLE")
    for table in TABLES:
        op.execute(
            f'CREATE POLICY owner_lifecycle ON {table} TO "{owner}" '
            f"USING (tenant_id = {LIFECYCLE_TENANT}) WITH CHECK (tenant_id = {LIFECYCLE_TENANT})"
        )
    op.execute(f'SET LOCAL ROLE "{owner}"')


def downgrade() -> None:
    for table in reversed(TABLES):
        op.execute(f"DROP POLICY owner_lifecycle ON {table}")
