"""The audit log's monthly partitions and ``sfdb audit retain``.

Retention drops whole months for every workspace at once, so each test that
writes old months or retains has a database of its own (made and distributed
like the suite's, on Citus in the Citus pass). Events of past months are written
as the owner writes a restore (it keeps the creation time it gives); events of
this month as the app. Tampering is a superuser's, as in ``test_audit_chain``.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import asyncpg
import pytest
import pytest_asyncio

from slack_fathom_db import Database, DatabaseSettings, TenantId, citus, schema
from slack_fathom_db.audit_chain import (
    GENESIS,
    RETENTION_EVENT,
    KeptHead,
    start_record,
    verify_audit_chains,
)
from slack_fathom_db.audit_retention import ensure_audit_partitions, retain_audit_log
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.testing import citus_database, throwaway_database
from tests.conftest import superuser_connection
from tests.helpers import refused_to_every_runtime_role, unique_team_id
from tests.test_audit_chain import log, past_the_triggers
from tests.test_cli import owner_env, sfdb, url_of
from tests.test_migrations import BEFORE_PARTITIONS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from sqlalchemy.engine import URL

    from slack_fathom_db.testing import CitusCluster

SCHEMA = "audit_partitions"


def month_start(months_ago: int) -> date:
    """The first day of the month ``months_ago`` months before this one (UTC)."""
    today = datetime.now(UTC).date()
    index = today.year * 12 + today.month - 1 - months_ago
    return date(index // 12, index % 12 + 1, 1)


def partition_of(month: date) -> str:
    return f"audit_logs_y{month:%Y}m{month:%m}"


def in_month(months_ago: int, day: int = 10) -> datetime:
    start = month_start(months_ago)
    return datetime(start.year, start.month, day, 12, tzinfo=UTC)


@pytest_asyncio.fixture
async def fresh(
    sfdb_server: URL, sfdb_citus: CitusCluster | None
) -> AsyncIterator[DatabaseSettings]:
    """A database of this test alone, migrated (and distributed in the Citus pass)."""
    if sfdb_citus is not None:
        async with citus_database(sfdb_citus) as settings:
            yield settings
        return
    async with throwaway_database(sfdb_server) as settings:
        yield settings


@pytest_asyncio.fixture
async def fresh_admin(
    sfdb_server: URL, fresh: DatabaseSettings
) -> AsyncIterator[asyncpg.Connection]:
    async with superuser_connection(sfdb_server, fresh) as conn:
        yield conn


async def restore(
    admin: asyncpg.Connection, settings: DatabaseSettings, tenant: TenantId, when: datetime
) -> uuid.UUID:
    """An event of ``tenant`` written by the owner at ``when`` (as a restore writes it)."""
    async with admin.transaction():
        await admin.execute(f'SET LOCAL ROLE "{settings.roles.owner}"')
        event: uuid.UUID = await admin.fetchval(
            "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description, "
            "created_at) VALUES ($1, 'auth.login', 'auth', 'restored', $2) RETURNING id",
            tenant,
            when,
        )
    return event


async def places(admin: asyncpg.Connection, tenant: TenantId) -> dict[uuid.UUID, int]:
    rows = await admin.fetch(
        "SELECT event_id, chain_seq FROM audit_chain WHERE tenant_id = $1", tenant
    )
    return {row["event_id"]: row["chain_seq"] for row in rows}


async def hash_at(admin: asyncpg.Connection, tenant: TenantId, place: int) -> bytes:
    found = await admin.fetchval(
        "SELECT row_hash FROM audit_chain WHERE tenant_id = $1 AND chain_seq = $2", tenant, place
    )
    assert isinstance(found, bytes), (tenant, place)
    return found


async def partitions(admin: asyncpg.Connection) -> dict[str, str]:
    """The partitions of audit_logs: name -> schema."""
    rows = await admin.fetch(
        "SELECT c.relname, c.relnamespace::regnamespace::text AS schema FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'public.audit_logs'::regclass"
    )
    return {row["relname"]: row["schema"] for row in rows}


async def install(db: Database) -> TenantId:
    return await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="Old")


async def team_of(admin: asyncpg.Connection, tenant: TenantId) -> str:
    team = await admin.fetchval("SELECT slack_team_id FROM tenants WHERE id = $1", tenant)
    assert isinstance(team, str)
    return team


# -- partitions ---------------------------------------------------------------------------


async def test_this_month_and_three_ahead_have_partitions_the_owners_alone(
    admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    owner = sfdb_direct_settings.roles.owner
    found = await partitions(admin)
    expected = {partition_of(month_start(-n)) for n in range(4)} | {"audit_logs_default"}
    assert set(found) >= expected
    assert set(found.values()) == {SCHEMA}
    rows = await admin.fetch(
        "SELECT c.relname, pg_get_userbyid(c.relowner) AS owner, c.relacl, "
        "EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid "
        "AND t.tgname = 'audit_logs_no_truncate') AS no_truncate "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'public.audit_logs'::regclass"
    )
    for row in rows:
        assert row["owner"] == owner, row["relname"]
        assert row["relacl"] is None, row["relname"]  # no grant to anyone
        assert row["no_truncate"], row["relname"]
    schema_acl = await admin.fetchval(
        "SELECT array_agg(DISTINCT pg_get_userbyid(x.grantee)::text) FROM pg_namespace n "
        "CROSS JOIN LATERAL aclexplode(n.nspacl) x WHERE n.nspname = $1",
        SCHEMA,
    )
    assert schema_acl == [owner]
    assert (
        await admin.fetchval(
            "SELECT partstrat FROM pg_partitioned_table "
            "WHERE partrelid = 'public.audit_logs'::regclass"
        )
        == b"r"
    )


async def test_no_runtime_role_reaches_a_partition_or_the_owners_functions(
    tenant_a: TenantId, admin: asyncpg.Connection, sfdb_direct_settings: DatabaseSettings
) -> None:
    settings = sfdb_direct_settings
    partition = f"{SCHEMA}.{partition_of(month_start(0))}"
    attempts = [
        f"SELECT count(*) FROM {partition}",
        f"SELECT count(*) FROM {SCHEMA}.audit_logs_default",
        f"INSERT INTO {partition} (tenant_id, event_type, event_category, action_description, "
        f"personal_digest) VALUES ('{tenant_a}', 'auth.login', 'auth', 'x', '\\x00')",
        f"DELETE FROM {partition}",
        f"TRUNCATE {partition}",
        "SELECT public.sfdb_audit_partitions_ensure(3)",
        "SELECT public.sfdb_audit_partition_make(current_date)",
    ]
    await refused_to_every_runtime_role(admin, settings, tenant_a, attempts)
    # And logged in as the runtime login itself, with its own privileges.
    login = await asyncpg.connect(
        settings.sqlalchemy_url().set(drivername="postgresql").render_as_string(False)
    )
    try:
        for sql in attempts[:2]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await login.execute(sql)
    finally:
        await login.close()
    # A superuser's TRUNCATE of one partition is refused by the partition's own trigger.
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        async with admin.transaction():
            await admin.execute(f"TRUNCATE {partition}")


async def test_an_event_of_a_month_without_partition_waits_in_the_default_one_then_moves(
    fresh: DatabaseSettings, fresh_admin: asyncpg.Connection
) -> None:
    admin = fresh_admin
    far = datetime(month_start(-30).year, month_start(-30).month, 28, 23, 59, 59, tzinfo=UTC)
    async with Database(fresh) as db:
        tenant = await install(db)
        await log(db, tenant, "now")
        late = await restore(admin, fresh, tenant, far)
        await log(db, tenant, "after")
    before = await admin.fetchrow(
        f"SELECT id, created_at, personal_digest, personal_salt FROM {SCHEMA}.audit_logs_default"
    )
    assert before is not None
    assert before["id"] == late
    chained = await places(admin, tenant)
    assert (await verify_audit_chains(fresh)).ok

    made = await ensure_audit_partitions(fresh)
    assert made == [partition_of(month_start(-30))]
    assert await ensure_audit_partitions(fresh) == []  # idempotent
    assert await admin.fetchval(f"SELECT count(*) FROM {SCHEMA}.audit_logs_default") == 0
    after = await admin.fetchrow(
        f"SELECT id, created_at, personal_digest, personal_salt FROM {SCHEMA}.{made[0]}"
    )
    assert after == before
    assert await places(admin, tenant) == chained  # no new place, none lost
    found = await verify_audit_chains(fresh)
    assert found.ok
    assert [chain.events for chain in found.chains] == [3]
    # The moved partition is like the others: append-only, even its TRUNCATE.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await admin.execute(f"TRUNCATE {SCHEMA}.{made[0]}")


# -- retention ----------------------------------------------------------------------------


async def test_retain_drops_exactly_the_old_months_records_it_and_the_chains_still_verify(
    fresh: DatabaseSettings, fresh_admin: asyncpg.Connection
) -> None:
    admin = fresh_admin
    async with Database(fresh) as db:
        a, b, untouched = await install(db), await install(db), await install(db)
        old_a = [await restore(admin, fresh, a, in_month(m, d)) for m in (5, 4) for d in (3, 4)]
        old_b = [await restore(admin, fresh, b, in_month(5))]
        kept_a = [await restore(admin, fresh, a, in_month(2, d)) for d in (3, 4)]
        kept_b = [await restore(admin, fresh, b, in_month(1))]
        kept_a += await log(db, a, "this month")
        kept_u = await log(db, untouched, "this month")
    assert (await verify_audit_chains(fresh)).ok
    team_a = await team_of(admin, a)
    kept_heads = [
        KeptHead(team_a, 2, await hash_at(admin, a, 2)),  # before the new start: retired
        KeptHead(team_a, 4, await hash_at(admin, a, 4)),  # just before it: the start's hash
        KeptHead(team_a, 6, await hash_at(admin, a, 6)),  # after it: checked as ever
    ]
    events = await admin.fetchval("SELECT count(*) FROM audit_logs")

    done = await retain_audit_log(fresh, months=2)
    assert [(p.partition, p.events, p.workspaces) for p in done.dropped] == [
        (partition_of(month_start(5)), 3, 2),
        (partition_of(month_start(4)), 2, 1),
    ]
    assert done.events == 5
    assert {s.tenant_id: (s.chain_seq, s.dropped_places) for s in done.starts} == {
        a: (5, ()),
        b: (2, ()),
    }
    found = await partitions(admin)
    assert partition_of(month_start(5)) not in found
    assert partition_of(month_start(4)) not in found
    assert {partition_of(month_start(m)) for m in (2, 1, 0)} <= set(found)
    # Exactly the old months' events are gone; every other event is as it was.
    left = {row["id"] for row in await admin.fetch("SELECT id FROM audit_logs")}
    assert left.isdisjoint(old_a + old_b)
    assert set(kept_a + kept_b + kept_u) <= left
    assert await admin.fetchval("SELECT count(*) FROM audit_logs") == events - 5 + 2  # records
    recorded = await admin.fetch(
        "SELECT partition, month, events, workspaces, months_kept FROM audit_retention "
        "ORDER BY month"
    )
    assert [tuple(row.values()) for row in recorded] == [
        (partition_of(month_start(5)), month_start(5), 3, 2, 2),
        (partition_of(month_start(4)), month_start(4), 2, 1, 2),
    ]
    # Each chain starts after its dropped places, from the hash of the place before.
    for tenant, start, previous in ((a, 5, kept_heads[1].row_hash), (b, 2, None)):
        row = await admin.fetchrow(
            "SELECT chain_seq, previous_hash, dropped_places FROM audit_chain_starts "
            "WHERE tenant_id = $1",
            tenant,
        )
        assert row is not None
        assert row["chain_seq"] == start
        if previous is not None:
            assert row["previous_hash"] == previous
        assert min((await places(admin, tenant)).values()) == start
        record = await admin.fetchval(
            "SELECT a.resource_id FROM audit_logs a JOIN audit_chain c "
            "ON c.tenant_id = a.tenant_id AND c.event_id = a.id "
            "WHERE a.tenant_id = $1 AND a.event_type = $2",
            tenant,
            RETENTION_EVENT,
        )
        assert record == start_record(start, row["previous_hash"])
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM audit_chain_starts WHERE tenant_id = $1", untouched
        )
        == 0
    )

    verified = await verify_audit_chains(fresh, kept=kept_heads)
    assert verified.ok, (verified.broken, verified.lost)
    assert {chain.tenant_id: chain.events for chain in verified.chains} == {
        a: 4,  # two of month -2, this month's, the retention record
        b: 2,
        untouched: 1,
    }
    assert [head for head, _ in verified.retired] == [kept_heads[0]]
    # A kept head just before the start that the start does not record is lost.
    forged = KeptHead(team_a, 4, hashlib.sha256(b"forged").digest())
    assert [head for head, _ in (await verify_audit_chains(fresh, kept=[forged])).lost] == [forged]

    again = await retain_audit_log(fresh, months=2)  # idempotent
    assert (again.dropped, again.starts) == ([], [])
    assert await admin.fetchval("SELECT count(*) FROM audit_retention") == 2
    async with Database(fresh) as db:
        await log(db, a, "later")
    assert (await verify_audit_chains(fresh)).ok


async def test_an_old_event_that_took_its_place_after_a_newer_one_keeps_the_chain_verifiable(
    fresh: DatabaseSettings, fresh_admin: asyncpg.Connection, sfdb_server: URL
) -> None:
    """An event of the last dropped month whose transaction committed after an event of
    the next month: the chain starts at the kept event's place, and the dropped event's
    place after it keeps its hash, so what follows it still verifies."""
    admin = fresh_admin
    async with Database(fresh) as db:
        tenant = await install(db)
    first = await restore(admin, fresh, tenant, in_month(4))
    owner = fresh.roles.owner
    insert = (
        "INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description, "
        "created_at) VALUES ($1, 'auth.login', 'auth', $2, $3) RETURNING id"
    )
    async with superuser_connection(sfdb_server, fresh) as other:
        late = admin.transaction()
        await late.start()
        await admin.execute(f'SET LOCAL ROLE "{owner}"')
        straggler = await admin.fetchval(insert, tenant, "end of month", in_month(3, 28))
        async with other.transaction():
            await other.execute(f'SET LOCAL ROLE "{owner}"')
            newer = await other.fetchval(insert, tenant, "next month", in_month(2, 1))
        await late.commit()
    async with Database(fresh) as db:
        after = await log(db, tenant, "this month")
    chained = await places(admin, tenant)
    assert [chained[e] for e in (first, newer, straggler, after[0])] == [1, 2, 3, 4]

    done = await retain_audit_log(fresh, months=2)
    assert [p.partition for p in done.dropped] == [
        partition_of(month_start(4)),
        partition_of(month_start(3)),
    ]
    assert [(s.chain_seq, s.dropped_places) for s in done.starts] == [(2, (3,))]
    assert sorted((await places(admin, tenant)).values()) == [2, 3, 4, 5]
    found = await verify_audit_chains(fresh)
    assert found.ok, found.broken
    assert [chain.events for chain in found.chains] == [4]

    # The dropped place's kept hash is what the next place follows from.
    async with past_the_triggers(admin):
        await admin.execute(
            "UPDATE audit_chain SET row_hash = sha256(row_hash) "
            "WHERE tenant_id = $1 AND chain_seq = 3",
            tenant,
        )
    broken = (await verify_audit_chains(fresh)).broken
    assert [(c.broken.chain_seq if c.broken else None) for c in broken] == [4]


START_TAMPERING = {
    # what a superuser does to a chain retention moved (its start at place 3, events of
    # this month at 3 and 4, the retention record at 5): (SQL, the place verify names,
    # its problem)
    "change the start's hash": (
        "UPDATE audit_chain_starts SET previous_hash = sha256(previous_hash) WHERE tenant_id = $1",
        3,
        "its event is not the one chained there: edited, or the chain rewritten",
    ),
    "delete the start": (
        "DELETE FROM audit_chain_starts WHERE tenant_id = $1",
        3,
        "places 1 to 2 are missing before it",
    ),
    "move the start past the first kept event": (
        "WITH gone AS (DELETE FROM audit_chain WHERE tenant_id = $1 AND chain_seq = 3 "
        "RETURNING row_hash, event_id), "
        "events AS (DELETE FROM audit_logs WHERE tenant_id = $1 "
        "AND id IN (SELECT event_id FROM gone)) "
        "UPDATE audit_chain_starts SET chain_seq = 4, previous_hash = (SELECT row_hash FROM gone) "
        "WHERE tenant_id = $1",
        4,
        "the chain's start is not the one its newest retention event records",
    ),
    "call a deleted event dropped": (
        "WITH gone AS (DELETE FROM audit_logs WHERE tenant_id = $1 AND id = "
        "(SELECT event_id FROM audit_chain WHERE tenant_id = $1 AND chain_seq = 4)) "
        "UPDATE audit_chain_starts SET dropped_places = '{4}' WHERE tenant_id = $1",
        3,
        "the chain's start is not the one its newest retention event records",
    ),
    "delete the retention record": (
        "WITH gone AS (DELETE FROM audit_chain WHERE tenant_id = $1 AND chain_seq = 5 "
        "RETURNING event_id), head AS (UPDATE audit_chain_heads SET chain_seq = 4 "
        "WHERE tenant_id = $1) "
        "DELETE FROM audit_logs WHERE tenant_id = $1 AND id IN (SELECT event_id FROM gone)",
        3,
        "the chain starts at place 3, but no retention event in it says so",
    ),
}


async def test_verify_finds_a_tampered_start_where_it_can(
    fresh: DatabaseSettings, fresh_admin: asyncpg.Connection
) -> None:
    """One workspace per tampering and one left alone, all retained together; each
    tampering is named, the others' chains still verify."""
    admin = fresh_admin
    async with Database(fresh) as db:
        tenants = {name: await install(db) for name in [*START_TAMPERING, "untouched"]}
        for tenant in tenants.values():
            for day in (3, 4):
                await restore(admin, fresh, tenant, in_month(4, day))
            await log(db, tenant, "one", "two")
    done = await retain_audit_log(fresh, months=2)
    assert {s.chain_seq for s in done.starts} == {3}
    assert (await verify_audit_chains(fresh)).ok
    for name, (sql, _, _) in START_TAMPERING.items():
        async with past_the_triggers(admin):
            await admin.execute(sql, tenants[name])
    found = {chain.tenant_id: chain.broken for chain in (await verify_audit_chains(fresh)).chains}
    for name, (_, place, problem) in START_TAMPERING.items():
        broken = found[tenants[name]]
        assert broken is not None, name
        assert (broken.chain_seq, broken.problem) == (place, problem), name
    assert found[tenants["untouched"]] is None


@pytest.mark.citus_only
async def test_the_partitions_revision_runs_on_a_database_distributed_before_it(
    sfdb_citus: CitusCluster | None,
) -> None:
    """Distributed at the revision before: the partitioned table is distributed by the
    migration with its partitions, takes every event, and verifies; sfdb distribute then
    distributes the new chain table; partitions made later are distributed too."""
    assert sfdb_citus is not None
    async with (
        citus_database(sfdb_citus, revision=BEFORE_PARTITIONS) as settings,
        superuser_connection(sfdb_citus.coordinator.url, settings) as admin,
    ):
        tenant = await admin.fetchval(
            "INSERT INTO tenants (slack_team_id, slack_team_name) VALUES ($1, 'Old') RETURNING id",
            unique_team_id(),
        )
        for when in (in_month(7), in_month(0, 1)):
            await admin.execute(
                "INSERT INTO audit_logs (tenant_id, event_type, event_category, "
                "action_description, created_at) VALUES ($1, 'auth.login', 'auth', 'old', $2)",
                tenant,
                when,
            )
        before = await admin.fetch("SELECT * FROM audit_logs ORDER BY id")
        await schema.upgrade(settings)
        done = await citus.distribute(settings)
        assert "audit_chain_starts: distributed by tenant_id" in done
        assert await admin.fetch("SELECT * FROM audit_logs ORDER BY id") == before
        distributed = {
            row["name"]
            for row in await admin.fetch(
                "SELECT logicalrelid::regclass::text AS name FROM pg_dist_partition"
            )
        }
        assert {
            "audit_logs",
            f"{SCHEMA}.audit_logs_default",
            f"{SCHEMA}.{partition_of(month_start(7))}",
            f"{SCHEMA}.{partition_of(month_start(0))}",
        } <= distributed
        assert (await verify_audit_chains(settings)).ok
        retained = await retain_audit_log(settings, months=3, months_ahead=5)
        assert partition_of(month_start(-5)) in retained.made
        assert [p.events for p in retained.dropped] == [1]
        assert (await verify_audit_chains(settings)).ok
        assert await admin.fetchval(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = $1::regclass",
            f"{SCHEMA}.{partition_of(month_start(-5))}",
        )


async def test_retain_refuses_fewer_than_one_month(sfdb_direct_settings: DatabaseSettings) -> None:
    for months in (0, -1):
        with pytest.raises(ValidationError, match="months"):
            await retain_audit_log(sfdb_direct_settings, months=months)


async def test_sfdb_audit_retain(
    fresh: DatabaseSettings, fresh_admin: asyncpg.Connection, tmp_path: Path
) -> None:
    env = owner_env(fresh)
    url = url_of(fresh)
    async with Database(fresh) as db:
        tenant = await install(db)
        await restore(fresh_admin, fresh, tenant, in_month(6))
        await log(db, tenant, "now")
    for args in (
        ("audit", "retain"),
        ("audit", "retain", "--months", "0"),
        ("audit", "retain", "--months", "2", "T0123ABC"),
        ("audit", "retain", "--months", "2", "--days", "3"),
        ("audit", "verify", "--months", "2"),
    ):
        refused = sfdb(*args, url=url, cwd=tmp_path, extra_env=env)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert "Traceback" not in refused.stderr
    retained = sfdb("audit", "retain", "--months", "3", url=url, cwd=tmp_path, extra_env=env)
    assert retained.returncode == 0, retained.stderr
    name = partition_of(month_start(6))
    assert f"dropped partition {name} ({month_start(6):%Y-%m}: 1 events of 1 workspaces)" in (
        retained.stdout
    )
    assert f"chain of {tenant} now starts at place 2" in retained.stdout
    again = sfdb("audit", "retain", "--months", "3", url=url, cwd=tmp_path, extra_env=env)
    assert again.returncode == 0, again.stderr
    assert "0 monthly partitions (0 events) dropped" in again.stdout
    verified = sfdb("audit", "verify", url=url, cwd=tmp_path, extra_env=env)
    assert verified.returncode == 0, verified.stdout
    kept = tmp_path / "heads.txt"
    team = await team_of(fresh_admin, tenant)
    kept.write_text(f"head {team} 1 {GENESIS.hex()}\n")
    retired = sfdb("audit", "verify", "--kept", str(kept), url=url, cwd=tmp_path, extra_env=env)
    assert retired.returncode == 1, retired.stdout  # place 1, just before the start: lost
    assert "LOST" in retired.stdout
