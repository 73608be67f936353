"""InstallationStore and OAuthStateStore: slack_sdk's store semantics, case by case.

Each case of slack_sdk's own store tests (save and find, org-wide installs,
token rotation data, user and bot installations mixed, saving twice) is here
against the real database, plus what this store adds: tenants installed and
soft-deleted with the installs, one transaction per save, tokens encrypted,
single-use states.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio
from slack_sdk.oauth.installation_store import Installation
from slack_sdk.oauth.installation_store.models.bot import Bot

from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.errors import (
    ConfigurationError,
    SlackFathomDBError,
    ValidationError,
    sqlstate_of,
)
from slack_fathom_db.slack import InstallationStore, OAuthStateStore
from slack_fathom_db.testing import probe_outside
from slack_fathom_db.tokens import TokenDecryptionError
from tests.helpers import unique_enterprise_id, unique_team_id, unique_user_id


@pytest.fixture
def store(db: Database) -> InstallationStore:
    # A client id of its own per test: rows of other tests are never found.
    return InstallationStore(db, client_id=f"111.{uuid.uuid4().int % 10**9}")


@pytest.fixture
def ids() -> dict[str, str]:
    return {
        "E1": unique_enterprise_id(),
        "T1": unique_team_id(),
        "T2": unique_team_id(),
        "U1": unique_user_id(),
        "U2": unique_user_id(),
    }


def bot_installation(ids: dict[str, str], **overrides: object) -> Installation:
    values: dict[str, object] = {
        "app_id": "A111",
        "enterprise_id": ids["E1"],
        "team_id": ids["T1"],
        "user_id": ids["U1"],
        "bot_id": "B111",
        "bot_token": "xoxb-111",
        "bot_scopes": ["chat:write"],
        "bot_user_id": "U222",
    }
    values.update(overrides)
    return Installation(**values)  # type: ignore[arg-type]


async def test_save_and_find(store: InstallationStore, ids: dict[str, str]) -> None:
    e1, t1, t2, u1, u2 = ids["E1"], ids["T1"], ids["T2"], ids["U1"], ids["U2"]
    installation = bot_installation(ids)
    await store.async_save(installation)

    bot = await store.async_find_bot(enterprise_id=e1, team_id=t1)
    assert bot is not None
    assert bot.bot_token == "xoxb-111"
    assert bot.bot_scopes == ["chat:write"]
    assert await store.async_find_bot(enterprise_id=e1, team_id=t2) is None
    assert await store.async_find_bot(enterprise_id=None, team_id=t1) is None

    await store.async_delete_bot(enterprise_id=e1, team_id=t2)
    assert await store.async_find_bot(enterprise_id=e1, team_id=t2) is None
    assert await store.async_find_bot(enterprise_id=e1, team_id=t1) is not None  # untouched

    found = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert found is not None
    assert (found.team_id, found.user_id, found.bot_token) == (t1, u1, "xoxb-111")
    assert found.installed_at == pytest.approx(installation.installed_at, abs=1e-5)
    assert await store.async_find_installation(enterprise_id=e1, team_id=t2) is None
    assert await store.async_find_installation(enterprise_id=None, team_id=t1) is None

    assert await store.async_find_installation(enterprise_id=e1, team_id=t1, user_id=u1)
    assert await store.async_find_installation(enterprise_id=e1, team_id=t1, user_id=u2) is None
    assert await store.async_find_installation(enterprise_id=e1, team_id=t2, user_id=u1) is None

    await store.async_delete_installation(enterprise_id=e1, team_id=t1, user_id=u1)
    assert await store.async_find_installation(enterprise_id=e1, team_id=t1, user_id=u1) is None
    assert await store.async_find_installation(enterprise_id=e1, team_id=t1) is None

    await store.async_save(installation)
    await store.async_delete_all(enterprise_id=e1, team_id=t1)
    assert await store.async_find_installation(enterprise_id=e1, team_id=t1) is None
    assert await store.async_find_installation(enterprise_id=e1, team_id=t1, user_id=u1) is None
    assert await store.async_find_bot(enterprise_id=e1, team_id=t1) is None


async def test_org_installation(store: InstallationStore, ids: dict[str, str]) -> None:
    e1, t1, t2, u1 = ids["E1"], ids["T1"], ids["T2"], ids["U1"]
    installation = Installation(
        app_id="AO111",
        enterprise_id=e1,
        user_id=u1,
        bot_id="BO111",
        bot_token="xoxb-O111",
        bot_scopes=["chat:write"],
        bot_user_id="UO222",
        is_enterprise_install=True,
    )
    await store.async_save(installation)

    assert await store.async_find_bot(enterprise_id=e1, team_id=None) is not None
    # Any workspace of the organisation finds the org-wide bot...
    assert await store.async_find_bot(enterprise_id=e1, team_id=t2, is_enterprise_install=True)
    # ...but only when the request says the install is org-wide.
    assert await store.async_find_bot(enterprise_id=e1, team_id=t2) is None
    assert await store.async_find_bot(enterprise_id=None, team_id=t1) is None

    # A workspace's delete does not touch the org-wide install.
    await store.async_delete_bot(enterprise_id=e1, team_id=t2)
    assert await store.async_find_bot(enterprise_id=e1, team_id=None) is not None
    await store.async_delete_all(enterprise_id=e1, team_id=t2)
    assert await store.async_find_installation(enterprise_id=e1, team_id=None) is not None

    await store.async_delete_bot(enterprise_id=e1, team_id=None)
    assert await store.async_find_bot(enterprise_id=e1, team_id=None) is None

    found = await store.async_find_installation(enterprise_id=e1, team_id=None)
    assert found is not None
    assert found.is_enterprise_install is True
    assert found.team_id is None
    # The bot's token went with the bot: a revoked token is never handed out again.
    assert found.bot_token is None
    found = await store.async_find_installation(
        enterprise_id=e1, team_id=t1, is_enterprise_install=True
    )
    assert found is not None
    assert await store.async_find_installation(enterprise_id=e1, team_id=t2) is None
    assert await store.async_find_installation(enterprise_id=None, team_id=t1) is None

    assert await store.async_find_installation(enterprise_id=e1, team_id=None, user_id=u1)
    assert (
        await store.async_find_installation(
            enterprise_id=e1, team_id=t1, is_enterprise_install=True, user_id=unique_user_id()
        )
        is None
    )
    assert await store.async_find_installation(enterprise_id=None, team_id=t2, user_id=u1) is None

    await store.async_delete_installation(enterprise_id=e1, team_id=None)
    assert await store.async_find_installation(enterprise_id=e1, team_id=None) is None

    await store.async_save(installation)
    await store.async_delete_all(enterprise_id=e1, team_id=None)
    assert await store.async_find_installation(enterprise_id=e1, team_id=None) is None
    assert await store.async_find_installation(enterprise_id=e1, team_id=None, user_id=u1) is None
    assert await store.async_find_bot(enterprise_id=e1, team_id=None) is None


async def test_save_and_find_token_rotation_data(
    store: InstallationStore, ids: dict[str, str]
) -> None:
    e1, t1 = ids["E1"], ids["T1"]
    installation = bot_installation(
        ids,
        bot_token="xoxe.xoxb-1-initial",
        bot_refresh_token="xoxe-1-initial",
        bot_token_expires_in=43200,
    )
    await store.async_save(installation)
    bot = await store.async_find_bot(enterprise_id=e1, team_id=t1)
    assert bot is not None
    assert bot.bot_refresh_token == "xoxe-1-initial"
    assert bot.bot_token_expires_at == installation.bot_token_expires_at

    # Saved again with the same install moment (what a refresh saves): replaced, not added.
    refreshed = Installation(
        **{
            **installation.to_dict_for_copying(),
            "bot_token": "xoxe.xoxb-1-refreshed",
            "bot_refresh_token": "xoxe-1-refreshed",
        }
    )
    await store.async_save(refreshed)
    bot = await store.async_find_bot(enterprise_id=e1, team_id=t1)
    assert bot is not None
    assert bot.bot_refresh_token == "xoxe-1-refreshed"
    found = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert found is not None
    assert found.bot_token == "xoxe.xoxb-1-refreshed"
    assert await store.async_find_bot(enterprise_id=e1, team_id=ids["T2"]) is None
    assert await store.async_find_bot(enterprise_id=None, team_id=t1) is None


async def test_user_installation_after_bot_keeps_the_bot_token(
    store: InstallationStore, ids: dict[str, str]
) -> None:
    e1, t1, u1 = ids["E1"], ids["T1"], ids["U1"]
    await store.async_save(bot_installation(ids))
    found = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert found is not None
    assert found.bot_token == "xoxb-111"

    # A later installation of the same user with no bot token (user scopes only).
    await store.async_save(
        Installation(
            app_id="A111",
            enterprise_id=e1,
            team_id=t1,
            user_id=u1,
            bot_scopes=["openid"],
            user_token="xoxp-111",
        )
    )
    bot = await store.async_find_bot(enterprise_id=e1, team_id=t1)
    assert bot is not None
    assert bot.bot_token == "xoxb-111"
    found = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert found is not None
    assert (found.bot_token, found.user_token) == ("xoxb-111", "xoxp-111")
    assert await store.async_find_installation(enterprise_id=e1, team_id=ids["T2"]) is None
    assert await store.async_find_installation(enterprise_id=None, team_id=t1) is None


async def test_a_user_gets_the_newest_bot_token_with_their_own_user_token(
    store: InstallationStore, ids: dict[str, str]
) -> None:
    e1, t1, u1, u2 = ids["E1"], ids["T1"], ids["U1"], ids["U2"]
    await store.async_save(bot_installation(ids, user_token="xoxp-u1"))
    await asyncio.sleep(0.01)
    await store.async_save(bot_installation(ids, user_id=u2, bot_token="xoxb-newer"))
    mine = await store.async_find_installation(enterprise_id=e1, team_id=t1, user_id=u1)
    assert mine is not None
    assert (mine.user_id, mine.user_token, mine.bot_token) == (u1, "xoxp-u1", "xoxb-newer")
    newest = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert newest is not None
    assert (newest.user_id, newest.bot_token) == (u2, "xoxb-newer")


async def test_history_is_kept_and_the_newest_wins(
    store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    e1, t1 = ids["E1"], ids["T1"]
    for n in range(3):
        await store.async_save(bot_installation(ids, bot_token=f"xoxb-{n}", installed_at=1e9 + n))
    found = await store.async_find_installation(enterprise_id=e1, team_id=t1)
    assert found is not None
    assert found.bot_token == "xoxb-2"
    count = await admin.fetchval(
        "SELECT count(*) FROM slack_installations WHERE client_id = $1", store.client_id
    )
    assert count == 3


async def test_saving_twice_updates_the_same_row(
    store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    installation = bot_installation(ids)
    await store.async_save(installation)
    await store.async_save(installation)
    found = await store.async_find_installation(enterprise_id=ids["E1"], team_id=ids["T1"])
    assert found is not None
    assert found.app_id == "A111"
    for table in ("slack_installations", "slack_bots"):
        count = await admin.fetchval(
            f"SELECT count(*) FROM {table} WHERE client_id = $1",
            store.client_id,
        )
        assert count == 1, table


async def test_save_bot_alone(store: InstallationStore, ids: dict[str, str]) -> None:
    bot = Bot(
        app_id="A111",
        enterprise_id=None,
        team_id=ids["T1"],
        bot_token="xoxb-only",
        bot_id="B1",
        bot_user_id="U9",
        installed_at=time.time(),
    )
    await store.async_save_bot(bot)
    found = await store.async_find_bot(enterprise_id=None, team_id=ids["T1"])
    assert found is not None
    assert found.bot_token == "xoxb-only"
    assert await store.async_find_installation(enterprise_id=None, team_id=ids["T1"]) is None


async def test_save_installs_the_tenant_and_audits_it(
    db: Database, store: InstallationStore, ids: dict[str, str]
) -> None:
    await store.async_save(bot_installation(ids, team_name="Acme"))
    tenant = await db.directory.resolve(ids["T1"])
    assert tenant is not None
    async with db.unit_of_work(tenant) as uow:
        workspace = await uow.tenants.get()
        events = await uow.audit.recent()
    assert workspace is not None
    assert workspace.slack_team_name == "Acme"
    assert workspace.slack_enterprise_id == ids["E1"]
    assert [event.event_type for event in events] == ["slack.installed"]
    assert events[0].event_metadata["slack_user_id"] == ids["U1"]
    assert "xoxb" not in str(events[0])


async def test_uninstall_soft_deletes_the_tenant_and_reinstall_reactivates(
    db: Database, store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    await store.async_save(bot_installation(ids))
    tenant = await db.directory.resolve(ids["T1"])
    assert tenant is not None
    await store.async_delete_all(enterprise_id=ids["E1"], team_id=ids["T1"])
    assert await db.directory.resolve(ids["T1"]) is None
    rows = await admin.fetchval(
        "SELECT (SELECT count(*) FROM slack_installations WHERE tenant_id = $1) "
        "+ (SELECT count(*) FROM slack_bots WHERE tenant_id = $1)",
        tenant,
    )
    assert rows == 0
    events = await admin.fetch(
        "SELECT event_type, metadata FROM audit_logs WHERE tenant_id = $1 ORDER BY created_at",
        tenant,
    )
    assert [event["event_type"] for event in events] == ["slack.installed", "slack.uninstalled"]
    # Delivered twice: nothing more happens.
    await store.async_delete_all(enterprise_id=ids["E1"], team_id=ids["T1"])
    assert await admin.fetchval("SELECT count(*) FROM audit_logs WHERE tenant_id = $1", tenant) == 2

    await store.async_save(bot_installation(ids))
    assert await db.directory.resolve(ids["T1"]) == tenant


async def test_nothing_of_a_soft_deleted_tenant_is_found(
    db: Database, store: InstallationStore, ids: dict[str, str]
) -> None:
    await store.async_save(bot_installation(ids))
    await db.directory.uninstall(ids["T1"])
    assert await store.async_find_installation(enterprise_id=ids["E1"], team_id=ids["T1"]) is None
    assert await store.async_find_bot(enterprise_id=ids["E1"], team_id=ids["T1"]) is None


async def test_tokens_are_ciphertexts_in_the_database(
    store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    await store.async_save(
        bot_installation(
            ids,
            user_token="xoxp-secret-user",
            bot_refresh_token="xoxe-secret-refresh",
            incoming_webhook_url="https://hooks.slack.com/services/T/B/secret",
        )
    )
    dumped = await admin.fetchval(
        "SELECT string_agg(t::text, '|') FROM slack_installations t WHERE client_id = $1",
        store.client_id,
    )
    dumped += await admin.fetchval(
        "SELECT string_agg(t::text, '|') FROM slack_bots t WHERE client_id = $1", store.client_id
    )
    for secret in ("xoxb-111", "xoxp-secret-user", "xoxe-secret-refresh", "hooks.slack.com"):
        assert secret not in dumped
        assert secret.encode().hex() not in dumped


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
    store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    await store.async_save(bot_installation(ids, installed_at=1e9))
    await store.async_save(bot_installation(ids, bot_token="xoxb-other", installed_at=1e9 + 1))
    await admin.execute(
        "UPDATE slack_installations SET bot_token = (SELECT bot_token FROM slack_installations "
        "WHERE client_id = $1 ORDER BY installed_at LIMIT 1) WHERE client_id = $1 "
        "AND installed_at = to_timestamp(1e9 + 1)",
        store.client_id,
    )
    with pytest.raises(TokenDecryptionError) as caught:
        await store.async_find_installation(enterprise_id=ids["E1"], team_id=ids["T1"])
    assert "xoxb" not in str(caught.value)
    # The altered row goes, so that key rotation in later tests finds every row readable.
    await admin.execute(
        "DELETE FROM slack_installations "
        "WHERE client_id = $1 AND installed_at = to_timestamp(1e9 + 1)",
        store.client_id,
    )


async def test_bad_ids_are_refused_before_anything_is_written(
    store: InstallationStore, ids: dict[str, str]
) -> None:
    with pytest.raises(ValidationError):
        await store.async_save(bot_installation(ids, team_id="not a team"))
    with pytest.raises(ValidationError):
        await store.async_save(bot_installation(ids, enterprise_id=None, team_id=None))
    with pytest.raises(ValidationError):
        await store.async_find_installation(enterprise_id=None, team_id="T1'; --")


def test_a_store_without_a_key_refuses_to_start(settings: DatabaseSettings) -> None:
    keyless = Database(settings.model_copy(update={"token_keys": None}))
    with pytest.raises(ConfigurationError, match="DATABASE_TOKEN_KEYS"):
        InstallationStore(keyless, client_id="111.222")


def test_the_store_repr_shows_no_key(store: InstallationStore, settings: DatabaseSettings) -> None:
    assert settings.token_keys is not None
    key = settings.token_keys.get_secret_value().split(":", 1)[1]
    assert key not in repr(store)
    assert key not in repr(settings)


# -- OAuth states ------------------------------------------------------------------------


@pytest_asyncio.fixture
async def states(db: Database) -> AsyncIterator[OAuthStateStore]:
    yield OAuthStateStore(db, expiration_seconds=600)


async def test_a_state_is_consumed_once(states: OAuthStateStore) -> None:
    state = await states.async_issue()
    assert await states.async_consume(state) is True
    assert await states.async_consume(state) is False
    assert await states.async_consume("never-issued") is False
    assert await states.async_consume("") is False


async def test_concurrent_consumes_of_one_state_succeed_once(
    db: Database, states: OAuthStateStore
) -> None:
    for _ in range(5):
        state = await states.async_issue()
        results = await asyncio.gather(*(states.async_consume(state) for _ in range(8)))
        assert sorted(results) == [False] * 7 + [True]


async def test_an_expired_state_is_refused_and_purged(
    db: Database, admin: asyncpg.Connection
) -> None:
    short = OAuthStateStore(db, expiration_seconds=1)
    expired = await short.async_issue()
    stale = [await short.async_issue() for _ in range(3)]
    digests = [hashlib.sha256(state.encode()).digest() for state in (expired, *stale)]
    await admin.execute(
        "UPDATE slack_oauth_states SET expire_at = now() - interval '1 hour' "
        "WHERE state_digest = ANY($1::bytea[])",
        digests,
    )
    assert await short.async_consume(expired) is False  # refused, and gone
    await short.async_issue()  # purges (up to 100) expired states, the oldest first
    left = await admin.fetchval(
        "SELECT count(*) FROM slack_oauth_states WHERE state_digest = ANY($1::bytea[])", digests
    )
    assert left == 0
    assert not any([await short.async_consume(state) for state in stale])


async def test_states_are_kept_as_digests(
    states: OAuthStateStore, admin: asyncpg.Connection
) -> None:
    state = await states.async_issue()
    digest = hashlib.sha256(state.encode()).digest()
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM slack_oauth_states WHERE state_digest = $1", digest
        )
        == 1
    )
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM slack_oauth_states WHERE position($1::bytea in state_digest) > 0",
            state.encode(),
        )
        == 0
    )
    assert len(state) >= 43  # 32 random bytes


async def test_a_save_that_fails_part_way_writes_nothing(
    db: Database, store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    """The tenant, the installation, the bot and the audit event are one statement: a bot
    the database refuses (a constraint added for this test) leaves no tenant, no
    installation and no audit row behind."""
    await admin.execute(
        "ALTER TABLE slack_bots ADD CONSTRAINT ck_slack_bots_test_refuses CHECK (bot_id <> 'BFAIL')"
    )
    try:
        with pytest.raises(SlackFathomDBError):
            await store.async_save(bot_installation(ids, bot_id="BFAIL"))
    finally:
        await admin.execute("ALTER TABLE slack_bots DROP CONSTRAINT ck_slack_bots_test_refuses")
    assert await db.directory.resolve(ids["T1"]) is None
    assert (
        await admin.fetchval("SELECT count(*) FROM tenants WHERE slack_team_id = $1", ids["T1"])
        == 0
    )
    assert (
        await admin.fetchval(
            "SELECT count(*) FROM slack_installations WHERE client_id = $1", store.client_id
        )
        == 0
    )
    await store.async_save(bot_installation(ids))  # and the same install then succeeds
    assert await store.async_find_installation(enterprise_id=ids["E1"], team_id=ids["T1"])


async def test_a_ciphertext_copied_into_another_workspace_does_not_decrypt(
    db: Database, store: InstallationStore, ids: dict[str, str]
) -> None:
    """An attacker with the runtime login reads a victim's ciphertexts through the
    directory's lookup and saves them, with the victim's row id, as an installation of
    its own workspace: every ciphertext is bound to its tenant's key too, so the store
    refuses to open them there, and never hands out the victim's token."""
    victim, attacker = ids["T1"], ids["T2"]
    await store.async_save(bot_installation(ids, enterprise_id=None, bot_token="xoxb-victim"))
    found, _ = await probe_outside(
        db,
        f"SELECT id, bot_token FROM sfdb_find_slack_installation("
        f"'{store.client_id}', '{victim}', NULL, '{victim}', NULL)",
    )
    row_id, ciphertext = found.id, found.bot_token
    forged = {
        "id": str(row_id),
        "client_id": store.client_id,
        "team_id": attacker,
        "user_id": ids["U1"],
        "bot_token": "\\x" + bytes(ciphertext).hex(),
        "installed_at": "2099-01-01T00:00:00+00:00",
        "is_enterprise_install": False,
    }
    await probe_outside(
        db,
        f"SELECT sfdb_save_slack_installation('{attacker}', 'Attacker', NULL, "
        f"'{json.dumps(forged)}'::jsonb, NULL)",
    )
    with pytest.raises(TokenDecryptionError) as caught:
        await store.async_find_installation(enterprise_id=None, team_id=attacker)
    assert "xoxb-victim" not in str(caught.value)
    victims = await store.async_find_installation(enterprise_id=None, team_id=victim)
    assert victims is not None
    assert victims.bot_token == "xoxb-victim"


async def test_the_save_function_refuses_rows_of_another_workspace(
    db: Database, store: InstallationStore, ids: dict[str, str]
) -> None:
    row = {
        "id": str(uuid.uuid4()),
        "client_id": "x",
        "team_id": ids["T1"],
        "user_id": "U1",
        "installed_at": "2026-01-01T00:00:00+00:00",
    }
    with pytest.raises(SlackFathomDBError) as caught:
        await probe_outside(
            db,
            f"SELECT sfdb_save_slack_installation('{ids['T2']}', 'Other', NULL, "
            f"'{json.dumps(row)}'::jsonb, NULL)",
        )
    assert sqlstate_of(caught.value) == "22023"
    assert await db.directory.resolve(ids["T2"]) is None


async def test_one_apps_uninstall_leaves_another_apps_install_and_the_tenant(
    db: Database, ids: dict[str, str]
) -> None:
    first = InstallationStore(db, client_id=f"first.{uuid.uuid4().hex[:6]}")
    second = InstallationStore(db, client_id=f"second.{uuid.uuid4().hex[:6]}")
    t1 = ids["T1"]
    await first.async_save(bot_installation(ids, enterprise_id=None, bot_token="xoxb-first"))
    await second.async_save(bot_installation(ids, enterprise_id=None, bot_token="xoxb-second"))
    await first.async_delete_all(enterprise_id=None, team_id=t1)
    assert await first.async_find_installation(enterprise_id=None, team_id=t1) is None
    kept = await second.async_find_installation(enterprise_id=None, team_id=t1)
    assert kept is not None
    assert kept.bot_token == "xoxb-second"
    assert await db.directory.resolve(t1) is not None
    await second.async_delete_all(enterprise_id=None, team_id=t1)
    assert await db.directory.resolve(t1) is None  # the last app gone: the tenant too


async def test_revocations_after_the_tenant_was_removed_still_delete_the_tokens(
    db: Database, store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    t1 = ids["T1"]
    await store.async_save(bot_installation(ids, enterprise_id=None))
    await db.directory.uninstall(t1)  # e.g. the app's own listener ran first
    await store.async_delete_all(enterprise_id=None, team_id=t1)
    left = await admin.fetchval(
        "SELECT (SELECT count(*) FROM slack_installations WHERE client_id = $1) "
        "+ (SELECT count(*) FROM slack_bots WHERE client_id = $1)",
        store.client_id,
    )
    assert left == 0


async def test_the_newest_install_is_read_from_the_index_in_order(
    store: InstallationStore, ids: dict[str, str], admin: asyncpg.Connection
) -> None:
    """What Bolt's lookup runs, on a workspace with a long history (every user's own
    authorization is a row): the unique install index gives the newest row first, with no
    scan of the history and no sort."""
    await store.async_save(bot_installation(ids, enterprise_id=None))
    tenant = await admin.fetchval("SELECT id FROM tenants WHERE slack_team_id = $1", ids["T1"])
    await admin.execute(
        "INSERT INTO slack_installations (tenant_id, client_id, team_id, user_id, installed_at) "
        "SELECT $1, $2, $3, 'U' || n, now() - n * interval '1 minute' "
        "FROM generate_series(1, 2000) AS n",
        tenant,
        store.client_id,
        ids["T1"],
    )
    await admin.execute("ANALYZE slack_installations")
    plan = "\n".join(
        row[0]
        for row in await admin.fetch(
            "EXPLAIN SELECT * FROM slack_installations WHERE tenant_id = $1 AND client_id = $2 "
            "AND coalesce(enterprise_id, '') = coalesce($3::text, '') "
            "AND coalesce(team_id, '') = coalesce($4::text, '') "
            "ORDER BY installed_at DESC LIMIT 1",
            tenant,
            store.client_id,
            None,
            ids["T1"],
        )
    )
    assert "uq_slack_installations_install" in plan, plan
    assert "Sort" not in plan, plan
    found = await store.async_find_installation(enterprise_id=None, team_id=ids["T1"])
    assert found is not None
    assert found.user_id == ids["U1"]  # the saved one is the newest
