"""Closed-loop load: ``concurrency`` workers each run one operation after another.

The run lasts ``seconds`` or until ``total`` operations are done; every
operation's latency is kept. An operation that raises stops the run: a
benchmark with errors measures nothing.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    Op = Callable[[int, int], Awaitable[object]]
    """``op(worker, seq)``: one operation of worker ``worker``, its ``seq``-th."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured run."""

    ops: int
    seconds: float
    latencies: tuple[float, ...]
    """Sorted, in seconds."""
    cpu_seconds: float = 0.0
    """CPU time of this (client) process during the run: the server's is not in it."""

    @property
    def cpu_ms_per_op(self) -> float:
        """Client CPU milliseconds per operation."""
        return self.cpu_seconds * 1000 / self.ops if self.ops else math.nan

    @property
    def throughput(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50(self) -> float:
        """Median latency, seconds."""
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        """99th-percentile latency, seconds."""
        return percentile(self.latencies, 99)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def run_load(
    op: Op, *, concurrency: int, seconds: float | None = None, total: int | None = None
) -> Sample:
    """Run ``op`` from ``concurrency`` workers for ``seconds`` or ``total`` operations."""
    if (seconds is None) == (total is None):
        raise ValueError("give seconds or total")
    latencies: list[float] = []
    remaining = total if total is not None else 0
    clock = time.perf_counter
    deadline = math.inf

    async def worker(index: int) -> None:
        nonlocal remaining
        seq = 0
        while True:
            if total is not None:
                if remaining <= 0:
                    return
                remaining -= 1
            elif clock() >= deadline:
                return
            started = clock()
            await op(index, seq)
            latencies.append(clock() - started)
            seq += 1

    gc.collect()
    started, cpu_started = clock(), time.process_time()
    if seconds is not None:
        deadline = started + seconds
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed, cpu = clock() - started, time.process_time() - cpu_started
    return Sample(
        ops=len(latencies),
        seconds=elapsed,
        latencies=tuple(sorted(latencies)),
        cpu_seconds=cpu,
    )
