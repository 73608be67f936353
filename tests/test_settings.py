"""DatabaseSettings, the secret it holds, the local test cluster and the ``sfdb`` command.

Settings tests run in an empty temporary directory with every ``DATABASE_*``
variable removed, so neither the developer's environment nor a stray ``.env``
leaks in.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import traceback
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, __version__
from slack_fathom_db.claims import generate_tenant_key
from slack_fathom_db.errors import ConfigurationError
from slack_fathom_db.roles import LayerRoles
from slack_fathom_db.settings import normalize_url
from slack_fathom_db.testing import local_cluster

PASSWORD = "s3cr3t-pw"
TENANT_KEY = generate_tenant_key("masked")
TENANT_KEY_BYTES = TENANT_KEY.partition(":")[2]
"""The secret part of ``TENANT_KEY``: what must never show."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``DATABASE_*`` variables and an empty working directory (so no ``.env``)."""
    for name in list(os.environ):
        if name.upper().startswith("DATABASE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _with_password(settings: DatabaseSettings) -> DatabaseSettings:
    """Settings for the real test database, with a password (trust auth ignores it)."""
    url = settings.sqlalchemy_url().set(password=PASSWORD)
    return DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        tenant_key=settings.tenant_key,
        pool_size=2,
        max_overflow=0,
        _env_file=None,
    )


# -- defaults, environment, .env -------------------------------------------------------


def test_defaults(clean_env: Path) -> None:
    settings = DatabaseSettings()
    assert settings.url is None
    assert settings.masked_url is None
    assert settings.pool_size == 20
    assert settings.max_overflow == 10
    assert settings.pool_timeout == 30
    assert settings.pool_recycle == 3600
    assert settings.echo is False
    assert settings.pgbouncer is False
    assert settings.statement_timeout_ms > 0
    # The roles are named after the database unless DATABASE_ROLE_PREFIX or
    # DATABASE_APP_ROLE say otherwise.
    assert (settings.role_prefix, settings.app_role, settings.migration_url) == (None, None, None)
    assert settings.tenant_key is None
    named = DatabaseSettings(url=f"postgresql://app:{PASSWORD}@db.internal/slack")
    assert named.roles == LayerRoles(
        owner="slack_owner", app="slack_app", directory="slack_directory"
    )


def test_a_missing_url_says_how_to_set_it(clean_env: Path) -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        DatabaseSettings().sqlalchemy_url()


def test_environment_overrides(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{PASSWORD}@db.internal:6543/slack")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "5")
    monkeypatch.setenv("DATABASE_MAX_OVERFLOW", "0")
    monkeypatch.setenv("DATABASE_POOL_TIMEOUT", "2.5")
    monkeypatch.setenv("DATABASE_POOL_RECYCLE", "600")
    monkeypatch.setenv("DATABASE_ECHO", "true")
    monkeypatch.setenv("DATABASE_PGBOUNCER", "1")
    monkeypatch.setenv("DATABASE_STATEMENT_TIMEOUT_MS", "1500")
    monkeypatch.setenv("DATABASE_APP_ROLE", "tenant_app")
    monkeypatch.setenv("DATABASE_TENANT_KEY", TENANT_KEY)
    settings = DatabaseSettings()
    url = settings.sqlalchemy_url()
    assert (url.drivername, url.username, url.password) == ("postgresql+asyncpg", "app", PASSWORD)
    assert (url.host, url.port, url.database) == ("db.internal", 6543, "slack")
    assert settings.pool_size == 5
    assert settings.max_overflow == 0
    assert settings.pool_timeout == 2.5
    assert settings.pool_recycle == 600
    assert settings.echo is True
    assert settings.pgbouncer is True
    assert settings.statement_timeout_ms == 1500
    assert settings.app_role == "tenant_app"
    assert settings.tenant_key is not None
    assert settings.tenant_key.get_secret_value() == TENANT_KEY


def test_dotenv_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        f"DATABASE_URL=postgres://app:{PASSWORD}@envfile.internal/fromfile\n"
        "DATABASE_POOL_SIZE=7\n"
        "DATABASE_PGBOUNCER=true\n"
        "SOMETHING_ELSE=ignored\n",
        encoding="utf-8",
    )
    settings = DatabaseSettings()
    url = settings.sqlalchemy_url()
    assert (url.drivername, url.host, url.database) == (
        "postgresql+asyncpg",
        "envfile.internal",
        "fromfile",
    )
    assert settings.pool_size == 7
    assert settings.pgbouncer is True
    assert settings.max_overflow == 10  # not in the file: the default

    monkeypatch.setenv("DATABASE_POOL_SIZE", "9")  # the environment wins over .env
    assert DatabaseSettings().pool_size == 9


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_POOL_SIZE", "0"),
        ("DATABASE_POOL_SIZE", "many"),
        ("DATABASE_MAX_OVERFLOW", "-1"),
        ("DATABASE_POOL_TIMEOUT", "0"),
        ("DATABASE_ECHO", "perhaps"),
    ],
)
def test_invalid_pool_values_are_rejected(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        DatabaseSettings()


# -- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        f"postgresql://app:{PASSWORD}@db.internal:5433/slack",
        f"postgres://app:{PASSWORD}@db.internal:5433/slack",
        f"postgresql+asyncpg://app:{PASSWORD}@db.internal:5433/slack",
        f"  postgresql://app:{PASSWORD}@db.internal:5433/slack  ",
    ],
)
def test_urls_are_driven_through_asyncpg(clean_env: Path, raw: str) -> None:
    url = DatabaseSettings(url=raw).sqlalchemy_url()
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "app",
        PASSWORD,
        "db.internal",
        5433,
        "slack",
    )


def test_a_password_with_reserved_characters_survives(clean_env: Path) -> None:
    password = "p@ss:w/rd?#%"
    raw = URL.create(
        "postgresql", username="app", password=password, host="db.internal", database="slack"
    ).render_as_string(hide_password=False)
    settings = DatabaseSettings(url=raw)
    assert settings.sqlalchemy_url().password == password
    assert password not in repr(settings)


@pytest.mark.parametrize(
    "raw",
    [
        f"mysql://app:{PASSWORD}@db.internal/slack",
        f"sqlite:///tmp/{PASSWORD}.db",
        f"postgresql+psycopg2://app:{PASSWORD}@db.internal/slack",
        f"postgresql://app:{PASSWORD}@db.internal",
        f"postgresql://app:{PASSWORD}@db.internal/",
        f"not a url {PASSWORD}",
    ],
)
def test_bad_urls_are_rejected_without_showing_the_password(clean_env: Path, raw: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DatabaseSettings(url=raw)
    assert "DATABASE_URL" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert PASSWORD not in repr(caught.value)
    with pytest.raises(ValueError, match="DATABASE_URL") as direct:
        normalize_url(raw)
    assert PASSWORD not in str(direct.value)


def test_a_bad_url_from_the_environment_is_rejected_without_the_password(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"mysql://app:{PASSWORD}@db.internal/slack")
    with pytest.raises(ValidationError) as caught:
        DatabaseSettings()
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "role", ["", "Sfdb_App", "1app", "app-role", 'app"; DROP ROLE postgres; --', "a" * 64]
)
def test_invalid_app_roles_are_rejected(clean_env: Path, role: str) -> None:
    with pytest.raises(ValidationError, match=r"app_role\n.*must be a lower-case identifier"):
        DatabaseSettings(app_role=role)


@pytest.mark.parametrize("role", ["sfdb_app", "_app", "tenant_app_2", "a" * 63])
def test_valid_app_roles_are_kept(clean_env: Path, role: str) -> None:
    assert DatabaseSettings(app_role=role).app_role == role


# -- the password never shows ----------------------------------------------------------


def test_the_password_and_the_tenant_key_are_masked_everywhere(clean_env: Path) -> None:
    settings = DatabaseSettings(
        url=f"postgresql://app:{PASSWORD}@db.internal:5432/slack", tenant_key=TENANT_KEY
    )
    assert settings.sqlalchemy_url().password == PASSWORD  # they are there ...
    assert settings.tenant_key is not None
    assert settings.tenant_key.get_secret_value() == TENANT_KEY
    shown = {
        "repr": repr(settings),
        "str": str(settings),
        "masked_url": settings.masked_url or "",
        "model_dump_json": settings.model_dump_json(),
        "model_dump": repr(settings.model_dump()),
        "url field": repr(settings.url),
        "tenant key field": repr(settings.tenant_key) + str(settings.tenant_key),
        "Database repr": repr(Database(settings)),
    }
    for where, text in shown.items():  # ... and nowhere to be seen
        assert PASSWORD not in text, where
        assert TENANT_KEY_BYTES not in text, where
    assert settings.masked_url == "postgresql+asyncpg://app:***@db.internal:5432/slack"
    assert "db.internal" in repr(settings)
    assert "db.internal" in repr(Database(settings))


async def test_database_info_masks_the_password(settings: DatabaseSettings) -> None:
    secret = _with_password(settings)
    assert secret.sqlalchemy_url().password == PASSWORD
    async with Database(secret) as db:
        info = await db.info()
        assert await db.check_connection() is True
    assert PASSWORD not in info.url
    assert "***" in info.url
    assert PASSWORD not in repr(info)
    assert info.database == settings.sqlalchemy_url().database
    assert info.user == settings.sqlalchemy_url().username
    assert info.server_version
    assert info.app_role == settings.roles.app
    assert info.pool_size == 2


async def test_sfdb_info_does_not_print_the_password(settings: DatabaseSettings) -> None:
    secret = _with_password(settings)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DATABASE_")}
    env["DATABASE_URL"] = secret.sqlalchemy_url().render_as_string(hide_password=False)
    assert settings.tenant_key is not None
    tenant_key = settings.tenant_key.get_secret_value()
    env["DATABASE_TENANT_KEY"] = tenant_key
    code, out, err = await _run_cli("info", env=env)
    assert code == 0, err
    assert PASSWORD not in out + err
    assert tenant_key.partition(":")[2] not in out + err
    assert "***" in out
    assert str(settings.sqlalchemy_url().database) in out


async def test_sfdb_reports_a_bad_url_without_the_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DATABASE_")}
    env["DATABASE_URL"] = f"mysql://app:{PASSWORD}@db.internal/slack"
    code, out, err = await _run_cli("info", env=env, cwd=tmp_path)
    assert code == 2
    assert "configuration error" in err
    assert PASSWORD not in out + err
    assert "Traceback" not in err


# -- the tenant key -------------------------------------------------------------------


def _encoded(size: int) -> str:
    """``size`` random bytes in url-safe base64, as a tenant key's secret part is written."""
    return base64.urlsafe_b64encode(secrets.token_bytes(size)).decode()


SHORT_KEY = _encoded(16)
LONG_KEY = _encoded(48)
GARBLED_KEY = f"not*base64*{secrets.token_hex(16)}"


def test_a_database_without_a_tenant_key_is_refused_naming_the_setting(clean_env: Path) -> None:
    """Units of work cannot sign a claim without ``DATABASE_TENANT_KEY``: ``Database`` refuses
    to start without it, saying which setting to set, before it connects anywhere."""
    settings = DatabaseSettings(url=f"postgresql://app:{PASSWORD}@db.internal/slack")
    assert settings.tenant_key is None
    with pytest.raises(ConfigurationError, match="DATABASE_TENANT_KEY is not set"):
        Database(settings)


@pytest.mark.parametrize(
    ("value", "hidden"),
    [
        pytest.param(f"{TENANT_KEY_BYTES}", TENANT_KEY_BYTES, id="no key id"),
        pytest.param(f"bad id!:{TENANT_KEY_BYTES}", TENANT_KEY_BYTES, id="a bad key id"),
        pytest.param(f"{'k' * 33}:{TENANT_KEY_BYTES}", TENANT_KEY_BYTES, id="a key id too long"),
        pytest.param(f"test:{SHORT_KEY}", SHORT_KEY, id="16 bytes"),
        pytest.param(f"test:{LONG_KEY}", LONG_KEY, id="48 bytes"),
        pytest.param(f"test:{GARBLED_KEY}", GARBLED_KEY, id="not base64"),
        pytest.param("test:", None, id="no key"),
    ],
)
def test_a_malformed_tenant_key_is_refused_without_showing_it(
    clean_env: Path, value: str, hidden: str | None
) -> None:
    """A ``DATABASE_TENANT_KEY`` that is not ``<key id>:<base64 of 32 bytes>`` is refused when
    the ``Database`` is made, with an error that names the setting and shows nothing of
    the key: not in its message, its repr, nor anywhere in its traceback."""
    settings = DatabaseSettings(
        url=f"postgresql://app:{PASSWORD}@db.internal/slack", tenant_key=SecretStr(value)
    )
    with pytest.raises(ConfigurationError) as caught:
        Database(settings)
    assert "DATABASE_TENANT_KEY" in str(caught.value)
    if hidden is not None:
        printed = "".join(traceback.format_exception(caught.value))
        for text in (str(caught.value), repr(caught.value), printed):
            assert hidden not in text


# -- the local cluster of the test plugin ----------------------------------------------


async def test_local_cluster_starts_answers_and_stops() -> None:
    cluster = local_cluster()
    url = await asyncio.to_thread(cluster.__enter__)
    try:
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(cluster.__exit__, None, None, None)
    assert url.host == "127.0.0.1"
    with pytest.raises(ConnectionRefusedError):  # nothing listens on that port any more
        await asyncpg.connect(dsn, timeout=5)


# -- the command -----------------------------------------------------------------------


async def _run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "slack_fathom_db.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_sfdb_version() -> None:
    code, out, err = await _run_cli("--version")
    assert code == 0, err
    assert out.strip() == f"sfdb {__version__}"


async def test_sfdb_help() -> None:
    code, out, err = await _run_cli("--help")
    assert code == 0, err
    assert "usage: sfdb" in out
    assert "migrate" in out
    assert "info" in out


@pytest.mark.parametrize("mode", ["disable", "prefer", "require"])
async def test_a_libpq_sslmode_is_understood(
    settings: DatabaseSettings, admin: asyncpg.Connection, mode: str
) -> None:
    # libpq's ?sslmode= (as hosting providers write it) reaches the driver as its ssl mode.
    url = settings.sqlalchemy_url().set(query={"sslmode": mode})
    given = DatabaseSettings(
        url=url.render_as_string(hide_password=False),
        tenant_key=settings.tenant_key,
        _env_file=None,
    )
    assert given.sqlalchemy_url().query == {"ssl": mode}
    offers_tls = await admin.fetchval("SHOW ssl") == "on"
    async with Database(given) as db:
        # "require" must refuse to go on without TLS, where the server offers none.
        assert await db.check_connection() is (mode != "require" or offers_tls)


def test_an_unknown_sslmode_is_refused(clean_env: Path) -> None:
    with pytest.raises(ValueError, match="sslmode must be one of"):
        DatabaseSettings(url="postgresql://app@db/x?sslmode=sometimes", _env_file=None)
