"""A local fake of the parts of Slack's Web API that installs and token refreshes use.

Served by aiohttp on 127.0.0.1 (a random port); point an ``AsyncWebClient`` at
``base_url`` and nothing leaves the machine. It behaves as Slack does where
the layer depends on it:

* ``oauth.v2.access`` with ``grant_type=authorization_code`` exchanges a code
  issued by :meth:`FakeSlack.authorize` for an install (bot token, optionally
  rotating: a refresh token and an expiry), once;
* ``oauth.v2.access`` with ``grant_type=refresh_token`` issues a new access
  token and a new refresh token and invalidates the old ones: a refresh token
  works once, so two uncoordinated refreshes leave one caller with a token
  that no longer works;
* ``auth.test`` answers for a valid token, ``invalid_auth`` for any other;
* ``response_url`` takes the messages an app posts back to a slash command
  (Bolt does when it cannot authorize one), as ``hooks.slack.com`` does.

Besides each call's form, the fake keeps the token each call presented (a
bearer header, as slack_sdk sends it, or a ``token`` field) and every access
token it issued.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Workspace:
    """A workspace the fake knows: its ids, and who installs the app there."""

    team_id: str
    team_name: str
    installer_user_id: str
    enterprise_id: str | None = None
    bot_user_id: str = "UBOT0001"
    bot_id: str = "BBOT0001"
    app_id: str = "A0FAKEAPP"


@dataclass
class FakeSlack:
    """The fake's state: workspaces, codes, valid tokens; what it was asked."""

    client_id: str = "1111.2222"
    client_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    rotate_tokens: bool = False
    expires_in: int = 43_200
    refresh_delay: float = 0.0
    """Seconds a refresh takes (widens the window two refreshes can overlap in)."""
    base_url: str = ""
    response_url: str = ""
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    """The messages posted to ``response_url``, in order."""
    _presented: list[tuple[str, str | None]] = field(default_factory=list)
    _issued: list[tuple[str, str]] = field(default_factory=list)
    _codes: dict[str, Workspace] = field(default_factory=dict)
    _tokens: dict[str, Workspace] = field(default_factory=dict)
    _refresh: dict[str, tuple[Workspace, str, str]] = field(default_factory=dict)
    _serial: itertools.count[int] = field(default_factory=itertools.count)

    def authorize(self, workspace: Workspace) -> str:
        """A code for ``workspace``'s install, as Slack puts it in the redirect."""
        code = f"code-{next(self._serial)}-{secrets.token_hex(4)}"
        self._codes[code] = workspace
        return code

    def is_valid(self, token: str) -> bool:
        """Whether ``token`` works now."""
        return token in self._tokens

    def calls_to(self, method: str) -> list[dict[str, str]]:
        """The form of every call to ``method``, in order."""
        return [form for name, form in self.calls if name == method]

    def tokens_used(self, method: str) -> list[str | None]:
        """The token every call to ``method`` presented (``None``: none), in order."""
        return [token for name, token in self._presented if name == method]

    def tokens_issued(self, team_id: str) -> list[str]:
        """Every access token issued for ``team_id`` (installs and refreshes), in order."""
        return [token for team, token in self._issued if team == team_id]

    def issue_user_token(self, workspace: Workspace) -> dict[str, Any]:
        """A user token (rotating like the bot's), as a user-scope install would get it."""
        return self._issue(workspace, kind="user")

    def _issue(self, workspace: Workspace, *, kind: str = "bot") -> dict[str, Any]:
        serial = next(self._serial)
        token = f"xox{kind[0]}-{workspace.team_id}-{serial}-{secrets.token_hex(6)}"
        if self.rotate_tokens:
            token = f"xoxe.{token}"
        self._tokens[token] = workspace
        if kind == "bot":
            self._issued.append((workspace.team_id, token))
        issued: dict[str, Any] = {"access_token": token}
        if self.rotate_tokens:
            refresh = f"xoxe-1-{serial}-{secrets.token_hex(6)}"
            self._refresh[refresh] = (workspace, token, kind)
            issued.update(refresh_token=refresh, expires_in=self.expires_in)
        return issued

    async def _oauth_v2_access(
        self, form: dict[str, str], credentials: tuple[str, str] | None
    ) -> dict[str, Any]:
        # slack_sdk sends the app's credentials with HTTP basic auth; a form may carry them too.
        given = credentials or (form.get("client_id", ""), form.get("client_secret", ""))
        if given != (self.client_id, self.client_secret):
            return {"ok": False, "error": "invalid_client_id"}
        if form.get("grant_type") == "refresh_token":
            if self.refresh_delay:
                await asyncio.sleep(self.refresh_delay)
            entry = self._refresh.pop(form.get("refresh_token", ""), None)
            if entry is None:
                return {"ok": False, "error": "invalid_refresh_token"}
            workspace, old, kind = entry
            self._tokens.pop(old, None)  # the old access token stops working
            return {"ok": True, "token_type": kind, **self._issue(workspace, kind=kind)}
        workspace_or_none = self._codes.pop(form.get("code", ""), None)
        if workspace_or_none is None:
            return {"ok": False, "error": "invalid_code"}
        workspace = workspace_or_none
        enterprise = (
            None
            if workspace.enterprise_id is None
            else {"id": workspace.enterprise_id, "name": "Grid"}
        )
        return {
            "ok": True,
            "app_id": workspace.app_id,
            "authed_user": {"id": workspace.installer_user_id},
            "scope": "commands,chat:write",
            "token_type": "bot",
            "bot_user_id": workspace.bot_user_id,
            "team": {"id": workspace.team_id, "name": workspace.team_name},
            "enterprise": enterprise,
            "is_enterprise_install": False,
            **self._issue(workspace),
        }

    def _auth_test(self, token: str | None) -> dict[str, Any]:
        workspace = None if token is None else self._tokens.get(token)
        if workspace is None:
            return {"ok": False, "error": "invalid_auth"}
        return {
            "ok": True,
            "url": f"https://{workspace.team_name.lower()}.slack.com/",
            "team": workspace.team_name,
            "team_id": workspace.team_id,
            "enterprise_id": workspace.enterprise_id,
            "user": "fathom-bot",
            "user_id": workspace.bot_user_id,
            "bot_id": workspace.bot_id,
            "is_enterprise_install": False,
        }

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.calls.append((method, form))
        authorization = request.headers.get("Authorization", "")
        token = (
            authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
        )
        self._presented.append((method, token or form.get("token")))
        if method == "oauth.v2.access":
            return web.json_response(await self._oauth_v2_access(form, _basic(authorization)))
        if method == "auth.test":
            return web.json_response(self._auth_test(token or form.get("token")))
        if method == "team.info" or method.startswith("chat."):
            ok = token is not None and self.is_valid(token)
            return web.json_response({"ok": ok} if ok else {"ok": False, "error": "invalid_auth"})
        return web.json_response({"ok": False, "error": "unknown_method"}, status=404)

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        return web.Response(text="ok")


def _basic(authorization: str) -> tuple[str, str] | None:
    """The user and password of an HTTP basic ``Authorization`` header, if it is one."""
    if not authorization.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


@asynccontextmanager
async def fake_slack(**options: Any) -> AsyncIterator[FakeSlack]:
    """Serve a :class:`FakeSlack` on 127.0.0.1 for the duration of the block."""
    fake = FakeSlack(**options)
    app = web.Application()
    app.router.add_post("/api/{method}", fake._handle)
    app.router.add_post("/commands/response", fake._respond)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}/api/"
    fake.response_url = f"http://127.0.0.1:{port}/commands/response"
    try:
        yield fake
    finally:
        await runner.cleanup()
