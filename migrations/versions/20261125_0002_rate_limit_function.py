"""One-statement rate limit: sfdb_consume_rate_limit().

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

``db.rate_limit`` spends in a transaction of its own. As a plain transaction
(BEGIN and the tenant context, the upsert, COMMIT) the counter's row lock is
held across the client's COMMIT round trip, and every caller of a hot counter
queues behind it. This function does the same work inside one statement, sent
in autocommit: the lock lasts as long as the statement, and the call costs
one round trip instead of three.

It is SECURITY INVOKER: it switches to the app role itself (``SET LOCAL
ROLE``, which ends with the statement's transaction), sets the tenant, checks
the tenant is live and runs the upsert under row-level security, exactly as
a unit of work would. A cost above the limit spends nothing. Waiting for the
counter's lock is bounded by ``p_lock_timeout_ms`` (the statement timeout of
the settings).
"""

from collections.abc import Sequence

from alembic import context, op

from slack_fathom_db.roles import migration_roles

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _app_role() -> str:
    return migration_roles(context.config.attributes).app


def upgrade() -> None:
    op.execute(
        f"""
        CREATE FUNCTION sfdb_consume_rate_limit(
            p_tenant uuid, p_resource text, p_period text, p_window_start timestamptz,
            p_cost integer, p_limit integer, p_lock_timeout_ms integer,
            OUT granted integer, OUT prior integer
        ) LANGUAGE plpgsql AS $$
        BEGIN
            SET LOCAL ROLE "{_app_role()}";
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
                (tenant_id, resource_type, period, window_start, request_count)
            VALUES (p_tenant, p_resource, p_period, p_window_start, p_cost)
            ON CONFLICT (tenant_id, resource_type, period, window_start) DO UPDATE
                SET request_count = counter.request_count + EXCLUDED.request_count,
                    updated_at = now()
                WHERE counter.request_count + EXCLUDED.request_count <= p_limit
            RETURNING counter.request_count INTO granted;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION sfdb_consume_rate_limit"
        "(uuid, text, text, timestamptz, integer, integer, integer)"
    )
