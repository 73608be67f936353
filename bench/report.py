"""Tables for the terminal and for ``docs/benchmarks.md``; the targets and their verdicts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg

from bench.impls.layer import UNCHAINED

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.counting import Counts
    from bench.dataset import Dataset
    from bench.explain import Plan
    from bench.impls.base import Implementation
    from bench.runner import Sample
    from bench.workloads import Workload

    Results = dict[tuple[str, int, str], list[Sample]]

CONCURRENCIES: Final = (1, 32)
HIGH: Final = 32
VERIFIED: Final = "layer"
PLAIN: Final = "unverified"
"""The layer with the claim verified, and the same layer on the database trusting it."""
CLAIM_FACTOR: Final = 0.95
"""Verified over plain throughput: verifying claims loses at most 5%."""
CHAIN_FACTOR: Final = 1 / 1.2
"""Chained over unchained audit throughput: ``log_event`` costs at most 1.2x with the chain."""


# -- formatting -------------------------------------------------------------------------


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    markdown: bool,
    numeric: bool = True,
) -> str:
    """A table; the first column left-aligned, the others right-aligned if ``numeric``."""
    right = [False, *([numeric] * (len(headers) - 1))]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join("---:" if r else ":---" for r in right) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def ms(seconds: float) -> str:
    """Seconds as milliseconds, to about three significant digits."""
    value = seconds * 1000
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _size(count: int) -> str:
    if count >= 1_000_000 and count % 1_000_000 == 0:
        return f"{count // 1_000_000}M"
    if count >= 1_000 and count % 1_000 == 0:
        return f"{count // 1_000}k"
    return f"{count:,}"


# -- the measurements -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cell:
    """Medians over the rounds of one workload, concurrency and implementation."""

    throughput: float
    p50: float
    p99: float
    ops: int
    rounds: int
    cpu_ms: float
    """Client CPU milliseconds per operation (median of the rounds)."""


def cell(samples: Sequence[Sample]) -> Cell:
    """Median throughput, p50, p99 and client CPU per operation of the rounds."""
    return Cell(
        throughput=statistics.median(s.throughput for s in samples),
        p50=statistics.median(s.p50 for s in samples),
        p99=statistics.median(s.p99 for s in samples),
        ops=sum(s.ops for s in samples),
        rounds=len(samples),
        cpu_ms=statistics.median(s.cpu_ms_per_op for s in samples),
    )


def workload_label(workload: Workload, datasets: dict[str, Dataset]) -> str:
    """The row label: the workload and the size of the meetings table it runs on."""
    data = datasets[workload.dataset]
    if workload.key.startswith(("recent", "for_user")):
        return f"{workload.title} ({_size(data.spec.meetings)} meetings)"
    return workload.title


def results_table(
    results: Results,
    workloads: Sequence[Workload],
    impls: Sequence[Implementation],
    datasets: dict[str, Dataset],
    *,
    markdown: bool,
) -> str:
    """Throughput (ops/s) and p50/p99 latency (ms) for every workload, concurrency and impl."""
    headers = ["workload", "c"]
    for impl in impls:
        headers += [f"{impl.key} ops/s", "p50", "p99"]
    rows = []
    for workload in workloads:
        for concurrency in CONCURRENCIES:
            row = [workload_label(workload, datasets), str(concurrency)]
            for impl in impls:
                samples = results.get((workload.key, concurrency, impl.key))
                if not samples:
                    row += ["-", "-", "-"]
                    continue
                c = cell(samples)
                row += [f"{c.throughput:,.0f}", ms(c.p50), ms(c.p99)]
            rows.append(row)
    return table(headers, rows, markdown=markdown)


def cpu_table(
    results: Results,
    workloads: Sequence[Workload],
    impls: Sequence[Implementation],
    datasets: dict[str, Dataset],
    *,
    markdown: bool,
) -> str:
    """Client CPU milliseconds per operation at concurrency 32, every implementation."""
    headers = ["workload (c32)", *(impl.key for impl in impls)]
    rows = []
    for workload in workloads:
        row = [workload_label(workload, datasets)]
        for impl in impls:
            samples = results.get((workload.key, HIGH, impl.key))
            row.append(f"{cell(samples).cpu_ms:.3f}" if samples else "-")
        rows.append(row)
    return table(headers, rows, markdown=markdown)


def claim_ratio(results: Results, key: str, concurrency: int) -> float | None:
    """Verified over plain throughput: the median over the rounds of each round's ratio.

    The two turns of a round run back to back, so each round's ratio compares
    them under the same conditions; a run that does not pair them (a filtered one)
    falls back to the ratio of the medians.
    """
    mine = results.get((key, concurrency, VERIFIED))
    theirs = results.get((key, concurrency, PLAIN))
    if not mine or not theirs:
        return None
    if len(mine) != len(theirs):
        plain = cell(theirs).throughput
        return cell(mine).throughput / plain if plain else None
    pairs = zip(mine, theirs, strict=True)
    ratios = [a.throughput / b.throughput for a, b in pairs if b.throughput]
    return statistics.median(ratios) if ratios else None


def claims_table(
    results: Results,
    workloads: Sequence[Workload],
    datasets: dict[str, Dataset],
    *,
    markdown: bool,
) -> str:
    """The layer with the claim verified and unverified, side by side, and their ratio."""
    headers = [
        "workload",
        "c",
        "verified ops/s",
        "p50",
        "p99",
        "plain ops/s",
        "p50",
        "p99",
        "verified/plain",
    ]
    rows = []
    for workload in workloads:
        if not workload.verified_vs_plain:
            continue
        for concurrency in CONCURRENCIES:
            row = [workload_label(workload, datasets), str(concurrency)]
            for impl in (VERIFIED, PLAIN):
                samples = results.get((workload.key, concurrency, impl))
                if not samples:
                    row += ["-", "-", "-"]
                    continue
                found = cell(samples)
                row += [f"{found.throughput:,.0f}", ms(found.p50), ms(found.p99)]
            ratio = claim_ratio(results, workload.key, concurrency)
            row.append("-" if ratio is None else f"{ratio:.3f}x")
            rows.append(row)
    return table(headers, rows, markdown=markdown)


def counts_table(counts: Sequence[Counts], *, markdown: bool) -> str:
    """Round trips per operation (prepares after warm-up in parentheses when any)."""
    names = list(counts[0].ops) if counts else []
    headers = ["operation", *(c.impl for c in counts)]
    rows = []
    for name in names:
        row = [name]
        for c in counts:
            count = c.ops[name]
            text = f"{count.round_trips:g}"
            if count.prepares:
                text += f" (+{count.prepares:g} prepare)"
            row.append(text)
        rows.append(row)
    rows.append(["rows (recent / for_user)", *(_rows(c) for c in counts)])
    return table(headers, rows, markdown=markdown)


def _rows(counts: Counts) -> str:
    return f"{counts.ops['recent'].result} / {counts.ops['for_user'].result}"


def plans_table(plans: Sequence[Plan], *, markdown: bool) -> str:
    """Each query's top plan node, the scans under it, and the verdict."""
    rows = [
        [
            p.name + (" *" if p.named else ""),
            f"`{p.method}`" if markdown else p.method,
            p.top,
            "; ".join(p.scans),
            p.claim,
            p.verdict,
        ]
        for p in plans
    ]
    return table(
        ["query", "layer call", "top node", "scans", "claim verified", "verdict"],
        rows,
        markdown=markdown,
        numeric=False,
    )


# -- the targets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One performance target, measured."""

    name: str
    measured: str
    ok: bool | None
    """``None`` when this run could not measure it (a filtered run)."""


def _tp(results: Results, key: str, concurrency: int, impl: str) -> float | None:
    samples = results.get((key, concurrency, impl))
    return cell(samples).throughput if samples else None


def _ratio_target(
    results: Results, name: str, *, key: str, impl: str, other: str, factor: float
) -> Target:
    mine, theirs = _tp(results, key, HIGH, impl), _tp(results, key, HIGH, other)
    if mine is None or theirs is None or theirs == 0:
        return Target(name, "not measured", None)
    ratio = mine / theirs
    return Target(
        name, f"{ratio:.2f}x ({mine:,.0f} vs {theirs:,.0f} ops/s)", ratio >= factor - 1e-9
    )


def targets(
    results: Results,
    counts: Sequence[Counts],
    plans: Sequence[Plan],
    datasets: dict[str, Dataset],
) -> list[Target]:
    """Every performance target, with what this run measured."""
    large = _size(datasets["large"].spec.meetings)
    small = _size(datasets["small"].spec.meetings)
    found = [
        _ratio_target(
            results,
            "handler c32 ≥ 0.9 x raw asyncpg",
            key="handler",
            impl="layer",
            other="raw",
            factor=0.9,
        ),
        _ratio_target(
            results,
            "handler c32 ≥ 4 x sync design",
            key="handler",
            impl="layer",
            other="sync",
            factor=4.0,
        ),
    ]
    for key, what in (("recent", "recent meetings"), ("for_user", "user's meetings")):
        for suffix, size in (("", large), ("_small", small)):
            found.append(
                _ratio_target(
                    results,
                    f"read c32 ≥ 0.8 x raw asyncpg ({what}, {size})",
                    key=key + suffix,
                    impl="layer",
                    other="raw",
                    factor=0.8,
                )
            )
    found.append(
        _ratio_target(
            results,
            "find_installation c32 ≥ 0.8 x raw asyncpg",
            key="find_installation",
            impl="layer",
            other="raw",
            factor=0.8,
        )
    )
    by_impl = {c.impl: c for c in counts}
    if "layer" in by_impl and "raw" in by_impl:
        mine = by_impl["layer"].ops["handler"].round_trips
        theirs = by_impl["raw"].ops["handler"].round_trips
        found.append(
            Target(
                "round trips per handler ≤ raw asyncpg + 1",
                f"{mine:g} vs {theirs:g}",
                mine <= theirs + 1,
            )
        )
    else:
        found.append(Target("round trips per handler ≤ raw asyncpg + 1", "not measured", None))
    for key, what in (("recent", "recent meetings"), ("for_user", "user's meetings")):
        big, little = results.get((key, 1, "layer")), results.get((key + "_small", 1, "layer"))
        name = f"read p50 at {large} ≤ 1.5 x p50 at {small} ({what}, c1)"
        if not big or not little:
            found.append(Target(name, "not measured", None))
            continue
        ratio = cell(big).p50 / cell(little).p50
        found.append(
            Target(
                name,
                f"{ratio:.2f}x ({ms(cell(big).p50)} vs {ms(cell(little).p50)} ms)",
                ratio <= 1.5,
            )
        )
    named = [p for p in plans if p.named]
    found.append(
        Target(
            "EXPLAIN of each named query uses an index",
            f"{sum(p.ok for p in named)}/{len(named)} named, {sum(p.ok for p in plans)}/"
            f"{len(plans)} all"
            if named
            else "not measured",
            all(p.ok for p in named) if named else None,
        )
    )
    found.append(_hot_target(results))
    found.append(
        _ratio_target(
            results,
            "rate_limit hot tenant c32 ≥ raw asyncpg",
            key="hot",
            impl="layer",
            other="raw",
            factor=1.0,
        )
    )
    found.append(_chain_target(results))
    found.append(_p99_target(results))
    found.extend(_claim_target(results, key, datasets) for key in CLAIM_WORKLOADS)
    return found


CLAIM_WORKLOADS: Final = ("handler", "recent", "recent_small", "for_user", "for_user_small")
"""The workloads whose verified/plain ratio is a target (:mod:`bench.claims`)."""


def _claim_target(results: Results, key: str, datasets: dict[str, Dataset]) -> Target:
    """The verified claim loses at most 5% against the plain one, at concurrency 1 and 32."""
    what = {
        "handler": "handler",
        "recent": f"read, recent meetings, {_size(datasets['large'].spec.meetings)}",
        "recent_small": f"read, recent meetings, {_size(datasets['small'].spec.meetings)}",
        "for_user": f"read, user's meetings, {_size(datasets['large'].spec.meetings)}",
        "for_user_small": f"read, user's meetings, {_size(datasets['small'].spec.meetings)}",
    }[key]
    name = f"{what}: verified claim c1 and c32 ≥ {CLAIM_FACTOR:g} x unverified"
    parts, ok = [], True
    for concurrency in CONCURRENCIES:
        mine = _tp(results, key, concurrency, VERIFIED)
        theirs = _tp(results, key, concurrency, PLAIN)
        ratio = claim_ratio(results, key, concurrency)
        if mine is None or theirs is None or ratio is None:
            return Target(name, "not measured", None)
        ok = ok and ratio >= CLAIM_FACTOR - 1e-9
        parts.append(f"c{concurrency} {ratio:.3f}x ({mine:,.0f} vs {theirs:,.0f} ops/s)")
    return Target(name, "; ".join(parts), ok)


def _chain_target(results: Results) -> Target:
    """``log_event`` with the audit chain costs at most 1.2x without it, at concurrency 1
    and 32 (the audit burst runs once: the ratio of the two bursts)."""
    name = "audit burst: log_event with the chain ≤ 1.2 x without it, c1 and c32"
    parts, ok = [], True
    for concurrency in CONCURRENCIES:
        mine = _tp(results, "audit", concurrency, VERIFIED)
        theirs = _tp(results, "audit", concurrency, UNCHAINED)
        if mine is None or theirs is None or not mine:
            return Target(name, "not measured", None)
        ok = ok and mine >= CHAIN_FACTOR * theirs - 1e-9
        parts.append(f"c{concurrency} {theirs / mine:.2f}x ({mine:,.0f} vs {theirs:,.0f} ops/s)")
    return Target(name, "; ".join(parts), ok)


def _p99_target(results: Results) -> Target:
    """Every workload's p99 at concurrency 32 within 1.5 x raw asyncpg's; names the worst."""
    name = "p99 c32 ≤ 1.5 x raw asyncpg's, every workload"
    ratios = {}
    for (key, concurrency, impl), samples in results.items():
        theirs = results.get((key, concurrency, "raw"))
        if impl == "layer" and concurrency == HIGH and theirs:
            ratios[key] = cell(samples).p99 / cell(theirs).p99
    if not ratios:
        return Target(name, "not measured", None)
    worst = max(ratios, key=lambda key: ratios[key])
    return Target(
        name, f"worst {ratios[worst]:.2f}x ({worst}); {len(ratios)} workloads", ratios[worst] <= 1.5
    )


def _hot_target(results: Results) -> Target:
    hot, spread = _tp(results, "hot", HIGH, "layer"), _tp(results, "spread", HIGH, "layer")
    name = "rate_limit hot tenant c32 ≥ 0.7 x 32 tenants c32"
    if hot is None or spread is None or spread == 0:
        return Target(name, "not measured", None)
    ratio = hot / spread
    return Target(name, f"{ratio:.2f}x ({hot:,.0f} vs {spread:,.0f} ops/s)", ratio >= 0.7)


def scale_note(results: Results) -> str | None:
    """How far apart the baselines themselves are at concurrency 32 (context for the targets)."""
    raw, sync = _tp(results, "handler", HIGH, "raw"), _tp(results, "handler", HIGH, "sync")
    orm = _tp(results, "handler", HIGH, "orm")
    if not raw or not sync or not orm:
        return None
    return (
        f"For scale, handler at c32 on this machine: raw asyncpg is {raw / sync:.1f}x the "
        f"synchronous design, and the naive async ORM is {orm / raw:.2f}x raw asyncpg."
    )


def targets_table(found: Sequence[Target], *, markdown: bool) -> str:
    """Targets with what was measured and met / MISSED."""
    verdict = {True: "met", False: "MISSED", None: "-"}
    rows = [[t.name, t.measured, verdict[t.ok]] for t in found]
    return table(["target (layer)", "measured", "verdict"], rows, markdown=markdown, numeric=False)


# -- the machine ------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def layer_source() -> str:
    """The commit of the layer measured, and whether its package had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                ["git", "-C", str(root), *args],  # noqa: S607 - git from PATH
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "slack_fathom_db").splitlines()]
    if changed:
        return f"git {commit} + uncommitted changes in {', '.join(changed)}"
    return f"git {commit}, slack_fathom_db/ clean"


async def machine(server_dsn: str) -> dict[str, str]:
    """What the numbers were measured on."""
    conn = await asyncpg.connect(server_dsn)
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in (
                "server_version",
                "shared_buffers",
                "synchronous_commit",
                "fsync",
                "max_connections",
            )
        }
        others = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "memory": _memory(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in ("slack-fathom-db", "sqlalchemy", "asyncpg", "psycopg2-binary")
        ),
        "postgresql": (
            f"{settings['server_version']} on the same machine (TCP loopback), "
            f"shared_buffers={settings['shared_buffers']}, "
            f"synchronous_commit={settings['synchronous_commit']}, fsync={settings['fsync']}, "
            f"max_connections={settings['max_connections']}"
        ),
        "layer source": layer_source(),
        "other clients at start": str(others),
        "load average at start": load_average(),
    }
