"""Fixtures shared by the suite: one migrated database per run, tenants per test.

The database comes from the ``slack_fathom_db.testing`` plugin (real
PostgreSQL, never a stand-in). Tests commit for real, so each test installs
tenants of its own with unique Slack team ids instead of relying on rollback.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from tests.helpers import unique_team_id

pytest_plugins = ["slack_fathom_db.testing"]

TenantFactory = Callable[..., Awaitable[TenantId]]


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of tests that only mean something on a Citus cluster."""
    config.addinivalue_line(
        "markers", "citus_only: needs the Citus pass; deselected (not skipped) in the others"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside the Citus pass, deselect ``citus_only`` tests, as ``-m`` would."""
    # Imported here: the plugin module must be loaded by pytest_plugins first.
    from slack_fathom_db.testing import citus_requested  # noqa: PLC0415

    if citus_requested():
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if item.get_closest_marker("citus_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def settings(sfdb_settings: DatabaseSettings) -> DatabaseSettings:
    """Settings of the migrated test database."""
    return sfdb_settings


@pytest.fixture(scope="session")
def db(sfdb_database: Database) -> Database:
    """The shared ``Database`` of the run."""
    return sfdb_database


@pytest.fixture
def make_tenant(db: Database) -> TenantFactory:
    """Install a fresh workspace and return its tenant id."""

    async def make(name: str = "Acme", plan_tier: str = "free") -> TenantId:
        return await db.directory.install(
            slack_team_id=unique_team_id(), slack_team_name=name, plan_tier=plan_tier
        )

    return make


@pytest_asyncio.fixture
async def tenant_a(make_tenant: TenantFactory) -> TenantId:
    """A tenant of this test."""
    return await make_tenant("Tenant A")


@pytest_asyncio.fixture
async def tenant_b(make_tenant: TenantFactory) -> TenantId:
    """A second tenant of this test, for isolation checks."""
    return await make_tenant("Tenant B")


def superuser_dsn(server: URL, settings: DatabaseSettings) -> str:
    """The suite's superuser, on the database of ``settings``, straight to the server."""
    database = settings.sqlalchemy_url().database
    return server.set(drivername="postgresql", database=database).render_as_string(False)


@contextlib.asynccontextmanager
async def superuser_connection(
    server: URL, settings: DatabaseSettings
) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection as the suite's superuser on the database of ``settings``."""
    conn = await asyncpg.connect(superuser_dsn(server, settings))
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture
async def admin(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings
) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection as the suite's superuser, outside the layer.

    Straight to the server, also in the PgBouncer pass. The layer itself runs as
    the runtime login of the test database (see ``slack_fathom_db.testing``).
    """
    async with superuser_connection(sfdb_server, sfdb_direct_settings) as conn:
        yield conn


@pytest_asyncio.fixture
async def as_owner(sfdb_direct_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection as the test database's migrating login (a member of the owner)."""
    url = sfdb_direct_settings.for_migrations().sqlalchemy_url().set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        yield conn
    finally:
        await conn.close()
