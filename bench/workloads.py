"""The workloads: what one operation is, on which database, and how long a run lasts."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from bench.impls.base import HandlerEvent

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from bench.dataset import Dataset
    from bench.impls.base import Implementation
    from bench.runner import Op

    Builder = Callable[[Implementation, Dataset, int, str], Op]

HOT_RESOURCE: Final = "bench_hot"
SPREAD_RESOURCE: Final = "bench_spread"
SPREAD_TENANTS: Final = 32


@dataclass(frozen=True, slots=True)
class Workload:
    """One row group of the table."""

    key: str
    title: str
    dataset: str
    """``large`` (1,000,000 meetings) or ``small`` (10,000)."""
    build: Builder
    group: str
    """Workloads of a group run back to back for each implementation, so the cells a target
    compares (1M vs 10k meetings, hot vs spread) see the same conditions on a shared machine."""
    fixed_ops: bool = False
    """Run a fixed number of operations (the audit burst) instead of a fixed time, once.

    A burst is not repeated every round: at concurrency 1 it is the longest run of all, and
    10,000 operations are plenty for stable medians.
    """
    verified_vs_plain: bool = False
    """The layer runs it a second time, right before or after, on the database trusting the
    claim unverified (:mod:`bench.claims`): what verifying claims costs."""
    chained_vs_unchained: bool = False
    """The layer runs it a second time, right before or after, on the database with the
    audit chain's triggers off: what chaining audit events costs."""
    returns_rows: bool = False
    """A read: before each turn, the first operations must find something (a tenant context
    the database does not admit reads nothing, silently)."""


class _Rngs:
    """One seeded generator per worker, so every implementation draws the same sequence."""

    def __init__(self, tag: str) -> None:
        self._tag = tag
        self._rngs: dict[int, random.Random] = {}

    def __call__(self, worker: int) -> random.Random:
        rng = self._rngs.get(worker)
        if rng is None:
            seed = zlib.crc32(f"{self._tag}:{worker}".encode())
            rng = self._rngs[worker] = random.Random(seed)  # noqa: S311 - workload draw
        return rng


def _handler(impl: Implementation, data: Dataset, _concurrency: int, tag: str) -> Op:
    rngs = _Rngs("handler")
    tenants = data.tenants

    def op(worker: int, seq: int) -> Awaitable[object]:
        rng = rngs(worker)
        tenant = rng.choice(tenants)
        return impl.handler(
            HandlerEvent(
                slack_team_id=tenant.slack_team_id,
                slack_user_id=rng.choice(tenant.slack_user_ids),
                fathom_recording_id=f"bench-{tag}-{worker}-{seq}",
                title="Weekly pipeline review",
            )
        )

    return op


def _recent(impl: Implementation, data: Dataset, _concurrency: int, _tag: str) -> Op:
    rngs = _Rngs("recent")
    tenants = data.tenants

    def op(worker: int, _seq: int) -> Awaitable[object]:
        return impl.recent_meetings(rngs(worker).choice(tenants))

    return op


def _for_user(impl: Implementation, data: Dataset, _concurrency: int, _tag: str) -> Op:
    rngs = _Rngs("for_user")
    tenants = data.tenants

    def op(worker: int, _seq: int) -> Awaitable[object]:
        rng = rngs(worker)
        tenant = rng.choice(tenants)
        return impl.user_meetings(tenant, rng.choice(tenant.user_ids))

    return op


def _find_installation(impl: Implementation, data: Dataset, _concurrency: int, _tag: str) -> Op:
    rngs = _Rngs("find_installation")
    tenants = data.tenants

    def op(worker: int, _seq: int) -> Awaitable[object]:
        return impl.find_installation(rngs(worker).choice(tenants))

    return op


def _hot(impl: Implementation, data: Dataset, _concurrency: int, _tag: str) -> Op:
    tenant = data.tenants[0]

    def op(_worker: int, _seq: int) -> Awaitable[object]:
        return impl.rate_limit(tenant, HOT_RESOURCE)

    return op


def _spread(impl: Implementation, data: Dataset, concurrency: int, _tag: str) -> Op:
    tenants = data.tenants[:SPREAD_TENANTS]

    def op(worker: int, seq: int) -> Awaitable[object]:
        # At concurrency 32 worker w always charges tenant w; alone, it cycles through all 32.
        return impl.rate_limit(
            tenants[(worker + seq * concurrency) % len(tenants)], SPREAD_RESOURCE
        )

    return op


def _audit(impl: Implementation, data: Dataset, concurrency: int, _tag: str) -> Op:
    tenants = data.tenants

    def op(worker: int, seq: int) -> Awaitable[object]:
        tenant = tenants[(worker + seq * concurrency) % len(tenants)]
        return impl.audit_event(tenant, tenant.user_ids[0])

    return op


WORKLOADS: Final = (
    Workload("handler", "handler", "large", _handler, "handler", verified_vs_plain=True),
    *(
        Workload(
            key,
            title,
            dataset,
            build,
            group,
            verified_vs_plain=True,
            returns_rows=True,
        )
        for key, title, dataset, build, group in (
            ("recent", "read: tenant's recent meetings", "large", _recent, "recent"),
            ("recent_small", "read: tenant's recent meetings", "small", _recent, "recent"),
            ("for_user", "read: user's meetings", "large", _for_user, "for_user"),
            ("for_user_small", "read: user's meetings", "small", _for_user, "for_user"),
        )
    ),
    Workload(
        "find_installation",
        "read: Bolt's installation lookup",
        "large",
        _find_installation,
        "find_installation",
        returns_rows=True,
    ),
    Workload("hot", "rate_limit: one hot tenant", "large", _hot, "rate_limit"),
    Workload("spread", "rate_limit: 32 tenants", "large", _spread, "rate_limit"),
    Workload(
        "audit",
        "audit burst (log_event, own transaction)",
        "large",
        _audit,
        "audit",
        fixed_ops=True,
        chained_vs_unchained=True,
    ),
)
