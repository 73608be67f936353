"""TenantRepo: the workspace, its users, CRM connections, account mappings and stats.

Every test commits for real and reads back in a fresh unit of work; what the
layer cannot show (``last_used_at``, live-row counts, backdated rows) is read
or written through the superuser ``admin`` connection.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from slack_fathom_db import Database, TenantId, TenantStats
from slack_fathom_db.errors import NotFound, TenantNotFound, ValidationError
from slack_fathom_db.records import CrmConnection, MeetingSession, User
from tests.helpers import add_user, unique_team_id, unique_user_id

SECRET_REFERENCES = [
    "arn:aws:secretsmanager:us-east-1:123456789012:secret:crm/hubspot-AbCdEf",
    "projects/acme/secrets/hubspot/versions/3",
    "vault:crm/hubspot",
]
RAW_TOKENS = [
    "pat-na1-11111111-2222-3333-4444-555555555555",
    "xoxb-123-456-abc",
    "sk_live_abcdef",
]


async def _crm(
    db: Database, tenant: TenantId, *, provider: str = "hubspot", is_default: bool = False
) -> CrmConnection:
    async with db.unit_of_work(tenant) as uow:
        connection = await uow.tenants.connect_crm(
            provider_type=provider,
            credentials_secret_id=f"vault:crm/{provider}",
            is_default=is_default,
        )
        await uow.commit()
    return connection


async def _meeting(
    db: Database, tenant: TenantId, user: User, crm: CrmConnection | None = None
) -> MeetingSession:
    async with db.unit_of_work(tenant) as uow:
        meeting = await uow.meetings.create(
            user_id=user.id,
            fathom_recording_id=f"rec-{uuid.uuid4().hex[:12]}",
            title="Call",
            crm_connection_id=None if crm is None else crm.id,
        )
        await uow.commit()
    return meeting


async def _stats(db: Database, tenant: TenantId) -> TenantStats:
    async with db.unit_of_work(tenant) as uow:
        return await uow.tenants.stats()


# -- the workspace ----------------------------------------------------------------------


async def test_get_returns_the_installed_tenant(db: Database) -> None:
    team = unique_team_id()
    tenant = await db.directory.install(
        slack_team_id=team, slack_team_name="Acme Corp", plan_tier="pro"
    )
    async with db.unit_of_work(tenant) as uow:
        row = await uow.tenants.get()
    assert row is not None
    assert row.id == tenant
    assert row.slack_team_id == team
    assert row.slack_team_name == "Acme Corp"
    assert row.plan_tier == "pro"
    assert row.subscription_status == "active"
    assert row.settings == {}
    assert row.trial_ends_at is None
    assert row.deleted_at is None


async def test_update_each_field(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        renamed = await uow.tenants.update(slack_team_name="Renamed Inc")
        await uow.commit()
    assert renamed.slack_team_name == "Renamed Inc"
    assert renamed.plan_tier == "free"

    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.update(plan_tier="enterprise")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.update(subscription_status="past_due")
        await uow.commit()
    settings = {"digest": {"channel": "C123", "hour": 9}, "languages": ["en", "de"], "on": True}
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.update(settings=settings)
        await uow.commit()
    trial_end = datetime(2027, 1, 31, 23, 59, 59, 500000, tzinfo=timezone(timedelta(hours=-5)))
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.update(trial_ends_at=trial_end)
        await uow.commit()

    async with db.unit_of_work(tenant_a) as uow:
        row = await uow.tenants.get()
    assert row is not None
    assert row.slack_team_name == "Renamed Inc"
    assert row.plan_tier == "enterprise"
    assert row.subscription_status == "past_due"
    assert row.settings == settings
    assert row.trial_ends_at == trial_end
    assert row.trial_ends_at is not None
    assert row.trial_ends_at.utcoffset() is not None

    async with db.unit_of_work(tenant_a) as uow:
        both = await uow.tenants.update(
            plan_tier="starter", subscription_status="trialing", trial_ends_at=None
        )
        await uow.commit()
    assert both.plan_tier == "starter"
    assert both.subscription_status == "trialing"
    assert both.trial_ends_at is None
    assert both.slack_team_name == "Renamed Inc"
    assert both.settings == settings


async def test_update_validation(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError):
            await uow.tenants.update()
        with pytest.raises(ValidationError, match="plan_tier"):
            await uow.tenants.update(plan_tier="platinum")
        with pytest.raises(ValidationError, match="subscription_status"):
            await uow.tenants.update(subscription_status="suspended")
        with pytest.raises(ValidationError, match="trial_ends_at"):
            await uow.tenants.update(trial_ends_at=datetime(2027, 1, 1))  # naive on purpose
        with pytest.raises(ValidationError, match="slack_team_name"):
            await uow.tenants.update(slack_team_name="   ")
        with pytest.raises(ValidationError, match="settings"):
            await uow.tenants.update(settings={"bad": "nul\x00"})
        # a bad field next to a good one changes nothing
        with pytest.raises(ValidationError, match="plan_tier"):
            await uow.tenants.update(slack_team_name="Half", plan_tier="gold")
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        row = await uow.tenants.get()
    assert row is not None
    assert row.slack_team_name == "Tenant A"
    assert row.plan_tier == "free"
    assert row.subscription_status == "active"
    assert row.trial_ends_at is None
    assert row.settings == {}


async def test_soft_delete_and_reinstall(db: Database) -> None:
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name="Doomed")
    user = await add_user(db, tenant)
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.soft_delete()
        assert await uow.tenants.get() is None
        await uow.commit()

    assert await db.directory.resolve(team) is None
    with pytest.raises(TenantNotFound):
        async with db.unit_of_work(tenant):
            pass
    with pytest.raises(TenantNotFound):
        async with db.unit_of_work(slack_team_id=team):
            pass
    with pytest.raises(TenantNotFound):
        await db.rate_limit(tenant, "meetings_processed", limit=10)

    again = await db.directory.install(slack_team_id=team, slack_team_name="Back again")
    assert again == tenant
    assert await db.directory.resolve(team) == tenant
    async with db.unit_of_work(tenant) as uow:
        row = await uow.tenants.get()
        kept = await uow.tenants.get_user(user.id)
    assert row is not None
    assert row.deleted_at is None
    assert row.slack_team_name == "Back again"
    assert kept is not None


# -- users ------------------------------------------------------------------------------


async def test_add_user_and_reads(db: Database, tenant_a: TenantId) -> None:
    slack_id = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(
            slack_user_id=slack_id,
            slack_email="Ann.Example@Acme.COM",
            display_name="Ann Example",
            role="admin",
        )
        await uow.commit()
    assert user.slack_user_id == slack_id
    assert user.slack_email == "Ann.Example@acme.com"
    assert user.display_name == "Ann Example"
    assert user.role == "admin"
    assert user.tenant_id == tenant_a

    async with db.unit_of_work(tenant_a) as uow:
        by_id = await uow.tenants.get_user(user.id)
        by_slack = await uow.tenants.get_user_by_slack_id(slack_id)
        assert await uow.tenants.get_user(uuid.uuid4()) is None
        assert await uow.tenants.get_user_by_slack_id(unique_user_id()) is None
    assert by_id is not None
    assert by_slack is not None
    assert by_id.id == by_slack.id == user.id
    assert by_slack.slack_email == "Ann.Example@acme.com"


async def test_add_user_defaults(db: Database, tenant_a: TenantId) -> None:
    user = await add_user(db, tenant_a)
    assert user.role == "member"
    assert user.slack_email is None
    assert user.display_name is None


async def test_add_user_is_idempotent_and_refreshes(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    slack_id = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        first = await uow.tenants.add_user(
            slack_user_id=slack_id, slack_email="old@acme.com", display_name="Old Name"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        second = await uow.tenants.add_user(
            slack_user_id=slack_id, slack_email="new@acme.com", display_name="New Name"
        )
        await uow.commit()
    assert second.id == first.id
    assert second.slack_email == "new@acme.com"
    assert second.display_name == "New Name"

    async with db.unit_of_work(tenant_a) as uow:
        # nothing given: the stored values stay
        third = await uow.tenants.add_user(slack_user_id=slack_id)
        await uow.commit()
    assert third.id == first.id
    assert third.slack_email == "new@acme.com"
    assert third.display_name == "New Name"

    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.tenants.get_user_by_slack_id(slack_id)
        users = await uow.tenants.list_users()
    assert stored is not None
    assert stored.slack_email == "new@acme.com"
    assert stored.display_name == "New Name"
    assert [u.id for u in users] == [first.id]
    count = await admin.fetchval(
        "SELECT count(*) FROM users WHERE tenant_id = $1 AND slack_user_id = $2",
        tenant_a,
        slack_id,
    )
    assert count == 1


async def test_list_users_is_tenant_scoped(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    ann = await add_user(db, tenant_a, display_name="Ann")
    bob = await add_user(db, tenant_a, display_name="Bob")
    await add_user(db, tenant_b, display_name="Eve")
    async with db.unit_of_work(tenant_a) as uow:
        users = await uow.tenants.list_users()
    assert sorted(u.id for u in users) == sorted([ann.id, bob.id])
    assert {u.display_name for u in users} == {"Ann", "Bob"}


async def test_remove_user(db: Database, tenant_a: TenantId, admin: asyncpg.Connection) -> None:
    slack_id = unique_user_id()
    async with db.unit_of_work(tenant_a) as uow:
        gone = await uow.tenants.add_user(slack_user_id=slack_id, display_name="Gone")
        await uow.commit()
    stays = await add_user(db, tenant_a)
    meeting = await _meeting(db, tenant_a, gone)
    before = await _stats(db, tenant_a)
    assert before.users == 2

    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.remove_user(gone.id)
        await uow.commit()

    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.get_user(gone.id) is None
        assert await uow.tenants.get_user_by_slack_id(slack_id) is None
        users = await uow.tenants.list_users()
        kept_meeting = await uow.meetings.get(meeting.id)
        with pytest.raises(NotFound):
            await uow.tenants.remove_user(gone.id)
    assert [u.id for u in users] == [stays.id]
    assert kept_meeting is not None
    assert kept_meeting.user_id == gone.id
    assert (await _stats(db, tenant_a)).users == 1
    deleted_at = await admin.fetchval(
        "SELECT deleted_at FROM users WHERE tenant_id = $1 AND id = $2", tenant_a, gone.id
    )
    assert deleted_at is not None

    async with db.unit_of_work(tenant_a) as uow:
        readded = await uow.tenants.add_user(slack_user_id=slack_id, display_name="Back")
        await uow.commit()
    assert readded.id != gone.id
    assert readded.display_name == "Back"
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.tenants.get_user_by_slack_id(slack_id)
        still = await uow.meetings.get(meeting.id)
    assert found is not None
    assert found.id == readded.id
    assert still is not None
    assert still.user_id == gone.id
    assert (await _stats(db, tenant_a)).users == 2


async def test_remove_unknown_user_is_not_found(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    other = await add_user(db, tenant_b)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.tenants.remove_user(uuid.uuid4())
        with pytest.raises(NotFound):
            await uow.tenants.remove_user(other.id)
        await uow.commit()
    async with db.unit_of_work(tenant_b) as uow:
        assert await uow.tenants.get_user(other.id) is not None


@pytest.mark.parametrize(
    "slack_user_id", ["", "u123ABC", "X123ABC", "U-123", "U123 ", "T123ABC", 12345, None]
)
async def test_add_user_rejects_malformed_slack_id(
    db: Database, tenant_a: TenantId, slack_user_id: object
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="slack_user_id"):
            await uow.tenants.add_user(slack_user_id=slack_user_id)  # type: ignore[arg-type]
        with pytest.raises(ValidationError, match="slack_user_id"):
            await uow.tenants.get_user_by_slack_id(slack_user_id)  # type: ignore[arg-type]
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.list_users() == []


@pytest.mark.parametrize(
    "email", ["", "not-an-email", "a@b", "@example.com", "ann@", "ann smith@example.com", "a@b@"]
)
async def test_add_user_rejects_malformed_email(
    db: Database, tenant_a: TenantId, email: str
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="slack_email"):
            await uow.tenants.add_user(slack_user_id=unique_user_id(), slack_email=email)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.list_users() == []


async def test_add_user_rejects_bad_role(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="role"):
            await uow.tenants.add_user(slack_user_id=unique_user_id(), role="superuser")


# -- CRM connections --------------------------------------------------------------------


@pytest.mark.parametrize("reference", SECRET_REFERENCES)
async def test_connect_crm_accepts_secret_references(
    db: Database, tenant_a: TenantId, reference: str
) -> None:
    user = await add_user(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        connection = await uow.tenants.connect_crm(
            provider_type="salesforce",
            credentials_secret_id=reference,
            connected_by_user_id=user.id,
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        stored = await uow.tenants.get_crm_connection(connection.id)
    assert stored is not None
    assert stored.provider_type == "salesforce"
    assert stored.credentials_secret_id == reference
    assert stored.connected_by_user_id == user.id
    assert stored.is_default is False
    assert stored.status == "active"


@pytest.mark.parametrize("token", [*RAW_TOKENS, ""])
async def test_connect_crm_rejects_raw_tokens_without_echoing_them(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection, token: str
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="credentials_secret_id") as caught:
            await uow.tenants.connect_crm(provider_type="hubspot", credentials_secret_id=token)
        await uow.commit()
    if token:
        assert token not in str(caught.value)
        assert token not in repr(caught.value)
        assert all(token not in str(arg) for arg in caught.value.args)
        assert caught.value.__cause__ is None or token not in str(caught.value.__cause__)
    count = await admin.fetchval(
        "SELECT count(*) FROM crm_connections WHERE tenant_id = $1", tenant_a
    )
    assert count == 0


@pytest.mark.parametrize("provider", ["pipedrive", "HubSpot", "", None])
async def test_connect_crm_rejects_unknown_provider(
    db: Database, tenant_a: TenantId, provider: object
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="provider_type"):
            await uow.tenants.connect_crm(
                provider_type=provider,  # type: ignore[arg-type]
                credentials_secret_id="vault:crm/x",
            )


async def test_connect_crm_providers(db: Database, tenant_a: TenantId) -> None:
    for provider in ("hubspot", "salesforce", "crono"):
        connection = await _crm(db, tenant_a, provider=provider)
        assert connection.provider_type == provider
    async with db.unit_of_work(tenant_a) as uow:
        connections = await uow.tenants.list_crm_connections()
    assert sorted(c.provider_type for c in connections) == ["crono", "hubspot", "salesforce"]


async def test_connect_crm_by_unknown_user_is_not_found(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.tenants.connect_crm(
                provider_type="hubspot",
                credentials_secret_id="vault:crm/hubspot",
                connected_by_user_id=uuid.uuid4(),
            )


async def test_default_crm_connection(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.default_crm_connection() is None
    plain = await _crm(db, tenant_a, provider="crono")
    first = await _crm(db, tenant_a, provider="hubspot", is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        default = await uow.tenants.default_crm_connection()
    assert default is not None
    assert default.id == first.id

    second = await _crm(db, tenant_a, provider="salesforce", is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        default = await uow.tenants.default_crm_connection()
        previous = await uow.tenants.get_crm_connection(first.id)
        listed = await uow.tenants.list_crm_connections()
    assert default is not None
    assert default.id == second.id
    assert previous is not None
    assert previous.is_default is False
    assert listed[0].id == second.id
    assert {c.id for c in listed} == {plain.id, first.id, second.id}
    assert [c.is_default for c in listed] == [True, False, False]

    async with db.unit_of_work(tenant_a) as uow:
        chosen = await uow.tenants.set_default_crm_connection(plain.id)
        await uow.commit()
    assert chosen.id == plain.id
    assert chosen.is_default is True
    async with db.unit_of_work(tenant_a) as uow:
        default = await uow.tenants.default_crm_connection()
        listed = await uow.tenants.list_crm_connections()
    assert default is not None
    assert default.id == plain.id
    assert listed[0].id == plain.id
    assert [c.is_default for c in listed] == [True, False, False]
    defaults = await admin.fetchval(
        "SELECT count(*) FROM crm_connections "
        "WHERE tenant_id = $1 AND is_default AND deleted_at IS NULL",
        tenant_a,
    )
    assert defaults == 1

    # setting the current default again keeps it the one default
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.set_default_crm_connection(plain.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        default = await uow.tenants.default_crm_connection()
    assert default is not None
    assert default.id == plain.id


async def test_set_default_of_unknown_connection_is_not_found(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    mine = await _crm(db, tenant_a, is_default=True)
    theirs = await _crm(db, tenant_b)
    gone = await _crm(db, tenant_a, provider="salesforce")
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.disconnect_crm(gone.id)
        await uow.commit()
    for unknown in (uuid.uuid4(), theirs.id, gone.id):
        async with db.unit_of_work(tenant_a) as uow:
            with pytest.raises(NotFound):
                await uow.tenants.set_default_crm_connection(unknown)
            # a failed call changes nothing, even if the caller goes on and commits
            still = await uow.tenants.default_crm_connection()
            await uow.commit()
        assert still is not None
        assert still.id == mine.id
    async with db.unit_of_work(tenant_a) as uow:
        default = await uow.tenants.default_crm_connection()
    assert default is not None
    assert default.id == mine.id


async def test_disconnect_crm(db: Database, tenant_a: TenantId, admin: asyncpg.Connection) -> None:
    user = await add_user(db, tenant_a)
    default = await _crm(db, tenant_a, is_default=True)
    other = await _crm(db, tenant_a, provider="salesforce")
    meeting = await _meeting(db, tenant_a, user, default)

    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.disconnect_crm(default.id)
        await uow.commit()

    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.get_crm_connection(default.id) is None
        assert await uow.tenants.default_crm_connection() is None
        listed = await uow.tenants.list_crm_connections()
        kept = await uow.meetings.get(meeting.id)
        with pytest.raises(NotFound):
            await uow.tenants.disconnect_crm(default.id)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(NotFound):
            await uow.tenants.set_default_crm_connection(default.id)
    assert [c.id for c in listed] == [other.id]
    assert kept is not None
    assert kept.crm_connection_id == default.id
    row = await admin.fetchrow(
        "SELECT is_default, deleted_at FROM crm_connections WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        default.id,
    )
    assert row is not None
    assert row["is_default"] is False
    assert row["deleted_at"] is not None

    # a new default may be chosen afterwards
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.set_default_crm_connection(other.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        now_default = await uow.tenants.default_crm_connection()
    assert now_default is not None
    assert now_default.id == other.id


# -- account mappings -------------------------------------------------------------------


async def test_map_account_upserts(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        first = await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain="acme.com",
            crm_account_id="acc-1",
            crm_account_name="Acme",
        )
        await uow.commit()
    assert first.email_domain == "acme.com"
    assert first.crm_account_id == "acc-1"
    assert first.crm_account_name == "Acme"
    assert first.verified is False
    assert first.last_used_at is None
    assert first.crm_connection_id == crm.id

    async with db.unit_of_work(tenant_a) as uow:
        second = await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain="ACME.com",
            crm_account_id="acc-2",
            crm_account_name="Acme Corporation",
            verified=True,
        )
        await uow.commit()
    assert second.id == first.id
    assert second.crm_account_id == "acc-2"
    assert second.crm_account_name == "Acme Corporation"
    assert second.verified is True

    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.tenants.find_account("acme.com")
    assert found is not None
    assert found.id == first.id
    assert found.crm_account_id == "acc-2"
    assert found.crm_account_name == "Acme Corporation"
    assert found.verified is True
    rows = await admin.fetchval(
        "SELECT count(*) FROM account_mappings "
        "WHERE tenant_id = $1 AND email_domain = 'acme.com' AND deleted_at IS NULL",
        tenant_a,
    )
    assert rows == 1


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (" @Acme.COM ", "acme.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("acme.com.", "acme.com"),
        ("EU.Mail.Acme.com", "eu.mail.acme.com"),
    ],
)
async def test_map_account_normalises_the_domain(
    db: Database, tenant_a: TenantId, given: str, stored: str
) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        mapping = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain=given, crm_account_id="acc"
        )
        await uow.commit()
    assert mapping.email_domain == stored
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.tenants.find_account(stored)
        found_raw = await uow.tenants.find_account(given)
    assert found is not None
    assert found.id == mapping.id
    assert found_raw is not None
    assert found_raw.id == mapping.id


@pytest.mark.parametrize("domain", ["", "   ", "localhost", "acme com", "@", "a..b", "-x-.com"])
async def test_map_account_rejects_bad_domains(
    db: Database, tenant_a: TenantId, domain: str
) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError, match="email_domain"):
            await uow.tenants.map_account(
                crm_connection_id=crm.id, email_domain=domain, crm_account_id="acc"
            )
    assert (await _stats(db, tenant_a)).account_mappings == 0


async def test_map_account_to_unknown_connection_is_not_found(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    theirs = await _crm(db, tenant_b, is_default=True)
    gone = await _crm(db, tenant_a)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.disconnect_crm(gone.id)
        await uow.commit()
    for unknown in (uuid.uuid4(), theirs.id, gone.id):
        async with db.unit_of_work(tenant_a) as uow:
            with pytest.raises(NotFound):
                await uow.tenants.map_account(
                    crm_connection_id=unknown, email_domain="acme.com", crm_account_id="acc"
                )
    count = await admin.fetchval(
        "SELECT count(*) FROM account_mappings WHERE tenant_id = ANY($1::uuid[])",
        [tenant_a, tenant_b],
    )
    assert count == 0


async def test_find_account_by_email_domain_and_subdomain(db: Database, tenant_a: TenantId) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        acme = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="acme.com", crm_account_id="acme"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        by_email = await uow.tenants.find_account("bob@Acme.com")
        by_domain = await uow.tenants.find_account("acme.com")
        by_sub = await uow.tenants.find_account("x@eu.mail.acme.com")
        by_sub_domain = await uow.tenants.find_account("eu.acme.com")
        assert await uow.tenants.find_account("bob@notacme.com") is None
        assert await uow.tenants.find_account("bob@acme.co") is None
        assert await uow.tenants.find_account("bob@acme.com.evil.io") is None
        assert await uow.tenants.find_account("bob@example.org") is None
    for found in (by_email, by_domain, by_sub, by_sub_domain):
        assert found is not None
        assert found.id == acme.id

    async with db.unit_of_work(tenant_a) as uow:
        specific = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="mail.acme.com", crm_account_id="acme-mail"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        deep = await uow.tenants.find_account("x@eu.mail.acme.com")
        exact = await uow.tenants.find_account("y@mail.acme.com")
        parent = await uow.tenants.find_account("z@acme.com")
        sibling = await uow.tenants.find_account("z@sales.acme.com")
    assert deep is not None
    assert deep.id == specific.id
    assert exact is not None
    assert exact.id == specific.id
    assert parent is not None
    assert parent.id == acme.id
    assert sibling is not None
    assert sibling.id == acme.id


async def test_find_account_with_idna_email(db: Database, tenant_a: TenantId) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        mapping = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="bücher.example", crm_account_id="b"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.tenants.find_account("anna@Bücher.example")
        puny = await uow.tenants.find_account("anna@xn--bcher-kva.example")
    assert found is not None
    assert found.id == mapping.id
    assert puny is not None
    assert puny.id == mapping.id


async def test_find_account_connection_choice(db: Database, tenant_a: TenantId) -> None:
    other = await _crm(db, tenant_a, provider="salesforce")
    async with db.unit_of_work(tenant_a) as uow:
        in_other = await uow.tenants.map_account(
            crm_connection_id=other.id, email_domain="acme.com", crm_account_id="sf-acme"
        )
        await uow.commit()
    # no default connection: nothing is found unless a connection is named
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.find_account("bob@acme.com") is None
        named = await uow.tenants.find_account("bob@acme.com", crm_connection_id=other.id)
    assert named is not None
    assert named.id == in_other.id

    default = await _crm(db, tenant_a, provider="hubspot", is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        # the default connection has no mapping for the domain yet
        assert await uow.tenants.find_account("bob@acme.com") is None
        in_default = await uow.tenants.map_account(
            crm_connection_id=default.id, email_domain="acme.com", crm_account_id="hs-acme"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        implicit = await uow.tenants.find_account("bob@acme.com")
        explicit_default = await uow.tenants.find_account(
            "bob@acme.com", crm_connection_id=default.id
        )
        explicit_other = await uow.tenants.find_account("bob@acme.com", crm_connection_id=other.id)
        unknown = await uow.tenants.find_account("bob@acme.com", crm_connection_id=uuid.uuid4())
    assert implicit is not None
    assert implicit.id == in_default.id
    assert implicit.crm_account_id == "hs-acme"
    assert explicit_default is not None
    assert explicit_default.id == in_default.id
    assert explicit_other is not None
    assert explicit_other.id == in_other.id
    assert explicit_other.crm_account_id == "sf-acme"
    assert unknown is None


async def test_find_account_verified_only(db: Database, tenant_a: TenantId) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="acme.com", crm_account_id="unverified"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.find_account("bob@acme.com", verified_only=True) is None
        loose = await uow.tenants.find_account("bob@acme.com")
    assert loose is not None
    assert loose.crm_account_id == "unverified"

    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain="eu.acme.com",
            crm_account_id="eu-unverified",
        )
        verified_parent = await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain="acme.com",
            crm_account_id="verified",
            verified=True,
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        strict = await uow.tenants.find_account("bob@eu.acme.com", verified_only=True)
        loose_sub = await uow.tenants.find_account("bob@eu.acme.com")
    # the more specific mapping is not verified, so the verified parent answers
    assert strict is not None
    assert strict.id == verified_parent.id
    assert loose_sub is not None
    assert loose_sub.crm_account_id == "eu-unverified"


async def test_find_account_touches_last_used_at(
    db: Database, tenant_a: TenantId, admin: asyncpg.Connection
) -> None:
    crm = await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        used = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="acme.com", crm_account_id="a"
        )
        unused = await uow.tenants.map_account(
            crm_connection_id=crm.id, email_domain="globex.com", crm_account_id="g"
        )
        await uow.commit()
    query = "SELECT last_used_at FROM account_mappings WHERE tenant_id = $1 AND id = $2"
    assert await admin.fetchval(query, tenant_a, used.id) is None

    before = datetime.now(UTC)
    async with db.unit_of_work(tenant_a) as uow:
        found = await uow.tenants.find_account("bob@acme.com")
        await uow.commit()
    assert found is not None
    assert found.last_used_at is not None
    touched = await admin.fetchval(query, tenant_a, used.id)
    assert touched is not None
    assert touched >= before - timedelta(seconds=5)
    assert await admin.fetchval(query, tenant_a, unused.id) is None

    # a lookup that is rolled back leaves it as it was
    await admin.execute(
        "UPDATE account_mappings SET last_used_at = NULL WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        used.id,
    )
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.find_account("acme.com") is not None
    assert await admin.fetchval(query, tenant_a, used.id) is None


async def test_mapping_of_disconnected_connection_is_not_found(
    db: Database, tenant_a: TenantId
) -> None:
    default = await _crm(db, tenant_a, is_default=True)
    other = await _crm(db, tenant_a, provider="salesforce")
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.map_account(
            crm_connection_id=default.id, email_domain="acme.com", crm_account_id="hs"
        )
        await uow.tenants.map_account(
            crm_connection_id=other.id, email_domain="globex.com", crm_account_id="sf"
        )
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        await uow.tenants.disconnect_crm(default.id)
        await uow.tenants.disconnect_crm(other.id)
        await uow.commit()
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.find_account("bob@acme.com") is None
        assert await uow.tenants.find_account("bob@acme.com", crm_connection_id=default.id) is None
        assert await uow.tenants.find_account("bob@globex.com", crm_connection_id=other.id) is None


async def test_find_account_is_tenant_scoped(
    db: Database, tenant_a: TenantId, tenant_b: TenantId
) -> None:
    theirs = await _crm(db, tenant_b, is_default=True)
    async with db.unit_of_work(tenant_b) as uow:
        await uow.tenants.map_account(
            crm_connection_id=theirs.id, email_domain="acme.com", crm_account_id="b"
        )
        await uow.commit()
    await _crm(db, tenant_a, is_default=True)
    async with db.unit_of_work(tenant_a) as uow:
        assert await uow.tenants.find_account("bob@acme.com") is None
        assert await uow.tenants.find_account("bob@acme.com", crm_connection_id=theirs.id) is None


async def test_find_account_rejects_garbage(db: Database, tenant_a: TenantId) -> None:
    async with db.unit_of_work(tenant_a) as uow:
        with pytest.raises(ValidationError):
            await uow.tenants.find_account("")
        with pytest.raises(ValidationError):
            await uow.tenants.find_account("bob@")
        with pytest.raises(ValidationError):
            await uow.tenants.find_account("acme.com", verified_only="yes")  # type: ignore[arg-type]


# -- stats ------------------------------------------------------------------------------


async def test_stats_of_a_new_tenant(db: Database, tenant_a: TenantId) -> None:
    assert await _stats(db, tenant_a) == TenantStats(
        users=0, crm_connections=0, meetings_total=0, meetings_last_30_days=0, account_mappings=0
    )


async def test_stats_counts_live_rows(
    db: Database, tenant_a: TenantId, tenant_b: TenantId, admin: asyncpg.Connection
) -> None:
    ann = await add_user(db, tenant_a)
    await add_user(db, tenant_a)
    gone_user = await add_user(db, tenant_a)
    crm = await _crm(db, tenant_a, is_default=True)
    gone_crm = await _crm(db, tenant_a, provider="salesforce")
    fresh = await _meeting(db, tenant_a, ann, crm)
    old = await _meeting(db, tenant_a, ann)
    deleted_meeting = await _meeting(db, tenant_a, ann)
    async with db.unit_of_work(tenant_a) as uow:
        for domain in ("acme.com", "globex.com", "initech.com"):
            await uow.tenants.map_account(
                crm_connection_id=crm.id, email_domain=domain, crm_account_id=domain
            )
        await uow.tenants.remove_user(gone_user.id)
        await uow.tenants.disconnect_crm(gone_crm.id)
        await uow.meetings.soft_delete(deleted_meeting.id)
        await uow.commit()
    await admin.execute(
        "UPDATE meeting_sessions SET created_at = now() - interval '40 days' "
        "WHERE tenant_id = $1 AND id = $2",
        tenant_a,
        old.id,
    )
    await admin.execute(
        "UPDATE account_mappings SET deleted_at = now() "
        "WHERE tenant_id = $1 AND email_domain = 'initech.com'",
        tenant_a,
    )
    # another tenant's rows never count
    other = await add_user(db, tenant_b)
    await _meeting(db, tenant_b, other)
    await _crm(db, tenant_b)

    stats = await _stats(db, tenant_a)
    assert stats == TenantStats(
        users=2, crm_connections=1, meetings_total=2, meetings_last_30_days=1, account_mappings=2
    )
    assert fresh.id != old.id
    assert await _stats(db, tenant_b) == TenantStats(
        users=1, crm_connections=1, meetings_total=1, meetings_last_30_days=1, account_mappings=0
    )
