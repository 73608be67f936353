"""``python -m bench.topology`` (``make bench-citus``): the layer on Citus next to plain PostgreSQL.

Two throwaway clusters start from the same local PostgreSQL binaries, both on
this machine: a plain server, and a Citus coordinator with one worker that it
reaches over TCP loopback. They share every server setting except those only
Citus needs. The benchmark database is made on each (plain: created and
migrated; Citus: :func:`~slack_fathom_db.testing.citus_database`, i.e. the
extension on both nodes, the nodes registered, migrated and distributed; then
the bench's tenant key installed, which copies it to the worker too), the
same dataset is loaded into both with COPY as the superuser (on Citus through
the coordinator), and every node gets ``VACUUM (ANALYZE)`` and ``CHECKPOINT``.

Then several rounds: in each, every workload runs with the layer on plain and
on Citus in turn, the order alternating from workload to workload and round to
round, each turn measured as ``python -m bench`` measures an implementation
(:func:`bench.cli.turn`: a pool of 32, a warm-up, concurrency 1 and 32). The
medians are printed side by side with the Citus/plain throughput ratio and
written to ``docs/benchmarks-citus.md``. Both clusters are stopped at the end,
whatever happens.

``--quick`` is for development: two short rounds, and no document unless
``--output`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
from pydantic import SecretStr

from bench import cli, dataset, report
from bench.impls.base import TENANT_KEY
from bench.impls.layer import LayerImpl
from bench.workloads import SPREAD_TENANTS, WORKLOADS
from slack_fathom_db.maintenance import install_tenant_key
from slack_fathom_db.testing import (
    CITUS_SETTINGS,
    citus_cluster,
    citus_database,
    local_cluster_control,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.dataset import Dataset
    from bench.report import Results
    from bench.workloads import Workload
    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.testing import CitusCluster, LocalCluster

TOPOLOGIES: Final = ("plain", "citus")
TITLES: Final = {"plain": "plain", "citus": "Citus"}
WORKLOAD_KEYS: Final = ("handler", "recent", "spread")
SHARED_SETTINGS: Final = ("max_connections",)
"""Settings of ``CITUS_SETTINGS`` that the plain server gets too; the others are Citus' own."""
SPEC: Final = replace(cli.SMALL, database="sfdb_bench_topology", tenants=SPREAD_TENANTS)
"""The small database's tenant shape, with one tenant per worker of the rate-limit workload."""
FULL: Final = cli.Profile(
    name="full", large=SPEC, small=SPEC, rounds=6, seconds=2.0, warmup=0.5, audit_ops=0
)
QUICK: Final = cli.Profile(
    name="quick", large=SPEC, small=SPEC, rounds=2, seconds=0.5, warmup=0.2, audit_ops=0
)
DEFAULT_OUTPUT: Final = Path("docs/benchmarks-citus.md")


@dataclass(frozen=True, slots=True)
class Run:
    """Everything the report shows."""

    profile: cli.Profile
    host: dict[str, str]
    layout: str
    workloads: Sequence[Workload]
    datasets: dict[str, Dataset]
    """By topology."""
    results: dict[str, Results]
    """By topology."""
    elapsed: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.topology", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two short rounds, for development")
    parser.add_argument("--rounds", type=int, help=f"rounds (default: {FULL.rounds})")
    parser.add_argument("--seconds", type=float, help="measured seconds per run")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"Markdown report (default: {DEFAULT_OUTPUT} for a full run, none for --quick)",
    )
    parser.add_argument("--no-output", action="store_true", help="write no Markdown report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start both clusters, load, measure, report, stop them."""
    args = parse_args(argv)
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    profile = QUICK if args.quick else FULL
    profile = replace(
        profile, rounds=args.rounds or profile.rounds, seconds=args.seconds or profile.seconds
    )
    workloads = [w for w in WORKLOADS if w.key in WORKLOAD_KEYS]
    shared = {name: value for name, value in CITUS_SETTINGS.items() if name in SHARED_SETTINGS}
    # CREATE EXTENSION citus turns ssl on in its nodes; the plain server has none. Without
    # this the client (asyncpg: sslmode=prefer) would pay TLS on Citus only.
    os.environ["PGSSLMODE"] = "disable"
    cli.log(f"sfdb benchmark on Citus, {profile.name} run: starting the clusters")
    with contextlib.ExitStack() as clusters:
        citus = clusters.enter_context(citus_cluster())
        plain = clusters.enter_context(
            local_cluster_control(bin_dir=citus.coordinator.bin_dir, settings=shared)
        )
        cli.log(
            f"  plain on :{plain.url.port}; Citus coordinator on :{citus.coordinator.url.port}, "
            f"worker on :{citus.worker.url.port} ({citus.coordinator.bin_dir})"
        )
        async with citus_database(citus) as settings:
            host = await machine(plain, settings)
            cli.log("loading the databases")
            datasets = {
                "plain": await _load_plain(plain),
                "citus": await _load_citus(citus, settings),
            }
            layout = await citus_layout(datasets["citus"].dsn)
            results = await measure(profile, workloads, datasets)
        host["load average at end"] = report.load_average()
    run = Run(
        profile=profile,
        host=host,
        layout=layout,
        workloads=workloads,
        datasets=datasets,
        results=results,
        elapsed=time.perf_counter() - started,
    )
    print(render(run, markdown=False))
    output = None if args.no_output else args.output or (None if args.quick else DEFAULT_OUTPUT)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(render(run, markdown=True))
        cli.log(f"wrote {output}")
    cli.log(f"done in {run.elapsed / 60:.1f} min")
    return 0


async def _load_plain(plain: LocalCluster) -> Dataset:
    dsn = await dataset.create(plain.url, SPEC)
    return await dataset.load(dsn, SPEC, log=cli.log)


async def _load_citus(citus: CitusCluster, settings: DatabaseSettings) -> Dataset:
    started = time.perf_counter()
    # The layer signs with the bench's key: the database accepts it beside its own, on the
    # coordinator and, through the copy install_tenant_key makes, on the worker.
    await install_tenant_key(settings.model_copy(update={"tenant_key": SecretStr(TENANT_KEY)}))
    name = settings.sqlalchemy_url().database or ""
    # Loaded, and measured, as the superuser, as on the plain server: the layer's roles
    # are the database's own there (<database>_app), not the bench's sfdb_app.
    data = await dataset.load(
        dataset.database_url(citus.coordinator.url, name),
        replace(SPEC, database=name),
        log=cli.log,
    )
    # The coordinator passes VACUUM on to the shards, but its CHECKPOINT is its own.
    await dataset.settle(dataset.database_url(citus.worker.url, name))
    cli.log(f"  {name}: VACUUM (ANALYZE) + CHECKPOINT on the worker too")
    return replace(data, load_seconds=time.perf_counter() - started)


async def measure(
    profile: cli.Profile, workloads: Sequence[Workload], datasets: dict[str, Dataset]
) -> dict[str, Results]:
    """Every workload on each topology in turn, for several rounds; the samples by topology."""
    # The plain database was migrated with the bench's app role; the Citus one with its own.
    impls = {"plain": LayerImpl(), "citus": LayerImpl(app_role=None)}
    results: dict[str, Results] = {name: defaultdict(list) for name in TOPOLOGIES}
    for round_index in range(profile.rounds):
        line = []
        for position, workload in enumerate(workloads):
            shift = (round_index + position) % len(TOPOLOGIES)
            for name in (*TOPOLOGIES[shift:], *TOPOLOGIES[:shift]):
                impl = impls[name]
                await cli.turn(profile, impl, workload, datasets[name], results[name])
                top = results[name][(workload.key, cli.POOL_SIZE, impl.key)][-1]
                line.append(f"{workload.key}/{name} {top.throughput:,.0f}")
        cli.log(
            f"  round {round_index + 1}/{profile.rounds} (c{cli.POOL_SIZE} ops/s): "
            + ", ".join(line)
        )
    return results


# -- the machine and the cluster ------------------------------------------------------


async def machine(plain: LocalCluster, citus: DatabaseSettings) -> dict[str, str]:
    """What the numbers were measured on: the machine, both servers, the Citus version."""
    host = await report.machine(dataset.database_url(plain.url, "postgres"))
    coordinator_url = citus.sqlalchemy_url()
    coordinator_dsn = dataset.database_url(coordinator_url, coordinator_url.database or "")
    coordinator = await report.machine(coordinator_dsn)
    conn = await asyncpg.connect(coordinator_dsn)
    try:
        extversion = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'citus'"
        )
        full_version = await conn.fetchval("SELECT citus_version()")
    finally:
        await conn.close()
    own = ", ".join(
        f"{name}={value}" for name, value in CITUS_SETTINGS.items() if name not in SHARED_SETTINGS
    )
    keep = ("date", "cpu", "memory", "os", "python", "packages")
    return {
        **{key: host[key] for key in keep},
        "postgresql, plain": host["postgresql"],
        "postgresql, Citus (both nodes)": f"{coordinator['postgresql']}; also {own}",
        "citus": f"extension {extversion} ({full_version})",
        "layer source": host["layer source"],
        "load average at start": report.load_average(),
    }


async def citus_layout(dsn: str) -> str:
    """Where the data is on Citus: the nodes, the shards and the reference table's copies."""
    conn = await asyncpg.connect(dsn)
    try:
        workers = await conn.fetchval(
            "SELECT count(*) FROM pg_dist_node WHERE groupid <> 0 AND noderole = 'primary'"
        )
        shards = await conn.fetchval(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'meeting_sessions'::regclass"
        )
        copies = await conn.fetch(
            "SELECT p.groupid = 0 AS on_coordinator FROM pg_dist_placement p "
            "JOIN pg_dist_shard s USING (shardid) WHERE s.logicalrelid = 'tenants'::regclass"
        )
        client_tls = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        node_conninfo = await conn.fetchval("SHOW citus.node_conninfo")
    finally:
        await conn.close()
    on_coordinator = any(row["on_coordinator"] for row in copies)
    return (
        f"a coordinator and {workers} worker, two clusters on this machine, the coordinator "
        "reaching the worker over TCP loopback (the client connects to the coordinator only); "
        f"the tenant-owned tables distributed by `tenant_id` and colocated, {shards} shards "
        f"each, all on the worker; `tenants` a reference table, {len(copies)} "
        f"cop{'y' if len(copies) == 1 else 'ies'}"
        + (" (one on the coordinator)" if on_coordinator else " (none on the coordinator)")
        + f"; client connections {'with' if client_tls else 'without'} TLS, on both servers; "
        f"coordinator → worker `citus.node_conninfo = '{node_conninfo}'` (Citus' default: "
        "`CREATE EXTENSION citus` turns `ssl` on in its nodes)"
    )


# -- the report ------------------------------------------------------------------------


def results_table(run: Run, *, markdown: bool) -> str:
    """ops/s, p50 and p99 on plain and on Citus, and Citus' throughput as a share of plain's."""
    headers = ["workload", "c"]
    for name in TOPOLOGIES:
        headers += [f"{TITLES[name]} ops/s", "p50", "p99"]
    headers.append("Citus/plain")
    labels = {"large": run.datasets["plain"], "small": run.datasets["plain"]}
    rows = []
    for workload in run.workloads:
        for concurrency in report.CONCURRENCIES:
            row = [report.workload_label(workload, labels), str(concurrency)]
            throughput: dict[str, float] = {}
            for name in TOPOLOGIES:
                samples = run.results[name].get((workload.key, concurrency, LayerImpl.key))
                if not samples:
                    row += ["-", "-", "-"]
                    continue
                found = report.cell(samples)
                throughput[name] = found.throughput
                row += [f"{found.throughput:,.0f}", report.ms(found.p50), report.ms(found.p99)]
            plain, citus = throughput.get("plain"), throughput.get("citus")
            row.append(f"{citus / plain:.2f}x" if plain and citus is not None else "-")
            rows.append(row)
    return report.table(headers, rows, markdown=markdown)


def _data_line(run: Run) -> str:
    plain, citus = run.datasets["plain"], run.datasets["citus"]
    spec = plain.spec
    return (
        f"- `{spec.database}` (plain) and `{citus.spec.database}` (Citus): {spec.tenants:,} "
        f"tenants x {spec.meetings_per_tenant:,} meetings = {spec.meetings:,} meetings; per "
        f"tenant {spec.users_per_tenant} users, 1 default CRM connection, "
        f"{spec.mappings_per_tenant} account mappings, {spec.audit_per_tenant} audit events "
        f"(the tenant shape of every benchmark database, with {spec.tenants} tenants so that "
        "the rate-limit workload has one per worker at concurrency 32). The same rows in both, "
        "loaded with COPY (`copy_records_to_table`) as the superuser (on Citus into the "
        "distributed tables through the coordinator), then `VACUUM (ANALYZE)` and `CHECKPOINT` "
        f"on every node: {plain.load_seconds:.1f} s on plain, {citus.load_seconds:.1f} s on "
        "Citus."
    )


def _method_lines(run: Run) -> list[str]:
    profile = run.profile
    pool = cli.POOL_SIZE
    return [
        f"- Rounds: {profile.rounds}. In every round each workload runs on plain and on Citus "
        "in turn (which goes first alternates from workload to workload and round to round), "
        "so both see the same machine. A turn is that of `python -m bench`: the layer opens "
        f"a pool of {pool} connections (`pool_size={pool}, max_overflow=0`), warms up for "
        f"{profile.warmup:g} s at concurrency {pool}, runs {profile.seconds:g} s at "
        f"concurrency 1 and {profile.seconds:g} s at concurrency {pool}, and closes the pool. "
        "Each cell is the median over the rounds of the round's throughput, p50 and p99 "
        "(closed loop: each of the c workers starts its next operation when its previous one "
        "ends).",
        "- **handler**: `directory.resolve(team)`, `db.rate_limit(tenant, "
        "'meetings_processed', period='daily')`, then one unit of work: user by Slack id, "
        "create meeting, audit event, commit; team and user drawn at random. **read**: one "
        "unit of work reading a random tenant's meetings of the last 30 days (50 rows). "
        f"**rate_limit**: `db.rate_limit` alone, worker w charging tenant w of {SPREAD_TENANTS}.",
        "- Both are throwaway clusters with durability off (`fsync`, `synchronous_commit` and "
        "`full_page_writes` off), unlike the server of `docs/benchmarks.md`: compare the two "
        "columns here, not these numbers with that file's. The client connects to both "
        "without TLS (`PGSSLMODE=disable`): `CREATE EXTENSION citus` turns `ssl` on in the "
        "Citus nodes, and the client would otherwise pay for it on Citus only.",
        "- The client, the plain server, the coordinator and the worker share the same cores: "
        "on Citus each statement costs CPU in two server processes (the coordinator's backend "
        "and the worker's) as well as in the client.",
    ]


def _differences() -> list[str]:
    return [
        "What the layer does differently on Citus (it checks for the extension once per "
        "connection):",
        "- A unit of work opens with three messages instead of one: `BEGIN`, then the `SET "
        "LOCAL`s (role, the tenant claim, statement and idle-in-transaction timeouts), then "
        "`SELECT sfdb_require_claim()`. The claim names no backend (pid 0): the worker "
        "verifies it too, with its copy of the tenant keys. The coordinator replays the "
        "whole text of a message that "
        "holds a `SET LOCAL` at the start of each transaction it opens on a worker, so "
        "`BEGIN` and the tenant check cannot share it: two more client-coordinator round "
        "trips per unit of work.",
        "- `db.rate_limit` (`SELECT sfdb_consume_rate_limit(...)`) runs on the worker by "
        "function-call delegation: the function is distributed by its tenant argument and "
        "colocated with `api_rate_limits`, so the coordinator hands the whole call to the "
        "node of the tenant's shard, where it sets the role and tenant itself and upserts the "
        "counter, one statement as on a single server.",
        "- Every other statement (the user lookup, the meeting and audit INSERTs, the read, "
        "the COMMIT) is planned on the coordinator and routed to the tenant's one shard, so it "
        "crosses coordinator → worker (over TLS, Citus' default), where the coordinator "
        "opened the transaction with "
        "`BEGIN` and the replayed `SET LOCAL`s (row-level security runs there). A "
        "transaction writes on one node, so it commits without two-phase commit. "
        "`directory.resolve` reads `tenants`, the reference table.",
    ]


def render(run: Run, *, markdown: bool) -> str:
    """The whole report: Markdown for the document, plain text for the terminal."""
    minutes = run.elapsed / 60
    profile = run.profile
    table = results_table(run, markdown=markdown)
    legend = (
        "ops/s: operations per second; p50, p99: latency in ms; c: concurrency; Citus/plain: "
        "Citus' throughput over plain's."
    )
    if not markdown:
        title = f"sfdb on Citus vs plain PostgreSQL: {profile.name} run, {profile.rounds} rounds"
        return "\n\n".join([f"{title}, {minutes:.1f} min", table, legend]) + "\n"
    machine_rows = [*run.host.items(), ("node layout", run.layout)]
    parts = [
        "# Benchmarks on Citus",
        f"The last run of `make bench-citus` (`python -m bench.topology`): the layer's "
        f"throughput on Citus next to plain PostgreSQL, measured in the same run, a "
        f"**{profile.name}** run ({profile.rounds} rounds) that took {minutes:.1f} minutes, "
        "clusters and loading included. Re-run it to refresh this file (`python -m "
        "bench.topology --quick` is the short version; it writes no file).",
        "## Machine",
        report.table(["", ""], machine_rows, markdown=True, numeric=False),
        "## Data",
        _data_line(run),
        "## Method",
        "\n".join(_method_lines(run)),
        "## What differs on Citus",
        "\n".join(_differences()),
        "## Results",
        table,
        legend,
    ]
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
