"""Slack installations of one tenant: the token columns a refresh locks and rewrites.

Finding, saving and deleting installations happens before Bolt knows the
tenant, through the directory's functions (:mod:`slack_fathom_db.slack`).
What needs the tenant's own transaction is the token refresh: lock the rows
of the org/workspace whose tokens are about to be replaced (``FOR UPDATE``,
installations before bots, each in id order, so a second process waits and
then reads the new tokens), and write the new ciphertexts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from sqlalchemy import Text, bindparam

from slack_fathom_db.models.slack import SlackBot, SlackInstallation
from slack_fathom_db.repositories.base import TenantRepository

if TYPE_CHECKING:
    import uuid

    import asyncpg
    from sqlalchemy import BindParameter

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

    async def lock_installations(
        self, client_id: str, enterprise_id: str | None, team_id: str | None
    ) -> list[asyncpg.Record]:
        """The installations of an org/workspace, locked until the transaction ends."""
        return await self._fetch(
            "lock_installations",
            self._installations_of_install,
            action="lock installations",
            client_id=client_id,
            enterprise_id=enterprise_id,
            team_id=team_id,
        )

    async def lock_bots(
        self, client_id: str, enterprise_id: str | None, team_id: str | None
    ) -> list[asyncpg.Record]:
        """The bots of an org/workspace, locked (after its installations) until the end."""
        return await self._fetch(
            "lock_bots",
            self._bots_of_install,
            action="lock bots",
            client_id=client_id,
            enterprise_id=enterprise_id,
            team_id=team_id,
        )

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

    # -- statements: an org/workspace's rows (a missing one is NULL), in id order, locked --

    def _installations_of_install(self) -> Any:
        return (
            self._select(SlackInstallation)
            .where(
                SlackInstallation.client_id == _text("client_id"),
                SlackInstallation.enterprise_id.is_not_distinct_from(_text("enterprise_id")),
                SlackInstallation.team_id.is_not_distinct_from(_text("team_id")),
            )
            .order_by(SlackInstallation.id)
            .with_for_update()
        )

    def _bots_of_install(self) -> Any:
        return (
            self._select(SlackBot)
            .where(
                SlackBot.client_id == _text("client_id"),
                SlackBot.enterprise_id.is_not_distinct_from(_text("enterprise_id")),
                SlackBot.team_id.is_not_distinct_from(_text("team_id")),
            )
            .order_by(SlackBot.id)
            .with_for_update()
        )


def _text(name: str) -> BindParameter[str]:
    return bindparam(name, type_=Text())
