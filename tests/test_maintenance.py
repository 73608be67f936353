"""The owner's housekeeping: purging rate-limit windows that ended long ago, with row-level
security on, and the tenant keys (installing, rotating, finishing a rotation).

Both are the owner's work: they run with the credentials of
``DATABASE_MIGRATION_URL`` (README), here the test database's migrating login, a
member of the owner role and no superuser; the layer runs as the runtime login.
Key tests change the keys of a database of their own, never the suite's.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.claims import TenantKey, generate_tenant_key
from slack_fathom_db.errors import ConfigurationError, TenantClaimRefused, ValidationError
from slack_fathom_db.maintenance import (
    finish_tenant_key_rotation,
    install_tenant_key,
    purge_rate_limit_windows,
    rotate_tenant_key,
)
from slack_fathom_db.repositories.rate_limits import window
from slack_fathom_db.testing import throwaway_database
from tests.conftest import superuser_dsn
from tests.helpers import dsn, unique_team_id, unique_user_id
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
        # The app role, with a claim for tenant A, sees A's rows only: the owner's policies
        # give it nothing of B's, not even B's ended windows; and it may delete nothing.
        claim = TenantKey.from_settings(settings).sign(tenants[0])
        async with superuser.transaction():
            await superuser.execute(f'SET LOCAL ROLE "{roles.app}"')
            await superuser.execute(f"SET LOCAL app.tenant_claim = '{claim}'")
            seen = await superuser.fetch("SELECT DISTINCT tenant_id FROM api_rate_limits")
            assert [row["tenant_id"] for row in seen] == [tenants[0]]
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await superuser.execute("DELETE FROM api_rate_limits")
        # The plain setting, which the owner's rate-limit function sets, shows it nothing.
        async with superuser.transaction():
            await superuser.execute(f'SET LOCAL ROLE "{roles.app}"')
            await superuser.execute(f"SET LOCAL app.tenant_id = '{tenants[0]}'")
            assert await superuser.fetchval("SELECT count(*) FROM api_rate_limits") == 0
        # The owner, with tenant A in the plain setting (as its rate-limit function sets
        # it), reads and writes all of A's windows and still only the ended ones of B.
        ended_of_b = len(kept_after(7) - kept_after(0))
        transaction = superuser.transaction()
        await transaction.start()
        try:
            await superuser.execute(f'SET LOCAL ROLE "{roles.owner}"')
            await superuser.execute(f"SET LOCAL app.tenant_id = '{tenants[0]}'")
            rows = await superuser.fetch(
                "SELECT tenant_id, count(*) AS n FROM api_rate_limits GROUP BY tenant_id"
            )
            assert {row["tenant_id"]: row["n"] for row in rows} == {
                tenants[0]: len(kept_after(7)),
                tenants[1]: ended_of_b,
            }
            changed = await superuser.execute(
                "UPDATE api_rate_limits SET request_count = request_count + 1 "
                "WHERE resource_type = $1",
                resource,
            )
            assert changed == f"UPDATE {len(kept_after(7))}"
        finally:
            await transaction.rollback()
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


# -- tenant keys -------------------------------------------------------------------------


def with_tenant_key(settings: DatabaseSettings, key: str) -> DatabaseSettings:
    """``settings`` with ``DATABASE_TENANT_KEY`` set to ``key``."""
    return settings.model_copy(update={"tenant_key": SecretStr(key)})


def tenant_key_of(settings: DatabaseSettings) -> str:
    """``DATABASE_TENANT_KEY`` of ``settings``."""
    assert settings.tenant_key is not None
    return settings.tenant_key.get_secret_value()


async def held_keys(settings: DatabaseSettings) -> dict[str, tuple[bytes, bytes]]:
    """The tenant keys the database holds: id and pads, read on the owner's side."""
    conn = await asyncpg.connect(dsn(settings.for_migrations().sqlalchemy_url()))
    try:
        rows = await conn.fetch("SELECT key_id, inner_pad, outer_pad FROM tenant_claim_keys")
    finally:
        await conn.close()
    return {row["key_id"]: (row["inner_pad"], row["outer_pad"]) for row in rows}


async def tenant_with_a_user(settings: DatabaseSettings) -> tuple[TenantId, str]:
    """A new tenant of the database of ``settings`` and the Slack id of its one user."""
    slack_user = unique_user_id()
    async with Database(settings) as db:
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="K")
        async with db.unit_of_work(tenant) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)
            await uow.commit()
    return tenant, slack_user


async def users_seen(settings: DatabaseSettings, key: str, tenant: TenantId) -> list[str]:
    """The Slack ids of ``tenant``'s users, as a unit of work signing with ``key`` reads them."""
    async with (
        Database(with_tenant_key(settings, key)) as db,
        db.unit_of_work(tenant) as uow,
    ):
        return [user.slack_user_id for user in await uow.tenants.list_users()]


async def users_admitted(
    sfdb_server: URL, settings: DatabaseSettings, key: str, tenant: TenantId
) -> int:
    """How many of ``tenant``'s users the app role sees with a claim signed with ``key``,
    the layer's check left out (raw SQL as the app role, from the suite's superuser)."""
    claim = TenantKey.parse(key).sign(uuid.UUID(str(tenant)))
    conn = await asyncpg.connect(superuser_dsn(sfdb_server, settings))
    try:
        async with conn.transaction():
            await conn.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
            await conn.execute(f"SET LOCAL app.tenant_claim = '{claim}'")
            count: int = await conn.fetchval("SELECT count(*) FROM users")
    finally:
        await conn.close()
    return count


async def test_install_tenant_key_is_idempotent_and_refuses_another_key_under_a_held_id(
    own_database: DatabaseSettings,
) -> None:
    """The harness installed the database's key as sfdb migrate does: installing it again
    adds nothing. Another key with the same id is refused, its secret never repeated, and
    the key held stays as it was (claims signed with it still verify)."""
    settings = own_database
    before = await held_keys(settings)
    assert list(before) == [TenantKey.from_settings(settings).key_id]
    assert await install_tenant_key(settings) is False
    assert await held_keys(settings) == before

    impostor = generate_tenant_key(TenantKey.from_settings(settings).key_id)
    with pytest.raises(ConfigurationError, match="holds another key with the id") as refused:
        await install_tenant_key(with_tenant_key(settings, impostor))
    assert impostor.split(":")[1] not in str(refused.value)
    assert await held_keys(settings) == before


async def test_a_rotation_admits_claims_of_both_keys_until_it_is_finished(
    own_database: DatabaseSettings, sfdb_server: URL
) -> None:
    """Rotate: the database holds the current key and a new one, and a claim signed with
    either admits the tenant's rows; no third key may come meanwhile. Finish (with the new
    key as DATABASE_TENANT_KEY): the old key is gone, and only the new key's claims admit
    rows; a unit of work still signing with the old one is refused."""
    settings = own_database
    old = tenant_key_of(settings)
    old_id = TenantKey.parse(old).key_id
    tenant, slack_user = await tenant_with_a_user(settings)

    new = await rotate_tenant_key(settings)
    new_id = TenantKey.parse(new).key_id
    assert new_id != old_id
    assert sorted(await held_keys(settings)) == sorted([old_id, new_id])
    for key in (old, new):
        assert await users_seen(settings, key, tenant) == [slack_user]
        assert await users_admitted(sfdb_server, settings, key, tenant) == 1

    with pytest.raises(ConfigurationError, match="finish it first"):
        await rotate_tenant_key(settings)
    with pytest.raises(ConfigurationError, match="finish it first"):
        await install_tenant_key(with_tenant_key(settings, generate_tenant_key("third")))
    assert sorted(await held_keys(settings)) == sorted([old_id, new_id])

    removed = await finish_tenant_key_rotation(with_tenant_key(settings, new))
    assert removed == [old_id]
    assert list(await held_keys(settings)) == [new_id]
    assert await users_seen(settings, new, tenant) == [slack_user]
    assert await users_admitted(sfdb_server, settings, new, tenant) == 1
    assert await users_admitted(sfdb_server, settings, old, tenant) == 0
    with pytest.raises(TenantClaimRefused, match=f"holds no tenant key {old_id}"):
        await users_seen(settings, old, tenant)
    # Finished: finishing again removes nothing more.
    assert await finish_tenant_key_rotation(with_tenant_key(settings, new)) == []


async def test_finishing_a_rotation_with_a_key_the_database_does_not_hold_removes_nothing(
    own_database: DatabaseSettings,
) -> None:
    """Every claim would be refused if the database kept only a key no application holds."""
    settings = own_database
    await rotate_tenant_key(settings)
    held = await held_keys(settings)
    assert len(held) == 2
    for stranger in (generate_tenant_key("stranger"), generate_tenant_key(next(iter(held)))):
        with pytest.raises(ConfigurationError, match="does not hold the key"):
            await finish_tenant_key_rotation(with_tenant_key(settings, stranger))
        assert await held_keys(settings) == held


async def test_two_rotations_at_once_leave_at_most_two_keys(
    own_database: DatabaseSettings,
) -> None:
    """Both rotations are made to wait on the key table, then let go together: one adds
    its key, the other finds the rotation under way and is refused; never three keys."""
    settings = own_database
    blocker = await asyncpg.connect(dsn(settings.for_migrations().sqlalchemy_url()))
    rotations: list[asyncio.Future[str]] = []
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE tenant_claim_keys IN ACCESS EXCLUSIVE MODE")
        rotations += [asyncio.ensure_future(rotate_tenant_key(settings)) for _ in range(2)]
        for _ in range(200):
            # The activity a transaction reads is the snapshot of its first read: a new one.
            await blocker.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if waiting == 2 or any(r.done() for r in rotations):
                break
            await asyncio.sleep(0.05)
        assert waiting == 2, "the rotations did not both wait on the key table"
    finally:
        await blocker.close()  # lets both go at once
        results = await asyncio.gather(*rotations, return_exceptions=True)
    added = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, ConfigurationError)]
    assert (len(added), len(refused)) == (1, 1), results
    assert "finish it first" in str(refused[0])
    current, new = TenantKey.from_settings(settings).key_id, TenantKey.parse(added[0]).key_id
    assert sorted(await held_keys(settings)) == sorted([current, new])
