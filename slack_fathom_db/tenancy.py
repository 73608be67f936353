"""Tenant identity and the directory of workspaces: the only surface not scoped to a tenant.

Invariants:

* A :data:`TenantId` is minted only here, by :class:`TenantDirectory` (and by
  :func:`tenant_id_from_trusted` for values read back from the database).
  Everything scoped to a tenant takes one, so the type checker shows where a
  tenant comes from.
* The directory reads and writes ``tenants`` only, one statement per call
  (autocommitted; behind PgBouncer in a transaction of its own), through
  three functions of the owner that the directory role may run (it holds no
  table, so it cannot list workspaces; the Slack installation stores of
  :mod:`slack_fathom_db.slack` run functions of the same kind).
* :func:`transaction_preamble` renders the statements that open every tenant
  transaction: ``BEGIN``, ``SET LOCAL ROLE <app role>``, ``SET LOCAL
  app.tenant_claim = '<signed claim>'`` (:mod:`slack_fathom_db.claims`: row-level
  security admits the tenant's rows only to a claim the database verifies),
  row security on, the statement, lock and idle-in-transaction timeouts, sent
  as one simple-protocol message (three on Citus, see there). ``SET LOCAL``
  (rather than ``set_config()``) is what Citus propagates to its workers; the
  claim is made from a validated :class:`uuid.UUID` and the role name is a
  validated identifier, so no input reaches the text unchecked.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final, NewType

from slack_fathom_db import validation
from slack_fathom_db.claims import ClaimIssuer
from slack_fathom_db.connections import BEGIN, SEARCH_PATH
from slack_fathom_db.errors import DatabaseUnavailable, TenantNotFound
from slack_fathom_db.models.tenants import PLAN_TIERS
from slack_fathom_db.runner import fetch_outside, open_runner, stale

if TYPE_CHECKING:
    from collections.abc import Callable

    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine

    from slack_fathom_db.claims import TenantKey
    from slack_fathom_db.runner import Runner
    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "TenantDirectory",
    "TenantId",
    "open_tenant",
    "outside_opener",
    "server_facts",
    "session_settings",
    "tenant_id_from_trusted",
    "transaction_preamble",
]

TenantId = NewType("TenantId", uuid.UUID)
"""The id of a live tenant, as resolved or installed by the directory."""


def tenant_id_from_trusted(value: uuid.UUID) -> TenantId:
    """Wrap a tenant id read back from the database (never from user input)."""
    return TenantId(value)


def transaction_preamble(
    claims: ClaimIssuer,
    *,
    settings: DatabaseSettings,
    check_tenant: bool,
    citus: bool = False,
) -> tuple[str, ...]:
    """The messages that open a tenant transaction (see the module docstring).

    On a single server, one message. On Citus, whose coordinator replays the
    whole text of a message holding ``SET LOCAL`` at the start of every remote
    transaction, ``BEGIN`` and the tenant check go in messages of their own.
    The check (``sfdb_require_claim()``) says why the database refused the
    claim, or that the tenant is unknown or soft-deleted.
    """
    local = "; ".join(
        [
            f'SET LOCAL ROLE "{settings.roles.app}"',
            # Nothing a session left behind (a temp table, another schema) can shadow
            # the layer's tables or functions.
            f"SET LOCAL search_path = {SEARCH_PATH}",
            claims.statement(),
            # What the login's own defaults (ALTER ROLE … SET) or a shared server session
            # may have changed: row security stays on, the layer's timeouts apply.
            "SET LOCAL row_security = on",
            f"SET LOCAL statement_timeout = {int(settings.statement_timeout_ms)}",
            "SET LOCAL lock_timeout = 0",
            # A caller that awaits something slow inside a unit of work loses its
            # connection (and its locks) after this, instead of holding them for ever.
            "SET LOCAL idle_in_transaction_session_timeout = "
            f"{int(settings.idle_in_transaction_timeout_ms)}",
        ]
    )
    check = ("SELECT sfdb_require_claim()",) if check_tenant else ()
    if citus:
        return (BEGIN, local, *check)
    return ("; ".join([BEGIN, local, *check]),)


def outside_opener(settings: DatabaseSettings) -> str | None:
    """How a statement outside any tenant transaction opens one, or ``None`` (no need).

    On a direct connection the directory role, the search path, row security
    and the timeouts are the session's own, set when the connection opens
    (:func:`session_settings`). Behind PgBouncer in transaction mode a session
    may belong to somebody else between transactions, so the statement runs in
    a transaction that sets all of them itself, with ``set_config()``: a Citus
    coordinator would replay a ``SET LOCAL ROLE`` on the connections it opens to
    its workers, where a function of the owner then runs as the owner, who may
    not take the directory role.
    """
    if not settings.pgbouncer:
        return None
    local = ", ".join(
        f"set_config('{name}', '{value}', true)"
        for name, value in _local_settings(settings, role=settings.roles.directory).items()
    )
    return f"{BEGIN}; SELECT {local}"


def _local_settings(settings: DatabaseSettings, *, role: str) -> dict[str, str]:
    """What a session must not have changed for the layer: role, path, row security, timeouts."""
    return {
        "role": role,
        "search_path": SEARCH_PATH,
        "row_security": "on",
        "statement_timeout": str(int(settings.statement_timeout_ms)),
        "lock_timeout": "0",
    }


def session_settings(settings: DatabaseSettings) -> dict[str, str]:
    """Settings every direct connection opens with: the directory role, a pinned path.

    The runtime login holds no privilege of its own (NOINHERIT): outside units
    of work it acts as the directory role. The rest overrides whatever defaults
    the login may have given itself (``ALTER ROLE CURRENT_USER SET …``), so
    statements outside units of work run under the layer's timeouts and with
    row security on. PgBouncer forwards none of these; there
    :func:`outside_opener` sets them per transaction instead.
    """
    if settings.pgbouncer:
        return {}
    return {
        **_local_settings(settings, role=settings.roles.directory),
        "default_transaction_read_only": "off",
        "default_transaction_isolation": "read committed",
    }


async def server_facts(runner: Runner) -> tuple[bool, int]:
    """Whether the database behind ``runner`` has Citus, and the backend's process id.

    Asked once in a pooled connection's life (the answers are kept in its
    ``info``), not once per unit of work. The process id is the server's own
    answer, not the one the driver was told at connect time (a proxy's, behind
    one); behind PgBouncer in transaction mode it names no particular backend.
    """
    known = runner.info.get(_FACTS_KEY)
    if known is None:
        (row,) = await runner.fetch(_FACTS, (), action="inspect the database")
        known = runner.info[_FACTS_KEY] = (bool(row[0]), int(row[1]))
    citus, pid = known
    return bool(citus), int(pid)


_FACTS_KEY: Final = "sfdb_server_facts"

_FACTS: Final = "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'citus'), pg_backend_pid()"


async def open_tenant(
    engine: AsyncEngine,
    settings: DatabaseSettings,
    *,
    key: TenantKey,
    tenant_id: TenantId | None,
    slack_team_id: str | None,
) -> tuple[Runner, TenantId]:
    """A runner whose transactions are the tenant's, its first one open and checked.

    A team id is resolved first, on the same connection. Every transaction opens
    with :func:`transaction_preamble` and a claim signed with ``key``; the first
    also checks the claim and that the tenant is live
    (:class:`TenantClaimRefused`, :class:`TenantNotFound`). A pooled connection
    that died since its last use fails before anything was done: one more
    attempt, on a fresh connection, is safe
    (:func:`slack_fathom_db.runner.stale`).
    """
    opener = outside_opener(settings)
    for attempt in (1, 2):
        runner = await open_runner(
            engine,
            settings,
            begin=None if opener is None else (lambda: (opener,)),
            autocommit=True,
            action="open unit of work",
        )
        try:
            tenant = tenant_id
            if slack_team_id is not None:
                tenant = await resolve_on(runner, slack_team_id)
            if tenant is None:
                raise TenantNotFound("unit_of_work: no live tenant for that slack_team_id")
            citus, backend = await server_facts(runner)
            # A claim names the server process it is for where one connection is one
            # process: not behind PgBouncer, nor on Citus (whose workers check it too).
            pid = 0 if settings.pgbouncer or citus else backend
            claims = ClaimIssuer(key, tenant, backend_pid=pid)
            runner.rescope(
                begin=_tenant_begin(claims, settings, citus=citus),
                renewal=claims,
                autocommit=False,
            )
            await runner.begin("open unit of work")
        except DatabaseUnavailable as exc:
            retry = attempt == 1 and stale(exc, runner)
            await runner.close(quiet=True)
            if not retry:
                raise
        except BaseException:
            await runner.close(quiet=True)
            raise
        else:
            return runner, tenant
    raise AssertionError("unreachable")  # pragma: no cover


def _tenant_begin(
    claims: ClaimIssuer, settings: DatabaseSettings, *, citus: bool
) -> Callable[[], tuple[str, ...]]:
    """What opens each transaction of a tenant's runner; the first also checks the tenant."""
    first = True

    def begin() -> tuple[str, ...]:
        nonlocal first
        check, first = first, False
        return transaction_preamble(claims, settings=settings, check_tenant=check, citus=citus)

    return begin


class TenantDirectory:
    """Maps Slack workspaces to tenants: ``install``, ``resolve`` and ``uninstall``."""

    def __init__(self, engine: AsyncEngine, settings: DatabaseSettings) -> None:
        self._engine = engine
        self._settings = settings
        self._opener = outside_opener(settings)

    async def install(
        self,
        *,
        slack_team_id: str,
        slack_team_name: str,
        plan_tier: str = "free",
        slack_enterprise_id: str | None = None,
    ) -> TenantId:
        """Create the tenant of a workspace, or return the existing one.

        Idempotent: a second install of a live workspace returns the same id
        and updates its name; installing a soft-deleted workspace reactivates
        it (same id, ``deleted_at`` cleared). One atomic statement.
        """
        team_id = validation.slack_team_id(slack_team_id)
        name = validation.text(slack_team_name, field="slack_team_name", max_length=255)
        tier = validation.choice(plan_tier, field="plan_tier", allowed=PLAN_TIERS)
        enterprise = validation.slack_enterprise_id(slack_enterprise_id)
        tenant = await self._call(
            _INSTALL, team_id, name, tier, enterprise, action="install tenant"
        )
        if tenant is None:  # the function always returns the row's id
            raise RuntimeError("install tenant: no id came back")
        return tenant

    async def uninstall(self, slack_team_id: str) -> TenantId | None:
        """Soft-delete the tenant of a workspace; idempotent (``None`` if none was live).

        For ``app_uninstalled`` events, which Slack may deliver more than once.
        The rows stay; :meth:`install` reactivates the same tenant.
        """
        team_id = validation.slack_team_id(slack_team_id)
        return await self._call(_UNINSTALL, team_id, action="uninstall tenant")

    async def resolve(self, slack_team_id: str) -> TenantId | None:
        """The tenant of a workspace; ``None`` if unknown or soft-deleted."""
        team_id = validation.slack_team_id(slack_team_id)
        return await self._call(_RESOLVE, team_id, action="resolve tenant")

    async def _call(self, sql: str, *args: object, action: str) -> TenantId | None:
        rows = await fetch_outside(
            self._engine, self._settings, sql, args, begin=self._opener, action=action
        )
        return _tenant_of(rows)


async def resolve_on(runner: Runner, slack_team_id: str) -> TenantId | None:
    """Resolve a validated Slack team id on a runner outside any tenant transaction."""
    return _tenant_of(await runner.fetch(_RESOLVE, (slack_team_id,), action="resolve tenant"))


def _tenant_of(rows: list[asyncpg.Record]) -> TenantId | None:
    """The tenant id one of the directory's functions returned, or ``None``."""
    return None if not rows or rows[0][0] is None else TenantId(rows[0][0])


# The directory's statements are functions of the owner (migration 0006): the directory
# role may run them and holds nothing else, so it never lists the workspaces.
_RESOLVE: Final = "SELECT sfdb_resolve_tenant($1)"
_INSTALL: Final = "SELECT sfdb_install_tenant($1, $2, $3, $4)"
_UNINSTALL: Final = "SELECT sfdb_uninstall_tenant($1)"
