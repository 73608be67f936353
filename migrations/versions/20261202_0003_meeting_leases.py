"""Meeting claim leases: meeting_sessions.processing_lease_expires_at and its index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A meeting in ``processing`` is leased to the worker that claimed it until
``processing_lease_expires_at``; ``claim_pending`` reclaims it once the lease
has passed, so a worker that died no longer leaves its meeting in
``processing`` for ever. The partial index finds a tenant's expired leases.

Meetings already in ``processing`` were claimed without a lease. They get one
that ends ``DATABASE_CLAIM_LEASE_SECONDS`` after their processing started, so
those abandoned before this revision are reclaimed too. Row-level security is
forced on the table, which would hide every row from the owner running the
migration: it is lifted for that one ``UPDATE`` and forced again, inside the
migration's transaction (which holds the table's exclusive lock throughout).

``downgrade()`` drops the index and the column.
"""

import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Final

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX: Final = "ix_meeting_sessions_tenant_id_lease_expires_at_processing"
DEFAULT_LEASE_SECONDS: Final = 900.0
MAX_LEASE_SECONDS: Final = 7 * 86_400


def _lease_seconds() -> float:
    """The configured claim lease (the settings Alembic was given), or its default."""
    settings = context.config.attributes.get("settings")
    lease = getattr(settings, "claim_lease_seconds", DEFAULT_LEASE_SECONDS)
    if (
        isinstance(lease, bool)
        or not isinstance(lease, int | float)
        or not math.isfinite(lease)
        or not 0 < lease <= MAX_LEASE_SECONDS
    ):
        raise ValueError(f"claim_lease_seconds must be in (0, {MAX_LEASE_SECONDS}]")
    return float(lease)


def upgrade() -> None:
    op.add_column(
        "meeting_sessions",
        sa.Column("processing_lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        INDEX,
        "meeting_sessions",
        ["tenant_id", "processing_lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'processing' AND deleted_at IS NULL"),
    )
    op.execute("ALTER TABLE meeting_sessions NO FORCE ROW LEVEL SECURITY")
    lease = sa.bindparam("lease", _lease_seconds(), type_=sa.Double())
    if context.is_offline_mode():
        op.execute(
            sa.text(
                "UPDATE meeting_sessions SET processing_lease_expires_at = "
                "coalesce(processing_started_at, now()) + make_interval(secs => :lease) "
                "WHERE status = 'processing'"
            ).bindparams(lease)
        )
    else:
        # Row by row, with values computed here: on a distributed table Citus refuses
        # a STABLE function (timestamptz + interval) applied to a column in an UPDATE.
        # Only meetings in flight are in processing, so these are few.
        bind = op.get_bind()
        now, seconds = bind.execute(sa.text("SELECT now(), :lease").bindparams(lease)).one()
        in_flight = bind.execute(
            sa.text(
                "SELECT tenant_id, id, processing_started_at FROM meeting_sessions "
                "WHERE status = 'processing'"
            )
        ).all()
        if in_flight:
            bind.execute(
                sa.text(
                    "UPDATE meeting_sessions SET processing_lease_expires_at = :ends "
                    "WHERE tenant_id = :tenant AND id = :id"
                ),
                [
                    {
                        "tenant": row.tenant_id,
                        "id": row.id,
                        "ends": (row.processing_started_at or now) + timedelta(seconds=seconds),
                    }
                    for row in in_flight
                ],
            )
    op.execute("ALTER TABLE meeting_sessions FORCE ROW LEVEL SECURITY")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="meeting_sessions")
    op.drop_column("meeting_sessions", "processing_lease_expires_at")
