"""The runner: every statement observable, records read-only, one error table, no cycles."""

from __future__ import annotations

import ast
import asyncio
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
import pytest_asyncio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy import inspect

import slack_fathom_db
from slack_fathom_db import Database, claims, records
from slack_fathom_db.claims import CLAIM_PATTERN
from slack_fathom_db.errors import (
    ConfigurationError,
    Conflict,
    DatabaseUnavailable,
    NotFound,
    SerializationConflict,
    SlackFathomDBError,
    StatementTimeout,
    TenantClaimRefused,
    TenantIsolationError,
    TenantNotFound,
    ValidationError,
    translate,
)
from slack_fathom_db.repositories.base import RECORDS
from slack_fathom_db.testing import runner_of
from tests.helpers import unique_user_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.tenancy import TenantId

PACKAGE = Path(slack_fathom_db.__file__).parent


# -- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(RECORDS), ids=lambda model: model.__name__)
def test_each_record_has_its_models_attributes_in_order(model: type[Any]) -> None:
    record: type[NamedTuple] = RECORDS[model]
    assert record.__name__ == model.__name__
    assert getattr(records, record.__name__) is record
    # Internal columns (the audit chain's commitment) are the database's, read by no record.
    assert list(record._fields) == [
        prop.key for prop in inspect(model).column_attrs if not prop.columns[0].info.get("internal")
    ]


async def test_reads_return_records_that_stay_readable_and_cannot_change(
    db: Database, tenant_a: TenantId
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id(), display_name="Ada")
        meeting = await uow.meetings.create(
            user_id=user.id, fathom_recording_id=f"rec-{uuid.uuid4()}", title="Kick-off"
        )
        event = await uow.audit.log_event(
            event_type="meeting.created",
            event_category="data",
            action_description="test",
            ip_address="10.0.0.1",
        )
        tenant = await uow.tenants.get()
        await uow.commit()
    assert isinstance(user, records.User)
    assert isinstance(meeting, records.MeetingSession)
    assert isinstance(event, records.AuditLog)
    assert isinstance(tenant, records.Tenant)
    assert (meeting.status, meeting.title, meeting.participants) == ("pending", "Kick-off", [])
    assert str(event.ip_address) == "10.0.0.1"
    assert event.event_metadata == {}
    for record, field in ((user, "display_name"), (meeting, "status"), (tenant, "plan_tier")):
        with pytest.raises(AttributeError):
            setattr(record, field, "changed")


# -- DATABASE_ECHO and the slow-statement log ---------------------------------------------


@pytest_asyncio.fixture
async def echo_db(settings: DatabaseSettings) -> AsyncIterator[Database]:
    echoing = Database(settings.model_copy(update={"echo": True, "slow_statement_ms": 0}))
    yield echoing
    await echoing.dispose()


async def test_echo_logs_every_statement_of_a_handler_and_never_a_parameter(
    echo_db: Database, tenant_a: TenantId, caplog: pytest.LogCaptureFixture
) -> None:
    slack_user, recording = unique_user_id(), f"rec-secret-{uuid.uuid4()}"
    async with echo_db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.commit()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="slack_fathom_db.sql"):
        team = (await echo_db.directory.resolve("T0NOBODY00")) or tenant_a
        await echo_db.rate_limit(team, "echoed", limit=10)
        async with echo_db.unit_of_work(tenant_a) as uow:
            user = await uow.tenants.get_user_by_slack_id(slack_user)
            assert user is not None
            await uow.meetings.create(user_id=user.id, fathom_recording_id=recording, title="t")
            await uow.meetings.recent()
            await uow.commit()
    logged = [r.getMessage() for r in caplog.records if r.name == "slack_fathom_db.sql"]
    text = "\n".join(logged)
    for expected in (
        "sfdb_resolve_tenant",
        "sfdb_consume_rate_limit",
        "SET LOCAL app.tenant_claim = '…'",
        "FROM users",
        "INSERT INTO meeting_sessions",
        "ORDER BY meeting_sessions.created_at DESC",
        "COMMIT",
    ):
        assert expected in text, expected
    for secret in (slack_user, recording, str(tenant_a), "echoed"):
        assert secret not in text, secret
    assert "v1." not in text  # no tenant claim
    assert "app.tenant_id" not in text  # units of work no longer set it


async def test_echo_never_shows_a_claim_not_even_a_refreshed_one(
    echo_db: Database,
    tenant_a: TenantId,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every line logged while units of work open, refresh (the refresh age is 0.1 s
    here), fail, roll back and commit, from every logger, shows each ``SET LOCAL`` of a
    claim with the claim masked: none holds ``v1.`` (how every claim starts), while the
    claims themselves were set (read back inside the transaction)."""
    monkeypatch.setattr(claims, "REFRESH_AFTER", 0.1)
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        async with echo_db.unit_of_work(tenant_a) as uow:
            runner = runner_of(uow)
            for _ in range(2):
                await asyncio.sleep(0.15)
                (row,) = await runner.fetch(
                    "SELECT current_setting('app.tenant_claim') AS claim", (), action="probe"
                )
                seen.append(row["claim"])
            with pytest.raises(NotFound):
                await uow.meetings.create(
                    user_id=uuid.uuid4(), fathom_recording_id="rec-echo", title="t"
                )
            await uow.rollback()
            await uow.tenants.add_user(slack_user_id=unique_user_id())
            await uow.commit()
    assert len(set(seen)) == 2
    assert all(CLAIM_PATTERN.fullmatch(claim) for claim in seen), seen
    logged = [record.getMessage() for record in caplog.records]
    masked = [line for line in logged if "SET LOCAL app.tenant_claim = '…'" in line]
    assert len(masked) >= 4, logged  # the preamble, two refreshes, the preamble again
    for line in logged:
        assert "v1." not in line, line
        assert CLAIM_PATTERN.search(line) is None, line


async def test_a_slow_statement_is_logged_as_a_warning(
    settings: DatabaseSettings, tenant_a: TenantId, caplog: pytest.LogCaptureFixture
) -> None:
    # A quarter of a second: far above a quick statement on a shared, busy machine (on a
    # Citus cluster a fresh connection's first statement also opens one to the worker).
    slow = Database(settings.model_copy(update={"slow_statement_ms": 250}))
    try:
        with caplog.at_level(logging.WARNING, logger="slack_fathom_db.sql"):
            async with slow.unit_of_work(tenant_a) as uow:
                await uow.meetings.recent()  # quick: not logged
                # Every statement of the layer runs through this one method of the runner.
                await runner_of(uow).fetch("SELECT pg_sleep(0.3)", (), action="nap")
    finally:
        await slow.dispose()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "slow statement" in warnings[0]
    assert "(nap): SELECT pg_sleep(0.3)" in warnings[0]


async def test_no_slow_statement_is_logged_under_the_threshold(
    db: Database, tenant_a: TenantId, caplog: pytest.LogCaptureFixture
) -> None:
    assert db.settings.slow_statement_ms >= 1000
    with caplog.at_level(logging.WARNING, logger="slack_fathom_db.sql"):
        async with db.unit_of_work(tenant_a) as uow:
            await uow.meetings.recent()
    assert not [r for r in caplog.records if "slow statement" in r.getMessage()]


# -- tracing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


async def test_spans_per_unit_of_work_and_repository_call_carry_no_tenant_by_default(
    db: Database, tenant_a: TenantId, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.meetings.recent()
        await uow.tenants.get()
    finished = spans.get_finished_spans()
    names = [span.name for span in finished]
    assert names == ["sfdb.meetings.recent", "sfdb.tenants.get", "sfdb.unit_of_work"]
    unit = finished[-1]
    assert all(span.parent is not None for span in finished[:2])
    assert all(span.parent.span_id == unit.context.span_id for span in finished[:2])  # type: ignore[union-attr]
    for span in finished:
        assert str(tenant_a) not in repr(dict(span.attributes or {}))


async def test_a_failed_call_marks_its_span_by_the_error_type_and_quotes_no_values(
    db: Database, tenant_a: TenantId, spans: InMemorySpanExporter
) -> None:
    ghost = uuid.uuid4()
    spans.clear()
    with pytest.raises(NotFound):
        async with db.unit_of_work(tenant_a) as uow:
            await uow.meetings.create(user_id=ghost, fathom_recording_id="rec-ghost", title="t")
    failed = {span.name: span for span in spans.get_finished_spans()}
    for name in ("sfdb.meetings.create", "sfdb.unit_of_work"):
        span = failed[name]
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "NotFound"
        assert not span.events  # no exception event: a driver's message may quote a row
        shown = repr(dict(span.attributes or {})) + repr(span.status)
        assert str(ghost) not in shown
        assert str(tenant_a) not in shown


async def test_the_tenant_goes_on_the_span_only_when_asked(
    settings: DatabaseSettings, tenant_a: TenantId, spans: InMemorySpanExporter
) -> None:
    traced = Database(settings.model_copy(update={"trace_tenant": True}))
    spans.clear()
    try:
        async with traced.unit_of_work(tenant_a) as uow:
            await uow.tenants.get()
    finally:
        await traced.dispose()
    (unit,) = [s for s in spans.get_finished_spans() if s.name == "sfdb.unit_of_work"]
    assert dict(unit.attributes or {}) == {"sfdb.tenant_id": str(tenant_a)}


# -- pool figures -------------------------------------------------------------------------


async def test_pool_stats_count_what_is_checked_out(db: Database, tenant_a: TenantId) -> None:
    before = db.pool_stats()
    async with db.unit_of_work(tenant_a):
        during = db.pool_stats()
    after = db.pool_stats()
    assert during.checked_out == before.checked_out + 1
    assert after.checked_out == before.checked_out
    assert during.size == db.settings.pool_size


async def test_pool_waits_count_checkouts_that_found_every_connection_busy(
    settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    single = Database(settings.model_copy(update={"pool_size": 1, "max_overflow": 0}))
    try:
        assert single.pool_stats().waits == 0
        async with single.unit_of_work(tenant_a):
            waiting = asyncio.ensure_future(single.directory.resolve("T0WAITING"))
            await asyncio.sleep(0.05)
            assert not waiting.done()  # the one connection is busy
            assert single.pool_stats().waits == 1
        assert await waiting is None
        async with single.unit_of_work(tenant_a):
            pass
        assert single.pool_stats().waits == 1  # a free connection: no wait
    finally:
        await single.dispose()


async def test_pool_figures_are_opentelemetry_metrics(
    settings: DatabaseSettings, tenant_a: TenantId
) -> None:
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    observed = Database(settings.model_copy(update={"pool_size": 3}))
    try:
        async with observed.unit_of_work(tenant_a):
            data = reader.get_metrics_data()
    finally:
        await observed.dispose()
    assert data is not None
    ours = f"#{id(observed):x}"
    points = {
        metric.name: [
            getattr(point, "value", None)
            for point in metric.data.data_points
            if str((point.attributes or {}).get("pool.name", "")).endswith(ours)
        ]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "slack_fathom_db"
        for metric in scope.metrics
    }
    assert points["sfdb.pool.size"] == [3]
    assert points["sfdb.pool.checked_out"] == [1]
    assert points["sfdb.pool.overflow"] == [0]
    assert points["sfdb.pool.waits"] == [0]


# -- the error table ----------------------------------------------------------------------


class _Raised(Exception):
    def __init__(self, sqlstate: str, message: str = "boom") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("23505", Conflict),
        ("23503", NotFound),
        ("23514", ValidationError),
        ("22P02", ValidationError),
        ("42501", TenantIsolationError),
        ("40001", SerializationConflict),
        ("40P01", SerializationConflict),
        ("P0002", TenantNotFound),
        ("SF001", TenantClaimRefused),
        ("28P01", DatabaseUnavailable),
        ("53300", DatabaseUnavailable),
        ("55P03", StatementTimeout),
        ("57014", StatementTimeout),
        ("57P01", DatabaseUnavailable),
        ("08006", DatabaseUnavailable),
        ("XX000", SlackFathomDBError),
    ],
)
def test_database_errors_are_translated_by_one_table(
    sqlstate: str, expected: type[SlackFathomDBError]
) -> None:
    error = translate(_Raised(sqlstate), action="do it")
    assert type(error) is expected
    assert error.args[0].startswith("do it: ")


def test_a_citus_worker_refusing_a_login_is_a_configuration_error() -> None:
    refused = _Raised(
        "08006",
        "connection to the remote node app@127.0.0.1:9701 failed with the following error: "
        'FATAL:  role "app" is not permitted to log in',
    )
    assert type(translate(refused, action="x")) is ConfigurationError
    assert type(translate(_Raised("08006"), action="x")) is DatabaseUnavailable


# -- the package's import graph -----------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, TYPE_CHECKING imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(name for name in names if name.startswith("slack_fathom_db"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("slack_fathom_db"))
    return found


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle of ``graph`` (module -> modules it imports), as ``a -> b -> a``."""
    found: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in graph.get(node, ()):
            if target in path:
                found.add(" -> ".join([*path[path.index(target) :], target]))
            elif len(path) < 12:
                visit(target, [*path, target])

    for start in graph:
        visit(start, [start])
    return sorted(found)


def test_no_module_of_the_package_is_in_an_import_cycle() -> None:
    modules = {
        ".".join(
            ("slack_fathom_db", *path.relative_to(PACKAGE).with_suffix("").parts)
        ).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph = {
        name: {
            target
            for imported in _imports(path)
            for target in (imported, imported.rsplit(".", 1)[0])
            # A package's __init__ re-exports its modules: ``pkg.y`` importing ``pkg.x``
            # is no cycle through ``pkg``.
            if target in modules and target != name and not name.startswith(f"{target}.")
        }
        for name, path in modules.items()
    }
    assert graph["slack_fathom_db.uow"] >= {"slack_fathom_db.runner"}  # the graph is real
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert "a -> b -> c -> a" in _cycles(graph)
    assert _cycles({"a": {"b"}, "b": set()}) == []
