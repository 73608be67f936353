"""The handler sketch of the design, end to end."""

from __future__ import annotations

from slack_fathom_db import Database, TenantId
from tests.helpers import unique_user_id


async def test_handler_sketch(db: Database, tenant_a: TenantId) -> None:
    decision = await db.rate_limit(tenant_a, "meetings_processed", limit=100, period="daily")
    assert decision.allowed
    slack_user = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.add_user(slack_user_id=slack_user)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.get_user_by_slack_id(slack_user)
        assert user is not None
        meeting = await uow.meetings.create(
            user_id=user.id, fathom_recording_id="rec-1", title="Discovery call"
        )
        await uow.audit.log_event(
            event_type="meeting.created",
            event_category="data",
            action_description="Meeting received from Fathom",
            resource_type="meeting_session",
            resource_id=meeting.id,
            user_id=user.id,
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.meetings.get_by_fathom_id("rec-1")
        assert stored is not None
        assert stored.id == meeting.id
        events = await uow.audit.recent()
        assert [e.event_type for e in events] == ["meeting.created"]
