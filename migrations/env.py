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
from sqlalchemy import pool
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
        context.execute(_preamble())
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        connection.exec_driver_sql(_preamble())
        context.run_migrations()


def _preamble() -> str:
    """The session settings of a migration, decided by the database: one rule online and offline.

    * On Citus, one transaction for the whole migration needs its DDL sent over one
      connection per node, or a function created after a table changed fails; the audit
      log's triggers only raise or fill in server values, so they are safe on shards.
    * Migrations run as the owner once the database is at or past revision 0006, which
      gave ``alembic_version`` to it: what they create is the owner's, never the migrating
      login's. Membership alone is no sign of that: roles outlive ``DROP DATABASE``, so a
      database made again under its old name still finds its login a member of the old
      owner, and a migration from scratch must run as the login that owns the schema.
    """
    owner = _settings().roles.owner
    return f"""
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_extension WHERE extname = 'citus') THEN
                SET LOCAL citus.multi_shard_modify_mode TO 'sequential';
                SET LOCAL citus.enable_unsafe_triggers TO on;
            END IF;
            IF EXISTS (
                SELECT FROM pg_class
                WHERE oid = to_regclass('alembic_version')
                  AND relowner = (SELECT oid FROM pg_roles WHERE rolname = '{owner}')
                  AND pg_has_role(current_user, relowner, 'MEMBER')
            ) THEN
                SET LOCAL ROLE "{owner}";
            END IF;
        END
        $$
    """


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
