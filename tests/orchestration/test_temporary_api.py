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
