"""TenantRepo: the workspace itself, its users, CRM connections and account mappings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import DateTime, Integer, Text, Uuid, bindparam, func, select

from slack_fathom_db import records, validation
from slack_fathom_db.errors import NotFound, ValidationError
from slack_fathom_db.models import AccountMapping, CrmConnection, MeetingSession, Tenant, User
from slack_fathom_db.models.base import utcnow
from slack_fathom_db.models.tenants import (
    CRM_PROVIDERS,
    PLAN_TIERS,
    SUBSCRIPTION_STATUSES,
    USER_ROLES,
)
from slack_fathom_db.repositories.base import TenantRepository, row_columns

if TYPE_CHECKING:
    import uuid

__all__ = ["TenantRepo", "TenantStats"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass(frozen=True, slots=True)
class TenantStats:
    """Live counts for one tenant."""

    users: int
    crm_connections: int
    meetings_total: int
    meetings_last_30_days: int
    account_mappings: int


class TenantRepo(TenantRepository[User]):
    """``uow.tenants``: everything that belongs to the workspace rather than to a meeting."""

    model = User
    span_prefix = "tenants"

    # -- the workspace ---------------------------------------------------------------

    async def get(self) -> records.Tenant | None:
        """The tenant row, or ``None`` once soft-deleted."""
        return await self._fetch_record(
            records.Tenant, "tenant", self._tenant_row, action="get tenant"
        )

    async def update(
        self,
        *,
        slack_team_name: str | _Unset = UNSET,
        plan_tier: str | _Unset = UNSET,
        subscription_status: str | _Unset = UNSET,
        settings: dict[str, Any] | _Unset = UNSET,
        trial_ends_at: datetime | _Unset | None = UNSET,
    ) -> records.Tenant:
        """Change the named fields of the workspace; the others stay as they are."""
        values: dict[str, Any] = {}
        if not isinstance(slack_team_name, _Unset):
            values["slack_team_name"] = validation.text(
                slack_team_name, field="slack_team_name", max_length=validation.MAX_NAME
            )
        if not isinstance(plan_tier, _Unset):
            values["plan_tier"] = validation.choice(
                plan_tier, field="plan_tier", allowed=PLAN_TIERS
            )
        if not isinstance(subscription_status, _Unset):
            values["subscription_status"] = validation.choice(
                subscription_status, field="subscription_status", allowed=SUBSCRIPTION_STATUSES
            )
        if not isinstance(settings, _Unset):
            values["settings"] = validation.json_object(
                settings, field="settings", max_bytes=self._max_json_bytes
            )
        if not isinstance(trial_ends_at, _Unset):
            values["trial_ends_at"] = validation.aware_datetime(
                trial_ends_at, field="trial_ends_at"
            )
        if not values:
            raise ValidationError("update: name at least one field to change")
        statement = self._update_tenant_row().values(**values).returning(*row_columns(Tenant))
        tenant: records.Tenant | None = await self._one_or_none(statement, action="update tenant")
        if tenant is None:
            raise NotFound("update tenant: the tenant is soft-deleted")
        return tenant

    async def soft_delete(self) -> None:
        """Mark the workspace deleted: it no longer resolves and no new unit of work opens."""
        statement = self._update_tenant_row().values(deleted_at=utcnow()).returning(Tenant.id)
        if await self._scalar(statement, action="soft-delete tenant") is None:
            raise NotFound("soft-delete tenant: the tenant is already soft-deleted")

    # -- users -----------------------------------------------------------------------

    async def add_user(
        self,
        *,
        slack_user_id: str,
        slack_email: str | None = None,
        display_name: str | None = None,
        role: str = "member",
    ) -> records.User:
        """Add a Slack user, or return the live one with that id (email and name refreshed).

        Idempotent on ``slack_user_id``; ``role`` applies when the user is created.
        """
        values = {
            "slack_user_id": validation.slack_user_id(slack_user_id),
            "slack_email": validation.optional_email(slack_email),
            "display_name": validation.optional_text(
                display_name, field="display_name", max_length=validation.MAX_NAME
            ),
            "role": validation.choice(role, field="role", allowed=USER_ROLES),
        }
        upsert = self._insert(User, **values)
        statement = upsert.on_conflict_do_update(
            index_elements=[User.tenant_id, User.slack_user_id],
            index_where=User.deleted_at.is_(None),
            set_={
                "slack_email": func.coalesce(upsert.excluded.slack_email, User.slack_email),
                "display_name": func.coalesce(upsert.excluded.display_name, User.display_name),
                "updated_at": utcnow(),
            },
        ).returning(*row_columns(User))
        user: records.User = await self._one_or_none(statement, action="add user")
        return user

    async def get_user(self, user_id: uuid.UUID) -> records.User | None:
        """A live user by id."""
        uid = validation.uuid_value(user_id, field="user_id")
        return await self._fetch_record(
            records.User, "user", self._user_by_id, action="get user", user_id=uid
        )

    def _user_by_id(self) -> Any:
        return self._live().where(User.id == bindparam("user_id", type_=Uuid))

    async def get_user_by_slack_id(self, slack_user_id: str) -> records.User | None:
        """A live user by Slack user id."""
        sid = validation.slack_user_id(slack_user_id)
        return await self._fetch_record(
            records.User,
            "user_by_slack_id",
            self._user_by_slack_id,
            action="get user",
            slack_user_id=sid,
        )

    def _user_by_slack_id(self) -> Any:
        return self._live().where(User.slack_user_id == bindparam("slack_user_id", type_=Text))

    async def list_users(self, *, limit: int = 50) -> list[records.User]:
        """Live users, oldest first, at most ``limit`` (1000 at most)."""
        count = validation.list_limit(limit)
        return await self._fetch_records(
            records.User, "users", self._users, action="list users", limit=count
        )

    def _users(self) -> Any:
        return (
            self._live().order_by(User.created_at, User.id).limit(bindparam("limit", type_=Integer))
        )

    async def remove_user(self, user_id: uuid.UUID) -> None:
        """Soft-delete a user; meetings that reference the user stay."""
        uid = validation.uuid_value(user_id, field="user_id")
        await self._soft_delete(User, uid, action="remove user")

    # -- CRM connections -------------------------------------------------------------

    async def connect_crm(
        self,
        *,
        provider_type: str,
        credentials_secret_id: str,
        connected_by_user_id: uuid.UUID | None = None,
        is_default: bool = False,
    ) -> records.CrmConnection:
        """Record a CRM connection; its credentials stay in the secrets manager.

        With ``is_default=True`` it replaces the current default connection.
        """
        values = {
            "provider_type": validation.choice(
                provider_type, field="provider_type", allowed=CRM_PROVIDERS
            ),
            "credentials_secret_id": validation.secret_reference(credentials_secret_id),
            "connected_by_user_id": validation.optional_uuid(
                connected_by_user_id, field="connected_by_user_id"
            ),
            "is_default": validation.boolean(is_default, field="is_default"),
        }
        if values["is_default"]:
            await self._clear_default()
        statement = self._insert(CrmConnection, **values).returning(*row_columns(CrmConnection))
        connection: records.CrmConnection = await self._one_or_none(statement, action="connect CRM")
        return connection

    async def get_crm_connection(
        self, crm_connection_id: uuid.UUID
    ) -> records.CrmConnection | None:
        """A live CRM connection by id."""
        cid = validation.uuid_value(crm_connection_id, field="crm_connection_id")
        return await self._fetch_record(
            records.CrmConnection,
            "crm_connection",
            self._crm_connection,
            action="get CRM connection",
            crm_connection_id=cid,
        )

    def _crm_connection(self) -> Any:
        return self._live(CrmConnection).where(
            CrmConnection.id == bindparam("crm_connection_id", type_=Uuid)
        )

    async def default_crm_connection(self) -> records.CrmConnection | None:
        """The live default CRM connection, if one is set."""
        return await self._fetch_record(
            records.CrmConnection,
            "default_crm_connection",
            self._default_crm_connection,
            action="get default CRM connection",
        )

    def _default_crm_connection(self) -> Any:
        return self._live(CrmConnection).where(CrmConnection.is_default)

    async def set_default_crm_connection(
        self, crm_connection_id: uuid.UUID
    ) -> records.CrmConnection:
        """Make a live connection the default (and the previous default not)."""
        cid = validation.uuid_value(crm_connection_id, field="crm_connection_id")
        target = self._live(CrmConnection).where(CrmConnection.id == cid).with_for_update()
        if await self._one_or_none(target, action="set default CRM connection") is None:
            raise NotFound("set default CRM connection: no live connection with that id")
        await self._clear_default(keep=cid)
        statement = (
            self._update(CrmConnection)
            .where(CrmConnection.id == cid, CrmConnection.deleted_at.is_(None))
            .values(is_default=True)
            .returning(*row_columns(CrmConnection))
        )
        connection: records.CrmConnection | None = await self._one_or_none(
            statement, action="set default CRM connection"
        )
        if connection is None:
            raise NotFound("set default CRM connection: no live connection with that id")
        return connection

    async def list_crm_connections(self, *, limit: int = 50) -> list[records.CrmConnection]:
        """Live CRM connections, the default first, at most ``limit`` (1000 at most)."""
        count = validation.list_limit(limit)
        return await self._fetch_records(
            records.CrmConnection,
            "crm_connections",
            self._crm_connections,
            action="list CRM connections",
            limit=count,
        )

    def _crm_connections(self) -> Any:
        return (
            self._live(CrmConnection)
            .order_by(CrmConnection.is_default.desc(), CrmConnection.created_at, CrmConnection.id)
            .limit(bindparam("limit", type_=Integer))
        )

    async def disconnect_crm(self, crm_connection_id: uuid.UUID) -> None:
        """Soft-delete a connection; its mappings stop matching, meetings keep their reference."""
        cid = validation.uuid_value(crm_connection_id, field="crm_connection_id")
        await self._soft_delete(CrmConnection, cid, action="disconnect CRM", is_default=False)

    async def _clear_default(self, keep: uuid.UUID | None = None) -> None:
        statement = self._update(CrmConnection).where(
            CrmConnection.is_default, CrmConnection.deleted_at.is_(None)
        )
        if keep is not None:
            statement = statement.where(CrmConnection.id != keep)
        await self._rows(statement.values(is_default=False), action="clear default CRM connection")

    # -- account mappings ------------------------------------------------------------

    async def map_account(
        self,
        *,
        crm_connection_id: uuid.UUID,
        email_domain: str,
        crm_account_id: str,
        crm_account_name: str | None = None,
        verified: bool = False,
    ) -> records.AccountMapping:
        """Map an email domain to a CRM account of a live connection (upsert)."""
        cid = validation.uuid_value(crm_connection_id, field="crm_connection_id")
        values = {
            "crm_connection_id": cid,
            "email_domain": validation.domain(email_domain),
            "crm_account_id": validation.text(
                crm_account_id, field="crm_account_id", max_length=validation.MAX_NAME
            ),
            "crm_account_name": validation.optional_text(
                crm_account_name, field="crm_account_name", max_length=validation.MAX_NAME
            ),
            "verified": validation.boolean(verified, field="verified"),
        }
        if await self.get_crm_connection(cid) is None:
            raise NotFound("map account: no live CRM connection with that id")
        upsert = self._insert(AccountMapping, **values)
        statement = upsert.on_conflict_do_update(
            index_elements=[
                AccountMapping.tenant_id,
                AccountMapping.crm_connection_id,
                AccountMapping.email_domain,
            ],
            index_where=AccountMapping.deleted_at.is_(None),
            set_={
                "crm_account_id": upsert.excluded.crm_account_id,
                "crm_account_name": upsert.excluded.crm_account_name,
                "verified": upsert.excluded.verified,
                "updated_at": utcnow(),
            },
        ).returning(*row_columns(AccountMapping))
        mapping: records.AccountMapping = await self._one_or_none(statement, action="map account")
        return mapping

    async def find_account(
        self,
        email_or_domain: str,
        *,
        crm_connection_id: uuid.UUID | None = None,
        verified_only: bool = False,
    ) -> records.AccountMapping | None:
        """The mapping for an email or domain (the most specific parent domain wins).

        Looks in the named connection, or in the default one when none is named,
        and touches ``last_used_at`` of the mapping it returns. One statement.
        """
        host = validation.domain_of(email_or_domain)
        labels = host.split(".")
        candidates = [".".join(labels[i:]) for i in range(len(labels) - 1)]
        connection = self._live(CrmConnection).with_only_columns(CrmConnection.id)
        if crm_connection_id is None:
            connection = connection.where(CrmConnection.is_default)
        else:
            cid = validation.uuid_value(crm_connection_id, field="crm_connection_id")
            connection = connection.where(CrmConnection.id == cid)
        match = (
            self._live(AccountMapping)
            .with_only_columns(AccountMapping.id)
            .where(
                AccountMapping.email_domain.in_(candidates),
                AccountMapping.crm_connection_id == connection.scalar_subquery(),
            )
            .order_by(func.length(AccountMapping.email_domain).desc())
            .limit(1)
        )
        if validation.boolean(verified_only, field="verified_only"):
            match = match.where(AccountMapping.verified)
        statement = (
            self._update(AccountMapping)
            .where(AccountMapping.id == match.scalar_subquery())
            .values(last_used_at=utcnow())
            .returning(*row_columns(AccountMapping))
        )
        result: records.AccountMapping | None = await self._one_or_none(
            statement, action="find account"
        )
        return result

    # -- statistics ------------------------------------------------------------------

    async def stats(self) -> TenantStats:
        """Live counts of users, connections, meetings (all, last 30 days) and mappings."""
        since = utcnow() - timedelta(days=30)
        (row,) = await self._fetch("stats", self._stats, action="tenant stats", since=since)
        return TenantStats(
            users=row["users"],
            crm_connections=row["crm_connections"],
            meetings_total=row["meetings_total"],
            meetings_last_30_days=row["recent"],
            account_mappings=row["account_mappings"],
        )

    def _stats(self) -> Any:
        def count(model: Any, *conditions: Any) -> Any:
            return (
                self._live(model)
                .with_only_columns(func.count())
                .where(*conditions)
                .scalar_subquery()
            )

        since = bindparam("since", type_=DateTime(timezone=True))
        return select(
            count(User).label("users"),
            count(CrmConnection).label("crm_connections"),
            count(MeetingSession).label("meetings_total"),
            count(MeetingSession, MeetingSession.created_at >= since).label("recent"),
            count(AccountMapping).label("account_mappings"),
        )
