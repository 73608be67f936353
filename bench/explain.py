"""EXPLAIN of the layer's named queries on the large database, as the app role.

The statements are captured from the layer itself (a ``before_cursor_execute``
listener on the ``Database``'s engine while its public methods run, writes rolled
back), then planned with their real parameters inside a tenant transaction
(``SET LOCAL ROLE`` + ``SET LOCAL app.tenant_claim``, a claim signed with the
bench's key), so row-level security is part of the plan, as it is at run
time; the plan also shows where the policies verify the claim
(``sfdb_claimed_tenant()``): once per statement, as a one-time filter, or
per row.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import asyncpg
from sqlalchemy import event

from bench.impls.base import tenant_preamble
from bench.impls.layer import LayerImpl
from slack_fathom_db.tenancy import tenant_id_from_trusted
from slack_fathom_db.testing import engine_of

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from bench.dataset import Dataset
    from slack_fathom_db import Database, UnitOfWork

    Call = Callable[[UnitOfWork], Awaitable[object]]

SCANS: Final = {"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan"}
INDEXED: Final = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}
SMALL_TABLE: Final = 10_000
"""Rows under which a sequential scan is the planner's right choice, not a missing index."""
CLAIM_CALL: Final = "sfdb_claimed_tenant()"
"""What the tenant policies verify the claim with."""
_UUID: Final = re.compile(r"'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'")
ELIDED: Final = "'…'"
ONCE: Final = {"One-Time Filter": "once", "Index Cond": "once per scan"}
"""Plan entries evaluated once per statement (per scan); any other is evaluated per row."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The verdict on one query's plan."""

    name: str
    method: str
    named: bool
    """One of the queries the design names (the target applies to these)."""
    top: str
    scans: tuple[str, ...]
    uses_index: bool
    seq_scans: tuple[tuple[str, int], ...]
    """Relations read sequentially, with their row counts."""
    claim_checks: tuple[tuple[str, str, str], ...] = ()
    """Where the plan verifies the claim: (plan entry, node, expression)."""
    in_tenant: bool = True
    """Planned inside a tenant transaction (the directory's statement is not)."""

    @property
    def claim(self) -> str:
        """How often the claim is verified, and where: ``once: One-Time Filter of Result``."""
        if not self.claim_checks:
            return "not in the plan" if self.in_tenant else "-"
        places: dict[str, int] = {}
        for entry, node, _ in self.claim_checks:
            place = f"{ONCE.get(entry, 'per row')}: {entry} of {node}"
            places[place] = places.get(place, 0) + 1
        return "; ".join(
            place + (f" (x{count})" if count > 1 else "") for place, count in places.items()
        )

    @property
    def claim_once(self) -> bool:
        """The claim is verified, and never per row."""
        return bool(self.claim_checks) and all(e in ONCE for e, _, _ in self.claim_checks)

    @property
    def ok(self) -> bool:
        """An index serves it and no table of any size is read whole."""
        return self.uses_index and all(rows < SMALL_TABLE for _, rows in self.seq_scans)

    @property
    def verdict(self) -> str:
        """``index``, with the small tables read sequentially if any; else what is wrong."""
        small = ", ".join(f"{name} ({rows:,} rows)" for name, rows in self.seq_scans)
        if self.ok:
            return f"index (seq scan of small {small})" if small else "index"
        return f"SEQ SCAN of {small}" if self.seq_scans else "no index"


def _describe(node: dict[str, Any]) -> str:
    kind = str(node["Node Type"])
    if kind == "ModifyTable":
        return f"{node.get('Operation', 'Modify')} on {node.get('Relation Name', '?')}"
    text = kind
    if "Index Name" in node:
        text += f" using {node['Index Name']}"
    if "Relation Name" in node:
        text += f" on {node['Relation Name']}"
    return text


def claim_line(plans: Sequence[Plan]) -> str | None:
    """Where the layer's queries verify the claim, in one sentence (``None``: nothing planned)."""
    tenant = [p for p in plans if p.in_tenant]
    if not tenant:
        return None
    once = [p for p in tenant if p.claim_once]
    per_row = [p.name for p in tenant if any(e not in ONCE for e, _, _ in p.claim_checks)]
    absent = [p.name for p in tenant if not p.claim_checks]
    example = next(
        (
            f"`{_UUID.sub(ELIDED, text)}`"
            for p in once
            for entry, _, text in p.claim_checks
            if entry == "One-Time Filter"
        ),
        None,
    )
    line = (
        f"Where the claim is verified: in {len(once)} of the {len(tenant)} queries planned in "
        "a tenant transaction the policies' `sfdb_claimed_tenant()` is a `One-Time Filter`"
        + (f", {example}" if example else "")
        + " (the policy's `tenant_id = sfdb_claimed_tenant()` meets the statement's own "
        "tenant condition), evaluated once per statement (once per subplan where a "
        "statement reads several tables: the counts above), not per row"
    )
    if per_row:
        line += f"; per row in {', '.join(per_row)}"
    if absent:
        line += f"; not in the plan of {', '.join(absent)}"
    return line + "."


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [node]
    for child in node.get("Plans", []):
        nodes.extend(_walk(child))
    return nodes


def summarise(name: str, method: str, *, named: bool, plan_json: Any, rows: dict[str, int]) -> Plan:
    """Top node, scan nodes and the verdict of an ``EXPLAIN (FORMAT JSON)`` result."""
    document = json.loads(plan_json) if isinstance(plan_json, str) else plan_json
    root = document[0]["Plan"]
    nodes = _walk(root)
    scans = tuple(_describe(n) for n in nodes if n["Node Type"] in SCANS | INDEXED)
    seq = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"]
    checks = tuple(
        (entry, _describe(n), value)
        for n in nodes
        for entry, value in n.items()
        if isinstance(value, str) and CLAIM_CALL in value
    )
    return Plan(
        name=name,
        method=method,
        named=named,
        top=_describe(root),
        scans=scans,
        uses_index=any(n["Node Type"] in INDEXED for n in nodes),
        seq_scans=tuple((relation, rows.get(relation, 0)) for relation in seq),
        claim_checks=checks,
    )


async def explain_layer_queries(data: Dataset) -> list[Plan]:
    """Capture and EXPLAIN each named query (see the module docstring)."""
    tenant = data.tenants[0]
    user_id = tenant.user_ids[0]
    calls: list[tuple[str, str, bool, Call]] = [
        (
            "tenant + recency",
            "uow.meetings.recent()",
            True,
            lambda uow: uow.meetings.recent(days=30, limit=50),
        ),
        (
            "tenant + user + recency",
            "uow.meetings.for_user()",
            True,
            lambda uow: uow.meetings.for_user(user_id, days=30, limit=50),
        ),
        (
            "pending work",
            "uow.meetings.claim_pending()",
            True,
            lambda uow: uow.meetings.claim_pending(limit=10),
        ),
        (
            "domain lookup",
            "uow.tenants.find_account()",
            True,
            lambda uow: uow.tenants.find_account("ana@mail.client7.example.com"),
        ),
        (
            "user by Slack id",
            "uow.tenants.get_user_by_slack_id()",
            False,
            lambda uow: uow.tenants.get_user_by_slack_id(tenant.slack_user_ids[0]),
        ),
        (
            "meeting by Fathom id",
            "uow.meetings.get_by_fathom_id()",
            False,
            lambda uow: uow.meetings.get_by_fathom_id("rec-0-7"),
        ),
        (
            "audit, recent",
            "uow.audit.recent()",
            False,
            lambda uow: uow.audit.recent(days=7, limit=100),
        ),
    ]
    layer = LayerImpl()
    await layer.open(data.dsn, pool_size=2)
    captured: list[tuple[str, Any]] = []
    try:
        db = layer.db
        listener = _capture(captured)
        event.listen(engine_of(db).sync_engine, "before_cursor_execute", listener)
        # Hot paths run compiled SQL on the driver, past SQLAlchemy's events.
        logger = _log_driver_queries(captured)
        event.listen(engine_of(db).sync_engine, "checkout", logger)
        statements: list[tuple[str, str, bool, str, Any]] = []
        for name, method, named, call in calls:
            captured.clear()
            await _rolled_back(db, tenant.id, call)
            await asyncio.sleep(0)  # asyncpg calls its query loggers soon, not at once
            statement, params = captured[-1]
            statements.append((name, method, named, statement, params))
        captured.clear()
        await db.directory.resolve(tenant.slack_team_id)
        await asyncio.sleep(0)
        resolve_sql, resolve_params = captured[-1]
        event.remove(engine_of(db).sync_engine, "before_cursor_execute", listener)
        event.remove(engine_of(db).sync_engine, "checkout", logger)
    finally:
        await layer.close()
    plans = []
    conn = await asyncpg.connect(data.dsn)
    try:
        rows = {
            record["relname"]: int(record["reltuples"])
            for record in await conn.fetch(
                "SELECT relname, reltuples FROM pg_class WHERE relkind = 'r' "
                "AND relnamespace IN ('public'::regnamespace, "
                "to_regnamespace('audit_partitions'))"  # the audit log's monthly partitions
            )
        }
        for name, method, named, statement, params in statements:
            async with conn.transaction():
                await conn.execute(tenant_preamble(tenant.id, begin=False, check_tenant=False))
                plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *params)
            plans.append(summarise(name, method, named=named, plan_json=plan, rows=rows))
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {resolve_sql}", *resolve_params)
        resolved = summarise(
            "team → tenant", "db.directory.resolve()", named=False, plan_json=plan, rows=rows
        )
        plans.append(replace(resolved, in_tenant=False))
    finally:
        await conn.close()
    return plans


def _capture(into: list[tuple[str, Any]]) -> Callable[..., None]:
    def listener(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        into.append((statement, tuple(parameters or ())))

    return listener


async def _rolled_back(db: Database, tenant_id: Any, call: Call) -> None:
    async with db.unit_of_work(tenant_id_from_trusted(tenant_id)) as uow:
        await call(uow)
        # no commit: the unit of work rolls back (claim_pending and find_account write)


_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


def _log_driver_queries(into: list[tuple[str, Any]]) -> Callable[..., None]:
    """A pool ``checkout`` listener that records the statements run on the asyncpg connection."""

    def record(query: Any) -> None:
        if not query.query.lstrip().upper().startswith(_CONTROL):
            into.append((query.query, tuple(query.args or ())))

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        driver = dbapi_connection.driver_connection
        if record not in getattr(driver, "_query_loggers", ()):
            driver.add_query_logger(record)

    return on_checkout
