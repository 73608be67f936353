"""Bolt's installation and OAuth-state stores on the tenant directory.

``InstallationStore`` implements slack_sdk's ``AsyncInstallationStore`` with
the semantics of its SQLAlchemy store (history kept, the newest install wins,
a user's installation found by ``user_id``, org-wide installs found for any
workspace of the organisation, the newest bot token even after a user-only
install), and closes its gaps:

* **Tenancy.** An installation belongs to a tenant: the workspace's, or for an
  org-wide install the organisation's (a tenant keyed by the enterprise id).
  Saving installs or reactivates that tenant. What Bolt looks up on every
  request runs through functions of the owner that the directory role may
  call for a workspace it names, like :meth:`TenantDirectory.resolve`; the
  rows themselves are tenant-owned and under row-level security.
* **Atomic.** A save (tenant, installation, bot, audit event) is one statement;
  a find is one statement, one round trip; so is each delete. ``app_uninstalled``
  deletes every token of the workspace and soft-deletes its tenant together;
  nothing of a soft-deleted tenant is found.
* **Encrypted.** Tokens and the webhook URL are stored as AES-GCM ciphertexts
  (:mod:`slack_fathom_db.tokens`), each bound to its table, column, tenant key
  and row: a ciphertext copied to another row or workspace does not decrypt.
  ``DATABASE_TOKEN_KEYS`` must be set, or the store refuses to start.
* **Single-flight refresh.** With ``client_secret``, a token that expires within
  ``token_rotation_expiration_minutes`` is refreshed by the store while it
  holds the row locks of the install: a second process asking at the same
  moment waits, then reads the token the first one stored (in one process,
  callers wait on a lock of their own, without a connection). The bot token
  and the user token are refreshed and stored one after the other, so a
  failure of the second never loses the first. Bolt's own rotation (same
  threshold by default) then finds nothing to do.

No in-process cache: a find is one indexed statement, and a cache would have
to be invalidated by every other process.

``OAuthStateStore`` implements ``AsyncOAuthStateStore``: a state is 32 random
bytes, stored as its SHA-256 digest; ``async_consume`` is one ``DELETE`` and
succeeds once, whoever races for it; issuing a state purges expired ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import uuid
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.oauth.installation_store.models.installation import Installation
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore
from slack_sdk.oauth.token_rotation.async_rotator import AsyncTokenRotator

from slack_fathom_db import validation
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.models.slack import SECRET_COLUMNS, SlackBot, SlackInstallation
from slack_fathom_db.repositories.installations import InstallationRepo
from slack_fathom_db.tenancy import open_tenant, tenant_id_from_trusted
from slack_fathom_db.tokens import TokenCipher, TokenDecryptionError, token_context

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import asyncpg
    from slack_sdk.web.async_client import AsyncWebClient

    from slack_fathom_db.database import Database
    from slack_fathom_db.runner import Runner
    from slack_fathom_db.tenancy import TenantId

__all__ = ["InstallationStore", "OAuthStateStore"]

_log = logging.getLogger(__name__)

_FIND_INSTALLATION: Final = "SELECT * FROM sfdb_find_slack_installation($1, $2, $3, $4, $5)"
_FIND_BOT: Final = "SELECT * FROM sfdb_find_slack_bot($1, $2, $3, $4)"
_SAVE: Final = "SELECT sfdb_save_slack_installation($1, $2, $3, $4::jsonb, $5::jsonb)"
_DELETE: Final = "SELECT sfdb_delete_slack_installations($1, $2, $3, $4, $5, $6)"
_ISSUE_STATE: Final = "SELECT sfdb_issue_slack_oauth_state($1, $2)"
_CONSUME_STATE: Final = "SELECT sfdb_consume_slack_oauth_state($1)"

_MAX_STATE: Final = 512


@dataclass(frozen=True, slots=True)
class _Address:
    """Where Bolt's ids point: the tenant's key, and the org/workspace as stored."""

    key: str
    enterprise_id: str | None
    team_id: str | None


def _address(
    enterprise_id: str | None, team_id: str | None, *, is_enterprise_install: bool | None
) -> _Address | None:
    """The tenant key of an org/workspace (``None``: nothing can be stored there).

    As in slack_sdk's stores, an org-wide install is stored without a team id,
    and is what a lookup with ``is_enterprise_install`` finds for any workspace.
    """
    enterprise = validation.slack_enterprise_id(enterprise_id)
    team = None if is_enterprise_install or team_id is None else validation.slack_team_id(team_id)
    key = team if team is not None else enterprise
    return None if key is None else _Address(key, enterprise, team)


class InstallationStore(AsyncInstallationStore):
    """Bolt's ``AsyncInstallationStore`` on the tenant directory (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        *,
        client_id: str,
        client_secret: str | None = None,
        token_rotation_expiration_minutes: int = 120,
        client: AsyncWebClient | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self._db = db
        self._cipher = TokenCipher.from_settings(db.settings)  # at start-up: no key, no store
        self.client_id = validation.text(client_id, field="client_id", max_length=255)
        self._minutes = validation.integer(
            token_rotation_expiration_minutes,
            field="token_rotation_expiration_minutes",
            minimum=0,
            maximum=24 * 60,
        )
        self._rotator = (
            None
            if client_secret is None
            else AsyncTokenRotator(client_id=client_id, client_secret=client_secret, client=client)
        )
        self._logger = logger or _log
        # One refresh at a time per org/workspace in this process: the others wait here,
        # holding no connection, then read what it stored.
        self._refreshing: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def __repr__(self) -> str:
        return f"InstallationStore(client_id={self.client_id!r}, cipher={self._cipher!r})"

    @property
    def logger(self) -> logging.Logger:
        """The logger Bolt reports to."""
        return self._logger

    # -- saving ----------------------------------------------------------------------

    async def async_save(self, installation: Installation) -> None:
        """Save an install: the tenant, the installation, its bot and an audit event, at once."""
        address = self._address_of(installation)
        row = self._installation_row(installation, address.key)
        bot = (
            None
            if installation.bot_token is None
            else self._bot_row(installation.to_bot(), address.key)
        )
        await self._save(address, installation.team_name or installation.enterprise_name, row, bot)

    async def async_save_bot(self, bot: Bot) -> None:
        """Save a bot (and its tenant, and an audit event) at once."""
        address = self._address_of(bot)
        await self._save(
            address, bot.team_name or bot.enterprise_name, None, self._bot_row(bot, address.key)
        )

    async def _save(
        self,
        address: _Address,
        name: str | None,
        installation: dict[str, Any] | None,
        bot: dict[str, Any] | None,
    ) -> None:
        team_name = validation.text(name or address.key, field="team_name", max_length=255)
        await self._db._fetch_outside(
            _SAVE,
            (
                address.key,
                team_name,
                address.enterprise_id,
                None if installation is None else json.dumps(installation),
                None if bot is None else json.dumps(bot),
            ),
            action="save Slack installation",
        )

    def _address_of(self, installed: Installation | Bot) -> _Address:
        address = _address(
            installed.enterprise_id,
            installed.team_id,
            is_enterprise_install=installed.is_enterprise_install,
        )
        if address is None:
            raise ValidationError("installation: a team_id, or an enterprise_id, is required")
        return address

    def _installation_row(self, installation: Installation, key: str) -> dict[str, Any]:
        row_id = uuid.uuid4()
        row = self._shared_row("slack_installations", installation, key, row_id)
        secret = self._sealer("slack_installations", key, row_id)
        row.update(
            enterprise_url=installation.enterprise_url,
            user_id=validation.slack_user_id(installation.user_id),
            user_scopes=_scopes(installation.user_scopes),
            user_token=secret("user_token", installation.user_token),
            user_refresh_token=secret("user_refresh_token", installation.user_refresh_token),
            user_token_expires_at=_iso(installation.user_token_expires_at),
            incoming_webhook_url=secret("incoming_webhook_url", installation.incoming_webhook_url),
            incoming_webhook_channel=installation.incoming_webhook_channel,
            incoming_webhook_channel_id=installation.incoming_webhook_channel_id,
            incoming_webhook_configuration_url=installation.incoming_webhook_configuration_url,
            token_type=installation.token_type,
        )
        return row

    def _bot_row(self, bot: Bot, key: str) -> dict[str, Any]:
        return self._shared_row("slack_bots", bot, key, uuid.uuid4())

    def _shared_row(
        self, table: str, installed: Installation | Bot, key: str, row_id: uuid.UUID
    ) -> dict[str, Any]:
        secret = self._sealer(table, key, row_id)
        return {
            "id": str(row_id),
            "client_id": self.client_id,
            "app_id": installed.app_id,
            "enterprise_id": validation.slack_enterprise_id(installed.enterprise_id),
            "enterprise_name": installed.enterprise_name,
            "team_id": None
            if installed.is_enterprise_install or installed.team_id is None
            else validation.slack_team_id(installed.team_id),
            "team_name": installed.team_name,
            "bot_id": installed.bot_id,
            "bot_user_id": installed.bot_user_id,
            "bot_scopes": _scopes(installed.bot_scopes),
            "bot_token": secret("bot_token", installed.bot_token),
            "bot_refresh_token": secret("bot_refresh_token", installed.bot_refresh_token),
            "bot_token_expires_at": _iso(installed.bot_token_expires_at),
            "is_enterprise_install": bool(installed.is_enterprise_install),
            "installed_at": _iso(installed.installed_at),
        }

    def _sealer(
        self, table: str, key: str, row_id: uuid.UUID
    ) -> Callable[[str, str | None], str | None]:
        def seal(column: str, value: str | None) -> str | None:
            if value is None:
                return None
            blob = self._cipher.encrypt(value, context=token_context(table, column, key, row_id))
            return "\\x" + blob.hex()  # bytea's input form, inside JSON

        return seal

    # -- finding ---------------------------------------------------------------------

    async def async_find_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        """The newest installation of the org/workspace (of ``user_id``, if given).

        One statement. When a user is named, or the installation has no bot
        token, the newest bot token of the org/workspace is put in (slack_sdk's
        semantics). A token about to expire is refreshed first, once across
        processes, when the store has a ``client_secret``.
        """
        address = _address(enterprise_id, team_id, is_enterprise_install=is_enterprise_install)
        if address is None:
            return None
        user = None if user_id is None else validation.slack_user_id(user_id)
        rows = await self._db._fetch_outside(
            _FIND_INSTALLATION,
            (self.client_id, address.key, address.enterprise_id, address.team_id, user),
            action="find Slack installation",
        )
        if not rows:
            return None
        row = rows[0]
        found = _Found(
            tenant_id_from_trusted(row["tenant_id"]),
            address.key,
            row["id"],
            self._installation(row, address.key),
            newest_bot=user is not None,
        )
        if found.newest_bot or found.installation.bot_token is None:
            # Decrypted only when it may be used.
            found = found.with_bot(self._bot(row, address.key, prefix="latest_"))
        if self._due(found.installation):
            return await self._refresh(found)
        return found.installation

    async def async_find_bot(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        is_enterprise_install: bool | None = False,
    ) -> Bot | None:
        """The newest bot of the org/workspace that has a token; one statement."""
        address = _address(enterprise_id, team_id, is_enterprise_install=is_enterprise_install)
        if address is None:
            return None
        rows = await self._db._fetch_outside(
            _FIND_BOT,
            (self.client_id, address.key, address.enterprise_id, address.team_id),
            action="find Slack bot",
        )
        if not rows:
            return None
        row = rows[0]
        bot = self._bot(row, address.key, prefix="")
        if bot is not None and self._due(bot):
            found = _Found(
                tenant_id_from_trusted(row["tenant_id"]),
                address.key,
                None,
                _installation_of_bot(bot),
            )
            return (await self._refresh(found)).to_bot()
        return bot

    def _installation(self, row: asyncpg.Record, key: str) -> Installation:
        open_ = self._opener("slack_installations", key, row, "")
        return Installation(
            app_id=row["app_id"],
            enterprise_id=row["enterprise_id"],
            enterprise_name=row["enterprise_name"],
            enterprise_url=row["enterprise_url"],
            team_id=row["team_id"],
            team_name=row["team_name"],
            bot_token=open_("bot_token"),
            bot_id=row["bot_id"],
            bot_user_id=row["bot_user_id"],
            bot_scopes=row["bot_scopes"] or "",
            bot_refresh_token=open_("bot_refresh_token"),
            bot_token_expires_at=row["bot_token_expires_at"],
            user_id=row["user_id"],
            user_token=open_("user_token"),
            user_scopes=row["user_scopes"] or "",
            user_refresh_token=open_("user_refresh_token"),
            user_token_expires_at=row["user_token_expires_at"],
            incoming_webhook_url=open_("incoming_webhook_url"),
            incoming_webhook_channel=row["incoming_webhook_channel"],
            incoming_webhook_channel_id=row["incoming_webhook_channel_id"],
            incoming_webhook_configuration_url=row["incoming_webhook_configuration_url"],
            is_enterprise_install=row["is_enterprise_install"],
            token_type=row["token_type"],
            installed_at=row["installed_at"].timestamp(),
        )

    def _bot(self, row: asyncpg.Record, key: str, *, prefix: str) -> Bot | None:
        """The bot of a row (``None``: no row, or a bot without a token, which is none)."""
        if row[f"{prefix}id"] is None:
            return None
        open_ = self._opener("slack_bots", key, row, prefix)
        token = open_("bot_token")
        if token is None:
            return None
        return Bot(
            app_id=row[f"{prefix}app_id"],
            enterprise_id=row[f"{prefix}enterprise_id"],
            enterprise_name=row[f"{prefix}enterprise_name"],
            team_id=row[f"{prefix}team_id"],
            team_name=row[f"{prefix}team_name"],
            bot_token=token,
            bot_id=row[f"{prefix}bot_id"],
            bot_user_id=row[f"{prefix}bot_user_id"],
            bot_scopes=row[f"{prefix}bot_scopes"] or "",
            bot_refresh_token=open_("bot_refresh_token"),
            bot_token_expires_at=row[f"{prefix}bot_token_expires_at"],
            is_enterprise_install=row[f"{prefix}is_enterprise_install"],
            installed_at=row[f"{prefix}installed_at"].timestamp(),
        )

    def _opener(
        self, table: str, key: str, row: asyncpg.Record, prefix: str
    ) -> Callable[[str], str | None]:
        row_id = row[f"{prefix}id"]

        def open_(column: str) -> str | None:
            blob = row[f"{prefix}{column}"]
            if blob is None:
                return None
            return self._cipher.decrypt(blob, context=token_context(table, column, key, row_id))

        return open_

    # -- refreshing ------------------------------------------------------------------

    def _due(self, installed: Installation | Bot) -> bool:
        """Whether a refreshable token of ``installed`` expires within the threshold."""
        if self._rotator is None:
            return False
        return _bot_due(installed, self._minutes) or (
            isinstance(installed, Installation) and _user_due(installed, self._minutes)
        )

    async def _refresh(self, found: _Found) -> Installation:
        """Refresh ``found``'s tokens once across processes; return what is stored after."""
        lock = self._refreshing.get(found.key)
        if lock is None:
            lock = self._refreshing[found.key] = asyncio.Lock()
        async with lock:
            db = self._db
            runner, tenant = await open_tenant(
                db._pool(),
                db.settings,
                key=db._tenant_key,
                tenant_id=found.tenant_id,
                slack_team_id=None,
            )
            try:
                return await self._refresh_locked(runner, tenant, found)
            finally:
                await runner.close(quiet=True)

    async def _refresh_locked(
        self, runner: Runner, tenant: TenantId, found: _Found
    ) -> Installation:
        """In the tenant's transaction: lock every row of the install (installations,
        then bots, each in id order, as the delete function does, so two lockers never
        wait for each other crosswise), read them again (another process may have
        refreshed while this one waited), and only if still due ask Slack for the bot
        token, then the user token, each stored in every row that held the old one; if
        the second fails, the first is committed before the error is raised."""
        rotator = self._rotator
        if rotator is None:  # pragma: no cover - _due() said so
            return found.installation
        repo = InstallationRepo(runner, tenant, self._db.settings)
        place = found.installation
        where = (self.client_id, place.enterprise_id, place.team_id)
        installations = self._readable(await repo.lock_installations(*where), found.key)
        bots = self._readable_bots(await repo.lock_bots(*where), found.key)
        current = found.reread(installations, bots)
        if current is None or not self._due(current.installation):
            await runner.commit()
            return found.installation if current is None else current.installation
        installation = current.installation
        stored = False
        if _bot_due(installation, self._minutes):
            bot = await rotator.perform_bot_token_rotation(
                bot=installation.to_bot(), minutes_before_expiration=self._minutes
            )
            if bot is not None:
                await self._store_bot(
                    repo, found.key, installation, bot, installations=installations, bots=bots
                )
                installation, stored = _with_bot_tokens(installation, bot), True
        if _user_due(installation, self._minutes):
            try:
                user = await rotator.perform_user_token_rotation(
                    installation=installation, minutes_before_expiration=self._minutes
                )
            except BaseException:
                if stored:  # Slack replaced the bot token already: keep the new one
                    await runner.commit()
                raise
            if user is not None:
                await self._store_user(repo, found.key, installation, user, installations)
                installation = user
        await runner.commit()
        _log.info("refreshed the Slack tokens of tenant %s", tenant)
        return installation

    def _readable(
        self, rows: list[asyncpg.Record], key: str
    ) -> list[tuple[asyncpg.Record, Installation]]:
        """Locked installation rows with their secrets opened; a row no key opens is skipped
        (it keeps what it has; ``sfdb rotate-token-keys`` names it)."""
        readable = []
        for row in rows:
            try:
                readable.append((row, self._installation(row, key)))
            except TokenDecryptionError:
                continue
        return readable

    def _readable_bots(
        self, rows: list[asyncpg.Record], key: str
    ) -> list[tuple[asyncpg.Record, Bot]]:
        readable = []
        for row in rows:
            try:
                bot = self._bot(row, key, prefix="")
            except TokenDecryptionError:
                continue
            if bot is not None:
                readable.append((row, bot))
        return readable

    async def _store_bot(
        self,
        repo: InstallationRepo,
        key: str,
        old: Installation,
        new: Bot,
        *,
        installations: list[tuple[asyncpg.Record, Installation]],
        bots: list[tuple[asyncpg.Record, Bot]],
    ) -> None:
        """Put the new bot token in every locked row that holds the old one."""
        values = {
            "bot_token": new.bot_token,
            "bot_refresh_token": new.bot_refresh_token,
            "bot_token_expires_at": _when(new.bot_token_expires_at),
        }
        for row, held in installations:
            if held.bot_token == old.bot_token:
                await repo.store_tokens(
                    SlackInstallation,
                    row["id"],
                    self._sealed("slack_installations", key, row["id"], values),
                )
        for row, held_bot in bots:
            if held_bot.bot_token == old.bot_token:
                await repo.store_tokens(
                    SlackBot, row["id"], self._sealed("slack_bots", key, row["id"], values)
                )

    async def _store_user(
        self,
        repo: InstallationRepo,
        key: str,
        old: Installation,
        new: Installation,
        installations: list[tuple[asyncpg.Record, Installation]],
    ) -> None:
        """Put the new user token in every locked installation that holds the old one."""
        values = {
            "user_token": new.user_token,
            "user_refresh_token": new.user_refresh_token,
            "user_token_expires_at": _when(new.user_token_expires_at),
        }
        for row, held in installations:
            if held.user_token == old.user_token:
                await repo.store_tokens(
                    SlackInstallation,
                    row["id"],
                    self._sealed("slack_installations", key, row["id"], values),
                )

    def _sealed(
        self, table: str, key: str, row_id: uuid.UUID, values: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            column: (
                self._cipher.encrypt(value, context=token_context(table, column, key, row_id))
                if column in SECRET_COLUMNS[table] and value is not None
                else value
            )
            for column, value in values.items()
        }

    # -- deleting --------------------------------------------------------------------

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """Delete the bots of the org/workspace, and the bot token kept with its installations."""
        await self._delete("bots", enterprise_id, team_id, None)

    async def async_delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        """Delete the installations of the org/workspace (only ``user_id``'s, if given)."""
        user = None if user_id is None else validation.slack_user_id(user_id)
        await self._delete("installations", enterprise_id, team_id, user)

    async def async_delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """The app was uninstalled: every token of the org/workspace goes and, once no app
        has anything left there, its tenant is soft-deleted, together (Bolt calls this on
        ``app_uninstalled``)."""
        await self._delete("uninstall", enterprise_id, team_id, None)

    async def _delete(
        self, what: str, enterprise_id: str | None, team_id: str | None, user_id: str | None
    ) -> None:
        address = _address(enterprise_id, team_id, is_enterprise_install=False)
        if address is None:
            return
        await self._db._fetch_outside(
            _DELETE,
            (self.client_id, address.key, address.enterprise_id, address.team_id, user_id, what),
            action="delete Slack installation",
        )


@dataclass(frozen=True, slots=True)
class _Found:
    """A found installation: its tenant, the row it came from, and how its bot was chosen."""

    tenant_id: TenantId
    key: str
    """The tenant's key (its ``slack_team_id``), which every ciphertext is bound to."""
    installation_id: uuid.UUID | None
    """``None``: a bot alone (``async_find_bot``), seen as an installation."""
    installation: Installation
    newest_bot: bool = False
    """The bot is the newest bot of the org/workspace, not the installation's own: a user
    was named (slack_sdk's rule; without a bot token of its own, the same applies)."""

    def with_bot(self, bot: Bot | None) -> _Found:
        """The installation with ``bot``'s token, if that differs from its own."""
        if bot is None or bot.bot_token == self.installation.bot_token:
            return self
        merged = _with_bot_tokens(self.installation, bot)
        merged.bot_id = bot.bot_id
        merged.bot_user_id = bot.bot_user_id
        merged.bot_scopes = bot.bot_scopes
        return _Found(self.tenant_id, self.key, self.installation_id, merged, self.newest_bot)

    def reread(
        self,
        installations: list[tuple[asyncpg.Record, Installation]],
        bots: list[tuple[asyncpg.Record, Bot]],
    ) -> _Found | None:
        """The same, from its rows read again under their locks (``None`` if they are gone).

        A row saved again since (the same install moment) has a new id: it is found
        by its install moment and user instead.
        """
        newest = max(bots, key=lambda pair: pair[0]["installed_at"], default=None)
        bot = None if newest is None else newest[1]
        if self.installation_id is None:
            if bot is None:
                return None
            return _Found(self.tenant_id, self.key, None, _installation_of_bot(bot))
        same = _first(held for row, held in installations if row["id"] == self.installation_id)
        if same is None:
            same = _first(
                held
                for _, held in installations
                if held.installed_at == self.installation.installed_at
                and held.user_id == self.installation.user_id
            )
        if same is None:
            return None
        found = _Found(self.tenant_id, self.key, self.installation_id, same, self.newest_bot)
        if found.newest_bot or same.bot_token is None:
            return found.with_bot(bot)
        return found


def _first(items: Iterable[Installation]) -> Installation | None:
    return next(iter(items), None)


def _bot_due(installed: Installation | Bot, minutes: int) -> bool:
    horizon = datetime.now(UTC).timestamp() + minutes * 60
    return (
        installed.bot_refresh_token is not None
        and installed.bot_token_expires_at is not None
        and installed.bot_token_expires_at <= horizon
    )


def _user_due(installation: Installation, minutes: int) -> bool:
    horizon = datetime.now(UTC).timestamp() + minutes * 60
    return (
        installation.user_refresh_token is not None
        and installation.user_token_expires_at is not None
        and installation.user_token_expires_at <= horizon
    )


def _with_bot_tokens(installation: Installation, bot: Bot) -> Installation:
    """A copy of ``installation`` with ``bot``'s token, refresh token and expiry."""
    copy = Installation(**installation.to_dict_for_copying())
    copy.bot_token = bot.bot_token
    copy.bot_refresh_token = bot.bot_refresh_token
    copy.bot_token_expires_at = bot.bot_token_expires_at
    return copy


def _installation_of_bot(bot: Bot) -> Installation:
    """A bot seen as an installation (for the rotator), as slack_sdk's ``Bot`` allows."""
    return Installation(
        app_id=bot.app_id,
        enterprise_id=bot.enterprise_id,
        enterprise_name=bot.enterprise_name,
        team_id=bot.team_id,
        team_name=bot.team_name,
        bot_token=bot.bot_token,
        bot_id=bot.bot_id,
        bot_user_id=bot.bot_user_id,
        bot_scopes=bot.bot_scopes,
        bot_refresh_token=bot.bot_refresh_token,
        bot_token_expires_at=bot.bot_token_expires_at,
        user_id=bot.bot_user_id,
        is_enterprise_install=bot.is_enterprise_install,
        installed_at=bot.installed_at,
    )


class OAuthStateStore(AsyncOAuthStateStore):
    """Bolt's ``AsyncOAuthStateStore``: single-use states, kept as digests, purged when expired."""

    def __init__(
        self, db: Database, *, expiration_seconds: int = 600, logger: logging.Logger | None = None
    ) -> None:
        self._db = db
        self.expiration_seconds = validation.integer(
            expiration_seconds, field="expiration_seconds", minimum=1, maximum=86_400
        )
        self._logger = logger or _log

    @property
    def logger(self) -> logging.Logger:
        """The logger Bolt reports to."""
        return self._logger

    async def async_issue(self, *args: Any, **kwargs: Any) -> str:
        """A new state, valid for ``expiration_seconds`` and for one consume."""
        state = secrets.token_urlsafe(32)
        await self._db._fetch_outside(
            _ISSUE_STATE, (_digest(state), self.expiration_seconds), action="issue OAuth state"
        )
        return state

    async def async_consume(self, state: str) -> bool:
        """Whether ``state`` was issued here, unexpired and unused; it is used up either way."""
        if not isinstance(state, str) or not state or len(state) > _MAX_STATE:
            return False
        (row,) = await self._db._fetch_outside(
            _CONSUME_STATE, (_digest(state),), action="consume OAuth state"
        )
        return bool(row[0])


def _digest(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


def _scopes(scopes: str | Sequence[str] | None) -> str:
    if scopes is None:
        return ""
    return scopes if isinstance(scopes, str) else ",".join(scopes)


def _when(value: float | int | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value, UTC)


def _iso(value: float | int | datetime | str | None) -> str | None:
    if isinstance(value, str):
        return value
    moment = _when(value)
    return None if moment is None else moment.isoformat()
