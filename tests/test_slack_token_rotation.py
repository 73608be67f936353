"""Token rotation: a refresh is single-flight across processes.

Slack's refresh tokens work once: two processes that refresh the same token
at the same moment leave one of them with a token that no longer works (the
first test shows the fake enforcing exactly that, with slack_sdk's own
rotator). The store refreshes under the installation's row lock, so of two
processes (two ``Database`` objects, each with its own pool and connections)
asking at once, one calls Slack and the other waits and reads what it stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from slack_sdk.errors import SlackTokenRotationError
from slack_sdk.oauth.installation_store import Installation
from slack_sdk.oauth.token_rotation.async_rotator import AsyncTokenRotator
from slack_sdk.web.async_client import AsyncWebClient

from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.slack import InstallationStore
from tests.fake_slack import FakeSlack, Workspace, fake_slack
from tests.helpers import unique_team_id, unique_user_id


@pytest_asyncio.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with fake_slack(rotate_tokens=True, expires_in=43_200, refresh_delay=0.2) as fake:
        yield fake


def _store(db: Database, fake: FakeSlack) -> InstallationStore:
    return InstallationStore(
        db,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
        client=AsyncWebClient(base_url=fake.base_url),
    )


async def _install_expiring(fake: FakeSlack, store: InstallationStore) -> tuple[str, Installation]:
    """An install whose bot token (issued by the fake) expires in a minute."""
    team = unique_team_id()
    workspace = Workspace(team_id=team, team_name="Acme", installer_user_id=unique_user_id())
    client = AsyncWebClient(base_url=fake.base_url)
    issued = await client.oauth_v2_access(
        client_id=fake.client_id, client_secret=fake.client_secret, code=fake.authorize(workspace)
    )
    installation = Installation(
        app_id=workspace.app_id,
        team_id=team,
        team_name="Acme",
        user_id=workspace.installer_user_id,
        bot_id=workspace.bot_id,
        bot_user_id=workspace.bot_user_id,
        bot_token=issued["access_token"],
        bot_refresh_token=issued["refresh_token"],
        bot_token_expires_at=int(time.time()) + 60,
        bot_scopes=["commands", "chat:write"],
    )
    await store.async_save(installation)
    return team, installation


async def test_two_uncoordinated_refreshes_leave_one_caller_with_a_dead_token(
    slack: FakeSlack, db: Database
) -> None:
    """Without a lock (slack_sdk's rotator, twice at once): one refresh fails, or one of the
    two new tokens is already invalid. This is what the store must prevent."""
    _, installation = await _install_expiring(slack, _store(db, slack))
    rotator = AsyncTokenRotator(
        client_id=slack.client_id,
        client_secret=slack.client_secret,
        client=AsyncWebClient(base_url=slack.base_url),
    )
    results = await asyncio.gather(
        *(rotator.perform_token_rotation(installation=installation) for _ in range(2)),
        return_exceptions=True,
    )
    failures = [result for result in results if isinstance(result, SlackTokenRotationError)]
    tokens = [result.bot_token for result in results if isinstance(result, Installation)]
    assert len(failures) + sum(not slack.is_valid(token or "") for token in tokens) == 1


@pytest_asyncio.fixture
async def second_process(settings: DatabaseSettings) -> AsyncIterator[Database]:
    """Another ``Database``: its own pool and connections, as another process would have."""
    other = Database(settings)  # its first connections are made during the race itself
    try:
        yield other
    finally:
        await other.dispose()


@pytest.mark.parametrize("callers", [2, 8])
async def test_concurrent_refreshes_call_slack_once_and_agree(
    slack: FakeSlack,
    db: Database,
    second_process: Database,
    admin: asyncpg.Connection,
    callers: int,
) -> None:
    stores = [_store(db, slack), _store(second_process, slack)]
    team, installation = await _install_expiring(slack, stores[0])
    found = await asyncio.gather(
        *(
            stores[n % 2].async_find_installation(enterprise_id=None, team_id=team)
            for n in range(callers)
        )
    )
    refreshes = [
        call
        for call in slack.calls_to("oauth.v2.access")
        if call.get("grant_type") == "refresh_token"
    ]
    assert len(refreshes) == 1
    tokens = {item.bot_token for item in found if item is not None}
    assert len(tokens) == 1
    (token,) = tokens
    assert token != installation.bot_token
    assert token is not None
    assert slack.is_valid(token)
    assert not slack.is_valid(installation.bot_token or "")
    # What is stored is that token, with the new refresh token and a later expiry.
    again = await stores[1].async_find_installation(enterprise_id=None, team_id=team)
    bot = await stores[1].async_find_bot(enterprise_id=None, team_id=team)
    assert again is not None
    assert bot is not None
    assert again.bot_token == bot.bot_token == token
    assert again.bot_refresh_token == bot.bot_refresh_token != installation.bot_refresh_token
    assert (again.bot_token_expires_at or 0) > time.time() + 3600
    tenant = await db.directory.resolve(team)
    events = await admin.fetch(
        "SELECT event_type FROM audit_logs WHERE tenant_id = $1 ORDER BY created_at", tenant
    )
    assert [row["event_type"] for row in events] == ["slack.installed"]


async def test_a_bot_only_lookup_refreshes_once_too(
    slack: FakeSlack, db: Database, second_process: Database
) -> None:
    stores = [_store(db, slack), _store(second_process, slack)]
    team, installation = await _install_expiring(slack, stores[0])
    bots = await asyncio.gather(
        *(stores[n % 2].async_find_bot(enterprise_id=None, team_id=team) for n in range(4))
    )
    refreshes = [
        c for c in slack.calls_to("oauth.v2.access") if c.get("grant_type") == "refresh_token"
    ]
    assert len(refreshes) == 1
    tokens = {bot.bot_token for bot in bots if bot is not None}
    assert len(tokens) == 1
    assert slack.is_valid(tokens.pop() or "")
    found = await stores[0].async_find_installation(enterprise_id=None, team_id=team)
    assert found is not None
    assert found.bot_token != installation.bot_token
    assert slack.is_valid(found.bot_token or "")


async def test_a_token_far_from_expiry_is_not_refreshed(slack: FakeSlack, db: Database) -> None:
    store = _store(db, slack)
    team, installation = await _install_expiring(slack, store)
    installation.bot_token_expires_at = int(time.time()) + 86_400
    await store.async_save(installation)
    found = await store.async_find_installation(enterprise_id=None, team_id=team)
    assert found is not None
    assert found.bot_token == installation.bot_token
    assert [
        c for c in slack.calls_to("oauth.v2.access") if c.get("grant_type") == "refresh_token"
    ] == []


async def test_without_a_client_secret_the_store_leaves_rotation_to_bolt(
    slack: FakeSlack, db: Database
) -> None:
    store = InstallationStore(db, client_id=slack.client_id)
    team, installation = await _install_expiring(slack, store)
    found = await store.async_find_installation(enterprise_id=None, team_id=team)
    assert found is not None
    assert found.bot_token == installation.bot_token
    assert found.bot_refresh_token == installation.bot_refresh_token
    assert all(c.get("grant_type") != "refresh_token" for c in slack.calls_to("oauth.v2.access"))


async def test_a_failed_refresh_stores_nothing_and_says_so(slack: FakeSlack, db: Database) -> None:
    store = _store(db, slack)
    team, installation = await _install_expiring(slack, store)
    broken = InstallationStore(
        db,
        client_id=store.client_id,
        client_secret="wrong-secret",
        client=AsyncWebClient(base_url=slack.base_url),
    )
    with pytest.raises(SlackTokenRotationError):
        await broken.async_find_installation(enterprise_id=None, team_id=team)
    found = await InstallationStore(db, client_id=store.client_id).async_find_installation(
        enterprise_id=None, team_id=team
    )
    assert found is not None
    assert found.bot_token == installation.bot_token


async def test_a_failed_user_refresh_keeps_the_bot_token_slack_already_replaced(
    slack: FakeSlack, db: Database
) -> None:
    """Both tokens due; Slack refreshes the bot token, then refuses the user's (its refresh
    token was spent elsewhere). The new bot token is stored before the error is raised:
    the old one no longer works, so losing the new one would lose the workspace."""
    store = _store(db, slack)
    team, installation = await _install_expiring(slack, store)
    workspace = Workspace(team_id=team, team_name="Acme", installer_user_id=installation.user_id)
    user = slack.issue_user_token(workspace)
    installation.user_token = user["access_token"]
    installation.user_refresh_token = "xoxe-1-spent-elsewhere"
    installation.user_token_expires_at = int(time.time()) + 60
    await store.async_save(installation)
    with pytest.raises(SlackTokenRotationError):
        await store.async_find_installation(enterprise_id=None, team_id=team)
    assert not slack.is_valid(installation.bot_token or "")
    kept = await InstallationStore(db, client_id=store.client_id).async_find_installation(
        enterprise_id=None, team_id=team
    )
    assert kept is not None
    assert kept.bot_token != installation.bot_token
    assert slack.is_valid(kept.bot_token or "")
    assert kept.user_token == installation.user_token  # left as it was


async def test_both_tokens_refresh_together(slack: FakeSlack, db: Database) -> None:
    store = _store(db, slack)
    team, installation = await _install_expiring(slack, store)
    workspace = Workspace(team_id=team, team_name="Acme", installer_user_id=installation.user_id)
    user = slack.issue_user_token(workspace)
    installation.user_token = user["access_token"]
    installation.user_refresh_token = user["refresh_token"]
    installation.user_token_expires_at = int(time.time()) + 60
    await store.async_save(installation)
    found = await store.async_find_installation(enterprise_id=None, team_id=team)
    assert found is not None
    assert found.bot_token != installation.bot_token
    assert found.user_token != installation.user_token
    assert slack.is_valid(found.bot_token or "")
    assert slack.is_valid(found.user_token or "")
    again = await InstallationStore(db, client_id=store.client_id).async_find_installation(
        enterprise_id=None, team_id=team
    )
    assert again is not None
    assert (again.bot_token, again.user_token) == (found.bot_token, found.user_token)


async def test_waiters_in_one_process_hold_no_connection(db: Database) -> None:
    """32 concurrent lookups of one due install in one process: while Slack answers the one
    refresh (1.5 s here, time for every lookup's own statement to be done, on a cluster
    too), the other lookups wait without a connection of their own (a row lock waited for
    in the database would hold one each)."""
    async with fake_slack(rotate_tokens=True, refresh_delay=1.5) as slow:
        await _waiters_hold_no_connection(db, slow)


async def _waiters_hold_no_connection(db: Database, slack: FakeSlack) -> None:
    store = _store(db, slack)
    team, _ = await _install_expiring(slack, store)

    def refreshes() -> int:
        return sum(
            c.get("grant_type") == "refresh_token" for c in slack.calls_to("oauth.v2.access")
        )

    async def while_slack_answers() -> int:
        for _ in range(1000):  # bounded: 5 s
            if refreshes():
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(1.0)  # the refresh is in flight; every lookup has run by now
        return db.pool_stats().checked_out

    lookups = asyncio.gather(
        *(store.async_find_installation(enterprise_id=None, team_id=team) for _ in range(32))
    )
    held, found = await asyncio.gather(while_slack_answers(), lookups)
    assert refreshes() == 1
    assert len({item.bot_token for item in found if item is not None}) == 1
    assert held == 1  # the refresh's own transaction
