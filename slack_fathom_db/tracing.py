"""Tracing and pool metrics with OpenTelemetry, when the ``otel`` extra is installed.

A span per unit of work (``sfdb.unit_of_work``) and one per repository call,
named by its intent (``sfdb.meetings.recent``). Spans carry no parameter and
no tenant id, unless ``DATABASE_TRACE_TENANT=true`` puts the tenant id on the
unit of work's span. Without ``opentelemetry-api`` every hook here is a no-op
that costs nothing per call: repository methods are not even wrapped; with it but no
tracer provider set by the application, a call costs one check.

Pool figures are observable gauges of the meter ``slack_fathom_db``:
``sfdb.pool.size``, ``sfdb.pool.checked_out``, ``sfdb.pool.overflow`` and
``sfdb.pool.waits`` (a counter), read from ``Database.pool_stats()`` when the
application's metric reader collects.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Final

try:
    from opentelemetry import metrics, trace
except ImportError:  # the otel extra is not installed
    metrics = trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import uuid
    from collections.abc import Callable, Coroutine, Iterable, Iterator

    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["observe_pool", "tag_tenant", "trace_methods", "unit_of_work_span"]

_TRACER = None if trace is None else trace.get_tracer("slack_fathom_db")
"""One tracer for the package: it follows the provider the application sets, whenever."""


def _configured() -> bool:
    """Whether the application has set a tracer provider: before that, spans record nothing,
    and the layer skips them rather than pay for spans nobody sees.

    Reads the API's global (``get_tracer_provider()`` would read the environment on every
    call); tests/test_runner.py fails if spans stop appearing once a provider is set.
    """
    return getattr(trace, "_TRACER_PROVIDER", None) is not None


def unit_of_work_span() -> AbstractContextManager[Any]:
    """The span of one unit of work (a no-op context without OpenTelemetry)."""
    if _TRACER is None or not _configured():
        return nullcontext()
    return _span("sfdb.unit_of_work")


@contextmanager
def _span(name: str) -> Iterator[Any]:
    """A span that records a failure by the exception's type only: a database error's text
    may quote a row's values (``DETAIL: Key (…)=(…)``), and spans carry no values."""
    assert _TRACER is not None  # noqa: S101 - only called when importable
    assert trace is not None  # noqa: S101
    with _TRACER.start_as_current_span(
        name, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise


def tag_tenant(span: Any, settings: DatabaseSettings, tenant_id: uuid.UUID) -> None:
    """Put the tenant id on ``span``, only if the settings opt in."""
    if trace is not None and settings.trace_tenant and span is not None:
        span.set_attribute("sfdb.tenant_id", str(tenant_id))


def trace_methods(cls: type[Any], prefix: str) -> None:
    """Wrap every public coroutine method of ``cls`` in a span ``sfdb.<prefix>.<name>``."""
    if _TRACER is None:
        return
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _traced(f"sfdb.{prefix}.{name}", method))


def _traced(
    span_name: str, method: Callable[..., Coroutine[Any, Any, Any]]
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        if not _configured():
            return await method(*args, **kwargs)
        with _span(span_name):
            return await method(*args, **kwargs)

    return traced


_POOL_FIGURES: Final = ("size", "checked_out", "overflow", "waits")
_pools: dict[str, Callable[[], Callable[[], object] | None]] = {}
"""Pool name -> a weak reader of its figures, for every live ``Database`` that built a pool."""
_instruments: list[object] = []


def observe_pool(name: str, pool_stats: Callable[[], object]) -> None:
    """Report what ``pool_stats()`` (a bound method, held weakly) returns while its owner
    lives, as gauges (``waits`` as a counter) with the attribute ``pool.name``."""
    if metrics is None:
        return
    _pools[name] = weakref.WeakMethod(pool_stats)
    if _instruments:
        return
    meter = metrics.get_meter("slack_fathom_db")

    def observe(figure: str) -> Callable[[Any], Iterable[Any]]:
        def callback(_options: Any) -> Iterable[Any]:
            assert metrics is not None  # noqa: S101 - only registered when importable
            observations = []
            for pool_name, read in list(_pools.items()):
                method = read()
                if method is None:
                    del _pools[pool_name]
                    continue
                value = getattr(method(), figure)
                observations.append(metrics.Observation(value, {"pool.name": pool_name}))
            return observations

        return callback

    for figure in _POOL_FIGURES:
        name_, help_ = f"sfdb.pool.{figure}", f"connection pool: {figure.replace('_', ' ')}"
        create = (
            meter.create_observable_counter
            if figure == "waits"
            else (meter.create_observable_gauge)
        )
        _instruments.append(create(name_, callbacks=[observe(figure)], description=help_))
