"""Housekeeping on the owner's side: purging ended rate-limit windows, rotating token keys.

A fixed window's counter is never read once its window has ended. Such rows
are deleted in batches, each its own short transaction, so a purge never
holds many locks for long and can be stopped and run again at any time.
Row-level security stays on: two policies of migration 0004 let the owner
(the role that ran the migrations, never the app role) read and delete ended
windows of every tenant, and nothing else. Token buckets have no window and
are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import asyncpg

from slack_fathom_db import validation
from slack_fathom_db.connections import DRIVER_ERRORS, SEARCH_PATH
from slack_fathom_db.errors import translate
from slack_fathom_db.models.slack import SECRET_COLUMNS
from slack_fathom_db.tokens import TokenCipher, TokenDecryptionError, token_context

if TYPE_CHECKING:
    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "DEFAULT_PURGE_AFTER_DAYS",
    "KeyRotation",
    "purge_rate_limit_windows",
    "rotate_token_keys",
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
    conn = await _owner_connection(settings, action="purge rate-limit windows")
    deleted = 0
    try:
        while True:
            status = await conn.execute(_PURGE_BATCH, days, batch)
            count = int(status.rsplit(" ", 1)[1])
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
    conn = await _owner_connection(settings, action="rotate token keys")
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


async def _owner_connection(settings: DatabaseSettings, *, action: str) -> asyncpg.Connection:
    """A connection on the owner's side (``DATABASE_MIGRATION_URL``), acting as the owner."""
    url = settings.for_migrations().sqlalchemy_url().set(drivername="postgresql")
    try:
        return await asyncpg.connect(
            url.render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            command_timeout=settings.client_timeout,
            statement_cache_size=0,  # also right through PgBouncer in transaction mode
            server_settings={
                "application_name": "slack_fathom_db maintenance",
                "role": settings.roles.owner,
                "search_path": SEARCH_PATH,
            },
        )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=action) from exc
