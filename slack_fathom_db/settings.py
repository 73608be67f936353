"""Connection settings, read from the environment and ``.env``.

There is no module-level instance: the application builds one where it
starts (``DatabaseSettings()``), tests build their own. The URL carries a
password, so it is held as a secret: the repr, ``model_dump`` and every error
show it masked (``postgresql+asyncpg://user:***@host/db``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Final, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from slack_fathom_db.roles import ROLE_NAME, LayerRoles, role_prefix
from slack_fathom_db.validation import DEFAULT_MAX_JSON_BYTES

__all__ = ["DatabaseSettings", "mask_url", "normalize_url"]

_MASKED = "**********"
CLIENT_TIMEOUT_MARGIN = 2.0
"""Seconds the client waits beyond the statement timeout before it gives up on the server."""
_SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_ACCEPTED_SCHEMES = {"postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg"}


def normalize_url(raw: str) -> URL:
    """Parse a PostgreSQL URL and return it driven through asyncpg.

    ``postgresql://`` and ``postgres://`` are accepted; another driver or
    database is refused. The error never repeats the URL (it may hold a
    password).
    """
    try:
        url = make_url(raw.strip())
    except ArgumentError:
        raise ValueError(
            "DATABASE_URL is not a valid URL; expected postgresql://user:password@host:port/database"
        ) from None
    if url.drivername not in _ACCEPTED_SCHEMES:
        raise ValueError(
            f"DATABASE_URL must use postgresql:// or postgres:// (got scheme {url.drivername!r})"
        )
    if not url.database:
        raise ValueError("DATABASE_URL must name a database (…/database)")
    if url.host and "@" in url.host:
        # Parsed as user:pass@<rest of the password>@host: the password would show.
        raise ValueError(
            "DATABASE_URL: the password holds an '@' that is not percent-encoded (write it as %40)"
        )
    query = dict(url.query)
    sslmode = query.pop("sslmode", None)
    if sslmode is not None:
        # libpq's name; asyncpg takes the same modes as ``ssl``.
        mode = sslmode if isinstance(sslmode, str) else sslmode[-1]
        if mode not in _SSL_MODES:
            raise ValueError(f"DATABASE_URL: sslmode must be one of {', '.join(_SSL_MODES)}")
        query.setdefault("ssl", mode)
    password = query.pop("password", None)
    if password is not None:
        # Kept where every rendering masks it, not in the query string.
        if url.password is not None:
            raise ValueError("DATABASE_URL gives the password twice (in the URL and ?password=)")
        url = url.set(password=password if isinstance(password, str) else password[-1])
    return url.set(drivername="postgresql+asyncpg", query=query)


_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword", "passfile", "sslkey"})


@lru_cache(maxsize=64)
def _roles(url: str | None, prefix: str | None, app: str | None) -> LayerRoles:
    """The roles of a URL's database (or of ``prefix``); cached: every unit of work asks."""
    database = "" if url is None else make_url(url).database or ""
    return LayerRoles.for_prefix(prefix or role_prefix(database), app=app)


def mask_url(url: URL) -> str:
    """``url`` as text with its password, and query parameters that hold secrets, masked."""
    placeholder = "sfdbmasked"  # rendered as is, then shown as the password's *** is
    masked = {
        name: placeholder if name.lower() in _SECRET_PARAMETERS else value
        for name, value in url.query.items()
    }
    rendered = url.set(query=masked).render_as_string(hide_password=True)
    return rendered.replace(f"={placeholder}", "=***")


class DatabaseSettings(BaseSettings):
    """Where the database is and how the pool behaves.

    Environment names: ``DATABASE_URL``, ``DATABASE_POOL_SIZE``,
    ``DATABASE_MAX_OVERFLOW``, ``DATABASE_POOL_TIMEOUT``,
    ``DATABASE_POOL_RECYCLE``, ``DATABASE_ECHO``, ``DATABASE_SLOW_STATEMENT_MS``,
    ``DATABASE_TRACE_TENANT``, ``DATABASE_PGBOUNCER``,
    ``DATABASE_STATEMENT_TIMEOUT_MS``, ``DATABASE_CONNECT_TIMEOUT``,
    ``DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS``, ``DATABASE_MAX_JSON_BYTES``,
    ``DATABASE_CLAIM_LEASE_SECONDS``, ``DATABASE_MAX_PROCESSING_ATTEMPTS``,
    ``DATABASE_PURGE_GRACE_DAYS``,
    ``DATABASE_MIGRATION_URL``, ``DATABASE_ROLE_PREFIX``, ``DATABASE_APP_ROLE``.
    """

    model_config = SettingsConfigDict(
        env_prefix="DATABASE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
        frozen=True,
    )

    url: SecretStr | None = Field(
        default=None, description="postgresql:// URL of the server and database."
    )
    pool_size: Annotated[int, Field(ge=1, le=1000)] = 20
    max_overflow: Annotated[int, Field(ge=0, le=1000)] = 10
    pool_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    pool_recycle: Annotated[int, Field(ge=-1)] = 3600
    echo: bool = Field(
        default=False, description="Log the SQL of every statement (never its parameters)."
    )
    slow_statement_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        default=1000,
        description="Log a warning for every statement that takes this long (0: never).",
    )
    trace_tenant: bool = Field(
        default=False,
        description="Put the tenant id on the unit of work's tracing span (OpenTelemetry).",
    )
    pgbouncer: bool = Field(
        default=False,
        description="Transaction pooling in front: no prepared-statement cache.",
    )
    statement_timeout_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 30_000
    connect_timeout: Annotated[float, Field(gt=0, le=600)] = Field(
        default=10.0, description="Seconds to open a connection before DatabaseUnavailable."
    )
    idle_in_transaction_timeout_ms: Annotated[int, Field(ge=0, le=86_400_000)] = Field(
        default=60_000,
        description="idle_in_transaction_session_timeout of every tenant transaction (0: none).",
    )
    max_json_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        default=DEFAULT_MAX_JSON_BYTES,
        description="Largest JSON value (compact UTF-8 bytes) a repository accepts.",
    )
    claim_lease_seconds: Annotated[float, Field(gt=0, le=7 * 86_400)] = Field(
        default=900.0,
        description="Seconds a claimed meeting stays with its worker before others may reclaim it.",
    )
    max_processing_attempts: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5,
        description="Claims of one meeting before an expired lease fails it for good.",
    )
    purge_grace_days: Annotated[int, Field(ge=0, le=36_600)] = Field(
        default=30,
        description="Days an uninstalled workspace keeps its rows before sfdb tenant purge "
        "erases them.",
    )
    token_keys: SecretStr | None = Field(
        default=None,
        description="Keys that encrypt Slack tokens at rest: <key id>:<base64 32 bytes>, "
        "comma-separated; the first encrypts, all decrypt (slack_fathom_db.tokens).",
    )
    tenant_key: SecretStr | None = Field(
        default=None,
        description="The key that signs each transaction's tenant claim: <key id>:<base64 "
        "32 bytes> (slack_fathom_db.claims); sfdb migrate installs it in the database.",
    )
    migration_url: SecretStr | None = Field(
        default=None,
        description="postgresql:// URL with the credentials of a login that may become the "
        "owner; migrations, create-login and the purge use it.",
    )
    role_prefix: str | None = Field(
        default=None,
        description="Prefix of the layer's roles (<prefix>_owner, _app, _directory); "
        "the database's name by default.",
    )
    app_role: str | None = Field(
        default=None,
        description="The NOSUPERUSER NOBYPASSRLS role every unit of work runs as "
        "(<prefix>_app by default).",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except PydanticValidationError as exc:
            title, errors = exc.title, exc.errors()
        else:
            return
        # pydantic keeps each offending input in ValidationError.errors(); the URL input
        # holds a password, so the error is rebuilt with every input masked, and raised
        # outside the except block so the original is not kept as its __context__.
        raise PydanticValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(
                    type=error["type"], loc=error["loc"], input=_MASKED, ctx=error.get("ctx", {})
                )
                for error in errors
            ],
            hide_input=True,
        )

    @model_validator(mode="after")
    def _normalize_urls(self) -> Self:
        # A model-level check: pydantic has already wrapped the URLs in SecretStr, so
        # not even the structured errors (ValidationError.errors()) hold them in clear.
        for name in ("url", "migration_url"):
            value: SecretStr | None = getattr(self, name)
            if value is None or not value.get_secret_value():
                object.__setattr__(self, name, None)
                continue
            normalized = normalize_url(value.get_secret_value())
            object.__setattr__(
                self, name, SecretStr(normalized.render_as_string(hide_password=False))
            )
        return self

    @field_validator("app_role", "role_prefix")
    @classmethod
    def _check_role(cls, value: str | None) -> str | None:
        if value is not None and not ROLE_NAME.fullmatch(value):
            raise ValueError("must be a lower-case identifier ([a-z_][a-z0-9_]*, 63 at most)")
        return value

    @property
    def roles(self) -> LayerRoles:
        """The names of the owner, app and directory roles of this database."""
        # The migration URL names the real database; the runtime URL may name an alias
        # (a PgBouncer database entry).
        url = self.migration_url or self.url
        secret = None if url is None else url.get_secret_value()
        if not self.role_prefix and secret is None:
            self.sqlalchemy_url()  # raises: no URL at all
        return _roles(secret, self.role_prefix, self.app_role)

    def for_migrations(self) -> DatabaseSettings:
        """These settings with ``DATABASE_MIGRATION_URL`` as the URL (the owner's side).

        Without a migration URL the runtime URL is used (:attr:`migration_falls_back`),
        and the CLI says so.
        """
        if self.migration_url is None:
            return self
        return self.model_copy(update={"url": self.migration_url, "migration_url": None})

    @property
    def migration_falls_back(self) -> bool:
        """Whether owner's work (migrations, logins, purges) would use ``DATABASE_URL``."""
        return self.migration_url is None

    def sqlalchemy_url(self) -> URL:
        """The URL to connect with, password included; never log it."""
        if self.url is None:
            raise ValueError(
                "DATABASE_URL is not set; export DATABASE_URL=postgresql://user:password@host/db "
                "or write it into .env"
            )
        return make_url(self.url.get_secret_value())

    @property
    def client_timeout(self) -> float | None:
        """Seconds the client waits for any one answer of the server, or ``None`` (no bound).

        A little above the statement timeout, so the server's own cancellation
        normally arrives first; a proxy or network that stops answering is
        given up on after this. No statement timeout means no client bound.
        """
        if self.statement_timeout_ms == 0:
            return None
        return self.statement_timeout_ms / 1000 + CLIENT_TIMEOUT_MARGIN

    @property
    def masked_url(self) -> str | None:
        """The URL with its password and other secrets replaced by ``***``; safe to print."""
        if self.url is None:
            return None
        return mask_url(make_url(self.url.get_secret_value()))

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name == "url":
                yield name, self.masked_url
            elif name == "migration_url":
                yield name, None if value is None else mask_url(make_url(value.get_secret_value()))
            else:
                yield name, value
