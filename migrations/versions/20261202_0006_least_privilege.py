"""Least privilege: a non-login owner, an app and a directory role with column grants.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

* The **owner** (``<prefix>_owner``, NOLOGIN) takes over every table and
  function; the migrating login becomes a member, and later migrations run
  as the owner (``migrations/env.py`` sets the role), so whatever they create
  is the owner's too.
* The **app role** keeps exactly what units of work use, column by column for
  UPDATE: nobody at runtime updates an id, a ``tenant_id``, ``created_at`` or
  ``slack_team_id``; audit rows take their ``id`` and ``created_at`` from the
  server (a trigger), whatever an insert says. The new **directory role**
  (``<prefix>_directory``) holds no table: it may run the directory's three
  functions (resolve, install, uninstall a workspace it names) and the
  rate-limit function, nothing else.
* ``sfdb_consume_rate_limit()`` becomes SECURITY DEFINER, so it cannot leave
  its role or tenant in the caller's transaction (both are restored when it
  returns); only the directory role may call it.
* ``EXECUTE`` on every function is revoked from PUBLIC (also for functions
  the owner creates later), and every function pins its ``search_path``.
* ``TEMPORARY`` and ``CONNECT`` on the database and every privilege on schema
  ``public`` are revoked from PUBLIC: no temp table or object can shadow the
  layer's tables, and a role of another database cannot even connect.
  ``CONNECT`` goes to the layer's roles and the migrating login; runtime
  logins get it from ``sfdb create-login``.

``downgrade()`` puts the grants, the ownership and the function of revision
0005 back and drops the owner and directory roles (each unless another
database of the cluster still uses it).
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import LayerRoles, migration_roles

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES: Final = (
    "tenants",
    "users",
    "crm_connections",
    "account_mappings",
    "meeting_sessions",
    "audit_logs",
    "api_rate_limits",
)
FUNCTIONS: Final = (
    "sfdb_require_tenant()",
    "sfdb_audit_logs_append_only()",
    "sfdb_consume_rate_limit(uuid, text, text, timestamptz, integer, integer, integer)",
    "sfdb_window_end(text, timestamptz)",
)
SEARCH_PATH: Final = "pg_catalog, public, pg_temp"

# role -> table -> (privilege, columns or None for the whole table). INSERT is granted on
# the whole table: a Citus coordinator sends every column of a new row to the shard (the
# defaults it computed included), so a column-level INSERT grant would refuse every
# insert there. What an insert may not choose is set by a trigger instead (audit rows).
APP_GRANTS: Final[dict[str, list[tuple[str, str | None]]]] = {
    "tenants": [
        ("SELECT", None),
        (
            "UPDATE",
            "slack_team_name, plan_tier, subscription_status, trial_ends_at, settings, "
            "updated_at, deleted_at",
        ),
    ],
    "users": [
        ("SELECT", None),
        ("INSERT", None),
        ("UPDATE", "slack_email, display_name, role, updated_at, deleted_at"),
    ],
    "crm_connections": [
        ("SELECT", None),
        ("INSERT", None),
        ("UPDATE", "is_default, status, updated_at, deleted_at"),
    ],
    "account_mappings": [
        ("SELECT", None),
        ("INSERT", None),
        (
            "UPDATE",
            "crm_account_id, crm_account_name, verified, last_used_at, updated_at, deleted_at",
        ),
    ],
    "meeting_sessions": [
        ("SELECT", None),
        ("INSERT", None),
        (
            "UPDATE",
            "status, summary, action_items, ai_output, processing_error, processing_attempts, "
            "processing_started_at, processing_lease_expires_at, processed_at, "
            "crm_sync_status, crm_record_id, crm_sync_attempts, crm_last_error, "
            "crm_synced_at, version, updated_at, deleted_at",
        ),
    ],
    "audit_logs": [
        ("SELECT", None),
        ("INSERT", None),
    ],
    "api_rate_limits": [
        ("SELECT", None),
        ("INSERT", None),
        ("UPDATE", "request_count, tokens, updated_at"),
    ],
}
DIRECTORY_FUNCTIONS: Final = {
    # The directory's three statements, as functions of the owner: the directory role may
    # run them and nothing else, so it can look up a workspace it names but never list
    # the workspaces or change a row any other way.
    "sfdb_resolve_tenant(text)": """
        CREATE FUNCTION sfdb_resolve_tenant(p_slack_team_id text) RETURNS uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {path} AS $$
            SELECT id FROM tenants
            WHERE slack_team_id = p_slack_team_id AND deleted_at IS NULL
        $$
    """,
    "sfdb_install_tenant(text, text, text, text)": """
        CREATE FUNCTION sfdb_install_tenant(
            p_slack_team_id text, p_slack_team_name text, p_plan_tier text,
            p_slack_enterprise_id text
        ) RETURNS uuid
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = {path} AS $$
            INSERT INTO tenants AS t
                (slack_team_id, slack_team_name, plan_tier, slack_enterprise_id, updated_at)
            VALUES (p_slack_team_id, p_slack_team_name, p_plan_tier, p_slack_enterprise_id, now())
            ON CONFLICT (slack_team_id) DO UPDATE
                SET slack_team_name = EXCLUDED.slack_team_name,
                    slack_enterprise_id = EXCLUDED.slack_enterprise_id,
                    deleted_at = NULL,
                    updated_at = EXCLUDED.updated_at
            RETURNING id
        $$
    """,
    "sfdb_uninstall_tenant(text)": """
        CREATE FUNCTION sfdb_uninstall_tenant(p_slack_team_id text) RETURNS uuid
        LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = {path} AS $$
            UPDATE tenants SET deleted_at = now(), updated_at = now()
            WHERE slack_team_id = p_slack_team_id AND deleted_at IS NULL
            RETURNING id
        $$
    """,
}
# What revision 0001 granted the app role, for downgrade().
OLD_APP_GRANTS: Final = {
    "tenants": "SELECT, UPDATE",
    "audit_logs": "SELECT, INSERT",
    **{
        table: "SELECT, INSERT, UPDATE"
        for table in ("users", "crm_connections", "account_mappings", "meeting_sessions")
    },
    "api_rate_limits": "SELECT, INSERT, UPDATE",
}

_RATE_LIMIT_FUNCTION: Final = """
CREATE OR REPLACE FUNCTION sfdb_consume_rate_limit(
    p_tenant uuid, p_resource text, p_period text, p_window_start timestamptz,
    p_cost integer, p_limit integer, p_lock_timeout_ms integer,
    OUT granted integer, OUT prior integer
) LANGUAGE plpgsql {header} AS $$
{declare}BEGIN
    {switch}
    -- The statement timeout of a unit of work cannot arm itself from inside the
    -- statement; a hot counter's wait is a lock wait, so bound that instead.
    PERFORM set_config('lock_timeout', p_lock_timeout_ms::text, true);
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    PERFORM sfdb_require_tenant();
    SELECT request_count INTO prior FROM api_rate_limits
    WHERE tenant_id = p_tenant AND resource_type = p_resource
      AND period = p_period AND window_start = p_window_start;
    IF p_cost > p_limit THEN{restore}
        RETURN;
    END IF;
    INSERT INTO api_rate_limits AS counter
        (tenant_id, resource_type, period, window_start, request_count, updated_at)
    VALUES (p_tenant, p_resource, p_period, p_window_start, p_cost, now())
    ON CONFLICT (tenant_id, resource_type, period, window_start) DO UPDATE
        SET request_count = counter.request_count + EXCLUDED.request_count,
            updated_at = EXCLUDED.updated_at
        WHERE counter.request_count + EXCLUDED.request_count <= p_limit
    RETURNING counter.request_count INTO granted;{restore}
END
$$
"""
# Runs as the owner, under the forced row-level security of the tenant it sets. The
# caller's role is never changed (a definer's role ends with the call), its lock
# timeout is restored by the SET clause, and its tenant setting by the function
# itself (only a superuser may put a placeholder setting in a SET clause).
_DEFINER: Final = f"SECURITY DEFINER SET search_path = {SEARCH_PATH} SET lock_timeout = 0"
_SAVE: Final = "DECLARE\n    caller_tenant text := current_setting('app.tenant_id', true);\n"
_RESTORE: Final = "\n    PERFORM set_config('app.tenant_id', coalesce(caller_tenant, ''), true);"


def _roles() -> LayerRoles:
    return migration_roles(context.config.attributes)


def _on_this_database(statement: str) -> None:
    """Run ``statement`` with ``%I`` standing for this database's name.

    The name is the server's (``current_database()``), read where the statement runs,
    so the same SQL works online and in the script of ``alembic upgrade --sql``.
    """
    literal = "'" + statement.replace("'", "''") + "'"
    op.execute(f"DO $$ BEGIN EXECUTE format({literal}, current_database()); END $$")


def _create_role(name: str) -> None:
    # On Citus the coordinator connects to the workers as the role in effect, which must
    # then be able to log in (as sfdb distribute arranges for roles made before).
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') THEN
                EXECUTE format(
                    'CREATE ROLE %I %s NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE',
                    '{name}',
                    CASE WHEN EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')
                        THEN 'LOGIN' ELSE 'NOLOGIN' END
                );
            END IF;
        END
        $$
        """
    )


def _grant(role: str, grants: dict[str, list[tuple[str, str | None]]]) -> None:
    for table, privileges in grants.items():
        for privilege, columns in privileges:
            on = f"{privilege} ({columns})" if columns else privilege
            op.execute(f'GRANT {on} ON {table} TO "{role}"')


def upgrade() -> None:
    roles = _roles()
    _create_role(roles.owner)
    _create_role(roles.directory)
    op.execute(f'GRANT "{roles.owner}" TO CURRENT_USER')

    # The schema and the database: nothing for PUBLIC.
    op.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    op.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{roles.owner}"')
    op.execute(f'GRANT USAGE ON SCHEMA public TO "{roles.app}", "{roles.directory}"')
    _on_this_database("REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC")
    # The layer's roles too: on Citus the coordinator connects to the workers as them.
    _on_this_database(
        f'GRANT CONNECT ON DATABASE %I TO CURRENT_USER, "{roles.owner}", '
        f'"{roles.app}", "{roles.directory}"'
    )

    # Ownership: every table and function of the layer is the owner's.
    for table in (*TABLES, "alembic_version"):
        op.execute(f'ALTER TABLE {table} OWNER TO "{roles.owner}"')
    for function in FUNCTIONS:
        op.execute(f'ALTER FUNCTION {function} OWNER TO "{roles.owner}"')

    # Grants, column by column.
    for table in TABLES:
        op.execute(f'REVOKE ALL ON {table} FROM PUBLIC, "{roles.app}", "{roles.directory}"')
    _grant(roles.app, APP_GRANTS)
    for signature, definition in DIRECTORY_FUNCTIONS.items():
        op.execute(definition.format(path=SEARCH_PATH))
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f'ALTER FUNCTION {signature} OWNER TO "{roles.owner}"')
        op.execute(f'GRANT EXECUTE ON FUNCTION {signature} TO "{roles.directory}"')
    # Revision 0004 gave the purge's policies to the role that migrated; now the owner's.
    for policy in ("select_ended_windows", "delete_ended_windows"):
        op.execute(f'ALTER POLICY {policy} ON api_rate_limits TO "{roles.owner}"')

    # Functions: no EXECUTE for PUBLIC, now or later; a pinned search_path.
    op.execute(
        _RATE_LIMIT_FUNCTION.format(header=_DEFINER, declare=_SAVE, switch="", restore=_RESTORE)
    )
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"ALTER FUNCTION {function} SET search_path = {SEARCH_PATH}")
    op.execute(
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{roles.owner}" REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC'
    )
    op.execute(f'GRANT EXECUTE ON FUNCTION sfdb_require_tenant() TO "{roles.app}"')
    op.execute(f'GRANT SELECT ON alembic_version TO "{roles.directory}"')  # for sfdb check
    op.execute(f'GRANT EXECUTE ON FUNCTION {FUNCTIONS[2]} TO "{roles.directory}"')

    # Audit rows take their id and creation time from the server, whatever an insert
    # says, unless the owner writes them (a restore keeps the evidence as it was).
    op.execute(
        f"""
        CREATE FUNCTION sfdb_audit_logs_server_fields() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {SEARCH_PATH} AS $$
        BEGIN
            IF NOT pg_has_role(current_user, '{roles.owner}', 'MEMBER') THEN
                NEW.id := gen_random_uuid();
                NEW.created_at := now();
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION sfdb_audit_logs_server_fields() FROM PUBLIC")
    op.execute(f'ALTER FUNCTION sfdb_audit_logs_server_fields() OWNER TO "{roles.owner}"')
    op.execute(
        "CREATE TRIGGER audit_logs_server_fields BEFORE INSERT ON audit_logs "
        "FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_server_fields()"
    )

    # The rest of this upgrade, and every later migration, runs as the owner.
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')


def downgrade() -> None:
    roles = _roles()
    op.execute("RESET ROLE")  # the owner cannot give its objects back; its member can
    op.execute("DROP TRIGGER audit_logs_server_fields ON audit_logs")
    op.execute("DROP FUNCTION sfdb_audit_logs_server_fields()")
    op.execute(
        f'ALTER DEFAULT PRIVILEGES FOR ROLE "{roles.owner}" GRANT EXECUTE ON FUNCTIONS TO PUBLIC'
    )
    op.execute(
        _RATE_LIMIT_FUNCTION.format(
            header="SECURITY INVOKER",
            declare="",
            switch=f'SET LOCAL ROLE "{roles.app}";',
            restore="",
        )
    )
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} RESET search_path")
        op.execute(f'REVOKE ALL ON FUNCTION {function} FROM "{roles.app}", "{roles.directory}"')
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
        op.execute(f"ALTER FUNCTION {function} OWNER TO CURRENT_USER")
    for signature in DIRECTORY_FUNCTIONS:
        op.execute(f"DROP FUNCTION {signature}")
    for policy in ("select_ended_windows", "delete_ended_windows"):
        op.execute(f"ALTER POLICY {policy} ON api_rate_limits TO CURRENT_USER")
    for table in TABLES:
        op.execute(f'REVOKE ALL ON {table} FROM "{roles.app}", "{roles.directory}"')
        op.execute(f'GRANT {OLD_APP_GRANTS[table]} ON {table} TO "{roles.app}"')
    op.execute(f'REVOKE ALL ON alembic_version FROM "{roles.directory}"')
    for table in (*TABLES, "alembic_version"):
        op.execute(f"ALTER TABLE {table} OWNER TO CURRENT_USER")
    _on_this_database(
        f'REVOKE CONNECT ON DATABASE %I FROM "{roles.owner}", "{roles.app}", "{roles.directory}"'
    )
    _on_this_database("GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC")
    op.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")
    op.execute(f'REVOKE ALL ON SCHEMA public FROM "{roles.owner}", "{roles.directory}"')
    for role in (roles.directory, roles.owner):
        # Cluster-wide roles: keep one that another database still uses.
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
