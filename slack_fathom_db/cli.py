"""The ``sfdb`` command: migrate a database and show what the layer is connected to.

Exit codes: 0 success, 1 the database refused or could not be reached, 2 bad
usage or configuration. Expected failures print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

import asyncpg
from pydantic import ValidationError as SettingsError
from sqlalchemy.exc import SQLAlchemyError

from slack_fathom_db import __version__, schema
from slack_fathom_db.database import Database
from slack_fathom_db.errors import SlackFathomDBError
from slack_fathom_db.settings import DatabaseSettings

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfdb",
        description="slack_fathom_db: migrate and inspect the database (reads DATABASE_URL).",
    )
    parser.add_argument("--version", action="version", version=f"sfdb {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate", help="create the database if missing and upgrade it (default: to head)"
    )
    migrate.add_argument("revision", nargs="?", default="head")
    commands.add_parser("info", help="print server, database, user and pool figures")
    return parser


async def _ensure_database(settings: DatabaseSettings) -> None:
    url = settings.sqlalchemy_url().set(drivername="postgresql")
    target = url.database
    maintenance = url.set(database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(maintenance)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", target)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{target}"')
            print(f"created database {target}")
    finally:
        await conn.close()


async def _migrate(settings: DatabaseSettings, revision: str) -> None:
    await _ensure_database(settings)
    await schema.upgrade(settings, revision)
    print(f"{settings.masked_url} is at revision {await schema.current(settings)}")


async def _info(settings: DatabaseSettings) -> None:
    async with Database(settings) as db:
        info = await db.info()
    width = max(len(name) for name in info.__dataclass_fields__)
    for name in info.__dataclass_fields__:
        print(f"{name:<{width}}  {getattr(info, name)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sfdb``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = DatabaseSettings()
        settings.sqlalchemy_url()
    except (SettingsError, ValueError) as exc:
        print(f"sfdb: configuration error: {_first_line(exc)}", file=sys.stderr)
        return 2
    try:
        if args.command == "migrate":
            asyncio.run(_migrate(settings, args.revision))
        else:
            asyncio.run(_info(settings))
    except (SlackFathomDBError, SQLAlchemyError, asyncpg.PostgresError, OSError) as exc:
        print(f"sfdb: {args.command} failed: {_first_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
