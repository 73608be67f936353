"""The layer's roles, named after their database (runtime logins: :mod:`slack_fathom_db.logins`).

Three kinds, as PostgREST has them:

* the **owner** (``<prefix>_owner``, NOLOGIN) owns every table and function;
  migrations run as it (``SET ROLE``) with the credentials of
  ``DATABASE_MIGRATION_URL``;
* the **app role** (``<prefix>_app``) runs every unit of work under row-level
  security, and the **directory role** (``<prefix>_directory``) resolves and
  installs workspaces and charges rate limits; both hold exactly the grants
  they use, column by column where it matters;
* the **runtime login** (``sfdb create-login``), ``LOGIN NOINHERIT``, holds no
  privilege of its own and is a member of the app and directory roles only.
  ``create-login`` takes over an existing role only if it is already such a
  login (it logs in, is a member of nothing else, owns nothing on the
  cluster): otherwise a known password would hand out whatever it holds.

The prefix is the database's name (``DATABASE_ROLE_PREFIX`` overrides it), so
the roles of another database on the same cluster grant nothing here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ROLE_NAME", "LayerRoles", "migration_roles", "role_prefix"]

ROLE_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
"""A role name the layer renders into SQL: a lower-case identifier, never quoted input."""
_PREFIX_LENGTH: Final = 48  # room for "_directory" within PostgreSQL's 63 characters


@dataclass(frozen=True, slots=True)
class LayerRoles:
    """The names of the owner, app and directory roles of one database."""

    owner: str
    app: str
    directory: str

    @classmethod
    def for_prefix(cls, prefix: str, *, app: str | None = None) -> LayerRoles:
        """``<prefix>_owner``, ``<prefix>_app`` (or ``app``) and ``<prefix>_directory``."""
        roles = cls(
            owner=f"{prefix}_owner", app=app or f"{prefix}_app", directory=f"{prefix}_directory"
        )
        for name in (roles.owner, roles.app, roles.directory):
            if not ROLE_NAME.fullmatch(name):
                raise ValueError(f"role name {name!r} is not a lower-case identifier")
        return roles


def migration_roles(attributes: Mapping[str, object]) -> LayerRoles:
    """The roles the migration environment (``migrations/env.py``) was given."""
    roles = attributes.get("roles")
    if not isinstance(roles, LayerRoles):
        raise TypeError("the migration environment did not name the layer's roles")
    return roles


def role_prefix(database: str) -> str:
    """The roles' prefix for ``database``: its name when that is a plain identifier.

    Any other name is folded to one (lower case, ``_`` for other characters)
    and given a short hash of the original, so two databases never share roles.
    """
    folded = re.sub(r"[^a-z0-9_]", "_", database.lower())
    if not folded or not (folded[0].isalpha() or folded[0] == "_"):
        folded = f"db_{folded}"
    if folded == database and len(folded) <= _PREFIX_LENGTH:
        return folded
    digest = hashlib.sha256(database.encode("utf-8")).hexdigest()[:8]
    return f"{folded[: _PREFIX_LENGTH - 9]}_{digest}"
