"""The audit chain under contention: 32 writers in one workspace leave a chain that verifies.

Every workspace's audit events are chained as their transactions commit
(:mod:`slack_fathom_db.audit_chain`); writers of one workspace take turns on
its head while they commit. :func:`one_workspace_chain` installs a workspace
of its own, has :data:`WRITERS` units of work write :data:`EVENTS_EACH` events
each at once through the layer, then runs ``sfdb audit verify`` on it: the
chain must hold every event, in one place each, and verify.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING, Final

from bench.impls.base import APP_ROLE, TENANT_KEY, TOKEN_KEYS
from bench.impls.layer import LayerImpl
from bench.report import Target
from slack_fathom_db import DatabaseSettings
from slack_fathom_db.audit_chain import verify_audit_chains

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from bench.dataset import Dataset
    from bench.impls.base import Implementation
    from bench.workloads import Workload

WRITERS: Final = 32
EVENTS_EACH: Final = 50
NAME: Final = f"{WRITERS} concurrent writers in one workspace leave a valid audit chain"


async def targets(
    impls: Sequence[Implementation],
    workloads: Sequence[Workload],
    data: Dataset,
    *,
    log: Callable[[str], None],
) -> list[Target]:
    """The chain's target, when this run measures the layer's audit burst (else none)."""
    if not any(w.key == "audit" for w in workloads) or not any(i.key == "layer" for i in impls):
        return []
    log(f"{WRITERS} writers in one workspace: its audit chain")
    return [await one_workspace_chain(data)]


async def one_workspace_chain(data: Dataset) -> Target:
    """Write ``WRITERS`` x ``EVENTS_EACH`` events of a new workspace at once; verify its chain."""
    team = "T" + secrets.token_hex(5).upper()
    layer = LayerImpl()
    await layer.open(data.dsn, pool_size=WRITERS)
    try:
        db = layer.db
        tenant = await db.directory.install(slack_team_id=team, slack_team_name="Chain check")

        async def writer(number: int) -> None:
            for event in range(EVENTS_EACH):
                async with db.unit_of_work(tenant) as uow:
                    await uow.audit.log_event(
                        event_type="chain.check",
                        event_category="system",
                        action_description=f"writer {number}, event {event}",
                    )
                    await uow.commit()

        started = time.perf_counter()
        await asyncio.gather(*(writer(number) for number in range(WRITERS)))
        elapsed = time.perf_counter() - started
    finally:
        await layer.close()
    owner_side = DatabaseSettings(
        url=data.dsn,
        app_role=APP_ROLE,
        token_keys=TOKEN_KEYS,
        tenant_key=TENANT_KEY,
        _env_file=None,
    )
    found = await verify_audit_chains(owner_side, slack_team_id=team)
    written = WRITERS * EVENTS_EACH
    (chain,) = found.chains
    ok = found.ok and chain.events == written
    verdict = "verifies" if found.ok else f"is broken: {chain.broken}"
    measured = (
        f"{written:,} events in {elapsed:.1f} s ({written / elapsed:,.0f}/s); "
        f"{chain.events:,} places, the chain {verdict}"
    )
    return Target(NAME, measured, ok)
