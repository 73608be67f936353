"""The benchmark databases: created, migrated to head, loaded with COPY, vacuumed and analysed.

Every tenant has the same shape in both sizes (users, a default CRM
connection, account mappings, meetings spread over a year, audit events), so
a read returns the same rows whatever the number of tenants: only the size
of the table changes between the 10,000- and the 1,000,000-meeting
databases. Each tenant also has one Slack installation (a bot token),
saved through the layer's ``InstallationStore`` so that its ciphertexts are
the real thing. Every database holds the bench's tenant key
(:data:`bench.impls.base.TENANT_KEY`), installed right after it is migrated,
as ``sfdb migrate`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from slack_sdk.oauth.installation_store.models.installation import Installation

from bench import claims
from bench.impls.base import APP_ROLE, SLACK_CLIENT_ID, TENANT_KEY, TOKEN_KEYS, BenchTenant
from slack_fathom_db import Database, schema
from slack_fathom_db.maintenance import install_tenant_key
from slack_fathom_db.settings import DatabaseSettings
from slack_fathom_db.slack import InstallationStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import URL

LAYOUT_VERSION: Final = 2
"""2: the schema verifies signed tenant claims (migration 0008); a database kept by an
earlier version is loaded anew."""
SUMMARY_FILLER: Final = (
    "Discussed renewal terms, the integration timeline and next steps; the customer asked "
    "for a follow-up demo."
)
MEETING_COLUMNS: Final = (
    "tenant_id",
    "id",
    "user_id",
    "crm_connection_id",
    "fathom_recording_id",
    "title",
    "meeting_url",
    "started_at",
    "duration_seconds",
    "status",
    "summary",
    "processed_at",
    "crm_sync_status",
    "created_at",
    "updated_at",
    "deleted_at",
)
AUDIT_COLUMNS: Final = (
    "tenant_id",
    "id",
    "event_type",
    "event_category",
    "action_description",
    "user_id",
    "resource_type",
    "resource_id",
    "created_at",
)
CHUNK_TENANTS: Final = 50
INSTALL_CONCURRENCY: Final = 8


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """The size and shape of one benchmark database."""

    database: str
    tenants: int
    users_per_tenant: int = 10
    meetings_per_tenant: int = 1000
    audit_per_tenant: int = 100
    mappings_per_tenant: int = 20
    seed: int = 20261125

    @property
    def meetings(self) -> int:
        """Meetings in the whole table."""
        return self.tenants * self.meetings_per_tenant

    @property
    def signature(self) -> str:
        """Stored as the database comment, so ``--reuse`` can tell a matching load."""
        return (
            f"sfdb-bench v{LAYOUT_VERSION} schema={schema.head()} tenants={self.tenants} "
            f"users={self.users_per_tenant} meetings={self.meetings_per_tenant} "
            f"audit={self.audit_per_tenant} mappings={self.mappings_per_tenant} seed={self.seed}"
        )


@dataclass(frozen=True, slots=True)
class Dataset:
    """A loaded database: where it is and what is in it."""

    spec: DatasetSpec
    dsn: str
    tenants: tuple[BenchTenant, ...]
    rows: dict[str, int]
    load_seconds: float
    reused: bool


def database_url(server: URL, database: str) -> str:
    """A libpq-style ``postgresql://`` URL of ``database`` on ``server``."""
    return server.set(drivername="postgresql", database=database).render_as_string(
        hide_password=False
    )


async def _admin(server: URL) -> asyncpg.Connection:
    return await asyncpg.connect(database_url(server, server.database or "postgres"))


async def drop(server: URL, database: str) -> None:
    """Drop a benchmark database (connections to it are terminated)."""
    conn = await _admin(server)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()


async def prepare(
    server: URL, spec: DatasetSpec, *, reuse: bool, log: Callable[[str], None]
) -> Dataset:
    """Create, migrate and load ``spec`` (or reuse a matching earlier load)."""
    dsn = database_url(server, spec.database)
    started = time.perf_counter()
    # A kept database whose tenant policies a stopped run left trusting the claim
    # unverified (bench.claims) is loaded anew rather than measured so.
    reused = reuse and await _matches(server, spec) and await claims.verifies(dsn)
    if reused:
        log(f"  {spec.database}: reusing the earlier load ({spec.signature})")
    else:
        await create(server, spec)
        await _load(dsn, spec, log)
        conn = await _admin(server)
        try:
            comment = spec.signature.replace("'", "")
            await conn.execute(f"COMMENT ON DATABASE \"{spec.database}\" IS '{comment}'")
        finally:
            await conn.close()
    # Outside the load, so that a database kept by an earlier version of the bench gets them too.
    await install_slack(dsn, spec, log=log)
    return await _dataset(dsn, spec, started=started, reused=reused)


async def install_slack(dsn: str, spec: DatasetSpec, *, log: Callable[[str], None]) -> None:
    """Give every bench tenant that has none a Slack installation, through the layer's store.

    ``InstallationStore.async_save`` encrypts the tokens with the run's key and
    adds the installation (and its bot) to the tenant of the same team id; a
    tenant that already has one is skipped, so a reused database is left as
    it is. The new rows are analysed at once, so that no autovacuum of them
    runs during the measurements.
    """
    conn = await asyncpg.connect(dsn)
    try:
        missing = await conn.fetch(
            """
            SELECT t.slack_team_id, t.slack_team_name, min(u.slack_user_id) AS installer
            FROM tenants t JOIN users u ON u.tenant_id = t.id AND u.deleted_at IS NULL
            WHERE t.deleted_at IS NULL AND t.slack_team_id LIKE 'TB%'
              AND NOT EXISTS (
                SELECT 1 FROM slack_installations i
                WHERE i.tenant_id = t.id AND i.client_id = $1
              )
            GROUP BY t.slack_team_id, t.slack_team_name
            ORDER BY t.slack_team_id
            """,
            SLACK_CLIENT_ID,
        )
        if not missing:
            return
        t0 = time.perf_counter()
        settings = DatabaseSettings(
            url=dsn,
            app_role=APP_ROLE,
            pool_size=INSTALL_CONCURRENCY,
            max_overflow=0,
            token_keys=TOKEN_KEYS,
            tenant_key=TENANT_KEY,
            _env_file=None,
        )
        db = Database(settings)
        try:
            store = InstallationStore(db, client_id=SLACK_CLIENT_ID)
            pending = iter(missing)

            async def worker() -> None:
                # One shared iterator: each worker saves the next team until none is left.
                for team in pending:
                    await store.async_save(_installation(team))

            await asyncio.gather(*(worker() for _ in range(INSTALL_CONCURRENCY)))
        finally:
            await db.dispose()
        await conn.execute("VACUUM (ANALYZE) slack_installations, slack_bots")
        log(
            f"  {spec.database}: {len(missing):,} Slack installations saved through the store "
            f"in {time.perf_counter() - t0:.1f}s"
        )
    finally:
        await conn.close()


def _installation(team: asyncpg.Record) -> Installation:
    """A workspace install of the bench app: a bot token, no user token (made-up values)."""
    team_id = team["slack_team_id"]
    return Installation(
        app_id="A0BENCH",
        team_id=team_id,
        team_name=team["slack_team_name"],
        user_id=team["installer"],
        bot_id=f"B{team_id[1:]}",
        bot_user_id=f"U{team_id[1:]}BOT",
        bot_token=f"xoxb-bench-{team_id}",
        bot_scopes=["chat:write", "commands", "users:read"],
        token_type="bot",  # noqa: S106 - the kind of token, not a secret
    )


def bench_settings(dsn: str) -> DatabaseSettings:
    """The owner's side of a bench database at ``dsn`` (the bench's login, its tenant key)."""
    return DatabaseSettings(url=dsn, app_role=APP_ROLE, tenant_key=TENANT_KEY, _env_file=None)


async def create(server: URL, spec: DatasetSpec) -> str:
    """Create ``spec.database`` on ``server`` (dropping any earlier one), migrate it, install
    the bench's tenant key; its URL."""
    await drop(server, spec.database)
    conn = await _admin(server)
    try:
        await conn.execute(f'CREATE DATABASE "{spec.database}"')
    finally:
        await conn.close()
    dsn = database_url(server, spec.database)
    await schema.upgrade(bench_settings(dsn))
    await install_tenant_key(bench_settings(dsn))
    return dsn


async def load(dsn: str, spec: DatasetSpec, *, log: Callable[[str], None]) -> Dataset:
    """Load ``spec``'s rows into an existing, migrated database at ``dsn``.

    ``spec.database`` only names the database in the log. On Citus ``dsn`` is
    the coordinator: COPY into a distributed table goes through it, and
    :func:`settle` then has to be run on every worker as well.
    """
    started = time.perf_counter()
    await _load(dsn, spec, log)
    return await _dataset(dsn, spec, started=started, reused=False)


async def settle(dsn: str) -> None:
    """``VACUUM (ANALYZE)``, then ``CHECKPOINT`` if allowed, so no load's aftermath runs later."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM (ANALYZE)")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")  # so that no checkpoint of the load runs mid-benchmark
    finally:
        await conn.close()


async def _dataset(dsn: str, spec: DatasetSpec, *, started: float, reused: bool) -> Dataset:
    tenants, rows = await _read_back(dsn)
    return Dataset(
        spec=spec,
        dsn=dsn,
        tenants=tenants,
        rows=rows,
        load_seconds=time.perf_counter() - started,
        reused=reused,
    )


async def _matches(server: URL, spec: DatasetSpec) -> bool:
    conn = await _admin(server)
    try:
        comment = await conn.fetchval(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            spec.database,
        )
    finally:
        await conn.close()
    return bool(comment == spec.signature)


async def _load(dsn: str, spec: DatasetSpec, log: Callable[[str], None]) -> None:
    rnd = random.Random(spec.seed)  # noqa: S311 - reproducible test data, not secrets
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            # No foreign-key triggers during the load: the data is consistent by construction.
            await conn.execute("SET session_replication_role = replica")
        t0 = time.perf_counter()
        tenants = [_new_uuid(rnd) for _ in range(spec.tenants)]
        await conn.copy_records_to_table(
            "tenants",
            records=[(tid, f"TB{i:06d}", f"Bench team {i}") for i, tid in enumerate(tenants)],
            columns=["id", "slack_team_id", "slack_team_name"],
        )
        users = {tid: [_new_uuid(rnd) for _ in range(spec.users_per_tenant)] for tid in tenants}
        await conn.copy_records_to_table(
            "users",
            records=[
                (tid, uid, f"U{i:06d}{j:03d}", f"user{j}@team{i}.example.com", f"User {j}")
                for i, tid in enumerate(tenants)
                for j, uid in enumerate(users[tid])
            ],
            columns=["tenant_id", "id", "slack_user_id", "slack_email", "display_name"],
        )
        connections = {tid: _new_uuid(rnd) for tid in tenants}
        await conn.copy_records_to_table(
            "crm_connections",
            records=[
                (tid, cid, "hubspot", f"vault:crm/{cid}", True) for tid, cid in connections.items()
            ],
            columns=["tenant_id", "id", "provider_type", "credentials_secret_id", "is_default"],
        )
        await conn.copy_records_to_table(
            "account_mappings",
            records=[
                (tid, _new_uuid(rnd), cid, f"client{k}.example.com", f"acct-{k}", k % 2 == 0)
                for tid, cid in connections.items()
                for k in range(spec.mappings_per_tenant)
            ],
            columns=[
                "tenant_id",
                "id",
                "crm_connection_id",
                "email_domain",
                "crm_account_id",
                "verified",
            ],
        )
        for first in range(0, spec.tenants, CHUNK_TENANTS):
            chunk = range(first, min(first + CHUNK_TENANTS, spec.tenants))
            await conn.copy_records_to_table(
                "meeting_sessions",
                records=list(
                    _meetings(
                        rnd=rnd,
                        now=now,
                        spec=spec,
                        tenants=tenants,
                        users=users,
                        connections=connections,
                        chunk=chunk,
                    )
                ),
                columns=list(MEETING_COLUMNS),
            )
            # Audit events with their triggers, which commit them to their chains.
            replica = await conn.fetchval("SHOW session_replication_role")
            await conn.execute("SET session_replication_role = origin")
            await conn.copy_records_to_table(
                "audit_logs",
                records=list(
                    _audit(rnd=rnd, now=now, spec=spec, tenants=tenants, users=users, chunk=chunk)
                ),
                columns=list(AUDIT_COLUMNS),
            )
            await conn.execute(f"SET session_replication_role = {replica}")
        log(
            f"  {spec.database}: {spec.tenants:,} tenants, {spec.meetings:,} meetings "
            f"copied in {time.perf_counter() - t0:.1f}s"
        )
        await conn.execute("RESET session_replication_role")
    finally:
        await conn.close()
    t0 = time.perf_counter()
    await settle(dsn)
    log(f"  {spec.database}: VACUUM (ANALYZE) + CHECKPOINT in {time.perf_counter() - t0:.1f}s")


def _new_uuid(rnd: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rnd.getrandbits(128), version=4)


def _meetings(
    *,
    rnd: random.Random,
    now: datetime,
    spec: DatasetSpec,
    tenants: list[uuid.UUID],
    users: dict[uuid.UUID, list[uuid.UUID]],
    connections: dict[uuid.UUID, uuid.UUID],
    chunk: range,
) -> Iterator[tuple[Any, ...]]:
    year = 365 * 86400.0
    for i in chunk:
        tid = tenants[i]
        members = users[tid]
        for k in range(spec.meetings_per_tenant):
            created = now - timedelta(seconds=rnd.random() * year)
            roll = rnd.random()
            status = "pending" if roll < 0.02 else "failed" if roll < 0.03 else "completed"
            done = status == "completed"
            yield (
                tid,
                _new_uuid(rnd),
                members[rnd.randrange(len(members))],
                connections[tid],
                f"rec-{i}-{k}",
                f"Customer call {k}",
                f"https://fathom.video/calls/{i}-{k}",
                created - timedelta(minutes=45),
                rnd.randrange(600, 3600),
                status,
                f"Meeting {k}: {SUMMARY_FILLER}" if done else None,
                created if done else None,
                "synced" if done else "not_synced",
                created,
                created,
                created if rnd.random() < 0.01 else None,
            )


def _audit(
    *,
    rnd: random.Random,
    now: datetime,
    spec: DatasetSpec,
    tenants: list[uuid.UUID],
    users: dict[uuid.UUID, list[uuid.UUID]],
    chunk: range,
) -> Iterator[tuple[Any, ...]]:
    window = 60 * 86400.0
    for i in chunk:
        tid = tenants[i]
        members = users[tid]
        for _ in range(spec.audit_per_tenant):
            yield (
                tid,
                _new_uuid(rnd),
                "meeting.created",
                "data",
                "Meeting received from Fathom",
                members[rnd.randrange(len(members))],
                "meeting_session",
                str(_new_uuid(rnd)),
                now - timedelta(seconds=rnd.random() * window),
            )


async def _read_back(dsn: str) -> tuple[tuple[BenchTenant, ...], dict[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch(
            """
            SELECT t.id, t.slack_team_id,
                   array_agg(u.id ORDER BY u.slack_user_id) AS user_ids,
                   array_agg(u.slack_user_id ORDER BY u.slack_user_id) AS slack_user_ids
            FROM tenants t JOIN users u ON u.tenant_id = t.id AND u.deleted_at IS NULL
            WHERE t.deleted_at IS NULL AND t.slack_team_id LIKE 'TB%'
            GROUP BY t.id, t.slack_team_id
            ORDER BY t.slack_team_id
            """
        )
        rows = {
            table: int(
                await conn.fetchval(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass", table
                )
            )
            for table in ("tenants", "users", "meeting_sessions", "audit_logs", "account_mappings")
        }
    finally:
        await conn.close()
    tenants = tuple(
        BenchTenant(
            id=record["id"],
            slack_team_id=record["slack_team_id"],
            user_ids=tuple(record["user_ids"]),
            slack_user_ids=tuple(record["slack_user_ids"]),
        )
        for record in records
    )
    return tenants, rows
