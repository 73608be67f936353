"""The owner's lifecycle policies (migration 0010) admit one named workspace, no more."""

from __future__ import annotations

import asyncpg
import pytest

from slack_fathom_db import Database, DatabaseSettings, TenantId
from tests.helpers import add_user, set_local


async def test_the_owner_reaches_only_the_workspace_the_lifecycle_setting_names(
    db: Database,
    settings: DatabaseSettings,
    as_owner: asyncpg.Connection,
    tenant_a: TenantId,
    tenant_b: TenantId,
) -> None:
    """Without ``sfdb.lifecycle_tenant`` the owner reads none of a workspace's users; with
    it, that workspace's and no other's, and it can neither change nor add another's."""
    mine = await add_user(db, tenant_a)
    theirs = await add_user(db, tenant_b)
    await as_owner.execute(f'SET ROLE "{settings.roles.owner}"')
    users = "SELECT id FROM users WHERE tenant_id = ANY($1::uuid[])"
    both = [tenant_a, tenant_b]
    async with as_owner.transaction():
        assert await as_owner.fetch(users, both) == []
    async with as_owner.transaction():
        await as_owner.execute(set_local("sfdb.lifecycle_tenant", str(tenant_a)))
        assert [row["id"] for row in await as_owner.fetch(users, both)] == [mine.id]
        changed = await as_owner.execute(
            "UPDATE users SET display_name = 'x' WHERE tenant_id = $1 AND id = $2",
            tenant_b,
            theirs.id,
        )
        assert changed == "UPDATE 0"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with as_owner.transaction():  # a savepoint
                await as_owner.execute(
                    "INSERT INTO users (tenant_id, slack_user_id) VALUES ($1, 'U0SMUGGLED')",
                    tenant_b,
                )
