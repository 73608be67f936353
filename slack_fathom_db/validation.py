"""Input rules, checked before any SQL is sent.

Every function either returns the value in its canonical form or raises
:class:`~slack_fathom_db.errors.ValidationError` naming the field and the
rule. Messages never repeat the offending value: it may be a secret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import idna

from slack_fathom_db.errors import ValidationError

MAX_TEXT: Final = 10_000
MAX_NAME: Final = 255
MAX_LONG_TEXT: Final = 200_000
MAX_JSON_DEPTH: Final = 32
DEFAULT_MAX_JSON_BYTES: Final = 64 * 1024
MAX_LIST_LIMIT: Final = 1000
"""The largest ``limit`` a listing accepts: no read of the public API is unbounded."""
_FLOAT_EXPONENT_FROM: Final = 1e16

_SLACK_TEAM_ID: Final = re.compile(r"[TE][A-Z0-9]{2,30}")
_SLACK_ENTERPRISE_ID: Final = re.compile(r"E[A-Z0-9]{2,30}")
_SLACK_USER_ID: Final = re.compile(r"[UWB][A-Z0-9]{2,30}")
_RESOURCE_NAME: Final = re.compile(r"[a-z][a-z0-9_.:-]{0,62}")
_EMAIL_LOCAL: Final = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}")
# What a reference into a secrets manager looks like; anything else (a raw token) is refused.
_SECRET_REFERENCES: Final = (
    re.compile(
        r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}"
    ),
    re.compile(r"arn:aws[a-z-]*:ssm:[a-z0-9-]+:[0-9]{12}:parameter/[A-Za-z0-9/_.-]{1,1011}"),
    re.compile(
        r"projects/[a-z0-9-]{1,63}/secrets/[A-Za-z0-9_-]{1,255}(/versions/(latest|[0-9]+))?"
    ),
    re.compile(
        r"https://[a-z0-9-]{3,24}\.vault\.azure\.net/secrets/[A-Za-z0-9-]{1,127}(/[0-9a-f]{32})?"
    ),
    re.compile(r"vault:[A-Za-z0-9_/.-]{1,512}(#[A-Za-z0-9_.-]{1,128})?"),
)


def _fail(field: str, rule: str) -> ValidationError:
    return ValidationError(f"{field}: {rule}")


def text(
    value: object, *, field: str, max_length: int = MAX_TEXT, allow_empty: bool = False
) -> str:
    """A string without NUL characters, at most ``max_length`` characters, kept as given."""
    if not isinstance(value, str):
        raise _fail(field, f"must be a string, not {type(value).__name__}")
    if "\x00" in value:
        raise _fail(field, "must not contain NUL characters")
    if not allow_empty and not value.strip():
        raise _fail(field, "must not be empty or blank")
    if len(value) > max_length:
        raise _fail(field, f"must be at most {max_length} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(field, "must be valid Unicode (no lone surrogates)") from None
    return value


def optional_text(value: object, *, field: str, max_length: int = MAX_TEXT) -> str | None:
    """Like :func:`text`, but ``None`` passes through."""
    return None if value is None else text(value, field=field, max_length=max_length)


def choice(value: object, *, field: str, allowed: Iterable[str]) -> str:
    """One of ``allowed`` exactly."""
    options = tuple(allowed)
    if not isinstance(value, str) or value not in options:
        raise _fail(field, f"must be one of {', '.join(options)}")
    return value


def _pattern(value: object, pattern: re.Pattern[str], *, field: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _fail(field, rule)
    return value


def slack_team_id(value: object) -> str:
    """A Slack team (workspace) id: ``T`` or ``E`` and upper-case letters and digits."""
    return _pattern(value, _SLACK_TEAM_ID, field="slack_team_id", rule="must look like T0123ABCD")


def slack_enterprise_id(value: object) -> str | None:
    """A Slack Enterprise Grid id (``E…``), or ``None``."""
    if value is None:
        return None
    return _pattern(
        value, _SLACK_ENTERPRISE_ID, field="slack_enterprise_id", rule="must look like E0123ABCD"
    )


def slack_user_id(value: object) -> str:
    """A Slack user id: ``U``, ``W`` or ``B`` and upper-case letters and digits."""
    return _pattern(value, _SLACK_USER_ID, field="slack_user_id", rule="must look like U0123ABCD")


def resource_name(value: object, *, field: str) -> str:
    """A short lower-case name such as a rate-limit resource or bucket."""
    return _pattern(
        value, _RESOURCE_NAME, field=field, rule="must match [a-z][a-z0-9_.:-]*, 63 at most"
    )


def domain(value: object, *, field: str = "email_domain") -> str:
    """A domain in canonical form: lower case, IDNA (punycode), no leading ``@`` or trailing dot."""
    raw = text(value, field=field, max_length=253).strip().lstrip("@").rstrip(".").lower()
    if not raw or any(ch.isspace() for ch in raw):
        raise _fail(field, "must be a domain such as example.com")
    try:
        encoded = idna.encode(raw, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise _fail(field, "must be a valid internationalised domain name") from None
    if "." not in encoded or len(encoded) > 253:
        raise _fail(field, "must be a domain such as example.com")
    return encoded


def email(value: object, *, field: str = "slack_email") -> str:
    """An email address; the domain is canonicalised like :func:`domain`."""
    raw = text(value, field=field, max_length=320).strip()
    local, at, host = raw.rpartition("@")
    if not at or not _EMAIL_LOCAL.fullmatch(local):
        raise _fail(field, "must be an email address such as name@example.com")
    return f"{local}@{domain(host, field=field)}"


def optional_email(value: object, *, field: str = "slack_email") -> str | None:
    """Like :func:`email`, but ``None`` passes through."""
    return None if value is None else email(value, field=field)


def domain_of(email_or_domain: object, *, field: str = "email_or_domain") -> str:
    """The canonical domain of an email address, or of a bare domain."""
    raw = text(email_or_domain, field=field, max_length=320).strip()
    return domain(raw.rpartition("@")[2], field=field)


def secret_reference(value: object, *, field: str = "credentials_secret_id") -> str:
    """A reference into a secrets manager (AWS ARN, GCP, Azure Key Vault, ``vault:``)."""
    raw = text(value, field=field, max_length=2048).strip()
    if not any(pattern.fullmatch(raw) for pattern in _SECRET_REFERENCES):
        raise _fail(
            field,
            "must be a secrets-manager reference (arn:aws:secretsmanager:…, "
            "projects/…/secrets/…, https://….vault.azure.net/secrets/…, vault:…), "
            "never a raw token",
        )
    return raw


def uuid_value(value: object, *, field: str) -> uuid.UUID:
    """A UUID, given as :class:`uuid.UUID` or its string form; always a plain ``uuid.UUID``."""
    if isinstance(value, uuid.UUID):
        # A subclass may render itself as anything: keep its 128 bits, not its methods.
        return value if type(value) is uuid.UUID else canonical_uuid(value)
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise _fail(field, "must be a UUID")


def canonical_uuid(value: uuid.UUID) -> uuid.UUID:
    """A plain :class:`uuid.UUID` of the same 128 bits, whatever subclass ``value`` is."""
    try:
        return uuid.UUID(int=int(value.int))
    except (AttributeError, TypeError, ValueError):  # not a UUID at all: a str, an int…
        raise _fail("uuid", "must be a UUID") from None


def optional_uuid(value: object, *, field: str) -> uuid.UUID | None:
    """Like :func:`uuid_value`, but ``None`` passes through."""
    return None if value is None else uuid_value(value, field=field)


def boolean(value: object, *, field: str) -> bool:
    """``True`` or ``False`` exactly (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise _fail(field, "must be True or False")
    return value


def integer(value: object, *, field: str, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    """An ``int`` (not a ``bool``) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, "must be an integer")
    if not minimum <= value <= maximum:
        raise _fail(field, f"must be between {minimum} and {maximum}")
    return value


def list_limit(value: object) -> int:
    """The ``limit`` of a listing: an integer from 1 to :data:`MAX_LIST_LIMIT`."""
    return integer(value, field="limit", minimum=1, maximum=MAX_LIST_LIMIT)


def positive_number(
    value: object, *, field: str, maximum: float = 1e12, minimum: float | None = None
) -> float:
    """A finite number above zero (at least ``minimum`` if given), at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(field, "must be a number")
    number = float(value)
    low_ok = number > 0 if minimum is None else number >= minimum
    if not math.isfinite(number) or not low_ok or number > maximum:
        low = "greater than 0" if minimum is None else f"at least {minimum:g}"
        raise _fail(field, f"must be {low} and at most {maximum:g}")
    return number


def aware_datetime(value: object, *, field: str) -> datetime | None:
    """A timezone-aware datetime, or ``None``; a naive one is refused, not guessed."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise _fail(field, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise _fail(field, "must be timezone-aware (UTC recommended)")
    return value


def ip_address(value: object, *, field: str = "ip_address") -> str | None:
    """An IPv4 or IPv6 address in canonical form, or ``None``."""
    if value is None:
        return None
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    raw = text(value, field=field, max_length=64).strip()
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise _fail(field, "must be an IPv4 or IPv6 address") from None


class _Budget:
    """Bytes a JSON value may still take; spent while it is walked, so a huge value is
    refused after a bounded amount of work rather than after all of it."""

    __slots__ = ("field", "left", "limit")

    def __init__(self, field: str, limit: int) -> None:
        self.field = field
        self.limit = limit
        self.left = limit

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise _too_large(self.field, self.limit)


def _too_large(field: str, limit: int) -> ValidationError:
    return _fail(field, f"must be at most {limit} bytes as JSON")


def json_value(value: object, *, field: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> Any:
    """A JSON-compatible value PostgreSQL's ``jsonb`` accepts (no NUL, finite numbers).

    At most ``max_bytes`` bytes as compact UTF-8 JSON and :data:`MAX_JSON_DEPTH`
    levels deep. The walk stops as soon as either limit is certainly exceeded.
    """
    return _exact_size_checked(_json(value, field, _Budget(field, max_bytes), 0), field, max_bytes)


def _exact_size_checked(result: Any, field: str, max_bytes: int) -> Any:
    # The walk counted a lower bound of the size: escapes and UTF-8 may add more.
    size = len(json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > max_bytes:
        raise _too_large(field, max_bytes)
    return result


def _json(value: object, field: str, budget: _Budget, depth: int) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise _fail(field, f"must be nested at most {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, bool | int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
            raise _fail(field, "holds an integer too large for JSON")
        budget.spend(1)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(field, "must not hold NaN or infinity")
        if abs(value) >= _FLOAT_EXPONENT_FROM:
            # Python writes such floats as 1e+16; jsonb keeps the number and gives back
            # 10000000000000000, an int: refuse rather than change the value's type.
            raise _fail(field, "floats of 1e16 or more do not round-trip; pass an int")
        budget.spend(1)
        return value
    if isinstance(value, str):
        budget.spend(len(value) + 2)
        return text(value, field=field, max_length=MAX_LONG_TEXT, allow_empty=True)
    if isinstance(value, Mapping):
        budget.spend(2)
        result: dict[str, Any] = {}
        for n, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise _fail(field, "must have string keys")
            budget.spend(len(key) + (4 if n else 3))  # quotes, colon, and a comma after the first
            text(key, field=field, max_length=MAX_NAME, allow_empty=True)
            result[key] = _json(item, field, budget, depth + 1)
        return result
    if isinstance(value, list | tuple):
        return _json_array(value, field, budget, depth)
    raise _fail(field, f"must be JSON-compatible, not {type(value).__name__}")


def _json_array(items: Iterable[object], field: str, budget: _Budget, depth: int) -> list[Any]:
    budget.spend(2)
    result = []
    for n, item in enumerate(items):
        budget.spend(1 if n else 0)  # the comma after the first
        result.append(_json(item, field, budget, depth + 1))
    return result


def json_object(
    value: object, *, field: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES
) -> dict[str, Any]:
    """A JSON object (a mapping with string keys), bounded like :func:`json_value`."""
    if not isinstance(value, Mapping):
        raise _fail(field, "must be a mapping")
    result: dict[str, Any] = json_value(value, field=field, max_bytes=max_bytes)
    return result


def json_list(value: object, *, field: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> list[Any]:
    """A JSON array, given as a list or tuple, bounded like :func:`json_value`."""
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _fail(field, "must be a list")
    result: list[Any] = json_value(value, field=field, max_bytes=max_bytes)
    return result


def json_items(value: object, *, field: str, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> list[Any]:
    """A JSON array, given as any iterable but a string, bytes or a mapping (never split one).

    A generator is consumed only as far as the size limit allows.
    """
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, Iterable):
        raise _fail(field, "must be a list")
    items: list[Any] = _exact_size_checked(
        _json_array(value, field, _Budget(field, max_bytes), 0), field, max_bytes
    )
    return items


def url_safe_base64(text: str) -> bytes:
    """The bytes of url-safe base64 ``text`` (padding optional); ``b""`` when it is not
    base64, so the caller's own error (which never quotes a key) is the one raised."""
    text = text.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return b""
