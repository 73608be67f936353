"""The audit log's monthly partitions: made ahead, and dropped whole once old enough.

``audit_logs`` is partitioned by the month (UTC) of ``created_at`` (migration
0011). :func:`ensure_audit_partitions` makes the partitions of the current
month and the next ones ahead of need (``sfdb migrate`` and ``sfdb audit
retain`` call it); an event of a month without a partition waits in the
default partition until its month's partition is made, and moves there with it.

:func:`retain_audit_log` (``sfdb audit retain --months N``) is the only way
audit events ever leave: it detaches and drops the partitions of the months
that ended more than N months ago, whole, in one transaction, and records

* each dropped partition in ``audit_retention`` (its month, events, workspaces);
* for each workspace that lost events, where its chain now starts
  (``audit_chain_starts``): the first place it keeps, the hash of the place
  before it, and the places from there on whose events were dropped. Those
  exist because an event takes its place as its transaction commits: an event
  written at the end of one month can take a place after an event of the next
  month. The chain then starts at the first place of a kept event (or at its
  newest place when it keeps none), and the dropped events' places from there
  on keep their hashes, so every kept event still verifies from its
  predecessor's hash;
* in the chain itself: an ``audit.retained`` event of that workspace whose
  ``resource_id`` is the start (:func:`~slack_fathom_db.audit_chain.start_record`).
  ``verify`` checks the start against it, and it is covered by every head kept
  after it.

The places before the start lose their ``audit_chain`` rows with their events.
It runs on the owner's side (``DATABASE_MIGRATION_URL``), as the owner.
Idempotent: a second run finds nothing old enough and drops nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from slack_fathom_db import validation
from slack_fathom_db.audit_chain import GENESIS, RETENTION_EVENT, start_record
from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import ConfigurationError, Conflict, translate
from slack_fathom_db.maintenance import owner_connection

if TYPE_CHECKING:
    import uuid
    from datetime import date

    import asyncpg

    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "DEFAULT_MONTHS_AHEAD",
    "AuditRetention",
    "ChainStart",
    "DroppedPartition",
    "ensure_audit_partitions",
    "retain_audit_log",
]

DEFAULT_MONTHS_AHEAD: Final = 3
"""Partitions are made for the current month and this many after it."""
MAX_MONTHS_AHEAD: Final = 120
MAX_MONTHS_KEPT: Final = 1200
SCHEMA: Final = "audit_partitions"
_ENSURE_ACTION: Final = "make the audit log's partitions"
_ACTION: Final = "retain the audit log"

_HAS_PARTITIONS: Final = (
    "SELECT to_regprocedure('public.sfdb_audit_partitions_ensure(integer)') IS NOT NULL"
)
# The monthly partitions whose month ended more than $1 months ago, oldest first (their
# names are the ensure function's: audit_logs_y<year>m<month>).
_OLD_PARTITIONS: Final = f"""
SELECT name, month FROM (
    SELECT c.relname::text AS name,
           pg_catalog.to_date(pg_catalog.substr(c.relname::text, 13), 'YYYY"m"MM') AS month
    FROM pg_catalog.pg_inherits AS i JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'public.audit_logs'::regclass
      AND c.relnamespace = '{SCHEMA}'::regnamespace
      AND c.relname ~ '^audit_logs_y[0-9]{{4}}m[0-9]{{2}}$'
) AS monthly
WHERE (month + interval '1 month') AT TIME ZONE 'UTC' < now() - make_interval(months => $1)
ORDER BY month
"""  # noqa: S608 - made of this module's constants
_CITUS_SEQUENTIAL: Final = """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
    END IF;
END
$$
"""
_HEAD: Final = "SELECT chain_seq FROM public.audit_chain_heads WHERE tenant_id = $1"
_FIRST_KEPT: Final = """
SELECT min(c.chain_seq) FROM public.audit_chain AS c
JOIN public.audit_logs AS a ON a.tenant_id = c.tenant_id AND a.id = c.event_id
WHERE c.tenant_id = $1
"""
_START: Final = (
    "SELECT chain_seq, previous_hash, dropped_places FROM public.audit_chain_starts "
    "WHERE tenant_id = $1"
)
_HASH_AT: Final = "SELECT row_hash FROM public.audit_chain WHERE tenant_id = $1 AND chain_seq = $2"
_SET_START: Final = """
INSERT INTO public.audit_chain_starts AS s
    (tenant_id, chain_seq, previous_hash, dropped_places, moved_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (tenant_id) DO UPDATE
    SET chain_seq = EXCLUDED.chain_seq, previous_hash = EXCLUDED.previous_hash,
        dropped_places = EXCLUDED.dropped_places, moved_at = EXCLUDED.moved_at
"""
_CUT: Final = "DELETE FROM public.audit_chain WHERE tenant_id = $1 AND chain_seq < $2"
_RECORD_EVENT: Final = f"""
INSERT INTO public.audit_logs
    (tenant_id, event_type, event_category, action_description, resource_type, resource_id)
VALUES ($1, '{RETENTION_EVENT}', 'system', $2, 'audit_chain', $3)
"""  # noqa: S608 - made of this module's constants
_RECORD: Final = """
INSERT INTO public.audit_retention (partition, month, events, workspaces, months_kept)
VALUES ($1, $2, $3, $4, $5)
"""


@dataclass(frozen=True, slots=True)
class DroppedPartition:
    """A monthly partition that retention dropped."""

    partition: str
    month: date
    """Its month's first day (UTC)."""
    events: int
    workspaces: int


@dataclass(frozen=True, slots=True)
class ChainStart:
    """Where a workspace's audit chain starts after retention."""

    tenant_id: uuid.UUID
    chain_seq: int
    """The first place the chain holds."""
    previous_hash: bytes
    """The hash of the place before it."""
    dropped_places: tuple[int, ...] = ()
    """Places from ``chain_seq`` on whose events were dropped; their hashes are kept."""


@dataclass(frozen=True, slots=True)
class AuditRetention:
    """What :func:`retain_audit_log` did."""

    months: int
    """Months kept besides the current one."""
    made: list[str] = field(default_factory=list)
    """Partitions made ahead on the way."""
    dropped: list[DroppedPartition] = field(default_factory=list)
    starts: list[ChainStart] = field(default_factory=list)

    @property
    def events(self) -> int:
        return sum(partition.events for partition in self.dropped)


async def ensure_audit_partitions(
    settings: DatabaseSettings, *, months_ahead: int = DEFAULT_MONTHS_AHEAD
) -> list[str] | None:
    """Make the audit log's partitions of this month and ``months_ahead`` months after it
    (and of every month whose events wait in the default partition); the ones made.

    ``None`` when the database is at a revision before the partitioned audit log.
    Idempotent; runs as the owner.
    """
    ahead = validation.integer(months_ahead, field="months_ahead", maximum=MAX_MONTHS_AHEAD)
    conn = await owner_connection(settings, action=_ENSURE_ACTION, long_reads=True)
    try:
        if not await conn.fetchval(_HAS_PARTITIONS):
            return None
        async with conn.transaction():
            rows = await conn.fetch("SELECT public.sfdb_audit_partitions_ensure($1)", ahead)
        return [row[0] for row in rows]
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_ENSURE_ACTION) from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def retain_audit_log(
    settings: DatabaseSettings, *, months: int, months_ahead: int = DEFAULT_MONTHS_AHEAD
) -> AuditRetention:
    """Drop the audit log's monthly partitions whose month ended more than ``months``
    months ago, and record it (see the module docstring); make partitions ahead first.

    Raises :class:`~slack_fathom_db.errors.ValidationError` for ``months`` below 1,
    :class:`~slack_fathom_db.errors.ConfigurationError` on a database before the
    partitioned audit log, and :class:`~slack_fathom_db.errors.Conflict` (nothing
    dropped) when a workspace's chain lacks the place before its new start.
    """
    kept = validation.integer(months, field="months", minimum=1, maximum=MAX_MONTHS_KEPT)
    made = await ensure_audit_partitions(settings, months_ahead=months_ahead)
    if made is None:
        raise ConfigurationError(
            f"{_ACTION}: the database has no partitioned audit log yet (run sfdb migrate)"
        )
    conn = await owner_connection(settings, action=_ACTION, long_reads=True)
    try:
        async with conn.transaction():
            # One run at a time; the listing below then sees what the other left.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sfdb_audit_retention'))")
            # On Citus, DDL and writes share one connection per node (keys to tenants).
            await conn.execute(_CITUS_SEQUENTIAL)
            old = [(row["name"], row["month"]) for row in await conn.fetch(_OLD_PARTITIONS, kept)]
            if not old:
                return AuditRetention(kept, made)
            # Detaching takes the parent's exclusive lock: no event is written or takes a
            # place until this commits, so the chains stand still while starts move.
            for name, _ in old:
                await conn.execute(
                    f"ALTER TABLE public.audit_logs DETACH PARTITION {SCHEMA}.{name}"
                )
            dropped, last = await _survey(conn, kept, old)
            starts = [
                start
                for tenant in sorted(last)
                if (start := await _move_start(conn, tenant, last[tenant], old, kept)) is not None
            ]
            for partition in dropped:
                await conn.execute(f"DROP TABLE {SCHEMA}.{partition.partition}")
        return AuditRetention(kept, made, dropped, starts)
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_ACTION) from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


async def _survey(
    conn: asyncpg.Connection, kept: int, old: list[tuple[str, date]]
) -> tuple[list[DroppedPartition], dict[uuid.UUID, int | None]]:
    """Record each detached partition; per workspace, the newest place of a dropped event
    (``None``: none of its dropped events had a place)."""
    dropped: list[DroppedPartition] = []
    last: dict[uuid.UUID, int | None] = {}
    for name, month in old:
        rows = await conn.fetch(
            "SELECT d.tenant_id, count(*) AS events, max(c.chain_seq) AS last "  # noqa: S608
            f"FROM {SCHEMA}.{name} AS d LEFT JOIN public.audit_chain AS c "
            "ON c.tenant_id = d.tenant_id AND c.event_id = d.id GROUP BY d.tenant_id"
        )
        for row in rows:
            newest = last.get(row["tenant_id"])
            candidates = [p for p in (newest, row["last"]) if p is not None]
            last[row["tenant_id"]] = max(candidates) if candidates else None
        events = sum(int(row["events"]) for row in rows)
        await conn.execute(_RECORD, name, month, events, len(rows), kept)
        dropped.append(DroppedPartition(name, month, events, len(rows)))
    return dropped, last


async def _move_start(
    conn: asyncpg.Connection,
    tenant: uuid.UUID,
    last_dropped: int | None,
    old: list[tuple[str, date]],
    kept: int,
) -> ChainStart | None:
    """Move ``tenant``'s chain start past its dropped events, cut the places before it,
    and log where it now starts, in the chain."""
    head = await conn.fetchval(_HEAD, tenant)
    if head is None or last_dropped is None:
        return None  # nothing of the chain was dropped
    first_kept = await conn.fetchval(_FIRST_KEPT, tenant)
    begin = int(head) if first_kept is None else min(int(first_kept), int(head))
    current = await conn.fetchrow(_START, tenant)
    places = set() if current is None else {p for p in current["dropped_places"] if p >= begin}
    if last_dropped >= begin:  # dropped events that took their places after kept ones
        for name, _ in old:
            places |= {
                int(row[0])
                for row in await conn.fetch(
                    "SELECT c.chain_seq FROM public.audit_chain AS c "  # noqa: S608
                    f"JOIN {SCHEMA}.{name} AS d ON d.tenant_id = c.tenant_id AND d.id = c.event_id "
                    "WHERE c.tenant_id = $1 AND c.chain_seq >= $2",
                    tenant,
                    begin,
                )
            }
    previous = await conn.fetchval(_HASH_AT, tenant, begin - 1)
    if previous is None:
        if current is not None and current["chain_seq"] == begin:
            previous = current["previous_hash"]
        elif begin == 1:
            previous = GENESIS
        else:
            raise Conflict(
                f"{_ACTION}: the audit chain of workspace {tenant} has no place {begin - 1}, "
                "before its new start; nothing was dropped (run sfdb audit verify)"
            )
    start = ChainStart(tenant, begin, bytes(previous), tuple(sorted(places)))
    await conn.execute(_SET_START, tenant, begin, start.previous_hash, list(start.dropped_places))
    await conn.execute(_CUT, tenant, begin)
    months = ", ".join(month.strftime("%Y-%m") for _, month in old)
    await conn.execute(
        _RECORD_EVENT,
        tenant,
        f"audit events of {months} dropped by retention ({kept} months kept); "
        f"the chain now starts at place {begin}",
        start_record(start.chain_seq, start.previous_hash, start.dropped_places),
    )
    return start
