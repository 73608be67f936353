"""Slack installations of one tenant: the token columns a refresh locks and rewrites.

Finding, saving and deleting installations happens before Bolt knows the
tenant, through the directory's functions (:mod:`slack_fathom_db.slack`).
What needs the tenant's own transaction is the token refresh: lock the rows
whose tokens are about to be replaced (``FOR UPDATE``, so a second process
waits and then reads the new tokens), and write the new ciphertexts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from sqlalchemy import BindParameter, bindparam
from sqlalchemy.dialects.postgresql import UUID

from slack_fathom_db.models.slack import SlackBot, SlackInstallation
from slack_fathom_db.repositories.base import TenantRepository

if TYPE_CHECKING:
    import uuid

    import asyncpg

__all__ = ["InstallationRepo"]

_TOKEN_COLUMNS: Final = {
    SlackInstallation: (
        "bot_token",
        "bot_refresh_token",
        "bot_token_expires_at",
        "user_token",
        "user_refresh_token",
        "user_token_expires_at",
    ),
    SlackBot: ("bot_token", "bot_refresh_token", "bot_token_expires_at"),
}


class InstallationRepo(TenantRepository[SlackInstallation]):
    """Token refreshes of the tenant's Slack installations and bots."""

    model = SlackInstallation
    span_prefix: ClassVar[str] = "installations"

    async def lock_installation(self, installation_id: uuid.UUID) -> asyncpg.Record | None:
        """The installation's row, locked until the transaction ends; ``None`` if gone."""
        rows = await self._fetch(
            "lock_installation",
            lambda: self._select(SlackInstallation)
            .where(SlackInstallation.id == _param("row_id"))
            .with_for_update(),
            action="lock installation",
            row_id=installation_id,
        )
        return rows[0] if rows else None

    async def lock_bot(self, bot_id: uuid.UUID) -> asyncpg.Record | None:
        """The bot's row, locked until the transaction ends; ``None`` if gone."""
        rows = await self._fetch(
            "lock_bot",
            lambda: self._select(SlackBot).where(SlackBot.id == _param("row_id")).with_for_update(),
            action="lock bot",
            row_id=bot_id,
        )
        return rows[0] if rows else None

    async def store_tokens(
        self, model: type[SlackInstallation | SlackBot], row_id: uuid.UUID, values: dict[str, Any]
    ) -> None:
        """Write new token ciphertexts (and expiries) to one row."""
        allowed = _TOKEN_COLUMNS[model]
        unknown = set(values) - set(allowed)
        if unknown:
            raise TypeError(f"not a token column: {sorted(unknown)}")
        target: Any = model
        await self._rows(
            self._update(model).where(target.id == row_id).values(**values),
            action="store refreshed tokens",
        )


def _param(name: str) -> BindParameter[Any]:
    return bindparam(name, type_=UUID(as_uuid=True))
