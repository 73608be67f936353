"""Erasure: a workspace's rows purged after its grace period, a user's on request.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

* ``tenants.purged_at``: when ``sfdb tenant purge``
  (:mod:`slack_fathom_db.erasure`) last finished erasing the workspace's rows;
  the row itself stays, emptied of its name and settings, as the audit log's
  anchor and the record of the erasure.
* ``tenants.uninstalled_at``: when the directory uninstalled the workspace, the
  time its grace period runs from. Only a member of the owner starts it (the
  directory's and the Slack installation store's functions, which stamp
  ``deleted_at`` with the server's time), by soft-deleting a live workspace;
  it goes when the workspace is live again. The trigger
  ``tenants_uninstalled_at`` keeps it so: the app role, which may soft-delete
  its own workspace and set ``deleted_at`` to any time, can neither start the
  clock nor move it (it would otherwise have its workspace purged at once).
  It copies ``deleted_at`` rather than reading the clock, so every copy of
  the row on a Citus cluster gets the same value.
* Audit rows are never deleted; erasure de-identifies them instead. The
  append-only trigger now lets a member of the owner make exactly one kind of
  update: every personal field (actor, address, user agent, description,
  metadata) emptied and ``personal_salt`` erased, every other column as it
  was (compared as the whole row, so a column added later is covered too),
  ``personal_digest`` included, so the chain still verifies and the
  digest, without its salt, reveals nothing. Any other update, every delete
  and truncation are refused as before, for everybody.
* ``owner_erases`` lets the owner make that update to the rows of the one
  workspace ``sfdb.lifecycle_tenant`` names (revision 0010's setting).

``downgrade()`` drops the columns, the trigger and the policy and puts the trigger's first
definition back (a row erased meanwhile stays erased).
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import migration_roles

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
LIFECYCLE_TENANT: Final = "NULLIF(current_setting('sfdb.lifecycle_tenant', true), '')::uuid"
PERSONAL: Final = (
    "'user_id', 'ip_address', 'user_agent', 'action_description', 'metadata', 'personal_salt'"
)
_APPEND_ONLY: Final = f"""
CREATE OR REPLACE FUNCTION sfdb_audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = {{path}} AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW'
        AND pg_has_role(current_user, '{{owner}}', 'MEMBER')
        AND NEW.user_id IS NULL AND NEW.ip_address IS NULL AND NEW.user_agent IS NULL
        AND NEW.action_description = '' AND NEW.metadata = '{{{{}}}}'::jsonb
        AND NEW.personal_salt IS NULL
        AND to_jsonb(NEW) - ARRAY[{PERSONAL}] = to_jsonb(OLD) - ARRAY[{PERSONAL}]
    THEN
        RETURN NEW;  -- erasure: the personal fields go, the commitment to them stays
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_UNINSTALLED_AT: Final = """
CREATE FUNCTION sfdb_tenants_uninstalled_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = {path} AS $$
BEGIN
    IF NEW.deleted_at IS NULL THEN
        NEW.uninstalled_at := NULL;
    ELSIF OLD.deleted_at IS NULL AND pg_has_role(current_user, '{owner}', 'MEMBER') THEN
        NEW.uninstalled_at := NEW.deleted_at;
    ELSE
        NEW.uninstalled_at := OLD.uninstalled_at;
    END IF;
    RETURN NEW;
END
$$
"""
# Revision 0001's, as revision 0006 left it.
_APPEND_ONLY_BEFORE: Final = """
CREATE OR REPLACE FUNCTION sfdb_audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = {path} AS $$
BEGIN
    RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""


def upgrade() -> None:
    owner = migration_roles(context.config.attributes).owner
    # As the migrating login, as revisions 0006 to 0009 (a Citus coordinator makes a
    # function on the workers as the role in effect, which they may not know yet).
    op.execute("RESET ROLE")
    op.execute("ALTER TABLE tenants ADD COLUMN purged_at timestamptz")
    op.execute("ALTER TABLE tenants ADD COLUMN uninstalled_at timestamptz")
    # The workspaces uninstalled so far: by the directory, or their own soft delete (which
    # the trigger below no longer counts), whose times are all there is to go by.
    op.execute("UPDATE tenants SET uninstalled_at = deleted_at WHERE deleted_at IS NOT NULL")
    op.execute(_UNINSTALLED_AT.format(path=SEARCH_PATH, owner=owner))
    op.execute("REVOKE ALL ON FUNCTION sfdb_tenants_uninstalled_at() FROM PUBLIC")
    op.execute(f'ALTER FUNCTION sfdb_tenants_uninstalled_at() OWNER TO "{owner}"')
    # A trigger on a reference table, on a Citus cluster (it runs where the row's copies are).
    op.execute("SET LOCAL citus.enable_unsafe_triggers = on")
    op.execute(
        "CREATE TRIGGER tenants_uninstalled_at BEFORE UPDATE ON tenants "
        "FOR EACH ROW EXECUTE FUNCTION sfdb_tenants_uninstalled_at()"
    )
    op.execute(_APPEND_ONLY.format(path=SEARCH_PATH, owner=owner))
    op.execute(
        f'CREATE POLICY owner_erases ON audit_logs FOR UPDATE TO "{owner}" '
        f"USING (tenant_id = {LIFECYCLE_TENANT}) WITH CHECK (tenant_id = {LIFECYCLE_TENANT})"
    )
    op.execute(f'SET LOCAL ROLE "{owner}"')


def downgrade() -> None:
    op.execute("DROP POLICY owner_erases ON audit_logs")
    op.execute(_APPEND_ONLY_BEFORE.format(path=SEARCH_PATH))
    op.execute("DROP TRIGGER tenants_uninstalled_at ON tenants")
    op.execute("DROP FUNCTION sfdb_tenants_uninstalled_at()")
    op.execute("ALTER TABLE tenants DROP COLUMN uninstalled_at")
    op.execute("ALTER TABLE tenants DROP COLUMN purged_at")
