"""Slack tokens encrypted at rest: AES-256-GCM with named keys.

Keys come from ``DATABASE_TOKEN_KEYS``: a comma-separated list of
``<key id>:<32 bytes, url-safe base64>``. The first key encrypts; every key
listed decrypts, so a new key is rolled out by putting it first and keeping
the old ones until ``sfdb rotate-token-keys`` has re-encrypted every row.

A ciphertext is ``0x01 | len(key id) | key id | 12-byte nonce | ciphertext+tag``,
authenticated together with its *context* (:func:`token_context`: table,
column, tenant key and row id): a ciphertext copied to another row, column or
tenant does not decrypt. Nothing here
ever puts a key or a plaintext in a message, a log or a repr.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from typing import TYPE_CHECKING, Final

from slack_fathom_db import validation
from slack_fathom_db.errors import ConfigurationError, SlackFathomDBError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["TokenCipher", "TokenDecryptionError", "generate_key", "parse_keys", "token_context"]

_VERSION: Final = 1
_NONCE_BYTES: Final = 12
_KEY_BYTES: Final = 32
_KEY_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_AAD_PREFIX: Final = b"slack_fathom_db token v1|"


class TokenDecryptionError(SlackFathomDBError):
    """A stored token could not be decrypted: its key is not configured, or it was altered."""


def token_context(table: str, column: str, key: str, row_id: object) -> str:
    """What a stored Slack secret is bound to: its table, column, tenant key and row.

    The tenant key is the tenant's ``slack_team_id``: the workspace's team id, or
    the organisation's enterprise id for an org-wide install.
    """
    return f"{table}.{column}:{key}:{row_id}"


def generate_key(key_id: str | None = None) -> str:
    """A new key in ``DATABASE_TOKEN_KEYS`` form: ``<key id>:<base64 of 32 random bytes>``."""
    kid = key_id if key_id is not None else f"k{secrets.token_hex(4)}"
    if not _KEY_ID.fullmatch(kid):
        raise ConfigurationError("token key id must match [A-Za-z0-9_.-]{1,32}")
    return f"{kid}:{base64.urlsafe_b64encode(os.urandom(_KEY_BYTES)).decode()}"


def parse_keys(value: str) -> list[tuple[str, bytes]]:
    """Parse ``DATABASE_TOKEN_KEYS``; the error names the entry's position, never the key."""
    keys: list[tuple[str, bytes]] = []
    for position, entry in enumerate(value.split(","), start=1):
        kid, sep, encoded = entry.strip().partition(":")
        if not sep or not _KEY_ID.fullmatch(kid):
            raise ConfigurationError(
                f"DATABASE_TOKEN_KEYS entry {position}: expected <key id>:<base64 key>, "
                "the id of [A-Za-z0-9_.-]{1,32}"
            )
        key = validation.url_safe_base64(encoded)
        if len(key) != _KEY_BYTES:
            raise ConfigurationError(
                f"DATABASE_TOKEN_KEYS entry {position} ({kid}): the key must be 32 bytes in "
                "url-safe base64 (sfdb generate-token-key makes one)"
            )
        if any(kid == known for known, _ in keys):
            raise ConfigurationError(f"DATABASE_TOKEN_KEYS: key id {kid} is listed twice")
        keys.append((kid, key))
    return keys


class TokenCipher:
    """Encrypts with the first key, decrypts with any; see the module docstring."""

    __slots__ = ("_by_id", "_write_id", "_write_prefix")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        listed = list(keys)
        if not listed:
            raise ConfigurationError("no token key: set DATABASE_TOKEN_KEYS")
        self._by_id: dict[str, AESGCM] = {kid: _aes_gcm(key) for kid, key in listed}
        self._write_id = listed[0][0]
        self._write_prefix = _prefix(self._write_id)

    @classmethod
    def from_settings(cls, settings: DatabaseSettings) -> TokenCipher:
        """The cipher of ``DATABASE_TOKEN_KEYS``; :class:`ConfigurationError` without one."""
        keys = settings.token_keys
        if keys is None or not keys.get_secret_value().strip():
            raise ConfigurationError(
                "Slack installs need DATABASE_TOKEN_KEYS (the key that encrypts tokens at "
                "rest): make one with `sfdb generate-token-key` and keep it in a secrets manager"
            )
        return cls(parse_keys(keys.get_secret_value()))

    @property
    def key_id(self) -> str:
        """The id of the key new ciphertexts are made with."""
        return self._write_id

    def encrypt(self, plaintext: str, *, context: str) -> bytes:
        """Encrypt ``plaintext`` for ``context`` (``table.column:row id``)."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._by_id[self._write_id].encrypt(
            nonce, plaintext.encode(), _AAD_PREFIX + context.encode()
        )
        return self._write_prefix + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> str:
        """The plaintext of ``blob``; :class:`TokenDecryptionError` if it cannot be had."""
        kid, body = _split(blob)
        cipher = self._by_id.get(kid) if kid is not None else None
        if cipher is None:
            known = "a malformed ciphertext" if kid is None else f"key {kid!r}, not configured"
            raise TokenDecryptionError(f"cannot decrypt a stored token ({context}): {known}")
        from cryptography.exceptions import InvalidTag  # noqa: PLC0415 - see _aes_gcm

        try:
            plain = cipher.decrypt(
                body[:_NONCE_BYTES], body[_NONCE_BYTES:], _AAD_PREFIX + context.encode()
            )
        except InvalidTag:
            raise TokenDecryptionError(
                f"cannot decrypt a stored token ({context}): it was altered, or belongs to "
                "another row"
            ) from None
        return plain.decode()

    def is_current(self, blob: bytes) -> bool:
        """Whether ``blob`` was made with the key that encrypts now."""
        return blob.startswith(self._write_prefix)

    def __repr__(self) -> str:
        return f"TokenCipher(key_id={self._write_id!r}, keys={len(self._by_id)})"


def _aes_gcm(key: bytes) -> AESGCM:
    # Imported here: only Slack installs need it (the `slack` extra); making a key does not.
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415
    except ImportError:
        raise ConfigurationError(
            "token encryption needs the cryptography package: pip install 'slack-fathom-db[slack]'"
        ) from None
    return AESGCM(key)


def _prefix(kid: str) -> bytes:
    encoded = kid.encode()
    return bytes([_VERSION, len(encoded)]) + encoded


def _split(blob: bytes) -> tuple[str | None, bytes]:
    """The key id and the rest (nonce, ciphertext, tag) of a ciphertext."""
    if len(blob) < 2 or blob[0] != _VERSION:
        return None, b""
    end = 2 + blob[1]
    if len(blob) < end + _NONCE_BYTES + 16:
        return None, b""
    try:
        return blob[2:end].decode("ascii"), blob[end:]
    except UnicodeDecodeError:
        return None, b""
