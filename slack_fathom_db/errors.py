"""The exception hierarchy, and the translation of database errors into it.

Every error this package raises on purpose is a :class:`SlackFathomDBError`.
Database errors are translated once, where statements run (the runner, and
the pool checkout), by :func:`translate` and chained ``from`` the original, so the cause stays
available to a debugger while the message stays free of parameters: a
message names the rule (a constraint, a column, an SQLSTATE), never a value.
"""

from __future__ import annotations

import re
from typing import Final

import asyncpg
from sqlalchemy import exc as sa_exc

__all__ = [
    "ArchiveInvalid",
    "ConfigurationError",
    "Conflict",
    "DatabaseUnavailable",
    "InvalidStateTransition",
    "NotFound",
    "PoolExhausted",
    "RateLimitExceeded",
    "SchemaMismatch",
    "SerializationConflict",
    "SlackFathomDBError",
    "StatementTimeout",
    "TenantClaimRefused",
    "TenantIsolationError",
    "TenantNotFound",
    "TransactionAborted",
    "UsageError",
    "ValidationError",
    "sqlstate_of",
    "translate",
]


class SlackFathomDBError(Exception):
    """Base class of every error raised by slack_fathom_db."""


class TenantNotFound(SlackFathomDBError):
    """The tenant is unknown or soft-deleted."""


class NotFound(SlackFathomDBError):
    """The row does not exist, is soft-deleted, or belongs to another tenant."""


class ValidationError(SlackFathomDBError, ValueError):
    """Input breaks a rule; nothing was written."""


class Conflict(SlackFathomDBError):
    """The write collides with a concurrent or existing one (unique key, lost update)."""


class SerializationConflict(Conflict):
    """A serialization failure or deadlock: the transaction lost a race; a rerun is safe."""


class RateLimitExceeded(Conflict):
    """A rate-limit charge deferred to commit no longer fits; the unit of work rolled back."""


class ArchiveInvalid(ValidationError):
    """A tenant export does not hold what its manifest says (a file changed, missing or
    extra rows, rows of another workspace, an audit chain that does not recompute or does not
    hold a kept head), or is malformed (a line that is not a row, too long, not UTF-8; a file
    that is not a regular file); nothing was written."""


class InvalidStateTransition(SlackFathomDBError):
    """A meeting was asked to move to a status its current status does not allow."""


class TenantIsolationError(SlackFathomDBError):
    """A statement tried to cross a tenant boundary and the database refused it."""


class UsageError(SlackFathomDBError, RuntimeError):
    """The API was used out of order: a unit of work entered twice, shared across tasks, …"""


class TransactionAborted(UsageError):
    """A statement of the transaction failed, so PostgreSQL aborted it; roll back and retry."""


class ConfigurationError(SlackFathomDBError):
    """The database or cluster is not set up as the layer needs (e.g. a Citus node
    refuses the app role's login); retrying does not help, changing the set-up does."""


class TenantClaimRefused(ConfigurationError):
    """The database did not accept the unit of work's signed tenant claim; the message says
    why: it holds no key of that id (``sfdb migrate`` installs ``DATABASE_TENANT_KEY``), the
    signature does not verify with its key of that id, the clocks of the application and
    the database disagree, or the claim was made for another server connection."""


class SchemaMismatch(ConfigurationError):
    """A tenant export was made at another schema revision than the database's: migrate one
    side (``sfdb migrate``) so both are at the same revision."""


class DatabaseUnavailable(SlackFathomDBError):
    """The database cannot be reached, the pool is exhausted, or a statement timed out."""


class PoolExhausted(DatabaseUnavailable):
    """Every pooled connection stayed in use for ``DATABASE_POOL_TIMEOUT``; nothing was sent."""


class StatementTimeout(DatabaseUnavailable):
    """A statement ran past ``DATABASE_STATEMENT_TIMEOUT_MS`` and the server cancelled it."""


# What a database error becomes, by SQLSTATE (PostgreSQL's Appendix A), or by its
# class or subclass (a prefix). Each message follows "<action>: "; {where} names the
# constraint when there is one, {code} is the SQLSTATE. Never a parameter value.
_RULES: Final[tuple[tuple[tuple[str, ...], type[SlackFathomDBError], str], ...]] = (
    (("23505", "23P01"), Conflict, "a live row with the same key already exists{where}"),
    (("23503",), NotFound, "a referenced row does not exist in this tenant{where}"),
    (("23514", "23502", "22"), ValidationError, "the database rejected a value{where} [{code}]"),
    (
        ("42501",),
        TenantIsolationError,
        "the database refused the statement: row-level security, or a privilege the role "
        "in effect does not hold{where}",
    ),
    (("40001", "40P01"), SerializationConflict, "a concurrent transaction won [{code}]; retry"),
    (("P0002",), TenantNotFound, "the tenant is unknown or soft-deleted"),  # sfdb_require_tenant
    (
        ("25P02",),
        TransactionAborted,
        "an earlier statement of the transaction failed or was cancelled; roll back",
    ),
    (
        ("28", "3D000"),
        DatabaseUnavailable,
        "the server refused the login (check the user, password and database of "
        "DATABASE_URL) [{code}]",
    ),
    (
        ("53",),
        DatabaseUnavailable,
        "the server is out of resources (too many connections?) [{code}]",
    ),
    (("55P03",), StatementTimeout, "waited too long for a row lock (lock timeout) [{code}]"),
    (("57014",), StatementTimeout, "the statement was cancelled (statement timeout) [{code}]"),
    (("08", "57P"), DatabaseUnavailable, "the database is unreachable [{code}]"),
)
_BY_SQLSTATE: Final = {code: (error, text) for codes, error, text in _RULES for code in codes}
_CITUS_LOGIN_REFUSED: Final = (
    "a Citus worker refused a login of the role the coordinator connects as (after SET "
    "LOCAL ROLE, the app role): it must be able to log in on every node (sfdb distribute "
    "grants LOGIN; pg_hba.conf must admit it)"
)
_CLIENT_TIMEOUT: Final = (
    "the database did not answer in time (client-side bound: DATABASE_CONNECT_TIMEOUT to "
    "connect, the statement timeout plus a margin for a statement)"
)
_POOL_EXHAUSTED: Final = (
    "the connection pool is exhausted (no connection became free within "
    "DATABASE_POOL_TIMEOUT); raise DATABASE_POOL_SIZE or shorten units of work"
)


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE somewhere in the cause chain of ``exc`` (SQLAlchemy or asyncpg), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str):
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


_CLAIM_REFUSED: Final = "SF001"


def _server_message(exc: BaseException) -> str:
    """The primary message of the server's error in the cause chain of ``exc``."""
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            break
        if isinstance(current, asyncpg.PostgresError):
            return str(current.args[0] if current.args else current)
        current = getattr(current, "orig", None) or current.__cause__
    return "tenant claim refused"


def _constraint(exc: BaseException) -> str | None:
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            return None
        name = getattr(current, "constraint_name", None)
        if isinstance(name, str):
            return name
        # A Citus coordinator passes on only the worker's message, which names the
        # shard's constraint: <constraint>_<shard id>.
        named = _NAMED_CONSTRAINT.search(str(getattr(current, "message", "") or ""))
        if named is not None:
            return _SHARD_SUFFIX.sub("", named.group(1))
        current = getattr(current, "orig", None) or current.__cause__
    return None


_NAMED_CONSTRAINT: Final = re.compile(r'constraint "([a-z0-9_]+)"')
_SHARD_SUFFIX: Final = re.compile(r"_[0-9]{6,}$")


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, ValueError):  # a client-side encoding error, not a lost link
        return False
    lost = (
        OSError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
    )
    orig = getattr(exc, "orig", None)
    return any(
        isinstance(inner, lost)
        for inner in (exc, orig, exc.__cause__, getattr(orig, "__cause__", None))
    )


def translate(exc: BaseException, *, action: str) -> SlackFathomDBError:
    """Map a database error raised while doing ``action`` to our hierarchy.

    The returned error is meant to be raised ``from exc``. Its message names
    the action, the rule and the SQLSTATE, and never a parameter value.
    """
    if isinstance(exc, SlackFathomDBError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):
        return PoolExhausted(f"{action}: {_POOL_EXHAUSTED}")
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        # The driver could not encode an argument: nothing was sent, the link is fine.
        return ValidationError(f"{action}: a value cannot be sent as its column's type")
    if "is not permitted to log in" in str(exc) and "remote node" in str(exc):
        return ConfigurationError(f"{action}: {_CITUS_LOGIN_REFUSED}")
    code = sqlstate_of(exc)
    if code == _CLAIM_REFUSED:
        # The layer's own function says why (migration 0008); it never quotes the claim.
        return TenantClaimRefused(f"{action}: {_server_message(exc)}")
    if code is not None:
        entry = _BY_SQLSTATE.get(code) or _BY_SQLSTATE.get(code[:3]) or _BY_SQLSTATE.get(code[:2])
        if entry is not None:
            error_class, message = entry
            rule = _constraint(exc)
            where = f" ({rule})" if rule else ""
            return error_class(f"{action}: " + message.format(where=where, code=code))
    if isinstance(exc, TimeoutError):
        return DatabaseUnavailable(f"{action}: {_CLIENT_TIMEOUT}")
    if _is_connection_error(exc):
        return DatabaseUnavailable(f"{action}: the database is unreachable ({type(exc).__name__})")
    return SlackFathomDBError(f"{action}: unexpected database error [{code or type(exc).__name__}]")
