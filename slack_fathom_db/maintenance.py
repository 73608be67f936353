"""Housekeeping the owner runs on a schedule: purging rate-limit windows that ended long ago.

A fixed window's counter is never read once its window has ended. Such rows
are deleted in batches, each its own short transaction, so a purge never
holds many locks for long and can be stopped and run again at any time.
Row-level security stays on: two policies of migration 0004 let the owner
(the role that ran the migrations, never the app role) read and delete ended
windows of every tenant, and nothing else. Token buckets have no window and
are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import asyncpg

from slack_fathom_db import validation
from slack_fathom_db.connections import DRIVER_ERRORS, SEARCH_PATH
from slack_fathom_db.errors import translate

if TYPE_CHECKING:
    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["DEFAULT_PURGE_AFTER_DAYS", "purge_rate_limit_windows"]

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
    url = settings.for_migrations().sqlalchemy_url().set(drivername="postgresql")
    try:
        conn = await asyncpg.connect(
            url.render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            command_timeout=settings.client_timeout,
            statement_cache_size=0,  # also right through PgBouncer in transaction mode
            server_settings={
                "application_name": "slack_fathom_db maintenance",
                "role": settings.roles.owner,  # the purge policies are the owner's
                "search_path": SEARCH_PATH,
            },
        )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="purge rate-limit windows") from exc
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
