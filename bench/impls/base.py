"""What every implementation does, and the values the workloads hand it.

Each implementation performs the same logical work per operation, with the
same transaction shape: a tenant's statements run inside a transaction that
first switches to the app role and sets ``app.tenant_claim`` to a claim signed
with :data:`TENANT_KEY` (row-level security is FORCEd on tenant-owned tables
and admits a tenant's rows only to a claim the database verifies, so the
superuser login must drop to the app role for the comparison to be fair). How
each one does that is stated in its ``isolation`` text, which the report
prints.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.oauth.installation_store.models.installation import Installation

from slack_fathom_db.claims import CLAIM_SETTING, TenantKey
from slack_fathom_db.tokens import token_context

if TYPE_CHECKING:
    from slack_fathom_db.tokens import TokenCipher

APP_ROLE: Final = "sfdb_app"
STATEMENT_TIMEOUT_MS: Final = 30_000
HANDLER_RESOURCE: Final = "meetings_processed"
# High enough never to deny: every measured call does the whole piece of work.
NEVER_DENY: Final = 2_000_000_000
RECENT_DAYS: Final = 30
RECENT_LIMIT: Final = 50
SLACK_CLIENT_ID: Final = "1111111111.2222222222"
TOKEN_KEYS: Final = (
    "bench:" + base64.urlsafe_b64encode(hashlib.sha256(b"sfdb bench token key").digest()).decode()
)
"""The one key every implementation decrypts the bench installations with.

Derived from a constant rather than made with ``generate_key()``: a dataset kept
with ``--keep`` and reused by a later run must still decrypt, and the tokens it
protects are made up.
"""
TENANT_KEY: Final = "bench:0aalsE86mKfLS0d4BBljdhJ_MFgcDLz47YSKbTFT-mk="
"""The tenant key of every bench database (``DATABASE_TENANT_KEY`` form): the layer signs
its claims with it, the baselines sign theirs with it by hand, and every bench database
holds it (:func:`bench.dataset.create` installs it).

Made once with ``generate_tenant_key("bench")`` and kept, so a dataset kept with
``--keep`` still admits the claims of a later run; it protects made-up data only.
"""
SIGNER: Final = TenantKey.parse(TENANT_KEY)
FIND_INSTALLATION: Final = "SELECT * FROM sfdb_find_slack_installation($1, $2, $3, $4, $5)"
"""What ``InstallationStore.async_find_installation`` sends (client id, tenant key,
enterprise, team, user): for a workspace install the key is the team id."""


@dataclass(frozen=True, slots=True)
class BenchTenant:
    """A tenant of a benchmark dataset, as read back from the database after loading."""

    id: uuid.UUID
    slack_team_id: str
    user_ids: tuple[uuid.UUID, ...]
    slack_user_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandlerEvent:
    """What a Slack event handler receives (the design's handler sketch)."""

    slack_team_id: str
    slack_user_id: str
    fathom_recording_id: str
    title: str


def day_start(now: datetime | None = None) -> datetime:
    """The start of the current UTC day: the window of a ``daily`` rate limit."""
    now = now or datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def since(days: int = RECENT_DAYS) -> datetime:
    """``now - days``, timezone-aware."""
    return datetime.now(UTC) - timedelta(days=days)


class Row(Protocol):
    """A result row by column name: an asyncpg ``Record`` or a SQLAlchemy ``RowMapping``."""

    def __getitem__(self, key: str, /) -> Any: ...


def installation_from_row(row: Row, cipher: TokenCipher, key: str) -> Installation:
    """What the layer's store makes of a ``sfdb_find_slack_installation`` row, by hand.

    The same work as ``InstallationStore``: every non-null secret column of the
    installation decrypted (bound to its table, column, tenant ``key`` and row) and
    a slack_sdk ``Installation`` built; when it has no bot token of its own
    (slack_sdk's rule), the newest bot beside it decrypted too and its token put in.
    """

    def opened(table: str, prefix: str, column: str) -> str | None:
        blob = row[prefix + column]
        if blob is None:
            return None
        # bytes(): psycopg2 hands bytea over as a memoryview (asyncpg's bytes pass as they are).
        context = token_context(table, column, key, row[prefix + "id"])
        return cipher.decrypt(bytes(blob), context=context)

    def own(column: str) -> str | None:
        return opened("slack_installations", "", column)

    installation = Installation(
        app_id=row["app_id"],
        enterprise_id=row["enterprise_id"],
        enterprise_name=row["enterprise_name"],
        enterprise_url=row["enterprise_url"],
        team_id=row["team_id"],
        team_name=row["team_name"],
        bot_token=own("bot_token"),
        bot_id=row["bot_id"],
        bot_user_id=row["bot_user_id"],
        bot_scopes=row["bot_scopes"] or "",
        bot_refresh_token=own("bot_refresh_token"),
        bot_token_expires_at=row["bot_token_expires_at"],
        user_id=row["user_id"],
        user_token=own("user_token"),
        user_scopes=row["user_scopes"] or "",
        user_refresh_token=own("user_refresh_token"),
        user_token_expires_at=row["user_token_expires_at"],
        incoming_webhook_url=own("incoming_webhook_url"),
        incoming_webhook_channel=row["incoming_webhook_channel"],
        incoming_webhook_channel_id=row["incoming_webhook_channel_id"],
        incoming_webhook_configuration_url=row["incoming_webhook_configuration_url"],
        is_enterprise_install=row["is_enterprise_install"],
        token_type=row["token_type"],
        installed_at=row["installed_at"].timestamp(),
    )
    if installation.bot_token is not None or row["latest_id"] is None:
        return installation  # its own bot (no user was named), or no bot beside it
    bot_token = opened("slack_bots", "latest_", "bot_token")
    if bot_token is None:  # the function returns only bots with a token
        return installation
    bot = Bot(
        app_id=row["latest_app_id"],
        enterprise_id=row["latest_enterprise_id"],
        enterprise_name=row["latest_enterprise_name"],
        team_id=row["latest_team_id"],
        team_name=row["latest_team_name"],
        bot_token=bot_token,
        bot_id=row["latest_bot_id"],
        bot_user_id=row["latest_bot_user_id"],
        bot_scopes=row["latest_bot_scopes"] or "",
        bot_refresh_token=opened("slack_bots", "latest_", "bot_refresh_token"),
        bot_token_expires_at=row["latest_bot_token_expires_at"],
        is_enterprise_install=row["latest_is_enterprise_install"],
        installed_at=row["latest_installed_at"].timestamp(),
    )
    merged = Installation(**installation.to_dict_for_copying())
    merged.bot_id, merged.bot_user_id = bot.bot_id, bot.bot_user_id
    merged.bot_token, merged.bot_scopes = bot.bot_token, bot.bot_scopes
    merged.bot_refresh_token = bot.bot_refresh_token
    merged.bot_token_expires_at = bot.bot_token_expires_at
    return merged


IDLE_TIMEOUT_MS: Final = 60_000
SEARCH_PATH: Final = "pg_catalog, public, pg_temp"


def session_settings(directory_role: str) -> dict[str, str]:
    """What a connection opens with, as the layer's direct connections do: outside any
    tenant it acts as the directory role, with a pinned path, row security and timeouts."""
    return {
        "role": directory_role,
        "search_path": SEARCH_PATH,
        "row_security": "on",
        "statement_timeout": str(STATEMENT_TIMEOUT_MS),
        "lock_timeout": "0",
        "default_transaction_read_only": "off",
        "default_transaction_isolation": "read committed",
    }


def claim(tenant_id: uuid.UUID) -> str:
    """A claim for ``tenant_id`` signed now with :data:`TENANT_KEY`, for any backend (pid 0)."""
    if not isinstance(tenant_id, uuid.UUID):
        raise TypeError("tenant_id must be a uuid.UUID")
    return SIGNER.sign(tenant_id)


def tenant_preamble(tenant_id: uuid.UUID, *, begin: bool, check_tenant: bool = True) -> str:
    """The statements that open a tenant transaction, the layer's own, for implementations
    that send them by hand: the claim is signed here, for any backend (pid 0).

    ``tenant_id`` must be a :class:`uuid.UUID` (read back from the database), so
    the claim cannot carry anything else.
    """
    statements = [
        *(["BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"] if begin else []),
        f'SET LOCAL ROLE "{APP_ROLE}"',
        f"SET LOCAL search_path = {SEARCH_PATH}",
        f"SET LOCAL {CLAIM_SETTING} = '{claim(tenant_id)}'",
        "SET LOCAL row_security = on",
        f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}",
        "SET LOCAL lock_timeout = 0",
        f"SET LOCAL idle_in_transaction_session_timeout = {IDLE_TIMEOUT_MS}",
        *(["SELECT sfdb_require_claim()"] if check_tenant else []),
    ]
    return "; ".join(statements)


class Implementation(abc.ABC):
    """One way of doing the benchmark's work; opened on a database, closed after."""

    key: str
    """Short name, used on the command line and in table headers."""
    title: str
    isolation: str
    """How it sets the tenant context (printed in the report)."""
    variant_of: str | None = None
    """The key of the implementation this one is a variant of: measured beside it, on the
    workloads that compare the two, and reported apart from the main tables."""

    @abc.abstractmethod
    async def open(self, dsn: str, *, pool_size: int) -> None:
        """Build the pool (or engine) on ``dsn`` (a ``postgresql://`` URL)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    @abc.abstractmethod
    async def handler(self, event: HandlerEvent) -> None:
        """Resolve team → rate limit → user by Slack id, create meeting, audit event, commit."""

    @abc.abstractmethod
    async def recent_meetings(self, tenant: BenchTenant) -> int:
        """The tenant's live meetings of the last 30 days, newest first, 50 at most."""

    @abc.abstractmethod
    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        """A user's live meetings of the last 30 days, newest first, 50 at most."""

    @abc.abstractmethod
    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        """Spend one unit of ``resource`` (daily window) in a short transaction of its own."""

    @abc.abstractmethod
    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        """Write one audit event in a transaction of its own."""

    @abc.abstractmethod
    async def find_installation(self, tenant: BenchTenant) -> Installation | None:
        """What Bolt does to authorize a request: the workspace's installation, decrypted."""
