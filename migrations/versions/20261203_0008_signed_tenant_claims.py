"""Signed tenant claims: row-level security admits a tenant only through a claim it verifies.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

* A tenant transaction no longer says which tenant it is with a plain setting
  that any SQL of the runtime login could overwrite; it sets
  ``app.tenant_claim`` to ``v1.<key id>.<tenant>.<issued, epoch ms>.<backend
  pid or 0>.<HMAC-SHA256, hex>`` (:mod:`slack_fathom_db.claims`), signed by
  the application with ``DATABASE_TENANT_KEY``.
* ``tenant_claim_keys`` holds the database's copy of that key, as the HMAC's
  inner and outer pads (as secret as the key: either gives it back), one key
  or two during a rotation. The owner alone may read it; no role may change
  it but the owner's logins (``sfdb migrate``, ``sfdb rotate-tenant-key``).
* ``sfdb_claimed_tenant()`` (the owner's, SECURITY DEFINER, a pinned path)
  returns the claim's tenant when the claim is well formed, made with a key
  of that table, received by the database between 2 s before and 10 s after
  it was issued (``statement_timestamp()``) and used at most 60 s after it
  (``clock_timestamp()``: the statements of a DO block share its statement
  time), and, when it names a backend,
  received by that backend; otherwise ``NULL``, and the policies admit no
  row. ``PARALLEL RESTRICTED``: a parallel worker is another process, whose
  ``pg_backend_pid()`` a claim for the connection's backend does not name. It
  never raises: each part is checked before it is cast, with string
  functions (with a regular expression of the claim's shape the function took
  44 µs a call, without it 11).
  ``COST`` is high so the planner evaluates it once per statement (a one-time
  filter against the statement's own ``tenant_id = …``, or an index key)
  rather than once per row of a scan.
* ``sfdb_require_claim()`` (the preamble's check of a unit of work's first
  transaction) raises SQLSTATE ``SF001`` with the reason when the claim is
  refused (no key, clock skew, a signature that does not verify), and
  ``P0002`` when the tenant is unknown or soft-deleted.
* The tenant policies (``tenant_isolation`` on every tenant-owned table,
  ``tenant_self`` on ``tenants``) now name the app role and compare with
  ``sfdb_claimed_tenant()``. The owner, whose ``sfdb_consume_rate_limit()``
  sets ``app.tenant_id`` itself from its argument, keeps that setting through
  ``owner_scoped`` on ``api_rate_limits``, the one table it writes so.

``downgrade()`` puts the plain-setting policies back and drops the rest.
"""

from collections.abc import Sequence
from typing import Final

from alembic import context, op

from slack_fathom_db.roles import LayerRoles, migration_roles

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEARCH_PATH: Final = "pg_catalog, public, pg_temp"
TENANT_OWNED: Final = (
    "users",
    "crm_connections",
    "account_mappings",
    "meeting_sessions",
    "audit_logs",
    "api_rate_limits",
    "slack_installations",
    "slack_bots",
)
PLAIN_TENANT: Final = "NULLIF(current_setting('app.tenant_id', true), '')::uuid"
CLAIMED_TENANT: Final = "sfdb_claimed_tenant()"

# A claim's parts are checked with plain string functions (a regular expression with
# bounded repeats cost three times everything else together), only as far as the casts
# before the signature check need: the tenant is cast once the signature holds.
WELL_FORMED: Final = """
    cardinality(part) IS NOT DISTINCT FROM 6 AND part[1] = 'v1'
    AND length(part[4]) = 13 AND translate(part[4], '0123456789', '') = ''
    AND length(part[5]) BETWEEN 1 AND 10 AND translate(part[5], '0123456789', '') = ''
"""
# How far the database's clock may be from the claim's issue time when a statement
# arrives: a little before (the application's clock ahead), ten seconds after. And
# whenever the function runs (a statement inside a DO block shares the block's
# statement_timestamp()), at most a minute after: a statement of the layer that arrived
# in time keeps its claim through a row-lock wait and a re-check of its rows.
IN_TIME: Final = """
    statement_timestamp() BETWEEN to_timestamp(part[4]::bigint / 1000.0) - interval '2 seconds'
                              AND to_timestamp(part[4]::bigint / 1000.0) + interval '10 seconds'
    AND clock_timestamp() <= to_timestamp(part[4]::bigint / 1000.0) + interval '60 seconds'
"""
FOR_THIS_BACKEND: Final = "(part[5] = '0' OR part[5]::bigint = pg_backend_pid())"
SIGNED: Final = """
    encode(sha256(pads.outer_pad || sha256(
        pads.inner_pad || convert_to(array_to_string(part[1:5], '.'), 'UTF8')
    )), 'hex') = part[6]
"""

_CLAIMED_TENANT: Final = f"""
CREATE FUNCTION sfdb_claimed_tenant() RETURNS uuid
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER COST 10000
SET search_path = {SEARCH_PATH} AS $$
DECLARE
    part constant text[] := string_to_array(current_setting('app.tenant_claim', true), '.');
    pads record;
BEGIN
    -- One test after the other: each may cast only what the ones before it checked.
    IF ({WELL_FORMED}) IS NOT TRUE THEN
        RETURN NULL;
    END IF;
    IF ({IN_TIME} AND {FOR_THIS_BACKEND}) IS NOT TRUE THEN
        RETURN NULL;
    END IF;
    SELECT inner_pad, outer_pad INTO pads FROM public.tenant_claim_keys WHERE key_id = part[2];
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF ({SIGNED}) IS NOT TRUE THEN
        RETURN NULL;
    END IF;
    RETURN part[3]::uuid;
END
$$
"""

# Why a claim was refused is said to the caller that asks (the layer, once per unit of
# work): nothing in it is secret, and the verdict stays sfdb_claimed_tenant()'s.
_REQUIRE_CLAIM: Final = f"""
CREATE FUNCTION sfdb_require_claim() RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = {SEARCH_PATH} AS $$
DECLARE
    part constant text[] := string_to_array(current_setting('app.tenant_claim', true), '.');
    tenant constant uuid := public.sfdb_claimed_tenant();
    problem text;
BEGIN
    IF tenant IS NULL THEN
        IF ({WELL_FORMED}) IS NOT TRUE THEN
            problem := 'no well-formed claim is set (app.tenant_claim)';
        ELSIF NOT EXISTS (SELECT FROM public.tenant_claim_keys WHERE key_id = part[2]) THEN
            problem := format(
                'the database holds no tenant key %s (sfdb migrate installs the key of '
                'DATABASE_TENANT_KEY)', part[2]);
        ELSIF ({IN_TIME}) IS NOT TRUE THEN
            problem := format(
                'it reached the database %s s after it was issued (accepted: -2 to 10 s); '
                'do the clocks of this host and of the database agree?',
                round(extract(epoch FROM statement_timestamp()) - part[4]::bigint / 1000.0, 1));
        ELSIF {FOR_THIS_BACKEND} IS NOT TRUE THEN
            problem := 'it was made for another server connection';
        ELSE
            problem := format(
                'its signature does not verify with the database''s key %s (is '
                'DATABASE_TENANT_KEY the key installed in this database?)', part[2]);
        END IF;
        RAISE EXCEPTION 'tenant claim refused: %', problem USING ERRCODE = 'SF001';
    END IF;
    IF NOT EXISTS (SELECT FROM public.tenants WHERE id = tenant AND deleted_at IS NULL) THEN
        RAISE EXCEPTION 'the tenant of this transaction is unknown or soft-deleted'
            USING ERRCODE = 'no_data_found';
    END IF;
END
$$
"""


def _roles() -> LayerRoles:
    return migration_roles(context.config.attributes)


def _policies(*, app: str, tenant: str) -> None:
    """Point the tenant policies at ``tenant``, for the app role (``app``) or everyone."""
    for table in TENANT_OWNED:
        op.execute(
            f"ALTER POLICY tenant_isolation ON {table} TO {app} "
            f"USING (tenant_id = {tenant}) WITH CHECK (tenant_id = {tenant})"
        )
    op.execute(
        f"ALTER POLICY tenant_self ON tenants TO {app} "
        f"USING (id = {tenant}) WITH CHECK (id = {tenant})"
    )


def upgrade() -> None:
    roles = _roles()
    # Made by the migrating login and handed to the owner, as revision 0007 explains
    # (the function reaches the workers of a Citus cluster; the key table stays on this
    # node, and sfdb distribute gives each worker its own copy).
    op.execute("RESET ROLE")
    op.execute(
        """
        CREATE TABLE tenant_claim_keys (
            key_id text NOT NULL,
            inner_pad bytea NOT NULL,
            outer_pad bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_tenant_claim_keys PRIMARY KEY (key_id),
            CONSTRAINT ck_tenant_claim_keys_key_id CHECK (key_id ~ '^[A-Za-z0-9_-]{1,32}$'),
            CONSTRAINT ck_tenant_claim_keys_pads
                CHECK (length(inner_pad) = 64 AND length(outer_pad) = 64)
        )
        """
    )
    op.execute(f'ALTER TABLE tenant_claim_keys OWNER TO "{roles.owner}"')
    op.execute(f'REVOKE ALL ON tenant_claim_keys FROM PUBLIC, "{roles.app}", "{roles.directory}"')
    op.execute(_CLAIMED_TENANT)
    op.execute(_REQUIRE_CLAIM)
    for function in ("sfdb_claimed_tenant()", "sfdb_require_claim()"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f'ALTER FUNCTION {function} OWNER TO "{roles.owner}"')
        op.execute(f'GRANT EXECUTE ON FUNCTION {function} TO "{roles.app}"')
    # Only the rate-limit function (the owner's) checks a tenant by the plain setting now.
    op.execute(f'REVOKE EXECUTE ON FUNCTION sfdb_require_tenant() FROM "{roles.app}"')
    _policies(app=f'"{roles.app}"', tenant=CLAIMED_TENANT)
    op.execute(
        f'CREATE POLICY owner_scoped ON api_rate_limits TO "{roles.owner}" '
        f"USING (tenant_id = {PLAIN_TENANT}) WITH CHECK (tenant_id = {PLAIN_TENANT})"
    )
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')


def downgrade() -> None:
    roles = _roles()
    # The copies of the keys that sfdb distribute gave the workers of a Citus cluster go
    # too, dropped as they were made (by the login that migrates).
    op.execute("RESET ROLE")
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
                PERFORM run_command_on_workers(
                    'DROP TABLE IF EXISTS public.tenant_claim_keys');
            END IF;
        END
        $$
        """
    )
    op.execute(f'SET LOCAL ROLE "{roles.owner}"')
    op.execute("DROP POLICY owner_scoped ON api_rate_limits")
    _policies(app="PUBLIC", tenant=PLAIN_TENANT)
    op.execute(f'GRANT EXECUTE ON FUNCTION sfdb_require_tenant() TO "{roles.app}"')
    op.execute("DROP FUNCTION sfdb_require_claim()")
    op.execute("DROP FUNCTION sfdb_claimed_tenant()")
    op.execute("DROP TABLE tenant_claim_keys")
