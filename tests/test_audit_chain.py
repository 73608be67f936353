"""The audit log's hash chains: computed by the database as events commit, checked by verify.

Every test here writes events of workspaces of its own and verifies those
workspaces only: the database is shared with the rest of the suite, and the
tampering tests leave broken chains behind on purpose. Tampering is what a
superuser can do (``session_replication_role = replica`` silences every
trigger, the append-only one included); the runtime roles cannot even read the
chain's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.audit_chain import (
    ChainState,
    KeptHead,
    parse_kept_heads,
    verify_audit_chains,
)
from slack_fathom_db.errors import TenantNotFound, ValidationError
from tests.conftest import superuser_connection
from tests.helpers import claim_statement, on_citus, refused_to_every_runtime_role

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sqlalchemy.engine import URL

    from tests.conftest import TenantFactory

GENESIS = bytes(32)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def log(db: Database, tenant: TenantId, *descriptions: str) -> list[uuid.UUID]:
    """Log one event per description in one committed unit of work; their ids."""
    async with db.unit_of_work(tenant) as uow:
        ids = [
            (
                await uow.audit.log_event(
                    event_type="meeting.created",
                    event_category="data",
                    action_description=text,
                    ip_address="10.1.2.3",
                    user_agent="Slackbot 1.0",
                    metadata={"n": index},
                )
            ).id
            for index, text in enumerate(descriptions)
        ]
        await uow.commit()
    return ids


@contextlib.asynccontextmanager
async def past_the_triggers(admin: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A superuser's transaction in which no trigger fires, the append-only one included."""
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        yield admin


async def team_of(admin: asyncpg.Connection, tenant: TenantId) -> str:
    team = await admin.fetchval("SELECT slack_team_id FROM tenants WHERE id = $1", tenant)
    assert isinstance(team, str)
    return team


async def chain_of(
    settings: DatabaseSettings, admin: asyncpg.Connection, tenant: TenantId
) -> ChainState:
    found = await verify_audit_chains(settings, slack_team_id=await team_of(admin, tenant))
    assert [chain.tenant_id for chain in found.chains] == [tenant]
    return found.chains[0]


async def places(admin: asyncpg.Connection, tenant: TenantId) -> list[tuple[int, uuid.UUID]]:
    rows = await admin.fetch(
        "SELECT chain_seq, event_id FROM audit_chain WHERE tenant_id = $1 ORDER BY chain_seq",
        tenant,
    )
    return [(row["chain_seq"], row["event_id"]) for row in rows]


async def chained(
    admin: asyncpg.Connection, tenant: TenantId, column: str
) -> list[tuple[int, object]]:
    """``(place, column of its event)`` of ``tenant``'s chain, in chain order."""
    rows = await admin.fetch(
        f"SELECT c.chain_seq, a.{column} AS value FROM audit_chain c JOIN audit_logs a "
        "ON a.tenant_id = c.tenant_id AND a.id = c.event_id WHERE c.tenant_id = $1 "
        "ORDER BY c.chain_seq",
        tenant,
    )
    return [(row["chain_seq"], row["value"]) for row in rows]


def _jsonb(values: list[object]) -> bytes:
    """A JSON array as jsonb prints it (ASCII strings, one-key objects)."""
    return json.dumps(values, separators=(", ", ": ")).encode()


async def test_the_chain_is_sha256_over_the_previous_hash_and_the_documented_content(
    db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    """Recomputed here from the stored row, as the migration documents it: the database
    computes exactly that, place after place from 32 zero bytes."""
    ids = await log(db, tenant_a, "first", "second")
    rows = await admin.fetch(
        "SELECT a.*, c.chain_seq, c.row_hash FROM audit_chain c JOIN audit_logs a "
        "ON a.tenant_id = c.tenant_id AND a.id = c.event_id WHERE c.tenant_id = $1 "
        "ORDER BY c.chain_seq",
        tenant_a,
    )
    assert [(row["chain_seq"], row["id"]) for row in rows] == [(1, ids[0]), (2, ids[1])]
    previous = GENESIS
    for row in rows:
        personal = _jsonb(
            [
                None,
                "10.1.2.3",
                32,
                "Slackbot 1.0",
                row["action_description"],
                json.loads(row["metadata"]),
            ]
        )
        digest = hashlib.sha256(row["personal_salt"] + personal).digest()
        assert row["personal_digest"] == digest
        micros = (row["created_at"] - EPOCH) // timedelta(microseconds=1)
        content = _jsonb(
            [
                "audit/v1",
                str(row["id"]),
                str(tenant_a),
                row["chain_seq"],
                "meeting.created",
                "data",
                "success",
                None,
                None,
                micros,
                digest.hex(),
            ]
        )
        assert row["row_hash"] == hashlib.sha256(previous + content).digest()
        previous = row["row_hash"]
    head = await admin.fetchval(
        "SELECT chain_seq FROM audit_chain_heads WHERE tenant_id = $1", tenant_a
    )
    assert head == 2
    chain = await chain_of(sfdb_direct_settings, admin, tenant_a)
    assert (chain.events, chain.head, chain.broken) == (2, (2, previous), None)


async def test_each_workspace_has_its_own_chain_and_a_rolled_back_event_takes_no_place(
    db: Database,
    tenant_a: TenantId,
    tenant_b: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    first = await log(db, tenant_a, "a1")
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="gone"
        )
        await uow.rollback()
    b_ids = await log(db, tenant_b, "b1", "b2")
    second = await log(db, tenant_a, "a2")
    assert await places(admin, tenant_a) == [(1, first[0]), (2, second[0])]
    assert await places(admin, tenant_b) == [(1, b_ids[0]), (2, b_ids[1])]
    for tenant in (tenant_a, tenant_b):
        chain = await chain_of(sfdb_direct_settings, admin, tenant)
        assert (chain.events, chain.broken) == (2, None)


async def test_what_an_insert_says_of_the_commitment_is_replaced(
    tenant_a: TenantId, admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    """The app role may insert every column (Citus needs it): the trigger sets the salt and
    the digest anyway, and the chain takes the event as the database saw it."""
    settings = sfdb_direct_settings
    event = uuid.uuid4()
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
        await admin.execute(claim_statement(settings, tenant_a))
        await admin.execute(
            "INSERT INTO audit_logs (tenant_id, id, event_type, event_category, "
            "action_description, personal_digest, personal_salt) "
            "VALUES ($1, $2, 'auth.login', 'auth', 'chosen', $3, $4)",
            tenant_a,
            event,
            GENESIS,
            GENESIS,
        )
    row = await admin.fetchrow(
        "SELECT id, personal_digest, personal_salt FROM audit_logs WHERE tenant_id = $1",
        tenant_a,
    )
    assert row is not None
    assert row["id"] != event  # the server's id (migration 0006)
    assert GENESIS not in (row["personal_digest"], row["personal_salt"])
    assert len(row["personal_salt"]) == 32
    chain = await chain_of(settings, admin, tenant_a)
    assert (chain.events, chain.broken) == (1, None)


@pytest.mark.parametrize("table", ["audit_chain", "audit_chain_heads"])
async def test_no_runtime_role_may_read_or_write_the_chain(
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    table: str,
) -> None:
    settings = sfdb_direct_settings
    attempts = [
        f"SELECT count(*) FROM public.{table}",
        f"DELETE FROM public.{table}",
        f"UPDATE public.{table} SET chain_seq = chain_seq + 1",
        f"INSERT INTO public.{table} (tenant_id, chain_seq) VALUES ('{tenant_a}', 1)",
        f"TRUNCATE public.{table}",
    ]
    await refused_to_every_runtime_role(admin, settings, tenant_a, attempts)


async def test_32_concurrent_writers_of_one_workspace_leave_one_valid_chain(
    db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    written = await asyncio.gather(*(log(db, tenant_a, f"w{n}-1", f"w{n}-2") for n in range(32)))
    chained = await places(admin, tenant_a)
    assert [seq for seq, _ in chained] == list(range(1, 65))
    assert {event for _, event in chained} == {event for ids in written for event in ids}
    chain = await chain_of(sfdb_direct_settings, admin, tenant_a)
    assert (chain.events, chain.broken) == (64, None)


async def test_a_security_event_logged_inside_a_unit_of_work_that_logged_does_not_wait(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    """Places are taken as transactions commit, so an open unit of work that logged holds no
    lock its own security event (a transaction of its own) would wait for."""
    async with db.unit_of_work(tenant_a) as uow:
        await uow.audit.log_event(
            event_type="meeting.created", event_category="data", action_description="open"
        )
        await asyncio.wait_for(
            db.log_security_event(
                tenant_a,
                event_type="security.denied",
                event_category="security",
                action_description="denied while the other is open",
            ),
            timeout=10,
        )
        await uow.commit()
    assert await chained(admin, tenant_a, "event_type") == [
        (1, "security.denied"),
        (2, "meeting.created"),
    ]


# -- tampering, as a superuser ---------------------------------------------------------

EDIT_EVENT = "UPDATE audit_logs SET event_type = 'auth.login' WHERE tenant_id = $1 AND id = $2"
TAMPERING: dict[str, tuple[str, int | None, str, int | None]] = {
    # what a superuser does: (SQL on the tampered tenant and its second event, the place
    # verify names, its problem, which of the three events it names)
    "edit an event": (
        EDIT_EVENT,
        2,
        "its event is not the one chained there: edited, or the chain rewritten",
        1,
    ),
    "edit a personal field": (
        "UPDATE audit_logs SET ip_address = '192.0.2.1' WHERE tenant_id = $1 AND id = $2",
        2,
        "its event's personal fields were changed after it was written",
        1,
    ),
    "delete an event": (
        "DELETE FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        2,
        "its event is missing: deleted",
        1,
    ),
    "delete an event and its place": (
        "WITH gone AS (DELETE FROM audit_logs WHERE tenant_id = $1 AND id = $2 RETURNING id) "
        "DELETE FROM audit_chain WHERE tenant_id = $1 AND event_id IN (SELECT id FROM gone)",
        3,
        "place 2 is missing before it",
        2,
    ),
    "rewrite a place's hash": (
        "UPDATE audit_chain SET row_hash = sha256(row_hash) WHERE tenant_id = $1 AND event_id = $2",
        2,
        "its event is not the one chained there: edited, or the chain rewritten",
        1,
    ),
    "erase the salt and edit a personal field": (
        "UPDATE audit_logs SET personal_salt = NULL, ip_address = '192.0.2.1' "
        "WHERE tenant_id = $1 AND id = $2",
        2,
        "its event's personal fields were changed after it was written",
        1,
    ),
    "move the first place to 0": (
        "UPDATE audit_chain SET chain_seq = 0 WHERE tenant_id = $1 AND chain_seq = 1 "
        "AND $2::uuid IS NOT NULL",
        0,
        "a place out of order (expected place 1)",
        0,
    ),
    "move the head back": (
        "UPDATE audit_chain_heads SET chain_seq = 1 WHERE tenant_id = $1 AND $2::uuid IS NOT NULL",
        2,
        "a place past the chain's head: added after it",
        1,
    ),
    "delete the head": (
        "DELETE FROM audit_chain_heads WHERE tenant_id = $1 AND $2::uuid IS NOT NULL",
        3,
        "the chain has no head",
        2,
    ),
    "give an event a second place": (
        "UPDATE audit_chain SET event_id = $2 WHERE tenant_id = $1 AND chain_seq = 3",
        2,
        "its event has another place too",
        1,
    ),
    "insert an event around the chain": (
        "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description, "
        "personal_digest) SELECT $1, 'auth.login', 'auth', 'forged', personal_digest "
        "FROM audit_logs WHERE tenant_id = $1 AND id = $2",
        None,
        "an event without a place in the chain",
        None,
    ),
    "delete the newest event and its place": (
        "WITH newest AS (SELECT max(chain_seq) AS seq FROM audit_chain WHERE tenant_id = $1), "
        "gone AS (DELETE FROM audit_chain WHERE tenant_id = $1 AND chain_seq = "
        "(SELECT seq FROM newest) RETURNING event_id) "
        "DELETE FROM audit_logs WHERE tenant_id = $1 AND id IN (SELECT event_id FROM gone) "
        "AND $2::uuid IS NOT NULL",
        3,
        "place 3 is missing at the end",
        None,
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERING))
async def test_verify_names_the_first_place_a_superuser_tampered_with(
    db: Database,
    make_tenant: TenantFactory,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    tampering: str,
) -> None:
    sql, place, problem, event = TAMPERING[tampering]
    tampered, untouched = await make_tenant("Tampered"), await make_tenant("Untouched")
    ids = await log(db, tampered, "one", "two", "three")
    await log(db, untouched, "one", "two", "three")
    assert (await chain_of(sfdb_direct_settings, admin, tampered)).broken is None
    async with past_the_triggers(admin):
        await admin.execute(sql, tampered, ids[1])

    broken = (await chain_of(sfdb_direct_settings, admin, tampered)).broken
    assert broken is not None
    assert (broken.chain_seq, broken.problem) == (place, problem)
    if tampering != "insert an event around the chain":  # that one names the forged event
        assert broken.event_id == (None if event is None else ids[event])
    assert (await chain_of(sfdb_direct_settings, admin, untouched)).broken is None
    everything = await verify_audit_chains(sfdb_direct_settings)
    assert tampered in {chain.tenant_id for chain in everything.broken}
    assert untouched not in {chain.tenant_id for chain in everything.broken}


async def test_verify_refuses_a_workspace_it_does_not_know(
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    with pytest.raises(TenantNotFound, match="TNOSUCHTEAM"):
        await verify_audit_chains(sfdb_direct_settings, slack_team_id="TNOSUCHTEAM")


async def test_an_event_of_a_rolled_back_savepoint_takes_no_place(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    kept = await log(db, tenant_a, "before")
    async with admin.transaction():
        await admin.execute(
            "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description) "
            "VALUES ($1, 'auth.login', 'auth', 'kept')",
            tenant_a,
        )
        savepoint = admin.transaction()
        await savepoint.start()
        await admin.execute(
            "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description) "
            "VALUES ($1, 'auth.login', 'auth', 'undone')",
            tenant_a,
        )
        await savepoint.rollback()
    assert await chained(admin, tenant_a, "action_description") == [
        (1, "before"),
        (2, "kept"),
    ]
    assert kept


async def test_under_repeatable_read_the_writer_that_lost_the_race_fails_to_commit(
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
    sfdb_server: URL,
) -> None:
    """Two REPEATABLE READ transactions of one workspace, both begun before either commits:
    the second to commit cannot take the place after the first's (it does not see it) and
    fails to commit instead of forking the chain."""
    settings = sfdb_direct_settings
    insert = (
        "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description) "
        "VALUES ($1, 'auth.login', 'auth', $2)"
    )
    await log_as_app(admin, settings, tenant_a, "first place")  # the head exists
    async with superuser_connection(sfdb_server, settings) as other:
        one, two = (
            admin.transaction(isolation="repeatable_read"),
            other.transaction(isolation="repeatable_read"),
        )
        await one.start()
        await two.start()
        for conn, text in ((admin, "one"), (other, "two")):
            await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
            await conn.execute(claim_statement(settings, tenant_a))
            await conn.execute(insert, tenant_a, text)
        await one.commit()
        # On Citus the worker's serialization failure reaches the client as the
        # coordinator's failure to commit there.
        with pytest.raises(
            asyncpg.InternalServerError if await on_citus(admin) else asyncpg.SerializationError,
            match="could not commit transaction" if await on_citus(admin) else "serialize",
        ):
            await two.commit()
    assert [seq for seq, _ in await places(admin, tenant_a)] == [1, 2]
    chain = await chain_of(settings, admin, tenant_a)
    assert (chain.events, chain.broken) == (2, None)


async def log_as_app(
    admin: asyncpg.Connection, settings: DatabaseSettings, tenant: TenantId, text: str
) -> None:
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
        await admin.execute(claim_statement(settings, tenant))
        await admin.execute(
            "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description) "
            "VALUES ($1, 'auth.login', 'auth', $2)",
            tenant,
            text,
        )


async def test_the_owner_restores_an_event_with_its_commitment(
    tenant_a: TenantId, admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    """As revision 0006 keeps the owner's id and creation time, the owner's digest and salt
    are kept (a restore keeps the evidence); other roles' are replaced."""
    settings = sfdb_direct_settings
    salt = bytes(range(32))
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.roles.owner}"')
        digest = await admin.fetchval(
            "SELECT sfdb_audit_personal($1, NULL, '10.0.0.1', NULL, 'restored', '{}')", salt
        )
        await admin.execute(
            "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description, "
            "ip_address, personal_salt, personal_digest) "
            "VALUES ($1, 'auth.login', 'auth', 'restored', '10.0.0.1', $2, $3)",
            tenant_a,
            salt,
            digest,
        )
    stored = await admin.fetchrow(
        "SELECT personal_salt, personal_digest FROM audit_logs WHERE tenant_id = $1", tenant_a
    )
    assert stored is not None
    assert (stored["personal_salt"], stored["personal_digest"]) == (salt, digest)
    chain = await chain_of(settings, admin, tenant_a)
    assert (chain.events, chain.broken) == (1, None)


async def test_a_chain_a_superuser_rewrote_whole_verifies_but_no_longer_holds_its_kept_heads(
    db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    """Edit an event and recompute every hash from there on: the chain holds again, but the
    heads an earlier verify printed at or past the edit are no longer in it; one before
    the edit still is."""
    settings = sfdb_direct_settings
    team = await team_of(admin, tenant_a)
    first = await log(db, tenant_a, "one")
    early = (await chain_of(settings, admin, tenant_a)).head
    ids = first + await log(db, tenant_a, "two", "three")
    late = (await chain_of(settings, admin, tenant_a)).head
    assert early is not None
    assert late is not None
    kept = [KeptHead(team, *early), KeptHead(team, *late)]
    printed = f"3 of 3 audit chains verify\nhead {team} {late[0]} {late[1].hex()}\n"
    assert parse_kept_heads(printed) == [KeptHead(team, *late)]
    assert (await verify_audit_chains(settings, slack_team_id=team, kept=kept)).ok

    async with past_the_triggers(admin):
        await admin.execute(EDIT_EVENT, tenant_a, ids[1])
        for place in (2, 3):  # the chain recomputed past the edit, as the trigger would
            rewritten = await admin.fetchval(
                "SELECT sha256(p.row_hash || sfdb_audit_content(a.id, a.tenant_id, "
                "c.chain_seq, a.event_type, a.event_category, a.status, a.resource_type, "
                "a.resource_id, a.created_at, a.personal_digest)) "
                "FROM audit_chain c JOIN audit_chain p ON p.tenant_id = c.tenant_id "
                "AND p.chain_seq = c.chain_seq - 1 JOIN audit_logs a "
                "ON a.tenant_id = c.tenant_id AND a.id = c.event_id "
                "WHERE c.tenant_id = $1 AND c.chain_seq = $2",
                tenant_a,
                place,
            )
            await admin.execute(
                "UPDATE audit_chain SET row_hash = $3 WHERE tenant_id = $1 AND chain_seq = $2",
                tenant_a,
                place,
                rewritten,
            )
    found = await verify_audit_chains(settings, slack_team_id=team, kept=kept)
    assert found.broken == []  # the rewrite holds together
    assert [head for head, _ in found.lost] == [KeptHead(team, *late)]
    assert "no longer has the hash kept for it" in found.lost[0][1]
    assert not found.ok


def test_kept_heads_are_read_from_verify_output_and_nothing_else() -> None:
    with pytest.raises(ValidationError, match="no 'head TEAM PLACE HASH' line"):
        parse_kept_heads("3 of 3 audit chains verify\n")
    cut = f"1 of 1 audit chains verify\nhead T0123ABCDE 12345 {'ab' * 20}\n{'ab' * 12}\n"
    with pytest.raises(ValidationError, match="line 2 is not"):  # a head cut in two
        parse_kept_heads(cut)


async def test_verify_computes_with_the_servers_built_ins_not_the_schemas_functions(
    db: Database,
    tenant_a: TenantId,
    admin: asyncpg.Connection,
    sfdb_direct_settings: DatabaseSettings,
) -> None:
    """The owner may replace the schema's canonical forms (it owns them): verify does not
    call them, so replacing them changes none of its verdicts."""
    ids = await log(db, tenant_a, "one", "two")
    names = ("sfdb_audit_content", "sfdb_audit_personal")
    originals = [
        await admin.fetchval("SELECT pg_get_functiondef(oid) FROM pg_proc WHERE proname = $1", name)
        for name in names
    ]
    try:
        for definition in originals:
            await admin.execute(  # the same signature, a body that answers nothing useful
                re.sub(r"RETURN .*", "RETURN NULL::bytea", definition, flags=re.DOTALL)
            )
        assert (await chain_of(sfdb_direct_settings, admin, tenant_a)).broken is None
        async with past_the_triggers(admin):
            await admin.execute(EDIT_EVENT, tenant_a, ids[1])
        broken = (await chain_of(sfdb_direct_settings, admin, tenant_a)).broken
        assert broken is not None
        assert (broken.chain_seq, broken.event_id) == (2, ids[1])
    finally:
        for definition in originals:
            await admin.execute(definition)
