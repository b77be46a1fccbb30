"""The command's temporary Prefect API: a server that cannot start fails the command at once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from zarr_parallel.orchestration.temporary_api import TemporaryApi


def test_a_database_of_another_prefect_fails_at_once_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn exits with 3 both when its port was taken and when the app cannot start (here: a
    database migrated by another Prefect version, as on a machine that ran a newer one). Taken
    for a taken port, the command restarted the server until its 180 s timeout; it now fails as
    soon as the server exits, saying what to do."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('ffffffffffff')")
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    api = TemporaryApi.begin()
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="exited with code 3") as failed:
            api.wait(timeout=150)
    finally:
        api.stop()
    assert time.monotonic() - t0 < 90, "it waited for the timeout"
    assert "PREFECT_HOME" in str(failed.value) and "PREFECT_API_URL" in str(failed.value)


def test_a_migrated_home_starts_its_server_without_the_migration_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh home is migrated by the server's start; once it is at the installed Prefect's
    newest revision, the next server skips Prefect's check (PREFECT_API_DATABASE_MIGRATE_ON_START
    false in its environment) and still answers; another revision, or a database chosen by the
    user, keeps Prefect's check."""
    from core_support import temporary_servers
    from zarr_parallel.orchestration.prefect_home import database_at_head, head_revision

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert not database_at_head()  # no database yet
    for expected in ("migrated on start", "skipped"):
        api = TemporaryApi.begin()
        try:
            api.wait(timeout=150)
            (server,) = temporary_servers(home)
            skipped = server.environ().get("PREFECT_API_DATABASE_MIGRATE_ON_START") == "false"
            assert skipped == (expected == "skipped")
        finally:
            api.stop()
        assert database_at_head()
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "sqlite+aiosqlite:///elsewhere.db")
    assert not database_at_head()
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    with sqlite3.connect(home / "prefect.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    assert not database_at_head()


@pytest.mark.parametrize(
    "argv,runs",
    [
        (["run", "r.yaml"], True),
        (["r.yaml"], True),
        (["r.yaml", "--set", "deploy_mode=series"], True),
        (["plan", "r.yaml"], False),
        (["verify", "r.yaml"], False),
        (["r.yaml", "--plan-only"], False),
        (["--help"], False),
        ([], False),
    ],
)
def test_which_command_lines_start_the_api_early(argv: list[str], runs: bool) -> None:
    from zarr_parallel.orchestration.temporary_api import runs_a_flow

    assert runs_a_flow(argv) == runs


def test_an_early_api_the_command_does_not_use_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m flows.cache run`` starts the API before its imports; a request that is
    refused (exit 2) leaves no server behind, and neither does ``plan`` (which starts none)."""
    import os

    from core_support import cli_result, temporary_servers

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_uri: /nowhere/*.nc\nvariables: {t2m: {}}\n")
    for command in ("run", "plan"):
        done = cli_result(bad, timeout=300, command=command, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "data_uri" in done.stderr
        assert temporary_servers(home) == []
