"""Checking the audit log's hash chains (``sfdb audit verify``).

The database chains each workspace's audit events as their transactions
commit (:mod:`slack_fathom_db.models.audit`, migration 0009).
:func:`verify_audit_chains` walks every chain, or one workspace's, on the
owner's side, and reports for each the first place that breaks it:

* a place missing (taken out of the chain), or an event missing at its place
  (deleted);
* a place whose hash is not SHA-256 over its predecessor's hash and its
  event's content (the event edited, or the chain rewritten there);
* personal fields that no longer match their digest (edited), or a salt erased
  while something personal is left;
* an event that has no place (written around the chain's trigger), or two;
* a chain that does not end where its head (``audit_chain_heads``) says: the
  newest places removed, or places added past it; or places without a head.

A chain proves what it proves to someone who cannot rewrite all of it: a
superuser who recomputes every hash after an edit leaves a valid chain. Keep
the heads it reports (:attr:`ChainState.head`, the ``head`` lines of ``sfdb
audit verify``) where the database's superusers cannot write, and give them
back (``kept``, ``--kept FILE``): a chain rewritten at or below a kept head no
longer has the kept hash at that place.

Once retention (:mod:`slack_fathom_db.audit_retention`) dropped a workspace's
oldest events, its chain starts where ``audit_chain_starts`` says: its first
place follows from the recorded previous hash instead of 32 zero bytes, and
the places from there on whose events retention dropped keep their stored
hashes (their events are gone; the next kept event's hash still follows from
them). The start must be the one the newest ``audit.retained`` event of the
chain records (:func:`start_record`): a start moved, or its hash changed,
after that event was chained is reported. A kept head before the start can no
longer be checked (it is reported as retired), except one just before it,
whose hash the start records. What cannot be proven: a start moved forward
together with a matching retention event logged afterwards (the owner may log
events), by someone who also deleted the events in between; only heads kept
at or after the true start, and the ``audit_retention`` record of what was
dropped, tell such a forgery apart.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from slack_fathom_db import validation
from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import TenantNotFound, ValidationError, translate
from slack_fathom_db.maintenance import owner_connection

if TYPE_CHECKING:
    import uuid
    from collections.abc import Iterable, Mapping, Sequence

    import asyncpg

    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "GENESIS",
    "RETENTION_EVENT",
    "AuditVerification",
    "ChainBreak",
    "ChainState",
    "KeptHead",
    "parse_kept_heads",
    "start_record",
    "verify_audit_chains",
]

_ACTION: Final = "verify the audit chains"
GENESIS: Final = bytes(32)
"""The hash before a chain's first event."""
RETENTION_EVENT: Final = "audit.retained"
"""The event type of the record, in a chain, of where retention made it start."""


def start_record(chain_seq: int, previous_hash: bytes, dropped_places: Sequence[int] = ()) -> str:
    """A chain's start as its retention event's ``resource_id`` records it:
    ``PLACE:PREVIOUS_HASH[:DROPPED,PLACES]``."""
    record = f"{chain_seq}:{previous_hash.hex()}"
    return record + (":" + ",".join(map(str, dropped_places)) if dropped_places else "")


# The canonical forms of migration 0009 (``sfdb_audit_content()``, ``sfdb_audit_personal()``),
# written out here with the server's built-in functions only: the owner, which may replace
# the schema's functions, cannot make verify compute what it likes. Every function is
# qualified (an exact-type function of another schema would win over a built-in taking
# "any"); operators and casts take types the built-ins match exactly, on the connection's
# pinned path (pg_catalog first).
_CONTENT: Final = """
    pg_catalog.convert_to(pg_catalog.jsonb_build_array(
        'audit/v1'::text, event_id, tenant_id, chain_seq, event_type, event_category, status,
        resource_type, resource_id,
        (EXTRACT(epoch FROM created_at) * 1000000::numeric)::bigint,
        pg_catalog.encode(personal_digest, 'hex'::text)
    )::text, 'UTF8'::name)
"""
_PERSONAL: Final = """
    pg_catalog.sha256(personal_salt || pg_catalog.convert_to(pg_catalog.jsonb_build_array(
        user_id, pg_catalog.host(ip_address), pg_catalog.masklen(ip_address), user_agent,
        action_description, metadata
    )::text, 'UTF8'::name))
"""
# One pass over the places in chain order, each judged against its predecessor, its event
# and its head; per workspace, the first broken place and the newest intact one (at most
# two rows a workspace, however many are broken). A place's personal fields count as
# erased when its salt is: then nothing of them may be left.
_WALK: Final = f"""
SELECT DISTINCT ON (tenant_id, broken) * FROM (
    SELECT *, chain_seq <> coalesce(prev_seq, start_seq - 1::bigint, 0::bigint) + 1
              OR NOT (found OR retired) OR past_head
              OR repeated OR hash_holds IS NOT TRUE OR personal_holds IS NOT TRUE AS broken
    FROM (
        SELECT tenant_id, chain_seq, event_id, prev_seq, start_seq, retired, places, newest,
               row_hash, found, past_head, repeated,
               CASE WHEN retired AND NOT found THEN true
                   ELSE row_hash = pg_catalog.sha256(
                       coalesce(prev_hash, start_hash, $2::bytea) || {_CONTENT})
               END AS hash_holds,
               CASE WHEN retired AND NOT found THEN true
                   WHEN personal_salt IS NOT NULL
                   THEN personal_digest = {_PERSONAL}
                   ELSE user_id IS NULL AND ip_address IS NULL AND user_agent IS NULL
                       AND action_description = ''::text AND metadata = '{{}}'::jsonb
               END AS personal_holds
        FROM (
            SELECT c.tenant_id, c.chain_seq, c.event_id, c.row_hash, a.id IS NOT NULL AS found,
                   c.chain_seq > h.chain_seq IS TRUE AS past_head,
                   s.chain_seq AS start_seq, s.previous_hash AS start_hash,
                   c.chain_seq = ANY (s.dropped_places) IS TRUE AS retired,
                   a.event_type, a.event_category, a.status, a.resource_type, a.resource_id,
                   a.created_at, a.personal_digest, a.personal_salt, a.user_id, a.ip_address,
                   a.user_agent, a.action_description, a.metadata,
                   pg_catalog.lag(c.chain_seq) OVER chain AS prev_seq,
                   pg_catalog.lag(c.row_hash) OVER chain AS prev_hash,
                   pg_catalog.count(*) OVER (PARTITION BY c.tenant_id) AS places,
                   pg_catalog.count(*) OVER (PARTITION BY c.tenant_id, c.event_id) > 1
                       AS repeated,
                   pg_catalog.lead(c.chain_seq) OVER chain IS NULL AS newest
            FROM public.audit_chain AS c
            LEFT JOIN public.audit_logs AS a ON a.tenant_id = c.tenant_id AND a.id = c.event_id
            LEFT JOIN public.audit_chain_heads AS h ON h.tenant_id = c.tenant_id
            LEFT JOIN public.audit_chain_starts AS s ON s.tenant_id = c.tenant_id
            WHERE $1::uuid IS NULL OR c.tenant_id = $1::uuid
            WINDOW chain AS (PARTITION BY c.tenant_id ORDER BY c.chain_seq)
        ) AS walked
    ) AS judged
) AS verdicts
WHERE newest OR broken
ORDER BY tenant_id, broken, chain_seq
"""  # noqa: S608 - made of this module's constants
# The oldest event without a place, of each workspace that has one.
_UNCHAINED: Final = """
SELECT DISTINCT ON (a.tenant_id) a.tenant_id, a.id FROM public.audit_logs AS a
WHERE ($1::uuid IS NULL OR a.tenant_id = $1::uuid)
  AND NOT EXISTS (
      SELECT FROM public.audit_chain AS c WHERE c.tenant_id = a.tenant_id AND c.event_id = a.id)
ORDER BY a.tenant_id, a.created_at, a.id
"""
_HEADS: Final = """
SELECT h.tenant_id, h.chain_seq
FROM public.audit_chain_heads AS h
WHERE $1::uuid IS NULL OR h.tenant_id = $1::uuid
"""
# Each start, and the newest retention event in its chain (which records the start).
_STARTS: Final = f"""
WITH recorded AS (
    SELECT DISTINCT ON (c.tenant_id) c.tenant_id, a.id, a.resource_id
    FROM public.audit_chain AS c
    JOIN public.audit_logs AS a ON a.tenant_id = c.tenant_id AND a.id = c.event_id
    WHERE ($1::uuid IS NULL OR c.tenant_id = $1::uuid)
      AND a.event_type = '{RETENTION_EVENT}'::text AND a.resource_type = 'audit_chain'::text
    ORDER BY c.tenant_id, c.chain_seq DESC
)
SELECT s.tenant_id, s.chain_seq, s.previous_hash, s.dropped_places,
       r.id AS recorded_event, r.resource_id AS recorded
FROM public.audit_chain_starts AS s LEFT JOIN recorded AS r ON r.tenant_id = s.tenant_id
WHERE $1::uuid IS NULL OR s.tenant_id = $1::uuid
"""  # noqa: S608 - made of this module's constants
_TEAMS: Final = "SELECT id, slack_team_id FROM public.tenants WHERE id = ANY($1::uuid[])"
_KEPT: Final = """
SELECT c.row_hash FROM public.audit_chain AS c
WHERE c.tenant_id = (SELECT id FROM public.tenants WHERE slack_team_id = $1)
  AND c.chain_seq = $2
"""
_KEPT_START: Final = """
SELECT s.chain_seq, s.previous_hash FROM public.audit_chain_starts AS s
WHERE s.tenant_id = (SELECT id FROM public.tenants WHERE slack_team_id = $1)
"""
_KEPT_LINE: Final = re.compile(r"head (?P<team>\S+) (?P<seq>[0-9]{1,18}) (?P<hash>[0-9a-f]{64})")
_TEAM: Final = "SELECT id FROM public.tenants WHERE slack_team_id = $1"


@dataclass(frozen=True, slots=True)
class KeptHead:
    """A place of a workspace's chain and its hash, as an earlier verify reported it."""

    slack_team_id: str
    chain_seq: int
    row_hash: bytes


def parse_kept_heads(text: str) -> list[KeptHead]:
    """The ``head TEAM PLACE HASH`` lines of ``sfdb audit verify`` output (others ignored).

    Raises :class:`~slack_fathom_db.errors.ValidationError` for a ``head`` line of another
    shape (a line cut in two, say: a head left out would go unchecked), or when there is
    none.
    """
    kept = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip().startswith("head"):
            continue
        match = _KEPT_LINE.fullmatch(line.strip())
        if match is None:
            raise ValidationError(f"line {number} is not 'head TEAM PLACE HASH'")
        team = validation.slack_team_id(match["team"])
        kept.append(KeptHead(team, int(match["seq"]), bytes.fromhex(match["hash"])))
    if not kept:
        raise ValidationError("no 'head TEAM PLACE HASH' line in the kept heads")
    return kept


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first place at which one workspace's chain does not hold."""

    chain_seq: int | None
    """The place in the chain (``None``: an event that has none)."""
    event_id: uuid.UUID | None
    """The event concerned, if there is one."""
    problem: str


@dataclass(frozen=True, slots=True)
class ChainState:
    """One workspace's audit chain, as checked."""

    tenant_id: uuid.UUID
    slack_team_id: str | None
    events: int
    """Places in the chain."""
    head: tuple[int, bytes] | None
    """``(chain_seq, row_hash)`` of the chain's newest place, if it holds (``None``: no
    such place)."""
    broken: ChainBreak | None = None


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """What :func:`verify_audit_chains` found: every chain, in workspace order."""

    chains: list[ChainState] = field(default_factory=list)
    lost: list[tuple[KeptHead, str]] = field(default_factory=list)
    """The kept heads the chains no longer hold, and why."""
    retired: list[tuple[KeptHead, str]] = field(default_factory=list)
    """The kept heads before their chain's start, which retention dropped: not checkable."""

    @property
    def events(self) -> int:
        return sum(chain.events for chain in self.chains)

    @property
    def broken(self) -> list[ChainState]:
        return [chain for chain in self.chains if chain.broken is not None]

    @property
    def ok(self) -> bool:
        return not self.broken and not self.lost


async def verify_audit_chains(
    settings: DatabaseSettings,
    *,
    slack_team_id: str | None = None,
    kept: Sequence[KeptHead] = (),
) -> AuditVerification:
    """Check every workspace's audit chain, or only ``slack_team_id``'s, as the owner; and
    that each ``kept`` head is still in its chain, with its hash.

    Reads in one snapshot; events of transactions still open are not seen (their
    places are taken as they commit). Raises
    :class:`~slack_fathom_db.errors.TenantNotFound` for a workspace the database
    does not know.
    """
    team = None if slack_team_id is None else validation.slack_team_id(slack_team_id)
    conn = await owner_connection(settings, action=_ACTION, long_reads=True)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            tenant: uuid.UUID | None = None
            if team is not None:
                tenant = await conn.fetchval(_TEAM, team)
                if tenant is None:
                    raise TenantNotFound(f"no workspace {team} in this database")
            heads = {row["tenant_id"]: row for row in await conn.fetch(_HEADS, tenant)}
            starts = {row["tenant_id"]: row for row in await conn.fetch(_STARTS, tenant)}
            walked = await conn.fetch(_WALK, tenant, GENESIS)
            unchained = await conn.fetch(_UNCHAINED, tenant)
            tenants = {row["tenant_id"] for row in [*walked, *unchained]} | set(heads) | set(starts)
            teams = {
                row["id"]: row["slack_team_id"] for row in await conn.fetch(_TEAMS, list(tenants))
            }
            now = [
                (
                    await conn.fetchval(_KEPT, k.slack_team_id, k.chain_seq),
                    await conn.fetchrow(_KEPT_START, k.slack_team_id),
                )
                for k in kept
            ]
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_ACTION) from exc
    finally:
        await conn.close()
    lost, retired = [], []
    for head, (at_place, start) in zip(kept, now, strict=True):
        found = at_place
        if found is None and start is not None and head.chain_seq < start["chain_seq"] - 1:
            retired.append((head, _retired(head, int(start["chain_seq"]))))
            continue
        if found is None and start is not None and head.chain_seq == start["chain_seq"] - 1:
            found = start["previous_hash"]  # the start records the hash of the place before it
        if found is None or bytes(found) != head.row_hash:
            lost.append((head, _lost(head, found)))
    return AuditVerification(_judge(heads, starts, walked, unchained, teams), lost, retired)


def _lost(head: KeptHead, now: bytes | None) -> str:
    if now is None:
        return f"place {head.chain_seq} of {head.slack_team_id}, a kept head, is gone"
    return (
        f"place {head.chain_seq} of {head.slack_team_id} no longer has the hash kept for it: "
        "the chain was rewritten there or before"
    )


def _retired(head: KeptHead, start: int) -> str:
    return (
        f"place {head.chain_seq} of {head.slack_team_id}, a kept head, is before the chain's "
        f"start at place {start} (retention dropped it): it can no longer be checked"
    )


def _judge(
    heads: Mapping[uuid.UUID, asyncpg.Record],
    starts: Mapping[uuid.UUID, asyncpg.Record],
    walked: Iterable[asyncpg.Record],
    unchained: Iterable[asyncpg.Record],
    teams: Mapping[uuid.UUID, str],
) -> list[ChainState]:
    """Each chain's state from its head and what :data:`_WALK` and :data:`_UNCHAINED`
    returned for it."""
    places: defaultdict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for row in walked:
        places[row["tenant_id"]].append(row)
    outside: dict[uuid.UUID, uuid.UUID] = {}
    for row in unchained:
        outside.setdefault(row["tenant_id"], row["id"])
    chains = []
    for tenant in sorted(set(heads) | set(starts) | set(places) | set(outside)):
        head, start = heads.get(tenant), starts.get(tenant)
        found = places.get(tenant, [])
        newest = next((row for row in found if row["newest"] and not row["broken"]), None)
        broken = (
            next(filter(None, map(_place_break, found)), None)
            or _end_break(head, newest, start)
            or _start_break(start)
            or (
                ChainBreak(None, outside[tenant], "an event without a place in the chain")
                if tenant in outside
                else None
            )
        )
        chains.append(
            ChainState(
                tenant_id=tenant,
                slack_team_id=teams.get(tenant),
                events=int(found[0]["places"]) if found else 0,
                head=None
                if newest is None
                else (int(newest["chain_seq"]), bytes(newest["row_hash"])),
                broken=broken,
            )
        )
    return chains


def _place_break(row: asyncpg.Record) -> ChainBreak | None:
    if not row["broken"]:
        return None
    seq = int(row["chain_seq"])
    if row["prev_seq"] is not None:
        expected = int(row["prev_seq"]) + 1
    else:
        expected = 1 if row["start_seq"] is None else int(row["start_seq"])
    if seq > expected:
        problem = f"{_places(expected, seq - 1)} missing before it"
    elif seq < expected:
        problem = f"a place out of order (expected place {expected})"
    elif not row["found"]:
        problem = "its event is missing: deleted"
    elif not row["hash_holds"]:
        problem = "its event is not the one chained there: edited, or the chain rewritten"
    elif not row["personal_holds"]:
        problem = "its event's personal fields were changed after it was written"
    elif row["repeated"]:
        problem = "its event has another place too"
    else:
        problem = "a place past the chain's head: added after it"
    return ChainBreak(seq, row["event_id"], problem)


def _end_break(
    head: asyncpg.Record | None, newest: asyncpg.Record | None, start: asyncpg.Record | None
) -> ChainBreak | None:
    if head is None:
        if newest is None:
            return None
        return ChainBreak(int(newest["chain_seq"]), newest["event_id"], "the chain has no head")
    before = 0 if start is None else int(start["chain_seq"]) - 1
    end = before if newest is None else int(newest["chain_seq"])
    kept = int(head["chain_seq"])  # places past it are broken places
    if end < kept:
        return ChainBreak(end + 1, None, f"{_places(end + 1, kept)} missing at the end")
    return None


def _start_break(start: asyncpg.Record | None) -> ChainBreak | None:
    """A start that is not the one the chain's newest retention event records."""
    if start is None:
        return None
    seq = int(start["chain_seq"])
    if start["recorded"] is None:
        return ChainBreak(
            seq, None, f"the chain starts at place {seq}, but no retention event in it says so"
        )
    expected = start_record(seq, bytes(start["previous_hash"]), start["dropped_places"])
    if start["recorded"] != expected:
        return ChainBreak(
            seq,
            start["recorded_event"],
            "the chain's start is not the one its newest retention event records",
        )
    return None


def _places(first: int, last: int) -> str:
    return f"place {first} is" if first == last else f"places {first} to {last} are"
