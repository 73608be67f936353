"""Secrets stay secret and input never becomes SQL text, however it is spelled.

A password in the query string, an ``@`` nobody encoded, the raw URL kept on
an exception; a ``uuid.UUID`` subclass whose ``__str__`` lies; a database name
with a quote in it; secret references spelled with non-ASCII digits.
"""

from __future__ import annotations

import secrets
import traceback
import uuid
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError as SettingsError
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId
from slack_fathom_db.claims import ClaimIssuer, TenantKey
from slack_fathom_db.errors import ValidationError
from slack_fathom_db.tenancy import transaction_preamble
from slack_fathom_db.validation import secret_reference, uuid_value
from tests.test_cli import sfdb

PASSWORD = f"pw-{secrets.token_hex(12)}"
ARABIC_INDIC = "".join(chr(0x0660 + n % 10) for n in range(1, 13))
FULL_WIDTH = "".join(chr(0xFF10 + n % 10) for n in range(1, 13))


def chain(exc: BaseException) -> str:
    """Everything an exception carries: each message and repr, along causes and contexts."""
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current), "".join(traceback.format_exception(current))]
        current = current.__cause__ or current.__context__
    return "\n".join(seen)


def test_a_settings_error_keeps_no_trace_of_the_url() -> None:
    with pytest.raises(SettingsError) as caught:
        DatabaseSettings(url=f"postgresql://app:{PASSWORD}@db/x", pool_size=0, _env_file=None)
    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None
    assert PASSWORD not in chain(caught.value)
    assert "pool_size" in str(caught.value)


def test_an_unencoded_at_in_the_password_is_refused_without_showing_any_of_it() -> None:
    head, tail = "p", PASSWORD  # the password "p@<tail>", written without %40
    with pytest.raises(SettingsError) as caught:
        DatabaseSettings(url=f"postgresql://app:{head}@{tail}@db.internal/x", _env_file=None)
    assert "%40" in str(caught.value)
    assert tail not in chain(caught.value)
    # Encoded, it is a password like any other, and masked.
    encoded = DatabaseSettings(url=f"postgresql://app:{head}%40{tail}@db/x", _env_file=None)
    assert encoded.sqlalchemy_url().password == f"{head}@{tail}"
    assert tail not in repr(encoded)
    assert tail not in (encoded.masked_url or "")


def test_a_password_given_twice_is_refused() -> None:
    with pytest.raises(SettingsError, match="password twice"):
        DatabaseSettings(url=f"postgresql://app:a@db/x?password={PASSWORD}", _env_file=None)


async def test_a_password_in_the_query_string_is_masked_everywhere(
    settings: DatabaseSettings, tmp_path: Path
) -> None:
    # The suite's server trusts loopback logins: the password is carried, not checked. The
    # runtime login's own password leaves the URL, so this one is the only one given.
    url = settings.sqlalchemy_url()._replace(password=None).set(query={"password": PASSWORD})
    given = DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        tenant_key=settings.tenant_key,
        _env_file=None,
    )
    assert given.sqlalchemy_url().password == PASSWORD  # moved where it is masked
    async with Database(given) as db:
        assert await db.check_connection() is True
        info = await db.info()
        shown = "\n".join([repr(db), repr(given), str(given), repr(info), info.url])
    assert PASSWORD not in shown
    assert PASSWORD not in (given.masked_url or "")
    other = DatabaseSettings(url=f"postgresql://app@db/x?sslpassword={PASSWORD}", _env_file=None)
    assert "sslpassword=***" in (other.masked_url or "")
    assert PASSWORD not in repr(other)
    for command in ("check", "current", "info"):
        done = sfdb(command, url=url.render_as_string(hide_password=False), cwd=tmp_path)
        assert PASSWORD not in done.stdout + done.stderr, command


class Shifty(uuid.UUID):
    """A UUID whose text is SQL."""

    def __str__(self) -> str:
        return "00000000-0000-0000-0000-000000000000'; SET LOCAL ROLE postgres; --"

    def __format__(self, spec: str) -> str:
        return str(self)


async def test_a_uuid_subclass_cannot_write_sql_into_the_transaction_opener(
    db: Database, tenant_a: TenantId
) -> None:
    shifty = Shifty(int=tenant_a.int)
    claims = ClaimIssuer(TenantKey.from_settings(db.settings), shifty, backend_pid=0)
    (message,) = transaction_preamble(claims, settings=db.settings, check_tenant=False)
    assert f".{uuid.UUID(int=tenant_a.int)}." in message  # the claim names the tenant
    assert "postgres" not in message
    assert type(uuid_value(shifty, field="tenant_id")) is uuid.UUID
    async with db.unit_of_work(TenantId(shifty)) as uow:
        tenant = await uow.tenants.get()
        assert tenant is not None
        assert tenant.id == tenant_a
        assert type(uow.tenant_id) is uuid.UUID


async def test_sfdb_migrate_quotes_the_database_name(
    sfdb_server: URL, tmp_path: Path, admin: asyncpg.Connection
) -> None:
    name = f'sfdb "quoted" {secrets.token_hex(3)}'
    url = sfdb_server.set(database=name).render_as_string(hide_password=False)
    try:
        done = sfdb("migrate", url=url, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (
            await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
        )
    finally:
        quoted = name.replace('"', '""')
        await admin.execute(f'DROP DATABASE IF EXISTS "{quoted}" WITH (FORCE)')


@pytest.mark.parametrize(
    "reference",
    [
        # Arabic-Indic and full-width digits: \\d would take them, an account id does not.
        "arn:aws:secretsmanager:us-east-1:" + ARABIC_INDIC[:12] + ":secret:crm/hubspot",
        "arn:aws:ssm:eu-west-1:" + FULL_WIDTH[:12] + ":parameter/crm/token",
        "projects/acme/secrets/hubspot/versions/" + ARABIC_INDIC[3],
    ],
)
def test_secret_references_take_ascii_digits_only(reference: str) -> None:
    with pytest.raises(ValidationError, match="credentials_secret_id"):
        secret_reference(reference)
    ascii_only = "".join(str(int(ch)) if ch.isdigit() else ch for ch in reference)
    assert secret_reference(ascii_only) == ascii_only
