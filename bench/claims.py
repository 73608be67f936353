"""The verified claim against the plain setting: the same layer, the same database, one run.

Row-level security admits a tenant's rows only to a claim the database
verifies: the tenant policies compare with ``sfdb_claimed_tenant()``, and the
check that opens a unit of work (``sfdb_require_claim()``) calls it too. To
measure what that verification costs, the layer's turns on the compared
workloads run twice, back to back: as the database is (*verified*), and with
the database trusting the claim's tenant without verifying it (*plain*): every
policy that calls ``sfdb_claimed_tenant()`` and every function of the schema
that does (``sfdb_require_claim()``, which still checks that the tenant is
live) read the tenant straight from the claim's text instead,
:data:`PLAIN_TENANT`, as the policies once read ``app.tenant_id``. The client
is the same code sending the same messages; the data, the statistics and the
cache are the same.

:func:`trust` switches a database to plain in place (``ALTER POLICY``,
``CREATE OR REPLACE FUNCTION``, one transaction, as the bench's login, a
superuser) and returns the verified definitions as the database held them;
:func:`restore` puts those back verbatim. A pool opened after either plans
its statements anew, under the warm-up. :func:`verifies` tells whether a
database is as migrated (a kept database that a stopped run left plain is
loaded anew).

:func:`verification_cost` measures, on the server, what one verification
costs, how many an operation of the layer makes, and the server's CPU per
operation in both cases.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg

from bench.impls.base import HandlerEvent, tenant_preamble

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from bench.dataset import Dataset
    from bench.impls.base import BenchTenant, Implementation

VERIFIED_TENANT: Final = "sfdb_claimed_tenant()"
PLAIN_TENANT: Final = (
    "NULLIF(split_part(current_setting('app.tenant_claim', true), '.', 3), '')::uuid"
)
"""The claim's tenant (its third part), as the plain setting was read: trusted, unverified."""
_CALL: Final = re.compile(r"(?:public\.)?sfdb_claimed_tenant\(\)")
_PLAIN_MARK: Final = "split_part(current_setting('app.tenant_claim'"
LOCK_TIMEOUT: Final = "10s"

_POLICIES: Final = """
SELECT tablename, policyname, qual, with_check FROM pg_policies
WHERE schemaname = 'public'
  AND (strpos(coalesce(qual, '') || coalesce(with_check, ''), 'sfdb_claimed_tenant()') > 0
       OR strpos(coalesce(qual, '') || coalesce(with_check, ''), $1) > 0)
ORDER BY tablename, policyname
"""
_FUNCTIONS: Final = """
SELECT p.oid::regprocedure::text AS name, pg_get_functiondef(p.oid) AS definition
FROM pg_proc p
WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
  AND p.proname <> 'sfdb_claimed_tenant'
  AND (strpos(p.prosrc, 'sfdb_claimed_tenant()') > 0 OR strpos(p.prosrc, $1) > 0)
ORDER BY 1
"""


@dataclass(frozen=True, slots=True)
class Policy:
    """One row-level security policy's expressions, as PostgreSQL shows them."""

    table: str
    name: str
    using: str | None
    check: str | None

    def alter(self, *, using: str | None, check: str | None) -> str:
        """``ALTER POLICY`` giving it ``using`` and ``check``."""
        clauses = "".join(
            [
                "" if using is None else f" USING ({using})",
                "" if check is None else f" WITH CHECK ({check})",
            ]
        )
        return f'ALTER POLICY "{self.name}" ON public."{self.table}"{clauses}'


@dataclass(frozen=True, slots=True)
class Verified:
    """What a database verifies claims with: the policies and the functions calling the check."""

    policies: tuple[Policy, ...]
    functions: tuple[tuple[str, str], ...]
    """``(signature, CREATE OR REPLACE FUNCTION …)`` of each function calling it."""


def _plain(text: str | None) -> str | None:
    return None if text is None else _CALL.sub(f"({PLAIN_TENANT})", text)


def _is_verified(text: str | None) -> bool:
    return text is None or (_PLAIN_MARK not in text and "sfdb_claimed_tenant()" in text)


async def _read(conn: asyncpg.Connection) -> tuple[Verified, bool]:
    """The definitions, and whether all of them verify (none left plain, at least one policy)."""
    policies = tuple(
        Policy(row["tablename"], row["policyname"], row["qual"], row["with_check"])
        for row in await conn.fetch(_POLICIES, _PLAIN_MARK)
    )
    functions = tuple(
        (row["name"], row["definition"]) for row in await conn.fetch(_FUNCTIONS, _PLAIN_MARK)
    )
    verified = (
        bool(policies)
        and all(_is_verified(p.using) and _is_verified(p.check) for p in policies)
        and all(_is_verified(definition) for _, definition in functions)
    )
    return Verified(policies, functions), verified


async def verifies(dsn: str) -> bool:
    """Whether the database at ``dsn`` verifies claims everywhere, as migrated."""
    conn = await asyncpg.connect(dsn)
    try:
        _, verified = await _read(conn)
    finally:
        await conn.close()
    return verified


async def trust(dsn: str) -> Verified:
    """Make the database at ``dsn`` trust the claim's tenant unverified; what it verified with.

    Refuses a database that does not verify claims everywhere to begin with: its
    definitions could not be put back.
    """
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            found, verified = await _read(conn)
            if not verified:
                raise RuntimeError(
                    "the tenant policies or functions of this database do not all verify "
                    "claims (a stopped run may have left them plain): load it anew"
                )
            for policy in found.policies:
                await conn.execute(
                    policy.alter(using=_plain(policy.using), check=_plain(policy.check))
                )
            for _name, definition in found.functions:
                await conn.execute(_plain(definition) or definition)
    finally:
        await conn.close()
    return found


async def restore(dsn: str, verified: Verified) -> None:
    """Put back the definitions :func:`trust` returned, verbatim."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            for policy in verified.policies:
                await conn.execute(policy.alter(using=policy.using, check=policy.check))
            for _name, definition in verified.functions:
                await conn.execute(definition)
            _, now = await _read(conn)
            if not now:
                raise RuntimeError("the verified tenant policies did not come back")
    finally:
        await conn.close()


# -- what one verification costs on the server ------------------------------------------

CALLS: Final = 20_000
"""Evaluations per timing of one expression in a loop."""
COUNTED_OPS: Final = 200
"""Operations of each kind whose verifications are counted."""
SERVER_OPS: Final = 600
"""Operations of each kind, per variant and repetition, whose server CPU is read."""
WARM_OPS: Final = 50
KINDS: Final = ("handler", "recent", "for_user")


@dataclass(frozen=True, slots=True)
class Cost:
    """What verifying claims costs the server."""

    loop_us: float
    """Server time of one ``sfdb_claimed_tenant()`` call among ``CALLS`` in one statement."""
    plain_loop_us: float
    """The same for reading the claim's tenant unverified (:data:`PLAIN_TENANT`)."""
    calls: dict[str, float]
    """Operation -> ``sfdb_claimed_tenant()`` calls per operation of the layer (empty: not
    counted, without a superuser)."""
    server_us: dict[str, tuple[float, float]]
    """Operation -> the server's CPU µs per operation, verified and plain, one connection
    (empty: the server's processes are not readable here)."""
    loop_calls: int = CALLS
    server_ops: int = SERVER_OPS


def operations(impl: Implementation, data: Dataset) -> dict[str, Callable[[], Awaitable[object]]]:
    """One handler call, recent-meetings read and user's-meetings read of ``impl``, in turn
    over the tenants (each call a new recording)."""
    tenants = data.tenants
    sequence = 0

    def tenant() -> BenchTenant:
        return tenants[sequence % len(tenants)]

    def handler() -> Awaitable[object]:
        nonlocal sequence
        sequence += 1
        chosen = tenant()
        return impl.handler(
            HandlerEvent(
                slack_team_id=chosen.slack_team_id,
                slack_user_id=chosen.slack_user_ids[sequence % len(chosen.slack_user_ids)],
                fathom_recording_id=f"claims-{impl.key}-{time.time_ns()}-{sequence}",
                title="Weekly pipeline review",
            )
        )

    def recent() -> Awaitable[object]:
        nonlocal sequence
        sequence += 1
        return impl.recent_meetings(tenant())

    def for_user() -> Awaitable[object]:
        nonlocal sequence
        sequence += 1
        chosen = tenant()
        return impl.user_meetings(chosen, chosen.user_ids[sequence % len(chosen.user_ids)])

    return {"handler": handler, "recent": recent, "for_user": for_user}


async def verification_cost(data: Dataset, verified: Implementation, plain: Implementation) -> Cost:
    """What verifying claims costs the server, three ways.

    * One call in a loop: ``EXPLAIN ANALYZE`` of ``CALLS`` calls in one statement,
      in a tenant transaction as the app role with a claim of the bench's key.
    * Calls per operation of the layer: counted with ``track_functions`` on for the
      database while ``COUNTED_OPS`` operations of each kind run on one connection,
      closed before the counts are read (a backend reports its counts when it ends).
    * The server's CPU per operation, ``verified`` and ``plain`` (the layer, and the
      same on the database trusting the claim): ``SERVER_OPS`` operations of each
      kind on one connection, twice each (verified, plain, plain, verified), the
      backend's CPU time read from ``/proc`` when the server runs on this machine.
    """
    tenant = data.tenants[0]
    conn = await asyncpg.connect(data.dsn)
    try:
        async with conn.transaction():
            await conn.execute(tenant_preamble(tenant.id, begin=False, check_tenant=False))
            loop = await _execution_ms(conn, VERIFIED_TENANT)
            plain_loop = await _execution_ms(conn, PLAIN_TENANT)
        calls = await _count_calls(conn, data, verified)
        server: dict[str, tuple[float, float]] = {}
        for kind in KINDS:
            found: dict[str, list[float]] = {verified.key: [], plain.key: []}
            for impl in (verified, plain, plain, verified):
                cpu = await _server_cpu(conn, impl, data, kind)
                if cpu is not None:
                    found[impl.key].append(cpu)
            if found[verified.key] and found[plain.key]:
                server[kind] = (
                    statistics.mean(found[verified.key]),
                    statistics.mean(found[plain.key]),
                )
    finally:
        await conn.close()
    return Cost(
        loop_us=loop * 1000 / CALLS,
        plain_loop_us=plain_loop * 1000 / CALLS,
        calls=calls,
        server_us=server,
    )


async def _execution_ms(conn: asyncpg.Connection, expression: str) -> float:
    """Server time of ``CALLS`` evaluations of ``expression``, best of three, ms."""
    sql = f"SELECT count({expression}) FROM generate_series(1, {CALLS})"  # noqa: S608 - constants
    best = float("inf")
    for _ in range(3):
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {sql}")
        best = min(best, float(json.loads(plan)[0]["Execution Time"]))
        if await conn.fetchval(sql) != CALLS:
            raise RuntimeError(f"{expression}: the bench's claim was not admitted")
    return best


async def _count_calls(
    conn: asyncpg.Connection, data: Dataset, layer: Implementation
) -> dict[str, float]:
    """``sfdb_claimed_tenant()`` calls per operation of the layer (empty without a superuser)."""
    database = await conn.fetchval("SELECT current_database()")
    try:
        await conn.execute(f"ALTER DATABASE \"{database}\" SET track_functions = 'pl'")
    except asyncpg.InsufficientPrivilegeError:
        return {}
    try:
        oids = await conn.fetchval(
            "SELECT array[to_regprocedure('public.sfdb_claimed_tenant()')::oid, "
            "to_regprocedure('public.sfdb_require_claim()')::oid]"
        )
        found: dict[str, float] = {}
        for name, operation in operations(layer, data).items():
            for oid in oids:
                await conn.execute("SELECT pg_stat_reset_single_function_counters($1)", oid)
            await layer.open(data.dsn, pool_size=1)
            try:
                for _ in range(COUNTED_OPS):
                    await operation()
            finally:
                await layer.close()
            found[name] = await _calls_once_reported(conn, oids) / COUNTED_OPS
    finally:
        await conn.execute(f'ALTER DATABASE "{database}" RESET track_functions')
    return found


async def _calls_once_reported(conn: asyncpg.Connection, oids: list[int]) -> float:
    """``sfdb_claimed_tenant()``'s calls once the closed backend's counts are in (each unit of
    work calls ``sfdb_require_claim()`` once: ``COUNTED_OPS`` of them say they all are)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        verify, checks = [
            await conn.fetchval(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcid = $1",
                oid,
            )
            for oid in oids
        ]
        if checks >= COUNTED_OPS:
            return float(verify)
        await asyncio.sleep(0.05)
    raise RuntimeError("the verifications of the layer's backend were not reported")


async def _server_cpu(
    conn: asyncpg.Connection, impl: Implementation, data: Dataset, kind: str
) -> float | None:
    """The CPU µs per ``kind`` operation of ``impl``'s one backend, or ``None`` (unreadable)."""
    operation = operations(impl, data)[kind]
    await impl.open(data.dsn, pool_size=1)
    try:
        for _ in range(WARM_OPS):
            await operation()
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        if len(pids) != 1:
            return None
        pid = int(pids[0]["pid"])
        before = _process_cpu(pid)
        for _ in range(SERVER_OPS):
            await operation()
        after = _process_cpu(pid)
    finally:
        await impl.close()
    if before is None or after is None:
        return None
    return (after - before) * 1e6 / SERVER_OPS


def _process_cpu(pid: int) -> float | None:
    """CPU seconds of server process ``pid`` on this machine (``schedstat``), if it is one."""
    proc = Path("/proc") / str(pid)
    try:
        if b"postgres" not in (proc / "cmdline").read_bytes():
            return None
        return int((proc / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
