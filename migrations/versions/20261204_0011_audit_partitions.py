"""The audit log partitioned by month, partitions made ahead, and retention by whole months.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

* ``audit_logs`` becomes a table ``PARTITIONED BY RANGE (created_at)``, one
  partition per calendar month in UTC (``audit_partitions.audit_logs_y2026m12``)
  and a ``DEFAULT`` partition (``audit_partitions.audit_logs_default``). Every
  row moves over as it was: id, creation time, digest and salt, so the chains
  of revision 0009 still hold.
* A partitioned table's unique keys must contain its partition key: the
  primary key is now ``(tenant_id, id, created_at)``. It still leads with
  ``tenant_id`` (Citus), but the database no longer refuses a second row with
  an event's id (under another time): the app role's rows take the server's
  random ids (revision 0006), only the owner names ids (a restore), and such a
  row takes a place of its own, which ``sfdb audit verify`` reports as an event
  with two places. Nothing references an audit row by key.
* A row is routed to its month's partition by the time the insert gives,
  before the insert trigger of revision 0006 gives it the server's time, and
  cannot move partition there: an insert of the app role that gives a time of
  another month than the server's is now refused (SQLSTATE 42501) instead of
  corrected; one of this month is corrected as before. The layer never gives
  one. An ``ON CONFLICT`` must name the whole key.
* The partitions live in schema ``audit_partitions``, the owner's: no other
  role may use the schema, and none holds a privilege on a partition, so a
  partition is no way around the parent's grants and forced row-level
  security (which apply to whatever reaches the rows through ``audit_logs``).
  Each partition carries the parent's row triggers (cloned by PostgreSQL: the
  server fields, append-only, the chain) and a ``TRUNCATE`` trigger of its own
  (statement triggers are not cloned).
* ``sfdb_audit_partition_make(month)`` makes one month's partition, and
  ``sfdb_audit_partitions_ensure(months_ahead)`` the current month's and the
  next ones' (and those of any month whose rows wait in the default
  partition); both are idempotent, the owner's alone (no other role calls them,
  so neither is SECURITY DEFINER), and run by this revision, ``sfdb migrate``
  and ``sfdb audit retain``. An insert never fails for want of a partition: a
  month that has none yet goes to the default partition, and the month's
  partition, when it is made, takes those rows with it (copied into the new
  table before it is attached, then deleted from the default partition with
  the append-only trigger set aside for that statement, the parent locked; no
  trigger fires on the copy, so the events keep their places). Making partitions
  from the inserting transaction instead would need the app role to create
  tables, and a row cannot change partition in its insert trigger anyway.
* ``audit_retention`` (the owner's) records each partition that ``sfdb audit
  retain`` dropped, and ``audit_chain_starts`` (the owner's) where each
  workspace's chain now starts: its first place, the hash of the place before
  it, and the places from there on whose events retention dropped (an event
  of one month may take its place after an event of the next month).

On Citus the revision runs as the migrating login throughout and hands what it
made to the owner (as revisions 0006 to 0009 did theirs); on a cluster
distributed before it, it distributes the new table itself, with its partitions,
colocated with the others; ``sfdb distribute`` then distributes
``audit_chain_starts``. A partition made later on the coordinator is distributed
as it is made.

``downgrade()`` puts back the plain table with every row (a chain whose start
retention moved then no longer verifies from place 1).
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import LayerRoles, migration_roles

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
SCHEMA: Final = "audit_partitions"
MONTHS_AHEAD: Final = 3
CLAIMED_TENANT: Final = "sfdb_claimed_tenant()"
COLUMNS: Final = (
    "tenant_id, id, event_type, event_category, action_description, status, user_id, "
    "resource_type, resource_id, ip_address, user_agent, metadata, created_at, "
    "personal_digest, personal_salt"
)
INDEXES: Final = (
    "CREATE INDEX ix_audit_logs_tenant_id_created_at ON audit_logs (tenant_id, created_at DESC)",
    "CREATE INDEX ix_audit_logs_tenant_id_created_at_failures ON audit_logs "
    "(tenant_id, created_at DESC) WHERE status <> 'success'",
)
FUNCTIONS: Final = ("sfdb_audit_partitions_ensure(integer)", "sfdb_audit_partition_make(date)")

# Revision 0009's insert trigger, which gives a row the server's time: a row is routed to its
# partition by the time the insert gives, before the trigger runs, and cannot move partition
# there. A time of another month than the server's is refused instead of replaced (the
# layer never sends one); one of this month is replaced as before.
_SERVER_FIELDS: Final = """
CREATE OR REPLACE FUNCTION sfdb_audit_logs_server_fields() RETURNS trigger
LANGUAGE plpgsql SET search_path = {path} AS $$
BEGIN
    IF pg_has_role(current_user, '{owner}', 'MEMBER') THEN
        IF NEW.personal_digest IS NOT NULL THEN
            RETURN NEW;
        END IF;
    ELSE{month_check}
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
_MONTH_CHECK: Final = """
        IF date_trunc('month', NEW.created_at AT TIME ZONE 'UTC')
           IS DISTINCT FROM date_trunc('month', now() AT TIME ZONE 'UTC') THEN
            RAISE EXCEPTION 'audit rows take their creation time from the server: % is not '
                'in this month', coalesce(NEW.created_at::text, 'NULL')
                USING ERRCODE = 'insufficient_privilege';
        END IF;"""

# One month's partition, made once. Rows of that month already in the default partition
# are moved into the new table before it is attached (attaching checks the default
# partition holds none of its range); the copy fires no trigger, so they keep their places.
_MAKE: Final = f"""
CREATE FUNCTION sfdb_audit_partition_make(p_month date) RETURNS text
LANGUAGE plpgsql SET search_path = {SEARCH_PATH} AS $$
DECLARE
    first_day constant timestamp := date_trunc('month', p_month::timestamp);
    low constant timestamptz := first_day AT TIME ZONE 'UTC';
    high constant timestamptz := (first_day + interval '1 month') AT TIME ZONE 'UTC';
    name constant text := 'audit_logs_' || to_char(first_day, '"y"YYYY"m"MM');
BEGIN
    IF p_month IS NULL THEN
        RAISE EXCEPTION 'a month is needed' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF to_regclass(format('{SCHEMA}.%I', name)) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
        -- A new partition of a distributed table is distributed with its cloned triggers;
        -- DDL and the move share one connection per node (a key to a reference table).
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
    IF EXISTS (  -- a column to select: Citus plans no empty target list here
        SELECT 1 FROM {SCHEMA}.audit_logs_default WHERE created_at >= low AND created_at < high
    ) THEN
        EXECUTE format(
            'CREATE TABLE {SCHEMA}.%I (LIKE public.audit_logs INCLUDING DEFAULTS '
            'INCLUDING CONSTRAINTS)', name);
        EXECUTE format(
            'INSERT INTO {SCHEMA}.%I SELECT * FROM {SCHEMA}.audit_logs_default '
            'WHERE created_at >= %L AND created_at < %L', name, low, high);
        -- Set aside on the parent, which passes it on to each partition's clone (on Citus
        -- the clones on the shards have names of their own); the parent is locked meanwhile.
        ALTER TABLE public.audit_logs DISABLE TRIGGER audit_logs_append_only;
        DELETE FROM {SCHEMA}.audit_logs_default WHERE created_at >= low AND created_at < high;
        ALTER TABLE public.audit_logs ENABLE TRIGGER audit_logs_append_only;
        EXECUTE format(
            'ALTER TABLE public.audit_logs ATTACH PARTITION {SCHEMA}.%I '
            'FOR VALUES FROM (%L) TO (%L)', name, low, high);
    ELSE
        EXECUTE format(
            'CREATE TABLE {SCHEMA}.%I PARTITION OF public.audit_logs '
            'FOR VALUES FROM (%L) TO (%L)', name, low, high);
    END IF;
    EXECUTE format(
        'CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON {SCHEMA}.%I '
        'FOR EACH STATEMENT EXECUTE FUNCTION public.sfdb_audit_logs_append_only()', name);
    RETURN name;
END
$$
"""
# The current month's partition and the next p_months_ahead months', and one for every
# month whose rows wait in the default partition; the names of those it made.
_ENSURE: Final = f"""
CREATE FUNCTION sfdb_audit_partitions_ensure(p_months_ahead integer) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = {SEARCH_PATH} AS $$
DECLARE
    months date[];
    month date;
    made text;
BEGIN
    IF p_months_ahead IS NULL OR p_months_ahead NOT BETWEEN 0 AND 120 THEN
        RAISE EXCEPTION 'months ahead must be 0 to 120, not %', p_months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Two at once would both find a month missing; the second waits, then finds it made.
    PERFORM pg_advisory_xact_lock(hashtext('sfdb_audit_partitions'));
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        -- Before the first query of the transaction: a partition is distributed, and rows
        -- moved, over one connection per node, which a parallel read before would forbid.
        PERFORM set_config('citus.multi_shard_modify_mode', 'sequential', true);
    END IF;
    -- Read whole first: the default partition is altered while its rows move.
    months := ARRAY(
        SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date
        FROM {SCHEMA}.audit_logs_default
    ) || ARRAY(
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => n))::date
        FROM generate_series(0, p_months_ahead) AS n
    );
    FOREACH month IN ARRAY ARRAY(SELECT DISTINCT m FROM unnest(months) AS m ORDER BY m) LOOP
        made := public.sfdb_audit_partition_make(month);
        IF made IS NOT NULL THEN
            RETURN NEXT made;
        END IF;
    END LOOP;
END
$$
"""


# On Citus the schema is made on every node at once (in a transaction Citus would make it
# there only as a table in it is distributed, which this revision may do itself).
_SCHEMA_TO_EVERY_NODE: Final = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.create_object_propagation TO 'immediate';
    END IF;
END
$$
"""
_PARTITIONS_TO_OWNER: Final = """
DO $$
DECLARE
    partition regclass;
BEGIN
    FOR partition IN
        SELECT inhrelid::regclass FROM pg_inherits
        WHERE inhparent = 'public.{table}'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO {owner}', partition);
    END LOOP;
END
$$
"""
# The workers' part of this transaction was the login's and is prepared and committed as
# the login: the owner's role is not passed on to them (propagate_set_commands, which sfdb
# distribute sets, would prepare it as the owner, whom the login may not commit for).
_KEEP_THE_LOGIN_ON_THE_WORKERS: Final = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.propagate_set_commands TO 'none';
    END IF;
END
$$
"""
_MONTHS_WITH_EVENTS: Final = """
DO $$
DECLARE
    month date;
BEGIN
    FOREACH month IN ARRAY ARRAY(
        SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date
        FROM public.audit_logs_unpartitioned
    ) LOOP
        PERFORM public.sfdb_audit_partition_make(month);
    END LOOP;
END
$$
"""
# The new audit_logs distributed when the table it replaces (``source``) is.
_DISTRIBUTE_IF_DISTRIBUTED: Final = """
DO $$
DECLARE
    distributed boolean := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_dist_partition '
                'WHERE logicalrelid = ''public.{source}''::regclass)'
            INTO distributed;
    END IF;
    IF distributed THEN
        PERFORM create_distributed_table('public.audit_logs', 'tenant_id',
                                         colocate_with => 'public.users');
    END IF;
END
$$
"""


def _roles() -> LayerRoles:
    return migration_roles(context.config.attributes)


def _foreign_keys() -> None:
    """The keys of revision 0001, made before the rows come: each row is then checked as
    the referenced table's owner, which row-level security does not hide rows from (a
    check of the rows already there would run as the login, which sees no users)."""
    op.execute(
        "ALTER TABLE audit_logs ADD CONSTRAINT fk_audit_logs_tenant_id_tenants "
        "FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE RESTRICT"
    )
    op.execute(
        "ALTER TABLE audit_logs ADD CONSTRAINT fk_audit_logs_tenant_id_user_id_users "
        "FOREIGN KEY (tenant_id, user_id) REFERENCES users (tenant_id, id) ON DELETE RESTRICT"
    )


def _secure_audit_logs(roles: LayerRoles, *, app_tenant: str) -> None:
    """What revisions 0001-0009 gave ``audit_logs`` besides its keys, on the table now so
    named."""
    for index in INDEXES:
        op.execute(index)
    op.execute(f'REVOKE ALL ON audit_logs FROM PUBLIC, "{roles.app}", "{roles.directory}"')
    op.execute(f'GRANT SELECT, INSERT ON audit_logs TO "{roles.app}"')
    op.execute("ALTER TABLE audit_logs ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE audit_logs FORCE ROW LEVEL SECURITY")
    op.execute(
        f'CREATE POLICY tenant_isolation ON audit_logs TO "{roles.app}" '
        f"USING (tenant_id = {app_tenant}) WITH CHECK (tenant_id = {app_tenant})"
    )
    op.execute(
        f'CREATE POLICY owner_records ON audit_logs FOR INSERT TO "{roles.owner}" WITH CHECK (true)'
    )
    op.execute(
        f'CREATE POLICY audit_verifier ON audit_logs FOR SELECT TO "{roles.owner}" USING (true)'
    )
    op.execute(
        "CREATE TRIGGER audit_logs_server_fields BEFORE INSERT ON audit_logs "
        "FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_server_fields()"
    )
    op.execute(
        "CREATE TRIGGER audit_logs_append_only BEFORE UPDATE OR DELETE ON audit_logs "
        "FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs "
        "FOR EACH STATEMENT EXECUTE FUNCTION sfdb_audit_logs_append_only()"
    )
    op.execute(
        "CREATE CONSTRAINT TRIGGER audit_logs_chain AFTER INSERT ON audit_logs "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sfdb_audit_logs_chain()"
    )


def _set_aside(name: str) -> None:
    """Rename ``audit_logs`` and its indexes out of the way of the table that replaces it."""
    op.execute(f"ALTER TABLE audit_logs RENAME TO {name}")
    for index in (
        "pk_audit_logs",
        "ix_audit_logs_tenant_id_created_at",
        "ix_audit_logs_tenant_id_created_at_failures",
    ):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_{name}")


def upgrade() -> None:
    roles = _roles()
    # Made by the login that owns the database and handed to the owner, as revisions 0006
    # to 0009 made theirs: the owner may not create schemas, and a Citus coordinator does
    # the work on the workers as the role in effect, over a connection of that role's (one
    # role for all of it, or the schema made on one connection is not seen on another);
    # handing an object to the owner brings the role to the workers first.
    op.execute("RESET ROLE")
    op.execute(_SCHEMA_TO_EVERY_NODE)
    op.execute(f'CREATE SCHEMA {SCHEMA} AUTHORIZATION "{roles.owner}"')
    op.execute(f"REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC")
    op.execute(_SERVER_FIELDS.format(path=SEARCH_PATH, owner=roles.owner, month_check=_MONTH_CHECK))
    for function, definition in zip(FUNCTIONS[::-1], (_MAKE, _ENSURE), strict=True):
        op.execute(definition)
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f'ALTER FUNCTION {function} OWNER TO "{roles.owner}"')

    _set_aside("audit_logs_unpartitioned")
    op.execute(
        "CREATE TABLE audit_logs (LIKE audit_logs_unpartitioned INCLUDING DEFAULTS "
        "INCLUDING CONSTRAINTS) PARTITION BY RANGE (created_at)"
    )
    op.execute(
        "ALTER TABLE audit_logs ADD CONSTRAINT pk_audit_logs "
        "PRIMARY KEY (tenant_id, id, created_at)"
    )
    op.execute(f"CREATE TABLE {SCHEMA}.audit_logs_default PARTITION OF audit_logs DEFAULT")
    op.execute(
        f"CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON {SCHEMA}.audit_logs_default "
        "FOR EACH STATEMENT EXECUTE FUNCTION sfdb_audit_logs_append_only()"
    )
    # Every month that has events, then the rows as they were (no trigger on the new
    # table yet: ids, times, digests and salts are kept, and nothing takes a new place).
    op.execute(_MONTHS_WITH_EVENTS)
    op.execute(f"SELECT sfdb_audit_partitions_ensure({MONTHS_AHEAD})")
    # On a cluster distributed before this revision the new table is distributed at once,
    # colocated with the others as sfdb distribute does (with its partitions, whose shards
    # take the rows), before it references the distributed users.
    op.execute(_DISTRIBUTE_IF_DISTRIBUTED.format(source="audit_logs_unpartitioned"))
    _foreign_keys()
    op.execute(f"INSERT INTO audit_logs ({COLUMNS}) SELECT {COLUMNS} FROM audit_logs_unpartitioned")
    # Citus drops a table's shards as the table's owner: the login's, as the rest of this.
    op.execute("ALTER TABLE audit_logs_unpartitioned OWNER TO CURRENT_USER")
    op.execute("DROP TABLE audit_logs_unpartitioned")
    _secure_audit_logs(roles, app_tenant=CLAIMED_TENANT)

    op.execute(
        """
        CREATE TABLE audit_retention (
            id uuid NOT NULL DEFAULT gen_random_uuid(),
            partition text NOT NULL,
            month date NOT NULL,
            events bigint NOT NULL,
            workspaces integer NOT NULL,
            months_kept integer NOT NULL,
            dropped_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_audit_retention PRIMARY KEY (id)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE audit_chain_starts (
            tenant_id uuid NOT NULL,
            chain_seq bigint NOT NULL,
            previous_hash bytea NOT NULL,
            dropped_places bigint[] NOT NULL DEFAULT '{}',
            moved_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_audit_chain_starts PRIMARY KEY (tenant_id)
        )
        """
    )
    for table in ("audit_retention", "audit_chain_starts"):
        op.execute(f'REVOKE ALL ON {table} FROM PUBLIC, "{roles.app}", "{roles.directory}"')
        op.execute(f'ALTER TABLE {table} OWNER TO "{roles.owner}"')
    op.execute(f'ALTER TABLE audit_logs OWNER TO "{roles.owner}"')
    op.execute(_PARTITIONS_TO_OWNER.format(table="audit_logs", owner=f'"{roles.owner}"'))
    op.execute(_KEEP_THE_LOGIN_ON_THE_WORKERS)
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')


def downgrade() -> None:
    roles = _roles()
    # As the login throughout, as the upgrade (on Citus, one connection per node; a
    # table's shards are dropped as its owner, so what is dropped is the login's first).
    op.execute("RESET ROLE")
    for table in ("audit_chain_starts", "audit_retention"):
        op.execute(f"ALTER TABLE {table} OWNER TO CURRENT_USER")
        op.execute(f"DROP TABLE {table}")
    _set_aside("audit_logs_partitioned")
    op.execute(
        "CREATE TABLE audit_logs (LIKE audit_logs_partitioned INCLUDING DEFAULTS "
        "INCLUDING CONSTRAINTS)"
    )
    op.execute("ALTER TABLE audit_logs ADD CONSTRAINT pk_audit_logs PRIMARY KEY (tenant_id, id)")
    op.execute(_DISTRIBUTE_IF_DISTRIBUTED.format(source="audit_logs_partitioned"))
    _foreign_keys()
    op.execute(f"INSERT INTO audit_logs ({COLUMNS}) SELECT {COLUMNS} FROM audit_logs_partitioned")
    op.execute(_PARTITIONS_TO_OWNER.format(table="audit_logs_partitioned", owner="CURRENT_USER"))
    op.execute("ALTER TABLE audit_logs_partitioned OWNER TO CURRENT_USER")
    op.execute("DROP TABLE audit_logs_partitioned")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION {function}")
    op.execute(f"DROP SCHEMA {SCHEMA}")
    _secure_audit_logs(roles, app_tenant=CLAIMED_TENANT)
    op.execute(_SERVER_FIELDS.format(path=SEARCH_PATH, owner=roles.owner, month_check=""))
    op.execute(f'ALTER TABLE audit_logs OWNER TO "{roles.owner}"')
    op.execute(_KEEP_THE_LOGIN_ON_THE_WORKERS)
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')
