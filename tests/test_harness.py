"""The server finder of the test plugin: its order and its loud failure."""

from __future__ import annotations

import pytest

from slack_fathom_db import testing


def test_an_explicit_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(testing.ENV_URL, "postgres://someone@db.example:6543/anything")
    with testing.find_server() as url:
        assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "db.example", 6543)


def test_no_server_anywhere_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testing.ENV_URL, raising=False)
    monkeypatch.setattr(testing, "_pg_bin_dirs", list)  # no local binaries
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setitem(__import__("sys").modules, "pgserver", None)  # not installed
    with pytest.raises(testing.NoPostgreSQL) as caught, testing.find_server():
        pytest.fail("find_server() yielded a server although none can be had")
    message = str(caught.value)
    assert testing.ENV_URL in message
    assert "local_cluster" in message
    assert "docker" in message.lower()
    assert "pgserver" in message
