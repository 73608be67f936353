"""sfdb tenant export / import: one workspace out of a database and into another, exactly.

The source is the suite's database; the target a second fresh database migrated
to head with the same ``DATABASE_TOKEN_KEYS`` (its Slack tokens must decrypt
there), shared by this module's tests, each with workspaces of its own; in the
Citus pass both are distributed on the run's cluster. Both are
reached as the application reaches them: the rows are written through the
layer's public API, the round trip is judged by bytes, by ``verify`` and by a
unit of work on the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import pytest
import pytest_asyncio
from slack_sdk.oauth.installation_store import Installation
from sqlalchemy.engine import URL

from slack_fathom_db import Database, DatabaseSettings, TenantId, export
from slack_fathom_db.audit_chain import KeptHead, parse_kept_heads, verify_audit_chains
from slack_fathom_db.errors import (
    ArchiveInvalid,
    Conflict,
    SchemaMismatch,
    TenantNotFound,
    ValidationError,
)
from slack_fathom_db.export import MANIFEST_FILE, TABLES, export_tenant, import_tenant
from slack_fathom_db.slack import InstallationStore
from slack_fathom_db.testing import CitusCluster, citus_database, throwaway_database
from tests.helpers import dsn, fetch_value, set_local, unique_team_id, unique_user_id
from tests.test_cli import owner_env, sfdb, url_of

# Everything JSON and COPY could trip on: backslashes, quotes, newlines, tabs, control
# characters (COPY's csv delimiter and quote of the export among them), non-BMP unicode,
# U+2028, a trailing backslash.
AWKWARD = 'back\\slash "quoted" line\nbreak\r\ttab \x01\x1e\x1f ünïcødé 😀 \u2028 end\\'
CLIENT_ID = "111.222"


@dataclass(frozen=True)
class Workspace:
    """A workspace written through the layer, and what a test checks of it."""

    team: str
    tenant: TenantId
    meeting_ids: tuple[uuid.UUID, ...]


async def populate(db: Database, *, meetings: int = 12, name: str = AWKWARD) -> Workspace:
    """A workspace with a row in every table, through the public API."""
    team = unique_team_id()
    tenant = await db.directory.install(slack_team_id=team, slack_team_name=name, plan_tier="pro")
    created: list[uuid.UUID] = []
    async with db.unit_of_work(tenant) as uow:
        await uow.tenants.update(
            settings={"tz": "Europe/Zürich", "nested": {"list": [1, 2.5, None, AWKWARD]}},
            trial_ends_at=datetime(2027, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        )
        owner = await uow.tenants.add_user(
            slack_user_id=unique_user_id(), slack_email="ada@example.com", display_name=AWKWARD
        )
        gone = await uow.tenants.add_user(slack_user_id=unique_user_id(), role="admin")
        await uow.tenants.remove_user(gone.id)
        crm = await uow.tenants.connect_crm(
            provider_type="hubspot",
            credentials_secret_id="arn:aws:secretsmanager:eu-west-1:123456789012:secret:crm-1",
            connected_by_user_id=owner.id,
            is_default=True,
        )
        await uow.tenants.map_account(
            crm_connection_id=crm.id,
            email_domain="example.com",
            crm_account_id="acc\\1",
            crm_account_name=AWKWARD,
            verified=True,
        )
        for n in range(meetings):
            meeting = await uow.meetings.create(
                user_id=owner.id,
                fathom_recording_id=f"rec-{n}-{AWKWARD}",
                title=f"{n} {AWKWARD}",
                crm_connection_id=crm.id,
                meeting_url="https://fathom.video/share/x?a=1&b=\\2",
                started_at=datetime(2026, 11, 30, 9, n % 60, 1, 123456, tzinfo=UTC),
                duration_seconds=60 * n,
                participants=[{"email": "bob@example.com", "name": AWKWARD}],
            )
            created.append(meeting.id)
            if n % 3 == 0:
                await uow.meetings.start_processing(meeting.id)
                await uow.meetings.complete_processing(
                    meeting.id,
                    summary=AWKWARD,
                    action_items=[AWKWARD, {"due": None, "weight": 0.1}],
                    ai_output={"score": 1e-7, "big": 12345.678, "text": AWKWARD, "ok": True},
                )
                await uow.meetings.record_crm_sync(
                    meeting.id, status="synced", crm_record_id=f"note-{n}"
                )
            elif n % 3 == 1:
                await uow.meetings.start_processing(meeting.id)
                await uow.meetings.fail_processing(meeting.id, error=AWKWARD)
        await uow.meetings.soft_delete(created[-1])
        for status, address in (("success", "203.0.113.7"), ("failure", "2001:db8::1")):
            await uow.audit.log_event(
                event_type="meeting.processed",
                event_category="data",
                action_description=AWKWARD,
                status=status,
                user_id=owner.id,
                resource_type="meeting_session",
                resource_id=str(created[0]),
                ip_address=address,
                user_agent=f"Mozilla/5.0 {AWKWARD}",
                metadata={"attempt": 2, "ratio": 0.30000000000000004, "why": AWKWARD},
            )
        await uow.audit.log_event(
            event_type="auth.denied",
            event_category="auth",
            action_description="No",
            status="denied",
        )
        await uow.rate_limits.take("slack_api", capacity=10, refill_per_second=0.3, tokens=3)
        await uow.commit()
    await db.rate_limit(tenant, "meetings_processed", limit=100, period="daily", cost=7)
    await db.rate_limit(tenant, "meetings_processed", limit=100, period="monthly")
    store = InstallationStore(db, client_id=CLIENT_ID)
    await store.async_save(
        Installation(
            app_id="A111",
            team_id=team,
            team_name=AWKWARD,
            user_id=unique_user_id(),
            bot_id="B111",
            bot_token=f"xoxb-{team}",
            bot_scopes=["chat:write", "commands"],
            bot_user_id="U222",
            user_token=f"xoxp-{team}",
            user_scopes=["search:read"],
        )
    )
    return Workspace(team, tenant, tuple(created))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target(
    sfdb_server: URL, sfdb_direct_settings: DatabaseSettings, sfdb_citus: CitusCluster | None
) -> AsyncIterator[DatabaseSettings]:
    """A second database at head, with the source's token keys (and a tenant key of its own);
    in the Citus pass, distributed on the same cluster."""
    keys = sfdb_direct_settings.token_keys
    assert keys is not None
    if sfdb_citus is not None:
        async with citus_database(sfdb_citus, token_keys=keys.get_secret_value()) as settings:
            yield settings
        return
    async with throwaway_database(sfdb_server, token_keys=keys.get_secret_value()) as settings:
        yield settings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def target_db(target: DatabaseSettings) -> AsyncIterator[Database]:
    """The layer on the target database."""
    async with Database(target) as db:
        yield db


@pytest_asyncio.fixture
async def workspace(db: Database) -> Workspace:
    """A populated workspace of the source, beside another that must not leak into exports."""
    await populate(db, meetings=3, name="Other workspace")
    return await populate(db)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file of an export, by name."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


async def count_rows(settings: DatabaseSettings, tenant: uuid.UUID) -> int:
    """The rows a database holds of ``tenant``, every table of an export together, as the
    owner sees them with the lifecycle setting naming the tenant."""
    conn = await asyncpg.connect(dsn(settings.for_migrations()))
    try:
        await conn.execute(f'SET ROLE "{settings.roles.owner}"')
        async with conn.transaction():
            await conn.execute(set_local("sfdb.lifecycle_tenant", str(tenant)))
            total = await fetch_value(
                conn, int, "SELECT count(*) FROM public.tenants WHERE id = $1", tenant
            )
            for table in TABLES[1:]:
                total += await fetch_value(
                    conn,
                    int,
                    f"SELECT count(*) FROM public.{table} WHERE tenant_id = $1",
                    tenant,
                )
        return total
    finally:
        await conn.close()


async def test_export_import_export_gives_the_same_bytes(
    settings: DatabaseSettings,
    target: DatabaseSettings,
    target_db: Database,
    workspace: Workspace,
    tmp_path: Path,
) -> None:
    """Every row of the workspace and none of another's goes out, comes back into a fresh
    database exactly, verifies there, and works through the layer."""
    first, second = tmp_path / "first", tmp_path / "second"
    seen: dict[str, tuple[int, int]] = {}

    def progress(table: str, done: int, total: int) -> None:
        seen[table] = (done, total)

    manifest = await export_tenant(settings, workspace.team, first, progress=progress)
    assert seen == {e.table: (e.rows, e.rows) for e in manifest.tables}
    assert list(files_of(first)) == sorted([f"{t}.jsonl" for t in TABLES] + [MANIFEST_FILE])
    assert [(e.table, e.file) for e in manifest.tables] == [(t, f"{t}.jsonl") for t in TABLES]
    counts = {e.table: e.rows for e in manifest.tables}
    assert counts == {
        "tenants": 1,
        "users": 2,
        "crm_connections": 1,
        "account_mappings": 1,
        "meeting_sessions": 12,
        "audit_logs": counts["audit_logs"],
        "api_rate_limits": 3,
        "slack_installations": 1,
        "slack_bots": 1,
    }
    assert counts["audit_logs"] >= 4  # three logged, one by the Slack install
    assert manifest.tenant_id == workspace.tenant
    assert await count_rows(settings, workspace.tenant) == manifest.rows
    for name, data in files_of(first).items():
        if name != MANIFEST_FILE:
            lines = data.decode().split("\n")[:-1]  # not splitlines(): U+2028 is raw in them
            assert all(
                json.loads(line)["tenant_id" if name != "tenants.jsonl" else "id"]
                == str(workspace.tenant)
                for line in lines
            ), name
    events = [json.loads(line) for line in (first / "audit_logs.jsonl").open(encoding="utf-8")]
    assert [event["chain_seq"] for event in events] == list(range(1, len(events) + 1))
    assert all(len(bytes.fromhex(event["row_hash"])) == 32 for event in events)
    titles = [json.loads(line)["title"] for line in (first / "meeting_sessions.jsonl").open()]
    assert sorted(titles) == sorted(f"{n} {AWKWARD}" for n in range(12))

    imported = await import_tenant(target, first)
    assert imported.manifest == manifest
    again = await export_tenant(target, workspace.team, second)
    assert again == manifest
    assert files_of(second) == files_of(first)

    verified = await verify_audit_chains(target, slack_team_id=workspace.team)
    assert verified.ok, verified
    source_chain = await verify_audit_chains(settings, slack_team_id=workspace.team)
    assert [c.head for c in verified.chains] == [c.head for c in source_chain.chains]
    assert imported.audit_head == source_chain.chains[0].head

    async with target_db.unit_of_work(slack_team_id=workspace.team) as uow:
        meeting = await uow.meetings.get(workspace.meeting_ids[0])
        assert meeting is not None
        assert meeting.title == f"0 {AWKWARD}"
        assert meeting.ai_output == {"score": 1e-7, "big": 12345.678, "text": AWKWARD, "ok": True}
        assert len(await uow.meetings.recent(days=3650)) == 11  # one is soft-deleted
        tenant = await uow.tenants.get()
        assert tenant is not None
        assert tenant.slack_team_name == AWKWARD
        assert len(await uow.audit.recent_failures(hours=24)) == 2
    bot = await InstallationStore(target_db, client_id=CLIENT_ID).async_find_bot(
        enterprise_id=None, team_id=workspace.team
    )
    assert bot is not None
    assert bot.bot_token == f"xoxb-{workspace.team}"  # the same keys decrypt it there


@pytest.mark.not_on_citus("no second reader there: its workers do not share the snapshot")
async def test_a_large_table_read_in_two_halves_gives_the_same_file(
    settings: DatabaseSettings,
    workspace: Workspace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Meetings read by two connections in the export's snapshot, the upper half appended
    after the lower: the same bytes as read by one."""
    whole = await export_tenant(settings, workspace.team, tmp_path / "whole")
    monkeypatch.setattr(export, "_SPLIT_ROWS", 4)
    halves = await export_tenant(settings, workspace.team, tmp_path / "halves")
    assert halves == whole
    assert files_of(tmp_path / "halves") == files_of(tmp_path / "whole")


async def test_a_changed_byte_is_refused_before_anything_is_written(
    settings: DatabaseSettings, target: DatabaseSettings, workspace: Workspace, tmp_path: Path
) -> None:
    """One byte of a file changed, or rows of another workspace with a manifest to match:
    refused, and the target holds nothing of the workspace."""
    await export_tenant(settings, workspace.team, tmp_path)
    meetings = tmp_path / "meeting_sessions.jsonl"
    original = meetings.read_bytes()
    at = original.index(b'"title":"') + len(b'"title":"')
    meetings.write_bytes(original[:at] + b"X" + original[at + 1 :])
    with pytest.raises(ArchiveInvalid, match="SHA-256"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0

    # A manifest made to match rows moved to another workspace: the rows are refused.
    other = str(uuid.uuid4())
    rewrite(
        tmp_path,
        "meeting_sessions",
        original.replace(str(workspace.tenant).encode(), other.encode(), 1),
    )
    with pytest.raises(ArchiveInvalid, match="another workspace"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0


@pytest.mark.parametrize(
    "edit", [("event_type", "meeting.forged"), ("action_description", "nothing happened")]
)
async def test_an_audit_event_changed_with_a_manifest_to_match_is_refused(
    settings: DatabaseSettings,
    target: DatabaseSettings,
    workspace: Workspace,
    tmp_path: Path,
    edit: tuple[str, str],
) -> None:
    """An event edited in the file without the chain recomputed, its hash in the manifest
    made to match: the chain (for what it hashes) or the personal digest (for the personal
    fields) gives it away, and nothing is written. (One who recomputes the chain too is
    caught by kept heads only: see the forged-chain test.)"""
    await export_tenant(settings, workspace.team, tmp_path)
    events = tmp_path / "audit_logs.jsonl"
    lines = events.read_bytes().split(b"\n")
    edited = json.loads(lines[0])
    field, value = edit
    edited[field] = value
    lines[0] = json.dumps(edited, ensure_ascii=False).encode()
    rewrite(tmp_path, "audit_logs", b"\n".join(lines))
    with pytest.raises(ArchiveInvalid, match="audit chain"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0


def rewrite(directory: Path, table: str, data: bytes) -> None:
    """Replace a table's file of an export and its SHA-256 in the manifest, as a forger would."""
    (directory / f"{table}.jsonl").write_bytes(data)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for entry in manifest["tables"]:
        if entry["table"] == table:
            entry["sha256"] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


async def test_a_chain_that_starts_after_place_1_is_refused(
    settings: DatabaseSettings, target: DatabaseSettings, workspace: Workspace, tmp_path: Path
) -> None:
    """An export whose audit chain starts later (retention dropped its oldest events) is
    refused by name, and nothing is written."""
    await export_tenant(settings, workspace.team, tmp_path)
    lines = (tmp_path / "audit_logs.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) > 1
    rewrite(tmp_path, "audit_logs", b"".join(lines[1:]))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    for entry in manifest["tables"]:
        if entry["table"] == "audit_logs":
            entry["rows"] -= 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArchiveInvalid, match="starts at place 2, not 1"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0


async def test_an_existing_workspace_is_a_conflict_and_nothing_is_written(
    settings: DatabaseSettings, target: DatabaseSettings, workspace: Workspace, tmp_path: Path
) -> None:
    """Into the database it came from (same ids), or a second time: Conflict, nothing more."""
    manifest = await export_tenant(settings, workspace.team, tmp_path)
    with pytest.raises(Conflict, match="exists"):
        await import_tenant(settings, tmp_path)
    assert await count_rows(settings, workspace.tenant) == manifest.rows
    await import_tenant(target, tmp_path)
    with pytest.raises(Conflict, match="exists"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == manifest.rows
    assert (await verify_audit_chains(target, slack_team_id=workspace.team)).ok


async def test_a_workspace_installed_there_under_the_same_team_id_is_a_conflict(
    db: Database, settings: DatabaseSettings, target_db: Database, tmp_path: Path
) -> None:
    """The target installed the Slack team itself (another tenant id): Conflict, nothing
    written, its own workspace untouched."""
    workspace = await populate(db, meetings=1)
    await export_tenant(settings, workspace.team, tmp_path)
    theirs = await target_db.directory.install(slack_team_id=workspace.team, slack_team_name="X")
    with pytest.raises(Conflict, match="slack_team_id"):
        await import_tenant(target_db.settings, tmp_path)
    assert await count_rows(target_db.settings, workspace.tenant) == 0
    assert await target_db.directory.resolve(workspace.team) == theirs


async def test_refusals_are_typed(
    db: Database,
    settings: DatabaseSettings,
    target: DatabaseSettings,
    workspace: Workspace,
    tmp_path: Path,
) -> None:
    """An unknown workspace, a directory in use, another schema revision, no manifest."""
    with pytest.raises(TenantNotFound):
        await export_tenant(settings, unique_team_id(), tmp_path / "unknown")
    assert not (tmp_path / "unknown").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(ValidationError, match="not empty"):
        await export_tenant(settings, workspace.team, used)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    with pytest.raises(ArchiveInvalid, match=MANIFEST_FILE):
        await import_tenant(target, used)

    out = tmp_path / "out"
    await export_tenant(settings, workspace.team, out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["schema_revision"] = "0009"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(SchemaMismatch, match="0009"):
        await import_tenant(target, out)
    assert await count_rows(target, workspace.tenant) == 0


async def test_a_soft_deleted_workspace_is_exported_and_stays_deleted(
    db: Database, settings: DatabaseSettings, target: DatabaseSettings, tmp_path: Path
) -> None:
    """An uninstalled workspace's rows are still its rows: exported, imported as deleted."""
    workspace = await populate(db, meetings=2)
    async with db.unit_of_work(workspace.tenant) as uow:
        await uow.tenants.soft_delete()
        await uow.commit()
    manifest = await export_tenant(settings, workspace.team, tmp_path)
    await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == manifest.rows
    async with Database(target) as target_db:
        assert await target_db.directory.resolve(workspace.team) is None


async def test_cli_exports_and_imports(
    settings: DatabaseSettings, target: DatabaseSettings, workspace: Workspace, tmp_path: Path
) -> None:
    """``sfdb tenant export TEAM --out DIR`` and ``sfdb tenant import DIR``: a summary line
    each; refusals are one line on stderr with exit 1, a directory in use exit 2."""
    out = tmp_path / "export"
    env = owner_env(settings)
    exported = sfdb(
        "tenant", "export", workspace.team, "--out", str(out),
        url=url_of(settings), cwd=tmp_path, extra_env=env,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert f"exported workspace {workspace.team}" in exported.stdout
    assert (out / MANIFEST_FILE).exists()

    again = sfdb(
        "tenant", "export", workspace.team, "--out", str(out),
        url=url_of(settings), cwd=tmp_path, extra_env=env,
    )  # fmt: skip
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "not empty" in again.stderr

    unknown = sfdb(
        "tenant", "export", unique_team_id(), "--out", str(tmp_path / "x"),
        url=url_of(settings), cwd=tmp_path, extra_env=env,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert unknown.stderr.count("\n") == 1
    assert "no workspace" in unknown.stderr

    verified = sfdb(
        "audit", "verify", workspace.team, url=url_of(settings), cwd=tmp_path, extra_env=env
    )
    assert verified.returncode == 0, verified.stderr
    kept = tmp_path / "kept.txt"  # in practice, where the export's carrier cannot write
    kept.write_text(verified.stdout)
    [head] = [line for line in verified.stdout.splitlines() if line.startswith("head ")]
    (tmp_path / "cut.txt").write_text(head[:-1])
    unreadable = sfdb(
        "tenant", "import", str(out), "--kept", str(tmp_path / "cut.txt"),
        url=url_of(target), cwd=tmp_path, extra_env=owner_env(target),
    )  # fmt: skip
    assert unreadable.returncode == 2
    assert "tenant import --kept" in unreadable.stderr
    imported = sfdb(
        "tenant", "import", str(out), "--kept", str(kept),
        url=url_of(target), cwd=tmp_path, extra_env=owner_env(target),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert f"imported workspace {workspace.team}" in imported.stdout
    assert "holds the 1 kept head" in imported.stdout
    assert head in imported.stdout.splitlines()  # as verify prints it: to keep of the target
    conflict = sfdb(
        "tenant", "import", str(out), url=url_of(target), cwd=tmp_path, extra_env=owner_env(target)
    )
    assert conflict.returncode == 1
    assert conflict.stderr.count("\n") == 1
    assert "exists" in conflict.stderr
    for result in (exported, imported):
        assert f"xoxb-{workspace.team}" not in result.stdout + result.stderr


async def test_an_export_is_readable_by_its_user_only(
    settings: DatabaseSettings, workspace: Workspace, tmp_path: Path
) -> None:
    """A directory the export makes is 0o700, every file 0o600, whatever the umask; a
    directory it is given keeps its mode."""
    previous = os.umask(0o002)
    try:
        made = tmp_path / "made" / "here"
        await export_tenant(settings, workspace.team, made)
        given = tmp_path / "given"
        given.mkdir(mode=0o755)
        await export_tenant(settings, workspace.team, given)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE(given.stat().st_mode) == 0o755
    for directory in (made, given):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert modes == dict.fromkeys([f"{t}.jsonl" for t in TABLES] + [MANIFEST_FILE], 0o600)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "manifest symlink"])
async def test_an_import_reads_regular_files_of_its_directory_only(
    db: Database,
    settings: DatabaseSettings,
    target: DatabaseSettings,
    tmp_path: Path,
    kind: str,
) -> None:
    """A file of the export that is a symbolic link (even to the same bytes), a FIFO (which
    would block a reader) or a directory: refused before anything is read from it."""
    workspace = await populate(db, meetings=1)
    out = tmp_path / "export"
    await export_tenant(settings, workspace.team, out)
    name = MANIFEST_FILE if kind == "manifest symlink" else "api_rate_limits.jsonl"
    outside = tmp_path / name
    outside.write_bytes((out / name).read_bytes())
    (out / name).unlink()
    if kind == "fifo":
        os.mkfifo(out / name)
    elif kind == "directory":
        (out / name).mkdir()
    else:
        (out / name).symlink_to(outside)
    refusal = "is a symbolic link" if "symlink" in kind else "is not a regular file"
    with pytest.raises(ArchiveInvalid, match=f"{name} {refusal}"):
        await import_tenant(target, out)
    assert await count_rows(target, workspace.tenant) == 0


def append_line(directory: Path, table: str, line: bytes) -> None:
    """One more line at the end of a table's file, its count and SHA-256 in the manifest made
    to match."""
    rewrite(directory, table, (directory / f"{table}.jsonl").read_bytes() + line + b"\n")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for entry in manifest["tables"]:
        if entry["table"] == table:
            entry["rows"] += 1
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def user_line(directory: Path, **columns: object) -> bytes:
    """A line of the export's users.jsonl: its first user's, with a new id and Slack user,
    then ``columns``."""
    row = json.loads((directory / "users.jsonl").read_bytes().split(b"\n")[0])
    row |= {"id": str(uuid.uuid4()), "slack_user_id": unique_user_id()}
    return json.dumps(row | columns).encode()


async def test_a_line_longer_than_the_maximum_is_refused_before_it_is_held(
    db: Database,
    settings: DatabaseSettings,
    target: DatabaseSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line past MAX_LINE_BYTES is refused by file and line as it is read (not held
    whole), and a tenants.jsonl past it before it is read; nothing is written."""
    workspace = await populate(db, meetings=2)
    await export_tenant(settings, workspace.team, tmp_path)
    monkeypatch.setattr(export, "MAX_LINE_BYTES", 64 << 10)
    long = {"tenant_id": str(workspace.tenant), "title": "x" * (1 << 20)}
    append_line(tmp_path, "meeting_sessions", json.dumps(long).encode())
    reads: list[int] = []
    readline = export._batches

    def spied(file: BinaryIO, digest: Any, name: str) -> Iterator[tuple[int, list[str]]]:
        original = file.readline

        def read(limit: int = -1) -> bytes:
            line = original(limit)
            reads.append(len(line))
            return line

        file.readline = read  # type: ignore[method-assign]
        return readline(file, digest, name)

    monkeypatch.setattr(export, "_batches", spied)
    too_long = r"meeting_sessions\.jsonl line 3 is longer than 65536"
    with pytest.raises(ArchiveInvalid, match=too_long):
        await import_tenant(target, tmp_path)
    assert max(reads) <= 64 << 10
    assert await count_rows(target, workspace.tenant) == 0

    tenant_row = (tmp_path / "tenants.jsonl").stat().st_size
    monkeypatch.setattr(export, "MAX_LINE_BYTES", tenant_row - 1)
    with pytest.raises(ArchiveInvalid, match=rf"tenants\.jsonl is longer than {tenant_row - 1}"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0


@pytest.mark.parametrize(
    "case",
    [
        (b"{not json", r"users\.jsonl line 3 is not one JSON object"),
        (b"null", r"users\.jsonl line 3 is not one JSON object"),
        (b"[1,2]", r"users\.jsonl line 3 is not one JSON object"),
        (b'{"tenant_id": NaN}', r"users\.jsonl line 3 is not one JSON object"),
        (b'{"id": "nope"}', r"users\.jsonl line 3 is a row of another workspace, or of none"),
        (b"\xff{}", r"users\.jsonl line 3 is not UTF-8"),
        (b"TWO", r"users\.jsonl line 3 is not one JSON object"),
        (b"BAD ID", r"users\.jsonl lines 1-3: .*rejected a value \[22P02\]"),
        (b"NO SLACK USER", r"users\.jsonl lines 1-3: .*rejected a value.*\[23502\]"),
        (b"BAD ROLE", r"users\.jsonl lines 1-3: .*rejected a value.*\[23514\]"),
    ],
)
async def test_a_malformed_line_is_refused_by_file_and_line(
    db: Database,
    settings: DatabaseSettings,
    target: DatabaseSettings,
    tmp_path: Path,
    case: tuple[bytes, str],
) -> None:
    """Lines that are not JSON objects, or not rows of the workspace, or rows the database
    refuses, with a manifest to match: ArchiveInvalid naming the file and the line (or the
    batch's lines), never a value of the file; nothing written."""
    line, refusal = case
    workspace = await populate(db, meetings=1)
    await export_tenant(settings, workspace.team, tmp_path)
    written = {
        b"TWO": user_line(tmp_path) + b"," + user_line(tmp_path),
        b"BAD ID": user_line(tmp_path, id="secret-nope"),
        b"NO SLACK USER": user_line(tmp_path, slack_user_id=None),
        b"BAD ROLE": user_line(tmp_path, role="secret-role"),
    }.get(line, line)
    append_line(tmp_path, "users", written)
    with pytest.raises(ArchiveInvalid, match=refusal) as refused:
        await import_tenant(target, tmp_path)
    assert "nothing written" in str(refused.value)
    assert "secret" not in str(refused.value)
    assert await count_rows(target, workspace.tenant) == 0


async def test_a_tenants_file_not_utf8_is_refused(
    db: Database, settings: DatabaseSettings, target: DatabaseSettings, tmp_path: Path
) -> None:
    """tenants.jsonl with a byte that is not UTF-8, its SHA-256 made to match: refused."""
    workspace = await populate(db, meetings=1)
    await export_tenant(settings, workspace.team, tmp_path)
    rewrite(tmp_path, "tenants", (tmp_path / "tenants.jsonl").read_bytes()[:-1] + b"\xff\n")
    with pytest.raises(ArchiveInvalid, match=r"tenants\.jsonl is not UTF-8"):
        await import_tenant(target, tmp_path)
    assert await count_rows(target, workspace.tenant) == 0


async def forge_chain(
    settings: DatabaseSettings, directory: Path, *, edit: int | None = None, cut: int = 0
) -> None:
    """As a forger would: cut the newest ``cut`` events, or edit event ``edit`` and
    recompute every hash after it with the schema's public canonical form; then the
    manifest."""
    path = directory / "audit_logs.jsonl"
    events = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
    events = events[: len(events) - cut]
    if edit is not None:
        events[edit]["event_type"] = "meeting.forged"
        previous = bytes(32) if edit == 0 else bytes.fromhex(events[edit - 1]["row_hash"])
        conn = await asyncpg.connect(dsn(settings.for_migrations()))
        try:
            for event in events[edit:]:
                previous = await fetch_value(
                    conn,
                    bytes,
                    "SELECT sha256($1 || public.sfdb_audit_content($2::uuid, $3::uuid, $4, $5, "
                    "$6, $7, $8, $9, $10::timestamptz, decode(substr($11, 3), 'hex')))",
                    previous,
                    uuid.UUID(event["id"]),
                    uuid.UUID(event["tenant_id"]),
                    event["chain_seq"],
                    event["event_type"],
                    event["event_category"],
                    event["status"],
                    event["resource_type"],
                    event["resource_id"],
                    datetime.fromisoformat(event["created_at"]),
                    event["personal_digest"],
                )
                event["row_hash"] = previous.hex()
        finally:
            await conn.close()
    data = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in events)
    rewrite(directory, "audit_logs", data)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    for entry in manifest["tables"]:
        if entry["table"] == "audit_logs":
            entry["rows"] = len(events)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


async def test_a_forged_or_cut_chain_is_refused_with_the_sources_kept_head(
    db: Database, settings: DatabaseSettings, target: DatabaseSettings, tmp_path: Path
) -> None:
    """An export is not authenticated: a chain rewritten with its hashes recomputed, or cut
    at its newest events, with a manifest to match, imports and verifies. Held to the head
    kept of the source (heads of other workspaces passed over), it is refused and nothing
    is written."""
    other = await populate(db, meetings=1, name="Other workspace")
    workspace = await populate(db, meetings=1)
    chains = await verify_audit_chains(settings, slack_team_id=workspace.team)
    others = await verify_audit_chains(settings, slack_team_id=other.team)
    heads = [(workspace.team, chains.chains[0].head), (other.team, others.chains[0].head)]
    kept_file = tmp_path / "kept.txt"
    kept_file.write_text(
        "".join(f"head {team} {head[0]} {head[1].hex()}\n" for team, head in heads if head)
    )
    kept = parse_kept_heads(kept_file.read_text())
    assert [k.slack_team_id for k in kept] == [workspace.team, other.team]

    await export_tenant(settings, workspace.team, tmp_path / "cut")
    await forge_chain(settings, tmp_path / "cut", cut=2)
    with pytest.raises(ArchiveInvalid, match=r"before the head kept at place \d+: events were cut"):
        await import_tenant(target, tmp_path / "cut", kept=kept)
    assert await count_rows(target, workspace.tenant) == 0
    refused = sfdb(
        "tenant", "import", str(tmp_path / "cut"), "--kept", str(kept_file),
        url=url_of(target), cwd=tmp_path, extra_env=owner_env(target),
    )  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1
    assert "events were cut" in refused.stderr
    assert await count_rows(target, workspace.tenant) == 0

    forged = tmp_path / "forged"
    await export_tenant(settings, workspace.team, forged)
    await forge_chain(settings, forged, edit=0)
    with pytest.raises(ArchiveInvalid, match="does not have the hash kept for it"):
        await import_tenant(target, forged, kept=kept)
    assert await count_rows(target, workspace.tenant) == 0
    with pytest.raises(ValidationError, match="none of the 1 kept heads"):
        await import_tenant(target, forged, kept=[KeptHead(other.team, 1, bytes(32))])
    assert await count_rows(target, workspace.tenant) == 0

    # Without the kept head nothing tells: it imports, and the target's chain verifies.
    imported = await import_tenant(target, forged)
    source_head = chains.chains[0].head
    assert source_head is not None
    assert imported.audit_head is not None
    assert imported.audit_head[0] == source_head[0]
    assert imported.audit_head[1] != source_head[1]
    assert (await verify_audit_chains(target, slack_team_id=workspace.team)).ok
