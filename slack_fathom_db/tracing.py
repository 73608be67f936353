"""Tracing with OpenTelemetry, when the ``otel`` extra is installed; nothing otherwise.

A span per unit of work (``sfdb.unit_of_work``) and one per repository call,
named by its intent (``sfdb.meetings.recent``). Spans carry no parameter and
no tenant id, unless ``DATABASE_TRACE_TENANT=true`` puts the tenant id on the
unit of work's span. Without ``opentelemetry-api`` every hook here is a no-op
that costs nothing per call: repository methods are not even wrapped; with it but no
tracer provider set by the application, a call costs one check.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import trace
except ImportError:  # the otel extra is not installed
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import uuid
    from collections.abc import Callable, Coroutine

    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["ENABLED", "tag_tenant", "trace_methods", "unit_of_work_span"]

ENABLED = trace is not None
"""Whether ``opentelemetry-api`` is importable (the ``otel`` extra)."""
_TRACER = None if trace is None else trace.get_tracer("slack_fathom_db")
"""One tracer for the package: it follows the provider the application sets, whenever."""


def _configured() -> bool:
    """Whether the application has set a tracer provider: before that, spans record nothing,
    and the layer skips them rather than pay for spans nobody sees.

    Reads the API's global (``get_tracer_provider()`` would read the environment on every
    call); tests/test_runner.py fails if spans stop appearing once a provider is set.
    """
    return getattr(trace, "_TRACER_PROVIDER", None) is not None


def unit_of_work_span(settings: DatabaseSettings) -> AbstractContextManager[Any]:
    """The span of one unit of work (a no-op context without OpenTelemetry)."""
    if _TRACER is None or not _configured():
        return nullcontext()
    span: AbstractContextManager[Any] = _TRACER.start_as_current_span("sfdb.unit_of_work")
    return span


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
    start = _TRACER.start_as_current_span if _TRACER is not None else None

    async def in_span(*args: Any, **kwargs: Any) -> Any:
        assert start is not None  # noqa: S101 - only wrapped when importable
        with start(span_name):
            return await method(*args, **kwargs)

    @functools.wraps(method)
    def traced(*args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        # The method's own coroutine when nothing records: no extra frame per call.
        return in_span(*args, **kwargs) if _configured() else method(*args, **kwargs)

    return traced
