"""Where the client's CPU goes in one handler call: a profile, by component, in the same run.

Each implementation runs the handler ``OPS`` times one after another (concurrency 1)
under :mod:`cProfile` with the process's CPU clock (waiting for the server counts
for nothing); the CPU time spent in each function itself (its ``tottime``)
is added up by the component the function belongs to: the implementation's own
code (for the layer, ``slack_fathom_db``), SQLAlchemy, asyncpg, the event loop
and sockets, and the rest of the standard library. The profiler slows
everything down by a similar factor, so the shares, not the milliseconds, are
what to compare; the milliseconds per call are the profiled ones.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from bench.impls.base import HandlerEvent

if TYPE_CHECKING:
    from bench.dataset import Dataset
    from bench.impls.base import Implementation

OPS: Final = 1500
WARMUP: Final = 200
COMPONENTS: Final = (
    ("slack_fathom_db", ("/slack_fathom_db/",)),
    ("SQLAlchemy (pool, greenlet)", ("/sqlalchemy/", "greenlet")),
    ("asyncpg", ("/asyncpg/",)),
    ("event loop, sockets", ("/asyncio/", "select", "socket", "_contextvars")),
    ("json, uuid, datetime, re", ("/json/", "/uuid.py", "datetime", "re.Pattern", "/re/")),
    ("bench harness", ("/bench/",)),
)
OTHER: Final = "other"


@dataclass(frozen=True, slots=True)
class Profile:
    """One implementation's handler, profiled."""

    impl: str
    ms_per_call: dict[str, float]
    """Component -> profiled CPU milliseconds per handler call."""
    cpu_ms: float
    """Unprofiled client CPU milliseconds per handler call, sequential (concurrency 1)."""


def component(filename: str, function: str) -> str:
    """The component a profiled function belongs to."""
    where = f"{filename}:{function}"
    for name, markers in COMPONENTS:
        if any(marker in where for marker in markers):
            return name
    return OTHER


async def profile_handler(impl: Implementation, data: Dataset, tag: str) -> Profile:
    """Run the handler sequentially, unprofiled then profiled; CPU by component."""
    tenant = data.tenants[0]

    async def calls(count: int, prefix: str) -> None:
        for n in range(count):
            await impl.handler(
                HandlerEvent(
                    slack_team_id=tenant.slack_team_id,
                    slack_user_id=tenant.slack_user_ids[n % len(tenant.slack_user_ids)],
                    fathom_recording_id=f"profile-{tag}-{prefix}-{n}",
                    title="Weekly pipeline review",
                )
            )

    await impl.open(data.dsn, pool_size=4)
    try:
        await calls(WARMUP, "warm")
        cpu = time.process_time()
        await calls(OPS, "plain")
        cpu = time.process_time() - cpu
        profiler = cProfile.Profile(time.process_time)  # CPU, not waiting
        profiler.enable()
        await calls(OPS, "profiled")
        profiler.disable()
    finally:
        await impl.close()
    totals: dict[str, float] = {}
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        name = component(filename, function)
        totals[name] = totals.get(name, 0.0) + tottime
    return Profile(
        impl=impl.key,
        ms_per_call={name: seconds * 1000 / OPS for name, seconds in totals.items()},
        cpu_ms=cpu * 1000 / OPS,
    )
