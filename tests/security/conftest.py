"""Fixtures of the security tests: two tenants with a row in every table."""

from __future__ import annotations

import pytest_asyncio

from slack_fathom_db import Database, DatabaseSettings
from tests.security.attackers import World, seeded


@pytest_asyncio.fixture
async def world(db: Database, sfdb_direct_settings: DatabaseSettings) -> World:
    """Tenant ``a`` (the attacker's) and ``b``, made through the layer; the runtime login's
    settings straight to the server, for the raw channel."""
    return World(
        a=await seeded(db, "Attacker's workspace"),
        b=await seeded(db, "Victim's workspace"),
        settings=sfdb_direct_settings,
    )
