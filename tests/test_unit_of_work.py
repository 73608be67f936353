"""Unit of work semantics: commit, rollback, single use, tenant context, the pool after it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import NamedTuple

import asyncpg
import pytest
import pytest_asyncio
from pydantic import SecretStr
from sqlalchemy import text

from slack_fathom_db import Database, DatabaseSettings, TenantId, UnitOfWork, claims
from slack_fathom_db.claims import CLAIM_PATTERN, TenantKey, generate_tenant_key
from slack_fathom_db.errors import (
    NotFound,
    SerializationConflict,
    TenantClaimRefused,
    TenantNotFound,
    UsageError,
)
from slack_fathom_db.testing import engine_of, execute_in, runner_of
from tests.helpers import (
    checked_out,
    count_live_users,
    fetch_row,
    on_citus,
    unique_team_id,
    unique_user_id,
)

CONTEXT = text(
    "SELECT current_user AS usr, current_setting('app.tenant_claim', true) AS claim, "
    "sfdb_claimed_tenant()::text AS tenant, current_setting('app.tenant_id', true) AS plain, "
    "pg_backend_pid() AS pid, txid_current_if_assigned() AS txid"
)


class Boom(Exception):
    """Raised on purpose inside a unit of work."""


@pytest_asyncio.fixture
async def small_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """A Database with a single pooled connection: a leaked checkout fails fast."""
    database = Database(
        settings.model_copy(update={"pool_size": 1, "max_overflow": 0, "pool_timeout": 5.0})
    )
    try:
        yield database
    finally:
        await database.dispose()


def login_user(settings: DatabaseSettings) -> str:
    user = settings.sqlalchemy_url().username
    assert user
    return user


async def enter(uow: UnitOfWork) -> None:
    async with uow:
        pass


class Context(NamedTuple):
    """What ``CONTEXT`` reads: the role, the tenant claim, the backend and the transaction."""

    usr: str
    claim: str | None
    """``app.tenant_claim`` as the transaction set it."""
    tenant: str | None
    """The tenant the database verified from the claim (``sfdb_claimed_tenant()``): the
    one row-level security admits, ``None`` when it admits none."""
    plain: str | None
    """``app.tenant_id``, which a unit of work no longer sets (the policies ignore it)."""
    pid: int
    txid: int | None

    @property
    def fields(self) -> list[str]:
        """The claim's dot-separated fields: version, key id, tenant, issued (ms), backend, mac."""
        return self.claim.split(".") if self.claim else []

    @property
    def claimed(self) -> str | None:
        """The tenant the claim names, whether or not the database accepts it."""
        return self.fields[2] if len(self.fields) == 6 else None


async def context(uow: UnitOfWork) -> Context:
    row = (await execute_in(uow, CONTEXT)).one()
    return Context(row.usr, row.claim, row.tenant, row.plain, row.pid, row.txid)


def assert_in_tenant(row: Context, settings: DatabaseSettings, tenant: uuid.UUID) -> None:
    """``row`` was read in a transaction of ``tenant``: as the app role, under a well-formed
    claim that names the tenant and that the database verifies, without the plain setting."""
    assert row.usr == settings.roles.app
    assert row.claim is not None
    assert CLAIM_PATTERN.fullmatch(row.claim), row.claim
    assert row.claimed == str(tenant)
    assert row.tenant == str(tenant)
    assert row.plain in (None, "")


async def assert_clean_pooled_connection(
    db: Database, settings: DatabaseSettings, *, expected: asyncpg.Connection | None = None
) -> CleanConnection:
    """A connection from ``db``'s pool is outside any transaction, with no tenant.

    Its session is the runtime login's. On a direct connection it acts as the
    directory role (the role it opened with); behind PgBouncer, where the role is
    set per transaction, as the runtime login itself, which holds nothing.
    ``expected``: the pooled connection must be that one (the same driver
    connection, given back to the pool). No tenant claim is left on it, and as
    the app role (in a transaction that ends at once) the database finds no
    tenant on it. Nothing of a unit of work runs on it here, so it goes back to
    the pool as it was.
    """
    async with engine_of(db).connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert isinstance(driver, asyncpg.Connection), driver
        assert not driver.is_in_transaction()  # before we send anything
        row = (
            await conn.execute(
                text(
                    "SELECT current_user AS usr, session_user AS login, "
                    "current_setting('role') AS role, "
                    "current_setting('app.tenant_claim', true) AS claim, "
                    "current_setting('app.tenant_id', true) AS plain, "
                    "pg_backend_pid() AS pid, txid_current_if_assigned() AS txid, 1 AS one"
                )
            )
        ).one()
        assert row.login == login_user(settings)
        if settings.pgbouncer:
            assert (row.usr, row.role) == (login_user(settings), "none")
        else:
            assert (row.usr, row.role) == (settings.roles.directory, settings.roles.directory)
        assert row.claim in (None, "")
        assert row.plain in (None, "")
        assert row.txid is None
        assert row.one == 1
        # What row-level security would admit on this session: no tenant.
        async with driver.transaction():
            await driver.execute(f'SET LOCAL ROLE "{settings.roles.app}"')
            assert await driver.fetchval("SELECT sfdb_claimed_tenant()") is None
        if expected is not None:
            assert driver is expected, "not the connection the pool held before"
        assert not driver.is_in_transaction()
    return CleanConnection(driver, row.pid)


class CleanConnection(NamedTuple):
    """A connection of the pool, as :func:`assert_clean_pooled_connection` found it."""

    driver: asyncpg.Connection
    pid: int


# -- commit and rollback ------------------------------------------------------------------


async def test_commit_persists(db: Database, tenant_a: TenantId, admin: asyncpg.Connection) -> None:
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user, display_name="Ada")
        await uow.commit()

    assert await count_live_users(admin, tenant_a, slack_user) == 1
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.get_user_by_slack_id(slack_user)
    assert user is not None
    assert user.display_name == "Ada"


async def test_leaving_without_commit_rolls_back(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=slack_user)
        # visible inside its own transaction
        assert await uow.tenants.get_user(user.id) is not None

    assert await count_live_users(admin, tenant_a, slack_user) == 0
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.get_user_by_slack_id(slack_user) is None


async def test_exception_rolls_back_and_propagates_unchanged(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    raised = Boom("the handler failed")

    async def failing_handler() -> None:
        async with db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)
            raise raised

    with pytest.raises(Boom) as excinfo:
        await failing_handler()

    assert excinfo.value is raised
    assert excinfo.value.__cause__ is None
    assert str(excinfo.value) == "the handler failed"
    assert await count_live_users(admin, tenant_a, slack_user) == 0


async def test_exception_after_commit_keeps_the_committed_part(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    kept, lost = unique_user_id(), unique_user_id()

    async def handler() -> None:
        async with db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=kept)
            await uow.commit()
            await uow.tenants.add_user(slack_user_id=lost)
            raise Boom

    with pytest.raises(Boom):
        await handler()

    assert await count_live_users(admin, tenant_a, kept) == 1
    assert await count_live_users(admin, tenant_a, lost) == 0


async def test_explicit_rollback_then_more_work_then_commit(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    dropped, kept = unique_user_id(), unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=dropped)
        await uow.rollback()
        assert await uow.tenants.get_user_by_slack_id(dropped) is None
        await uow.tenants.add_user(slack_user_id=kept)
        await uow.commit()

    assert await count_live_users(admin, tenant_a, dropped) == 0
    assert await count_live_users(admin, tenant_a, kept) == 1


async def test_multiple_commits_in_one_unit_of_work(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    first, second, third = unique_user_id(), unique_user_id(), unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=first)
        await uow.commit()
        assert await count_live_users(admin, tenant_a, first) == 1  # committed for real, now
        await uow.tenants.add_user(slack_user_id=second)
        await uow.commit()
        await uow.commit()  # nothing pending: still fine
        await uow.tenants.add_user(slack_user_id=third)
        # leaves without a last commit

    assert await count_live_users(admin, tenant_a, first) == 1
    assert await count_live_users(admin, tenant_a, second) == 1
    assert await count_live_users(admin, tenant_a, third) == 0


# -- single use, one task -----------------------------------------------------------------


async def test_entering_twice_raises(db: Database, tenant_a: TenantId) -> None:
    uow = db.unit_of_work(tenant_a)
    async with uow:
        with pytest.raises(UsageError):
            await enter(uow)  # nested, while open
        # the open unit of work is unharmed
        await uow.tenants.list_users()
        await uow.commit()

    with pytest.raises(UsageError):
        await enter(uow)  # again, after it ended


async def test_using_it_from_another_task_raises(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user)
        with pytest.raises(UsageError):
            await asyncio.create_task(uow.tenants.list_users())
        with pytest.raises(UsageError):
            await asyncio.create_task(uow.commit())
        with pytest.raises(UsageError):
            await asyncio.create_task(uow.rollback())
        with pytest.raises(UsageError):
            await asyncio.create_task(execute_in(uow, "SELECT 1"))
        # still usable, and nothing was committed or rolled back by the other task
        assert await count_live_users(admin, tenant_a, slack_user) == 0
        assert await uow.tenants.get_user_by_slack_id(slack_user) is not None
        await uow.commit()

    assert await count_live_users(admin, tenant_a, slack_user) == 1


async def test_using_it_after_the_block_raises(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.list_users()
        await uow.commit()

    with pytest.raises(UsageError):
        await uow.tenants.list_users()
    with pytest.raises(UsageError):
        await uow.meetings.recent()
    with pytest.raises(UsageError):
        await uow.tenants.add_user(slack_user_id=unique_user_id())
    with pytest.raises(UsageError):
        await uow.commit()
    with pytest.raises(UsageError):
        await uow.rollback()
    with pytest.raises(UsageError):
        await execute_in(uow, "SELECT 1")


async def test_using_repositories_before_entering_is_impossible(
    db: Database, tenant_a: TenantId
) -> None:
    uow = db.unit_of_work(tenant_a)
    with pytest.raises(UsageError):
        await uow.commit()
    with pytest.raises(UsageError):
        await execute_in(uow, "SELECT 1")
    # and it can still be entered normally afterwards
    async with uow:
        await uow.commit()


def test_unit_of_work_needs_exactly_one_of_tenant_or_team(db: Database, tenant_a: TenantId) -> None:
    with pytest.raises(UsageError):
        db.unit_of_work()
    with pytest.raises(UsageError):
        db.unit_of_work(tenant_a, slack_team_id="T0123ABC")


# -- tenants at entry ---------------------------------------------------------------------


async def test_unknown_tenant_id_raises_at_entry(small_db: Database) -> None:
    unknown = TenantId(uuid.uuid4())
    with pytest.raises(TenantNotFound):
        await enter(small_db.unit_of_work(unknown))
    assert checked_out(small_db) == 0


async def test_unknown_slack_team_raises_at_entry(small_db: Database) -> None:
    with pytest.raises(TenantNotFound):
        await enter(small_db.unit_of_work(slack_team_id=unique_team_id()))
    assert checked_out(small_db) == 0


async def test_soft_deleted_tenant_raises_at_entry_in_both_forms(
    db: Database, small_db: Database, settings: DatabaseSettings
) -> None:
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name="Gone Soon")
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.soft_delete()
        await uow.commit()

    with pytest.raises(TenantNotFound):
        await enter(small_db.unit_of_work(tenant))
    with pytest.raises(TenantNotFound):
        await enter(small_db.unit_of_work(slack_team_id=team))
    assert checked_out(small_db) == 0
    await assert_clean_pooled_connection(small_db, settings)


async def test_tenant_id_of_slack_team_form_is_the_resolved_tenant(db: Database) -> None:
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name="Resolved")
    uow = db.unit_of_work(slack_team_id=team)
    with pytest.raises(UsageError):
        _ = uow.tenant_id  # not known before entry
    async with uow:
        assert uow.tenant_id == tenant
        assert isinstance(uow.tenant_id, uuid.UUID)
        assert_in_tenant(await context(uow), db.settings, tenant)
        current = await uow.tenants.get()
        assert current is not None
        assert current.id == tenant
        assert current.slack_team_id == team

    by_id = db.unit_of_work(tenant)
    assert by_id.tenant_id == tenant


# -- the directory ------------------------------------------------------------------------


async def test_install_is_idempotent_and_updates_the_name(
    db: Database, admin: asyncpg.Connection
) -> None:
    team = unique_team_id()
    first = await db.directory.install(slack_team_id=team, slack_team_name="Old Name")
    second = await db.directory.install(slack_team_id=team, slack_team_name="New Name")

    assert second == first
    rows = await admin.fetch(
        "SELECT id, slack_team_name FROM tenants WHERE slack_team_id = $1", team
    )
    assert [(r["id"], r["slack_team_name"]) for r in rows] == [(first, "New Name")]
    assert await db.directory.resolve(team) == first


async def test_concurrent_installs_of_one_workspace_give_one_tenant(
    db: Database, admin: asyncpg.Connection
) -> None:
    team = unique_team_id()
    ids = await asyncio.gather(
        *[db.directory.install(slack_team_id=team, slack_team_name=f"W{n}") for n in range(8)]
    )
    assert len(set(ids)) == 1
    count = await admin.fetchval("SELECT count(*) FROM tenants WHERE slack_team_id = $1", team)
    assert count == 1


async def test_reinstall_after_soft_delete_reactivates_same_tenant(
    db: Database, admin: asyncpg.Connection
) -> None:
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name="Comeback")
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.tenants.soft_delete()
        await uow.commit()
    assert await db.directory.resolve(team) is None
    deleted_at = await admin.fetchval("SELECT deleted_at FROM tenants WHERE id = $1", tenant)
    assert deleted_at is not None

    again = await db.directory.install(slack_team_id=team, slack_team_name="Comeback Inc")

    assert again == tenant
    row = await fetch_row(
        admin, "SELECT deleted_at, slack_team_name FROM tenants WHERE id = $1", tenant
    )
    assert row["deleted_at"] is None
    assert row["slack_team_name"] == "Comeback Inc"
    assert await db.directory.resolve(team) == tenant
    async with db.unit_of_work(slack_team_id=team) as uow:
        assert uow.tenant_id == tenant
        # the workspace's data is still there
        assert await uow.tenants.get_user_by_slack_id(slack_user) is not None


async def test_resolve_returns_none_for_unknown_and_soft_deleted(db: Database) -> None:
    assert await db.directory.resolve(unique_team_id()) is None

    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name="Resolver")
    assert await db.directory.resolve(team) == tenant
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.soft_delete()
        # not committed yet: still resolves for everyone else
        assert await db.directory.resolve(team) == tenant
        await uow.commit()
    assert await db.directory.resolve(team) is None


# -- the tenant context, inside and after -------------------------------------------------


async def test_tenant_context_is_set_in_every_transaction(
    db: Database, tenant_a: TenantId, settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    """Every transaction of a unit of work, the first and those after a commit or a
    rollback, runs as the app role under a claim of its tenant signed with the key of
    ``DATABASE_TENANT_KEY``, which the database verifies; the plain ``app.tenant_id`` is
    never set. On a direct connection to a single server the claim names the backend
    it was made for; behind PgBouncer or on Citus, none (0)."""
    key_id = TenantKey.from_settings(settings).key_id
    bound_to_backend = not settings.pgbouncer and not await on_citus(admin)
    async with db.unit_of_work(tenant_a) as uow:
        before = await context(uow)
        assert_in_tenant(before, settings, tenant_a)
        assert before.fields[1] == key_id
        assert before.fields[4] == (str(before.pid) if bound_to_backend else "0")
        await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.commit()

        after_commit = await context(uow)
        assert_in_tenant(after_commit, settings, tenant_a)
        assert after_commit.pid == before.pid  # same connection, a new transaction
        await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.rollback()

        after_rollback = await context(uow)
        assert_in_tenant(after_rollback, settings, tenant_a)
        await uow.commit()
        await uow.commit()

        after_two_commits = await context(uow)
        assert_in_tenant(after_two_commits, settings, tenant_a)
        # statements really run inside a transaction (SET LOCAL would be void otherwise)
        txid = (await execute_in(uow, "SELECT txid_current()")).scalar_one()
        assert txid is not None
        in_tx = (
            await execute_in(uow, "SELECT now() = statement_timestamp() AS fresh")
        ).scalar_one()
        assert in_tx is False


async def test_context_of_two_tenants_does_not_mix(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, settings: DatabaseSettings
) -> None:
    async with db.unit_of_work(tenant_a) as uow_a, db.unit_of_work(tenant_b) as uow_b:
        row_a, row_b = await context(uow_a), await context(uow_b)
        assert_in_tenant(row_a, settings, tenant_a)
        assert_in_tenant(row_b, settings, tenant_b)
        assert row_a.pid != row_b.pid
        await uow_a.commit()
        assert_in_tenant(await context(uow_b), settings, tenant_b)
        assert_in_tenant(await context(uow_a), settings, tenant_a)


# A unit of work that ran SQL through slack_fathom_db.testing (execute_in, driver_of) drops
# its connection; the reset of a pooled connection is shown on units of work that did not.


async def test_pooled_connection_is_reset_after_the_unit_of_work(
    small_db: Database, tenant_a: TenantId, settings: DatabaseSettings
) -> None:
    pooled = await assert_clean_pooled_connection(small_db, settings)  # the pool's only one
    async with small_db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.commit()
        await uow.tenants.add_user(slack_user_id=unique_user_id())
        # leaves with a transaction open: rolled back on the way out

    assert checked_out(small_db) == 0
    await assert_clean_pooled_connection(small_db, settings, expected=pooled.driver)


async def test_pooled_connection_is_reset_after_an_exception(
    small_db: Database, tenant_a: TenantId, settings: DatabaseSettings
) -> None:
    pooled = await assert_clean_pooled_connection(small_db, settings)

    async def failing() -> None:
        async with small_db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=unique_user_id())
            raise Boom

    with pytest.raises(Boom):
        await failing()
    assert checked_out(small_db) == 0
    await assert_clean_pooled_connection(small_db, settings, expected=pooled.driver)


async def test_a_connection_that_served_foreign_sql_is_never_pooled_again(
    small_db: Database, tenant_a: TenantId, settings: DatabaseSettings
) -> None:
    pooled = await assert_clean_pooled_connection(small_db, settings)
    async with small_db.unit_of_work(tenant_a) as uow:
        inside = await context(uow)  # SQL the layer did not write, on its connection
        assert_in_tenant(inside, settings, tenant_a)
        if not settings.pgbouncer:
            assert inside.pid == pooled.pid  # the pooled connection served it
        await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.commit()

    assert checked_out(small_db) == 0
    assert pooled.driver.is_closed()  # dropped, whatever that SQL left on its session
    fresh = await assert_clean_pooled_connection(small_db, settings)
    assert fresh.driver is not pooled.driver


async def test_pooled_connection_is_reset_after_a_failed_statement(
    small_db: Database, tenant_a: TenantId, settings: DatabaseSettings
) -> None:
    async def failing() -> None:
        async with small_db.unit_of_work(tenant_a) as uow:
            await uow.meetings.create(
                user_id=uuid.uuid4(), fathom_recording_id="rec-orphan", title="No such user"
            )

    with pytest.raises(NotFound):  # the foreign key refused it, translated
        await failing()
    assert checked_out(small_db) == 0
    await assert_clean_pooled_connection(small_db, settings)
    async with small_db.unit_of_work(tenant_a) as uow:
        assert_in_tenant(await context(uow), settings, tenant_a)


async def test_rollback_after_a_failed_statement_lets_the_unit_of_work_continue(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.meetings.create(
                user_id=uuid.uuid4(), fathom_recording_id="rec-orphan", title="No such user"
            )
        await uow.rollback()
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.commit()

    assert await count_live_users(admin, tenant_a, slack_user) == 1


# -- returned objects ---------------------------------------------------------------------


async def test_returned_objects_stay_readable_after_the_block_and_after_rollback(
    db: Database, tenant_a: TenantId
) -> None:
    kept_id = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        kept = await uow.tenants.add_user(slack_user_id=kept_id, display_name="Kept")
        meeting = await uow.meetings.create(
            user_id=kept.id, fathom_recording_id=f"rec-{uuid.uuid4()}", title="Readable"
        )
        await uow.commit()
        # readable after a commit inside the block, server defaults included
        assert meeting.status == "pending"
        assert meeting.version == 1
        rolled = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Gone")
        await uow.rollback()
        assert rolled.display_name == "Gone"
        assert rolled.id is not None
        assert rolled.created_at is not None

    assert kept.slack_user_id == kept_id
    assert kept.display_name == "Kept"
    assert kept.tenant_id == tenant_a
    assert kept.created_at is not None
    assert meeting.title == "Readable"
    assert meeting.user_id == kept.id
    assert meeting.created_at is not None
    assert meeting.status == "pending"
    assert rolled.display_name == "Gone"


async def test_returned_objects_are_readable_after_leaving_without_commit(
    db: Database, tenant_a: TenantId
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Ghost")
    assert user.display_name == "Ghost"
    assert user.id is not None
    assert user.updated_at is not None


async def test_returned_records_cannot_be_changed(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=slack_user, display_name="Original")
        await uow.commit()
        with pytest.raises(AttributeError):
            user.display_name = "Sneaky"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            del user.display_name
        meetings = await uow.meetings.recent()
        assert isinstance(meetings, list)
        await uow.commit()
    assert user.display_name == "Original"
    stored = await admin.fetchval(
        "SELECT display_name FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant_a,
        slack_user,
    )
    assert stored == "Original"


# -- cancellation -------------------------------------------------------------------------


async def test_cancelled_unit_of_work_rolls_back_and_returns_its_connection(
    small_db: Database,
    tenant_a: TenantId,
    settings: DatabaseSettings,
    admin: asyncpg.Connection,
) -> None:
    slack_user = unique_user_id()
    inside = asyncio.Event()
    pooled = await assert_clean_pooled_connection(small_db, settings)

    async def handler() -> None:
        async with small_db.unit_of_work(tenant_a) as uow:
            await uow.tenants.add_user(slack_user_id=slack_user)
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(handler())
    await asyncio.wait_for(inside.wait(), timeout=30)
    assert checked_out(small_db) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert checked_out(small_db) == 0
    assert await count_live_users(admin, tenant_a, slack_user) == 0
    state = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pooled.pid)
    assert state in (None, "idle")
    await assert_clean_pooled_connection(small_db, settings, expected=pooled.driver)


async def test_timeout_during_a_statement_rolls_back_and_returns_its_connection(
    small_db: Database,
    tenant_a: TenantId,
    settings: DatabaseSettings,
    admin: asyncpg.Connection,
) -> None:
    slack_user = unique_user_id()
    loop = asyncio.get_running_loop()

    async def slow_handler() -> None:
        async with asyncio.timeout(None) as deadline:
            async with small_db.unit_of_work(tenant_a) as uow:
                await uow.tenants.add_user(slack_user_id=slack_user)
                deadline.reschedule(loop.time() + 0.2)
                await execute_in(uow, "SELECT pg_sleep(60)")

    with pytest.raises(TimeoutError):
        await slow_handler()

    assert checked_out(small_db) == 0
    assert await count_live_users(admin, tenant_a, slack_user) == 0
    # The pool's only connection (or its replacement) is usable at once, not after the sleep.
    await asyncio.wait_for(assert_clean_pooled_connection(small_db, settings), timeout=20)

    async def next_handler() -> Context:
        async with small_db.unit_of_work(tenant_a) as uow:
            row = await context(uow)
            await uow.tenants.add_user(slack_user_id=slack_user)
            await uow.commit()
            return row

    assert_in_tenant(await asyncio.wait_for(next_handler(), timeout=20), settings, tenant_a)
    assert await count_live_users(admin, tenant_a, slack_user) == 1


async def test_many_cancelled_units_of_work_do_not_leak_connections(
    small_db: Database, tenant_a: TenantId, settings: DatabaseSettings
) -> None:
    # More cancellations than the pool holds: a single leak would exhaust it.
    for _ in range(5):
        inside = asyncio.Event()

        async def handler(ready: asyncio.Event = inside) -> None:
            async with small_db.unit_of_work(tenant_a) as uow:
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                ready.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(handler())
        await asyncio.wait_for(inside.wait(), timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert checked_out(small_db) == 0
    await assert_clean_pooled_connection(small_db, settings)


# -- signed tenant claims -----------------------------------------------------------------

CLAIM_NOW = (
    "SELECT current_setting('app.tenant_claim', true) AS claim, "
    "sfdb_claimed_tenant()::text AS tenant, txid_current() AS txid"
)


class ClaimNow(NamedTuple):
    """The claim in force, the tenant the database verifies from it, and the transaction."""

    claim: str
    tenant: str | None
    txid: int

    @property
    def issued_ms(self) -> int:
        """When the claim says it was issued (epoch milliseconds)."""
        return int(self.claim.split(".")[3])


async def claim_now(uow: UnitOfWork) -> ClaimNow:
    """Read the claim with a statement the runner sends as it sends the repositories'
    (a refresh that is due goes first); the connection stays poolable."""
    (row,) = await runner_of(uow).fetch(CLAIM_NOW, (), action="probe")
    return ClaimNow(row["claim"], row["tenant"], row["txid"])


def shift_claim_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Claims are issued ``seconds`` later than now (earlier when negative), as by an
    application whose clock is that far from the database's; the monotonic clock that
    times refreshes is left as it is."""
    shift = int(seconds * 1e9)
    clock = SimpleNamespace(time_ns=lambda: time.time_ns() + shift, monotonic=time.monotonic)
    monkeypatch.setattr(claims, "time", clock)


async def test_a_transaction_older_than_the_refresh_age_sets_a_fresh_claim_and_keeps_its_rows(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a transaction's claim is ``REFRESH_AFTER`` old (0.5 s here), the next statement
    is preceded by a fresh claim of the same tenant, issued later, in the same
    transaction: the row it wrote before stays visible, and it commits. Before that
    age, and right after a refresh, the claim in force is left as it is."""
    monkeypatch.setattr(claims, "REFRESH_AFTER", 0.5)
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=slack_user)  # not committed
        first = await claim_now(uow)
        assert first.tenant == str(tenant_a)
        assert (await claim_now(uow)).claim == first.claim  # younger than the refresh age

        await asyncio.sleep(0.6)
        fresh = await claim_now(uow)
        assert fresh.claim != first.claim
        assert CLAIM_PATTERN.fullmatch(fresh.claim), fresh.claim
        assert fresh.claim.split(".")[2] == str(tenant_a)
        assert fresh.issued_ms - first.issued_ms >= 500
        assert fresh.tenant == str(tenant_a)
        assert fresh.txid == first.txid  # the same transaction
        found = await uow.tenants.get_user(user.id)
        assert found is not None
        assert found.slack_user_id == slack_user
        assert (await claim_now(uow)).claim == fresh.claim
        await uow.commit()

    assert await count_live_users(admin, tenant_a, slack_user) == 1


async def test_a_claim_refreshed_inside_a_rolled_back_savepoint_is_set_again(
    db: Database, tenant_a: TenantId, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retried step runs in a savepoint; a claim refreshed inside it is undone by the
    rollback to that savepoint. The next statement sets a fresh one: the transaction
    keeps its tenant after the claim in force before the savepoint has expired (claims
    issued 9.3 s in the past, refreshed after 0.5 s)."""
    shift_claim_clock(monkeypatch, -9.3)
    monkeypatch.setattr(claims, "REFRESH_AFTER", 0.5)
    attempts = 0
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        runner = runner_of(uow)
        await asyncio.sleep(0.6)

        async def step() -> str | None:
            nonlocal attempts
            attempts += 1
            seen = await claim_now(uow)  # refreshes the claim, inside the savepoint
            if attempts == 1:
                raise SerializationConflict("a concurrent transaction won (simulated)")
            return seen.tenant

        assert await runner.retrying(step, action="retried step") == str(tenant_a)
        await asyncio.sleep(0.4)  # the claim set before the savepoint is now 10.3 s old
        after = await claim_now(uow)
        assert after.tenant == str(tenant_a)
        assert await uow.tenants.get_user(user.id) is not None
    assert attempts == 2


@pytest.mark.parametrize("refreshed", [True, False], ids=["refreshed", "never refreshed"])
async def test_only_a_refreshed_claim_keeps_a_long_transaction_in_its_tenant(
    db: Database, tenant_a: TenantId, monkeypatch: pytest.MonkeyPatch, refreshed: bool
) -> None:
    """The database accepts a claim for 10 s after its issue. Claims are issued 9.3 s in
    the past here, so the first passes the check on entry and, 0.9 s later, is past
    its lifetime. Never refreshed, the same transaction then sees none of its rows (not
    even the one it wrote) and the database verifies no tenant; refreshed (after 0.5 s
    here), it keeps its tenant and its rows."""
    shift_claim_clock(monkeypatch, -9.3)
    monkeypatch.setattr(claims, "REFRESH_AFTER", 0.5 if refreshed else float("inf"))
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        before = await claim_now(uow)
        assert before.tenant == str(tenant_a)

        await asyncio.sleep(0.9)
        after = await claim_now(uow)
        assert after.txid == before.txid
        found = await uow.tenants.get_user(user.id)
        if refreshed:
            assert after.claim != before.claim
            assert after.tenant == str(tenant_a)
            assert found is not None
        else:
            assert after.claim == before.claim
            assert after.tenant is None
            assert found is None


@pytest.mark.parametrize("skew", [30.0, -30.0], ids=["application ahead", "application behind"])
async def test_a_claim_from_a_clock_far_from_the_databases_is_refused_on_entry(
    small_db: Database, tenant_a: TenantId, monkeypatch: pytest.MonkeyPatch, skew: float
) -> None:
    """A claim issued 30 s from the database's time, either way, is outside what it
    accepts (2 s before to 10 s after): entering fails with ``TenantClaimRefused``,
    which asks about the clocks, and the connection goes back to the pool."""
    shift_claim_clock(monkeypatch, skew)
    with pytest.raises(TenantClaimRefused) as refused:
        await enter(small_db.unit_of_work(tenant_a))
    message = str(refused.value)
    assert "tenant claim refused" in message
    assert "clocks" in message
    assert "v1." not in message  # the claim itself is never quoted
    assert checked_out(small_db) == 0


def db_signing_with(settings: DatabaseSettings, tenant_key: str) -> Database:
    """A one-connection ``Database`` on the test database that signs with ``tenant_key``."""
    return Database(
        settings.model_copy(
            update={
                "tenant_key": SecretStr(tenant_key),
                "pool_size": 1,
                "max_overflow": 0,
                "pool_timeout": 5.0,
            }
        )
    )


@pytest.mark.parametrize(
    ("same_id", "reason"),
    [
        (False, "the database holds no tenant key"),
        (True, "its signature does not verify with the database's key"),
    ],
    ids=["a key id the database does not hold", "the id of its key, other bytes"],
)
async def test_a_key_the_database_does_not_hold_is_refused_on_entry(
    settings: DatabaseSettings, tenant_a: TenantId, same_id: bool, reason: str
) -> None:
    """A ``Database`` whose ``DATABASE_TENANT_KEY`` is not the key installed in the database
    fails on entering a unit of work with ``TenantClaimRefused``, saying why: no key of
    that id, or a signature that does not verify. Neither the claim nor the key shows
    in the error, and the connection goes back to the pool."""
    installed = TenantKey.from_settings(settings).key_id
    key_id = installed if same_id else f"{installed}-absent"
    wrong = generate_tenant_key(key_id)
    database = db_signing_with(settings, wrong)
    try:
        with pytest.raises(TenantClaimRefused) as refused:
            await enter(database.unit_of_work(tenant_a))
        assert checked_out(database) == 0
    finally:
        await database.dispose()
    message = str(refused.value)
    assert f"{reason} {key_id}" in message, message
    assert "v1." not in message
    assert wrong.partition(":")[2] not in message
