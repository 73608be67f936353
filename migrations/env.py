"""Alembic environment: async, URL and app role from DatabaseSettings.

Run from the command line (``alembic upgrade head``) it opens its own asyncpg
engine. Called programmatically (``slack_fathom_db.migrations``) it uses the
connection handed over in ``config.attributes["connection"]``, so it works
from inside a running event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from slack_fathom_db.models import Base
from slack_fathom_db.settings import DatabaseSettings

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

config = context.config
target_metadata = Base.metadata


def _settings() -> DatabaseSettings:
    settings = config.attributes.get("settings")
    if settings is None:
        settings = DatabaseSettings()
        config.attributes["settings"] = settings
    return settings


def _configure(**kwargs: object) -> None:
    config.attributes.setdefault("roles", _settings().roles)
    config.attributes.setdefault("app_role", _settings().roles.app)
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of running it (``alembic upgrade head --sql``)."""
    _configure(url=_settings().sqlalchemy_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        if connection.execute(text(_HAS_CITUS)).scalar():
            # One transaction for the whole upgrade: on Citus that needs its DDL sent over
            # one connection per node, or a function created after a table changed fails.
            connection.execute(text("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'"))
            # The audit log's triggers only raise or fill in server values: safe on shards.
            connection.execute(text("SET LOCAL citus.enable_unsafe_triggers TO on"))
        owner = _settings().roles.owner
        if connection.execute(text(_MAY_BE_OWNER), {"owner": owner}).scalar():
            # Once the owner exists (revision 0006), migrations run as it: what they
            # create is the owner's, never the migrating login's.
            connection.execute(text(f'SET LOCAL ROLE "{owner}"'))
        context.run_migrations()


_HAS_CITUS = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus')"
_MAY_BE_OWNER = (
    "SELECT coalesce(pg_has_role(current_user, oid, 'MEMBER'), false) FROM pg_roles "
    "WHERE rolname = :owner"
)


async def run_async_migrations() -> None:
    engine = create_async_engine(_settings().sqlalchemy_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif (shared := config.attributes.get("connection")) is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_async_migrations())
