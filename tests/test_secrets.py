"""The database password and the tenant key never show: not in logs (echo on), reprs,
info() or errors; nor does a tenant claim signed with the key.

A throwaway cluster of this module requires a real password (SCRAM) for one
login role, so a right and a wrong password both reach the server; a closed
port and a bad URL cover the failures before it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import traceback
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any, NamedTuple

import asyncpg
import pytest
import pytest_asyncio
from pydantic import ValidationError as SettingsError
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId, schema
from slack_fathom_db.claims import CLAIM_PATTERN, generate_tenant_key
from slack_fathom_db.errors import DatabaseUnavailable, SlackFathomDBError
from slack_fathom_db.testing import engine_of, local_cluster_control, throwaway_database
from tests.helpers import dsn

PASSWORD = f"pw-{secrets.token_hex(12)}"
WRONG = f"wrong-{secrets.token_hex(12)}"
ROLE = "sfdb_pw_login"


class PasswordDatabase(NamedTuple):
    """A migrated database reached as a role that needs a password, and its tenant key."""

    url: URL
    tenant_key: str
    """The ``DATABASE_TENANT_KEY`` installed in that database."""


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def password_db() -> AsyncIterator[PasswordDatabase]:
    """A migrated database on a cluster of this module, as a role that needs a password."""
    manager = local_cluster_control()
    cluster = await asyncio.to_thread(manager.__enter__)
    try:
        async with throwaway_database(cluster.url) as settings:
            conn = await asyncpg.connect(dsn(cluster.url))
            try:
                await conn.execute(f"CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
                hba = await conn.fetchval("SHOW hba_file")
                await asyncio.to_thread(_require_scram, hba)
                assert await conn.fetchval("SELECT pg_reload_conf()")
            finally:
                await conn.close()
            url = settings.sqlalchemy_url().set(username=ROLE, password=PASSWORD)
            # The server really checks it now: a wrong password is refused.
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(dsn(url.set(password=WRONG)))
            assert settings.tenant_key is not None
            yield PasswordDatabase(url, settings.tenant_key.get_secret_value())
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)


def _require_scram(hba_file: str) -> None:
    with open(hba_file, encoding="utf-8") as f:
        rules = f.read()
    with open(hba_file, "w", encoding="utf-8") as f:
        f.write(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n{rules}")


@pytest.fixture
def every_log_line(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture every log record at DEBUG, from every logger."""
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "asyncpg", "alembic"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def shown(*things: Any) -> str:
    return "\n".join(str(thing) for thing in things)


def chain(exc: BaseException) -> str:
    """The exception as a traceback prints it: its message, and every cause and context."""
    return "".join(traceback.format_exception(exc))


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = []
    for record in caplog.records:
        lines.append(formatter.format(record))
        lines.append(repr(record.args))
    return "\n".join(lines)


def settings_for(url: URL, tenant_key: str, **extra: Any) -> DatabaseSettings:
    return DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        tenant_key=tenant_key,
        echo=True,
        pool_size=2,
        max_overflow=0,
        pool_timeout=5.0,
        _env_file=None,
        **extra,
    )


async def test_a_working_connection_never_shows_the_password_the_tenant_key_or_a_claim(
    password_db: PasswordDatabase,
    every_log_line: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = settings_for(*password_db)
    key_bytes = password_db.tenant_key.partition(":")[2]
    assert settings.sqlalchemy_url().password == PASSWORD
    async with Database(settings) as db:
        assert await db.check_connection() is True
        info = await db.info()
        tenant = await db.directory.install(
            slack_team_id=f"T{secrets.token_hex(5).upper()}", slack_team_name="Secret"
        )
        async with db.unit_of_work(tenant) as uow:
            await uow.tenants.add_user(slack_user_id="USECRET01")
            await uow.audit.log_event(
                event_type="auth.login", event_category="auth", action_description="login"
            )
            await uow.commit()
        await db.rate_limit(tenant, "secret", limit=1)
        await db.rate_limit(tenant, "secret", limit=1)
        await db.log_security_event(
            tenant,
            event_type="rate_limit.denied",
            event_category="security",
            action_description="denied",
        )
        engine = engine_of(db)
        everything = shown(repr(db), repr(engine), repr(engine.url), str(engine.url))
    await schema.upgrade(settings)  # at head already; alembic logs what it does
    assert info.user == ROLE
    out, err = capfd.readouterr()
    texts = {
        "log records": log_text(every_log_line),
        "stdout/stderr (echo)": out + err,
        "info()": shown(info, repr(info), asdict(info)),
        "settings": shown(
            repr(settings),
            str(settings),
            settings.model_dump(),
            settings.model_dump_json(),
            settings.masked_url,
        ),
        "database and engine": everything,
    }
    assert "SELECT" in texts["stdout/stderr (echo)"] + texts["log records"]  # echo was on
    # The preamble of each unit of work's transaction was logged, its claim masked.
    assert "SET LOCAL app.tenant_claim = '…'" in texts["log records"]
    for where, text in texts.items():
        assert PASSWORD not in text, where
        assert key_bytes not in text, where
        assert CLAIM_PATTERN.search(text) is None, where
    assert "***" in info.url


async def test_a_wrong_password_fails_clearly_without_showing_either_password(
    password_db: PasswordDatabase,
    every_log_line: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = settings_for(password_db.url.set(password=WRONG), password_db.tenant_key)
    errors: list[BaseException] = []
    async with Database(settings) as db:
        assert await db.check_connection() is False
        for call in (
            db.info,
            lambda: db.directory.resolve("T0SECRET"),
            lambda: db.rate_limit(TenantId(uuid.uuid4()), "x", limit=1),
            lambda: _enter(db),
        ):
            with pytest.raises(SlackFathomDBError) as caught:
                await asyncio.wait_for(call(), 60)
            errors.append(caught.value)
    out, err = capfd.readouterr()
    for error in errors:
        assert isinstance(error, DatabaseUnavailable), chain(error)
        assert "refused the login" in str(error)
        assert "28P01" in str(error)
        for secret in (WRONG, PASSWORD):
            assert secret not in chain(error)
            assert secret not in repr(error)
    for secret in (WRONG, PASSWORD):
        assert secret not in log_text(every_log_line)
        assert secret not in out + err


async def _enter(db: Database) -> None:
    async with db.unit_of_work(TenantId(uuid.uuid4())):
        pass


async def test_an_unreachable_server_error_does_not_show_the_password(
    every_log_line: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with __import__("socket").socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = URL.create(
        "postgresql",
        username="app",
        password=PASSWORD,
        host="127.0.0.1",
        port=port,
        database="nowhere",
    )
    async with Database(settings_for(url, generate_tenant_key("test"))) as db:
        with pytest.raises(DatabaseUnavailable) as caught:
            await asyncio.wait_for(db.info(), 60)
        assert await db.check_connection() is False
    out, err = capfd.readouterr()
    assert "unreachable" in str(caught.value)
    assert PASSWORD not in chain(caught.value)
    assert PASSWORD not in log_text(every_log_line)
    assert PASSWORD not in out + err


def test_settings_errors_do_not_show_the_password() -> None:
    for bad in (
        {"url": f"mysql://app:{PASSWORD}@db/x"},
        {"url": f"postgresql://app:{PASSWORD}@db/x", "pool_size": 0},
        {"url": f"postgresql://app:{PASSWORD}@db:notaport/x"},
        {"url": f"postgresql://app:{PASSWORD}@db/"},
    ):
        with pytest.raises((SettingsError, ValueError)) as caught:
            DatabaseSettings(_env_file=None, **bad)
        assert PASSWORD not in chain(caught.value)
        if isinstance(caught.value, SettingsError):
            assert PASSWORD not in repr(caught.value.errors())
            assert PASSWORD not in caught.value.json()
