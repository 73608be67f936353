"""Slack installations, bots and OAuth states: Bolt's stores on the tenant directory.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

* ``slack_installations`` and ``slack_bots`` are tenant-owned like every
  other table: key ``(tenant_id, id)``, forced row-level security with the
  tenant policy, a foreign key to ``tenants``. Their secrets (tokens, the
  webhook URL) are ciphertexts made by the application. The app role may read
  them and update the token columns (a token refresh, in a tenant
  transaction); nothing else.
* ``slack_oauth_states`` keeps the SHA-256 digest of each OAuth ``state``
  and its expiry; no role holds it.
* What Bolt does before it knows the tenant runs through functions of the
  owner that the directory role may call, each for the workspace (or
  Enterprise Grid organisation) it names, like ``sfdb_resolve_tenant``:
  find the newest installation and bot (one statement), save an install
  (the tenant installed or reactivated, the installation, the bot and an
  audit event in one statement), delete tokens (for ``app_uninstalled`` also
  soft-deleting the tenant once no app has anything left there), issue and
  consume a state (one ``DELETE``: a state is consumed once, whoever races
  for it). The audit events they write are made from the rows, never taken
  from the caller.
* Those functions run as the owner, whom row-level security is forced on as
  on everybody: the ``owner_maintains`` policies let the owner read and write
  the two installation tables (and ``sfdb rotate-token-keys`` re-encrypt
  them), and ``owner_records`` lets it add audit rows; those policies name
  the owner only. Writing as one role keeps a Citus transaction on one set of
  connections to the workers.

``downgrade()`` drops all of it.
"""

from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa
from alembic import context, op

from slack_fathom_db.roles import LayerRoles, migration_roles

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
CURRENT_TENANT: Final = "NULLIF(current_setting('app.tenant_id', true), '')::uuid"
TABLES: Final = ("slack_installations", "slack_bots")
SHARED: Final = (
    "client_id",
    "app_id",
    "enterprise_id",
    "enterprise_name",
    "team_id",
    "team_name",
    "bot_id",
    "bot_user_id",
    "bot_scopes",
    "bot_token",
    "bot_refresh_token",
    "bot_token_expires_at",
    "is_enterprise_install",
    "installed_at",
)
INSTALLATION_ONLY: Final = (
    "enterprise_url",
    "user_id",
    "user_scopes",
    "user_token",
    "user_refresh_token",
    "user_token_expires_at",
    "incoming_webhook_url",
    "incoming_webhook_channel",
    "incoming_webhook_channel_id",
    "incoming_webhook_configuration_url",
    "token_type",
)
BOT_COLUMNS: Final = ("id", *SHARED)
INSTALLATION_COLUMNS: Final = ("id", *SHARED, *INSTALLATION_ONLY)
TOKEN_UPDATES: Final = {
    "slack_installations": "bot_token, bot_refresh_token, bot_token_expires_at, "
    "user_token, user_refresh_token, user_token_expires_at, updated_at",
    "slack_bots": "bot_token, bot_refresh_token, bot_token_expires_at, updated_at",
}
INSTALL_EXPRESSIONS: Final = (
    sa.text("coalesce(enterprise_id, '')"),
    sa.text("coalesce(team_id, '')"),
)
CONFLICT_TARGET: Final = (
    "(tenant_id, client_id, coalesce(enterprise_id, ''), coalesce(team_id, ''), installed_at)"
)
FUNCTIONS: Final = (
    "sfdb_find_slack_installation(text, text, text, text, text)",
    "sfdb_find_slack_bot(text, text, text, text)",
    "sfdb_save_slack_installation(text, text, text, jsonb, jsonb)",
    "sfdb_delete_slack_installations(text, text, text, text, text, text)",
    "sfdb_issue_slack_oauth_state(bytea, integer)",
    "sfdb_consume_slack_oauth_state(bytea)",
)


def _roles() -> LayerRoles:
    return migration_roles(context.config.attributes)


def _identity_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("app_id", sa.Text(), nullable=True),
        sa.Column("enterprise_id", sa.String(length=32), nullable=True),
        sa.Column("enterprise_name", sa.Text(), nullable=True),
        sa.Column("team_id", sa.String(length=32), nullable=True),
        sa.Column("team_name", sa.Text(), nullable=True),
        sa.Column("bot_id", sa.Text(), nullable=True),
        sa.Column("bot_user_id", sa.Text(), nullable=True),
        sa.Column("bot_scopes", sa.Text(), nullable=True),
        sa.Column("bot_token", sa.LargeBinary(), nullable=True),
        sa.Column("bot_refresh_token", sa.LargeBinary(), nullable=True),
        sa.Column("bot_token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "is_enterprise_install", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("installed_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _timestamps() -> list[sa.Column[Any]]:
    return [
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    ]


def _keys(table: str) -> list[sa.Constraint]:
    return [
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=f"fk_{table}_tenant_id_tenants", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=f"pk_{table}"),
    ]


def _create_tables() -> None:
    op.create_table(
        "slack_installations",
        *_identity_columns(),
        sa.Column("enterprise_url", sa.Text(), nullable=True),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("user_scopes", sa.Text(), nullable=True),
        sa.Column("user_token", sa.LargeBinary(), nullable=True),
        sa.Column("user_refresh_token", sa.LargeBinary(), nullable=True),
        sa.Column("user_token_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("incoming_webhook_url", sa.LargeBinary(), nullable=True),
        sa.Column("incoming_webhook_channel", sa.Text(), nullable=True),
        sa.Column("incoming_webhook_channel_id", sa.Text(), nullable=True),
        sa.Column("incoming_webhook_configuration_url", sa.Text(), nullable=True),
        sa.Column("token_type", sa.Text(), nullable=True),
        *_timestamps(),
        *_keys("slack_installations"),
    )
    op.create_table("slack_bots", *_identity_columns(), *_timestamps(), *_keys("slack_bots"))
    for table in TABLES:
        # One row per install moment (saving it again, as a refresh does, replaces it), a
        # missing org or workspace counted as ''; the same index finds the newest install.
        op.create_index(
            f"uq_{table}_install",
            table,
            ["tenant_id", "client_id", *INSTALL_EXPRESSIONS, "installed_at"],
            unique=True,
        )
    op.create_index(
        "ix_slack_installations_tenant_id_user_id",
        "slack_installations",
        ["tenant_id", "client_id", "user_id", sa.text("installed_at DESC")],
    )
    op.create_table(
        "slack_oauth_states",
        sa.Column("state_digest", sa.LargeBinary(), nullable=False),
        sa.Column("expire_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("state_digest", name="pk_slack_oauth_states"),
    )
    op.create_index("ix_slack_oauth_states_expire_at", "slack_oauth_states", ["expire_at"])


def _protect(roles: LayerRoles) -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
        op.execute(
            f'CREATE POLICY owner_maintains ON {table} TO "{roles.owner}" '
            "USING (true) WITH CHECK (true)"
        )
        op.execute(f'REVOKE ALL ON {table} FROM PUBLIC, "{roles.app}", "{roles.directory}"')
        op.execute(f'GRANT SELECT, UPDATE ({TOKEN_UPDATES[table]}) ON {table} TO "{roles.app}"')
    op.execute(
        f'CREATE POLICY owner_records ON audit_logs FOR INSERT TO "{roles.owner}" WITH CHECK (true)'
    )
    op.execute(f'REVOKE ALL ON slack_oauth_states FROM PUBLIC, "{roles.app}", "{roles.directory}"')


def _select(table: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{table}.{column}" for column in columns)


def _functions() -> dict[str, str]:
    installation = _select("i", INSTALLATION_COLUMNS)
    bot = _select("b", BOT_COLUMNS)
    # The filters Bolt's lookups use (slack_sdk's semantics): the app, then the org and
    # workspace exactly as named (a missing one is NULL), the newest first.
    same_install = (
        "tenant_id = v_tenant AND client_id = p_client_id "
        "AND coalesce(enterprise_id, '') = coalesce(p_enterprise_id, '') "
        "AND coalesce(team_id, '') = coalesce(p_team_id, '')"
    )
    tenant = (
        "SELECT id INTO v_tenant FROM tenants WHERE slack_team_id = p_key AND deleted_at IS NULL;\n"
        "            IF v_tenant IS NULL THEN RETURN; END IF;"
    )
    out_installation = ", ".join(
        f"{column} {kind}" for column, kind in _types(INSTALLATION_COLUMNS, prefix="")
    )
    # The newest bot beside an installation: its columns named latest_<column>.
    out_latest = ", ".join(
        f"{column} {kind}" for column, kind in _types(BOT_COLUMNS, prefix="latest_")
    )
    out_bot = ", ".join(f"{column} {kind}" for column, kind in _types(BOT_COLUMNS, prefix=""))
    upsert = {
        table: ", ".join(f"{column} = EXCLUDED.{column}" for column in (*columns, "updated_at"))
        for table, columns in (
            ("slack_installations", INSTALLATION_COLUMNS),
            ("slack_bots", BOT_COLUMNS),
        )
    }
    return {
        # The newest installation of the app for the org/workspace (and user, if named),
        # with the newest bot that has a token beside it: one statement for Bolt.
        FUNCTIONS[0]: f"""
        CREATE FUNCTION sfdb_find_slack_installation(
            p_client_id text, p_key text, p_enterprise_id text, p_team_id text, p_user_id text
        ) RETURNS TABLE (tenant_id uuid, {out_installation}, {out_latest})
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
        #variable_conflict use_column
        DECLARE
            v_tenant uuid;
            i slack_installations;
            b slack_bots;
        BEGIN
            {tenant}
            SELECT * INTO i FROM slack_installations
            WHERE {same_install} AND (p_user_id IS NULL OR user_id = p_user_id)
            ORDER BY installed_at DESC LIMIT 1;
            IF i.id IS NULL THEN RETURN; END IF;
            SELECT * INTO b FROM slack_bots
            WHERE {same_install} AND bot_token IS NOT NULL
            ORDER BY installed_at DESC LIMIT 1;
            RETURN QUERY SELECT v_tenant, {installation}, {bot};
        END
        $$
        """,
        FUNCTIONS[1]: f"""
        CREATE FUNCTION sfdb_find_slack_bot(
            p_client_id text, p_key text, p_enterprise_id text, p_team_id text
        ) RETURNS TABLE (tenant_id uuid, {out_bot})
        LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
        #variable_conflict use_column
        DECLARE
            v_tenant uuid;
            b slack_bots;
        BEGIN
            {tenant}
            SELECT * INTO b FROM slack_bots
            WHERE {same_install} AND bot_token IS NOT NULL
            ORDER BY installed_at DESC LIMIT 1;
            IF b.id IS NULL THEN RETURN; END IF;
            RETURN QUERY SELECT v_tenant, {bot};
        END
        $$
        """,
        # Installs (or reactivates) the tenant and writes the installation, its bot and
        # an audit event: one statement, so all of it or nothing. A row of the same
        # install moment (a token refresh saved again) is replaced. Rows must belong to
        # the org/workspace named; the audit event is made here, from the rows.
        FUNCTIONS[2]: f"""
        CREATE FUNCTION sfdb_save_slack_installation(
            p_key text, p_team_name text, p_enterprise_id text,
            p_installation jsonb, p_bot jsonb
        ) RETURNS uuid
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
        DECLARE
            v_tenant uuid;
            v_now timestamptz := now();
            i slack_installations;
            b slack_bots;
        BEGIN
            IF p_installation IS NULL AND p_bot IS NULL THEN
                RAISE EXCEPTION 'nothing to save' USING ERRCODE = 'invalid_parameter_value';
            END IF;
            i := jsonb_populate_record(NULL::slack_installations, p_installation);
            b := jsonb_populate_record(NULL::slack_bots, p_bot);
            IF (p_installation IS NOT NULL
                AND coalesce(i.team_id, i.enterprise_id) IS DISTINCT FROM p_key)
               OR (p_bot IS NOT NULL
                AND coalesce(b.team_id, b.enterprise_id) IS DISTINCT FROM p_key)
            THEN
                RAISE EXCEPTION 'an installation is saved for its own org or workspace'
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            INSERT INTO tenants AS t
                (slack_team_id, slack_team_name, slack_enterprise_id, updated_at)
            VALUES (p_key, p_team_name, p_enterprise_id, v_now)
            ON CONFLICT (slack_team_id) DO UPDATE
                SET slack_team_name = EXCLUDED.slack_team_name,
                    slack_enterprise_id = EXCLUDED.slack_enterprise_id,
                    deleted_at = NULL,
                    updated_at = EXCLUDED.updated_at
            RETURNING id INTO v_tenant;
            IF p_installation IS NOT NULL THEN
                i.tenant_id := v_tenant;
                i.created_at := v_now;
                i.updated_at := v_now;
                INSERT INTO slack_installations VALUES (i.*)
                ON CONFLICT {CONFLICT_TARGET}
                DO UPDATE SET {upsert["slack_installations"]};
            END IF;
            IF p_bot IS NOT NULL THEN
                b.tenant_id := v_tenant;
                b.created_at := v_now;
                b.updated_at := v_now;
                INSERT INTO slack_bots VALUES (b.*)
                ON CONFLICT {CONFLICT_TARGET}
                DO UPDATE SET {upsert["slack_bots"]};
            END IF;
            IF p_installation IS NOT NULL THEN
                PERFORM sfdb_record_slack_event(v_tenant, jsonb_build_object(
                    'event_type', 'slack.installed',
                    'event_category', 'admin',
                    'action_description', CASE WHEN i.bot_token IS NULL
                        THEN 'Slack user authorized the app' ELSE 'Slack app installed' END,
                    'resource_type', 'slack_installation',
                    'resource_id', i.id::text,
                    'metadata', jsonb_build_object(
                        'client_id', left(i.client_id, 255),
                        'slack_user_id', i.user_id,
                        'is_enterprise_install', i.is_enterprise_install,
                        'bot_scopes', left(i.bot_scopes, 2000),
                        'user_scopes', left(i.user_scopes, 2000))
                ), v_now);
            ELSE
                PERFORM sfdb_record_slack_event(v_tenant, jsonb_build_object(
                    'event_type', 'slack.bot_saved',
                    'event_category', 'admin',
                    'action_description', 'Slack bot token saved',
                    'resource_type', 'slack_bot',
                    'resource_id', b.id::text,
                    'metadata', jsonb_build_object(
                        'client_id', left(b.client_id, 255),
                        'is_enterprise_install', b.is_enterprise_install)
                ), v_now);
            END IF;
            RETURN v_tenant;
        END
        $$
        """,
        # Deletes the tokens of the org/workspace named, soft-deleted or not: its bots
        # (and the copy of their token on installations), its installations (one user's,
        # if named), or, for 'uninstall', all of them, and then the tenant too once no
        # app has anything left there. Locks in the order a save (the tenant first) and a
        # refresh (installations, then bots, each in id order) take them. An audit event
        # records what went.
        FUNCTIONS[3]: f"""
        CREATE FUNCTION sfdb_delete_slack_installations(
            p_client_id text, p_key text, p_enterprise_id text, p_team_id text,
            p_user_id text, p_what text
        ) RETURNS integer
        LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
        DECLARE
            v_tenant uuid;
            v_live boolean;
            v_bots integer := 0;
            v_installations integer := 0;
            v_cleared integer := 0;
            v_uninstalled boolean := false;
            v_now timestamptz := now();
        BEGIN
            IF p_what IS NULL OR p_what NOT IN ('bots', 'installations', 'uninstall') THEN
                RAISE EXCEPTION 'unknown deletion: %', p_what
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            SELECT id, deleted_at IS NULL INTO v_tenant, v_live
            FROM tenants WHERE slack_team_id = p_key;
            IF v_tenant IS NULL THEN RETURN 0; END IF;
            IF p_what = 'uninstall' AND v_live THEN
                UPDATE tenants SET updated_at = v_now WHERE id = v_tenant;
            END IF;
            PERFORM 1 FROM slack_installations WHERE {same_install} ORDER BY id FOR UPDATE;
            PERFORM 1 FROM slack_bots WHERE {same_install} ORDER BY id FOR UPDATE;
            IF p_what = 'bots' THEN
                -- The installations keep a copy of their bot's token: it goes too, so a
                -- revoked token is never handed out again.
                UPDATE slack_installations
                SET bot_token = NULL, bot_refresh_token = NULL, bot_token_expires_at = NULL,
                    updated_at = v_now
                WHERE {same_install} AND bot_token IS NOT NULL;
                GET DIAGNOSTICS v_cleared = ROW_COUNT;
            END IF;
            IF p_what <> 'bots' THEN
                DELETE FROM slack_installations
                WHERE {same_install} AND (p_user_id IS NULL OR user_id = p_user_id);
                GET DIAGNOSTICS v_installations = ROW_COUNT;
            END IF;
            IF p_what <> 'installations' THEN
                DELETE FROM slack_bots WHERE {same_install};
                GET DIAGNOSTICS v_bots = ROW_COUNT;
            END IF;
            IF p_what = 'uninstall' AND v_live
               AND NOT EXISTS (SELECT FROM slack_installations WHERE tenant_id = v_tenant)
               AND NOT EXISTS (SELECT FROM slack_bots WHERE tenant_id = v_tenant)
            THEN
                UPDATE tenants SET deleted_at = v_now, updated_at = v_now WHERE id = v_tenant;
                v_uninstalled := true;
            END IF;
            IF v_bots + v_installations + v_cleared > 0 OR v_uninstalled THEN
                PERFORM sfdb_record_slack_event(v_tenant, jsonb_build_object(
                    'event_type', CASE WHEN p_what = 'uninstall'
                        THEN 'slack.uninstalled' ELSE 'slack.tokens_deleted' END,
                    'event_category', 'security',
                    'action_description', CASE p_what
                        WHEN 'uninstall' THEN 'Slack app uninstalled; tokens deleted'
                        WHEN 'bots' THEN 'Slack bot tokens revoked'
                        ELSE 'Slack tokens revoked' END,
                    'resource_type', 'slack_installation',
                    'metadata', jsonb_build_object(
                        'client_id', left(p_client_id, 255),
                        'slack_user_id', left(p_user_id, 32),
                        'bots', v_bots,
                        'installations', v_installations,
                        'tenant_soft_deleted', v_uninstalled)
                ), v_now);
            END IF;
            RETURN v_bots + v_installations + v_cleared;
        END
        $$
        """,
        # A new state (valid for a day at most, whatever the caller asks), and up to 100
        # expired ones purged on the way.
        FUNCTIONS[4]: f"""
        CREATE FUNCTION sfdb_issue_slack_oauth_state(p_digest bytea, p_seconds integer)
        RETURNS void
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
            DELETE FROM slack_oauth_states WHERE state_digest IN (
                SELECT state_digest FROM slack_oauth_states WHERE expire_at <= now()
                ORDER BY expire_at LIMIT 100 FOR UPDATE SKIP LOCKED
            );
            INSERT INTO slack_oauth_states (state_digest, expire_at)
            VALUES (
                p_digest, now() + make_interval(secs => least(greatest(p_seconds, 1), 86400))
            );
        $$
        """,
        # One DELETE: of concurrent callers with the same state, one gets the row and
        # the others wait for it and find it gone. An expired state is deleted too.
        FUNCTIONS[5]: f"""
        CREATE FUNCTION sfdb_consume_slack_oauth_state(p_digest bytea) RETURNS boolean
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
            WITH consumed AS (
                DELETE FROM slack_oauth_states WHERE state_digest = p_digest
                RETURNING expire_at
            )
            SELECT coalesce(bool_or(expire_at > now()), false) FROM consumed
        $$
        """,
    }


_TYPES: Final = {
    "id": "uuid",
    "is_enterprise_install": "boolean",
    "enterprise_id": "varchar",
    "team_id": "varchar",
    "user_id": "varchar",
}


def _types(columns: tuple[str, ...], *, prefix: str) -> list[tuple[str, str]]:
    def kind(column: str) -> str:
        if column in _TYPES:
            return _TYPES[column]
        if column.endswith("_at"):
            return "timestamptz"
        if column.endswith("_token") or column == "incoming_webhook_url":
            return "bytea"
        return "text"

    return [(f"{prefix}{column}", kind(column)) for column in columns]


_RECORD_EVENT: Final = f"""
CREATE FUNCTION sfdb_record_slack_event(p_tenant uuid, p_event jsonb, p_now timestamptz)
RETURNS void
LANGUAGE sql VOLATILE SET search_path = {SEARCH_PATH} AS $$
    INSERT INTO audit_logs (tenant_id, id, event_type, event_category, action_description,
                            status, resource_type, resource_id, metadata, created_at)
    VALUES (p_tenant, gen_random_uuid(), p_event ->> 'event_type', p_event ->> 'event_category',
            p_event ->> 'action_description', coalesce(p_event ->> 'status', 'success'),
            p_event ->> 'resource_type', p_event ->> 'resource_id',
            coalesce(p_event -> 'metadata', '{{}}'), p_now)
$$
"""


def upgrade() -> None:
    roles = _roles()
    # Made by the migrating login and handed to the owner, as revision 0006 made its
    # objects: on a Citus cluster distributed before then, the workers may not know the
    # owner yet, and a coordinator creates what it propagates as the role in effect
    # (a table with a key to the reference table tenants, a function). Handing an object
    # to the owner brings the role to the workers first; sfdb distribute then
    # distributes the new tables.
    op.execute("RESET ROLE")
    _create_tables()
    for table in (*TABLES, "slack_oauth_states"):
        op.execute(f'ALTER TABLE {table} OWNER TO "{roles.owner}"')
    _protect(roles)
    op.execute(_RECORD_EVENT)
    for signature, definition in (
        ("sfdb_record_slack_event(uuid, jsonb, timestamptz)", None),
        *_functions().items(),
    ):
        if definition is not None:
            op.execute(definition)
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f'ALTER FUNCTION {signature} OWNER TO "{roles.owner}"')
        if definition is not None:
            op.execute(f'GRANT EXECUTE ON FUNCTION {signature} TO "{roles.directory}"')
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')


def downgrade() -> None:
    for signature in FUNCTIONS:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute("DROP FUNCTION sfdb_record_slack_event(uuid, jsonb, timestamptz)")
    op.execute("DROP POLICY owner_records ON audit_logs")
    op.drop_table("slack_oauth_states")
    op.drop_table("slack_bots")
    op.drop_table("slack_installations")
