"""Moving one workspace between databases: ``sfdb tenant export`` and ``sfdb tenant import``.

An export is a directory: one JSON Lines file per table — ``tenants.jsonl``
(the workspace's row), then one for each of
:data:`~slack_fathom_db.models.TENANT_OWNED_TABLES`, in that order (a table
after those it references) — and ``manifest.json``, written last (a directory
without it is an export that did not finish).

Invariants:

* **One snapshot.** :func:`export_tenant` reads every table in one
  ``REPEATABLE READ READ ONLY`` transaction, so the files agree with each other
  whatever is written meanwhile. A large table keyed by ``id`` is read in two
  halves at once, the upper one by a second connection in the same snapshot
  (``pg_export_snapshot()``; not on Citus) and appended after the lower one:
  the same file, rendered on two cores.
* **One line per row, rendered by PostgreSQL.** Each line is the row's
  ``row_to_json()`` text (keys in the table's column order, which the schema
  revision fixes; ``to_jsonb()`` would sort them at half the speed), with the
  transaction's time zone, bytea output and float digits pinned, so no session
  setting changes a byte. Rows are streamed by ``COPY`` and written and
  hashed as they arrive: memory stays the same however large the workspace.
  Rows come in key order (text keys in byte order); audit events in their
  chain's order, each line with the event's place (``chain_seq``) and
  ``row_hash`` (hex), so a recipient can check the chain.
* **Deterministic.** The manifest holds no time: the format version, the schema
  revision (the database's Alembic revision), the tenant id, the Slack team id,
  and per table the file, its row count and its SHA-256. Exporting a workspace
  that was imported gives byte-identical files.
* **For its user only.** A directory the export makes is ``0o700``, every file
  it writes ``0o600``: the files hold everything of the workspace but its
  plaintext secrets.
* **Verified before anything is written.** :func:`import_tenant` checks the
  manifest and every file (row count and SHA-256) before it connects, refuses a
  database at another schema revision (:class:`SchemaMismatch`) or one that
  knows the tenant id or the Slack team id already (:class:`Conflict`), and
  writes everything in one transaction: all of it commits, or nothing. Every
  row must belong to the manifest's workspace, and each file is hashed again
  as it is read (a file changed after the check rolls everything back).
* **A malformed export is an** :class:`ArchiveInvalid` **naming its file**
  (and the line, or the batch's lines, where the database refused a value),
  never a value of it, and nothing is written. Only regular files of the
  directory are read: not through a symbolic link, never a FIFO or a device.
  No line longer than :data:`MAX_LINE_BYTES` is held: memory stays bounded
  whatever the files hold.
* **The audit chain carries over.** Events are inserted in chain order, with
  the chain's trigger (``audit_logs_chain``) immediate, and every place and hash
  the database computes must equal the exported ones, else
  :class:`ArchiveInvalid` and nothing is written: an event edited (or cut out,
  or moved) without the chain recomputed is refused, and the chain verifies on
  the target. (On Citus, where the trigger runs on a worker as it commits, the
  places and hashes it will compute are computed beforehand, with the schema's
  canonical form.) An event without a place in the source (a broken chain) is
  refused, not chained anew.
* **An export is not authenticated.** Its SHA-256s and its chain's hashes show
  damage, not forgery: the canonical form is public (``sfdb_audit_content()``),
  so whoever can write the files can edit events and recompute the chain and
  the manifest, or drop the newest events, and the import verifies. Against
  that, :func:`import_tenant` takes heads kept of the source (``sfdb audit
  verify`` there, kept where the export's carrier cannot write; ``kept``,
  ``--kept FILE``): the export's chain must hold each of its workspace's, at its
  place with its hash. It returns the imported chain's head, to keep of the
  target.
* **Secrets stay sealed.** Slack tokens are exported as the ciphertexts they
  are, bound to the workspace and the row: the target needs the same
  ``DATABASE_TOKEN_KEYS`` to use them. Nothing is decrypted, logged or printed.

Both run on the owner's side (``DATABASE_MIGRATION_URL``), under row-level
security: ``SET LOCAL sfdb.lifecycle_tenant`` admits the one workspace's rows of
the tables of migration 0010, ``owner_maintains`` (0007) the installation
tables, ``audit_verifier`` (0009) and ``owner_records`` (0007) the audit log;
the owner owns ``tenants``. An audit row the owner inserts keeps its id,
creation time, salt and digest (the insert trigger of migration 0009).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, TypeAlias

import asyncpg
from sqlalchemy import String

from slack_fathom_db import validation
from slack_fathom_db.audit_chain import GENESIS
from slack_fathom_db.connections import DRIVER_ERRORS, SEARCH_PATH
from slack_fathom_db.errors import (
    ArchiveInvalid,
    Conflict,
    SchemaMismatch,
    TenantNotFound,
    ValidationError,
    translate,
)
from slack_fathom_db.maintenance import (
    has_citus,
    lifecycle_scope,
    owner_connection,
    rows_affected,
)
from slack_fathom_db.models import TENANT_OWNED_TABLES, Base

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator, Sequence

    from slack_fathom_db.audit_chain import KeptHead
    from slack_fathom_db.settings import DatabaseSettings

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "MAX_LINE_BYTES",
    "TABLES",
    "ExportManifest",
    "ImportedWorkspace",
    "ProgressCallback",
    "TableFile",
    "export_tenant",
    "import_tenant",
    "read_manifest",
]

FORMAT_VERSION: Final = 1
"""The layout of an export this module writes and reads."""
MANIFEST_FILE: Final = "manifest.json"
TABLES: Final = ("tenants", *TENANT_OWNED_TABLES)
"""The tables of an export, in the order they are written and restored."""
MAX_LINE_BYTES: Final = 64 << 20
"""The longest line (its newline included) an import reads, and the largest
``tenants.jsonl``: a longer one is refused (:class:`ArchiveInvalid`) before it is held
whole, so an import's memory stays bounded whatever the files hold (a batch is held a few
times over: as read, decoded, joined and sent). A row whose JSON is longer cannot be
imported."""

ProgressCallback: TypeAlias = Callable[[str, int, int], None]
"""Called as rows pass, with the table, its rows done so far and its total rows."""

_EXPORT: Final = "export tenant"
_IMPORT: Final = "import tenant"
_READ_CHUNK: Final = 1 << 20
_MANIFEST_MAX: Final = 1 << 20
_BATCH_ROWS: Final = 2_000
_BATCH_BYTES: Final = 8 << 20
_REPORT_EVERY: Final = 5_000
_SPLIT_ROWS: Final = 100_000
"""A table of this many rows or more is read in two halves at once."""
_NOT_SPLIT: Final = ("tenants", "audit_logs")
"""Tables whose lines are not in ``id`` order (one row; the chain's order)."""
_SNAPSHOT_SHAPE: Final = re.compile(r"[0-9A-F]+-[0-9A-F]+-[0-9]+")
# COPY's csv format with a delimiter and a quote that JSON text never holds raw (PostgreSQL
# escapes every control character in it): each line is the JSON text, byte for byte.
_DELIMITER: Final = "\x1f"
_QUOTE: Final = "\x1e"
_REVISION_SHAPE: Final = re.compile(r"[0-9A-Za-z_]{1,64}")
_SHA256_SHAPE: Final = re.compile(r"[0-9a-f]{64}")

_TENANT_OF: Final = "SELECT id FROM public.tenants WHERE slack_team_id = $1"
_REVISION: Final = "SELECT version_num FROM public.alembic_version"
_TAKEN: Final = """
SELECT EXISTS (SELECT FROM public.tenants WHERE id = $1) AS id_taken,
       EXISTS (SELECT FROM public.tenants WHERE slack_team_id = $2) AS team_taken,
       EXISTS (SELECT FROM public.audit_chain_heads WHERE tenant_id = $1) AS chain_taken
"""
# Each event with its place and hash; events without a place (a broken chain) last.
_AUDIT_LINES: Final = """
SELECT row_to_json(e)::text FROM (
    SELECT a.*, c.chain_seq, encode(c.row_hash, 'hex') AS row_hash
    FROM public.audit_logs AS a
    LEFT JOIN public.audit_chain AS c ON c.tenant_id = a.tenant_id AND c.event_id = a.id
    WHERE a.tenant_id = {tenant}
) AS e
ORDER BY e.chain_seq NULLS LAST, e.created_at, e.id
"""
# An event (a) whose personal fields no longer match its digest, computed by the schema's own
# function (as its insert trigger does), or whose salt was erased with something left.
_PERSONAL_BROKEN: Final = """
    CASE WHEN a.personal_salt IS NOT NULL
        THEN a.personal_digest IS DISTINCT FROM public.sfdb_audit_personal(
            a.personal_salt, a.user_id, a.ip_address, a.user_agent, a.action_description,
            a.metadata)
        ELSE NOT (a.user_id IS NULL AND a.ip_address IS NULL AND a.user_agent IS NULL
                  AND a.action_description = '' AND a.metadata = '{}'::jsonb)
    END
"""
# Events of a batch that do not hold the place and hash the export gives them, after the
# trigger gave them theirs (SET CONSTRAINTS … IMMEDIATE), or whose personal fields broke.
_PLACES_HELD: Final = f"""
SELECT count(*) FILTER (WHERE c.chain_seq IS NULL OR {_PERSONAL_BROKEN} IS NOT FALSE)
FROM json_to_recordset($1::json) AS e(id uuid, chain_seq bigint, row_hash text)
LEFT JOIN public.audit_logs AS a ON a.tenant_id = $2 AND a.id = e.id
LEFT JOIN public.audit_chain AS c
  ON c.tenant_id = $2 AND c.chain_seq = e.chain_seq AND c.event_id = e.id
 AND c.row_hash = decode(e.row_hash, 'hex')
"""  # noqa: S608 - made of this module's constants
# The same, computed as the trigger will at commit: the next places after $4, each hash over
# the one before ($3 before the batch) and the event as stored.
_CHAIN_RECOMPUTED: Final = f"""
SELECT count(*) FROM (
    SELECT e.ord, e.chain_seq, decode(e.row_hash, 'hex') AS expected,
           coalesce(lag(decode(e.row_hash, 'hex')) OVER (ORDER BY e.ord), $3::bytea) AS previous,
           a.id, a.tenant_id, a.event_type, a.event_category, a.status, a.resource_type,
           a.resource_id, a.created_at, a.personal_digest, {_PERSONAL_BROKEN} AS personal_broken
    FROM ROWS FROM (json_to_recordset($1::json) AS (id uuid, chain_seq bigint, row_hash text))
         WITH ORDINALITY AS e (id, chain_seq, row_hash, ord)
    LEFT JOIN public.audit_logs AS a ON a.tenant_id = $2 AND a.id = e.id
) AS placed
WHERE chain_seq IS DISTINCT FROM $4::bigint + ord
   OR personal_broken IS NOT FALSE
   OR expected IS DISTINCT FROM sha256(previous || public.sfdb_audit_content(
        id, tenant_id, chain_seq, event_type, event_category, status, resource_type,
        resource_id, created_at, personal_digest))
"""  # noqa: S608 - made of this module's constants
_HEAD: Final = "SELECT chain_seq FROM public.audit_chain_heads WHERE tenant_id = $1"


def _session(tenant: uuid.UUID) -> str:
    """The transaction's settings, one message of ``SET LOCAL`` s and nothing else (Citus
    passes such a message on to its workers; ``set_config()`` it does not)."""
    return "; ".join(
        (
            lifecycle_scope(tenant),
            f"SET LOCAL search_path = {SEARCH_PATH}",
            "SET LOCAL row_security = on",
            "SET LOCAL TimeZone = 'UTC'",
            "SET LOCAL DateStyle = 'ISO, YMD'",
            "SET LOCAL IntervalStyle = 'postgres'",
            "SET LOCAL bytea_output = 'hex'",
            "SET LOCAL extra_float_digits = 1",
            "SET LOCAL statement_timeout = 0",
        )
    )


@dataclass(frozen=True, slots=True)
class TableFile:
    """One table's file in an export: its name, its rows and its SHA-256 (hex)."""

    table: str
    file: str
    rows: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ExportManifest:
    """What an export holds (``manifest.json``): no time, so the same rows give the same
    bytes."""

    format_version: int
    schema_revision: str
    tenant_id: uuid.UUID
    slack_team_id: str
    tables: tuple[TableFile, ...]

    @property
    def rows(self) -> int:
        """Rows of every table together."""
        return sum(entry.rows for entry in self.tables)

    def to_json(self) -> str:
        """The manifest's text: fixed key order, two-space indent, a final newline."""
        document = {
            "format_version": self.format_version,
            "schema_revision": self.schema_revision,
            "tenant_id": str(self.tenant_id),
            "slack_team_id": self.slack_team_id,
            "tables": [
                {"table": e.table, "file": e.file, "rows": e.rows, "sha256": e.sha256}
                for e in self.tables
            ],
        }
        return json.dumps(document, indent=2, ensure_ascii=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ExportManifest:
        """Parse and check a manifest; :class:`ArchiveInvalid` says what is wrong."""
        try:
            document = json.loads(text)
        except ValueError:
            raise ArchiveInvalid(f"{MANIFEST_FILE} is not JSON") from None
        keys = ("format_version", "schema_revision", "tenant_id", "slack_team_id", "tables")
        if not isinstance(document, dict) or sorted(document) != sorted(keys):
            raise ArchiveInvalid(f"{MANIFEST_FILE} must hold exactly {', '.join(keys)}")
        if document["format_version"] != FORMAT_VERSION:
            raise ArchiveInvalid(
                f"{MANIFEST_FILE}: format_version {document['format_version']!r} is not "
                f"{FORMAT_VERSION}, the one this version reads"
            )
        revision = document["schema_revision"]
        if not isinstance(revision, str) or not _REVISION_SHAPE.fullmatch(revision):
            raise ArchiveInvalid(f"{MANIFEST_FILE}: schema_revision is not a revision id")
        try:
            tenant = validation.uuid_value(document["tenant_id"], field="tenant_id")
            team = validation.slack_team_id(document["slack_team_id"])
        except ValidationError as exc:
            raise ArchiveInvalid(f"{MANIFEST_FILE}: {exc}") from None
        entries = document["tables"]
        if not isinstance(entries, list) or len(entries) != len(TABLES):
            raise ArchiveInvalid(f"{MANIFEST_FILE}: tables must list {', '.join(TABLES)}")
        tables = tuple(
            _table_file(entry, table) for entry, table in zip(entries, TABLES, strict=True)
        )
        if tables[0].rows != 1:
            raise ArchiveInvalid(f"{MANIFEST_FILE}: tenants must hold exactly one row")
        return cls(FORMAT_VERSION, revision, tenant, team, tables)


@dataclass(frozen=True, slots=True)
class ImportedWorkspace:
    """What :func:`import_tenant` restored: the export's manifest, and where the
    workspace's audit chain ends in this database."""

    manifest: ExportManifest
    audit_head: tuple[int, bytes] | None
    """``(chain_seq, row_hash)`` of the imported chain's newest event (``None``: it has
    none), as ``sfdb audit verify`` reports a head: what a head kept of the source is held
    to, and the head to keep of the target from now on."""


def _table_file(entry: object, table: str) -> TableFile:
    if (
        not isinstance(entry, dict)
        or sorted(entry) != ["file", "rows", "sha256", "table"]
        or entry["table"] != table
        or entry["file"] != f"{table}.jsonl"
        or type(entry["rows"]) is not int
        or entry["rows"] < 0
        or not isinstance(entry["sha256"], str)
        or not _SHA256_SHAPE.fullmatch(entry["sha256"])
    ):
        raise ArchiveInvalid(
            f"{MANIFEST_FILE}: the entry for {table} must be "
            f'{{"table": "{table}", "file": "{table}.jsonl", "rows": N, "sha256": HEX}}'
        )
    return TableFile(table, entry["file"], entry["rows"], entry["sha256"])


def read_manifest(in_dir: str | os.PathLike[str]) -> ExportManifest:
    """The manifest of the export in ``in_dir``, checked (not yet its files)."""
    path = Path(in_dir) / MANIFEST_FILE
    try:
        with _open_regular(path) as file:
            data = file.read(_MANIFEST_MAX + 1)
    except FileNotFoundError:
        raise ArchiveInvalid(f"{in_dir} holds no {MANIFEST_FILE}: not a finished export") from None
    except OSError as exc:
        raise ArchiveInvalid(f"{path} cannot be read: {exc}") from None
    if len(data) > _MANIFEST_MAX:
        raise ArchiveInvalid(f"{path} is longer than {_MANIFEST_MAX} bytes: not a manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveInvalid(f"{path} is not UTF-8") from None
    return ExportManifest.from_json(text)


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file itself: not through a symbolic
    link (``O_NOFOLLOW``), and never waiting on a FIFO or a device (``O_NONBLOCK``, then
    ``fstat``); :class:`ArchiveInvalid` otherwise. An export holds regular files only, and
    an import reads nothing from outside its directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArchiveInvalid(
                f"{_IMPORT}: {path.name} is a symbolic link (an export holds regular files "
                "only); nothing written"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArchiveInvalid(f"{_IMPORT}: {path.name} is not a regular file; nothing written")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _create(path: Path) -> BinaryIO:
    """A new file at ``path`` (never an existing one, nor through a link), readable and
    writable by this user only: an export holds everything of a workspace but its
    plaintext secrets."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


# -- export -----------------------------------------------------------------------------


async def export_tenant(
    settings: DatabaseSettings,
    slack_team_id: str,
    out_dir: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> ExportManifest:
    """Write every row of the workspace ``slack_team_id`` to ``out_dir`` (new or empty) as
    JSON Lines, one file per table, and its manifest; return the manifest."""
    team = validation.slack_team_id(slack_team_id)
    out = Path(out_dir)
    created = _claim_directory(out)
    written: list[Path] = []
    try:
        conn = await owner_connection(settings, action=_EXPORT, long_reads=True)
        try:
            tenant = await conn.fetchval(_TENANT_OF, team)
            if tenant is None:
                raise TenantNotFound(f"{_EXPORT}: no workspace {team} in this database")
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute(_session(tenant))
                if await conn.fetchval(_TENANT_OF, team) != tenant:
                    raise TenantNotFound(f"{_EXPORT}: workspace {team} was removed meanwhile")
                revision = await conn.fetchval(_REVISION)
                async with _SecondReader(settings, conn, tenant) as second:
                    files = []
                    for table in TABLES:
                        path = out / f"{table}.jsonl"
                        written += [path, _part_of(path)]
                        files.append(
                            await _export_table(
                                conn, table, tenant, path, progress=progress, second=second
                            )
                        )
        except DRIVER_ERRORS as exc:
            raise translate(exc, action=_EXPORT) from exc
        finally:
            await conn.close(timeout=settings.connect_timeout)
        manifest = ExportManifest(FORMAT_VERSION, str(revision), tenant, team, tuple(files))
        _write_manifest(out, manifest, written)
    except BaseException:
        _remove(out, written, directory=created)
        raise
    return manifest


def _write_manifest(out: Path, manifest: ExportManifest, written: list[Path]) -> None:
    """Written whole under another name, then renamed: last, so a directory without it is
    an export that did not finish."""
    draft = out / f".{MANIFEST_FILE}.partial"
    written.append(draft)
    with _create(draft) as file:
        file.write(manifest.to_json().encode("utf-8"))
    draft.replace(out / MANIFEST_FILE)


def _remove(out: Path, written: list[Path], *, directory: bool) -> None:
    """Undo a failed export: its files, and ``out`` itself if the export made it."""
    for path in written:
        path.unlink(missing_ok=True)
    if directory:
        with contextlib.suppress(OSError):
            out.rmdir()


def _claim_directory(out: Path) -> bool:
    """Make ``out`` (``0o700``: for this user only), or accept it empty; ``True`` if it was
    made here."""
    try:
        out.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not out.is_dir():
            raise ValidationError(f"{_EXPORT}: {out} exists and is not a directory") from None
        if any(out.iterdir()):
            raise ValidationError(
                f"{_EXPORT}: {out} is not empty (an export goes to a new or empty directory)"
            ) from None
        return False
    return True


def _lines_of(table: str, tenant: uuid.UUID) -> str:
    """The query whose rows are ``table``'s lines of the export, in their order."""
    literal = f"'{validation.canonical_uuid(tenant)}'::uuid"
    if table == "tenants":
        return f"SELECT row_to_json(t)::text FROM public.tenants AS t WHERE t.id = {literal}"  # noqa: S608
    if table == "audit_logs":
        return _AUDIT_LINES.format(tenant=literal)
    return _lines_where(table, f"t.tenant_id = {literal}")


def _lines_where(table: str, condition: str) -> str:
    """The lines of ``table``'s rows that meet ``condition``, in key order."""
    return (
        f"SELECT row_to_json(t)::text FROM public.{table} AS t "  # noqa: S608 - fixed names
        f"WHERE {condition} ORDER BY {_key_order(table)}"
    )


def _key_order(table: str) -> str:
    """The table's primary key after ``tenant_id``, text in byte order (no locale's)."""
    columns = [c for c in Base.metadata.tables[table].primary_key.columns if c.name != "tenant_id"]
    return ", ".join(
        f't.{c.name} COLLATE "C"' if isinstance(c.type, String) else f"t.{c.name}" for c in columns
    )


class _SecondReader:
    """A second connection in the export's snapshot (``pg_export_snapshot()``), opened when
    a table is large enough to be read in two halves at once: PostgreSQL renders a row on
    one core per backend. Not on Citus, whose workers do not share the coordinator's
    snapshot."""

    def __init__(self, settings: DatabaseSettings, conn: asyncpg.Connection, tenant: uuid.UUID):
        self._settings, self._conn, self._tenant = settings, conn, tenant
        self._second: asyncpg.Connection | None = None
        self._stack = contextlib.AsyncExitStack()
        self._usable: bool | None = None

    async def __aenter__(self) -> _SecondReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def connection(self) -> asyncpg.Connection | None:
        """The second connection, in the same snapshot; ``None`` where there can be none."""
        if self._usable is None:
            self._usable = not await has_citus(self._conn)
        if not self._usable or self._second is not None:
            return self._second
        snapshot = await self._conn.fetchval("SELECT pg_export_snapshot()")
        if not isinstance(snapshot, str) or not _SNAPSHOT_SHAPE.fullmatch(snapshot):
            self._usable = False
            return None
        second = await owner_connection(self._settings, action=_EXPORT, long_reads=True)
        self._stack.push_async_callback(second.close, timeout=self._settings.connect_timeout)
        await self._stack.enter_async_context(
            second.transaction(isolation="repeatable_read", readonly=True)
        )
        await second.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        await second.execute(_session(self._tenant))
        self._second = second
        return second


class _Sink:
    """Where COPY's chunks go: a file, a running SHA-256 and a count of lines."""

    def __init__(self, file: BinaryIO, counted: Callable[[int], None]) -> None:
        self.file, self.counted = file, counted
        self.digest = hashlib.sha256()
        self.rows = 0

    async def __call__(self, chunk: bytes) -> None:
        """Take one chunk of COPY's output."""
        self.take(chunk)

    def take(self, chunk: bytes) -> None:
        """Write, hash and count ``chunk``."""
        self.file.write(chunk)
        self.digest.update(chunk)
        lines = chunk.count(b"\n")
        self.rows += lines
        self.counted(lines)


def _part_of(path: Path) -> Path:
    """Where the second half of a table read in two goes until it is appended."""
    return path.with_name(f".{path.name}.part")


async def _export_table(
    conn: asyncpg.Connection,
    table: str,
    tenant: uuid.UUID,
    path: Path,
    *,
    progress: ProgressCallback | None,
    second: _SecondReader,
) -> TableFile:
    query = _lines_of(table, tenant)
    total = await conn.fetchval(f"SELECT count(*) FROM ({query}) AS lines")  # noqa: S608
    done = reported = 0

    def counted(lines: int) -> None:
        nonlocal done, reported
        done += lines
        if progress is not None and (done - reported >= _REPORT_EVERY or done == total):
            reported = done
            progress(table, done, total)

    if progress is not None:
        progress(table, 0, total)
    halves = await _halves(conn, table, tenant, total, second)
    with _create(path) as file:
        sink = _Sink(file, counted)
        if halves is None:
            await _copy(conn, query, sink)
        else:
            (lower, upper), other = halves
            part = _part_of(path)
            with _create(part) as spill:
                # The upper half goes to a file of its own, then after the lower half.
                await _both(_copy(conn, lower, sink), _copy(other, upper, _Sink(spill, counted)))
            with part.open("rb") as upper_half:
                while chunk := upper_half.read(_READ_CHUNK):
                    sink.take(chunk)
            part.unlink()
    return TableFile(table, path.name, sink.rows, sink.digest.hexdigest())


async def _halves(
    conn: asyncpg.Connection, table: str, tenant: uuid.UUID, total: int, second: _SecondReader
) -> tuple[tuple[str, str], asyncpg.Connection] | None:
    """The queries of the two halves of a large table keyed by ``id`` (lower, upper) and the
    connection that reads the upper one; ``None`` to read it whole."""
    if total < _SPLIT_ROWS or table in _NOT_SPLIT or _key_order(table) != "t.id":
        return None
    other = await second.connection()
    if other is None:
        return None
    literal = f"'{validation.canonical_uuid(tenant)}'::uuid"
    middle = await conn.fetchval(
        f"SELECT id FROM public.{table} WHERE tenant_id = {literal} "  # noqa: S608 - fixed names
        f"ORDER BY id OFFSET {total // 2} LIMIT 1"
    )
    if middle is None:
        return None
    split = f"'{validation.canonical_uuid(middle)}'::uuid"
    lower = f"t.tenant_id = {literal} AND t.id < {split}"
    upper = f"t.tenant_id = {literal} AND t.id >= {split}"
    return (_lines_where(table, lower), _lines_where(table, upper)), other


async def _both(first: Coroutine[Any, Any, None], second: Coroutine[Any, Any, None]) -> None:
    """Run both at once; if one fails, the other is cancelled before the error goes on."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _copy(conn: asyncpg.Connection, query: str, sink: _Sink) -> None:
    await conn.copy_from_query(query, output=sink, format="csv", delimiter=_DELIMITER, quote=_QUOTE)


# -- import -----------------------------------------------------------------------------


async def import_tenant(
    settings: DatabaseSettings,
    in_dir: str | os.PathLike[str],
    *,
    kept: Sequence[KeptHead] = (),
    progress: ProgressCallback | None = None,
) -> ImportedWorkspace:
    """Restore the workspace exported to ``in_dir`` into this database, whole or not at all;
    return its manifest and the head of its audit chain there.

    An export is not authenticated: its SHA-256s and its chain's hashes show damage, not
    forgery. ``kept`` are heads of the source's chains (``sfdb audit verify`` there, kept
    where the export's carrier cannot write); each of this workspace's must be in the
    export's chain, at its place with its hash, else :class:`ArchiveInvalid` and nothing
    is written (heads of other workspaces are passed over; kept heads none of which is
    this workspace's are a :class:`ValidationError`).
    """
    source = Path(in_dir)
    manifest = read_manifest(source)
    heads = _kept_of(manifest, kept)
    for entry in manifest.tables:
        _check_file(source, entry)
    _check_tenant_row(source, manifest)
    conn = await owner_connection(settings, action=_IMPORT, long_reads=True)
    try:
        async with conn.transaction():
            await conn.execute(_session(manifest.tenant_id))
            revision = await conn.fetchval(_REVISION)
            if revision != manifest.schema_revision:
                raise SchemaMismatch(
                    f"{_IMPORT}: the export is of schema revision {manifest.schema_revision}, "
                    f"this database is at {revision}: migrate to the same revision first"
                )
            await _refuse_taken(conn, manifest)
            citus = await has_citus(conn)
            chain = _Chain(conn, manifest.tenant_id, citus=citus, kept=heads)
            for entry in manifest.tables:
                await _import_table(
                    conn,
                    source,
                    entry,
                    manifest.tenant_id,
                    progress=progress,
                    citus=citus,
                    chain=chain if entry.table == "audit_logs" else None,
                )
    except DRIVER_ERRORS as exc:
        raise translate(exc, action=_IMPORT) from exc
    finally:
        await conn.close(timeout=settings.connect_timeout)
    return ImportedWorkspace(manifest, chain.newest)


def _kept_of(manifest: ExportManifest, kept: Sequence[KeptHead]) -> tuple[KeptHead, ...]:
    """The kept heads of the manifest's workspace."""
    mine = tuple(head for head in kept if head.slack_team_id == manifest.slack_team_id)
    if kept and not mine:
        raise ValidationError(
            f"{_IMPORT}: none of the {len(kept)} kept heads is of workspace "
            f"{manifest.slack_team_id}: nothing to hold the export's audit chain to"
        )
    return mine


def _check_file(source: Path, entry: TableFile) -> None:
    """The file holds what the manifest says: its rows (whole lines) and its SHA-256."""
    path = source / entry.file
    digest = hashlib.sha256()
    rows = 0
    last = b"\n"
    try:
        with _open_regular(path) as file:
            while chunk := file.read(_READ_CHUNK):
                digest.update(chunk)
                rows += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError as exc:
        raise ArchiveInvalid(f"{_IMPORT}: {entry.file} cannot be read: {exc}") from None
    if digest.hexdigest() != entry.sha256:
        raise ArchiveInvalid(f"{_IMPORT}: {entry.file} does not match its SHA-256 in the manifest")
    if rows != entry.rows or last != b"\n":
        raise ArchiveInvalid(
            f"{_IMPORT}: {entry.file} holds {rows} lines, the manifest says {entry.rows}"
        )


def _check_tenant_row(source: Path, manifest: ExportManifest) -> None:
    """``tenants.jsonl`` is the manifest's workspace: read whole, so its size first."""
    name = manifest.tables[0].file
    limit = MAX_LINE_BYTES
    try:
        with _open_regular(source / name) as file:
            if os.fstat(file.fileno()).st_size > limit:
                raise ArchiveInvalid(
                    f"{_IMPORT}: {name} is longer than {limit} bytes (MAX_LINE_BYTES), the "
                    "longest line an import reads; nothing written"
                )
            data = file.read(limit + 1)
    except OSError as exc:
        raise ArchiveInvalid(f"{_IMPORT}: {name} cannot be read: {exc}") from None
    if len(data) > limit:
        raise ArchiveInvalid(f"{_IMPORT}: {name} grew while it was read; nothing written")
    try:
        row = _json_object(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArchiveInvalid(f"{_IMPORT}: {name} is not UTF-8; nothing written") from None
    if (
        row is None
        or row.get("id") != str(manifest.tenant_id)
        or row.get("slack_team_id") != manifest.slack_team_id
    ):
        raise ArchiveInvalid(f"{_IMPORT}: {name} is not the workspace of the manifest")


def _json_object(text: str) -> dict[str, Any] | None:
    """``text`` as one JSON object, if it is one (as PostgreSQL reads JSON: no ``NaN``)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


async def _refuse_taken(conn: asyncpg.Connection, manifest: ExportManifest) -> None:
    taken = await conn.fetchrow(_TAKEN, manifest.tenant_id, manifest.slack_team_id)
    if taken is None:  # pragma: no cover - a SELECT of three values returns a row
        return
    if taken["id_taken"] or taken["chain_taken"]:
        raise Conflict(f"{_IMPORT}: tenant {manifest.tenant_id} exists in this database")
    if taken["team_taken"]:
        raise Conflict(
            f"{_IMPORT}: a workspace with slack_team_id {manifest.slack_team_id} exists in "
            "this database"
        )


def _owner_column(table: str) -> str:
    return "id" if table == "tenants" else "tenant_id"


def _insert(table: str) -> str:
    """A batch of a table's rows (a JSON array) inserted as they are, if they are the
    workspace's ($2)."""
    return (
        f"INSERT INTO public.{table} SELECT * FROM "  # noqa: S608 - fixed names
        f"json_populate_recordset(NULL::public.{table}, $1::json) AS r "
        f"WHERE r.{_owner_column(table)} = $2"
    )


def _foreign_rows(table: str) -> str:
    """How many rows of a batch (a JSON array) are not the workspace's ($2)."""
    owner = _owner_column(table)
    return (
        f"SELECT count(*) FROM json_to_recordset($1::json) AS r({owner} uuid) "  # noqa: S608
        f"WHERE r.{owner} IS DISTINCT FROM $2"
    )


def _insert_values(table: str, rows: int) -> str:
    """``rows`` rows, one JSON text each ($1 …), as a multi-row ``VALUES``: on Citus, whose
    ``INSERT … SELECT`` into a distributed table is a ``COPY``, which row-level security
    refuses; the coordinator evaluates each row and routes the batch to its shard."""
    values = ", ".join(
        f"((json_populate_record(NULL::public.{table}, ${n}::json)).*)" for n in range(1, rows + 1)
    )
    return f"INSERT INTO public.{table} VALUES {values}"  # noqa: S608 - fixed names


async def _import_table(
    conn: asyncpg.Connection,
    source: Path,
    entry: TableFile,
    tenant: uuid.UUID,
    *,
    progress: ProgressCallback | None,
    citus: bool,
    chain: _Chain | None,
) -> None:
    if chain is not None:
        await chain.start()
    insert = _insert(entry.table)
    digest = hashlib.sha256()
    rows = 0
    if progress is not None:
        progress(entry.table, 0, entry.rows)
    with _open_regular(source / entry.file) as file:
        for first, batch in _batches(file, digest, entry.file):
            document = "[" + ",".join(batch) + "]"
            try:
                if citus:
                    foreign = await conn.fetchval(_foreign_rows(entry.table), document, tenant)
                    if not foreign:
                        await conn.execute(_insert_values(entry.table, len(batch)), *batch)
                    inserted = 0 if foreign else len(batch)
                else:
                    status = await conn.execute(insert, document, tenant)
                    inserted = rows_affected(status)
                if inserted != len(batch):
                    raise _refusal(entry, tenant, batch, first)
                if chain is not None:
                    await chain.take(document, batch, first=first, file=entry.file)
            except asyncpg.PostgresError as exc:
                if not _refuses_the_archive(exc, entry.table):
                    raise
                raise _refusal(entry, tenant, batch, first, exc) from exc
            rows += len(batch)
            if progress is not None:
                progress(entry.table, rows, entry.rows)
    if rows != entry.rows or digest.hexdigest() != entry.sha256:
        raise ArchiveInvalid(
            f"{_IMPORT}: {entry.file} changed while it was imported; nothing written"
        )
    if chain is not None:
        await chain.finish(rows, file=entry.file)


def _refuses_the_archive(exc: asyncpg.PostgresError, table: str) -> bool:
    """The database refused a value of the export (a data exception, a violated
    constraint), not the transaction (a conflict with a workspace being installed under the
    same team id meanwhile, a lost connection, …)."""
    code = str(exc.sqlstate or "")
    return code[:2] in ("22", "23") and not (table == "tenants" and code in ("23505", "23P01"))


def _refusal(
    entry: TableFile,
    tenant: uuid.UUID,
    batch: list[str],
    first: int,
    exc: asyncpg.PostgresError | None = None,
) -> ArchiveInvalid:
    """Why a batch was refused (``exc``) or not inserted whole: the first line that is not
    one JSON object of the workspace, else the database's refusal (never a value) and the
    batch's lines."""
    owner = _owner_column(entry.table)
    for number, line in enumerate(batch, start=first):
        row = _json_object(line)
        if row is None:
            problem = "is not one JSON object"
        elif not _names(row.get(owner), tenant):
            problem = f"is a row of another workspace, or of none ({owner})"
        else:
            continue
        return ArchiveInvalid(f"{_IMPORT}: {entry.file} line {number} {problem}; nothing written")
    last = first + len(batch) - 1
    lines = f"{entry.file} line {first}" if last == first else f"{entry.file} lines {first}-{last}"
    if exc is None:
        return ArchiveInvalid(f"{_IMPORT}: {lines} hold rows of another workspace; nothing written")
    column = f" (column {exc.column_name})" if getattr(exc, "column_name", None) else ""
    return ArchiveInvalid(
        f"{translate(exc, action=f'{_IMPORT}: {lines}')}{column}; nothing written"
    )


def _names(value: object, tenant: uuid.UUID) -> bool:
    """``value`` is the text of ``tenant``'s id."""
    try:
        return isinstance(value, str) and uuid.UUID(value) == tenant
    except ValueError:
        return False


class _Chain:
    """The audit events of an import, batch by batch: each holds the place and hash the
    export gives it, the next after the batch before; and the export's chain holds every
    kept head of the workspace."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        tenant: uuid.UUID,
        *,
        citus: bool,
        kept: Sequence[KeptHead],
    ) -> None:
        self._conn, self._tenant, self._citus, self._kept = conn, tenant, citus, kept
        self._held: dict[int, bytes] = {}
        self.head: tuple[int, bytes] = (0, GENESIS)
        """The place and hash of the newest event checked so far (place 0: none yet)."""

    @property
    def newest(self) -> tuple[int, bytes] | None:
        """The place and hash of the newest event imported, if there is one."""
        return self.head if self.head[0] else None

    async def start(self) -> None:
        """Before the first event."""
        if not self._citus:
            # Each statement's events take their places as it ends, in the order inserted.
            # ALL: the chain's trigger fires as its clones on the partitions (in their own
            # schema, which the name in public does not reach); nothing else is deferred here.
            await self._conn.execute("SET CONSTRAINTS ALL IMMEDIATE")

    async def take(self, document: str, batch: list[str], *, first: int, file: str) -> None:
        """Check a batch of events, inserted; ``first`` is the number of its first line,
        which is its place once checked."""
        if not self.head[0] and (start := _place_of(batch[0], file=file)[0]) != 1:
            # A chain whose oldest months retention dropped (sfdb audit retain) starts
            # later, and the target's trigger would chain its events from place 1.
            raise ArchiveInvalid(
                f"{_IMPORT}: {file}: the export's audit chain starts at place {start}, not 1 "
                "(its older months were dropped by retention): such a chain cannot be "
                "imported; nothing written"
            )
        await _check_places(
            self._conn, document, self._tenant, before=self.head, citus=self._citus, file=file
        )
        for head in self._kept:
            if first <= head.chain_seq < first + len(batch):
                place, digest = _place_of(batch[head.chain_seq - first], file=file)
                if place == head.chain_seq:
                    self._held[place] = digest
        self.head = _place_of(batch[-1], file=file)

    async def finish(self, events: int, *, file: str) -> None:
        """After the last event: the chain ends at the last place, and holds the kept
        heads."""
        if not self._citus:
            head = await self._conn.fetchval(_HEAD, self._tenant)
            if (head or 0) != events:
                raise ArchiveInvalid(
                    f"{_IMPORT}: the audit chain ends at place {head or 0}, not {events}; "
                    "nothing written"
                )
        for kept in self._kept:
            held = self._held.get(kept.chain_seq)
            if held is None:
                raise ArchiveInvalid(
                    f"{_IMPORT}: {file}: the export's audit chain ends at place {events}, "
                    f"before the head kept at place {kept.chain_seq}: events were cut from "
                    "it; nothing written"
                )
            if held != kept.row_hash:
                raise ArchiveInvalid(
                    f"{_IMPORT}: {file}: place {kept.chain_seq} of the export's audit chain "
                    "does not have the hash kept for it: the chain was rewritten there or "
                    "before; nothing written"
                )


async def _check_places(
    conn: asyncpg.Connection,
    document: str,
    tenant: uuid.UUID,
    *,
    before: tuple[int, bytes],
    citus: bool,
    file: str,
) -> None:
    """The batch's events hold the places and hashes the export gives them, the next after
    ``before`` (the place and hash of the event before the batch)."""
    if citus:
        # The chain's trigger runs on the worker as it commits (SET CONSTRAINTS is not passed
        # on): compute what it will compute, with the schema's own canonical form.
        wrong = await conn.fetchval(_CHAIN_RECOMPUTED, document, tenant, before[1], before[0])
    else:
        wrong = await conn.fetchval(_PLACES_HELD, document, tenant)
    if wrong:
        raise ArchiveInvalid(
            f"{_IMPORT}: {file}: the audit chain does not recompute to the exported places and "
            "hashes (an event changed without the chain recomputed, is out of order or had no "
            "place in the source's chain: sfdb audit verify there); nothing written"
        )


def _place_of(line: str, *, file: str) -> tuple[int, bytes]:
    """The place and hash an exported event's line gives it (checked against the database
    before it is used)."""
    try:
        event = json.loads(line)
        return int(event["chain_seq"]), bytes.fromhex(event["row_hash"])
    except (ValueError, TypeError, KeyError):
        raise ArchiveInvalid(
            f"{_IMPORT}: {file}: an event without a place and hash; nothing written"
        ) from None


def _batches(file: BinaryIO, digest: Any, name: str) -> Iterator[tuple[int, list[str]]]:
    """The file's lines (without their newline) in batches bounded in rows and bytes, each
    with the number of its first line, hashed as they are read. A line is read at most
    :data:`MAX_LINE_BYTES` at a time: a longer one is refused before it is held whole."""
    limit = MAX_LINE_BYTES
    batch: list[str] = []
    size = number = 0
    while line := file.readline(limit):
        number += 1
        digest.update(line)
        if not line.endswith(b"\n"):
            if len(line) >= limit:
                raise ArchiveInvalid(
                    f"{_IMPORT}: {name} line {number} is longer than {limit} bytes "
                    "(MAX_LINE_BYTES); nothing written"
                )
            raise ArchiveInvalid(f"{_IMPORT}: {name} ends in a cut line; nothing written")
        if batch and size + len(line) > _BATCH_BYTES:
            # A long line goes in a batch of its own: a batch holds _BATCH_BYTES, or one line.
            yield number - len(batch), batch
            batch, size = [], 0
        try:
            batch.append(line[:-1].decode("utf-8"))
        except UnicodeDecodeError:
            raise ArchiveInvalid(
                f"{_IMPORT}: {name} line {number} is not UTF-8; nothing written"
            ) from None
        size += len(line)
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            yield number - len(batch) + 1, batch
            batch, size = [], 0
    if batch:
        yield number - len(batch) + 1, batch
