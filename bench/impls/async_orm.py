"""The obvious async ORM: an ``AsyncSession`` per handler, objects added and flushed, no care.

What most teams write first from the SQLAlchemy asyncio documentation:
``async_sessionmaker(engine, expire_on_commit=False)``, the transaction begun
by the first statement (the driver's own ``BEGIN`` round trip), the tenant
context as two more statements (``SET LOCAL ROLE`` and ``SELECT
set_config('app.tenant_claim', :claim, true)``, the claim signed by hand with
the bench's tenant key, because ``SET`` takes no bind parameters), and the same
read-modify-write rate limit as the sync design. It does not call
``sfdb_require_claim()``: the team was just resolved.
Bolt's installation lookup is the layer store's statement through
``session.execute(text(...))``, decrypted and built as the store does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bench.impls import orm_common as q
from bench.impls.base import (
    APP_ROLE,
    HANDLER_RESOURCE,
    NEVER_DENY,
    Implementation,
    claim,
    installation_from_row,
)
from slack_fathom_db.claims import CLAIM_SETTING
from slack_fathom_db.models import ApiRateLimit

if TYPE_CHECKING:
    import uuid

    from slack_sdk.oauth.installation_store.models.installation import Installation

    from bench.impls.base import BenchTenant, HandlerEvent

SET_ROLE = text(f"SET LOCAL ROLE {APP_ROLE}")


async def _tenant_context(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    await session.execute(SET_ROLE)
    await session.execute(select(func.set_config(CLAIM_SETTING, claim(tenant_id), True)))


async def _charge(session: AsyncSession, tenant_id: uuid.UUID, resource: str) -> bool:
    for _attempt in range(3):
        await _tenant_context(session, tenant_id)
        key = q.rate_key(tenant_id, resource)
        counter = await session.get(ApiRateLimit, key, with_for_update=True)
        try:
            if counter is None:
                session.add(q.new_counter(key))
                allowed = True
            else:
                allowed = q.spend(counter, NEVER_DENY)
            await session.commit()
        except IntegrityError:  # two first charges of a window raced: count again
            await session.rollback()
            continue
        return allowed
    raise RuntimeError("rate limit: could not charge")


class AsyncOrmImpl(Implementation):
    """AsyncSession per handler on asyncpg."""

    key = "orm"
    title = "naive async ORM"
    isolation = (
        "the driver's `BEGIN` on first statement (a round trip), then `SET LOCAL ROLE "
        f"{APP_ROLE}` and `SELECT set_config('app.tenant_claim', $1, true)` (a claim signed by "
        "hand, pid 0) as two statements; no `sfdb_require_claim()`"
    )

    def __init__(self) -> None:
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._cipher = q.cipher()

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory."""
        if self._sessions is None:
            raise RuntimeError("open() first")
        return self._sessions

    async def open(self, dsn: str, *, pool_size: int) -> None:
        url = make_url(dsn).set(drivername="postgresql+asyncpg")
        self._engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": "sfdb_bench_orm"}},
        )
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
            self._sessions = None

    async def handler(self, event: HandlerEvent) -> None:
        async with self.sessions() as session:
            tenant_id = await session.scalar(q.resolve(event.slack_team_id))
            await session.commit()
            if tenant_id is None:
                raise RuntimeError("unknown team")
            if not await _charge(session, tenant_id, HANDLER_RESOURCE):
                raise RuntimeError("rate limited")
            await _tenant_context(session, tenant_id)
            user = (
                await session.scalars(q.user_by_slack_id(tenant_id, event.slack_user_id))
            ).first()
            if user is None:
                raise RuntimeError("unknown user")
            meeting = q.new_meeting(tenant_id, user.id, event.fathom_recording_id, event.title)
            session.add(meeting)
            await session.flush()
            session.add(q.meeting_created(tenant_id, user.id, meeting.id))
            await session.flush()
            await session.commit()

    async def _read(self, tenant_id: uuid.UUID, user_id: uuid.UUID | None) -> int:
        async with self.sessions() as session:
            await _tenant_context(session, tenant_id)
            return len((await session.scalars(q.recent(tenant_id, user_id))).all())

    async def recent_meetings(self, tenant: BenchTenant) -> int:
        return await self._read(tenant.id, None)

    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        return await self._read(tenant.id, user_id)

    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        async with self.sessions() as session:
            return await _charge(session, tenant.id, resource)

    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        async with self.sessions() as session:
            await _tenant_context(session, tenant.id)
            session.add(q.denied(tenant.id, user_id))
            await session.flush()
            await session.commit()

    async def find_installation(self, tenant: BenchTenant) -> Installation | None:
        async with self.sessions() as session:
            statement, params = q.find_installation(tenant.slack_team_id)
            row = (await session.execute(statement, params)).mappings().first()
        return (
            None if row is None else installation_from_row(row, self._cipher, tenant.slack_team_id)
        )
