"""sfdb_consume_rate_limit() takes its time from VALUES, as Citus requires.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

On a distributed table, Citus refuses functions that are not IMMUTABLE in the
``DO UPDATE`` of an ``INSERT … ON CONFLICT``; values computed in ``VALUES``
(read back as ``EXCLUDED``) are evaluated before the row is routed and are
accepted. The function now writes ``now()`` in ``VALUES`` and sets
``updated_at = EXCLUDED.updated_at``: the same result on a single server.
``downgrade()`` restores the body of revision 0002.
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import migration_roles

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION sfdb_consume_rate_limit(
    p_tenant uuid, p_resource text, p_period text, p_window_start timestamptz,
    p_cost integer, p_limit integer, p_lock_timeout_ms integer,
    OUT granted integer, OUT prior integer
) LANGUAGE plpgsql AS $$
BEGIN
    SET LOCAL ROLE "{role}";
    -- The statement timeout of a unit of work cannot arm itself from inside the
    -- statement; a hot counter's wait is a lock wait, so bound that instead.
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    PERFORM sfdb_require_tenant();
    SELECT request_count INTO prior FROM api_rate_limits
    WHERE tenant_id = p_tenant AND resource_type = p_resource
      AND period = p_period AND window_start = p_window_start;
    IF p_cost > p_limit THEN
        RETURN;
    END IF;
    INSERT INTO api_rate_limits AS counter
        (tenant_id, resource_type, period, window_start, request_count, updated_at)
    VALUES (p_tenant, p_resource, p_period, p_window_start, p_cost, {now})
    ON CONFLICT (tenant_id, resource_type, period, window_start) DO UPDATE
        SET request_count = counter.request_count + EXCLUDED.request_count,
            updated_at = {updated_at}
        WHERE counter.request_count + EXCLUDED.request_count <= p_limit
    RETURNING counter.request_count INTO granted;
END
$$
"""


def _app_role() -> str:
    return migration_roles(context.config.attributes).app


def upgrade() -> None:
    op.execute(_FUNCTION.format(role=_app_role(), now="now()", updated_at="EXCLUDED.updated_at"))


def downgrade() -> None:
    op.execute(_FUNCTION.format(role=_app_role(), now="DEFAULT", updated_at="now()"))
