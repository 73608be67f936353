"""Signed tenant claims: how a transaction tells the database its tenant.

Row-level security admits a tenant's rows only to a transaction whose
``app.tenant_claim`` setting holds a claim the database verifies (migration
0008): ``v1.<key id>.<tenant>.<issued, epoch ms>.<backend pid or 0>.<mac>``,
where ``mac`` is the hex HMAC-SHA256 of everything before it under the
tenant key. The application signs with ``DATABASE_TENANT_KEY``
(``<key id>:<base64 of 32 bytes>``, :func:`generate_tenant_key`); the
database keeps the HMAC's pads of one or two keys in a table only the owner
reads (``sfdb migrate`` installs the application's key,
``sfdb rotate-tenant-key`` rotates it, :mod:`slack_fathom_db.maintenance`).

What a claim binds: the tenant; the key; the time, as the database checks it
for every statement (received between :data:`EARLIEST` before and
:data:`LIFETIME` after it was issued, and used at most :data:`HELD_AT_MOST`
after it); and on a direct connection to a single server, the server process
it was made for. A unit of work makes a claim for
each transaction and, in a transaction older than :data:`REFRESH_AFTER`, a
fresh one before its next statement, so no transaction outlives its claim.
Anyone who can send SQL as the runtime login and reads a claim within its
lifetime (from a log, or from ``pg_stat_activity`` while it is in flight) can
use it until it expires; the README's threat model says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Final

from slack_fathom_db import validation
from slack_fathom_db.errors import ConfigurationError

if TYPE_CHECKING:
    import uuid

    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "CLAIM_SETTING",
    "EARLIEST",
    "HELD_AT_MOST",
    "LIFETIME",
    "REFRESH_AFTER",
    "ClaimIssuer",
    "TenantKey",
    "generate_tenant_key",
]

CLAIM_SETTING: Final = "app.tenant_claim"
LIFETIME: Final = 10.0
"""Seconds after its issue during which the database accepts a claim."""
EARLIEST: Final = 2.0
"""Seconds before its issue from which the database accepts a claim (clock skew)."""
HELD_AT_MOST: Final = 60.0
"""Seconds after its issue past which no statement uses a claim, however it began."""
REFRESH_AFTER: Final = 5.0
"""Age in seconds after which a transaction sets a fresh claim before its next statement."""

CLAIM_PATTERN: Final = re.compile(
    r"v1\.[A-Za-z0-9_-]{1,32}\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"\.[0-9]{13}\.[0-9]{1,10}\.[0-9a-f]{64}"
)
"""What a claim the layer makes looks like (the database checks each part it casts)."""

_KEY_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
_KEY_BYTES: Final = 32
_BLOCK: Final = 64  # SHA-256's block: the key is padded to it (RFC 2104)
_SETTING_NAME: Final = "DATABASE_TENANT_KEY"


def generate_tenant_key(key_id: str | None = None) -> str:
    """A new key in ``DATABASE_TENANT_KEY`` form: ``<key id>:<base64 of 32 random bytes>``."""
    kid = key_id if key_id is not None else f"t{secrets.token_hex(4)}"
    if not _KEY_ID.fullmatch(kid):
        raise ConfigurationError("tenant key id must match [A-Za-z0-9_-]{1,32}")
    return f"{kid}:{base64.urlsafe_b64encode(os.urandom(_KEY_BYTES)).decode()}"


class TenantKey:
    """The application's tenant key: signs claims. Its repr shows the key id only."""

    __slots__ = ("_mac", "_secret", "key_id")

    def __init__(self, key_id: str, secret: bytes) -> None:
        if not _KEY_ID.fullmatch(key_id) or len(secret) != _KEY_BYTES:
            raise ConfigurationError(
                f"{_SETTING_NAME}: a key id of [A-Za-z0-9_-]{{1,32}} and a 32-byte key"
            )
        self.key_id = key_id
        self._secret = secret
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    @classmethod
    def parse(cls, value: str) -> TenantKey:
        """Parse ``<key id>:<base64 key>``; the error never shows the key."""
        kid, sep, encoded = value.strip().partition(":")
        if not sep or not _KEY_ID.fullmatch(kid):
            raise ConfigurationError(
                f"{_SETTING_NAME}: expected <key id>:<base64 key>, the id of [A-Za-z0-9_-]{{1,32}}"
            )
        secret = validation.url_safe_base64(encoded)
        if len(secret) != _KEY_BYTES:
            raise ConfigurationError(
                f"{_SETTING_NAME} ({kid}): the key must be 32 bytes in url-safe base64 "
                "(sfdb generate-tenant-key makes one)"
            )
        return cls(kid, secret)

    @classmethod
    def from_settings(cls, settings: DatabaseSettings) -> TenantKey:
        """The key of ``DATABASE_TENANT_KEY``; :class:`ConfigurationError` without one."""
        if settings.tenant_key is None:
            raise ConfigurationError(
                f"{_SETTING_NAME} is not set: units of work sign their tenant with it, and "
                "the database admits a tenant's rows only to a claim signed so (sfdb "
                "generate-tenant-key makes one; sfdb migrate installs it in the database)"
            )
        return cls.parse(settings.tenant_key.get_secret_value())

    def sign(
        self, tenant_id: uuid.UUID, *, backend_pid: int = 0, issued_ms: int | None = None
    ) -> str:
        """A claim for ``tenant_id``, issued now (or at ``issued_ms``), for ``backend_pid``."""
        tenant = validation.canonical_uuid(tenant_id)
        issued = time.time_ns() // 1_000_000 if issued_ms is None else issued_ms
        body = f"v1.{self.key_id}.{tenant}.{issued:013d}.{int(backend_pid)}"
        mac = self._mac.copy()
        mac.update(body.encode())
        return f"{body}.{mac.hexdigest()}"

    def pads(self) -> tuple[bytes, bytes]:
        """The HMAC's inner and outer pads: what the database keeps of this key."""
        block = self._secret.ljust(_BLOCK, b"\0")
        return bytes(b ^ 0x36 for b in block), bytes(b ^ 0x5C for b in block)

    def __repr__(self) -> str:
        return f"TenantKey(key_id={self.key_id!r})"


class ClaimIssuer:
    """The claims of one tenant's transactions on one connection.

    :meth:`statement` is the ``SET LOCAL`` that opens a transaction with a
    fresh claim; :meth:`refresh` gives another once the transaction's claim is
    :data:`REFRESH_AFTER` old (``None`` before), for the runner to send ahead
    of the next statement.
    """

    __slots__ = ("_backend_pid", "_issued_at", "_key", "_tenant")

    def __init__(self, key: TenantKey, tenant_id: uuid.UUID, *, backend_pid: int) -> None:
        self._key = key
        self._tenant = validation.canonical_uuid(tenant_id)
        self._backend_pid = int(backend_pid)
        self._issued_at = 0.0

    def statement(self) -> str:
        """``SET LOCAL app.tenant_claim = '<a claim made now>'``."""
        self._issued_at = time.monotonic()
        claim = self._key.sign(self._tenant, backend_pid=self._backend_pid)
        return f"SET LOCAL {CLAIM_SETTING} = '{claim}'"

    def refresh(self) -> str | None:
        """A fresh claim's ``SET LOCAL`` when the current one is old enough, else ``None``."""
        if time.monotonic() - self._issued_at < REFRESH_AFTER:
            return None
        return self.statement()

    def undone(self) -> None:
        """A rollback to a savepoint may have undone the last claim set: set a fresh one next."""
        self._issued_at = -math.inf
