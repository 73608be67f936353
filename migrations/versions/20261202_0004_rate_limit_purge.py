"""Ended rate-limit windows can be purged: sfdb_window_end(), a DELETE policy, an index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

A fixed window's counter is never read again once the window has ended, so
the rows pile up. ``slack_fathom_db.maintenance.purge_rate_limit_windows``
(``sfdb purge-rate-limits``) deletes the windows that ended long enough ago.

* ``sfdb_window_end(period, window_start)`` is the end of a window, computed
  in UTC whatever the session's time zone (a day or a month is a calendar
  step in UTC, as the layer aligns windows). Token buckets have no end.
* Row-level security is forced on ``api_rate_limits``, so without a tenant
  the owner sees no row: the ``select_ended_windows`` and
  ``delete_ended_windows`` policies let the role that runs this migration
  (the owner) read and delete rows of windows that have ended, of every
  tenant, and nothing else. They name the owner: the app role gains nothing.
* A partial index on ``window_start`` finds old windows without a scan.

``downgrade()`` removes all three.
"""

from collections.abc import Sequence
from typing import Final

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX: Final = "ix_api_rate_limits_window_start_windows"
ENDED: Final = "period <> 'bucket' AND sfdb_window_end(period, window_start) <= now()"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION sfdb_window_end(p_period text, p_window_start timestamptz)
        RETURNS timestamptz
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        SET search_path = pg_catalog
        AS $$
            SELECT (p_window_start AT TIME ZONE 'UTC' + CASE p_period
                WHEN 'minute' THEN interval '1 minute'
                WHEN 'hourly' THEN interval '1 hour'
                WHEN 'daily' THEN interval '1 day'
                WHEN 'monthly' THEN interval '1 month'
            END) AT TIME ZONE 'UTC'
        $$
        """
    )
    # A DELETE with a WHERE clause must also pass the SELECT policies, hence two.
    for command in ("SELECT", "DELETE"):
        op.execute(
            f"CREATE POLICY {command.lower()}_ended_windows ON api_rate_limits "
            f"FOR {command} TO CURRENT_USER USING ({ENDED})"
        )
    op.create_index(
        INDEX,
        "api_rate_limits",
        ["window_start"],
        unique=False,
        postgresql_where=sa.text("period <> 'bucket'"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="api_rate_limits")
    op.execute("DROP POLICY delete_ended_windows ON api_rate_limits")
    op.execute("DROP POLICY select_ended_windows ON api_rate_limits")
    op.execute("DROP FUNCTION sfdb_window_end(text, timestamptz)")
