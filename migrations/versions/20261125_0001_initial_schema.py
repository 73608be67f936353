"""Initial schema: seven tables, the app role, grants, row-level security, audit trigger.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Besides what autogenerate sees, this revision creates:

* the app role (``<database>_app``, or ``DATABASE_APP_ROLE``): NOLOGIN,
  NOSUPERUSER, NOBYPASSRLS, created if absent, granted to the migrating role
  (the runtime logins of ``sfdb create-login`` become it; the migrating login
  never runs units of work);
* its grants: SELECT/INSERT/UPDATE on tenant-owned tables, SELECT/UPDATE on
  ``tenants``, and INSERT/SELECT only on ``audit_logs``;
* ``ENABLE`` + ``FORCE ROW LEVEL SECURITY`` with a NULLIF-safe tenant policy on
  every tenant-owned table (no tenant set: no rows, never an error), and a
  policy on ``tenants`` that shows the app role its own row only;
* ``sfdb_require_tenant()``, which fails with SQLSTATE P0002 unless the
  tenant set for the transaction is live;
* a trigger that rejects UPDATE, DELETE and TRUNCATE on ``audit_logs``.

``downgrade()`` removes all of it; the role is dropped unless another
database of the cluster still uses it.
"""

from collections.abc import Sequence
from typing import Final

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

from slack_fathom_db.roles import migration_roles

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_OWNED: Final = (
    "users",
    "crm_connections",
    "meeting_sessions",
    "account_mappings",
    "audit_logs",
    "api_rate_limits",
)
CURRENT_TENANT: Final = "NULLIF(current_setting('app.tenant_id', true), '')::uuid"


def _app_role() -> str:
    return migration_roles(context.config.attributes).app


def upgrade() -> None:
    _create_tables()
    _secure(_app_role())


def downgrade() -> None:
    role = _app_role()
    op.execute(
        "DROP TABLE meeting_sessions, account_mappings, crm_connections, audit_logs, "
        "users, api_rate_limits, tenants"
    )
    op.execute("DROP FUNCTION sfdb_audit_logs_append_only()")
    op.execute("DROP FUNCTION sfdb_require_tenant()")
    op.execute(f'REVOKE USAGE ON SCHEMA public FROM "{role}"')
    # The role is cluster-wide: keep it while another database still grants it something.
    op.execute(
        f"""
        DO $$
        BEGIN
            DROP ROLE "{role}";
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role {role} is still used by another database; kept';
        END
        $$
        """
    )


def _create_tables() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("slack_team_id", sa.String(length=32), nullable=False),
        sa.Column("slack_team_name", sa.Text(), nullable=False),
        sa.Column("slack_enterprise_id", sa.String(length=32), nullable=True),
        sa.Column("plan_tier", sa.Text(), server_default="free", nullable=False),
        sa.Column("subscription_status", sa.Text(), server_default="active", nullable=False),
        sa.Column("trial_ends_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "settings",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "plan_tier IN ('free', 'starter', 'pro', 'enterprise')",
            name=op.f("ck_tenants_plan_tier"),
        ),
        sa.CheckConstraint(
            "subscription_status IN ('trialing', 'active', 'past_due', 'canceled')",
            name=op.f("ck_tenants_subscription_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("slack_team_id", name=op.f("uq_tenants_slack_team_id")),
    )
    op.create_table(
        "api_rate_limits",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("period", sa.Text(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("tokens", sa.Double(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "period IN ('minute', 'hourly', 'daily', 'monthly', 'bucket')",
            name=op.f("ck_api_rate_limits_period"),
        ),
        sa.CheckConstraint(
            "request_count >= 0", name=op.f("ck_api_rate_limits_request_count_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_api_rate_limits_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "resource_type", "period", "window_start", name=op.f("pk_api_rate_limits")
        ),
    )
    op.create_table(
        "users",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("slack_user_id", sa.String(length=32), nullable=False),
        sa.Column("slack_email", sa.String(length=320), nullable=True),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), server_default="member", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('owner', 'admin', 'member')", name=op.f("ck_users_role")),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_users_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_users")),
    )
    op.create_index(
        "uq_users_tenant_id_slack_user_id_live",
        "users",
        ["tenant_id", "slack_user_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "audit_logs",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("event_category", sa.Text(), nullable=False),
        sa.Column("action_description", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="success", nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=True),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("resource_id", sa.Text(), nullable=True),
        sa.Column("ip_address", postgresql.INET(), nullable=True),
        sa.Column("user_agent", sa.Text(), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "event_category IN "
            "('auth', 'data', 'integration', 'admin', 'security', 'billing', 'system')",
            name=op.f("ck_audit_logs_event_category"),
        ),
        sa.CheckConstraint(
            "status IN ('success', 'failure', 'denied')", name=op.f("ck_audit_logs_status")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["users.tenant_id", "users.id"],
            name=op.f("fk_audit_logs_tenant_id_user_id_users"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_audit_logs_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_audit_logs")),
    )
    op.create_index(
        "ix_audit_logs_tenant_id_created_at",
        "audit_logs",
        ["tenant_id", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_index(
        "ix_audit_logs_tenant_id_created_at_failures",
        "audit_logs",
        ["tenant_id", sa.literal_column("created_at DESC")],
        unique=False,
        postgresql_where=sa.text("status <> 'success'"),
    )
    op.create_table(
        "crm_connections",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("provider_type", sa.Text(), nullable=False),
        sa.Column("credentials_secret_id", sa.Text(), nullable=False),
        sa.Column("connected_by_user_id", sa.UUID(), nullable=True),
        sa.Column("is_default", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status", sa.Text(), server_default="active", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "provider_type IN ('hubspot', 'salesforce', 'crono')",
            name=op.f("ck_crm_connections_provider_type"),
        ),
        sa.CheckConstraint("status IN ('active', 'error')", name=op.f("ck_crm_connections_status")),
        sa.ForeignKeyConstraint(
            ["tenant_id", "connected_by_user_id"],
            ["users.tenant_id", "users.id"],
            name=op.f("fk_crm_connections_tenant_id_connected_by_user_id_users"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_crm_connections_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_crm_connections")),
    )
    op.create_index(
        "uq_crm_connections_tenant_id_default_live",
        "crm_connections",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("is_default AND deleted_at IS NULL"),
    )
    op.create_table(
        "account_mappings",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("crm_connection_id", sa.UUID(), nullable=False),
        sa.Column("email_domain", sa.String(length=253), nullable=False),
        sa.Column("crm_account_id", sa.Text(), nullable=False),
        sa.Column("crm_account_name", sa.Text(), nullable=True),
        sa.Column("verified", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "email_domain = lower(email_domain)",
            name=op.f("ck_account_mappings_email_domain_lower"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "crm_connection_id"],
            ["crm_connections.tenant_id", "crm_connections.id"],
            name=op.f("fk_account_mappings_tenant_id_crm_connection_id_crm_connections"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_account_mappings_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_account_mappings")),
    )
    op.create_index(
        "uq_account_mappings_tenant_id_connection_domain_live",
        "account_mappings",
        ["tenant_id", "crm_connection_id", "email_domain"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "meeting_sessions",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("crm_connection_id", sa.UUID(), nullable=True),
        sa.Column("fathom_recording_id", sa.Text(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("meeting_url", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_seconds", sa.Integer(), nullable=True),
        sa.Column(
            "participants",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column(
            "action_items",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("ai_output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("processing_error", sa.Text(), nullable=True),
        sa.Column("processing_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("processing_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("crm_sync_status", sa.Text(), server_default="not_synced", nullable=False),
        sa.Column("crm_record_id", sa.Text(), nullable=True),
        sa.Column("crm_sync_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("crm_last_error", sa.Text(), nullable=True),
        sa.Column("crm_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "crm_sync_status IN ('not_synced', 'pending', 'synced', 'failed')",
            name=op.f("ck_meeting_sessions_crm_sync_status"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed')",
            name=op.f("ck_meeting_sessions_status"),
        ),
        sa.CheckConstraint(
            "duration_seconds >= 0", name=op.f("ck_meeting_sessions_duration_seconds_non_negative")
        ),
        sa.CheckConstraint(
            "processing_attempts >= 0 AND crm_sync_attempts >= 0",
            name=op.f("ck_meeting_sessions_attempts_non_negative"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "crm_connection_id"],
            ["crm_connections.tenant_id", "crm_connections.id"],
            name=op.f("fk_meeting_sessions_tenant_id_crm_connection_id_crm_connections"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["users.tenant_id", "users.id"],
            name=op.f("fk_meeting_sessions_tenant_id_user_id_users"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_meeting_sessions_tenant_id_tenants"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_meeting_sessions")),
    )
    op.create_index(
        "ix_meeting_sessions_tenant_id_created_at_live",
        "meeting_sessions",
        ["tenant_id", sa.literal_column("created_at DESC")],
        unique=False,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_index(
        "ix_meeting_sessions_tenant_id_created_at_pending",
        "meeting_sessions",
        ["tenant_id", "created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending' AND deleted_at IS NULL"),
    )
    op.create_index(
        "ix_meeting_sessions_tenant_id_user_id_created_at_live",
        "meeting_sessions",
        ["tenant_id", "user_id", sa.literal_column("created_at DESC")],
        unique=False,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_index(
        "uq_meeting_sessions_tenant_id_fathom_recording_id_live",
        "meeting_sessions",
        ["tenant_id", "fathom_recording_id"],
        unique=True,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )


def _secure(role: str) -> None:
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE "{role}" NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
            ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}'
                          AND (rolsuper OR rolbypassrls)) THEN
                ALTER ROLE "{role}" NOSUPERUSER NOBYPASSRLS;
            END IF;
            IF NOT pg_has_role(current_user, '{role}', 'MEMBER') THEN
                EXECUTE format('GRANT %I TO %I', '{role}', current_user);
            END IF;
        END
        $$
        """
    )
    op.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
    op.execute(f'GRANT SELECT, UPDATE ON tenants TO "{role}"')
    for table in TENANT_OWNED:
        privileges = "SELECT, INSERT" if table == "audit_logs" else "SELECT, INSERT, UPDATE"
        op.execute(f'GRANT {privileges} ON {table} TO "{role}"')
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
    # tenants is global: the owner (the directory) reads all of it; the app role its own row.
    op.execute("ALTER TABLE tenants ENABLE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_self ON tenants "
        f"USING (id = {CURRENT_TENANT}) WITH CHECK (id = {CURRENT_TENANT})"
    )
    op.execute(
        f"""
        CREATE FUNCTION sfdb_require_tenant() RETURNS void
        LANGUAGE plpgsql STABLE AS $$
        BEGIN
            IF NOT EXISTS (
                SELECT FROM tenants WHERE id = {CURRENT_TENANT} AND deleted_at IS NULL
            ) THEN
                RAISE EXCEPTION 'the tenant of this transaction is unknown or soft-deleted'
                    USING ERRCODE = 'no_data_found';
            END IF;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION sfdb_audit_logs_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_logs_append_only BEFORE UPDATE OR DELETE ON audit_logs "
        "FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs "
        "FOR EACH STATEMENT EXECUTE FUNCTION sfdb_audit_logs_append_only()"
    )
