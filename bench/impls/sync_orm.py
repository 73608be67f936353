"""The synchronous design this project replaces: SQLAlchemy ORM on psycopg2, called from asyncio.

A ``Session`` per handler, ORM objects added and flushed, a rate limit done
as read-modify-write under ``SELECT … FOR UPDATE``. Each call runs in the
event loop's default thread pool (``asyncio.to_thread``), the way an async
Bolt app has to call synchronous code. psycopg2 opens every transaction
with its own ``BEGIN`` round trip; the tenant context is then one
``session.execute(text(...))`` holding the layer's ``SET LOCAL`` statements
(a claim signed by hand with the bench's tenant key among them) and ``SELECT
sfdb_require_claim()`` (psycopg2 sends it as one simple query).
Bolt's installation lookup is the layer store's statement through
``session.execute(text(...))``, decrypted and built as the store does.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bench.impls import orm_common as q
from bench.impls.base import (
    APP_ROLE,
    HANDLER_RESOURCE,
    NEVER_DENY,
    Implementation,
    installation_from_row,
    tenant_preamble,
)
from slack_fathom_db.models import ApiRateLimit

if TYPE_CHECKING:
    import uuid

    from slack_sdk.oauth.installation_store.models.installation import Installation
    from sqlalchemy.engine import Engine

    from bench.impls.base import BenchTenant, HandlerEvent

DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)
"""What ``asyncio.to_thread`` gets: the default ``ThreadPoolExecutor`` size."""


def _tenant_context(session: Session, tenant_id: uuid.UUID) -> None:
    session.execute(text(tenant_preamble(tenant_id, begin=False)))


def _charge(session: Session, tenant_id: uuid.UUID, resource: str) -> bool:
    for _attempt in range(3):
        _tenant_context(session, tenant_id)
        key = q.rate_key(tenant_id, resource)
        counter = session.get(ApiRateLimit, key, with_for_update=True)
        try:
            if counter is None:
                session.add(q.new_counter(key))
                allowed = True
            else:
                allowed = q.spend(counter, NEVER_DENY)
            session.commit()
        except IntegrityError:  # two first charges of a window raced: count again
            session.rollback()
            continue
        return allowed
    raise RuntimeError("rate limit: could not charge")


class SyncOrmImpl(Implementation):
    """Sync ORM + psycopg2, a session per handler, through the default thread pool."""

    key = "sync"
    title = "sync ORM + psycopg2"
    isolation = (
        "psycopg2's implicit `BEGIN` (a round trip), then one `session.execute(text(...))` of "
        f"`SET LOCAL ROLE {APP_ROLE}; SET LOCAL search_path; SET LOCAL app.tenant_claim = "
        "'<claim signed by hand, pid 0>'; SET LOCAL row_security, timeouts; SELECT "
        "sfdb_require_claim()`"
    )

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._cipher = q.cipher()

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory."""
        if self._sessions is None:
            raise RuntimeError("open() first")
        return self._sessions

    async def open(self, dsn: str, *, pool_size: int) -> None:
        url = make_url(dsn).set(drivername="postgresql+psycopg2")
        self._engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            connect_args={"application_name": "sfdb_bench_sync"},
        )
        self._sessions = sessionmaker(self._engine)

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
            self._engine = None
            self._sessions = None

    def _handler(self, event: HandlerEvent) -> None:
        with self.sessions() as session:
            tenant_id = session.scalar(q.resolve(event.slack_team_id))
            session.commit()
            if tenant_id is None:
                raise RuntimeError("unknown team")
            if not _charge(session, tenant_id, HANDLER_RESOURCE):
                raise RuntimeError("rate limited")
            _tenant_context(session, tenant_id)
            user = session.scalars(q.user_by_slack_id(tenant_id, event.slack_user_id)).first()
            if user is None:
                raise RuntimeError("unknown user")
            meeting = q.new_meeting(tenant_id, user.id, event.fathom_recording_id, event.title)
            session.add(meeting)
            session.flush()
            session.add(q.meeting_created(tenant_id, user.id, meeting.id))
            session.commit()

    def _read(self, tenant_id: uuid.UUID, user_id: uuid.UUID | None) -> int:
        with self.sessions() as session:
            _tenant_context(session, tenant_id)
            return len(session.scalars(q.recent(tenant_id, user_id)).all())

    def _rate_limit(self, tenant_id: uuid.UUID, resource: str) -> bool:
        with self.sessions() as session:
            return _charge(session, tenant_id, resource)

    def _audit_event(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
        with self.sessions() as session:
            _tenant_context(session, tenant_id)
            session.add(q.denied(tenant_id, user_id))
            session.commit()

    def _find_installation(self, slack_team_id: str) -> Installation | None:
        with self.sessions() as session:
            statement, params = q.find_installation(slack_team_id)
            row = session.execute(statement, params).mappings().first()
        return None if row is None else installation_from_row(row, self._cipher, slack_team_id)

    async def handler(self, event: HandlerEvent) -> None:
        await asyncio.to_thread(self._handler, event)

    async def recent_meetings(self, tenant: BenchTenant) -> int:
        return await asyncio.to_thread(self._read, tenant.id, None)

    async def user_meetings(self, tenant: BenchTenant, user_id: uuid.UUID) -> int:
        return await asyncio.to_thread(self._read, tenant.id, user_id)

    async def rate_limit(self, tenant: BenchTenant, resource: str) -> bool:
        return await asyncio.to_thread(self._rate_limit, tenant.id, resource)

    async def audit_event(self, tenant: BenchTenant, user_id: uuid.UUID) -> None:
        await asyncio.to_thread(self._audit_event, tenant.id, user_id)

    async def find_installation(self, tenant: BenchTenant) -> Installation | None:
        return await asyncio.to_thread(self._find_installation, tenant.slack_team_id)
