"""The report of a run: printed to the terminal, and written as Markdown to docs/benchmarks.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench import report
from bench.explain import SMALL_TABLE, claim_line
from bench.impls.sync_orm import DEFAULT_EXECUTOR_THREADS
from bench.profiling import COMPONENTS, OPS, OTHER
from bench.workloads import SPREAD_TENANTS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.claims import Cost
    from bench.counting import Counts
    from bench.dataset import Dataset
    from bench.explain import Plan
    from bench.impls.base import Implementation
    from bench.profiling import Profile
    from bench.report import Results, Target
    from bench.workloads import Workload


@dataclass(frozen=True, slots=True)
class Run:
    """Everything a report shows."""

    profile: str
    rounds: int
    seconds: float
    warmup: float
    audit_ops: int
    pool_size: int
    host: dict[str, str]
    impls: Sequence[Implementation]
    workloads: Sequence[Workload]
    datasets: dict[str, Dataset]
    results: Results
    counts: Sequence[Counts]
    plans: Sequence[Plan]
    profiles: Sequence[Profile]
    targets: Sequence[Target]
    elapsed: float
    cost: Cost | None = None
    """What one claim verification costs the server (``None``: not measured)."""

    @property
    def compared(self) -> list[Implementation]:
        """The implementations of the main tables (variants are reported apart)."""
        return [impl for impl in self.impls if impl.variant_of is None]

    @property
    def claims_measured(self) -> bool:
        """Whether this run measured the layer with the claim verified and unverified."""
        keys = {impl.key for impl in self.impls}
        return {report.VERIFIED, report.PLAIN} <= keys and any(
            w.verified_vs_plain for w in self.workloads
        )


def _profile_table(profiles: Sequence[Profile], *, markdown: bool) -> str:
    names = [name for name, _ in COMPONENTS] + [OTHER]
    rows = [[name, *(f"{p.ms_per_call.get(name, 0.0):.3f}" for p in profiles)] for name in names]
    rows.append(["total, profiled", *(f"{sum(p.ms_per_call.values()):.3f}" for p in profiles)])
    rows.append(["client CPU per call, not profiled", *(f"{p.cpu_ms:.3f}" for p in profiles)])
    return report.table(
        ["component (ms per handler call)", *(p.impl for p in profiles)], rows, markdown=markdown
    )


def _profile_gap(profiles: Sequence[Profile]) -> str | None:
    """The layer's extra client CPU against raw asyncpg's, and the components it is in."""
    by_impl = {p.impl: p for p in profiles}
    layer, raw = by_impl.get("layer"), by_impl.get("raw")
    if layer is None or raw is None:
        return None
    extra = {
        name: layer.ms_per_call.get(name, 0.0) - raw.ms_per_call.get(name, 0.0)
        for name in {*layer.ms_per_call, *raw.ms_per_call}
    }
    total = sum(value for value in extra.values() if value > 0)
    if total <= 0:
        return None
    top = [
        name for name in sorted(extra, key=lambda n: extra[n], reverse=True)[:3] if extra[name] > 0
    ]
    shares = ", ".join(f"{name} {extra[name] / total:.0%}" for name in top)
    return (
        f"Unprofiled, a handler call costs the layer {layer.cpu_ms:.3f} ms of client CPU "
        f"and raw asyncpg {raw.cpu_ms:.3f} ms ({layer.cpu_ms / raw.cpu_ms:.2f}x); the "
        "client and the server share two cores, so every client millisecond costs "
        f"throughput at concurrency 32. Where the layer spends more (shares of its extra "
        f"profiled CPU): {shares}."
    )


def _cost_line(cost: Cost) -> str:
    """What the verifications cost the server, per call and per operation."""
    line = (
        f"On the server, one verification (`sfdb_claimed_tenant()`, as the app role in a "
        f"tenant transaction) costs {cost.loop_us:.1f} µs among {cost.loop_calls:,} calls "
        f"of one statement (`EXPLAIN ANALYZE`); reading the claim's tenant unverified "
        f"{cost.plain_loop_us:.2f} µs."
    )
    if cost.calls:
        line += (
            " Verifications per operation of the layer (counted with `track_functions`: "
            "the unit of work's check, the policies of each statement and of each row "
            "written): "
            + ", ".join(f"{name} {calls:g}" for name, calls in cost.calls.items())
            + "."
        )
    if cost.server_us:
        parts = []
        for name, (verified, plain) in cost.server_us.items():
            calls = cost.calls.get(name)
            each = f", {(verified - plain) / calls:.0f} µs a verification" if calls else ""
            parts.append(
                f"{name} {verified:.0f} vs {plain:.0f} µs (+{verified - plain:.0f} µs, "
                f"{verified / plain - 1:+.0%}{each})"
            )
        line += (
            f" The server's CPU per operation, verified vs plain (one connection, "
            f"{cost.server_ops:,} operations of each kind twice in each variant, the "
            "backend's CPU time): " + "; ".join(parts) + "."
        )
    return line


def _heading(text: str, level: int, *, markdown: bool) -> str:
    if markdown:
        return "#" * level + " " + text
    return f"{text}\n{'=' if level <= 2 else '-'}" + ("=" if level <= 2 else "-") * (len(text) - 1)


def _code(text: str, *, markdown: bool) -> str:
    return f"```\n{text}\n```" if markdown else text


def _data_lines(run: Run) -> list[str]:
    lines = []
    for role, data in (("large", run.datasets["large"]), ("small", run.datasets["small"])):
        spec = data.spec
        lines.append(
            f"- {role}: `{spec.database}`, {spec.tenants:,} tenants x "
            f"{spec.meetings_per_tenant:,} meetings = {spec.meetings:,} meetings; per tenant "
            f"{spec.users_per_tenant} users, 1 default CRM connection, "
            f"{spec.mappings_per_tenant} account mappings, {spec.audit_per_tenant} audit "
            f"events. Loaded with COPY (`copy_records_to_table`), then `VACUUM (ANALYZE)` "
            f"and `CHECKPOINT`, in {data.load_seconds:.1f} s"
            + (" (reused from an earlier load)." if data.reused else ".")
        )
    lines.append(
        "- Meetings are spread evenly over the last year (about 8% in the last 30 days, so a "
        "tenant's recent-meetings page is full at 50 rows and a user's holds about 8), 2% "
        "pending, 1% failed, 1% soft-deleted. Both sizes have the same tenants' shape, so a "
        "read returns the same rows on both: only the table grows."
    )
    lines.append(
        "- Every tenant has one Slack installation (a bot token) with its bot, saved through "
        "the layer's `InstallationStore`, so the tokens are stored AES-GCM ciphertexts; every "
        "implementation decrypts them with the same key."
    )
    return lines


def _method_lines(run: Run) -> list[str]:
    fixed = f"{run.audit_ops:,} `log_event` calls"
    return [
        f"- Rounds: {run.rounds}. In every round each workload runs for each implementation in "
        "turn, and the order of the implementations rotates from workload to workload and "
        "round to round. For its turn an implementation opens a pool of "
        f"{run.pool_size} connections (the layer: `pool_size={run.pool_size}, max_overflow=0`), "
        f"warms up for {run.warmup:g} s at concurrency {run.pool_size} (statements prepared on "
        f"every connection), then runs {run.seconds:g} s at concurrency 1 and {run.seconds:g} s "
        f"at concurrency {run.pool_size} (the audit burst: {fixed} at each), and closes the "
        "pool.",
        "- Closed loop: each of the c workers starts its next operation when its previous one "
        "ends. Throughput is operations per second; p50 and p99 are per-operation latencies "
        "in milliseconds. Each cell is the median over the rounds of the round's throughput, "
        "p50 and p99.",
        "- **handler**: the design's sketch: `directory.resolve(team)`, `db.rate_limit(tenant, "
        "'meetings_processed', period='daily')` (its own short transaction), then one unit of "
        "work: user by Slack id, create meeting, audit event, commit. The team and user are "
        "drawn at random among all tenants; every call creates a new meeting.",
        "- **read**: one transaction per read: a random tenant's meetings of the last 30 days "
        "(50 rows), or a random user's (same filter, `LIMIT 50`).",
        "- **find_installation**: what Bolt runs to authorize every request, "
        "`InstallationStore.async_find_installation(team_id=...)` for a random tenant: one "
        "autocommitted `sfdb_find_slack_installation()`, the tokens decrypted and a slack_sdk "
        "`Installation` built. The baselines send the same statement (the ORMs through "
        "`session.execute(text(...))`) and do the same decryption.",
        f"- **rate_limit**: `db.rate_limit` alone. *One hot tenant*: every worker charges the "
        f"same tenant and resource. *{SPREAD_TENANTS} tenants*: worker w charges tenant w.",
        f"- **audit burst**: {fixed}, each in a unit of work of its own (what "
        "`db.log_security_event` does), spread over the tenants. One burst per implementation "
        "and concurrency, in the first round only (at concurrency 1 it is the longest run of "
        "all).",
        f"- The synchronous design runs each call with `asyncio.to_thread`, i.e. in the event "
        f"loop's default thread pool ({DEFAULT_EXECUTOR_THREADS} threads here: "
        "`min(32, cores + 4)`).",
        "- Fairness: all four run the same statements as the app role, with `SET LOCAL ROLE` "
        "and the tenant set inside every tenant transaction (row-level security is FORCEd; "
        "the benchmark logs in as a superuser, which would bypass it otherwise). The table "
        "below says how each one does it.",
        "- Beyond the tenant context, the baselines differ only where their style does: raw "
        "asyncpg sends the layer's own statements (the same columns returned, `jsonb` "
        "decoded); the two ORM baselines insert with `session.add()` + flush (no `ON "
        "CONFLICT` idempotency) and charge a rate limit as ORM code usually does, `SELECT … "
        "FOR UPDATE` of the counter, then an UPDATE of the object at commit (the layer and "
        "raw asyncpg: one `INSERT … ON CONFLICT DO UPDATE … WHERE` statement).",
        "- The client and PostgreSQL share the same cores: at concurrency 32 the Python "
        "client's CPU time per operation is most of what limits throughput.",
        "- **verified vs unverified claim**: on the handler and the reads the layer takes "
        "two turns in a row (which goes first alternates), on the same database: as "
        "migrated, where every policy verifies the claim (`sfdb_claimed_tenant()`), and "
        "trusting it unverified, the policies and the unit of work's check reading the "
        "claim's tenant straight from its text (switched in place before the turn's pool "
        "opens, so every statement is planned anew under the warm-up; switched back after "
        "it closes). Same code, same messages, same data: only the verification differs.",
        "- **chained vs unchained audit**: on the audit burst the layer takes a second turn "
        "with the audit chain off (its trigger disabled, no commitment computed on insert; "
        "put back after the turn).",
    ]


def render(run: Run, *, markdown: bool) -> str:
    """The whole report."""
    md = markdown
    parts: list[str] = []
    minutes = run.elapsed / 60
    if md:
        parts.append("# Benchmarks")
        parts.append(
            f"The last run of `make bench` (`python -m bench`): a **{run.profile}** run "
            f"({run.rounds} rounds) that took {minutes:.1f} minutes, loading included. "
            "Re-run it to refresh this file (`python -m bench --quick` is the short "
            "version for development; it writes no file)."
        )
    else:
        parts.append(
            _heading(
                f"sfdb benchmark: {run.profile} run, {run.rounds} rounds, {minutes:.1f} min",
                1,
                markdown=md,
            )
        )
    parts.append(_heading("Machine", 2, markdown=md))
    parts.append(
        report.table(["", ""], [[k, v] for k, v in run.host.items()], markdown=md, numeric=False)
        if md
        else "\n".join(f"{k:<24} {v}" for k, v in run.host.items())
    )
    parts.append(_heading("Data", 2, markdown=md))
    parts.append("\n".join(_data_lines(run)))
    parts.append(_heading("Implementations", 2, markdown=md))
    parts.append(
        report.table(
            ["key", "implementation", "tenant context"],
            [[impl.key, impl.title, impl.isolation] for impl in run.impls],
            markdown=md,
            numeric=False,
        )
    )
    if md:
        parts.append(_heading("Method", 2, markdown=md))
        parts.append("\n".join(_method_lines(run)))
    parts.append(_heading("Results", 2, markdown=md))
    parts.append(
        report.results_table(run.results, run.workloads, run.compared, run.datasets, markdown=md)
    )
    parts.append("ops/s: operations per second; p50, p99: latency in ms; c: concurrency.")
    parts.append(_heading("Client CPU per operation", 2, markdown=md))
    parts.append(
        "CPU milliseconds of the benchmark process (the client: the implementation, the driver "
        "and the event loop; not the server) per operation, at concurrency 32, median of the "
        "rounds. The server shares the machine's cores, so every client millisecond saved is "
        "throughput."
    )
    parts.append(
        report.cpu_table(run.results, run.workloads, run.compared, run.datasets, markdown=md)
    )
    parts.append(_heading("Targets", 2, markdown=md))
    parts.append(report.targets_table(run.targets, markdown=md))
    note = report.scale_note(run.results)
    if note:
        parts.append(note)
    parts += _claims_part(run, markdown=md)
    if run.profiles:
        parts.append(_heading("Where the client's CPU goes (handler)", 2, markdown=md))
        parts.append(
            f"Each implementation runs {OPS:,} handler calls one after another, once plainly "
            "(the client CPU per call in the last row) and once under cProfile, timed by "
            "the process's CPU clock; the CPU time spent in each function itself is added "
            "up by the component it belongs to. "
            "The profiler slows everything by a similar factor: compare the rows, not "
            "the milliseconds with those above."
        )
        parts.append(_profile_table(run.profiles, markdown=md))
        gap = _profile_gap(run.profiles)
        if gap:
            parts.append(gap)
    if run.counts:
        parts.append(_heading("Round trips per operation", 2, markdown=md))
        parts.append(
            "Counted on the wire: every implementation connects through a proxy that counts "
            "the server's ReadyForQuery messages (one per simple-protocol query or "
            "extended-protocol Sync), on one connection, after a warm-up; prepares still "
            "happening after the warm-up are shown apart."
        )
        parts.append(report.counts_table(run.counts, markdown=md))
        parts.append(_heading("One handler call on the wire", 3, markdown=md))
        for counts in run.counts:
            title = next(impl.title for impl in run.impls if impl.key == counts.impl)
            lines = [f"{i:>2}. {line}" for i, line in enumerate(counts.handler_trace, start=1)]
            parts.append(f"{'**' if md else ''}{title}{'**' if md else ''}")
            parts.append(_code("\n".join(lines), markdown=md))
    parts += _plans_part(run, markdown=md)
    return "\n\n".join(parts) + "\n"


def _claims_part(run: Run, *, markdown: bool) -> list[str]:
    """The layer with the claim verified and unverified, and what a verification costs."""
    if not run.claims_measured:
        return []
    parts = [
        _heading("What verifying the claim costs", 2, markdown=markdown),
        "The layer as it is (verified) and the same layer on the same database trusting "
        "the claim unverified (plain: the policies compare with `NULLIF(split_part("
        "current_setting('app.tenant_claim', true), '.', 3), '')::uuid`, as they once "
        "compared with `app.tenant_id`, and `sfdb_require_claim()` only checks that this "
        "tenant is live), in turns side by side; verified/plain is the share of its "
        "throughput the verification leaves, the median over the rounds of the ratio of a "
        f"round's two turns (target ≥ {report.CLAIM_FACTOR:g}).",
        report.claims_table(run.results, run.workloads, run.datasets, markdown=markdown),
    ]
    if run.cost is not None:
        parts.append(_cost_line(run.cost))
    return parts


def _plans_part(run: Run, *, markdown: bool) -> list[str]:
    """The EXPLAIN section: each query's plan, and where the claim is verified."""
    if not run.plans:
        return []
    parts = [
        _heading("EXPLAIN of the layer's queries", 2, markdown=markdown),
        "On the large database, as the app role inside a tenant transaction with a claim "
        "signed with the bench's key (so row-level security is in the plan), with the "
        "parameters the layer sent. A sequential scan of "
        f"a table of fewer than {SMALL_TABLE:,} rows is accepted (and shown): there the "
        "planner rightly prefers it. * = named in "
        'DESIGN.md ("tenant + recency, tenant + user + recency, pending work, domain '
        'lookup").',
        report.plans_table(run.plans, markdown=markdown),
    ]
    line = claim_line(run.plans)
    if line:
        parts.append(line)
    return parts
