"""``python -m bench`` (``make bench``): create the databases, count, explain, measure, report.

Steps: create and load the benchmark databases (COPY, then VACUUM ANALYZE);
EXPLAIN the layer's named queries; count round trips per operation of every
implementation through a wire-level proxy; measure what one claim
verification costs on the server; then several rounds in which every
workload runs for each implementation in turn (the order rotates from round
to round), at concurrency 1 and 32, the layer's turns on the handler and the
reads twice in a row, with the claim verified and unverified
(:mod:`bench.claims`); print the medians and the targets, write them to
``docs/benchmarks.md``, and drop the databases.

``--quick`` is for development: 100,000 meetings, one short round, and no
document unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from sqlalchemy.engine import URL, make_url

from bench import chain, claims, dataset, document, export, report
from bench.counting import count_round_trips, disagreements
from bench.explain import explain_layer_queries
from bench.impls import ALL, LayerImpl, UnverifiedLayerImpl
from bench.impls.layer import UNCHAINED, SwitchedLayerImpl
from bench.profiling import profile_handler
from bench.runner import run_load
from bench.workloads import WORKLOADS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.counting import Counts
    from bench.dataset import Dataset
    from bench.explain import Plan
    from bench.impls.base import Implementation
    from bench.profiling import Profile as HandlerProfile
    from bench.report import Results
    from bench.workloads import Workload

POOL_SIZE: Final = max(report.CONCURRENCIES)
DEFAULT_OUTPUT: Final = Path("docs/benchmarks.md")
PROBES: Final = 3
"""Reads run before each turn of a read workload: at least one must find something."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How big and how long."""

    name: str
    large: dataset.DatasetSpec
    small: dataset.DatasetSpec
    rounds: int
    seconds: float
    """Measured time of each timed run."""
    warmup: float
    """Unmeasured run at concurrency 32 after a pool is opened."""
    audit_ops: int


SMALL: Final = dataset.DatasetSpec(database="sfdb_bench_10k", tenants=10)
FULL: Final = Profile(
    name="full",
    large=dataset.DatasetSpec(database="sfdb_bench_1m", tenants=1000),
    small=SMALL,
    rounds=4,
    seconds=0.8,
    warmup=0.3,
    audit_ops=10_000,
)
QUICK: Final = Profile(
    name="quick",
    large=dataset.DatasetSpec(database="sfdb_bench_100k", tenants=100),
    small=SMALL,
    rounds=1,
    seconds=0.3,
    warmup=0.15,
    audit_ops=1_000,
)


def log(message: str) -> None:
    """Progress, to stderr, so stdout holds the tables."""
    print(message, file=sys.stderr, flush=True)


def server_url(explicit: str | None) -> URL:
    """The server to create the benchmark databases on (its ``postgres`` database)."""
    raw = (
        explicit
        or os.environ.get("SFDB_BENCH_SERVER_URL")
        or os.environ.get("DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    return make_url(raw).set(drivername="postgresql", database="postgres")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small and short, for development")
    parser.add_argument("--rounds", type=int, help="rounds (default: 4, quick: 1)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument("--audit-ops", type=int, help="log_event calls per audit burst")
    parser.add_argument(
        "--impl",
        action="append",
        choices=[impl.key for impl in ALL],
        help="only this implementation (repeatable)",
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=[w.key for w in WORKLOADS],
        help="only this workload (repeatable)",
    )
    parser.add_argument("--server", help="server URL (default: $DATABASE_URL's server)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse databases loaded by an earlier --keep run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases afterwards")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"Markdown report (default: {DEFAULT_OUTPUT} for a full run, none for --quick)",
    )
    parser.add_argument("--no-output", action="store_true", help="write no Markdown report")
    parser.add_argument("--skip-counts", action="store_true", help="no round-trip counting pass")
    parser.add_argument("--skip-explain", action="store_true", help="no EXPLAIN pass")
    parser.add_argument("--skip-profile", action="store_true", help="no handler profile")
    parser.add_argument("--skip-export", action="store_true", help="no sfdb tenant export target")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; the exit status is 0 even when a target is missed (it is reported)."""
    args = parse_args(argv)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    profile = QUICK if args.quick else FULL
    profile = replace(
        profile,
        rounds=args.rounds or profile.rounds,
        seconds=args.seconds or profile.seconds,
        audit_ops=args.audit_ops or profile.audit_ops,
    )
    server = server_url(args.server)
    impls: list[Implementation] = [cls() for cls in ALL if not args.impl or cls.key in args.impl]
    own = [impl for impl in impls if impl.variant_of is None]
    workloads = [w for w in WORKLOADS if not args.workload or w.key in args.workload]
    host = await report.machine(dataset.database_url(server, "postgres"))
    log(f"sfdb benchmark, {profile.name} run, on {host['cpu']}")
    log("loading the databases")
    datasets = {
        "large": await dataset.prepare(server, profile.large, reuse=args.reuse, log=log),
        "small": await dataset.prepare(server, profile.small, reuse=args.reuse, log=log),
    }
    try:
        plans: list[Plan] = []
        if not args.skip_explain:
            log("EXPLAIN of the layer's named queries")
            plans = await explain_layer_queries(datasets["large"])
        counts: list[Counts] = []
        if not args.skip_counts:
            log("counting round trips on the wire")
            tag = uuid.uuid4().hex[:8]
            counts = [await count_round_trips(impl, datasets["large"], tag) for impl in own]
            problems = disagreements(counts)
            if problems:
                raise RuntimeError("the implementations do not agree: " + "; ".join(problems))
        cost: claims.Cost | None = None
        if any(isinstance(impl, UnverifiedLayerImpl) for impl in impls):
            log("what a claim verification costs the server")
            cost = await claims.verification_cost(
                datasets["large"], LayerImpl(), UnverifiedLayerImpl()
            )
        # Then the audit chain under 32 writers of one workspace, when the burst was measured;
        # then, on a database of its own, one large workspace through sfdb tenant export.
        results, chained, exported = (
            await measure(profile, impls, workloads, datasets),
            await chain.targets(impls, workloads, datasets["large"], log=log),
            []
            if args.skip_export
            else await export.targets(server, quick=args.quick, keep=args.keep, log=log),
        )
        profiles: list[HandlerProfile] = []
        if not args.skip_profile and any(w.key == "handler" for w in workloads):
            log("profiling one handler call of each implementation")
            tag = uuid.uuid4().hex[:8]
            profiles = [
                await profile_handler(impl, datasets["small"], f"{tag}{impl.key}") for impl in own
            ]
    finally:
        for impl in impls:
            if isinstance(impl, SwitchedLayerImpl):
                await impl.restore()  # verified policies, chained events, whatever happened
        if not args.keep:
            for data in datasets.values():
                await dataset.drop(server, data.spec.database)
    elapsed = time.perf_counter() - started
    host["load average at end"] = report.load_average()
    run = document.Run(
        profile=profile.name,
        rounds=profile.rounds,
        seconds=profile.seconds,
        warmup=profile.warmup,
        audit_ops=profile.audit_ops,
        pool_size=POOL_SIZE,
        host=host,
        impls=impls,
        workloads=workloads,
        datasets=datasets,
        results=results,
        counts=counts,
        plans=plans,
        profiles=profiles,
        cost=cost,
        targets=[*report.targets(results, counts, plans, datasets), *chained, *exported],
        elapsed=elapsed,
    )
    print(document.render(run, markdown=False))
    output = None if args.no_output else args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(document.render(run, markdown=True))
        log(f"wrote {output}")
    log(f"done in {elapsed / 60:.1f} min")
    return 0


async def measure(
    profile: Profile,
    impls: Sequence[Implementation],
    workloads: Sequence[Workload],
    datasets: dict[str, Dataset],
) -> Results:
    """Every workload for each implementation in turn, for several rounds.

    A variant (:attr:`Implementation.variant_of`) takes its turns right beside those
    of the implementation it varies, on the workloads that compare them, the two
    in alternating order.
    """
    results: Results = defaultdict(list)
    groups: dict[str, list[Workload]] = {}
    for workload in workloads:
        groups.setdefault(workload.group, []).append(workload)
    units = _units(impls)
    for round_index in range(profile.rounds):
        for position, (name, members) in enumerate(groups.items()):
            if all(w.fixed_ops for w in members) and round_index > 0:
                continue
            shift = (round_index + position) % len(units)
            order = [*units[shift:], *units[:shift]]
            line = []
            for unit in order:
                for index, workload in enumerate(members):
                    pair = [impl for impl in unit if _runs(impl, workload)]
                    if (round_index + position + index) % 2:
                        pair.reverse()
                    for impl in pair:
                        await turn(profile, impl, workload, datasets[workload.dataset], results)
                        top = results[(workload.key, POOL_SIZE, impl.key)][-1]
                        line.append(f"{workload.key}/{impl.key} {top.throughput:,.0f}")
            log(
                f"  round {round_index + 1}/{profile.rounds} {name} (c{POOL_SIZE} ops/s): "
                + ", ".join(line)
            )
    return results


def _units(impls: Sequence[Implementation]) -> list[list[Implementation]]:
    """The implementations as they take turns: each variant beside the one it varies."""
    units = [[impl] for impl in impls if impl.variant_of is None]
    for impl in impls:
        if impl.variant_of is None:
            continue
        base = next((unit for unit in units if unit[0].key == impl.variant_of), None)
        if base is None:
            units.append([impl])
        else:
            base.append(impl)
    return units


def _runs(impl: Implementation, workload: Workload) -> bool:
    """A variant runs only the workloads that compare it with what it varies."""
    if impl.variant_of is None:
        return True
    return workload.chained_vs_unchained if impl.key == UNCHAINED else workload.verified_vs_plain


async def turn(
    profile: Profile, impl: Implementation, workload: Workload, data: Dataset, results: Results
) -> None:
    """Open a pool, check a read finds rows, warm up at concurrency 32, measure at 1 and 32,
    close."""
    await impl.open(data.dsn, pool_size=POOL_SIZE)
    try:
        tag = f"{impl.key}{uuid.uuid4().hex[:8]}"
        if workload.returns_rows:
            probe = workload.build(impl, data, 1, tag + "p")
            if not any([await probe(0, seq) for seq in range(PROBES)]):
                raise RuntimeError(
                    f"{impl.title}, {workload.key}: the first {PROBES} reads found nothing "
                    "(does the database admit its tenant context?)"
                )
        warm = workload.build(impl, data, POOL_SIZE, tag + "w")
        await run_load(warm, concurrency=POOL_SIZE, seconds=profile.warmup)
        for concurrency in report.CONCURRENCIES:
            op = workload.build(impl, data, concurrency, f"{tag}c{concurrency}")
            sample = await run_load(
                op,
                concurrency=concurrency,
                seconds=None if workload.fixed_ops else profile.seconds,
                total=profile.audit_ops if workload.fixed_ops else None,
            )
            results[(workload.key, concurrency, impl.key)].append(sample)
    finally:
        await impl.close()
