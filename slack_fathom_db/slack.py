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
  (:mod:`slack_fathom_db.tokens`); ``DATABASE_TOKEN_KEYS`` must be set, or the
  store refuses to start.
* **Single-flight refresh.** With ``client_secret``, a token that expires within
  ``token_rotation_expiration_minutes`` is refreshed by the store while it
  holds the installation's row lock: a second process asking at the same
  moment waits, then reads the token the first one stored. Bolt's own
  rotation (same threshold by default) then finds nothing to do.

No in-process cache: a find is one indexed statement, and a cache would have
to be invalidated by every other process.

``OAuthStateStore`` implements ``AsyncOAuthStateStore``: a state is 32 random
bytes, stored as its SHA-256 digest; ``async_consume`` is one ``DELETE`` and
succeeds once, whoever races for it; issuing a state purges expired ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import uuid
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
from slack_fathom_db.tokens import TokenCipher

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import asyncpg
    from slack_sdk.web.async_client import AsyncWebClient

    from slack_fathom_db.database import Database
    from slack_fathom_db.tenancy import TenantId

__all__ = ["InstallationStore", "OAuthStateStore"]

_log = logging.getLogger(__name__)

_FIND_INSTALLATION: Final = "SELECT * FROM sfdb_find_slack_installation($1, $2, $3, $4, $5)"
_FIND_BOT: Final = "SELECT * FROM sfdb_find_slack_bot($1, $2, $3, $4)"
_SAVE: Final = "SELECT sfdb_save_slack_installation($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb)"
_DELETE: Final = "SELECT sfdb_delete_slack_installations($1, $2, $3, $4, $5, $6, $7::jsonb)"
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
            maximum=7 * 24 * 60,
        )
        self._rotator = (
            None
            if client_secret is None
            else AsyncTokenRotator(client_id=client_id, client_secret=client_secret, client=client)
        )
        self._logger = logger or _log

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
        row_id = uuid.uuid4()
        row = self._installation_row(installation, row_id)
        bot = None if installation.bot_token is None else self._bot_row(installation.to_bot())
        event = _event(
            "slack.installed",
            "Slack app installed" if bot is not None else "Slack user authorized the app",
            resource_id=row_id,
            metadata={
                "slack_user_id": installation.user_id,
                "is_enterprise_install": bool(installation.is_enterprise_install),
                "bot_scopes": _scopes(installation.bot_scopes),
                "user_scopes": _scopes(installation.user_scopes),
            },
        )
        await self._save(
            address, installation.team_name or installation.enterprise_name, row, bot, event
        )

    async def async_save_bot(self, bot: Bot) -> None:
        """Save a bot (and its tenant, and an audit event) at once."""
        address = self._address_of(bot)
        row = self._bot_row(bot)
        event = _event(
            "slack.bot_saved",
            "Slack bot token saved",
            resource_id=row["id"],
            metadata={"is_enterprise_install": bool(bot.is_enterprise_install)},
        )
        await self._save(address, bot.team_name or bot.enterprise_name, None, row, event)

    async def _save(
        self,
        address: _Address,
        name: str | None,
        installation: dict[str, Any] | None,
        bot: dict[str, Any] | None,
        event: dict[str, Any],
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
                json.dumps(event),
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

    def _installation_row(self, installation: Installation, row_id: uuid.UUID) -> dict[str, Any]:
        row = self._shared_row("slack_installations", installation, row_id)
        secret = self._sealer("slack_installations", row_id)
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

    def _bot_row(self, bot: Bot) -> dict[str, Any]:
        return self._shared_row("slack_bots", bot, uuid.uuid4())

    def _shared_row(
        self, table: str, installed: Installation | Bot, row_id: uuid.UUID
    ) -> dict[str, Any]:
        secret = self._sealer(table, row_id)
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

    def _sealer(self, table: str, row_id: uuid.UUID) -> Callable[[str, str | None], str | None]:
        def seal(column: str, value: str | None) -> str | None:
            if value is None:
                return None
            blob = self._cipher.encrypt(value, context=_context(table, column, row_id))
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
            row["id"],
            self._installation(row),
            newest_bot=user is not None,
        )
        if found.newest_bot or found.installation.bot_token is None:
            # Decrypted only when it may be used.
            found = found.with_bot(self._bot(row, prefix="latest_"))
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
        bot = self._bot(row, prefix="")
        if bot is not None and self._due(bot):
            found = _Found(
                tenant_id_from_trusted(row["tenant_id"]), None, _installation_of_bot(bot)
            )
            refreshed = await self._refresh(found)
            return refreshed.to_bot()
        return bot

    def _installation(self, row: asyncpg.Record) -> Installation:
        row_id = row["id"]
        open_ = self._opener("slack_installations", row_id, row, "")
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

    def _bot(self, row: asyncpg.Record, *, prefix: str) -> Bot | None:
        """The bot of a row (``None``: no row, or a bot without a token, which is none)."""
        row_id = row[f"{prefix}id"]
        if row_id is None:
            return None
        open_ = self._opener("slack_bots", row_id, row, prefix)
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
        self, table: str, row_id: uuid.UUID, row: asyncpg.Record, prefix: str
    ) -> Callable[[str], str | None]:
        def open_(column: str) -> str | None:
            blob = row[f"{prefix}{column}"]
            if blob is None:
                return None
            return self._cipher.decrypt(blob, context=_context(table, column, row_id))

        return open_

    # -- refreshing ------------------------------------------------------------------

    def _due(self, installed: Installation | Bot) -> bool:
        """Whether a refreshable token of ``installed`` expires within the threshold."""
        if self._rotator is None:
            return False
        horizon = datetime.now(UTC).timestamp() + self._minutes * 60
        bot_due = (
            installed.bot_refresh_token is not None
            and installed.bot_token_expires_at is not None
            and installed.bot_token_expires_at <= horizon
        )
        user_due = (
            isinstance(installed, Installation)
            and installed.user_refresh_token is not None
            and installed.user_token_expires_at is not None
            and installed.user_token_expires_at <= horizon
        )
        return bot_due or user_due

    async def _refresh(self, found: _Found) -> Installation:
        """Refresh ``found``'s tokens once across processes; return what is stored after.

        In the tenant's transaction: lock every row of the install's org/workspace
        (installations, then bots, each in id order, so two refreshers never wait
        for each other crosswise), read them again (another process may have
        refreshed while this one waited), and only if still due ask Slack, and
        store the new tokens in every row that held the old ones before the
        locks are released.
        """
        if self._rotator is None:  # pragma: no cover - _due() said so
            return found.installation
        db = self._db
        runner, tenant = await open_tenant(
            db._pool(), db.settings, tenant_id=found.tenant_id, slack_team_id=None
        )
        try:
            repo = InstallationRepo(runner, tenant, db.settings)
            place = found.installation
            where = (self.client_id, place.enterprise_id, place.team_id)
            installations = await repo.lock_installations(*where)
            bots = await repo.lock_bots(*where)
            current = found.reread(self, installations, bots)
            if current is None or not self._due(current.installation):
                await runner.commit()
                return found.installation if current is None else current.installation
            refreshed = await self._rotator.perform_token_rotation(
                installation=current.installation, minutes_before_expiration=self._minutes
            )
            if refreshed is None:
                await runner.commit()
                return current.installation
            await self._store(repo, current.installation, refreshed, installations, bots)
            await runner.commit()
            _log.info("refreshed the Slack tokens of tenant %s", tenant)
            return refreshed
        finally:
            await runner.close(quiet=True)

    async def _store(
        self,
        repo: InstallationRepo,
        old: Installation,
        new: Installation,
        installations: list[asyncpg.Record],
        bots: list[asyncpg.Record],
    ) -> None:
        """Put ``new``'s tokens in every locked row that holds ``old``'s."""
        bot_values = {
            "bot_token": new.bot_token,
            "bot_refresh_token": new.bot_refresh_token,
            "bot_token_expires_at": _when(new.bot_token_expires_at),
        }
        user_values = {
            "user_token": new.user_token,
            "user_refresh_token": new.user_refresh_token,
            "user_token_expires_at": _when(new.user_token_expires_at),
        }
        bot_changed = new.bot_token != old.bot_token and old.bot_token is not None
        user_changed = new.user_token != old.user_token and old.user_token is not None
        for row in installations:
            held = self._installation(row)
            values: dict[str, Any] = {}
            if bot_changed and held.bot_token == old.bot_token:
                values.update(bot_values)
            if user_changed and held.user_token == old.user_token:
                values.update(user_values)
            if values:
                sealed = self._sealed("slack_installations", row["id"], values)
                await repo.store_tokens(SlackInstallation, row["id"], sealed)
        for row in bots:
            held_bot = self._bot(row, prefix="")
            if bot_changed and held_bot is not None and held_bot.bot_token == old.bot_token:
                sealed = self._sealed("slack_bots", row["id"], bot_values)
                await repo.store_tokens(SlackBot, row["id"], sealed)

    def _sealed(self, table: str, row_id: uuid.UUID, values: dict[str, Any]) -> dict[str, Any]:
        return {
            column: (
                self._cipher.encrypt(value, context=_context(table, column, row_id))
                if column in SECRET_COLUMNS[table] and value is not None
                else value
            )
            for column, value in values.items()
        }

    # -- deleting --------------------------------------------------------------------

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """Delete the bots of the org/workspace, and the bot token kept with its installations."""
        await self._delete("bots", enterprise_id, team_id, None, "Slack bot tokens revoked")

    async def async_delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        """Delete the installations of the org/workspace (only ``user_id``'s, if given)."""
        user = None if user_id is None else validation.slack_user_id(user_id)
        await self._delete("installations", enterprise_id, team_id, user, "Slack tokens revoked")

    async def async_delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """The app was uninstalled: every token of the org/workspace goes, and its tenant is
        soft-deleted, together (Bolt calls this on ``app_uninstalled``)."""
        await self._delete(
            "uninstall", enterprise_id, team_id, None, "Slack app uninstalled; tokens deleted"
        )

    async def _delete(
        self,
        what: str,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None,
        description: str,
    ) -> None:
        address = _address(enterprise_id, team_id, is_enterprise_install=False)
        if address is None:
            return
        event = _event(
            "slack.uninstalled" if what == "uninstall" else "slack.tokens_deleted",
            description,
            category="security",
            metadata={} if user_id is None else {"slack_user_id": user_id},
        )
        await self._db._fetch_outside(
            _DELETE,
            (
                self.client_id,
                address.key,
                address.enterprise_id,
                address.team_id,
                user_id,
                what,
                json.dumps(event),
            ),
            action="delete Slack installation",
        )


@dataclass(frozen=True, slots=True)
class _Found:
    """A found installation: its tenant, the row it came from, and how its bot was chosen."""

    tenant_id: TenantId
    installation_id: uuid.UUID | None
    """``None``: a bot alone (``async_find_bot``), seen as an installation."""
    installation: Installation
    newest_bot: bool = False
    """The bot is the newest bot of the org/workspace, not the installation's own: a user
    was named (slack_sdk's rule; without a bot token of its own, the same applies)."""

    def with_bot(self, bot: Bot | None) -> _Found:
        """The installation with ``bot``'s token, if that differs from its own."""
        installation = self.installation
        if bot is None or bot.bot_token == installation.bot_token:
            return self
        merged = Installation(**installation.to_dict_for_copying())
        merged.bot_id = bot.bot_id
        merged.bot_user_id = bot.bot_user_id
        merged.bot_token = bot.bot_token
        merged.bot_scopes = bot.bot_scopes
        merged.bot_refresh_token = bot.bot_refresh_token
        merged.bot_token_expires_at = bot.bot_token_expires_at
        return _Found(self.tenant_id, self.installation_id, merged, self.newest_bot)

    def reread(
        self,
        store: InstallationStore,
        installations: list[asyncpg.Record],
        bots: list[asyncpg.Record],
    ) -> _Found | None:
        """The same, from its rows read again under their locks (``None`` if they are gone)."""
        bot_row = _newest(row for row in bots if row["bot_token"] is not None)
        bot = None if bot_row is None else store._bot(bot_row, prefix="")
        if self.installation_id is None:
            if bot is None:
                return None
            return _Found(self.tenant_id, None, _installation_of_bot(bot))
        row = next((row for row in installations if row["id"] == self.installation_id), None)
        if row is None:
            return None
        found = _Found(
            self.tenant_id, self.installation_id, store._installation(row), self.newest_bot
        )
        if found.newest_bot or found.installation.bot_token is None:
            return found.with_bot(bot)
        return found


def _newest(rows: Iterable[asyncpg.Record]) -> asyncpg.Record | None:
    return max(rows, key=lambda row: row["installed_at"], default=None)


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


def _context(table: str, column: str, row_id: uuid.UUID | str) -> str:
    """What a ciphertext is bound to: its table, column and row."""
    return f"{table}.{column}:{row_id}"


def _event(
    event_type: str,
    description: str,
    *,
    category: str = "admin",
    resource_id: uuid.UUID | str | None = None,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    return {
        "event_type": event_type,
        "event_category": category,
        "action_description": description,
        "resource_type": "slack_installation",
        "resource_id": None if resource_id is None else str(resource_id),
        "metadata": metadata,
    }


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
