"""``sfdb tenant export`` of one large workspace: rows per second, and memory that stays flat.

A database of its own (``sfdb_bench_export``) holds two workspaces, one ten
times the other (100,000 and 1,000,000 meetings; ``--quick``: 10,000 and
100,000), each with users, a CRM connection, account mappings, audit events and
its meetings, generated in SQL (``generate_series``), as the owner. Each is
exported by ``sfdb tenant export`` in a process of its own; the time is the
process's whole run (start-up included), the memory its peak resident set
(``VmHWM``, which the process reports as it ends). Targets: the large workspace at 50,000 rows/s or
more, and its export's peak memory within 25% of the small one's.

``python -m bench.export [--quick] [--keep] [--server URL]`` runs this alone;
``make bench`` runs it after the other measurements (``--skip-export``: not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg

import bench.impls  # noqa: F401 - first: bench.dataset alone would import bench.claims too early
from bench import dataset
from bench.impls.base import APP_ROLE, TENANT_KEY, TOKEN_KEYS
from bench.report import Target

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.engine import URL

DATABASE: Final = "sfdb_bench_export"
FULL_SIZES: Final = (100_000, 1_000_000)
QUICK_SIZES: Final = (10_000, 100_000)
RATE_TARGET: Final = 50_000
MEMORY_SLACK: Final = 1.25
USERS: Final = 10
MAPPINGS: Final = 20
AUDIT_EVENTS: Final = 1_000

# One workspace, generated as the owner: the lifecycle setting admits its rows (migration
# 0010), the owner's policies its audit events (chained by the trigger at commit).
_WORKSPACE: Final = """
INSERT INTO tenants (id, slack_team_id, slack_team_name, plan_tier, settings)
VALUES ($1, $2, 'Export bench', 'enterprise', '{{"region": "eu", "seats": 250}}');
INSERT INTO users (tenant_id, slack_user_id, slack_email, display_name, role)
SELECT $1, 'U' || lpad(g::text, 8, '0'), 'user' || g || '@bench.example.com', 'User ' || g,
       CASE WHEN g = 1 THEN 'owner' ELSE 'member' END
FROM generate_series(1, {users}) AS g;
INSERT INTO crm_connections (tenant_id, provider_type, credentials_secret_id, is_default,
                             connected_by_user_id)
SELECT $1, 'hubspot', 'vault:crm/export-bench', true, (array_agg(id ORDER BY id))[1]
FROM users WHERE tenant_id = $1;
INSERT INTO account_mappings (tenant_id, crm_connection_id, email_domain, crm_account_id,
                              crm_account_name, verified)
SELECT $1, c.id, 'client' || g || '.example.com', 'acct-' || g, 'Client ' || g, g % 2 = 0
FROM crm_connections AS c, generate_series(1, {mappings}) AS g WHERE c.tenant_id = $1;
"""
_MEETINGS: Final = """
INSERT INTO meeting_sessions (
    tenant_id, user_id, crm_connection_id, fathom_recording_id, title, meeting_url,
    started_at, duration_seconds, participants, status, summary, action_items, ai_output,
    processing_attempts, processed_at, crm_sync_status, crm_record_id, crm_sync_attempts,
    crm_synced_at, created_at, updated_at)
SELECT $1, u.ids[1 + g % {users}], c.id, 'rec-' || g, 'Customer call ' || g,
       'https://fathom.video/calls/' || g,
       t - interval '45 minutes', 600 + g % 3000,
       jsonb_build_array(jsonb_build_object('email', 'buyer' || g % 97 || '@client.example.com',
                                            'name', 'Buyer ' || g % 97)),
       'completed',
       'Meeting ' || g || ': discussed renewal terms, the integration timeline and next '
       || 'steps; the customer asked for a follow-up demo.',
       jsonb_build_array('Send the proposal', 'Book the demo'),
       jsonb_build_object('sentiment', 0.25 + (g % 50) / 100.0, 'topics',
                          jsonb_build_array('pricing', 'timeline')),
       1, t, 'synced', 'note-' || g, 1, t, t, t
FROM generate_series(1, $2::int) AS g
CROSS JOIN LATERAL (SELECT now() - (g % 525600) * interval '1 minute' AS t) AS times
CROSS JOIN (SELECT array_agg(id ORDER BY id) AS ids FROM users WHERE tenant_id = $1) AS u
CROSS JOIN (SELECT id FROM crm_connections WHERE tenant_id = $1) AS c
"""
_AUDIT: Final = """
INSERT INTO audit_logs (tenant_id, event_type, event_category, action_description, user_id,
                        resource_type, resource_id, ip_address, user_agent, metadata)
SELECT $1, 'meeting.created', 'data', 'Meeting received from Fathom', u.ids[1 + g % {users}],
       'meeting_session', 'rec-' || g, ('203.0.113.' || g % 250)::inet, 'bench/1.0',
       jsonb_build_object('n', g)
FROM generate_series(1, {events}) AS g
CROSS JOIN (SELECT array_agg(id ORDER BY id) AS ids FROM users WHERE tenant_id = $1) AS u
"""


@dataclass(frozen=True, slots=True)
class Exported:
    """One export, as its process ran."""

    meetings: int
    rows: int
    seconds: float
    peak_rss_kib: int

    @property
    def rate(self) -> float:
        """Rows per second of the process's whole run."""
        return self.rows / self.seconds


async def targets(
    server: URL, *, quick: bool, keep: bool, log: Callable[[str], None]
) -> list[Target]:
    """Build the two workspaces, export each in a process of its own, judge the targets."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    log(f"tenant export: two workspaces of {sizes[0]:,} and {sizes[1]:,} meetings")
    dsn = await dataset.create(server, dataset.DatasetSpec(database=DATABASE, tenants=0))
    try:
        teams = {}
        for meetings in sizes:
            started = time.perf_counter()
            teams[meetings] = await _workspace(dsn, meetings)
            log(f"  {meetings:,} meetings generated in {time.perf_counter() - started:.1f}s")
        await dataset.settle(dsn)
        done = []
        for meetings in sizes:
            exported = _export(dsn, teams[meetings], meetings)
            log(
                f"  exported {exported.rows:,} rows in {exported.seconds:.1f}s "
                f"({exported.rate:,.0f} rows/s), peak RSS {exported.peak_rss_kib / 1024:.0f} MiB"
            )
            done.append(exported)
    finally:
        if not keep:
            await dataset.drop(server, DATABASE)
    return judge(done)


def judge(done: Sequence[Exported]) -> list[Target]:
    """The rate of the largest export, and its memory beside the smallest's."""
    small, large = done[0], done[-1]
    rate = Target(
        f"sfdb tenant export of {large.meetings:,} meetings: >= {RATE_TARGET:,} rows/s",
        f"{large.rows:,} rows in {large.seconds:.1f} s: {large.rate:,.0f} rows/s "
        f"(the process's whole run; {small.meetings:,} meetings: {small.rate:,.0f} rows/s)",
        large.rate >= RATE_TARGET,
    )
    memory = Target(
        f"its peak memory does not grow with the workspace (<= {MEMORY_SLACK}x of "
        f"{large.meetings // small.meetings}x fewer rows)",
        f"peak RSS {large.peak_rss_kib / 1024:.0f} MiB at {large.meetings:,} meetings, "
        f"{small.peak_rss_kib / 1024:.0f} MiB at {small.meetings:,}",
        large.peak_rss_kib <= small.peak_rss_kib * MEMORY_SLACK,
    )
    return [rate, memory]


async def _workspace(dsn: str, meetings: int) -> str:
    """A workspace of ``meetings`` meetings, generated in SQL as the owner; its team id."""
    team = f"TEXPORT{meetings}"
    conn = await asyncpg.connect(dsn)
    try:
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.tenants'::regclass"
        )
        async with conn.transaction():
            tenant = await conn.fetchval("SELECT gen_random_uuid()")
            await conn.execute(
                f"SET LOCAL ROLE \"{owner}\"; SET LOCAL sfdb.lifecycle_tenant = '{tenant}'"
            )
            shape = {"users": USERS, "mappings": MAPPINGS, "events": AUDIT_EVENTS}
            for statement in _WORKSPACE.format(**shape).split(";\n"):
                if statement.strip():
                    await conn.execute(statement, tenant, *([team] if "$2" in statement else []))
            await conn.execute(_MEETINGS.format(**shape), tenant, meetings)
            await conn.execute(_AUDIT.format(**shape), tenant)
    finally:
        await conn.close()
    return team


# The command in a process of its own, which reports its peak resident set as it ends: the
# high-water mark of its own memory since exec (VmHWM), not what a fork of the bench held
# before it (which getrusage's ru_maxrss of the child would count too).
_CHILD: Final = """
import sys
from pathlib import Path
from slack_fathom_db.cli import main
code = main(sys.argv[1:])
status = Path("/proc/self/status").read_text()
peak = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
print(f"peak-rss-kib {peak}", file=sys.stderr)
sys.exit(code)
"""
_PEAK: Final = re.compile(rb"^peak-rss-kib ([0-9]+)$", re.MULTILINE)


def _export(dsn: str, team: str, meetings: int) -> Exported:
    """``sfdb tenant export`` in a process of its own: its wall time and peak memory."""
    out = Path(tempfile.mkdtemp(prefix="sfdb-bench-export-")) / "export"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "SFDB_"))}
    env.update(
        DATABASE_URL=dsn,
        DATABASE_MIGRATION_URL=dsn,
        DATABASE_APP_ROLE=APP_ROLE,
        DATABASE_TOKEN_KEYS=TOKEN_KEYS,
        DATABASE_TENANT_KEY=TENANT_KEY,
    )
    command = [sys.executable, "-c", _CHILD, "tenant", "export", team, "--out", str(out)]
    try:
        started = time.perf_counter()
        done = subprocess.run(  # noqa: S603 - fixed argv
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        seconds = time.perf_counter() - started
        peak = _PEAK.search(done.stderr)
        if done.returncode != 0 or peak is None:
            raise RuntimeError(f"sfdb tenant export failed: {done.stderr.decode()[-2000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
        rows = sum(entry["rows"] for entry in manifest["tables"])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return Exported(meetings, rows, seconds, int(peak.group(1)))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.export``: this target alone; prints its lines."""
    from bench.cli import log, server_url  # noqa: PLC0415 - the suite's entry imports this module

    parser = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 and 100,000 meetings")
    parser.add_argument("--keep", action="store_true", help=f"keep {DATABASE} afterwards")
    parser.add_argument("--server", help="server URL (default: $DATABASE_URL's server)")
    args = parser.parse_args(argv)
    found = asyncio.run(targets(server_url(args.server), quick=args.quick, keep=args.keep, log=log))
    for target in found:
        print(f"{'met' if target.ok else 'MISSED'}  {target.name}: {target.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
