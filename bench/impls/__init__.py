"""The four implementations the benchmark compares, in report order, and the layer's variants
that measure what verifying claims and chaining audit events cost."""

from __future__ import annotations

from bench.impls.async_orm import AsyncOrmImpl
from bench.impls.base import BenchTenant, HandlerEvent, Implementation
from bench.impls.layer import LayerImpl, UnchainedLayerImpl, UnverifiedLayerImpl
from bench.impls.raw import RawAsyncpgImpl
from bench.impls.sync_orm import SyncOrmImpl

__all__ = [
    "ALL",
    "AsyncOrmImpl",
    "BenchTenant",
    "HandlerEvent",
    "Implementation",
    "LayerImpl",
    "RawAsyncpgImpl",
    "SyncOrmImpl",
    "UnchainedLayerImpl",
    "UnverifiedLayerImpl",
]

ALL: tuple[type[Implementation], ...] = (
    LayerImpl,
    RawAsyncpgImpl,
    SyncOrmImpl,
    AsyncOrmImpl,
    UnverifiedLayerImpl,
    UnchainedLayerImpl,
)
