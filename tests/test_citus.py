"""On a real Citus cluster: ``distribute`` refuses what it cannot do, and later migrations work.

These tests need the Citus pass (``make test-citus``); elsewhere they are deselected.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from slack_sdk.oauth.installation_store import Installation

from slack_fathom_db import Database, DatabaseSettings, TenantId, citus, schema
from slack_fathom_db.errors import ConfigurationError, Conflict, translate
from slack_fathom_db.logins import create_login
from slack_fathom_db.maintenance import install_tenant_key, purge_rate_limit_windows
from slack_fathom_db.slack import InstallationStore
from slack_fathom_db.testing import CitusCluster, citus_database
from tests.conftest import superuser_dsn
from tests.helpers import dsn, unique_team_id, unique_user_id
from tests.test_cli import owner_env, sfdb, url_of

pytestmark = pytest.mark.citus_only

OLD_REVISION = "0002"
"""A revision before leases, the purge policies and the Citus-ready rate-limit function."""


@pytest_asyncio.fixture
async def old_distributed(sfdb_citus: CitusCluster | None) -> AsyncIterator[DatabaseSettings]:
    """A database at an old revision, distributed, then migrated to head."""
    assert sfdb_citus is not None
    async with citus_database(sfdb_citus, revision=OLD_REVISION) as settings:
        yield settings


async def test_later_migrations_run_on_a_distributed_database(
    old_distributed: DatabaseSettings, sfdb_citus: CitusCluster | None
) -> None:
    assert sfdb_citus is not None
    settings = old_distributed  # before head, its URL is the migrating login's
    coordinator = sfdb_citus.coordinator.url
    assert await schema.current(settings) == OLD_REVISION
    # A meeting in flight before the upgrade: the new lease column is filled in for it.
    admin = await asyncpg.connect(superuser_dsn(coordinator, settings))
    try:
        tenant_id = await admin.fetchval(
            "INSERT INTO tenants (slack_team_id, slack_team_name) VALUES ($1, 'Old') RETURNING id",
            unique_team_id(),
        )
        user_id = await admin.fetchval(
            "INSERT INTO users (tenant_id, slack_user_id) VALUES ($1, $2) RETURNING id",
            tenant_id,
            unique_user_id(),
        )
        started = await admin.fetchval(
            "INSERT INTO meeting_sessions (tenant_id, user_id, fathom_recording_id, title, "
            "status, processing_attempts, processing_started_at) "
            "VALUES ($1, $2, 'rec-old', 'Call', 'processing', 1, now() - interval '2 hours') "
            "RETURNING processing_started_at",
            tenant_id,
            user_id,
        )
        await schema.upgrade(settings)
        await install_tenant_key(settings)  # as sfdb migrate does once the table exists
        lease = await admin.fetchval(
            "SELECT processing_lease_expires_at FROM meeting_sessions WHERE tenant_id = $1",
            tenant_id,
        )
    finally:
        await admin.close()
    assert await schema.current(settings) == schema.head()
    assert lease == started + timedelta(seconds=settings.claim_lease_seconds)
    # Tables the later revisions added are distributed by distributing again.
    done = await citus.distribute(settings)
    assert "slack_installations: distributed by tenant_id" in done
    assert "slack_bots: distributed by tenant_id" in done

    # The new column, index and policies reached every shard on the worker.
    on_worker = sfdb_citus.worker.url.set(database=settings.sqlalchemy_url().database)
    worker = await asyncpg.connect(on_worker.set(drivername="postgresql").render_as_string(False))
    try:
        await worker.execute("SET citus.override_table_visibility TO off")  # show the shards
        shards = await worker.fetchval(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'meeting_sessions_%' "
            "AND relkind = 'r'"
        )
        with_lease = await worker.fetchval(
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relname LIKE 'meeting_sessions_%' AND c.relkind = 'r' "
            "AND a.attname = 'processing_lease_expires_at'"
        )
        assert shards > 0
        assert with_lease == shards
        purge_policies = await worker.fetchval(
            "SELECT count(*) FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid "
            "WHERE c.relname LIKE 'api_rate_limits_%' AND p.polname = 'delete_ended_windows'"
        )
        assert purge_policies > 0
        # The worker checks tenant claims with its own copy of the key (owner's, no grants).
        keys = await worker.fetch(
            "SELECT key_id, pg_get_userbyid(c.relowner) AS owner, NOT EXISTS ("
            "SELECT FROM aclexplode(c.relacl) g WHERE g.grantee <> c.relowner) AS no_grants "
            "FROM tenant_claim_keys, pg_class c WHERE c.oid = 'tenant_claim_keys'::regclass"
        )
        assert [tuple(key) for key in keys] == [("test", settings.roles.owner, True)]
    finally:
        await worker.close()

    # And the layer works on it, end to end, through the new schema, as a runtime login
    # made by create-login (named so that the harness drops it with the database).
    runtime, password = f"{settings.sqlalchemy_url().database}_runtime", secrets.token_urlsafe(16)
    await create_login(settings, runtime, password)
    url = settings.sqlalchemy_url().set(username=runtime, password=password)
    as_runtime = settings.model_copy(
        update={"url": SecretStr(url.render_as_string(hide_password=False))}
    )
    async with Database(as_runtime) as db:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="C")
        async with db.unit_of_work(tenant) as uow:
            user = await uow.tenants.add_user(slack_user_id=unique_user_id())
            await uow.meetings.create(user_id=user.id, fathom_recording_id="rec-1", title="Call")
            await uow.commit()
            (claimed,) = await uow.meetings.claim_pending(limit=5)
            assert claimed.processing_lease_expires_at is not None
            assert (await uow.rate_limits.consume("citus", limit=2)).allowed
            await uow.commit()
        assert (await db.rate_limit(tenant, "citus", limit=2)).current == 2
        assert not (await db.rate_limit(tenant, "citus", limit=2)).allowed
        store = InstallationStore(db, client_id="1.2")
        team = unique_team_id()
        await store.async_save(
            Installation(
                team_id=team,
                user_id=unique_user_id(),
                bot_id="B1",
                bot_user_id="U1",
                bot_token="xoxb-citus",
            )
        )
        found = await store.async_find_installation(enterprise_id=None, team_id=team)
        assert found is not None
        assert found.bot_token == "xoxb-citus"
    assert await purge_rate_limit_windows(settings.for_migrations(), older_than_days=0) >= 0


async def test_distribute_twice_does_nothing_the_second_time(settings: DatabaseSettings) -> None:
    # The suite's database was distributed when it was made; distribute is the owner's work.
    assert await citus.distribute(settings.for_migrations()) == []


def test_sfdb_distribute_runs_as_the_migration_url(
    settings: DatabaseSettings, tmp_path: Path
) -> None:
    # As README configures it: the runtime login's DATABASE_URL, the owner's
    # DATABASE_MIGRATION_URL, which distribute runs with.
    done = sfdb("distribute", url=url_of(settings), cwd=tmp_path, extra_env=owner_env(settings))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("is distributed (nothing to do)")


async def test_distribute_refuses_without_citus_or_without_workers(
    sfdb_citus: CitusCluster | None,
) -> None:
    assert sfdb_citus is not None
    coordinator = sfdb_citus.coordinator.url
    name = f"sfdb_bare_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(coordinator.set(drivername="postgresql").render_as_string(False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        bare = DatabaseSettings(
            url=coordinator.set(database=name).render_as_string(False), _env_file=None
        )
        await schema.upgrade(bare)
        with pytest.raises(ConfigurationError, match="Citus is not installed in this database"):
            await citus.distribute(bare)
        inside = await asyncpg.connect(dsn(bare))
        try:
            await inside.execute("CREATE EXTENSION citus")
        finally:
            await inside.close()
        with pytest.raises(ConfigurationError, match="no worker node is registered"):
            await citus.distribute(bare)
        check = await asyncpg.connect(dsn(bare))
        try:
            assert await check.fetchval("SELECT count(*) FROM pg_dist_partition") == 0
        finally:
            await check.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        url = coordinator.set(database=name).render_as_string(False)
        roles = DatabaseSettings(url=url, _env_file=None).roles
        for role in (roles.app, roles.directory, roles.owner):  # made by the migrations
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_a_worker_refusing_the_app_role_is_a_configuration_error(
    settings: DatabaseSettings, admin: asyncpg.Connection, tenant_a: TenantId
) -> None:
    # What an operator sees when the app role may not log in on the workers.
    await admin.execute(f'ALTER ROLE "{settings.roles.app}" NOLOGIN')
    try:
        async with Database(settings) as db:
            with pytest.raises(ConfigurationError, match="must be able to log in on every node"):
                async with db.unit_of_work(tenant_a) as uow:
                    await uow.tenants.add_user(slack_user_id=unique_user_id())
    finally:
        await admin.execute(f'ALTER ROLE "{settings.roles.app}" LOGIN')


async def test_a_violated_constraint_is_named_as_on_one_server(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    # The coordinator passes on only the worker's message, naming the shard's constraint.
    user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=user)
        await uow.commit()
    async with admin.transaction():
        await admin.execute(f"SET LOCAL app.tenant_id = '{tenant_a}'")
        with pytest.raises(asyncpg.UniqueViolationError) as raw:
            await admin.execute(
                "INSERT INTO users (tenant_id, slack_user_id) VALUES ($1, $2)", tenant_a, user
            )
    assert raw.value.constraint_name is None  # what Citus leaves out
    error = translate(raw.value, action="add user")
    assert isinstance(error, Conflict)
    assert "(uq_users_tenant_id_slack_user_id_live)" in str(error)
