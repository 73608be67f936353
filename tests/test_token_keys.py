"""Token keys: parsing, the cipher, rotation to a new key (``sfdb rotate-token-keys``).

Rotation runs on the owner's side, like the purge; a store with only the new
key reads every token afterwards, and a store with only the old key reads
none. The CLI prints a new key, and never a token.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr
from slack_sdk.oauth.installation_store import Installation

from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.errors import ConfigurationError, ValidationError
from slack_fathom_db.maintenance import rotate_token_keys
from slack_fathom_db.slack import InstallationStore
from slack_fathom_db.tokens import TokenCipher, TokenDecryptionError, generate_key, parse_keys
from tests.helpers import unique_team_id, unique_user_id
from tests.test_cli import sfdb


def test_a_generated_key_parses_and_round_trips() -> None:
    keys = parse_keys(generate_key("k1") + "," + generate_key("k0"))
    assert [kid for kid, _ in keys] == ["k1", "k0"]
    cipher = TokenCipher(keys)
    sealed = cipher.encrypt("xoxb-1", context="t.c:1")
    assert b"xoxb" not in sealed
    assert cipher.decrypt(sealed, context="t.c:1") == "xoxb-1"
    assert cipher.is_current(sealed)
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(sealed, context="t.c:2")  # another row's
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(bytes(tampered), context="t.c:1")
    with pytest.raises(TokenDecryptionError):
        cipher.decrypt(b"\x01", context="t.c:1")


@pytest.mark.parametrize(
    "value",
    ["", "k1", "k1:short", "bad id!:" + "A" * 43, generate_key("k1") + "," + generate_key("k1")],
)
def test_bad_keys_are_refused_without_showing_them(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_keys(value)
    secret = value.partition(":")[2]
    assert not secret or secret[:20] not in str(caught.value)


async def _rows_of(admin: asyncpg.Connection, client_id: str) -> set[str]:
    """``table:id`` of every installation and bot row of ``client_id``."""
    rows = await admin.fetch(
        "SELECT 'slack_installations:' || id FROM slack_installations WHERE client_id = $1 "
        "UNION ALL SELECT 'slack_bots:' || id FROM slack_bots WHERE client_id = $1",
        client_id,
    )
    return {row[0] for row in rows}


def _installation(team: str, token: str) -> Installation:
    return Installation(
        team_id=team,
        user_id=unique_user_id(),
        bot_id="B1",
        bot_user_id="U1",
        bot_token=token,
        user_token=f"xoxp-{token}",
        incoming_webhook_url=f"https://hooks.slack.com/services/{token}",
    )


async def test_rotation_re_encrypts_every_secret_with_the_new_key(
    settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    old = settings.token_keys
    assert old is not None
    new_key = generate_key(f"k{uuid.uuid4().hex[:6]}")
    client_id = f"rot.{uuid.uuid4().hex[:8]}"
    teams = [unique_team_id() for _ in range(3)]
    async with Database(settings) as db:
        store = InstallationStore(db, client_id=client_id)
        for n, team in enumerate(teams):
            await store.async_save(_installation(team, f"xoxb-{n}"))
    both = settings.model_copy(
        update={"token_keys": SecretStr(new_key + "," + old.get_secret_value())}
    )
    back = settings.model_copy(
        update={"token_keys": SecretStr(old.get_secret_value() + "," + new_key)}
    )
    try:
        done = await rotate_token_keys(both, batch_size=2)
        assert done.key_id == new_key.split(":")[0]
        assert done.rows_rewritten >= 6  # 3 installations, 3 bots (other tests' rows too)
        assert not set(done.unreadable) & await _rows_of(admin, client_id)
        again = await rotate_token_keys(both)
        assert (again.rows_rewritten, again.secrets_rewritten) == (0, 0)

        only_new = settings.model_copy(update={"token_keys": SecretStr(new_key)})
        async with Database(only_new) as db:
            store = InstallationStore(db, client_id=client_id)
            for n, team in enumerate(teams):
                found = await store.async_find_installation(enterprise_id=None, team_id=team)
                assert found is not None
                assert (found.bot_token, found.user_token) == (f"xoxb-{n}", f"xoxp-xoxb-{n}")
                assert found.incoming_webhook_url == f"https://hooks.slack.com/services/xoxb-{n}"
        async with Database(settings) as db:  # the old key alone reads nothing any more
            store = InstallationStore(db, client_id=client_id)
            with pytest.raises(TokenDecryptionError, match="not configured"):
                await store.async_find_installation(enterprise_id=None, team_id=teams[0])
    finally:
        # The rows back under the suite's key, for the tests that run after this one.
        await rotate_token_keys(back)


def test_generate_token_key_prints_a_usable_key(tmp_path: Path) -> None:
    result = sfdb("generate-token-key", "--id", "prod-2026", url=None, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.split()
    assert [kid for kid, _ in parse_keys(line)] == ["prod-2026"]
    bad = sfdb("generate-token-key", "--id", "no spaces", url=None, cwd=tmp_path)
    assert bad.returncode == 2


def test_rotate_token_keys_from_the_cli(settings: DatabaseSettings, tmp_path: Path) -> None:
    assert settings.url is not None
    assert settings.migration_url is not None
    assert settings.token_keys is not None
    result = sfdb(
        "rotate-token-keys",
        url=settings.url.get_secret_value(),
        cwd=tmp_path,
        extra_env={
            "DATABASE_MIGRATION_URL": settings.migration_url.get_secret_value(),
            "DATABASE_TOKEN_KEYS": settings.token_keys.get_secret_value(),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "re-encrypted with key test" in result.stdout
    assert settings.token_keys.get_secret_value().split(":")[1] not in result.stdout + result.stderr
    assert "xoxb" not in result.stdout + result.stderr


def test_rotate_token_keys_without_a_key_is_one_line(
    settings: DatabaseSettings, tmp_path: Path
) -> None:
    assert settings.url is not None
    result = sfdb("rotate-token-keys", url=settings.url.get_secret_value(), cwd=tmp_path)
    assert result.returncode == 1
    assert "DATABASE_TOKEN_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_rotation_leaves_an_unreadable_row_and_names_it(
    settings: DatabaseSettings, admin: asyncpg.Connection
) -> None:
    client_id = f"rot.{uuid.uuid4().hex[:8]}"
    team = unique_team_id()
    async with Database(settings) as db:
        await InstallationStore(db, client_id=client_id).async_save(_installation(team, "xoxb-u"))
    # The bot's ciphertext, moved into the installation's user token: a valid ciphertext,
    # of the right key, bound to another row.
    moved = await admin.fetchval("SELECT bot_token FROM slack_bots WHERE client_id = $1", client_id)
    row_id = await admin.fetchval(
        "UPDATE slack_installations SET user_token = $2 WHERE client_id = $1 RETURNING id",
        client_id,
        moved,
    )
    assert settings.token_keys is not None
    suite_key, new_key = settings.token_keys.get_secret_value(), generate_key("k-new")
    try:
        both = settings.model_copy(update={"token_keys": SecretStr(f"{new_key},{suite_key}")})
        done = await rotate_token_keys(both)
        assert f"slack_installations:{row_id}" in done.unreadable
        assert len(set(done.unreadable) & await _rows_of(admin, client_id)) == 1
        assert suite_key.split(":")[1] not in str(done)
    finally:
        await admin.execute("DELETE FROM slack_installations WHERE id = $1", row_id)
        back = settings.model_copy(update={"token_keys": SecretStr(f"{suite_key},{new_key}")})
        await rotate_token_keys(back)


def test_the_store_validates_its_own_arguments(db: Database) -> None:
    with pytest.raises(ValidationError):
        InstallationStore(db, client_id="")
    with pytest.raises(ValidationError):
        InstallationStore(db, client_id="1.2", token_rotation_expiration_minutes=-1)
