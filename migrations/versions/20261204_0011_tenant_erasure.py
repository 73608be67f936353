"""Erasure: a workspace's rows purged after its grace period, a user's on request.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

* ``tenants.purged_at``: when ``sfdb tenant purge``
  (:mod:`slack_fathom_db.erasure`) last finished erasing the workspace's rows;
  the row itself stays, emptied of its name and settings, as the audit log's
  anchor and the record of the erasure.
* Audit rows are never deleted; erasure de-identifies them instead. The
  append-only trigger now lets a member of the owner make exactly one kind of
  update: every personal field (actor, address, user agent, description,
  metadata) emptied and ``personal_salt`` erased, every other column as it
  was, ``personal_digest`` included, so the chain still verifies and the
  digest, without its salt, reveals nothing. Any other update, every delete
  and truncation are refused as before, for everybody.
* ``owner_erases`` lets the owner make that update to the rows of the one
  workspace ``sfdb.lifecycle_tenant`` names (revision 0010's setting).

``downgrade()`` drops the column and the policy and puts the trigger's first
definition back (a row erased meanwhile stays erased).
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import migration_roles

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
LIFECYCLE_TENANT: Final = "NULLIF(current_setting('sfdb.lifecycle_tenant', true), '')::uuid"
_APPEND_ONLY: Final = """
CREATE OR REPLACE FUNCTION sfdb_audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = {path} AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_LEVEL = 'ROW'
        AND pg_has_role(current_user, '{owner}', 'MEMBER')
        AND NEW.user_id IS NULL AND NEW.ip_address IS NULL AND NEW.user_agent IS NULL
        AND NEW.action_description = '' AND NEW.metadata = '{{}}'::jsonb
        AND NEW.personal_salt IS NULL
        AND (NEW.id, NEW.tenant_id, NEW.event_type, NEW.event_category, NEW.status,
             NEW.resource_type, NEW.resource_id, NEW.created_at, NEW.personal_digest)
            IS NOT DISTINCT FROM
            (OLD.id, OLD.tenant_id, OLD.event_type, OLD.event_category, OLD.status,
             OLD.resource_type, OLD.resource_id, OLD.created_at, OLD.personal_digest)
    THEN
        RETURN NEW;  -- erasure: the personal fields go, the commitment to them stays
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
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
    op.execute(_APPEND_ONLY.format(path=SEARCH_PATH, owner=owner))
    op.execute(
        f'CREATE POLICY owner_erases ON audit_logs FOR UPDATE TO "{owner}" '
        f"USING (tenant_id = {LIFECYCLE_TENANT}) WITH CHECK (tenant_id = {LIFECYCLE_TENANT})"
    )
    op.execute(f'SET LOCAL ROLE "{owner}"')


def downgrade() -> None:
    op.execute("DROP POLICY owner_erases ON audit_logs")
    op.execute(_APPEND_ONLY_BEFORE.format(path=SEARCH_PATH))
    op.execute("ALTER TABLE tenants DROP COLUMN purged_at")
