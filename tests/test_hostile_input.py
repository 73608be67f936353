"""Hostile input, property-based: every public method that takes text (and its neighbours).

Each property feeds one argument of one method a hostile value — arbitrary
Unicode (lone surrogates included), NUL characters, over-long strings, SQL
fragments, wrong types, naive datetimes, negative numbers — and the others
valid values. Every call must either work and round-trip exactly (read back
through the layer and by a superuser outside it), or raise
:class:`ValidationError` and leave the database as it was, even when the
caller catches the error and commits. Nothing else may escape.

The properties are plain (sync) tests that drive a ``Database`` on an event
loop of this module, so hypothesis runs each example to completion. How many
examples ran, and how many were accepted or rejected, is printed at the end of
the module and asserted (a property that only ever rejects proves little).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId, UnitOfWork
from slack_fathom_db.errors import (
    TenantNotFound,
    TransactionAborted,
    UsageError,
    ValidationError,
)
from tests.conftest import superuser_dsn
from tests.helpers import fetch_row, unique_team_id, unique_user_id

T = TypeVar("T")

EXAMPLES = 60
"""Examples per property (moderate: the suite stays fast)."""

SQL_FRAGMENTS = [
    "'; DROP TABLE users; --",
    "' OR '1'='1",
    "'); SELECT pg_sleep(10); --",
    "$1",
    "%s",
    "\\",
    "\\x00",
    "E'\\000'",
    "' || current_setting('app.tenant_id') || '",
    "RESET ROLE; SET app.tenant_id = '00000000-0000-0000-0000-000000000000'",
    "/* */ UNION SELECT * FROM tenants --",
    "NULL",
    "null",
    '"; COMMIT; BEGIN; --',
    "\u2028\u2029",
    "\ufeff",
    "ǅ" * 3,
]

UNICODE = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
"""Any code point, lone surrogates included."""

TEXT = st.one_of(
    UNICODE,
    st.text(max_size=300),
    st.sampled_from(SQL_FRAGMENTS),
    st.integers(200, 12_000).map(lambda n: "é" * n),  # over-long (and multi-byte)
    st.text(min_size=1, max_size=8).map(lambda s: f"{s}\x00{s}"),
    st.just(""),
    st.just("   "),
)
WRONG_TYPE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=16),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.datetimes(),
    st.just(uuid.uuid4()),
)
HOSTILE = st.one_of(TEXT, TEXT, WRONG_TYPE)
WELL_FORMED_TEAM = re.compile(r"[TE][A-Z0-9]{2,30}")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | TEXT,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(st.text(max_size=6), UNICODE), inner, max_size=3)
    ),
    max_leaves=8,
)
HOSTILE_JSON = st.one_of(JSON, WRONG_TYPE, st.dictionaries(st.text(max_size=4), JSON, max_size=3))
DATETIMES = st.one_of(
    st.datetimes(),  # naive
    st.datetimes(timezones=st.timezones()),
    st.datetimes(timezones=st.just(UTC)),
    WRONG_TYPE,
)
INTS = st.one_of(st.integers(-(2**40), 2**40), st.integers(-5, 5), WRONG_TYPE)
TENANT_TABLES = (
    "users",
    "crm_connections",
    "meeting_sessions",
    "account_mappings",
    "audit_logs",
    "api_rate_limits",
)


@dataclass
class Harness:
    """A Database, a superuser connection and a tenant, on a loop of this module."""

    loop: asyncio.AbstractEventLoop
    db: Database
    admin: asyncpg.Connection
    tenant: TenantId
    user_id: uuid.UUID
    crm_id: uuid.UUID
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 120))

    async def fingerprint(self) -> str:
        """A digest of everything the tenant owns, and of the global tenants table."""
        parts = []
        for table in TENANT_TABLES:
            parts.append(
                await self.admin.fetchval(
                    f"SELECT coalesce(string_agg(to_jsonb(t)::text, ',' ORDER BY to_jsonb(t)::text)"
                    f", '') FROM {table} t WHERE tenant_id = $1",
                    self.tenant,
                )
            )
        parts.append(
            await self.admin.fetchval("SELECT count(*)::text || max(updated_at)::text FROM tenants")
        )
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    async def attempt(
        self,
        value: object,
        write: Callable[[UnitOfWork], Awaitable[Any]],
        verify: Callable[[Any], Awaitable[None]],
    ) -> str:
        """Run ``write`` in a unit of work that commits even when it raises ValidationError."""
        before = await self.fingerprint()
        rejected: ValidationError | None = None
        async with self.db.unit_of_work(self.tenant) as uow:
            try:
                result = await write(uow)
            except ValidationError as exc:
                rejected = exc
            try:
                await uow.commit()
            except TransactionAborted:
                if rejected is None:
                    raise
                event("rejected by the database, not by validation")
        if rejected is None:
            await verify(result)
            return "accepted"
        return await self.rejected(value, rejected, before)

    async def rejected(self, value: object, error: ValidationError, before: str) -> str:
        assert await self.fingerprint() == before, "a rejected call wrote something"
        if isinstance(value, str) and len(value) >= 16:
            assert value not in str(error), "the error message repeats the input"
        return "rejected"

    async def outside(self, call: Callable[[], Awaitable[Any]], value: object) -> tuple[str, Any]:
        """Run a call that is not inside a unit of work; (outcome, result)."""
        before = await self.fingerprint()
        try:
            result = await call()
        except ValidationError as exc:
            return await self.rejected(value, exc, before), None
        return "accepted", result


@pytest.fixture(scope="module")
def harness(
    sfdb_settings: DatabaseSettings,
    sfdb_direct_settings: DatabaseSettings,
    sfdb_server: URL,
    request: pytest.FixtureRequest,
) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    db = Database(sfdb_settings)

    async def setup() -> Harness:
        admin = await asyncpg.connect(superuser_dsn(sfdb_server, sfdb_direct_settings))
        tenant = await db.directory.install(slack_team_id=unique_team_id(), slack_team_name="H")
        async with db.unit_of_work(tenant) as uow:
            user = await uow.tenants.add_user(slack_user_id=unique_user_id())
            crm = await uow.tenants.connect_crm(
                provider_type="hubspot", credentials_secret_id="vault:h/crm", is_default=True
            )
            await uow.commit()
        return Harness(loop, db, admin, tenant, user.id, crm.id)

    h = loop.run_until_complete(setup())
    try:
        yield h
    finally:
        loop.run_until_complete(h.admin.close())
        loop.run_until_complete(db.dispose())
        loop.close()
        report(request, h.outcomes)


def report(request: pytest.FixtureRequest, outcomes: dict[str, Counter[str]]) -> None:
    """Print how many examples each property ran (outside output capture)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not outcomes:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "hypothesis examples (hostile input)")
        total = 0
        for name, counts in sorted(outcomes.items()):
            ran = sum(counts.values())
            total += ran
            reporter.write_line(
                f"{name}: {ran} examples, {counts['accepted']} accepted, "
                f"{counts['rejected']} rejected"
            )
        reporter.write_line(f"total: {total} examples over {len(outcomes)} properties")


def prop(h: Harness, name: str, body: Callable[[st.DataObject], str]) -> None:
    """Run ``body`` as a property; count and check its outcomes."""
    counts: Counter[str] = Counter()
    h.outcomes[name] = counts

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        # CI replays one fixed sequence (a red CI must be reproducible); elsewhere each
        # run explores new inputs.
        derandomize=os.environ.get("CI") == "true",
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        outcome = body(data)
        event(outcome)
        counts[outcome] += 1

    run()
    assert sum(counts.values()) >= EXAMPLES
    assert counts["rejected"] > 0, f"{name}: hostile input was never rejected"
    assert counts["accepted"] > 0, f"{name}: no example was ever accepted"


def pick(data: st.DataObject, valid: dict[str, Any], hostile: dict[str, Any]) -> tuple[str, Any]:
    """Choose one argument to make hostile (or none: all valid); return (name, value)."""
    # All valid about a quarter of the time, so every property also round-trips plenty.
    valid_share = ["(all valid)"] * max(1, len(hostile) // 3)
    name = data.draw(st.sampled_from([*valid_share, *hostile]), label="argument")
    if name == "(all valid)":
        return name, None
    value = data.draw(hostile[name], label=name)
    valid[name] = value
    return name, value


async def _enter(uow: UnitOfWork) -> None:
    async with uow:
        pass


def same(stored: Any, expected: Any) -> bool:
    """Equal; for an aware datetime, the same instant (stored in UTC).

    Compared in UTC because Python's ``==`` between zones is always False for a
    local time in a DST gap or fold (PEP 495), even when the instant is the same.
    """
    if isinstance(expected, datetime):
        return isinstance(stored, datetime) and stored == expected.astimezone(UTC)
    return bool(stored == expected)


def json_equal(stored: Any, expected: Any) -> bool:
    return json.dumps(stored, sort_keys=True) == json.dumps(expected, sort_keys=True)


# -- the directory ----------------------------------------------------------------------


def test_install_and_resolve(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "slack_team_id": unique_team_id(),
            "slack_team_name": "Acme",
            "plan_tier": "pro",
            "slack_enterprise_id": None,
        }
        _, value = pick(
            data,
            args,
            {
                "slack_team_id": HOSTILE,
                "slack_team_name": HOSTILE,
                "plan_tier": HOSTILE,
                "slack_enterprise_id": HOSTILE,
            },
        )

        async def check() -> str:
            outcome, tenant = await h.outside(lambda: h.db.directory.install(**args), value)
            if outcome == "rejected":
                resolved = await h.outside(
                    lambda: h.db.directory.resolve(args["slack_team_id"]), value
                )
                assert resolved[1] is None
                return outcome
            assert await h.db.directory.resolve(args["slack_team_id"]) == tenant
            row = await fetch_row(h.admin, "SELECT * FROM tenants WHERE id = $1", tenant)
            assert row["slack_team_id"] == args["slack_team_id"]
            assert row["slack_team_name"] == args["slack_team_name"]
            assert row["plan_tier"] == args["plan_tier"]
            assert row["slack_enterprise_id"] == args["slack_enterprise_id"]
            async with h.db.unit_of_work(slack_team_id=args["slack_team_id"]) as uow:
                assert uow.tenant_id == tenant
            return outcome

        return h.run(check())

    prop(h, "directory.install/resolve", body)


def test_resolve_and_unit_of_work_by_team(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        value = data.draw(st.one_of(HOSTILE, st.from_regex(r"T[A-Z0-9]{2,30}", fullmatch=True)))

        async def check() -> str:
            if isinstance(value, str) and WELL_FORMED_TEAM.fullmatch(value):
                # Never refused: whatever goes wrong with a well-formed id fails here, loudly.
                assert await h.db.directory.resolve(value) is None
            outcome, resolved = await h.outside(lambda: h.db.directory.resolve(value), value)
            if outcome == "accepted":
                assert resolved is None  # a well-formed id nobody installed
                with pytest.raises(TenantNotFound):
                    await _enter(h.db.unit_of_work(slack_team_id=value))
            elif value is None:  # "no team id": neither a tenant nor a team is a usage error
                with pytest.raises(UsageError):
                    h.db.unit_of_work(slack_team_id=value)
            else:
                with pytest.raises(ValidationError):
                    h.db.unit_of_work(slack_team_id=value)
            return outcome

        return h.run(check())

    prop(h, "directory.resolve + unit_of_work(slack_team_id)", body)


# -- the workspace, users, CRM ------------------------------------------------------------


def test_tenant_update(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {"slack_team_name": "Hostile Inc"}
        hostile = {
            "slack_team_name": HOSTILE,
            "plan_tier": HOSTILE,
            "subscription_status": HOSTILE,
            "settings": HOSTILE_JSON,
            "trial_ends_at": DATETIMES,
        }
        _, value = pick(data, args, hostile)

        async def verify(tenant: Any) -> None:
            row = await fetch_row(h.admin, "SELECT * FROM tenants WHERE id = $1", h.tenant)
            for name, expected in args.items():
                if name == "settings":
                    assert json_equal(json.loads(row["settings"]), expected)
                    assert json_equal(tenant.settings, expected)
                else:
                    assert same(row[name], expected), name
                    assert same(getattr(tenant, name), expected), name

        return h.run(h.attempt(value, lambda uow: uow.tenants.update(**args), verify))

    prop(h, "tenants.update", body)


def test_add_user_and_get_by_slack_id(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "slack_user_id": unique_user_id(),
            "slack_email": "rep@example.com",
            "display_name": "Rep",
            "role": "member",
        }
        _, value = pick(
            data,
            args,
            {
                "slack_user_id": HOSTILE,
                "slack_email": st.one_of(HOSTILE, TEXT.map(lambda s: f"{s}@example.com")),
                "display_name": HOSTILE,
                "role": HOSTILE,
            },
        )

        async def write(uow: UnitOfWork) -> Any:
            return await uow.tenants.add_user(**args)

        async def verify(user: Any) -> None:
            async with h.db.unit_of_work(h.tenant) as uow:
                again = await uow.tenants.get_user_by_slack_id(args["slack_user_id"])
            assert again is not None
            assert again.id == user.id
            assert again.display_name == args["display_name"]
            assert again.role == args["role"]
            assert again.slack_email == user.slack_email
            if args["slack_email"] is None:
                assert again.slack_email is None
            else:
                assert again.slack_email is not None
                local, _, domain = again.slack_email.rpartition("@")
                assert local == args["slack_email"].strip().rpartition("@")[0]
                assert domain == domain.lower()
                assert domain.isascii()

        return h.run(h.attempt(value, write, verify))

    prop(h, "tenants.add_user/get_user_by_slack_id", body)


def test_lookups_by_id_or_slack_id(harness: Harness) -> None:
    h = harness
    methods = ["get_user", "get_user_by_slack_id", "get_crm_connection", "remove_user"]

    def body(data: st.DataObject) -> str:
        method = data.draw(st.sampled_from(methods))
        value = data.draw(st.one_of(HOSTILE, st.uuids().map(str), st.uuids()))

        async def write(uow: UnitOfWork) -> Any:
            return await getattr(uow.tenants, method)(value)

        async def verify(result: Any) -> None:
            assert result is None  # nothing of this tenant has a random id

        try:
            return h.run(h.attempt(value, write, verify))
        except Exception as exc:  # remove_user of an unknown id: NotFound, after validation
            if type(exc).__name__ == "NotFound" and method == "remove_user":
                return "accepted"
            raise

    prop(h, "tenants.get_user/get_user_by_slack_id/get_crm_connection/remove_user", body)


SECRET_REFERENCES = st.one_of(
    st.just("vault:team/crm"),
    st.just("arn:aws:secretsmanager:eu-west-1:123456789012:secret:crm/hubspot-AbC123"),
    TEXT.map(lambda s: f"vault:{s}"),
    TEXT.map(lambda s: f"arn:aws:secretsmanager:eu-west-1:123456789012:secret:{s}"),
)


def test_connect_crm(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "provider_type": "salesforce",
            "credentials_secret_id": "vault:x/y",
            "is_default": False,
        }
        _, value = pick(
            data,
            args,
            {
                "provider_type": HOSTILE,
                "credentials_secret_id": st.one_of(HOSTILE, SECRET_REFERENCES),
                "is_default": WRONG_TYPE,
                "connected_by_user_id": st.one_of(HOSTILE, st.uuids().map(str)),
            },
        )

        async def verify(crm: Any) -> None:
            row = await fetch_row(h.admin, "SELECT * FROM crm_connections WHERE id = $1", crm.id)
            assert row["provider_type"] == args["provider_type"]
            assert row["credentials_secret_id"] == args["credentials_secret_id"].strip()
            assert row["tenant_id"] == h.tenant

        try:
            return h.run(h.attempt(value, lambda uow: uow.tenants.connect_crm(**args), verify))
        except Exception as exc:  # a random user id is a valid UUID of no user: NotFound
            if type(exc).__name__ == "NotFound":
                return "accepted"
            raise

    prop(h, "tenants.connect_crm", body)


def test_map_and_find_account(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "crm_connection_id": h.crm_id,
            "email_domain": f"d{uuid.uuid4().hex[:8]}.example.com",
            "crm_account_id": "001",
            "crm_account_name": "Acme",
            "verified": True,
        }
        _, value = pick(
            data,
            args,
            {
                "email_domain": st.one_of(HOSTILE, TEXT.map(lambda s: f"{s}.example.org")),
                "crm_account_id": HOSTILE,
                "crm_account_name": HOSTILE,
                "verified": WRONG_TYPE,
                "crm_connection_id": HOSTILE,
            },
        )

        async def verify(mapping: Any) -> None:
            row = await fetch_row(
                h.admin, "SELECT * FROM account_mappings WHERE id = $1", mapping.id
            )
            assert row["crm_account_id"] == args["crm_account_id"]
            assert row["crm_account_name"] == args["crm_account_name"]
            assert row["email_domain"] == mapping.email_domain
            assert row["email_domain"] == row["email_domain"].lower()
            assert row["email_domain"].isascii()
            async with h.db.unit_of_work(h.tenant) as uow:
                found = await uow.tenants.find_account(
                    f"someone@{row['email_domain']}", crm_connection_id=h.crm_id
                )
                await uow.commit()
            assert found is not None
            assert found.id == mapping.id

        try:
            return h.run(h.attempt(value, lambda uow: uow.tenants.map_account(**args), verify))
        except Exception as exc:  # a random valid connection id names no connection
            if type(exc).__name__ == "NotFound" and args["crm_connection_id"] != h.crm_id:
                return "accepted"
            raise

    prop(h, "tenants.map_account/find_account", body)


def test_find_account(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "email_or_domain": "someone@acme.example.com",
            "crm_connection_id": h.crm_id,
            "verified_only": False,
        }
        _, value = pick(
            data,
            args,
            {
                "email_or_domain": st.one_of(
                    HOSTILE, st.emails(), TEXT.map(lambda s: f"x@{s}.com")
                ),
                "crm_connection_id": st.one_of(st.none(), st.uuids(), HOSTILE),
                "verified_only": WRONG_TYPE,
            },
        )

        async def write(uow: UnitOfWork) -> Any:
            kwargs = dict(args)
            return await uow.tenants.find_account(kwargs.pop("email_or_domain"), **kwargs)

        async def verify(found: Any) -> None:
            assert found is None or found.tenant_id == h.tenant

        return h.run(h.attempt(value, write, verify))

    prop(h, "tenants.find_account", body)


# -- meetings ----------------------------------------------------------------------------


def test_create_meeting_and_get_by_fathom_id(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "user_id": h.user_id,
            "fathom_recording_id": f"rec-{uuid.uuid4()}",
            "title": "Discovery",
            "meeting_url": None,
            "started_at": None,
            "duration_seconds": None,
            "participants": (),
        }
        _, value = pick(
            data,
            args,
            {
                "fathom_recording_id": HOSTILE,
                "title": HOSTILE,
                "meeting_url": HOSTILE,
                "started_at": DATETIMES,
                "duration_seconds": INTS,
                "participants": st.one_of(st.lists(st.one_of(JSON, TEXT), max_size=3), WRONG_TYPE),
                "user_id": HOSTILE,
            },
        )

        async def write(uow: UnitOfWork) -> Any:
            return await uow.meetings.create(**args)

        async def verify(meeting: Any) -> None:
            async with h.db.unit_of_work(h.tenant) as uow:
                again = await uow.meetings.get_by_fathom_id(args["fathom_recording_id"])
                by_id = await uow.meetings.get(meeting.id)
            assert again is not None
            assert by_id is not None
            assert again.id == meeting.id
            assert again.title == args["title"]
            assert again.meeting_url == args["meeting_url"]
            assert same(again.started_at, args["started_at"])
            assert again.duration_seconds == args["duration_seconds"]
            assert json_equal(again.participants, list(args["participants"]))

        try:
            return h.run(h.attempt(value, write, verify))
        except Exception as exc:  # a random valid user id is a user of no one: NotFound
            if type(exc).__name__ == "NotFound":
                return "accepted"
            raise

    prop(h, "meetings.create/get_by_fathom_id", body)


def test_processing_transitions_and_crm_sync(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        step = data.draw(st.sampled_from(["complete", "fail", "sync"]))
        args: dict[str, Any]
        if step == "complete":
            args = {"summary": "ok", "action_items": (), "ai_output": None}
            hostile = {
                "summary": HOSTILE,
                "action_items": st.one_of(st.lists(st.one_of(JSON, TEXT), max_size=3), WRONG_TYPE),
                "ai_output": HOSTILE_JSON,
                "expected_version": INTS,
            }
        elif step == "fail":
            args = {"error": "timeout"}
            hostile = {"error": HOSTILE, "expected_version": INTS}
        else:
            args = {"status": "synced", "crm_record_id": "note-1", "error": None}
            hostile = {
                "status": HOSTILE,
                "crm_record_id": HOSTILE,
                "error": HOSTILE,
            }
        _, value = pick(data, args, hostile)

        async def check() -> str:
            async with h.db.unit_of_work(h.tenant) as uow:
                meeting = await uow.meetings.create(
                    user_id=h.user_id, fathom_recording_id=f"rec-{uuid.uuid4()}", title="T"
                )
                meeting = await uow.meetings.start_processing(meeting.id)
                if step == "sync":
                    meeting = await uow.meetings.complete_processing(meeting.id, summary="s")
                await uow.commit()

            async def write(uow: UnitOfWork) -> Any:
                if step == "complete":
                    return await uow.meetings.complete_processing(meeting.id, **args)
                if step == "fail":
                    return await uow.meetings.fail_processing(meeting.id, **args)
                return await uow.meetings.record_crm_sync(meeting.id, **args)

            async def verify(result: Any) -> None:
                row = await fetch_row(
                    h.admin, "SELECT * FROM meeting_sessions WHERE id = $1", meeting.id
                )
                if step == "complete":
                    assert row["status"] == "completed"
                    assert row["summary"] == args["summary"]
                    assert json_equal(json.loads(row["action_items"]), list(args["action_items"]))
                    if args["ai_output"] is not None:
                        assert json_equal(json.loads(row["ai_output"]), args["ai_output"])
                elif step == "fail":
                    assert row["status"] == "failed"
                    assert row["processing_error"] == args["error"]
                else:
                    assert row["crm_sync_status"] == args["status"]
                    if args["status"] == "synced":
                        assert row["crm_record_id"] == args["crm_record_id"]
                    if args["status"] == "failed":
                        assert row["crm_last_error"] == args["error"]

            try:
                return await h.attempt(value, write, verify)
            except Exception as exc:  # a stale expected_version is a Conflict, after validation
                if type(exc).__name__ == "Conflict" and "expected_version" in args:
                    return "accepted"
                raise

        return h.run(check())

    prop(h, "meetings.complete_processing/fail_processing/record_crm_sync", body)


def test_listings_and_limits(harness: Harness) -> None:
    h = harness
    calls: dict[str, Callable[[UnitOfWork, Any, Any], Awaitable[Any]]] = {
        "meetings.recent": lambda uow, a, b: uow.meetings.recent(days=a, limit=b),
        "meetings.for_user": lambda uow, a, b: uow.meetings.for_user(h.user_id, days=a, limit=b),
        "meetings.claim_pending": lambda uow, a, b: uow.meetings.claim_pending(limit=b),
        "audit.recent": lambda uow, a, b: uow.audit.recent(days=a, limit=b),
        "audit.recent_failures": lambda uow, a, b: uow.audit.recent_failures(hours=a, limit=b),
    }

    def body(data: st.DataObject) -> str:
        name = data.draw(st.sampled_from(list(calls)))
        first = data.draw(st.one_of(st.integers(1, 30), INTS))
        second = data.draw(st.one_of(st.integers(1, 50), INTS))

        async def verify(rows: Any) -> None:
            assert isinstance(rows, list)
            assert len(rows) <= second
            assert all(row.tenant_id == h.tenant for row in rows)

        return h.run(
            h.attempt((first, second), lambda uow: calls[name](uow, first, second), verify)
        )

    prop(h, "listings (days/hours/limit)", body)


# -- audit -------------------------------------------------------------------------------

AUDIT_HOSTILE = {
    "event_type": HOSTILE,
    "event_category": HOSTILE,
    "action_description": HOSTILE,
    "status": HOSTILE,
    "resource_type": HOSTILE,
    "resource_id": st.one_of(HOSTILE, st.uuids()),
    "ip_address": st.one_of(HOSTILE, st.ip_addresses().map(str), st.ip_addresses()),
    "user_agent": HOSTILE,
    "metadata": HOSTILE_JSON,
    "user_id": st.one_of(HOSTILE, st.just("not-a-uuid")),
}


def audit_args() -> dict[str, Any]:
    return {
        "event_type": "auth.login",
        "event_category": "auth",
        "action_description": "login",
        "status": "success",
    }


async def verify_audit(h: Harness, event_id: uuid.UUID, args: dict[str, Any]) -> None:
    row = await fetch_row(h.admin, "SELECT * FROM audit_logs WHERE id = $1", event_id)
    for name, expected in args.items():
        stored = row[name]
        if expected is None:
            assert (json.loads(stored) if name == "metadata" else stored) == (
                {} if name == "metadata" else None
            ), name
        elif name == "metadata":
            assert json_equal(json.loads(stored), expected), name
        elif name == "ip_address":
            import ipaddress  # noqa: PLC0415

            assert stored == ipaddress.ip_address(str(expected).strip()), name
        elif name == "resource_id":
            assert stored == str(expected), name
        else:
            assert stored == expected, name


def test_log_event(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args = audit_args()
        _, value = pick(data, args, AUDIT_HOSTILE)

        async def verify(logged: Any) -> None:
            await verify_audit(h, logged.id, args)

        try:
            return h.run(h.attempt(value, lambda uow: uow.audit.log_event(**args), verify))
        except Exception as exc:  # a random valid user_id names no user: NotFound
            if type(exc).__name__ == "NotFound":
                return "accepted"
            raise

    prop(h, "audit.log_event", body)


def test_log_security_event(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args = audit_args()
        _, value = pick(data, args, AUDIT_HOSTILE)

        async def check() -> str:
            try:
                outcome, logged = await h.outside(
                    lambda: h.db.log_security_event(h.tenant, **args), value
                )
            except Exception as exc:
                if type(exc).__name__ == "NotFound":
                    return "accepted"
                raise
            if outcome == "accepted":
                await verify_audit(h, logged.id, args)
            return outcome

        return h.run(check())

    prop(h, "db.log_security_event", body)


# -- rate limits -------------------------------------------------------------------------


def test_rate_limit_windows(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        where = data.draw(st.sampled_from(["db.rate_limit", "consume", "peek"]))
        args: dict[str, Any] = {
            "resource_type": f"r{uuid.uuid4().hex[:10]}",
            "limit": 10,
            "period": "daily",
            "cost": 1,
        }
        _, value = pick(
            data,
            args,
            {"resource_type": HOSTILE, "limit": INTS, "period": HOSTILE, "cost": INTS},
        )

        async def verify(decision: Any) -> None:
            assert decision.limit == args["limit"]
            assert 0 <= decision.remaining <= args["limit"]
            spent = await h.admin.fetchval(
                "SELECT coalesce(sum(request_count), 0) FROM api_rate_limits "
                "WHERE tenant_id = $1 AND resource_type = $2",
                h.tenant,
                args["resource_type"],
            )
            charged = decision.allowed and where != "peek"
            assert spent == (args["cost"] if charged else 0)

        async def check() -> str:
            if where == "db.rate_limit":
                resource = args.pop("resource_type")
                outcome, decision = await h.outside(
                    lambda: h.db.rate_limit(h.tenant, resource, **args), value
                )
                args["resource_type"] = resource
                if outcome == "accepted":
                    await verify(decision)
                return outcome

            async def write(uow: UnitOfWork) -> Any:
                method = uow.rate_limits.consume if where == "consume" else uow.rate_limits.peek
                kwargs = dict(args)
                return await method(kwargs.pop("resource_type"), **kwargs)

            return await h.attempt(value, write, verify)

        return h.run(check())

    prop(h, "db.rate_limit/rate_limits.consume/peek", body)


def test_token_bucket(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        args: dict[str, Any] = {
            "bucket": f"b{uuid.uuid4().hex[:10]}",
            "capacity": 5,
            "refill_per_second": 1.0,
            "tokens": 1,
        }
        _, value = pick(
            data,
            args,
            {
                "bucket": HOSTILE,
                "capacity": INTS,
                "refill_per_second": st.one_of(st.floats(), INTS),
                "tokens": INTS,
            },
        )

        async def write(uow: UnitOfWork) -> Any:
            kwargs = dict(args)
            return await uow.rate_limits.take(kwargs.pop("bucket"), **kwargs)

        async def verify(decision: Any) -> None:
            assert decision.limit == args["capacity"]
            rows = await h.admin.fetch(
                "SELECT tokens FROM api_rate_limits WHERE tenant_id = $1 AND resource_type = $2",
                h.tenant,
                args["bucket"],
            )
            assert len(rows) == (1 if decision.allowed else 0)

        return h.run(h.attempt(value, write, verify))

    prop(h, "rate_limits.take", body)


def test_unit_of_work_tenant_id(harness: Harness) -> None:
    h = harness

    def body(data: st.DataObject) -> str:
        value = data.draw(st.one_of(st.just(str(h.tenant)), st.just(h.tenant), HOSTILE))

        async def check() -> str:
            if value is None:  # neither a tenant nor a team: a usage error
                with pytest.raises(UsageError):
                    h.db.unit_of_work(value)
                return "rejected"
            try:
                uow = h.db.unit_of_work(value)  # type: ignore[arg-type]
            except ValidationError:
                return "rejected"
            if uuid.UUID(str(value)) == h.tenant:
                async with uow:
                    assert uow.tenant_id == h.tenant
            else:  # a well-formed id of no tenant
                with pytest.raises(TenantNotFound):
                    await _enter(uow)
            return "accepted"

        return h.run(check())

    prop(h, "db.unit_of_work(tenant_id)", body)
