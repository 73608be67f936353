"""A tamper-evident audit log: every workspace's events form a hash chain the database computes.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

* ``audit_logs`` gains ``personal_digest`` and ``personal_salt``, set by the
  BEFORE INSERT trigger of revision 0006 (``sfdb_audit_logs_server_fields()``,
  the inserting role's) whatever the insert says, unless the owner gives a
  digest (a restore): the personal fields (actor, address, user agent,
  description, metadata) enter the chain only through
  ``sfdb_audit_personal()``, SHA-256 over 32 random bytes (two random UUIDs)
  and the fields, so erasing the fields and the salt later leaves a digest
  that still closes the chain and reveals nothing.
* ``audit_chain`` (the owner's alone) gives each event its place in its
  workspace's chain (``chain_seq``, from 1) and ``row_hash``: SHA-256 over the
  previous place's hash (32 zero bytes before the first) and the event's
  canonical content (``sfdb_audit_content()``). The constraint trigger
  ``audit_logs_chain`` writes it as the inserting transaction commits
  (``DEFERRABLE INITIALLY DEFERRED``): the event rows stay as inserted, and the
  writers of one workspace take turns only while they commit, on its row of
  ``audit_chain_heads`` (the owner's alone: each chain's newest place).
  No index on the event (one per event, random: it cost a quarter of the
  chain's time); ``sfdb audit verify`` finds an event given two places.
  A transaction that rolls back leaves no place taken; under READ COMMITTED a
  writer waits and continues from the newest place, under REPEATABLE READ or
  SERIALIZABLE it fails to commit (SQLSTATE 40001) rather than fork the chain.
* ``audit_verifier`` lets the owner read every audit row (``sfdb audit
  verify`` runs as the owner, which could stop forcing row-level security on
  its own table anyway); no other role gains anything.
* Existing events are chained in ``(created_at, id)`` order, each workspace
  on its own, with the append-only trigger set aside and an owner's update
  policy in place for the length of this transaction.

``downgrade()`` drops all of it.
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import LayerRoles, migration_roles

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
GENESIS: Final = "'\\x0000000000000000000000000000000000000000000000000000000000000000'::bytea"
FUNCTIONS: Final = (
    "sfdb_audit_personal(bytea, uuid, inet, text, text, jsonb)",
    "sfdb_audit_content(uuid, uuid, bigint, text, text, text, text, text, timestamptz, bytea)",
    "sfdb_audit_logs_chain()",
)

# The canonical forms are JSON arrays of the values, as jsonb prints them: one spelling for
# each value whatever the session's settings (uuids, integers, text, hex, an address as
# host and mask length, a time as microseconds since 1970). Their bodies are bound as they
# are made (SQL-standard RETURN), so no search path can change what they call, and none is
# set: the planner inlines them where they are used (a function it calls instead costs a
# parse of its body per call).
_PERSONAL: Final = """
CREATE FUNCTION sfdb_audit_personal(
    salt bytea, user_id uuid, ip_address inet, user_agent text, action_description text,
    metadata jsonb
) RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE
RETURN sha256(salt || convert_to(jsonb_build_array(
    user_id, host(ip_address), masklen(ip_address), user_agent, action_description, metadata
)::text, 'UTF8'))
"""
_CONTENT: Final = """
CREATE FUNCTION sfdb_audit_content(
    id uuid, tenant_id uuid, chain_seq bigint, event_type text, event_category text,
    status text, resource_type text, resource_id text, created_at timestamptz,
    personal_digest bytea
) RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE
RETURN convert_to(jsonb_build_array(
    'audit/v1', id, tenant_id, chain_seq, event_type, event_category, status,
    resource_type, resource_id, (extract(epoch FROM created_at) * 1000000)::bigint,
    encode(personal_digest, 'hex')
)::text, 'UTF8')
"""
# Audit rows take their id and creation time from the server unless the owner writes them
# (revision 0006: a restore keeps the evidence as it was), and now their commitment too: 32
# bytes from two random UUIDs (244 random bits) and the digest, set by the trigger of the
# inserting role (the digest is a hash anyone may compute) unless the owner gives one.
_SERVER_FIELDS: Final = """
        CREATE OR REPLACE FUNCTION sfdb_audit_logs_server_fields() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {path} AS $$
        BEGIN
            IF pg_has_role(current_user, '{owner}', 'MEMBER') THEN
                IF NEW.personal_digest IS NOT NULL THEN
                    RETURN NEW;
                END IF;
            ELSE
                NEW.id := gen_random_uuid();
                NEW.created_at := now();
            END IF;
            NEW.personal_salt := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
            NEW.personal_digest := public.sfdb_audit_personal(
                NEW.personal_salt, NEW.user_id, NEW.ip_address, NEW.user_agent,
                NEW.action_description, NEW.metadata);
            RETURN NEW;
        END
        $$
        """
# Revision 0006's, as it was.
_SERVER_FIELDS_BEFORE: Final = """
        CREATE OR REPLACE FUNCTION sfdb_audit_logs_server_fields() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {path} AS $$
        BEGIN
            IF NOT pg_has_role(current_user, '{owner}', 'MEMBER') THEN
                NEW.id := gen_random_uuid();
                NEW.created_at := now();
            END IF;
            RETURN NEW;
        END
        $$
        """
_CHAIN: Final = f"""
CREATE FUNCTION sfdb_audit_logs_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
DECLARE
    place bigint;
    previous bytea;
BEGIN
    -- The head's row lock is the workspace's turn, until this transaction ends; the place
    -- before the new one is then committed (or this transaction fails to serialize).
    LOOP
        UPDATE public.audit_chain_heads SET chain_seq = chain_seq + 1
        WHERE tenant_id = NEW.tenant_id
        RETURNING chain_seq INTO place;
        EXIT WHEN FOUND;
        INSERT INTO public.audit_chain_heads (tenant_id, chain_seq) VALUES (NEW.tenant_id, 0)
        ON CONFLICT (tenant_id) DO NOTHING;
    END LOOP;
    SELECT row_hash INTO previous FROM public.audit_chain
    WHERE tenant_id = NEW.tenant_id AND chain_seq = place - 1;
    INSERT INTO public.audit_chain (tenant_id, chain_seq, event_id, row_hash)
    VALUES (NEW.tenant_id, place, NEW.id, sha256(coalesce(previous, {GENESIS})
        || public.sfdb_audit_content(
            NEW.id, NEW.tenant_id, place, NEW.event_type, NEW.event_category, NEW.status,
            NEW.resource_type, NEW.resource_id, NEW.created_at, NEW.personal_digest)));
    RETURN NULL;
END
$$
"""
# The events written before this revision, chained as the triggers would have: a
# workspace's rows in (created_at, id) order.
_BACKFILL: Final = f"""
DO $$
DECLARE
    event record;
    place bigint := 0;
    hash bytea;
    tenant uuid;
    digest bytea;
    salt bytea;
BEGIN
    FOR event IN SELECT * FROM public.audit_logs ORDER BY tenant_id, created_at, id LOOP
        IF tenant IS DISTINCT FROM event.tenant_id THEN
            IF tenant IS NOT NULL THEN
                INSERT INTO public.audit_chain_heads VALUES (tenant, place);
            END IF;
            tenant := event.tenant_id;
            place := 0;
            hash := {GENESIS};
        END IF;
        place := place + 1;
        salt := uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid());
        digest := public.sfdb_audit_personal(
            salt, event.user_id, event.ip_address, event.user_agent,
            event.action_description, event.metadata);
        hash := sha256(hash || public.sfdb_audit_content(
            event.id, event.tenant_id, place, event.event_type, event.event_category,
            event.status, event.resource_type, event.resource_id, event.created_at, digest));
        UPDATE public.audit_logs SET personal_digest = digest, personal_salt = salt
        WHERE tenant_id = event.tenant_id AND id = event.id;
        INSERT INTO public.audit_chain VALUES (event.tenant_id, place, event.id, hash);
    END LOOP;
    IF tenant IS NOT NULL THEN
        INSERT INTO public.audit_chain_heads VALUES (tenant, place);
    END IF;
END
$$
"""


def _roles() -> LayerRoles:
    return migration_roles(context.config.attributes)


def upgrade() -> None:
    roles = _roles()
    # Made by the migrating login and handed to the owner, as revisions 0006 to 0008 made
    # theirs (a Citus coordinator creates a function on the workers as the role in effect,
    # which they may not know yet; handing it to the owner brings the role there first).
    op.execute("RESET ROLE")
    op.execute(
        """
        CREATE TABLE audit_chain_heads (
            tenant_id uuid NOT NULL,
            chain_seq bigint NOT NULL,
            CONSTRAINT pk_audit_chain_heads PRIMARY KEY (tenant_id)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE audit_chain (
            tenant_id uuid NOT NULL,
            chain_seq bigint NOT NULL,
            event_id uuid NOT NULL,
            row_hash bytea NOT NULL,
            CONSTRAINT pk_audit_chain PRIMARY KEY (tenant_id, chain_seq)
        )
        """
    )
    for table in ("audit_chain_heads", "audit_chain"):
        op.execute(f'ALTER TABLE {table} OWNER TO "{roles.owner}"')
        op.execute(f'REVOKE ALL ON {table} FROM PUBLIC, "{roles.app}", "{roles.directory}"')
    definitions = (_PERSONAL, _CONTENT, _CHAIN)
    for function, definition in zip(FUNCTIONS, definitions, strict=True):
        op.execute(definition)
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f'ALTER FUNCTION {function} OWNER TO "{roles.owner}"')
    op.execute(f'GRANT EXECUTE ON FUNCTION {FUNCTIONS[0]} TO "{roles.app}"')
    # The owner's table, changed by its member (on Citus, every shard, as the login).
    op.execute("ALTER TABLE audit_logs ADD COLUMN personal_digest bytea")
    op.execute("ALTER TABLE audit_logs ADD COLUMN personal_salt bytea")
    op.execute(
        f'CREATE POLICY audit_verifier ON audit_logs FOR SELECT TO "{roles.owner}" USING (true)'
    )
    # Row-level security binds the owner too: the backfill may update for this transaction.
    op.execute(
        f'CREATE POLICY audit_backfill ON audit_logs FOR UPDATE TO "{roles.owner}" USING (true)'
    )
    op.execute("ALTER TABLE audit_logs DISABLE TRIGGER audit_logs_append_only")
    op.execute(_BACKFILL)
    op.execute("ALTER TABLE audit_logs ENABLE TRIGGER audit_logs_append_only")
    op.execute("DROP POLICY audit_backfill ON audit_logs")
    op.execute("ALTER TABLE audit_logs ALTER COLUMN personal_digest SET NOT NULL")
    op.execute(_SERVER_FIELDS.format(path=SEARCH_PATH, owner=roles.owner))
    op.execute(
        "CREATE CONSTRAINT TRIGGER audit_logs_chain AFTER INSERT ON audit_logs "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_chain()"
    )
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')


def downgrade() -> None:
    roles = _roles()
    op.execute("DROP TRIGGER audit_logs_chain ON audit_logs")
    op.execute(_SERVER_FIELDS_BEFORE.format(path=SEARCH_PATH, owner=roles.owner))
    op.execute("DROP POLICY audit_verifier ON audit_logs")
    for function in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION {function}")
    op.execute("ALTER TABLE audit_logs DROP COLUMN personal_salt")
    op.execute("ALTER TABLE audit_logs DROP COLUMN personal_digest")
    op.execute("DROP TABLE audit_chain")
    op.execute("DROP TABLE audit_chain_heads")
