"""examples/bolt_app.py driven offline: signed requests through ``app.async_dispatch``, and
the multi-workspace app over HTTP.

Requests are signed the way Slack signs them (``v0:<timestamp>:<body>``,
HMAC-SHA256 with the signing secret). For ``create_app``, authorization is a
stub that returns an ``AuthorizeResult`` without asking Slack. The OAuth app
(``create_oauth_app``) runs in the aiohttp application ``main()`` serves, on
127.0.0.1 (Bolt's ``async_dispatch`` handles Slack's POSTs only; its install
and redirect pages are routes of that application), with the local fake of
Slack's Web API (``tests.fake_slack``) behind it: the tests play the
installer's browser and Slack. Any attempt to reach a host other than
127.0.0.1 fails the test. The database is the real, migrated test database;
rows are checked with the ``admin`` (superuser) connection, which RLS does not
filter.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from slack_bolt.async_app import AsyncApp, AsyncBoltRequest
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient
from yarl import URL

from examples.bolt_app import USAGE, create_app, create_oauth_app
from slack_fathom_db import Database, TenantId
from slack_fathom_db.slack import InstallationStore
from tests.fake_slack import FakeSlack, Workspace, fake_slack
from tests.helpers import unique_team_id, unique_user_id

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
TABLES = ("tenants", "users", "meeting_sessions", "audit_logs", "api_rate_limits")


# -- requests as Slack sends them -----------------------------------------------------


def signed_headers(
    body: str, *, content_type: str, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = f"v0:{ts}:{body}".encode()
    signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "content-type": content_type,
        "x-slack-request-timestamp": ts,
        "x-slack-signature": signature,
    }


def slash_command(
    team_id: str,
    user_id: str,
    text: str,
    *,
    response_url: str = "https://hooks.slack.com/commands/T0/1/abc",
) -> str:
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
            "response_url": response_url,
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


def tokens_revoked(team_id: str, *, bots: Sequence[str] = (), users: Sequence[str] = ()) -> str:
    return json.dumps(
        {
            "token": "deprecated-verification-token",
            "team_id": team_id,
            "api_app_id": "A0123456789",
            "event": {
                "type": "tokens_revoked",
                "tokens": {"oauth": list(users), "bot": list(bots)},
                "event_ts": f"{time.time():.6f}",
            },
            "type": "event_callback",
            "event_id": "Ev0123456790",
            "event_time": int(time.time()),
        }
    )


async def send(app: AsyncApp, body: str, headers: Mapping[str, str] | None = None) -> BoltResponse:
    if headers is None:
        headers = signed_headers(body, content_type=JSON if body.startswith("{") else FORM)
    return await app.async_dispatch(AsyncBoltRequest(body=body, headers=dict(headers)))


def reply_of(response: BoltResponse) -> dict[str, Any]:
    assert response.status == 200, response.body
    reply: dict[str, Any] = json.loads(response.body)
    assert reply["response_type"] == "ephemeral"
    return reply


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_slack_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail any HTTP call beyond 127.0.0.1 (Slack's Web API, a response_url): every aiohttp
    request passes here, and only the local fake of Slack and the app's own server answer."""
    attempts: list[str] = []
    request = aiohttp.ClientSession._request

    async def local_only(
        self: aiohttp.ClientSession, method: str, url: Any, **options: Any
    ) -> aiohttp.ClientResponse:
        if URL(str(url)).host == "127.0.0.1":
            return await request(self, method, url, **options)
        attempts.append(f"{method} {url}")
        raise AssertionError(f"network call attempted: {method} {url}")

    monkeypatch.setattr(aiohttp.ClientSession, "_request", local_only)
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


# -- the multi-workspace app: Bolt's OAuth flow on the layer's stores -----------------

STATE_COOKIE = "slack-app-oauth-state"
HTTP = TestClient[web.Request, web.Application]


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with fake_slack() as fake:
        yield fake


@pytest_asyncio.fixture
async def http(db: Database, slack: FakeSlack) -> AsyncIterator[HTTP]:
    """The OAuth app in the aiohttp application ``main()`` runs, served on 127.0.0.1."""
    app = create_oauth_app(
        db,
        signing_secret=SIGNING_SECRET,
        client_id=slack.client_id,
        client_secret=slack.client_secret,
        client=AsyncWebClient(base_url=slack.base_url),
        process_before_response=True,
    )
    server = TestServer(app.web_app(path="/slack/events"), host="127.0.0.1")
    # No cookie jar: each request says which state cookie its browser presents.
    async with TestClient(server, cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


@pytest.fixture
def store(db: Database, slack: FakeSlack) -> InstallationStore:
    """A store of its own, reading what the app's store wrote."""
    return InstallationStore(db, client_id=slack.client_id)


def new_workspace(name: str) -> Workspace:
    return Workspace(team_id=unique_team_id(), team_name=name, installer_user_id=unique_user_id())


async def begin_install(http: HTTP, slack: FakeSlack) -> str:
    """Open the install page: a link to Slack's authorize page with a state, and that state
    in a cookie; returns the state."""
    response = await http.get("/slack/install")
    page = await response.text()
    assert response.status == 200, page
    [link] = re.findall(r'<a href="([^"]+)"', page)
    url = urlsplit(html.unescape(link))
    assert (url.scheme, url.netloc, url.path) == ("https", "slack.com", "/oauth/v2/authorize")
    query = parse_qs(url.query)
    assert query["client_id"] == [slack.client_id]
    assert query["scope"] == ["commands,chat:write"]
    [state] = query["state"]
    cookie = response.cookies[STATE_COOKIE]
    assert cookie.value == state
    assert cookie["secure"] is True
    assert cookie["httponly"] is True
    return state


async def finish_install(
    http: HTTP, *, code: str, state: str, cookie: str | None = None
) -> aiohttp.ClientResponse:
    """Slack sends the installer back to the redirect URI; the browser presents its cookie."""
    return await http.get(
        "/slack/oauth_redirect",
        params={"code": code, "state": state},
        headers={"Cookie": f"{STATE_COOKIE}={state if cookie is None else cookie}"},
    )


async def install(
    http: HTTP,
    slack: FakeSlack,
    workspace: Workspace,
    *,
    state: str | None = None,
    tokens_before: int = 0,
) -> str:
    """A whole install of ``workspace`` (installed ``tokens_before`` times before); returns
    the bot token Slack issued for it now."""
    if state is None:
        state = await begin_install(http, slack)
    response = await finish_install(http, code=slack.authorize(workspace), state=state)
    page = await response.text()
    assert response.status == 200, page
    assert f"slack://app?team={workspace.team_id}&amp;id={workspace.app_id}" in page
    assert response.cookies[STATE_COOKIE].value == "deleted"
    *_, token = slack.tokens_issued(workspace.team_id)
    assert len(slack.tokens_issued(workspace.team_id)) == tokens_before + 1
    return token


async def post_signed(http: HTTP, body: str) -> aiohttp.ClientResponse:
    headers = signed_headers(body, content_type=JSON if body.startswith("{") else FORM)
    return await http.post("/slack/events", data=body.encode(), headers=headers)


async def command_reply(http: HTTP, body: str) -> dict[str, Any]:
    response = await post_signed(http, body)
    text = await response.text()
    assert response.status == 200, text
    reply: dict[str, Any] = json.loads(text)
    assert reply["response_type"] == "ephemeral"
    return reply


async def recorded_title(db: Database, tenant_id: TenantId, recording_id: str) -> str | None:
    async with db.unit_of_work(tenant_id) as uow:
        meeting = await uow.meetings.get_by_fathom_id(recording_id)
    return None if meeting is None else meeting.title


async def stored_tokens(admin: asyncpg.Connection, team_id: str) -> int:
    """Installation and bot rows kept for a workspace, whatever their tenant's state."""
    count: int = await admin.fetchval(
        "SELECT (SELECT count(*) FROM slack_installations WHERE team_id = $1) "
        "+ (SELECT count(*) FROM slack_bots WHERE team_id = $1)",
        team_id,
    )
    return count


async def test_workspaces_install_use_and_uninstall_the_oauth_app(
    http: HTTP,
    slack: FakeSlack,
    db: Database,
    store: InstallationStore,
    admin: asyncpg.Connection,
) -> None:
    acme, globex = new_workspace("Acme"), new_workspace("Globex")

    # Acme installs: the token Slack issued is stored, works, and the tenant exists.
    acme_token = await install(http, slack, acme)
    found = await store.async_find_installation(enterprise_id=None, team_id=acme.team_id)
    assert found is not None
    assert found.bot_token == acme_token
    assert slack.is_valid(acme_token)
    assert (found.team_name, found.user_id, found.bot_user_id, found.bot_id, found.app_id) == (
        "Acme",
        acme.installer_user_id,
        acme.bot_user_id,
        acme.bot_id,
        acme.app_id,
    )
    acme_tenant = await db.directory.resolve(acme.team_id)
    assert acme_tenant is not None
    async with db.unit_of_work(acme_tenant) as uow:
        tenant = await uow.tenants.get()
    assert tenant is not None
    assert tenant.slack_team_name == "Acme"

    # Globex installs too, as a tenant of its own.
    globex_token = await install(http, slack, globex)
    globex_tenant = await db.directory.resolve(globex.team_id)
    assert globex_tenant is not None
    assert globex_tenant != acme_tenant
    assert globex_token != acme_token

    # One recording id from each workspace: each request is authorized with its own
    # workspace's stored token, and each meeting lands in its own tenant.
    for workspace, token, title in (
        (acme, acme_token, "Acme sync"),
        (globex, globex_token, "Globex sync"),
    ):
        seen = len(slack.tokens_used("auth.test"))
        body = slash_command(
            workspace.team_id, unique_user_id(), f"123 {title}", response_url=slack.response_url
        )
        reply = await command_reply(http, body)
        assert reply["text"] == f"Recorded *{title}*; its notes will follow shortly."
        assert slack.tokens_used("auth.test")[seen:] == [token]
    assert await recorded_title(db, acme_tenant, "123") == "Acme sync"
    assert await recorded_title(db, globex_tenant, "123") == "Globex sync"

    # Acme uninstalls: Bolt's revocation listener deletes its tokens and soft-deletes
    # the tenant through the store, and the app's own listener does not run as well.
    response = await post_signed(http, app_uninstalled(acme.team_id))
    assert response.status == 200
    assert await db.directory.resolve(acme.team_id) is None
    assert await store.async_find_installation(enterprise_id=None, team_id=acme.team_id) is None
    assert await store.async_find_bot(enterprise_id=None, team_id=acme.team_id) is None
    assert await stored_tokens(admin, acme.team_id) == 0
    [event] = await audit_rows(admin, acme_tenant, "slack.uninstalled")
    assert event["event_category"] == "security"
    assert await audit_rows(admin, acme_tenant, "app.uninstalled") == []

    # Acme's /fathom now finds no installation: Bolt tells the user through the
    # response_url, calls no API with a token, and nothing is recorded.
    seen = len(slack.tokens_used("auth.test"))
    body = slash_command(
        acme.team_id, unique_user_id(), "124 After", response_url=slack.response_url
    )
    response = await post_signed(http, body)
    assert response.status == 200
    assert await response.text() == ""
    [message] = slack.responses
    assert "your installation with this app is no longer available" in message["text"]
    assert slack.tokens_used("auth.test")[seen:] == []
    assert [row["fathom_recording_id"] for row in await meetings(admin, acme_tenant)] == ["123"]

    # Globex is untouched.
    body = slash_command(
        globex.team_id, unique_user_id(), "124 Globex later", response_url=slack.response_url
    )
    reply = await command_reply(http, body)
    assert reply["text"] == "Recorded *Globex later*; its notes will follow shortly."
    assert await recorded_title(db, globex_tenant, "124") == "Globex later"
    assert await db.directory.resolve(globex.team_id) == globex_tenant
    assert await stored_tokens(admin, globex.team_id) > 0
    assert slack.is_valid(globex_token)


async def test_revoked_bot_tokens_are_deleted_and_the_workspace_stays(
    http: HTTP,
    slack: FakeSlack,
    db: Database,
    store: InstallationStore,
    admin: asyncpg.Connection,
) -> None:
    """``tokens_revoked`` (bot) through Bolt's listener: the bot's token is deleted,
    the copy kept with the installation too, so no request is authorized with it again;
    the tenant and its data stay, and installing again brings the workspace back."""
    acme = new_workspace("Acme")
    await install(http, slack, acme)
    tenant = await db.directory.resolve(acme.team_id)
    assert tenant is not None
    body = slash_command(
        acme.team_id, unique_user_id(), "201 Before", response_url=slack.response_url
    )
    assert (await command_reply(http, body))["text"].startswith("Recorded")

    response = await post_signed(http, tokens_revoked(acme.team_id, bots=[acme.bot_user_id]))
    assert response.status == 200
    assert await store.async_find_bot(enterprise_id=None, team_id=acme.team_id) is None
    found = await store.async_find_installation(enterprise_id=None, team_id=acme.team_id)
    assert found is not None
    assert found.bot_token is None
    assert await db.directory.resolve(acme.team_id) == tenant
    [event] = await audit_rows(admin, tenant, "slack.tokens_deleted")
    assert event["event_category"] == "security"

    seen = len(slack.tokens_used("auth.test"))
    body = slash_command(
        acme.team_id, unique_user_id(), "202 After", response_url=slack.response_url
    )
    response = await post_signed(http, body)
    assert response.status == 200
    assert slack.tokens_used("auth.test")[seen:] == []
    assert await recorded_title(db, tenant, "202") is None

    token = await install(http, slack, acme, tokens_before=1)
    body = slash_command(
        acme.team_id, unique_user_id(), "203 Again", response_url=slack.response_url
    )
    assert (await command_reply(http, body))["text"].startswith("Recorded")
    assert slack.tokens_used("auth.test")[-1] == token
    assert await db.directory.resolve(acme.team_id) == tenant
    assert await recorded_title(db, tenant, "201") == "Before"


@pytest.mark.parametrize("case", ["never-issued", "reused", "other-browser"])
async def test_a_callback_with_a_bad_state_saves_nothing(
    http: HTTP,
    slack: FakeSlack,
    db: Database,
    admin: asyncpg.Connection,
    case: str,
) -> None:
    store = InstallationStore(db, client_id=slack.client_id)
    workspace = new_workspace("Initech")
    state = cookie = await begin_install(http, slack)
    if case == "never-issued":  # what the browser holds, but not issued by this app
        state = cookie = secrets.token_urlsafe(32)
    elif case == "reused":  # a state is good for one install
        await install(http, slack, new_workspace("Hooli"), state=state)
    else:  # a state issued here, but to another browser
        cookie = await begin_install(http, slack)
    exchanges = len(slack.calls_to("oauth.v2.access"))

    response = await finish_install(
        http, code=slack.authorize(workspace), state=state, cookie=cookie
    )

    page = await response.text()
    if case == "other-browser":
        assert response.status == 400
        assert "invalid_browser" in page
    else:
        assert response.status == 401
        assert "invalid_state" in page
    assert len(slack.calls_to("oauth.v2.access")) == exchanges  # the code was never exchanged
    assert slack.tokens_issued(workspace.team_id) == []
    assert await db.directory.resolve(workspace.team_id) is None
    assert (
        await store.async_find_installation(enterprise_id=None, team_id=workspace.team_id) is None
    )
    assert await stored_tokens(admin, workspace.team_id) == 0
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM tenants WHERE slack_team_id = $1", workspace.team_id
        )
        == 0
    )
