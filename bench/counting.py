"""The counting pass: round trips per operation, for every implementation, on the wire.

Each implementation gets a pool of one connection through
:class:`bench.wire.CountingProxy`, warms up (prepares, type introspection),
and then runs a fixed number of operations one after another while the
proxy counts. The first measured handler call is also traced, statement by
statement, for the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sqlalchemy.engine import make_url

from bench.impls.base import HandlerEvent
from bench.wire import CountingProxy

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from bench.dataset import Dataset
    from bench.impls.base import Implementation

WARMUP: Final = 10
MEASURED: Final = 40


@dataclass(frozen=True, slots=True)
class Count:
    """Per operation, after warm-up."""

    round_trips: float
    prepares: float
    result: object
    """What the last operation returned (rows for reads), to check that all agree."""


@dataclass(frozen=True, slots=True)
class Counts:
    """One implementation's counts, by operation, and the trace of one handler call."""

    impl: str
    ops: dict[str, Count]
    handler_trace: tuple[str, ...]


READS: Final = ("recent", "for_user", "find_installation")


def _found(result: object) -> object:
    """What a read found, comparable between implementations: rows, or the bot token."""
    return getattr(result, "bot_token", result)


def disagreements(counts: Sequence[Counts]) -> list[str]:
    """Reads of the counting pass that found nothing, or not the same in every implementation.

    A tenant context the database does not admit reads no rows, without an error.
    """
    problems = []
    for name in READS:
        found = {c.impl: _found(c.ops[name].result) for c in counts if name in c.ops}
        for impl, value in found.items():
            if not value:
                problems.append(f"{impl} {name} found nothing")
        if len({repr(value) for value in found.values()}) > 1:
            problems.append(f"{name}: " + ", ".join(f"{k} {v!r}" for k, v in found.items()))
    return problems


async def count_round_trips(impl: Implementation, data: Dataset, tag: str) -> Counts:
    """Run every operation through the counting proxy (see the module docstring)."""
    url = make_url(data.dsn)
    tenant = data.tenants[0]
    user_id = tenant.user_ids[0]
    sequence = 0

    def handler() -> Awaitable[object]:
        nonlocal sequence
        sequence += 1
        return impl.handler(
            HandlerEvent(
                slack_team_id=tenant.slack_team_id,
                slack_user_id=tenant.slack_user_ids[1],
                fathom_recording_id=f"count-{tag}-{impl.key}-{sequence}",
                title="Weekly pipeline review",
            )
        )

    operations: dict[str, Callable[[], Awaitable[object]]] = {
        "handler": handler,
        "recent": lambda: impl.recent_meetings(tenant),
        "for_user": lambda: impl.user_meetings(tenant, user_id),
        "rate_limit": lambda: impl.rate_limit(tenant, "bench_count"),
        "audit": lambda: impl.audit_event(tenant, user_id),
        "find_installation": lambda: impl.find_installation(tenant),
    }
    ops: dict[str, Count] = {}
    trace: tuple[str, ...] = ()
    async with CountingProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        await impl.open(
            url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
            pool_size=1,
        )
        try:
            for name, operation in operations.items():
                for _ in range(WARMUP):
                    await operation()
                if name == "handler":
                    proxy.counter.reset(trace=True)
                    await operation()
                    trace = tuple(proxy.counter.trace or ())
                proxy.counter.reset()
                result: object = None
                for _ in range(MEASURED):
                    result = await operation()
                ops[name] = Count(
                    round_trips=proxy.counter.round_trips / MEASURED,
                    prepares=proxy.counter.prepares / MEASURED,
                    result=result,
                )
        finally:
            await impl.close()
    return Counts(impl=impl.key, ops=ops, handler_trace=trace)
