"""A Slack Bolt (asyncio) app on top of slack_fathom_db: the handler sketch of DESIGN.md, runnable.

Two factories build it, both taking the ``Database`` to use (nothing is built
at import time, and tests hand in the test database):

* :func:`create_oauth_app` serves every workspace that installs the app.
  Bolt's OAuth flow runs at ``/slack/install`` (the "Add to Slack" page) and
  ``/slack/oauth_redirect`` (where Slack sends the installer back). The install
  is kept by :class:`~slack_fathom_db.slack.InstallationStore`, which installs
  the workspace's tenant in the same statement and stores the tokens
  encrypted (so ``DATABASE_TOKEN_KEYS`` must be set); the OAuth state by
  :class:`~slack_fathom_db.slack.OAuthStateStore`. Each request from Slack is
  then authorized with the bot token stored for its workspace.
* :func:`create_app` takes an ``authorize`` function of your own, or serves a
  single workspace with one bot token.

Listeners:

* ``/fathom <recording id> [title]`` (both) records a Fathom meeting for the
  workspace: resolve the workspace to a tenant, spend one unit of its daily
  quota, then one unit of work adds the Slack user (if new), creates the
  meeting and writes an audit event, and commits. The reply is the ``ack``
  itself (ephemeral).
* ``app_uninstalled``: with OAuth, Bolt's token revocation listener calls the
  store's ``async_delete_all``, which deletes the workspace's tokens and
  soft-deletes its tenant in one transaction, with an audit event (the
  ``tokens_revoked`` listener comes with it). With ``create_app``, the app's
  own listener soft-deletes the tenant, with an audit event in the same
  transaction.

Run it with::

    export DATABASE_URL=postgresql://…  DATABASE_TENANT_KEY=…  SLACK_SIGNING_SECRET=…
    # any number of workspaces (redirect URL: https://<host>/slack/oauth_redirect):
    export SLACK_CLIENT_ID=…  SLACK_CLIENT_SECRET=…  DATABASE_TOKEN_KEYS=…
    # or a single workspace:
    export SLACK_BOT_TOKEN=xoxb-…
    python -m examples.bolt_app         # listens on :$PORT (3000) at /slack/events
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from slack_bolt.async_app import AsyncApp
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings

from slack_fathom_db import Database, DatabaseSettings
from slack_fathom_db.errors import NotFound, TenantNotFound, ValidationError
from slack_fathom_db.slack import InstallationStore, OAuthStateStore

if TYPE_CHECKING:
    from slack_bolt.async_app import AsyncAck, AsyncBoltContext
    from slack_bolt.authorization import AuthorizeResult
    from slack_sdk.web.async_client import AsyncWebClient

__all__ = ["create_app", "create_oauth_app", "main", "record_meeting"]

# Bolt calls it with the keyword arguments it names (enterprise_id, team_id, user_id, ...).
Authorize = Callable[..., Awaitable["AuthorizeResult"]]

USAGE = "Usage: `/fathom <recording id> [title]`, e.g. `/fathom 123456 Weekly sync with Acme`"


def create_oauth_app(
    db: Database,
    *,
    signing_secret: str,
    client_id: str,
    client_secret: str,
    scopes: Sequence[str] = ("commands", "chat:write"),
    client: AsyncWebClient | None = None,
    meetings_per_day: int = 100,
    process_before_response: bool = False,
) -> AsyncApp:
    """The Bolt app for any number of workspaces, each installed through Bolt's OAuth flow.

    ``client`` is the Web API client for the code exchange, the per-request
    ``auth.test`` and token refreshes (default: Slack's own API).
    ``process_before_response`` as for :func:`create_app`.
    """
    oauth_settings = AsyncOAuthSettings(
        client_id=client_id,
        client_secret=client_secret,
        scopes=list(scopes),
        # Explicit, or Bolt would take them from SLACK_USER_SCOPES; a bot install needs none.
        user_scopes=[],
        # With the secret, the store refreshes rotating tokens under a row lock,
        # so two processes never spend the same refresh token.
        installation_store=InstallationStore(
            db, client_id=client_id, client_secret=client_secret, client=client
        ),
        state_store=OAuthStateStore(db),
        install_path="/slack/install",
        redirect_uri_path="/slack/oauth_redirect",
    )
    app = AsyncApp(
        signing_secret=signing_secret,
        oauth_settings=oauth_settings,
        client=client,
        process_before_response=process_before_response,
    )
    _add_fathom_command(app, db, meetings_per_day=meetings_per_day)
    # Bolt's app_uninstalled listener calls the store's async_delete_all, which
    # deletes the tokens and soft-deletes the tenant in one transaction. The app's
    # own listener is left out: Bolt runs only the first listener that matches an
    # event, and that one would soft-delete the tenant but keep its tokens.
    app.enable_token_revocation_listeners()
    return app


def create_app(
    db: Database,
    *,
    signing_secret: str,
    authorize: Authorize | None = None,
    token: str | None = None,
    meetings_per_day: int = 100,
    process_before_response: bool = False,
) -> AsyncApp:
    """The Bolt app; pass ``authorize`` (multi-workspace) or ``token`` (a single workspace).

    ``process_before_response=True`` runs each listener to completion before the
    HTTP response is returned (FaaS, and tests); otherwise Bolt answers Slack as
    soon as ``ack`` is called.
    """
    app = AsyncApp(
        signing_secret=signing_secret,
        authorize=authorize,
        token=token,
        process_before_response=process_before_response,
    )
    _add_fathom_command(app, db, meetings_per_day=meetings_per_day)
    _add_uninstall_listener(app, db)
    return app


def _add_fathom_command(app: AsyncApp, db: Database, *, meetings_per_day: int) -> None:
    @app.command("/fathom")
    async def fathom_command(ack: AsyncAck, command: dict[str, Any]) -> None:
        recording_id, _, title = command.get("text", "").strip().partition(" ")
        if not recording_id:
            await ack(USAGE, response_type="ephemeral")
            return
        try:
            reply = await record_meeting(
                db,
                slack_team_id=command["team_id"],
                slack_user_id=command["user_id"],
                recording_id=recording_id,
                title=title.strip() or f"Fathom recording {recording_id}",
                meetings_per_day=meetings_per_day,
            )
        except ValidationError as exc:
            # The layer checks its input before writing anything, and its messages
            # name the field and the rule, never a secret: safe to show the user.
            reply = f"Sorry, I couldn't record that: {_escape(str(exc))}"
        # The answer rides on the ack (Slack allows 3 s; the work above takes
        # milliseconds), so no respond()/say() call to Slack's API is needed.
        await ack(reply, response_type="ephemeral")


def _add_uninstall_listener(app: AsyncApp, db: Database) -> None:
    @app.event("app_uninstalled")
    async def app_uninstalled(context: AsyncBoltContext, logger: logging.Logger) -> None:
        # Bolt acknowledges events itself. Slack retries an event it thinks
        # failed, so a second delivery must be a quiet no-op.
        tenant_id = None if context.team_id is None else await db.directory.resolve(context.team_id)
        if tenant_id is None:
            logger.info("app_uninstalled for an unknown or already removed workspace")
            return
        try:
            async with db.unit_of_work(tenant_id) as uow:
                # Same transaction: the audit row and the soft delete land together or not at all.
                await uow.audit.log_event(
                    event_type="app.uninstalled",
                    event_category="admin",
                    action_description="Slack app uninstalled; workspace soft-deleted",
                    resource_type="tenant",
                    resource_id=tenant_id,
                )
                await uow.tenants.soft_delete()
                await uow.commit()
        except (TenantNotFound, NotFound):
            logger.info("app_uninstalled: a concurrent delivery removed the workspace first")


async def record_meeting(
    db: Database,
    *,
    slack_team_id: str,
    slack_user_id: str,
    recording_id: str,
    title: str,
    meetings_per_day: int,
) -> str:
    """Record one meeting for a Slack user and return the reply to show them."""
    tenant_id = await db.directory.resolve(slack_team_id)
    if tenant_id is None:  # never installed, or uninstalled (soft-deleted)
        return "This workspace isn't connected to Fathom notes. Ask an admin to install the app."

    # Committed at once, in its own short transaction: exact under concurrency,
    # and a denial spends nothing. (A request that then fails still spent its
    # unit; uow.rate_limits.consume() charges only if the unit of work commits.)
    decision = await db.rate_limit(
        tenant_id, "meetings_processed", limit=meetings_per_day, period="daily"
    )
    if not decision.allowed:
        # Its own transaction too, so the refusal is on record even though nothing else is.
        await db.log_security_event(
            tenant_id,
            event_type="rate_limit.denied",
            event_category="security",
            status="denied",
            action_description="Daily meeting quota reached",
            metadata={"slack_user_id": slack_user_id, "limit": decision.limit},
        )
        return (
            f"Your workspace has recorded its {decision.limit} meetings for today. "
            f"Try again in {_duration(decision.retry_after)} "
            f"(at {decision.resets_at:%H:%M} UTC)."
        )

    async with db.unit_of_work(tenant_id) as uow:  # one tenant, one transaction
        existing = await uow.meetings.get_by_fathom_id(recording_id)
        if existing is not None:  # e.g. the command sent twice; leaving rolls back
            return f"Already recorded: *{_escape(existing.title)}*."
        user = await uow.tenants.add_user(slack_user_id=slack_user_id)  # idempotent
        # Idempotent as well: a concurrent delivery that also passed the check
        # above gets this same row instead of a duplicate or an error.
        meeting = await uow.meetings.create(
            user_id=user.id, fathom_recording_id=recording_id, title=title
        )
        await uow.audit.log_event(
            event_type="meeting.created",
            event_category="data",
            action_description="Meeting received from Slack /fathom",
            resource_type="meeting_session",
            resource_id=meeting.id,
            user_id=user.id,
        )
        await uow.commit()
    # `meeting` is still readable here: the layer never expires returned objects.
    return f"Recorded *{_escape(meeting.title)}*; its notes will follow shortly."


def _duration(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _escape(text: str) -> str:
    """Escape Slack's control characters, so user text cannot become a mention or link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main() -> None:
    """Serve every workspace that installs the app when SLACK_CLIENT_ID and
    SLACK_CLIENT_SECRET are set, else the one workspace of SLACK_BOT_TOKEN."""
    logging.basicConfig(level=logging.INFO)
    signing_secret = os.environ["SLACK_SIGNING_SECRET"]
    client_id = os.environ.get("SLACK_CLIENT_ID")
    client_secret = os.environ.get("SLACK_CLIENT_SECRET")
    if bool(client_id) != bool(client_secret):
        # Half an OAuth setup would otherwise fall through to the bot-token mode.
        raise SystemExit("Set both SLACK_CLIENT_ID and SLACK_CLIENT_SECRET, or neither")
    db = Database(DatabaseSettings())

    if client_id and client_secret:
        app = create_oauth_app(
            db, signing_secret=signing_secret, client_id=client_id, client_secret=client_secret
        )
        # Serves the install and redirect paths of the OAuth flow beside /slack/events.
        web_app = app.web_app(path="/slack/events")
    else:
        app = create_app(db, signing_secret=signing_secret, token=os.environ["SLACK_BOT_TOKEN"])
        web_app = app.web_app(path="/slack/events")

        async def install_workspace(_: web.Application) -> None:
            # With a single bot token there is no OAuth callback to register the
            # workspace, so ask Slack which one the token belongs to.
            auth = await app.client.auth_test()
            await db.directory.install(slack_team_id=auth["team_id"], slack_team_name=auth["team"])

        web_app.on_startup.append(install_workspace)

    async def close_pool(_: web.Application) -> None:
        await db.dispose()

    web_app.on_cleanup.append(close_pool)
    web.run_app(web_app, port=int(os.environ.get("PORT", "3000")))


if __name__ == "__main__":
    main()
