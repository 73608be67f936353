"""The test plugin: the server finder (its order and its loud failure) and the Citus cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import asyncpg
import pytest

from slack_fathom_db import Database, DatabaseSettings, TenantId, citus, testing
from tests.helpers import unique_user_id


def test_an_explicit_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(testing.ENV_URL, "postgres://someone@db.example:6543/anything")
    with testing.find_server() as url:
        assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "db.example", 6543)


def test_no_server_anywhere_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testing.ENV_URL, raising=False)
    monkeypatch.setattr(testing, "_pg_bin_dirs", list)  # no local binaries
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # nothing listens on the discard port
    for module in ("pgserver", "pgserver.postgres_server"):  # not installed (nor imported)
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(testing.NoPostgreSQL) as caught, testing.find_server():
        pytest.fail("find_server() yielded a server although none can be had")
    message = str(caught.value)
    assert testing.ENV_URL in message
    assert "local_cluster" in message
    assert "docker" in message.lower()
    assert "pgserver" in message


def test_citus_cluster_without_citus_fails_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bin_dir, lib_dir = tmp_path / "bin", tmp_path / "lib"  # a PostgreSQL without Citus
    bin_dir.mkdir()
    lib_dir.mkdir()
    (lib_dir / "plpgsql.so").touch()
    monkeypatch.setattr(testing, "_pg_bin_dirs", lambda: [bin_dir])
    with pytest.raises(testing.NoPostgreSQL) as caught, testing.citus_cluster():
        pytest.fail("citus_cluster() yielded a cluster although Citus is not installed")
    message = str(caught.value)
    assert "Citus is not installed for this PostgreSQL (citus.so missing" in message
    assert str(tmp_path) in message
    (lib_dir / "citus.so").touch()
    assert testing.citus_library(bin_dir) == lib_dir / "citus.so"


async def test_the_suite_database_is_distributed_exactly_in_the_citus_pass(
    admin: asyncpg.Connection,
    db: Database,
    sfdb_citus: testing.CitusCluster | None,
    sfdb_direct_settings: DatabaseSettings,
    tenant_a: TenantId,
) -> None:
    """On Citus: tenants a reference table, the rest colocated by tenant, rows on the worker."""
    if sfdb_citus is None:  # the plain and PgBouncer passes run on one plain server
        assert not await citus.is_distributed(admin)
        return
    rows = await admin.fetch(
        "SELECT logicalrelid::regclass::text AS name, partmethod::text AS method, "
        "colocationid AS colocation, c.relispartition AS partition "
        "FROM pg_dist_partition JOIN pg_class c ON c.oid = logicalrelid"
    )
    placed = {row["name"]: (row["method"], row["colocation"]) for row in rows}
    partitions = {row["name"] for row in rows if row["partition"]}
    assert set(placed) - partitions == {"tenants", *citus.DISTRIBUTED_TABLES}
    # The audit log's monthly partitions (and its default one) go with it.
    assert partitions
    assert all(name.startswith("audit_partitions.audit_logs_") for name in partitions)
    assert placed["tenants"][0] == "n"
    spread = [*citus.DISTRIBUTED_TABLES, *partitions]
    assert {placed[table][0] for table in spread} == {"h"}
    assert len({placed[table][1] for table in spread}) == 1  # colocated
    nodes = await admin.fetch("SELECT nodeport, groupid FROM pg_dist_node ORDER BY groupid")
    assert [(n["nodeport"], n["groupid"] == 0) for n in nodes] == [
        (sfdb_citus.coordinator.url.port, True),
        (sfdb_citus.worker.url.port, False),
    ]
    # A user of the tenant is stored in a shard of users on the worker, and only there.
    async with db.unit_of_work(tenant_a) as uow:
        user = await uow.tenants.add_user(slack_user_id=unique_user_id())
        await uow.commit()
    placements = await admin.fetch(
        "SELECT shard_name('users'::regclass, shardid) AS name, nodeport FROM citus_shards "
        "WHERE table_name = 'users'::regclass "
        "AND shardid = get_shard_id_for_distribution_column('users', $1::uuid)",
        tenant_a,
    )
    assert [p["nodeport"] for p in placements] == [sfdb_citus.worker.url.port]
    shard = placements[0]
    database = sfdb_direct_settings.sqlalchemy_url().database
    worker_url = sfdb_citus.worker.url.set(drivername="postgresql", database=database)
    worker = await asyncpg.connect(worker_url.render_as_string(hide_password=False))
    try:
        stored = await worker.fetch(
            f"SELECT id FROM {shard['name']} WHERE tenant_id = $1", tenant_a
        )
    finally:
        await worker.close()
    assert [row["id"] for row in stored] == [user.id]
