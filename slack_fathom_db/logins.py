"""Runtime logins: ``sfdb create-login`` makes the ``LOGIN NOINHERIT`` login the app runs as.

It holds no privilege of its own and is a member of the app and directory
roles only (:mod:`slack_fathom_db.roles`). ``create_login`` takes over an
existing role only if it is already such a login (it logs in, is a member of
nothing else, owns nothing on the cluster): otherwise a known password would
hand out whatever it holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Final

import asyncpg

from slack_fathom_db.connections import DRIVER_ERRORS
from slack_fathom_db.errors import ConfigurationError, ValidationError, translate
from slack_fathom_db.roles import ROLE_NAME

if TYPE_CHECKING:
    from slack_fathom_db.roles import LayerRoles
    from slack_fathom_db.settings import DatabaseSettings

__all__ = ["create_login", "scram_verifier"]

_SCRAM_ITERATIONS: Final = 4096


def scram_verifier(password: str) -> str:
    """A SCRAM-SHA-256 verifier of ``password``, as PostgreSQL stores it.

    Sent instead of the password in ``CREATE/ALTER ROLE … PASSWORD``, so the
    password itself never reaches the server's logs or statistics. Only ASCII
    passwords are taken: PostgreSQL and its clients normalise any other
    password (SASLprep, RFC 4013) before hashing it, and leave ASCII as it is.
    """
    if not password.isascii():
        # Never echo the password: the message names the rule only.
        raise ValidationError(
            "password: must be ASCII (PostgreSQL normalises other characters before "
            "hashing, so the login could never sign in); choose an ASCII password"
        )
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, _SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${_SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def create_login(settings: DatabaseSettings, name: str, password: str) -> bool:
    """Create the runtime login ``name``, or set its password again; ``True`` if created.

    Runs with the owner's side of ``settings`` (``DATABASE_MIGRATION_URL``),
    as a login that may create roles. The login is ``LOGIN NOINHERIT`` and
    nothing else: a member of the app and directory roles, with ``CONNECT`` on
    this database. An existing role is taken over (new password, its own
    defaults reset) only if it is such a login already; one that cannot log
    in (a group role), holds a power (superuser, ``BYPASSRLS``, ``CREATEROLE``,
    ``CREATEDB``), is a member of another role, owns anything on the cluster,
    has members or holds privileges beyond ``CONNECT`` here is refused with a
    :class:`ConfigurationError`, and nothing is changed. The password reaches
    the server as a SCRAM verifier, never in clear, and no error repeats it.
    """
    if not ROLE_NAME.fullmatch(name):
        raise ValidationError("login: must be a lower-case identifier ([a-z_][a-z0-9_]*)")
    if not isinstance(password, str) or not password or "\x00" in password:
        raise ValidationError("password: must be a non-empty string without NUL characters")
    roles = settings.roles
    if name in (roles.owner, roles.app, roles.directory):
        raise ValidationError("login: must not be one of the layer's own roles")
    verifier = scram_verifier(password)  # refuses a password the server would normalise
    owner_side = settings.for_migrations()
    url = owner_side.sqlalchemy_url().set(drivername="postgresql")
    try:
        conn = await asyncpg.connect(
            url.render_as_string(hide_password=False),
            timeout=settings.connect_timeout,
            statement_cache_size=0,
        )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="create login") from exc
    try:
        return await _create_login(conn, name, verifier, roles)
    except DRIVER_ERRORS as exc:
        raise translate(exc, action="create login") from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)


_EXISTING: Final = """
SELECT r.rolcanlogin AS login,
       r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb AS powerful,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = r.oid AND g.rolname <> ALL($2::text[])
             ORDER BY g.rolname) AS member_of,
       ARRAY(SELECT CASE WHEN s.dbid = 0 THEN pg_describe_object(s.classid, s.objid, 0)
                         ELSE 'objects in database ' || d.datname END
             FROM pg_shdepend s LEFT JOIN pg_database d ON d.oid = s.dbid
             WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid
               AND s.deptype = 'o'
             UNION SELECT 'database ' || datname FROM pg_database WHERE datdba = r.oid
             ORDER BY 1) AS owns,
       ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.member
             WHERE m.roleid = r.oid AND g.rolname <> current_user
             ORDER BY g.rolname) AS members,
       ARRAY(SELECT DISTINCT CASE WHEN s.dbid = 0 THEN pg_describe_object(s.classid, s.objid, 0)
                                  ELSE 'objects in database ' || d.datname END
             FROM pg_shdepend s LEFT JOIN pg_database d ON d.oid = s.dbid
             WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = r.oid
               AND s.deptype IN ('a', 'r')
               AND NOT (s.classid = 'pg_database'::regclass
                        AND s.objid = (SELECT oid FROM pg_database
                                       WHERE datname = current_database()))
             ORDER BY 1) AS named_in
FROM pg_roles r WHERE r.rolname = $1
"""
"""What makes an existing role unfit to be the runtime login. ``pg_shdepend`` is
shared by every database of the cluster: it records what the role owns in each
(``deptype 'o'``), the databases and tablespaces it owns, and the privileges
granted to it and policies naming it (``'a'``, ``'r'``); ``CONNECT`` on this
database is the one such grant a runtime login has. A role with members would
pass the app and directory roles on to them (the login running this is left out:
PostgreSQL 16 makes the creator of a role a member of it, with ADMIN OPTION)."""


async def _create_login(
    conn: asyncpg.Connection, name: str, verifier: str, roles: LayerRoles
) -> bool:
    existing = await conn.fetchrow(_EXISTING, name, [roles.app, roles.directory])
    if existing is not None:
        _refuse_unfit(name, existing)
    database = await conn.fetchval("SELECT current_database()")
    quoted = '"' + str(database).replace('"', '""') + '"'
    async with conn.transaction():
        if existing is None:
            await conn.execute(
                f'CREATE ROLE "{name}" LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE '
                f"NOBYPASSRLS PASSWORD '{verifier}'"
            )
        else:  # checked above to hold none of those (only a superuser may restate them)
            await conn.execute(f"ALTER ROLE \"{name}\" LOGIN NOINHERIT PASSWORD '{verifier}'")
            # Any role may give itself defaults (search_path, timeouts, …): drop them.
            await conn.execute(f'ALTER ROLE "{name}" RESET ALL')
            await conn.execute(f'ALTER ROLE "{name}" IN DATABASE {quoted} RESET ALL')
        await conn.execute(f'GRANT "{roles.app}", "{roles.directory}" TO "{name}"')
        await conn.execute(f'GRANT CONNECT ON DATABASE {quoted} TO "{name}"')
    return existing is None


def _refuse_unfit(name: str, existing: asyncpg.Record) -> None:
    """Raise unless the existing role ``name`` is a runtime login already (see ``_EXISTING``)."""
    problem = ""
    if existing["powerful"]:
        problem = "is a superuser, bypasses row-level security or may create roles or databases"
    elif not existing["login"]:
        problem = "cannot log in (a group role)"
    elif existing["member_of"]:
        problem = f"is a member of other roles ({', '.join(existing['member_of'])})"
    elif existing["owns"]:
        problem = f"owns {', '.join(existing['owns'])}"
    elif existing["members"]:
        problem = f"has members ({', '.join(existing['members'])})"
    elif existing["named_in"]:
        problem = f"holds privileges on {', '.join(existing['named_in'])}"
    if problem:
        raise ConfigurationError(
            f"create login: role {name} exists and {problem}; choose another name"
        )
