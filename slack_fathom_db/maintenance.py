"""Housekeeping on the owner's side: purging ended rate-limit windows, rotating keys.

Tenant keys (:mod:`slack_fathom_db.claims`): the database keeps the HMAC pads
of one key, or of two while a rotation is under way, in ``tenant_claim_keys``,
which the owner alone reads (the pads are as secret as the key).
:func:`install_tenant_key` adds the key of ``DATABASE_TENANT_KEY`` (``sfdb
migrate`` calls it), :func:`rotate_tenant_key` adds a new one and returns it
for the applications' settings, and :func:`finish_tenant_key_rotation` keeps
only the key of ``DATABASE_TENANT_KEY``, the newer of the two. On a Citus
cluster every worker checks claims too: each holds a copy of the table, made
anew from the coordinator's whenever it changes (and by ``sfdb distribute``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import asyncpg

from slack_fathom_db import validation
from slack_fathom_db.claims import TenantKey, generate_tenant_key
from slack_fathom_db.connections import DRIVER_ERRORS, SEARCH_PATH
from slack_fathom_db.errors import ConfigurationError, translate
from slack_fathom_db.models.slack import SECRET_COLUMNS
from slack_fathom_db.tokens import TokenCipher, TokenDecryptionError, token_context

if TYPE_CHECKING:
    import uuid

    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "DEFAULT_PURGE_AFTER_DAYS",
    "KeyRotation",
    "finish_tenant_key_rotation",
    "has_citus",
    "install_tenant_key",
    "lifecycle_scope",
    "purge_rate_limit_windows",
    "rotate_tenant_key",
    "rotate_token_keys",
    "rows_affected",
    "sync_tenant_keys",
]

DEFAULT_PURGE_AFTER_DAYS: Final = 7
_MAX_DAYS: Final = 36_600
_MAX_BATCH: Final = 100_000

# ``window_start < cutoff`` is implied by the exact test (a window ends after it
# starts) and lets the partial index on window_start find the candidates.
_PURGE_BATCH: Final = """
    DELETE FROM public.api_rate_limits
    WHERE (tenant_id, resource_type, period, window_start) IN (
        SELECT tenant_id, resource_type, period, window_start
        FROM public.api_rate_limits
        WHERE period <> 'bucket'
          AND window_start < now() - make_interval(days => $1)
          AND public.sfdb_window_end(period, window_start) < now() - make_interval(days => $1)
        LIMIT $2
    )
"""


async def purge_rate_limit_windows(
    settings: DatabaseSettings,
    *,
    older_than_days: int = DEFAULT_PURGE_AFTER_DAYS,
    batch_size: int = 10_000,
) -> int:
    """Delete fixed rate-limit windows that ended more than ``older_than_days`` days ago.

    Connects on the owner's side (``DATABASE_MIGRATION_URL``, a member of the
    owner role; the app role may not delete counters) and acts as the owner.
    Returns the number of rows deleted.
    Idempotent; each batch of ``batch_size`` rows commits on its own.
    """
    days = validation.integer(older_than_days, field="older_than_days", maximum=_MAX_DAYS)
    batch = validation.integer(batch_size, field="batch_size", minimum=1, maximum=_MAX_BATCH)
    conn = await owner_connection(settings, action="purge rate-limit windows")
    deleted = 0
    try:
        while True:
            count = rows_affected(await conn.execute(_PURGE_BATCH, days, batch))
            deleted += count
            if count < batch:
                return deleted
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="purge rate-limit windows") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """What :func:`rotate_token_keys` did."""

    key_id: str
    """The key every secret is now encrypted with."""
    rows_read: int
    rows_rewritten: int
    secrets_rewritten: int
    unreadable: tuple[str, ...] = ()
    """Rows left as they were: a secret no configured key decrypts (``table:row id``)."""


async def rotate_token_keys(settings: DatabaseSettings, *, batch_size: int = 500) -> KeyRotation:
    """Re-encrypt every stored Slack secret not made with the first ``DATABASE_TOKEN_KEYS`` key.

    Run after putting a new key first (keep the old ones listed until this is
    done; then they can go). Connects on the owner's side, like the purge (the
    ``owner_maintains`` policies of migration 0007 let the owner read and write
    the installation tables). Rows are read in key order, a batch at a time,
    and each is rewritten only if its ciphertexts are still the ones read: a
    token refreshed meanwhile was sealed with the new key already. A row that no
    configured key decrypts (its key was dropped too early, or it was altered) is
    left as it is and named in ``unreadable``. Idempotent; it can be stopped and
    run again. No plaintext is ever logged or returned.
    """
    cipher = TokenCipher.from_settings(settings)
    batch = validation.integer(batch_size, field="batch_size", minimum=1, maximum=_MAX_BATCH)
    conn = await owner_connection(settings, action="rotate token keys")
    read = rewritten = sealed = 0
    unreadable: list[str] = []
    try:
        for table, columns in SECRET_COLUMNS.items():
            listed = ", ".join(f"s.{column}" for column in columns)
            after: tuple[object, object] | None = None
            while True:
                # The tenant's key is part of what each secret is bound to.
                rows = await conn.fetch(
                    f"SELECT t.slack_team_id AS key, s.tenant_id, s.id, {listed} "  # noqa: S608
                    f"FROM public.{table} s JOIN public.tenants t ON t.id = s.tenant_id "
                    + ("" if after is None else "WHERE (s.tenant_id, s.id) > ($2, $3) ")
                    + "ORDER BY s.tenant_id, s.id LIMIT $1",
                    batch,
                    *(() if after is None else after),
                )
                for row in rows:
                    read += 1
                    stale = [
                        column
                        for column in columns
                        if row[column] is not None and not cipher.is_current(row[column])
                    ]
                    if not stale:
                        continue
                    try:
                        new = [
                            cipher.encrypt(
                                cipher.decrypt(row[column], context=_context(table, column, row)),
                                context=_context(table, column, row),
                            )
                            for column in stale
                        ]
                    except TokenDecryptionError:
                        unreadable.append(f"{table}:{row['id']}")
                        continue
                    assignments = ", ".join(
                        f"{column} = ${n}" for n, column in enumerate(stale, start=3)
                    )
                    unchanged = " AND ".join(
                        f"{column} = ${n}" for n, column in enumerate(stale, start=3 + len(stale))
                    )
                    status = await conn.execute(
                        f"UPDATE public.{table} SET {assignments} "  # noqa: S608 - fixed names
                        f"WHERE tenant_id = $1 AND id = $2 AND {unchanged}",
                        row["tenant_id"],
                        row["id"],
                        *new,
                        *(row[column] for column in stale),
                    )
                    if status == "UPDATE 1":
                        rewritten += 1
                        sealed += len(stale)
                if len(rows) < batch:
                    break
                after = (rows[-1]["tenant_id"], rows[-1]["id"])
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="rotate token keys") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)
    return KeyRotation(cipher.key_id, read, rewritten, sealed, tuple(unreadable))


def _context(table: str, column: str, row: asyncpg.Record) -> str:
    return token_context(table, column, row["key"], row["id"])


async def owner_connection(
    settings: DatabaseSettings, *, action: str, long_reads: bool = False
) -> asyncpg.Connection:
    """A connection on the owner's side (``DATABASE_MIGRATION_URL``), acting as the owner;
    ``long_reads``: no client-side limit on a statement (a walk over a whole table)."""
    url = settings.for_migrations().sqlalchemy_url().set(drivername="postgresql")
    try:
        return await asyncpg.connect(
            url.render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            command_timeout=None if long_reads else settings.client_timeout,
            statement_cache_size=0,  # also right through PgBouncer in transaction mode
            server_settings={
                "application_name": "slack_fathom_db maintenance",
                "role": settings.roles.owner,
                "search_path": SEARCH_PATH,
            },
        )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=action) from exc


async def has_citus(conn: asyncpg.Connection) -> bool:
    """Whether the database behind ``conn`` has the Citus extension."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
    )
    return found


def rows_affected(status: str) -> int:
    """The row count of a command's status (``DELETE 3`` → 3)."""
    return int(status.rsplit(" ", 1)[1])


def lifecycle_scope(tenant_id: uuid.UUID) -> str:
    """The ``SET LOCAL`` that lets the owner reach one workspace's rows for the rest of the
    transaction (the ``owner_lifecycle`` policies of migration 0010); a literal, as Citus
    passes ``SET LOCAL`` on to its workers (``set_config()`` not)."""
    return f"SET LOCAL sfdb.lifecycle_tenant = '{validation.canonical_uuid(tenant_id)}'"


# -- tenant keys ------------------------------------------------------------------------

_MAX_TENANT_KEYS: Final = 2
_KEY_IDS: Final = "SELECT key_id FROM public.tenant_claim_keys ORDER BY created_at, key_id"
_ADD_KEY: Final = (
    "INSERT INTO public.tenant_claim_keys (key_id, inner_pad, outer_pad) VALUES ($1, $2, $3)"
)
# Every worker's copy of the table, made anew from the coordinator's rows in one command
# per worker, built in SQL: the pads never pass through this client, but the command's
# text reaches each worker (where only the login that sent it and superusers see it). It
# runs as the login (a worker may not know the owner before sfdb distribute has brought
# it there); the copy becomes the owner's where the owner exists.
_SYNC_WORKERS: Final = r"""
SELECT nodename, nodeport, success FROM run_command_on_workers(format(
    $command$
    DO $do$ BEGIN
        SET LOCAL search_path = pg_catalog, public, pg_temp;
        CREATE TABLE IF NOT EXISTS public.tenant_claim_keys (
            key_id text NOT NULL,
            inner_pad bytea NOT NULL,
            outer_pad bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_tenant_claim_keys PRIMARY KEY (key_id),
            CONSTRAINT ck_tenant_claim_keys_key_id CHECK (key_id ~ '^[A-Za-z0-9_-]{1,32}$'),
            CONSTRAINT ck_tenant_claim_keys_pads
                CHECK (length(inner_pad) = 64 AND length(outer_pad) = 64)
        );
        REVOKE ALL ON public.tenant_claim_keys FROM PUBLIC;
        DELETE FROM public.tenant_claim_keys;
        %s
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = %L) THEN
            ALTER TABLE public.tenant_claim_keys OWNER TO %I;
        END IF;
    END $do$
    $command$,
    (SELECT coalesce(
        'INSERT INTO public.tenant_claim_keys (key_id, inner_pad, outer_pad, created_at) '
        || 'VALUES ' || string_agg(
            format('(%L, %L::bytea, %L::bytea, %L::timestamptz)',
                   key_id, inner_pad, outer_pad, created_at), ', ')
        || ';', '')
     FROM public.tenant_claim_keys),
    $1::text, $1::text
))
"""
# What a node holds of the keys, and who owns them, as one value to compare.
_KEYS_DIGEST: Final = (
    "SELECT md5(pg_get_userbyid(c.relowner) || '/' || coalesce(("
    "SELECT string_agg(key_id || ':' || encode(inner_pad, 'hex') || ':' "
    "|| encode(outer_pad, 'hex'), ',' ORDER BY key_id) FROM public.tenant_claim_keys), '')) "
    "FROM pg_class c WHERE c.oid = 'public.tenant_claim_keys'::regclass"
)


async def install_tenant_key(settings: DatabaseSettings) -> bool:
    """Make the database accept claims signed with ``DATABASE_TENANT_KEY``.

    Returns ``True`` if the key was added, ``False`` if the database already
    held it. Refuses (:class:`ConfigurationError`) a key id the database holds
    with another key, and a third key while a rotation is under way.
    """
    key = TenantKey.from_settings(settings)
    conn = await owner_connection(settings, action="install tenant key")
    try:
        async with conn.transaction():
            await _lock_keys(conn)
            if await _holds(conn, key):
                return False
            held = [row["key_id"] for row in await conn.fetch(_KEY_IDS)]
            if key.key_id in held:
                raise ConfigurationError(
                    f"install tenant key: the database holds another key with the id "
                    f"{key.key_id}; DATABASE_TENANT_KEY must be the key installed there"
                )
            if len(held) >= _MAX_TENANT_KEYS:
                raise ConfigurationError(
                    "install tenant key: the database already holds two tenant keys (a "
                    "rotation is under way); finish it first (sfdb rotate-tenant-key --finish)"
                )
            await conn.execute(_ADD_KEY, key.key_id, *key.pads())
            await _sync_workers(conn)
        return True
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="install tenant key") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def rotate_tenant_key(settings: DatabaseSettings, *, key_id: str | None = None) -> str:
    """Add a new tenant key beside the current one and return it (``DATABASE_TENANT_KEY`` form).

    Both keys are accepted until :func:`finish_tenant_key_rotation`. Refuses
    while two keys are held already.
    """
    new = generate_tenant_key(key_id)
    key = TenantKey.parse(new)
    conn = await owner_connection(settings, action="rotate tenant key")
    try:
        async with conn.transaction():
            await _lock_keys(conn)
            held = [row["key_id"] for row in await conn.fetch(_KEY_IDS)]
            if len(held) >= _MAX_TENANT_KEYS:
                raise ConfigurationError(
                    "rotate tenant key: a rotation is under way (the database holds "
                    f"{', '.join(held)}); finish it first (sfdb rotate-tenant-key --finish)"
                )
            if key.key_id in held:
                raise ConfigurationError(f"rotate tenant key: key id {key.key_id} is taken")
            await conn.execute(_ADD_KEY, key.key_id, *key.pads())
            await _sync_workers(conn)
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="rotate tenant key") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)
    return new


async def finish_tenant_key_rotation(settings: DatabaseSettings) -> list[str]:
    """Keep only the key of ``DATABASE_TENANT_KEY``; return the ids of the keys removed.

    Refuses (and removes nothing) when the database does not hold that key:
    claims signed with it would then be refused everywhere.
    """
    key = TenantKey.from_settings(settings)
    conn = await owner_connection(settings, action="finish tenant key rotation")
    try:
        async with conn.transaction():
            await _lock_keys(conn)
            if not await _holds(conn, key):
                raise ConfigurationError(
                    f"finish tenant key rotation: the database does not hold the key of "
                    f"DATABASE_TENANT_KEY ({key.key_id}); nothing was removed"
                )
            held = [row["key_id"] for row in await conn.fetch(_KEY_IDS)]  # oldest first
            if len(held) > 1 and held[0] == key.key_id:
                raise ConfigurationError(
                    f"finish tenant key rotation: DATABASE_TENANT_KEY is {key.key_id}, the "
                    f"older key, which the rotation retires; set it to the new key "
                    f"({held[-1]}) where this runs; nothing was removed"
                )
            removed = [
                row["key_id"]
                for row in await conn.fetch(
                    "DELETE FROM public.tenant_claim_keys WHERE key_id <> $1 RETURNING key_id",
                    key.key_id,
                )
            ]
            await _sync_workers(conn)
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="finish tenant key rotation") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)
    return sorted(removed)


async def sync_tenant_keys(conn: asyncpg.Connection) -> bool:
    """Give every Citus worker the coordinator's tenant keys unless each has them already.

    ``True`` if a worker's copy was made anew; ``False`` when all agree (or there
    are no workers).
    """
    if not await has_citus(conn):
        return False
    held = await conn.fetchval(_KEYS_DIGEST)
    copies = await conn.fetch(
        "SELECT success, result FROM run_command_on_workers($1)", _KEYS_DIGEST
    )
    if all(row["success"] and row["result"] == held for row in copies):
        return False
    return await _sync_workers(conn)


async def _lock_keys(conn: asyncpg.Connection) -> None:
    # Two rotations at once would each see one key and add a second: one waits instead.
    await conn.execute("LOCK TABLE public.tenant_claim_keys IN SHARE ROW EXCLUSIVE MODE")


async def _holds(conn: asyncpg.Connection, key: TenantKey) -> bool:
    inner, outer = key.pads()
    held: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM public.tenant_claim_keys "
        "WHERE key_id = $1 AND inner_pad = $2 AND outer_pad = $3)",
        key.key_id,
        inner,
        outer,
    )
    return held


async def _sync_workers(conn: asyncpg.Connection) -> bool:
    if not await has_citus(conn):
        return False
    owner = await conn.fetchval(
        "SELECT pg_get_userbyid(relowner) FROM pg_class "
        "WHERE oid = 'public.tenant_claim_keys'::regclass"
    )
    if conn.is_in_transaction():
        await conn.execute("SET LOCAL ROLE NONE")  # the login, for the rest of it
    for row in await conn.fetch(_SYNC_WORKERS, owner):
        if not row["success"]:
            raise ConfigurationError(
                f"tenant keys: worker {row['nodename']}:{row['nodeport']} refused its copy of "
                "the keys (the migrating login must be able to log in there and create tables)"
            )
    return True
