"""examples/bolt_app.py driven offline: signed requests through ``app.async_dispatch``.

Requests are signed the way Slack signs them (``v0:<timestamp>:<body>``,
HMAC-SHA256 with the signing secret), authorization is a stub that returns an
``AuthorizeResult`` without asking Slack, and any attempt to reach the network
fails the test. The database is the real, migrated test database; rows are
checked with the ``admin`` (superuser) connection, which RLS does not filter.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from slack_bolt.async_app import AsyncApp, AsyncBoltRequest
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.response import BoltResponse

from examples.bolt_app import USAGE, create_app
from slack_fathom_db import Database, TenantId
from tests.helpers import unique_team_id, unique_user_id

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
Headers = dict[str, str | Sequence[str]]  # what AsyncBoltRequest takes
TABLES = ("tenants", "users", "meeting_sessions", "audit_logs", "api_rate_limits")


# -- requests as Slack sends them -----------------------------------------------------


def signed_headers(
    body: str, *, content_type: str, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> Headers:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = f"v0:{ts}:{body}".encode()
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "content-type": content_type,
        "x-slack-request-timestamp": ts,
        "x-slack-signature": signature,
    }


def slash_command(team_id: str, user_id: str, text: str) -> str:
    return urlencode(
        {
            "token": "deprecated-verification-token",
            "team_id": team_id,
            "team_domain": "acme",
            "channel_id": "C0123456789",
            "channel_name": "general",
            "user_id": user_id,
            "user_name": "ada",
            "command": "/fathom",
            "text": text,
            "api_app_id": "A0123456789",
            "response_url": "https://hooks.slack.com/commands/T0/1/abc",
            "trigger_id": "1.2.abc",
        }
    )


def app_uninstalled(team_id: str) -> str:
    return json.dumps(
        {
            "token": "deprecated-verification-token",
            "team_id": team_id,
            "api_app_id": "A0123456789",
            "event": {"type": "app_uninstalled", "event_ts": f"{time.time():.6f}"},
            "type": "event_callback",
            "event_id": "Ev0123456789",
            "event_time": int(time.time()),
        }
    )


async def send(app: AsyncApp, body: str, headers: Headers | None = None) -> BoltResponse:
    if headers is None:
        headers = signed_headers(body, content_type=JSON if body.startswith("{") else FORM)
    return await app.async_dispatch(AsyncBoltRequest(body=body, headers=headers))


def reply_of(response: BoltResponse) -> dict[str, Any]:
    assert response.status == 200, response.body
    reply: dict[str, Any] = json.loads(response.body)
    assert reply["response_type"] == "ephemeral"
    return reply


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_slack_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail any HTTP call (Web API, response_url): every aiohttp request lands here."""
    attempts: list[str] = []

    async def refuse(self: aiohttp.ClientSession, method: str, url: Any, **_: Any) -> None:
        attempts.append(f"{method} {url}")
        raise AssertionError(f"network call attempted: {method} {url}")

    monkeypatch.setattr(aiohttp.ClientSession, "_request", refuse)
    for name in ("SLACK_BOT_TOKEN", "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    yield attempts
    assert attempts == [], "the app tried to call Slack"


@pytest.fixture
def authorized() -> list[str | None]:
    """The team ids the stub authorize was asked about."""
    return []


def build_app(db: Database, authorized: list[str | None], *, meetings_per_day: int) -> AsyncApp:
    async def authorize(
        enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> AuthorizeResult:
        authorized.append(team_id)
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id,
            user_id=user_id,
            bot_token="xoxb-not-a-real-token",
            bot_id="B0123456789",
            bot_user_id="U0BOT000000",
        )

    return create_app(
        db,
        signing_secret=SIGNING_SECRET,
        authorize=authorize,
        meetings_per_day=meetings_per_day,
        process_before_response=True,
    )


@pytest.fixture
def app(db: Database, authorized: list[str | None]) -> AsyncApp:
    return build_app(db, authorized, meetings_per_day=5)


@pytest_asyncio.fixture
async def workspace(db: Database) -> tuple[str, TenantId]:
    team_id = unique_team_id()
    tenant_id = await db.directory.install(slack_team_id=team_id, slack_team_name="Acme")
    return team_id, tenant_id


# -- row helpers (superuser: sees every tenant's rows) --------------------------------


async def table_counts(admin: asyncpg.Connection) -> dict[str, int]:
    return {table: await admin.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES}


async def meetings(admin: asyncpg.Connection, tenant_id: TenantId) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT id, user_id, fathom_recording_id, title, status FROM meeting_sessions "
        "WHERE tenant_id = $1 ORDER BY created_at",
        tenant_id,
    )


async def audit_rows(
    admin: asyncpg.Connection, tenant_id: TenantId, event_type: str
) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT event_category, status, user_id, resource_type, resource_id, metadata "
        "FROM audit_logs WHERE tenant_id = $1 AND event_type = $2 ORDER BY created_at",
        tenant_id,
        event_type,
    )


async def quota_spent(admin: asyncpg.Connection, tenant_id: TenantId) -> int | None:
    """The tenant's daily meeting counter (summed over windows, so a run across midnight UTC
    still sees every charge of the test)."""
    count: int | None = await admin.fetchval(
        "SELECT sum(request_count) FROM api_rate_limits WHERE tenant_id = $1 "
        "AND resource_type = 'meetings_processed' AND period = 'daily'",
        tenant_id,
    )
    return count


# -- /fathom --------------------------------------------------------------------------


async def test_fathom_records_user_meeting_audit_and_quota(
    app: AsyncApp,
    workspace: tuple[str, TenantId],
    admin: asyncpg.Connection,
    authorized: list[str | None],
) -> None:
    team_id, tenant_id = workspace
    user_id = unique_user_id()

    reply = reply_of(await send(app, slash_command(team_id, user_id, "rec-1001 Weekly sync")))

    assert reply["text"] == "Recorded *Weekly sync*; its notes will follow shortly."
    assert authorized == [team_id]
    user = await admin.fetchrow(
        "SELECT id, role, deleted_at FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant_id,
        user_id,
    )
    assert user is not None
    assert user["role"] == "member"
    assert user["deleted_at"] is None
    [meeting] = await meetings(admin, tenant_id)
    assert meeting["fathom_recording_id"] == "rec-1001"
    assert meeting["title"] == "Weekly sync"
    assert meeting["status"] == "pending"
    assert meeting["user_id"] == user["id"]
    [event] = await audit_rows(admin, tenant_id, "meeting.created")
    assert event["event_category"] == "data"
    assert event["status"] == "success"
    assert event["user_id"] == user["id"]
    assert event["resource_type"] == "meeting_session"
    assert event["resource_id"] == str(meeting["id"])
    assert await quota_spent(admin, tenant_id) == 1


async def test_title_defaults_and_is_escaped_in_the_reply_only(
    app: AsyncApp, workspace: tuple[str, TenantId], admin: asyncpg.Connection
) -> None:
    team_id, tenant_id = workspace

    plain = reply_of(await send(app, slash_command(team_id, unique_user_id(), "rec-7")))
    odd = reply_of(await send(app, slash_command(team_id, unique_user_id(), "rec-8 <!here> & co")))

    assert plain["text"] == "Recorded *Fathom recording rec-7*; its notes will follow shortly."
    assert odd["text"] == "Recorded *&lt;!here&gt; &amp; co*; its notes will follow shortly."
    titles = {row["fathom_recording_id"]: row["title"] for row in await meetings(admin, tenant_id)}
    assert titles == {"rec-7": "Fathom recording rec-7", "rec-8": "<!here> & co"}


async def test_second_delivery_gives_one_meeting(
    app: AsyncApp, workspace: tuple[str, TenantId], admin: asyncpg.Connection
) -> None:
    team_id, tenant_id = workspace
    body = slash_command(team_id, unique_user_id(), "rec-2002 Pipeline review")

    first = reply_of(await send(app, body))
    second = reply_of(await send(app, body))

    assert first["text"].startswith("Recorded *Pipeline review*")
    assert second["text"] == "Already recorded: *Pipeline review*."
    assert len(await meetings(admin, tenant_id)) == 1
    assert len(await audit_rows(admin, tenant_id, "meeting.created")) == 1
    assert await admin.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1", tenant_id) == 1
    # db.rate_limit is committed before the unit of work looks at the meeting:
    # the duplicate spent quota too.
    assert await quota_spent(admin, tenant_id) == 2


async def test_concurrent_deliveries_give_one_meeting(
    app: AsyncApp, workspace: tuple[str, TenantId], admin: asyncpg.Connection
) -> None:
    team_id, tenant_id = workspace
    body = slash_command(team_id, unique_user_id(), "rec-3003 Kickoff")

    responses = await asyncio.gather(*(send(app, body) for _ in range(5)))

    texts = [reply_of(response)["text"] for response in responses]
    assert all(
        text
        in ("Recorded *Kickoff*; its notes will follow shortly.", "Already recorded: *Kickoff*.")
        for text in texts
    ), texts
    assert len(await meetings(admin, tenant_id)) == 1
    assert await admin.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1", tenant_id) == 1
    assert await quota_spent(admin, tenant_id) == 5


async def test_denied_rate_limit_writes_no_meeting(
    db: Database,
    authorized: list[str | None],
    workspace: tuple[str, TenantId],
    admin: asyncpg.Connection,
) -> None:
    app = build_app(db, authorized, meetings_per_day=1)
    team_id, tenant_id = workspace
    first_user, second_user = unique_user_id(), unique_user_id()

    reply_of(await send(app, slash_command(team_id, first_user, "rec-1 Allowed")))
    denied = reply_of(await send(app, slash_command(team_id, second_user, "rec-2 Denied")))

    assert denied["text"].startswith("Your workspace has recorded its 1 meetings for today.")
    assert "Try again in " in denied["text"]
    assert denied["text"].endswith(" UTC).")
    assert [row["fathom_recording_id"] for row in await meetings(admin, tenant_id)] == ["rec-1"]
    assert (
        await admin.fetchval("SELECT count(*) FROM users WHERE slack_user_id = $1", second_user)
        == 0
    )
    assert len(await audit_rows(admin, tenant_id, "meeting.created")) == 1
    assert await quota_spent(admin, tenant_id) == 1  # a denial spends nothing
    [refusal] = await audit_rows(admin, tenant_id, "rate_limit.denied")
    assert refusal["status"] == "denied"
    assert refusal["event_category"] == "security"
    assert json.loads(refusal["metadata"]) == {"slack_user_id": second_user, "limit": 1}


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (("r" * 300, None), "fathom_recording_id: must be at most 255 characters"),
        (("rec-4004 Demo", "not-a-slack-user"), "slack_user_id: must look like U0123ABCD"),
    ],
    ids=["recording-id-too-long", "malformed-user-id"],
)
async def test_validation_error_becomes_a_polite_reply(
    app: AsyncApp,
    workspace: tuple[str, TenantId],
    admin: asyncpg.Connection,
    command: tuple[str, str | None],
    message: str,
) -> None:
    team_id, tenant_id = workspace
    text, user_id = command

    reply = reply_of(await send(app, slash_command(team_id, user_id or unique_user_id(), text)))

    assert reply["text"] == f"Sorry, I couldn't record that: {message}"
    assert await meetings(admin, tenant_id) == []
    assert await admin.fetchval("SELECT count(*) FROM users WHERE tenant_id = $1", tenant_id) == 0
    assert await audit_rows(admin, tenant_id, "meeting.created") == []
    assert await quota_spent(admin, tenant_id) == 1  # spent before the unit of work failed


async def test_empty_command_gets_usage_and_writes_nothing(
    app: AsyncApp, workspace: tuple[str, TenantId], admin: asyncpg.Connection
) -> None:
    team_id, _ = workspace
    before = await table_counts(admin)

    reply = reply_of(await send(app, slash_command(team_id, unique_user_id(), "   ")))

    assert reply["text"] == USAGE
    assert await table_counts(admin) == before


async def test_unknown_workspace_writes_nothing(
    app: AsyncApp, admin: asyncpg.Connection, authorized: list[str | None]
) -> None:
    team_id, user_id = unique_team_id(), unique_user_id()
    before = await table_counts(admin)

    reply = reply_of(await send(app, slash_command(team_id, user_id, "rec-5005 Ghost")))

    assert reply["text"].startswith("This workspace isn't connected to Fathom notes.")
    assert authorized == [team_id]
    assert await table_counts(admin) == before
    assert (
        await admin.fetchval("SELECT count(*) FROM tenants WHERE slack_team_id = $1", team_id) == 0
    )


@pytest.mark.parametrize("tamper", ["wrong-secret", "altered-body", "stale-timestamp"])
async def test_bad_signature_is_rejected_and_writes_nothing(
    app: AsyncApp,
    workspace: tuple[str, TenantId],
    admin: asyncpg.Connection,
    authorized: list[str | None],
    tamper: str,
) -> None:
    team_id, _ = workspace
    body = slash_command(team_id, unique_user_id(), "rec-6006 Forged")
    if tamper == "wrong-secret":
        headers = signed_headers(body, content_type=FORM, secret="not-the-secret")
    elif tamper == "altered-body":
        headers = signed_headers(body, content_type=FORM)
        body = body.replace("Forged", "Altered")
    else:  # Slack's rule: older than five minutes is a replay
        headers = signed_headers(body, content_type=FORM, timestamp=int(time.time()) - 600)
    before = await table_counts(admin)

    response = await send(app, body, headers)

    assert response.status == 401
    assert json.loads(response.body) == {"error": "invalid request"}
    assert authorized == []
    assert await table_counts(admin) == before


# -- app_uninstalled ------------------------------------------------------------------


async def test_app_uninstalled_soft_deletes_the_tenant(
    app: AsyncApp, db: Database, workspace: tuple[str, TenantId], admin: asyncpg.Connection
) -> None:
    team_id, tenant_id = workspace
    reply_of(await send(app, slash_command(team_id, unique_user_id(), "rec-9 Before")))

    response = await send(app, app_uninstalled(team_id))

    assert response.status == 200
    assert await db.directory.resolve(team_id) is None
    deleted_at = await admin.fetchval("SELECT deleted_at FROM tenants WHERE id = $1", tenant_id)
    assert deleted_at is not None
    [event] = await audit_rows(admin, tenant_id, "app.uninstalled")
    assert event["event_category"] == "admin"
    assert event["resource_type"] == "tenant"
    assert event["resource_id"] == str(tenant_id)
    assert len(await meetings(admin, tenant_id)) == 1  # soft delete keeps the tenant's rows

    # Slack retries events: a second delivery is a quiet no-op.
    again = await send(app, app_uninstalled(team_id))
    assert again.status == 200
    assert len(await audit_rows(admin, tenant_id, "app.uninstalled")) == 1
    assert await admin.fetchval("SELECT deleted_at FROM tenants WHERE id = $1", tenant_id) == (
        deleted_at
    )

    # And the workspace is gone for /fathom too.
    after = reply_of(await send(app, slash_command(team_id, unique_user_id(), "rec-10 After")))
    assert after["text"].startswith("This workspace isn't connected to Fathom notes.")
    assert [row["fathom_recording_id"] for row in await meetings(admin, tenant_id)] == ["rec-9"]
