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


_provider_set = False


def _configured() -> bool:
    """Whether the application has set a tracer provider (before that, spans record nothing,
    and the layer skips them rather than pay for spans nobody sees). Once set, it stays."""
    global _provider_set  # noqa: PLW0603 - a one-way latch
    if not _provider_set and trace is not None:
        _provider_set = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    return _provider_set


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

    @functools.wraps(method)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        if start is None or not _configured():
            return await method(*args, **kwargs)
        with start(span_name):
            return await method(*args, **kwargs)

    return traced
