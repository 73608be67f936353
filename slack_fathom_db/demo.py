"""The demo: one workspace run through the whole layer (``sfdb demo``, ``make demo``).

:func:`run` installs a demo workspace, adds its users, a CRM connection and
account mappings, ingests ``meetings`` meetings through processing (one in
seven fails once and is retried) and CRM sync (some fail), then spends a rate
limit until it is refused and records the refusal. It returns what happened;
the command prints it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

    from slack_fathom_db.database import Database
    from slack_fathom_db.records import AuditLog, User
    from slack_fathom_db.repositories import RateLimitDecision, TenantStats
    from slack_fathom_db.tenancy import TenantId

__all__ = ["DEMO_TEAM_ID", "DemoReport", "run"]

DEMO_TEAM_ID: Final = "TDEMO00001"
DEMO_ACCOUNTS: Final = {
    "acme.example": ("hs-1001", "Acme Corp"),
    "globex.example": ("hs-1002", "Globex"),
    "initech.example": ("hs-1003", "Initech"),
}


@dataclass(frozen=True, slots=True)
class DemoReport:
    """What the demo did."""

    meetings: int
    outcome: dict[str, int]
    """``completed``, ``retried``, ``synced`` and ``sync_failed`` meetings."""
    stats: TenantStats
    events: list[AuditLog]
    """The latest audit events of the workspace."""
    decisions: list[RateLimitDecision]
    """The rate-limit calls, the last one refused."""


async def run(db: Database, meetings: int, *, advance: Callable[[], None]) -> DemoReport:
    """Run the demo workspace through the layer; ``advance()`` after each meeting."""
    tenant_id = await db.directory.install(
        slack_team_id=DEMO_TEAM_ID, slack_team_name="Demo Sales Team", plan_tier="pro"
    )
    users = await _workspace(db, tenant_id)
    outcome = await _meetings(db, tenant_id, users, meetings, advance)
    decisions = await _rate_limits(db, tenant_id)
    async with db.unit_of_work(tenant_id) as uow:
        stats = await uow.tenants.stats()
        events = await uow.audit.recent(days=1, limit=8)
    return DemoReport(meetings, outcome, stats, events, decisions)


async def _workspace(db: Database, tenant_id: TenantId) -> list[User]:
    async with db.unit_of_work(tenant_id) as uow:
        users = [
            await uow.tenants.add_user(
                slack_user_id=f"UDEMO{n:04d}",
                slack_email=f"rep{n}@demo-sales.example",
                display_name=f"Sales Rep {n}",
                role="owner" if n == 0 else "member",
            )
            for n in range(3)
        ]
        crm = await uow.tenants.default_crm_connection()
        if crm is None:
            crm = await uow.tenants.connect_crm(
                provider_type="hubspot",
                credentials_secret_id="vault:demo/crm/hubspot",  # noqa: S106 - a reference
                connected_by_user_id=users[0].id,
                is_default=True,
            )
            await uow.audit.log_event(
                event_type="crm.connected",
                event_category="integration",
                action_description="HubSpot connected",
                user_id=users[0].id,
                resource_type="crm_connection",
                resource_id=crm.id,
            )
        for domain, (account_id, name) in DEMO_ACCOUNTS.items():
            await uow.tenants.map_account(
                crm_connection_id=crm.id,
                email_domain=domain,
                crm_account_id=account_id,
                crm_account_name=name,
                verified=True,
            )
        await uow.commit()
    return users


async def _meetings(
    db: Database,
    tenant_id: TenantId,
    users: list[User],
    count: int,
    advance: Callable[[], None],
) -> dict[str, int]:
    outcome = {"completed": 0, "retried": 0, "synced": 0, "sync_failed": 0}
    run = f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"  # runs in one second differ
    domains = list(DEMO_ACCOUNTS)
    for n in range(count):
        user = users[n % len(users)]
        domain = domains[n % len(domains)]
        async with db.unit_of_work(tenant_id) as uow:
            meeting = await uow.meetings.create(
                user_id=user.id,
                fathom_recording_id=f"demo-{run}-{n:05d}",
                title=f"Discovery call #{n + 1} with {DEMO_ACCOUNTS[domain][1]}",
                participants=[{"email": f"buyer{n}@{domain}"}, {"email": user.slack_email}],
            )
            meeting = await uow.meetings.start_processing(meeting.id)
            if n % 7 == 3:  # the summariser fails once; the retry succeeds
                meeting = await uow.meetings.fail_processing(
                    meeting.id, error="summariser timed out"
                )
                meeting = await uow.meetings.start_processing(meeting.id)
                outcome["retried"] += 1
            meeting = await uow.meetings.complete_processing(
                meeting.id,
                summary="Budget confirmed; follow-up demo next week.",
                action_items=[{"owner": user.display_name, "text": "Send the proposal"}],
                expected_version=meeting.version,
            )
            outcome["completed"] += 1
            account = await uow.tenants.find_account(f"buyer{n}@{domain}")
            if account is not None and n % 11 != 5:
                meeting = await uow.meetings.record_crm_sync(
                    meeting.id, status="synced", crm_record_id=f"note-{run}-{n}"
                )
                outcome["synced"] += 1
            else:
                meeting = await uow.meetings.record_crm_sync(
                    meeting.id, status="failed", error="CRM answered 429"
                )
                outcome["sync_failed"] += 1
            synced = meeting.crm_sync_status == "synced"
            await uow.audit.log_event(
                event_type="meeting.processed",
                event_category="data",
                action_description=f"Meeting {n + 1} summarised"
                + (", note sent to the CRM" if synced else "; CRM sync failed"),
                user_id=user.id,
                resource_type="meeting_session",
                resource_id=meeting.id,
                status="success" if synced else "failure",
            )
            await uow.commit()
        advance()
    return outcome


async def _rate_limits(db: Database, tenant_id: TenantId) -> list[RateLimitDecision]:
    decisions: list[RateLimitDecision] = []
    while not decisions or decisions[-1].allowed:
        decisions.append(await db.rate_limit(tenant_id, "demo_exports", limit=5, period="minute"))
    await db.log_security_event(
        tenant_id,
        event_type="rate_limit.denied",
        event_category="security",
        action_description="demo_exports limit reached",
        status="denied",
    )
    return decisions
