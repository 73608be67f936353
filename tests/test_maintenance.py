"""Purging rate-limit windows that ended long ago, as the owner, with row-level security on.

The purge is the owner's work: it runs with the credentials of
``DATABASE_MIGRATION_URL`` (README), here the test database's migrating login, a
member of the owner role and no superuser; the layer runs as the runtime login.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.maintenance import purge_rate_limit_windows
from slack_fathom_db.repositories.rate_limits import window
from slack_fathom_db.testing import throwaway_database
from tests.conftest import superuser_dsn
from tests.helpers import dsn, unique_team_id
from tests.test_cli import owner_env, sfdb, url_of

NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
THIS_MONTH = TODAY.replace(day=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def months_before(start: datetime, months: int) -> datetime:
    year, month = divmod(start.year * 12 + start.month - 1 - months, 12)
    return start.replace(year=year, month=month + 1)


# (period, window_start, ended more than 7 days ago)
WINDOWS = [
    ("minute", (NOW - timedelta(days=10)).replace(second=0, microsecond=0), True),
    ("hourly", (NOW - timedelta(days=8)).replace(minute=0, second=0, microsecond=0), True),
    ("daily", TODAY - timedelta(days=9), True),  # ended 8 days ago
    ("daily", TODAY - timedelta(days=6), False),  # ended 5 days ago
    ("daily", TODAY, False),  # the current window
    ("monthly", months_before(THIS_MONTH, 3), True),
    ("monthly", THIS_MONTH, False),
    ("bucket", EPOCH, False),  # token buckets have no window: never purged
]


async def seed(admin: asyncpg.Connection, tenant: TenantId, resource: str) -> None:
    await admin.executemany(
        "INSERT INTO api_rate_limits (tenant_id, resource_type, period, window_start, "
        "request_count, tokens, updated_at) VALUES ($1, $2, $3, $4, 1, $5, $6)",
        [
            (tenant, resource, period, start, 1.0 if period == "bucket" else None, start)
            for period, start, _ in WINDOWS
        ],
    )


async def left(
    admin: asyncpg.Connection, tenant: TenantId, resource: str
) -> set[tuple[str, datetime]]:
    rows = await admin.fetch(
        "SELECT period, window_start FROM api_rate_limits WHERE tenant_id = $1 "
        "AND resource_type = $2",
        tenant,
        resource,
    )
    return {(row["period"], row["window_start"]) for row in rows}


def kept_after(days_ago: int) -> set[tuple[str, datetime]]:
    cutoff = NOW - timedelta(days=days_ago)
    return {
        (period, start)
        for period, start, _ in WINDOWS
        if period == "bucket" or window(period, start)[1] >= cutoff
    }


def owner_side(settings: DatabaseSettings) -> DatabaseSettings:
    """``settings`` with the migrating login's URL, as the purge's docstring asks."""
    return settings.for_migrations()


async def test_purge_deletes_windows_that_ended_long_ago_of_every_tenant(
    settings: DatabaseSettings,
    tenant_a: TenantId,
    tenant_b: TenantId,
    admin: asyncpg.Connection,
) -> None:
    resource = f"purge-{secrets.token_hex(4)}"
    await seed(admin, tenant_a, resource)
    await seed(admin, tenant_b, resource)
    expected = {(period, start) for period, start, old in WINDOWS if not old}
    assert kept_after(7) == expected

    deleted = await purge_rate_limit_windows(owner_side(settings), older_than_days=7, batch_size=2)

    assert deleted == 2 * sum(old for _, _, old in WINDOWS)
    assert await left(admin, tenant_a, resource) == expected
    assert await left(admin, tenant_b, resource) == expected
    # Idempotent: a second run finds nothing more.
    assert await purge_rate_limit_windows(owner_side(settings), older_than_days=7) == 0


async def test_purge_with_the_applications_settings_runs_as_the_migration_url(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    # README: "DATABASE_MIGRATION_URL ... migrations, create-login, distribute and the purge
    # run with it", and a scheduler calls purge_rate_limit_windows(settings, ...) with the
    # application's settings, whose DATABASE_URL is the runtime login (it may delete nothing).
    assert settings.migration_url is not None
    resource = f"purge-{secrets.token_hex(4)}"
    await seed(admin, tenant_a, resource)
    await purge_rate_limit_windows(settings, older_than_days=7)
    assert await left(admin, tenant_a, resource) == kept_after(7)


async def test_purge_with_zero_days_keeps_current_windows_and_buckets(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    resource = f"purge-{secrets.token_hex(4)}"
    await seed(admin, tenant_a, resource)
    await purge_rate_limit_windows(owner_side(settings), older_than_days=0)
    assert await left(admin, tenant_a, resource) == kept_after(0)
    assert ("daily", TODAY) in kept_after(0)
    assert ("bucket", EPOCH) in kept_after(0)


async def test_counters_in_use_survive_a_purge(
    db: Database, settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    resource = f"purge-{secrets.token_hex(4)}"
    assert (await db.rate_limit(tenant_a, resource, limit=3)).allowed
    await purge_rate_limit_windows(owner_side(settings), older_than_days=0)
    assert (await db.rate_limit(tenant_a, resource, limit=3)).current == 2


@pytest.mark.parametrize(("days", "batch"), [(-1, 10), (7, 0), (True, 10), (7, 10**9), ("7", 10)])
async def test_purge_arguments_are_checked(
    settings: DatabaseSettings, days: object, batch: object
) -> None:
    with pytest.raises(ValidationError):
        await purge_rate_limit_windows(owner_side(settings), older_than_days=days, batch_size=batch)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def own_database(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """A database of this test alone, so the windows it counts are all its own.

    Migrated, as the suite's own, by a login that owns it and is no superuser (as on a
    managed service): a superuser bypasses row-level security, so only such a login
    shows what the policies let the owner do.
    """
    async with throwaway_database(sfdb_server) as settings:
        yield settings


async def test_the_owner_purges_every_tenant_and_the_runtime_roles_see_nothing_of_it(
    own_database: DatabaseSettings, sfdb_server: URL
) -> None:
    settings = own_database
    roles = settings.roles
    async with Database(settings) as db:
        tenants = [
            await db.directory.install(slack_team_id=unique_team_id(), slack_team_name=n)
            for n in ("A", "B")
        ]
    resource = "purged"
    superuser = await asyncpg.connect(superuser_dsn(sfdb_server, settings))
    try:
        for tenant in tenants:
            await seed(superuser, tenant, resource)
        migrating = await asyncpg.connect(dsn(settings.for_migrations().sqlalchemy_url()))
        try:
            assert not await migrating.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            # As the migrating login and as the owner role it may become: without a tenant,
            # only windows that ended are visible, never a live one.
            for role in (None, roles.owner):
                async with migrating.transaction():
                    if role is not None:
                        await migrating.execute(f'SET LOCAL ROLE "{role}"')
                    visible = await migrating.fetchval("SELECT count(*) FROM api_rate_limits")
                    assert visible == 2 * (len(WINDOWS) - len(kept_after(0))), role
                    # And changes none: the policies are for reading and deleting ended windows.
                    changed = await migrating.execute(
                        "UPDATE api_rate_limits SET request_count = 0 WHERE resource_type = $1",
                        resource,
                    )
                    assert changed == "UPDATE 0", role
        finally:
            await migrating.close()

        deleted = await purge_rate_limit_windows(owner_side(settings), older_than_days=7)

        assert deleted == 2 * sum(old for _, _, old in WINDOWS)
        for tenant in tenants:
            assert await left(superuser, tenant, resource) == kept_after(7)
        # The app role, with tenant A set, sees A's rows only: the owner's policies give
        # it nothing of B's, not even B's ended windows; and it may delete nothing.
        async with superuser.transaction():
            await superuser.execute(f'SET LOCAL ROLE "{roles.app}"')
            await superuser.execute(f"SET LOCAL app.tenant_id = '{tenants[0]}'")
            seen = await superuser.fetch("SELECT DISTINCT tenant_id FROM api_rate_limits")
            assert [row["tenant_id"] for row in seen] == [tenants[0]]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await superuser.execute("DELETE FROM api_rate_limits")
        # The directory role charges rate limits through the owner's function only.
        for statement in ("SELECT count(*) FROM api_rate_limits", "DELETE FROM api_rate_limits"):
            async with superuser.transaction():
                await superuser.execute(f'SET LOCAL ROLE "{roles.directory}"')
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await superuser.execute(statement)
    finally:
        await superuser.close()


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Pacific/Chatham"])
async def test_window_end_is_computed_in_utc_in_any_session_time_zone(
    zone: str, admin: asyncpg.Connection
) -> None:
    starts = [
        ("minute", datetime(2026, 3, 8, 6, 59, tzinfo=UTC)),
        ("hourly", datetime(2026, 11, 1, 5, tzinfo=UTC)),
        ("daily", datetime(2026, 3, 8, tzinfo=UTC)),  # a DST change in New York
        ("monthly", datetime(2026, 1, 1, tzinfo=UTC)),
        ("monthly", datetime(2026, 12, 1, tzinfo=UTC)),
    ]
    async with admin.transaction():
        await admin.execute(f"SET LOCAL TimeZone = '{zone}'")
        for period, start in starts:
            end = await admin.fetchval("SELECT sfdb_window_end($1, $2)", period, start)
            assert end == window(period, start)[1], (period, start, zone)
        assert await admin.fetchval("SELECT sfdb_window_end('bucket', now())") is None


def test_sfdb_purge_rate_limits(settings: DatabaseSettings, tmp_path: Path) -> None:
    # As README configures it: the runtime login's DATABASE_URL, the owner's
    # DATABASE_MIGRATION_URL, which the purge runs with.
    env = owner_env(settings)
    done = sfdb(
        "purge-rate-limits",
        "--older-than-days",
        "30",
        url=url_of(settings),
        cwd=tmp_path,
        extra_env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "ended more than 30 days ago" in done.stdout
    refused = sfdb(
        "purge-rate-limits",
        "--older-than-days",
        "-3",
        url=url_of(settings),
        cwd=tmp_path,
        extra_env=env,
    )
    assert refused.returncode == 2
    assert "must be 0 or more" in refused.stderr
