"""The Slack installation aggregate: what Bolt's OAuth flow stores for each install.

An installation belongs to the tenant it installs: the workspace's, or for an
org-wide install (``is_enterprise_install``) a tenant of the Enterprise Grid
organisation itself, keyed by the enterprise id. Both tables are tenant-owned
like every other (composite key, row-level security, distributed by
``tenant_id`` on Citus); they keep the history of installs, and the newest row
wins, as in slack_sdk's own stores.

Tokens (bot, user, refresh) and the incoming-webhook URL are never stored in
plaintext: each ``bytea`` holds a ciphertext of :mod:`slack_fathom_db.tokens`
(AES-GCM, the key's id inside, bound to its table, column, tenant and row).

``slack_oauth_states`` is global (a state is issued before anyone knows the
workspace): it keeps a SHA-256 digest of each state, never the state, and is
reached only through two functions of the owner.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from sqlalchemy import Index, LargeBinary, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from slack_fathom_db.models.base import Base, TenantOwned, Timestamps

SECRET_COLUMNS: Final = {
    "slack_installations": (
        "bot_token",
        "bot_refresh_token",
        "user_token",
        "user_refresh_token",
        "incoming_webhook_url",
    ),
    "slack_bots": ("bot_token", "bot_refresh_token"),
}
"""The encrypted columns of each table."""

INSTALL_EXPRESSIONS: Final = (text("coalesce(enterprise_id, '')"), text("coalesce(team_id, '')"))
"""An install's org and workspace in its keys: a missing one counts as ''."""


class _SlackIdentity:
    """Columns both tables share: the app, the org and workspace, the bot."""

    client_id: Mapped[str] = mapped_column(Text)
    app_id: Mapped[str | None] = mapped_column(Text)
    enterprise_id: Mapped[str | None] = mapped_column(String(32))
    enterprise_name: Mapped[str | None] = mapped_column(Text)
    team_id: Mapped[str | None] = mapped_column(String(32))
    team_name: Mapped[str | None] = mapped_column(Text)
    bot_id: Mapped[str | None] = mapped_column(Text)
    bot_user_id: Mapped[str | None] = mapped_column(Text)
    bot_scopes: Mapped[str | None] = mapped_column(Text)
    bot_token: Mapped[bytes | None] = mapped_column(LargeBinary)
    bot_refresh_token: Mapped[bytes | None] = mapped_column(LargeBinary)
    bot_token_expires_at: Mapped[datetime | None]
    is_enterprise_install: Mapped[bool] = mapped_column(server_default=text("false"))
    installed_at: Mapped[datetime]


class SlackInstallation(_SlackIdentity, TenantOwned, Timestamps, Base):
    """One install (or one user's authorization) of the app; the newest one wins."""

    __tablename__ = "slack_installations"
    __table_args__ = (
        # One row per install moment: saving the same installation again (a token
        # refresh) replaces it. A missing org or workspace counts as ''; the lookups
        # filter on the same expressions, so this index also finds the newest install.
        Index(
            "uq_slack_installations_install",
            "tenant_id",
            "client_id",
            *INSTALL_EXPRESSIONS,
            "installed_at",
            unique=True,
        ),
        Index(
            "ix_slack_installations_tenant_id_user_id",
            "tenant_id",
            "client_id",
            "user_id",
            text("installed_at DESC"),
        ),
    )

    enterprise_url: Mapped[str | None] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(String(32))
    user_scopes: Mapped[str | None] = mapped_column(Text)
    user_token: Mapped[bytes | None] = mapped_column(LargeBinary)
    user_refresh_token: Mapped[bytes | None] = mapped_column(LargeBinary)
    user_token_expires_at: Mapped[datetime | None]
    incoming_webhook_url: Mapped[bytes | None] = mapped_column(LargeBinary)
    incoming_webhook_channel: Mapped[str | None] = mapped_column(Text)
    incoming_webhook_channel_id: Mapped[str | None] = mapped_column(Text)
    incoming_webhook_configuration_url: Mapped[str | None] = mapped_column(Text)
    token_type: Mapped[str | None] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"SlackInstallation(id={self.id}, team_id={self.team_id!r})"


class SlackBot(_SlackIdentity, TenantOwned, Timestamps, Base):
    """The bot of one install; the newest row with a token is the workspace's bot."""

    __tablename__ = "slack_bots"
    __table_args__ = (
        Index(
            "uq_slack_bots_install",
            "tenant_id",
            "client_id",
            *INSTALL_EXPRESSIONS,
            "installed_at",
            unique=True,
        ),
    )

    def __repr__(self) -> str:
        return f"SlackBot(id={self.id}, team_id={self.team_id!r})"


class SlackOAuthState(Base):
    """An OAuth ``state`` issued and not yet consumed: its digest and its expiry."""

    __tablename__ = "slack_oauth_states"
    __table_args__ = (Index("ix_slack_oauth_states_expire_at", "expire_at"),)

    state_digest: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    expire_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"SlackOAuthState(expire_at={self.expire_at})"
