"""Bounded inputs, bounded listings, bounded transactions.

JSON inputs are refused past a size (compact UTF-8 bytes, ``DATABASE_MAX_JSON_BYTES``)
or a nesting depth before any SQL is sent, after a bounded amount of work however
large the input; listings take a ``limit``; a unit of work that sits idle inside
its transaction loses it after ``DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import text

from slack_fathom_db import Database, DatabaseSettings, TenantId, UnitOfWork
from slack_fathom_db.errors import DatabaseUnavailable, ValidationError
from slack_fathom_db.testing import engine_of, execute_in
from slack_fathom_db.validation import MAX_JSON_DEPTH, MAX_LIST_LIMIT
from tests.helpers import unique_user_id

IDLE_TIMEOUT = text(
    "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
)
SMALL = 2048
"""The JSON size limit of the ``small`` database of these tests."""


@pytest_asyncio.fixture
async def small(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """The test database with a JSON limit of ``SMALL`` bytes."""
    db = Database(settings.model_copy(update={"max_json_bytes": SMALL}))
    try:
        yield db
    finally:
        await db.dispose()


class CountingMapping(Mapping[str, Any]):
    """A mapping of ``size`` keys that counts how many of its items were read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read = 0

    def __getitem__(self, key: str) -> Any:
        return 1

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[str]:
        for n in range(self.size):
            self.read += 1
            yield f"k{n}"


def compact_size(value: object) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


Write = Callable[[UnitOfWork, Any], Awaitable[object]]


async def _metadata(uow: UnitOfWork, value: Any) -> object:
    return await uow.audit.log_event(
        event_type="bounds.checked",
        event_category="system",
        action_description="bounds",
        metadata=value,
    )


async def _settings(uow: UnitOfWork, value: Any) -> object:
    return await uow.tenants.update(settings=value)


async def _participants(uow: UnitOfWork, value: Any) -> object:
    user = await uow.tenants.add_user(slack_user_id=unique_user_id())
    return await uow.meetings.create(
        user_id=user.id,
        fathom_recording_id=f"rec-{unique_user_id()}",
        title="Call",
        participants=[value],
    )


async def _action_items(uow: UnitOfWork, value: Any) -> object:
    meeting = await _processing_meeting(uow)
    return await uow.meetings.complete_processing(meeting, summary="s", action_items=[value])


async def _ai_output(uow: UnitOfWork, value: Any) -> object:
    meeting = await _processing_meeting(uow)
    return await uow.meetings.complete_processing(meeting, summary="s", ai_output=value)


async def _processing_meeting(uow: UnitOfWork) -> uuid.UUID:
    user = await uow.tenants.add_user(slack_user_id=unique_user_id())
    meeting = await uow.meetings.create(
        user_id=user.id, fathom_recording_id=f"rec-{unique_user_id()}", title="Call"
    )
    return (await uow.meetings.start_processing(meeting.id)).id


JSON_FIELDS: dict[str, Write] = {
    "metadata": _metadata,
    "settings": _settings,
    "participants": _participants,
    "action_items": _action_items,
    "ai_output": _ai_output,
}


async def _snapshot(admin: asyncpg.Connection, tenant: TenantId) -> list[Any]:
    rows = []
    for table in ("users", "meeting_sessions", "audit_logs"):
        rows += await admin.fetch(
            f"SELECT row_to_json(t)::text FROM {table} t WHERE tenant_id = $1 ORDER BY id", tenant
        )
    rows += await admin.fetch("SELECT row_to_json(t)::text FROM tenants t WHERE id = $1", tenant)
    return rows


@pytest.mark.parametrize("field", list(JSON_FIELDS))
async def test_json_at_the_limit_is_kept_and_one_byte_more_is_refused_naming_the_field(
    field: str, small: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    write = JSON_FIELDS[field]
    # Lists wrap the value in one more array ("[" value "]"): two bytes of the limit.
    room = SMALL - (2 if field in ("participants", "action_items") else 0)
    fits = {"note": "x" * (room - len('{"note":""}'))}
    assert compact_size(fits) == room
    too_big = {"note": "y" * (room - len('{"note":""}') + 1)}

    async with small.unit_of_work(tenant_a) as uow:
        await write(uow, fits)
        await uow.commit()
    async with small.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match=rf"^{field}: must be at most {SMALL} bytes"):
            await write(uow, too_big)
        await uow.commit()
    rows = await _snapshot(admin, tenant_a)
    assert any("x" * 100 in row[0] for row in rows)  # the value that fits was kept
    assert not any("y" * 100 in row[0] for row in rows)  # the one that did not, nowhere


async def test_the_size_counts_utf8_bytes_and_escapes_not_characters(
    small: Database, tenant_a: TenantId
) -> None:
    # Under the limit in characters, over it in UTF-8 bytes (é is two bytes) or once
    # escaped (a newline is written as two characters).
    for value in ({"n": "é" * (SMALL // 2)}, {"n": "\n" * (SMALL // 2)}):
        assert len(value["n"]) < SMALL < compact_size(value)
        async with small.unit_of_work(tenant_a) as uow:
            with pytest.raises(ValidationError, match="must be at most"):
                await uow.tenants.update(settings=value)


async def test_a_huge_mapping_is_refused_after_reading_a_bounded_part_of_it(
    db: Database, tenant_a: TenantId
) -> None:
    huge = CountingMapping(1_000_000)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match=r"^metadata: must be at most 65536 bytes"):
            await _metadata(uow, huge)
    # Each key costs at least a few bytes of the 64 KiB: far fewer than a million are read.
    assert 0 < huge.read < 20_000


async def test_an_endless_generator_of_participants_is_refused_not_drained(
    db: Database, tenant_a: TenantId
) -> None:
    endless = ({"email": f"p{n}@example.com"} for n in itertools.count())
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        with pytest.raises(ValidationError, match=r"^participants: must be at most"):
            await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id="rec-endless",
                title="Call",
                participants=endless,
            )
    assert next(endless)["email"].startswith("p")  # the generator was left, not exhausted


async def test_nesting_past_the_depth_limit_is_refused(db: Database, tenant_a: TenantId) -> None:
    deep: Any = "leaf"
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"d": deep}
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match=f"nested at most {MAX_JSON_DEPTH} levels"):
            await uow.tenants.update(settings=deep)


def test_the_json_limit_is_a_setting_with_a_floor(settings: DatabaseSettings) -> None:
    assert DatabaseSettings(_env_file=None).max_json_bytes == 64 * 1024
    assert DatabaseSettings(max_json_bytes=1 << 20, _env_file=None).max_json_bytes == 1 << 20
    with pytest.raises(ValueError, match="max_json_bytes"):
        DatabaseSettings(max_json_bytes=10, _env_file=None)


async def test_listings_take_a_limit_oldest_first(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        added = [await uow.tenants.add_user(slack_user_id=unique_user_id()) for _ in range(55)]
        crm = [
            await uow.tenants.connect_crm(
                provider_type="hubspot", credentials_secret_id=f"vault:crm/{n}"
            )
            for n in range(3)
        ]
        await uow.commit()
        by_default = await uow.tenants.list_users()
        first_two = await uow.tenants.list_users(limit=2)
        every = await uow.tenants.list_users(limit=MAX_LIST_LIMIT)
        one_crm = await uow.tenants.list_crm_connections(limit=1)
        all_crm = await uow.tenants.list_crm_connections()
    # One transaction gives one created_at: ties are broken by id.
    oldest_first = [u.id for u in sorted(added, key=lambda u: (u.created_at, u.id))]
    assert [u.id for u in by_default] == oldest_first[:50]
    assert [u.id for u in first_two] == oldest_first[:2]
    assert [u.id for u in every] == oldest_first
    assert [c.id for c in one_crm] == [min(crm, key=lambda c: (c.created_at, c.id)).id]
    assert {c.id for c in all_crm} == {c.id for c in crm}


@pytest.mark.parametrize("limit", [0, -1, MAX_LIST_LIMIT + 1, True, 2.5, "10"])
async def test_listing_limits_out_of_range_are_refused(
    limit: Any, db: Database, tenant_a: TenantId
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match=r"^limit: "):
            await uow.tenants.list_users(limit=limit)
        with pytest.raises(ValidationError, match=r"^limit: "):
            await uow.tenants.list_crm_connections(limit=limit)


async def test_a_unit_of_work_idle_inside_its_transaction_loses_it_and_keeps_nothing(
    settings: DatabaseSettings, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    idle_ms = 300
    db = Database(settings.model_copy(update={"idle_in_transaction_timeout_ms": idle_ms}))
    slow_user = unique_user_id()
    try:
        async with db.unit_of_work(tenant_a) as uow:
            shown = (await execute_in(uow, IDLE_TIMEOUT)).scalar()
            assert shown == str(idle_ms)

        async def slow_caller() -> None:
            async with db.unit_of_work(tenant_a) as uow:
                await uow.tenants.add_user(slack_user_id=slow_user)
                await asyncio.sleep(idle_ms / 1000 * 5)  # a slow call to another service
                await uow.tenants.add_user(slack_user_id=unique_user_id())
                await uow.commit()

        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(slow_caller(), 60)
        # The server ended the transaction: its row lock and its write are gone.
        assert (
            await admin.fetchval(
                "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
                tenant_a,
                slow_user,
            )
            == 0
        )
        async with db.unit_of_work(tenant_a) as uow:  # the pool replaced the connection
            assert await uow.tenants.add_user(slack_user_id=slow_user) is not None
            await uow.commit()
    finally:
        await db.dispose()


async def test_outside_a_unit_of_work_the_idle_timeout_is_the_servers(
    db: Database, tenant_a: TenantId
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        inside = (await execute_in(uow, IDLE_TIMEOUT)).scalar()
        await uow.commit()
        after = (await execute_in(uow, IDLE_TIMEOUT)).scalar()  # a new transaction, preamble
    assert inside == str(db.settings.idle_in_transaction_timeout_ms)
    # Every transaction of the unit of work sets it again (SET LOCAL): the same after commit.
    assert after == inside
    async with engine_of(db).connect() as conn:
        outside = (await conn.execute(IDLE_TIMEOUT)).scalar()
    assert outside != inside
