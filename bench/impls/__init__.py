"""The four implementations the benchmark compares, in report order."""

from __future__ import annotations

from bench.impls.async_orm import AsyncOrmImpl
from bench.impls.base import BenchTenant, HandlerEvent, Implementation
from bench.impls.layer import LayerImpl
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
]

ALL: tuple[type[Implementation], ...] = (LayerImpl, RawAsyncpgImpl, SyncOrmImpl, AsyncOrmImpl)
