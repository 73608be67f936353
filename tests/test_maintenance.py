"""Purging rate-limit windows that ended long ago, as the owner, with row-level security on."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId, schema
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.maintenance import purge_rate_limit_windows
from slack_fathom_db.repositories.rate_limits import window
from tests.conftest import unique_team_id
from tests.test_cli import sfdb, url_of

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

    deleted = await purge_rate_limit_windows(settings, older_than_days=7, batch_size=2)

    assert deleted == 2 * sum(old for _, _, old in WINDOWS)
    assert await left(admin, tenant_a, resource) == expected
    assert await left(admin, tenant_b, resource) == expected
    # Idempotent: a second run finds nothing more.
    assert await purge_rate_limit_windows(settings, older_than_days=7) == 0


async def test_purge_with_zero_days_keeps_current_windows_and_buckets(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    resource = f"purge-{secrets.token_hex(4)}"
    await seed(admin, tenant_a, resource)
    await purge_rate_limit_windows(settings, older_than_days=0)
    assert await left(admin, tenant_a, resource) == kept_after(0)
    assert ("daily", TODAY) in kept_after(0)
    assert ("bucket", EPOCH) in kept_after(0)


async def test_counters_in_use_survive_a_purge(
    db: Database, settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    resource = f"purge-{secrets.token_hex(4)}"
    assert (await db.rate_limit(tenant_a, resource, limit=3)).allowed
    await purge_rate_limit_windows(settings, older_than_days=0)
    assert (await db.rate_limit(tenant_a, resource, limit=3)).current == 2


@pytest.mark.parametrize(("days", "batch"), [(-1, 10), (7, 0), (True, 10), (7, 10**9), ("7", 10)])
async def test_purge_arguments_are_checked(
    settings: DatabaseSettings, days: object, batch: object
) -> None:
    with pytest.raises(ValidationError):
        await purge_rate_limit_windows(settings, older_than_days=days, batch_size=batch)  # type: ignore[arg-type]


@pytest_asyncio.fixture
async def owned(sfdb_server: URL) -> AsyncIterator[DatabaseSettings]:
    """A fresh database migrated by a non-superuser owner, as on a managed service.

    The suite's own database is migrated by a superuser, which bypasses row-level
    security: only a real owner shows what the policies let the owner do.
    """
    tag = secrets.token_hex(4)
    owner, app_role, name = f"sfdb_owner_{tag}", f"sfdb_app_{tag}", f"sfdb_owned_{tag}"
    server = await asyncpg.connect(dsn(sfdb_server))
    try:
        await server.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE")
        await server.execute(f"CREATE DATABASE {name} OWNER {owner}")
        settings = DatabaseSettings(
            url=sfdb_server.set(username=owner, database=name).render_as_string(False),
            app_role=app_role,
            _env_file=None,
        )
        await schema.upgrade(settings)
        yield settings
    finally:
        await server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await server.execute(f"DROP ROLE IF EXISTS {app_role}")
        await server.execute(f"DROP ROLE IF EXISTS {owner}")
        await server.close()


def dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def test_a_non_superuser_owner_purges_every_tenant_and_the_app_role_sees_nothing(
    owned: DatabaseSettings, sfdb_server: URL
) -> None:
    async with Database(owned) as db:
        tenants = [
            await db.directory.install(slack_team_id=unique_team_id(), slack_team_name=n)
            for n in ("A", "B")
        ]
    resource = "purged"
    superuser = await asyncpg.connect(
        dsn(sfdb_server.set(database=owned.sqlalchemy_url().database))
    )
    try:
        for tenant in tenants:
            await seed(superuser, tenant, resource)
        as_owner = await asyncpg.connect(dsn(owned.sqlalchemy_url()))
        try:
            assert not await as_owner.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            # Without a tenant the owner sees only windows that ended, never a live one.
            visible = await as_owner.fetchval("SELECT count(*) FROM api_rate_limits")
            assert visible == 2 * (len(WINDOWS) - len(kept_after(0)))
            # And changes none: the policies are for reading and deleting ended windows.
            changed = await as_owner.execute(
                "UPDATE api_rate_limits SET request_count = 0 WHERE resource_type = $1", resource
            )
            assert changed == "UPDATE 0"
        finally:
            await as_owner.close()

        deleted = await purge_rate_limit_windows(owned, older_than_days=7)

        assert deleted == 2 * sum(old for _, _, old in WINDOWS)
        for tenant in tenants:
            assert await left(superuser, tenant, resource) == kept_after(7)
        # The app role, with tenant A set, sees A's rows only: the owner's policies give
        # it nothing of B's, not even B's ended windows; and it may delete nothing.
        async with superuser.transaction():
            await superuser.execute(f'SET LOCAL ROLE "{owned.app_role}"')
            await superuser.execute(f"SET LOCAL app.tenant_id = '{tenants[0]}'")
            seen = await superuser.fetch("SELECT DISTINCT tenant_id FROM api_rate_limits")
            assert [row["tenant_id"] for row in seen] == [tenants[0]]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await superuser.execute("DELETE FROM api_rate_limits")
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
    done = sfdb("purge-rate-limits", "--older-than-days", "30", url=url_of(settings), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ended more than 30 days ago" in done.stdout
    refused = sfdb(
        "purge-rate-limits", "--older-than-days", "-3", url=url_of(settings), cwd=tmp_path
    )
    assert refused.returncode == 2
    assert "must be 0 or more" in refused.stderr
