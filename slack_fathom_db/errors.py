"""The exception hierarchy, and the translation of database errors into it.

Every error this package raises on purpose is a :class:`SlackFathomDBError`.
Database errors are translated at the repository boundary by
:func:`translate` and chained ``from`` the original, so the cause stays
available to a debugger while the message stays free of parameters: a
message names the rule (a constraint, a column, an SQLSTATE), never a value.
"""

from __future__ import annotations

import asyncio
import re
from typing import Final

import asyncpg
from sqlalchemy import exc as sa_exc

__all__ = [
    "ConfigurationError",
    "Conflict",
    "DatabaseUnavailable",
    "InvalidStateTransition",
    "NotFound",
    "PoolExhausted",
    "RateLimitExceeded",
    "SerializationConflict",
    "SlackFathomDBError",
    "StatementTimeout",
    "TenantIsolationError",
    "TenantNotFound",
    "TransactionAborted",
    "UsageError",
    "ValidationError",
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


class DatabaseUnavailable(SlackFathomDBError):
    """The database cannot be reached, the pool is exhausted, or a statement timed out."""


class PoolExhausted(DatabaseUnavailable):
    """Every pooled connection stayed in use for ``DATABASE_POOL_TIMEOUT``; nothing was sent."""


class StatementTimeout(DatabaseUnavailable):
    """A statement ran past ``DATABASE_STATEMENT_TIMEOUT_MS`` and the server cancelled it."""


# SQLSTATE classes and codes, as PostgreSQL documents them (Appendix A).
_UNIQUE_VIOLATION: Final = "23505"
_FOREIGN_KEY_VIOLATION: Final = "23503"
_CHECK_VIOLATION: Final = "23514"
_NOT_NULL_VIOLATION: Final = "23502"
_EXCLUSION_VIOLATION: Final = "23P01"
_INSUFFICIENT_PRIVILEGE: Final = "42501"
_SERIALIZATION_FAILURE: Final = "40001"
_DEADLOCK_DETECTED: Final = "40P01"
_QUERY_CANCELED: Final = "57014"
_LOCK_NOT_AVAILABLE: Final = "55P03"
_UNKNOWN_DATABASE: Final = "3D000"
_TENANT_MISSING: Final = "P0002"  # raised by sfdb_require_tenant() in the migrations


def _sqlstate(exc: BaseException) -> str | None:
    """Find the SQLSTATE of a database error, whether wrapped by SQLAlchemy or not."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None) or getattr(current, "pgcode", None)
        if isinstance(code, str):
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


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
    if isinstance(
        exc, (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)
    ):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.CannotConnectNowError):
        return True
    code = _sqlstate(exc)
    if code is not None and code.startswith(("08", "57P")):
        return True
    orig = getattr(exc, "orig", None)
    cause = exc.__cause__
    return any(
        isinstance(inner, (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError))
        for inner in (orig, cause, getattr(orig, "__cause__", None))
    )


def translate(exc: BaseException, *, action: str) -> SlackFathomDBError:
    """Map a database error raised while doing ``action`` to our hierarchy.

    The returned error is meant to be raised ``from exc``. Its message names
    the action, the rule and the SQLSTATE, and never a parameter value.
    """
    if isinstance(exc, SlackFathomDBError):
        return exc
    if isinstance(exc, sa_exc.TimeoutError):
        return PoolExhausted(
            f"{action}: the connection pool is exhausted (no connection became free "
            "within DATABASE_POOL_TIMEOUT); raise DATABASE_POOL_SIZE or shorten units of work"
        )
    code = _sqlstate(exc)
    rule = _constraint(exc)
    where = f" ({rule})" if rule else ""
    if code in (_UNIQUE_VIOLATION, _EXCLUSION_VIOLATION):
        return Conflict(f"{action}: a live row with the same key already exists{where}")
    if code == _FOREIGN_KEY_VIOLATION:
        return NotFound(f"{action}: a referenced row does not exist in this tenant{where}")
    if code in (_CHECK_VIOLATION, _NOT_NULL_VIOLATION) or (code or "").startswith("22"):
        return ValidationError(f"{action}: the database rejected a value{where} [{code}]")
    if code == _INSUFFICIENT_PRIVILEGE:
        return TenantIsolationError(
            f"{action}: the database refused the statement: row-level security, or a "
            f"privilege the role in effect does not hold{where}"
        )
    if code in (_SERIALIZATION_FAILURE, _DEADLOCK_DETECTED):
        return SerializationConflict(f"{action}: a concurrent transaction won [{code}]; retry")
    if code == _TENANT_MISSING:
        return TenantNotFound(f"{action}: the tenant is unknown or soft-deleted")
    if code is not None and (code.startswith("28") or code == _UNKNOWN_DATABASE):
        return DatabaseUnavailable(
            f"{action}: the server refused the login (check the user, password and database "
            f"of DATABASE_URL) [{code}]"
        )
    if code is not None and code.startswith("53"):  # insufficient resources
        return DatabaseUnavailable(
            f"{action}: the server is out of resources (too many connections?) [{code}]"
        )
    if code == _LOCK_NOT_AVAILABLE:
        return StatementTimeout(f"{action}: waited too long for a row lock (lock timeout) [{code}]")
    if code == _QUERY_CANCELED:
        return StatementTimeout(
            f"{action}: the statement was cancelled (statement timeout) [{code}]"
        )
    if "is not permitted to log in" in str(exc) and "remote node" in str(exc):
        return ConfigurationError(
            f"{action}: a Citus worker refused a login of the role the coordinator connects "
            "as (after SET LOCAL ROLE, the app role): it must be able to log in on every "
            "node (sfdb distribute grants LOGIN; pg_hba.conf must admit it)"
        )
    if isinstance(exc, TimeoutError):
        return DatabaseUnavailable(
            f"{action}: the database did not answer in time (client-side bound: "
            "DATABASE_CONNECT_TIMEOUT to connect, the statement timeout plus a margin "
            "for a statement)"
        )
    if _is_connection_error(exc):
        return DatabaseUnavailable(f"{action}: the database is unreachable ({type(exc).__name__})")
    return SlackFathomDBError(f"{action}: unexpected database error [{code or type(exc).__name__}]")
