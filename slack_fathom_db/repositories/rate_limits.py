"""RateLimitRepo: fixed-window counters and token buckets, decided atomically by PostgreSQL.

Each charge is one statement: an ``INSERT … ON CONFLICT DO UPDATE … WHERE
count + cost <= limit`` whose ``WHERE`` is evaluated under the row lock, so N
concurrent callers against a limit L are granted exactly min(N, L), and a
denied call changes nothing. Windows are aligned to UTC.

Inside a unit of work, :meth:`RateLimitRepo.consume` and
:meth:`RateLimitRepo.take` answer at once from what is committed plus what
this unit of work has already asked for, and defer the charge itself to
``commit()``: it counts only if the unit of work commits, and the counter's
row lock is held for the commit alone, so ``db.rate_limit`` never waits
behind a unit of work. If the limit was reached meanwhile, ``commit()``
raises :class:`~slack_fathom_db.errors.RateLimitExceeded` and rolls back.
:meth:`RateLimitRepo.peek` reads the same window and spends nothing: its
``current`` is what is spent so far, never including the cost asked about.

``db.rate_limit`` runs the same upsert inside ``sfdb_consume_rate_limit()``
(migration 0002): one autocommitted statement, whose lock lasts that long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import DateTime, Float, Integer, Text, bindparam, cast, extract, func, select

from slack_fathom_db import validation
from slack_fathom_db.errors import RateLimitExceeded
from slack_fathom_db.models import ApiRateLimit
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.models.rate_limits import BUCKET, WINDOW_PERIODS
from slack_fathom_db.repositories.base import TenantRepository

if TYPE_CHECKING:
    from slack_fathom_db.runner import Runner
    from slack_fathom_db.settings import DatabaseSettings
    from slack_fathom_db.tenancy import TenantId

__all__ = [
    "PERIODS",
    "RateLimitDecision",
    "RateLimitRepo",
    "window",
    "window_charge",
    "window_decision",
]

PERIODS: Final = WINDOW_PERIODS
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_LIMIT: Final = 2**31 - 1
_FAR_AWAY_SECONDS: Final = 100 * 366 * 86_400.0
_MIN_REFILL: Final = 1e-9
"""Tokens per second, at least (one per ~32 years): slower rates underflow the arithmetic."""
_KEY: Final = (
    ApiRateLimit.tenant_id,
    ApiRateLimit.resource_type,
    ApiRateLimit.period,
    ApiRateLimit.window_start,
)


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    """The answer to a rate-limit request.

    ``current`` is what is spent in the window (or bucket) after this call,
    ``remaining`` what is left, ``resets_at`` when the window ends (or the
    bucket is full again), ``retry_after`` the seconds to wait before the same
    request could succeed (``0.0`` when allowed).
    """

    allowed: bool
    current: int
    limit: int
    remaining: int
    resets_at: datetime
    retry_after: float


def window(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC window ``[start, end)`` of ``period`` that contains ``now``."""
    now = now.astimezone(UTC)
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
        return start, start + timedelta(minutes=1)
    if period == "hourly":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    if period == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


@dataclass(frozen=True, slots=True)
class _Window:
    resource_type: str
    period: str
    limit: int
    cost: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.resource_type, self.period)


@dataclass(frozen=True, slots=True)
class _Bucket:
    bucket: str
    capacity: int
    refill_per_second: float
    tokens: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.bucket, BUCKET)


@dataclass(slots=True)
class _Deferred:
    charges: list[_Window | _Bucket] = field(default_factory=list)

    def spent(self, key: tuple[str, str]) -> int:
        return sum(
            charge.cost if isinstance(charge, _Window) else charge.tokens
            for charge in self.charges
            if charge.key == key
        )


class RateLimitRepo(TenantRepository[ApiRateLimit]):
    """``uow.rate_limits``."""

    model = ApiRateLimit
    span_prefix = "rate_limits"

    def __init__(self, runner: Runner, tenant_id: TenantId, settings: DatabaseSettings) -> None:
        super().__init__(runner, tenant_id, settings)
        self._deferred = _Deferred()

    async def consume(
        self, resource_type: str, *, limit: int, period: str = "daily", cost: int = 1
    ) -> RateLimitDecision:
        """Spend ``cost`` of ``limit`` in the current ``period`` window, charged at commit.

        ``current`` is what the window holds once this call counts (committed,
        plus what this unit of work asked for, plus ``cost`` when allowed).
        """
        charge = window_charge(resource_type, limit=limit, period=period, cost=cost)
        spent, now, end = await self._window_spent(charge)
        allowed = spent + charge.cost <= charge.limit
        if allowed:
            self._deferred.charges.append(charge)
            spent += charge.cost
        return window_decision(charge, spent=spent, allowed=allowed, now=now, end=end)

    async def peek(
        self, resource_type: str, *, limit: int, period: str = "daily", cost: int = 1
    ) -> RateLimitDecision:
        """The window as it stands; nothing is spent.

        ``current`` is what is spent so far (committed, plus what this unit of
        work has already asked for through :meth:`consume`), ``remaining`` is
        ``limit - current``, and ``allowed`` says whether ``cost`` more would
        fit now. Unlike :meth:`consume`, ``current`` never includes ``cost``.
        """
        charge = window_charge(resource_type, limit=limit, period=period, cost=cost)
        spent, now, end = await self._window_spent(charge)
        allowed = spent + charge.cost <= charge.limit
        return RateLimitDecision(
            allowed=allowed,
            current=spent,
            limit=charge.limit,
            remaining=max(0, charge.limit - spent),
            resets_at=end,
            retry_after=0.0 if allowed else max(0.0, (end - now).total_seconds()),
        )

    async def take(
        self, bucket: str, *, capacity: int, refill_per_second: float, tokens: int = 1
    ) -> RateLimitDecision:
        """Take ``tokens`` from a token bucket that refills continuously, charged at commit.

        ``refill_per_second`` is at least 1e-9 (one token in about 32 years).
        """
        charge = _Bucket(
            bucket=validation.resource_name(bucket, field="bucket"),
            capacity=validation.integer(capacity, field="capacity", minimum=1),
            refill_per_second=validation.positive_number(
                refill_per_second, field="refill_per_second", minimum=_MIN_REFILL
            ),
            tokens=validation.integer(tokens, field="tokens", minimum=1),
        )
        decision = await self._peek_bucket(charge, already=self._deferred.spent(charge.key))
        if decision.allowed:
            self._deferred.charges.append(charge)
        return decision

    # -- used by the unit of work at commit ---------------------------------------------

    async def apply_deferred_charges(self) -> None:
        """Apply the charges deferred to commit, in key order; raise if one no longer fits."""
        charges = sorted(self._deferred.charges, key=lambda charge: charge.key)
        self._deferred = _Deferred()
        for charge in charges:
            decision = await self._retrying(
                partial(self.charge_now, charge), action="apply rate-limit charge"
            )
            if not decision.allowed:
                name = charge.key[0]
                raise RateLimitExceeded(
                    f"commit: the rate limit of {name!r} was reached before this unit of work "
                    f"committed; retry after {decision.retry_after:.1f}s"
                )

    def discard_deferred_charges(self) -> None:
        """Forget charges deferred to a commit that will not happen."""
        self._deferred = _Deferred()

    async def charge_now(self, charge: _Window | _Bucket) -> RateLimitDecision:
        """Apply one charge in the current transaction, atomically."""
        if isinstance(charge, _Bucket):
            return await self._take_bucket(charge)
        return await self._consume_window(charge)

    # -- fixed windows ---------------------------------------------------------------
    # Every statement here is compiled once (named parameters, the tenant bound per
    # call) and run on the driver: rate limits sit on every handler's hot path.

    def _counter_row(self) -> Any:
        return self._select().where(
            ApiRateLimit.resource_type == bindparam("resource", type_=Text),
            ApiRateLimit.period == bindparam("period", type_=Text),
            ApiRateLimit.window_start == bindparam("window_start", type_=DateTime(timezone=True)),
        )

    def _window_count(self) -> Any:
        return self._counter_row().with_only_columns(ApiRateLimit.request_count)

    def _consume_statement(self) -> Any:
        insert = self._insert(
            ApiRateLimit,
            resource_type=bindparam("resource", type_=Text),
            period=bindparam("period", type_=Text),
            window_start=bindparam("window_start", type_=DateTime(timezone=True)),
            request_count=bindparam("cost", type_=Integer),
            updated_at=func.now(),
        )
        total = ApiRateLimit.request_count + insert.excluded.request_count
        # DO UPDATE uses only the row and EXCLUDED: Citus refuses functions that are not
        # IMMUTABLE there, and evaluates those of VALUES once, before routing.
        charged = (
            insert.on_conflict_do_update(
                index_elements=list(_KEY),
                set_={"request_count": total, "updated_at": insert.excluded.updated_at},
                where=total <= bindparam("limit", type_=Integer),
            )
            .returning(ApiRateLimit.request_count)
            .cte("charged")
        )
        return select(
            select(charged.c.request_count).scalar_subquery().label("granted"),
            self._window_count().scalar_subquery().label("prior"),
        )

    async def _window_spent(
        self, charge: _Window, *, committed_only: bool = False
    ) -> tuple[int, datetime, datetime]:
        """What the current window holds (committed, plus this unit of work's deferred
        charges unless ``committed_only``), the time it was read, and the window's end."""
        now = utcnow()
        start, end = window(charge.period, now)
        rows = await self._fetch(
            "window_count",
            self._window_count,
            action="read rate limit",
            resource=charge.resource_type,
            period=charge.period,
            window_start=start,
        )
        committed = rows[0][0] if rows else 0
        return committed + (0 if committed_only else self._deferred.spent(charge.key)), now, end

    async def _consume_window(self, charge: _Window) -> RateLimitDecision:
        now = utcnow()
        start, end = window(charge.period, now)
        if charge.cost > charge.limit:
            spent, now, end = await self._window_spent(charge, committed_only=True)
            return window_decision(charge, spent=spent, allowed=False, now=now, end=end)
        (row,) = await self._fetch(
            "consume",
            self._consume_statement,
            action="consume rate limit",
            resource=charge.resource_type,
            period=charge.period,
            window_start=start,
            cost=charge.cost,
            limit=charge.limit,
        )
        if row["granted"] is not None:
            return window_decision(charge, spent=row["granted"], allowed=True, now=now, end=end)
        return window_decision(charge, spent=row["prior"] or 0, allowed=False, now=now, end=end)

    # -- token buckets ---------------------------------------------------------------

    def _available(self, now: Any = None) -> Any:
        """Tokens in the bucket at ``now`` (the statement's time unless given)."""
        elapsed = cast(
            extract(
                "epoch",
                (now if now is not None else func.statement_timestamp()) - ApiRateLimit.updated_at,
            ),
            Float,
        )
        return func.least(
            bindparam("capacity", type_=Float),
            ApiRateLimit.tokens + elapsed * bindparam("rate", type_=Float),
        )

    def _bucket_available(self) -> Any:
        return self._counter_row().with_only_columns(self._available())

    def _take_statement(self) -> Any:
        insert = self._insert(
            ApiRateLimit,
            resource_type=bindparam("resource", type_=Text),
            period=bindparam("period", type_=Text),
            window_start=bindparam("window_start", type_=DateTime(timezone=True)),
            request_count=bindparam("zero", type_=Integer),
            tokens=bindparam("first_left", type_=Float),
            updated_at=func.statement_timestamp(),
        )
        # The time comes from VALUES (EXCLUDED), as for windows: see _consume_statement.
        now = insert.excluded.updated_at
        available = self._available(now)
        taken = (
            insert.on_conflict_do_update(
                index_elements=list(_KEY),
                set_={
                    "tokens": available - bindparam("tokens", type_=Float),
                    "updated_at": now,
                },
                where=available >= bindparam("tokens", type_=Float),
            )
            .returning(ApiRateLimit.tokens)
            .cte("taken")
        )
        return select(
            select(taken.c.tokens).scalar_subquery().label("left"),
            self._bucket_available().scalar_subquery().label("prior"),
        )

    def _bucket_params(self, charge: _Bucket) -> dict[str, Any]:
        return {
            "resource": charge.bucket,
            "period": BUCKET,
            "window_start": _EPOCH,
            "capacity": float(charge.capacity),
            "rate": charge.refill_per_second,
        }

    async def _peek_bucket(self, charge: _Bucket, *, already: int) -> RateLimitDecision:
        rows = await self._fetch(
            "bucket_available",
            self._bucket_available,
            action="read token bucket",
            **self._bucket_params(charge),
        )
        available = rows[0][0] if rows else None
        left = (charge.capacity if available is None else float(available)) - already
        allowed = left >= charge.tokens
        return _bucket_decision(
            charge, after=left - charge.tokens if allowed else left, allowed=allowed
        )

    async def _take_bucket(self, charge: _Bucket) -> RateLimitDecision:
        if charge.tokens > charge.capacity:
            return await self._peek_bucket(charge, already=0)
        (row,) = await self._fetch(
            "take",
            self._take_statement,
            action="take from token bucket",
            zero=0,
            first_left=float(charge.capacity - charge.tokens),
            tokens=float(charge.tokens),
            **self._bucket_params(charge),
        )
        if row["left"] is not None:
            return _bucket_decision(charge, after=float(row["left"]), allowed=True)
        prior_left = charge.capacity if row["prior"] is None else float(row["prior"])
        return _bucket_decision(charge, after=prior_left, allowed=False)


def window_charge(resource_type: str, *, limit: int, period: str, cost: int) -> _Window:
    """A validated fixed-window charge."""
    return _Window(
        resource_type=validation.resource_name(resource_type, field="resource_type"),
        period=validation.choice(period, field="period", allowed=PERIODS),
        limit=validation.integer(limit, field="limit", minimum=0, maximum=_MAX_LIMIT),
        cost=validation.integer(cost, field="cost", minimum=1, maximum=_MAX_LIMIT),
    )


def window_decision(
    charge: _Window, *, spent: int, allowed: bool, now: datetime, end: datetime
) -> RateLimitDecision:
    # A denial read its count from the statement's snapshot, which a concurrent
    # grant may have overtaken: never report room for a request just refused.
    current = spent if allowed else max(spent, charge.limit - charge.cost + 1)
    return RateLimitDecision(
        allowed=allowed,
        current=current,
        limit=charge.limit,
        remaining=max(0, charge.limit - current),
        resets_at=end,
        retry_after=0.0 if allowed else max(0.0, (end - now).total_seconds()),
    )


def _bucket_decision(charge: _Bucket, *, after: float, allowed: bool) -> RateLimitDecision:
    """``after``: the tokens left once this call is done (taken or not)."""
    after = max(0.0, after)
    remaining = math.floor(after)
    missing = 0.0 if allowed else max(0.0, charge.tokens - after)
    return RateLimitDecision(
        allowed=allowed,
        current=charge.capacity - remaining,
        limit=charge.capacity,
        remaining=remaining,
        # A very slow refill may be further away than a datetime can reach: say "not soon".
        resets_at=utcnow()
        + timedelta(
            seconds=min((charge.capacity - after) / charge.refill_per_second, _FAR_AWAY_SECONDS)
        ),
        retry_after=missing / charge.refill_per_second,
    )
