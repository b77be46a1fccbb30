"""The cache lock: one run per cache, dead runs' locks broken safely, live ones never."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from core_support import cli_result, frozen_run
from zarr_parallel.api import run_request
from zarr_parallel.errors import CacheLocked
from zarr_parallel.request.model import build_request
from zarr_parallel.store.lock import CacheLock, LockHolder

HOLD = """
import sys
from pathlib import Path
from zarr_parallel.store.lock import CacheLock
lock = CacheLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""

RACE = """
import sys, time
from pathlib import Path
from zarr_parallel.errors import CacheLocked
from zarr_parallel.store.lock import CacheLock, LockHolder
path, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
lock = CacheLock(path, heartbeat=0)
try:
    lock.acquire()
except CacheLocked as e:
    print("refused", e.holder.pid if e.holder else -1, flush=True)
    sys.exit(0)
t0 = time.time()
time.sleep(0.3)
mine = LockHolder.from_file(path).token == lock.token
t1 = time.time()
lock.release()
print("held", t0, t1, mine, flush=True)
"""


def _write_lock(path: Path, **fields: Any) -> None:
    content = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": psutil.Process().create_time(),
        "started": time.time() - 60,
        "token": "stale-token",
        **fields,
    }
    path.write_text(json.dumps(content))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_file_names_its_holder_and_goes_away(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    with CacheLock(path) as lock:
        holder = LockHolder.from_file(path)
        assert holder is not None
        assert (holder.host, holder.pid, holder.token) == (
            socket.gethostname(),
            os.getpid(),
            lock.token,
        )
        assert holder.state() == "alive"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr.lock"]
    assert not path.exists()


def test_second_holder_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    with CacheLock(path), pytest.raises(CacheLocked, match=f"pid {os.getpid()}, started"):
        CacheLock(path).acquire()


def test_lock_held_by_another_live_process(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLocked) as info:
            CacheLock(path, break_lock=True).acquire()
        assert f"host {socket.gethostname()}, pid {holder.pid}, started" in str(info.value)
        assert "held by a running process" in str(info.value)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(60) == 0
    finally:
        holder.kill()
    with CacheLock(path):
        pass


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"pid": None}, id="pid-gone"),
        pytest.param({"pid_start": 12345.0}, id="pid-reused"),
    ],
)
def test_dead_local_holder_is_broken_automatically(
    tmp_path: Path, fields: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.zarr.lock"
    _write_lock(path, **{k: (_dead_pid() if v is None else v) for k, v in fields.items()})
    assert LockHolder.from_file(path).state() == "dead"  # type: ignore[union-attr]
    with (
        caplog.at_level(logging.WARNING, logger="zarr_parallel.store.lock"),
        CacheLock(path) as lock,
    ):
        assert LockHolder.from_file(path).token == lock.token  # type: ignore[union-attr]
    assert "broke the stale lock" in caplog.text and "its process is gone" in caplog.text


def test_other_host_lock_needs_break_lock_and_an_old_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    _write_lock(path, host="node-17", pid=4242)
    with pytest.raises(CacheLocked, match=r"another host: host node-17, pid 4242.*probably still"):
        CacheLock(path).acquire()
    # A fresh heartbeat is never broken, even when asked.
    with pytest.raises(CacheLocked, match="probably still running"):
        CacheLock(path, break_lock=True).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with pytest.raises(CacheLocked, match=r"heartbeat stopped 60 min ago.*break_lock=True"):
        CacheLock(path).acquire()
    with CacheLock(path, break_lock=True) as lock:
        assert LockHolder.from_file(path).token == lock.token  # type: ignore[union-attr]


def test_unreadable_lock_is_never_taken_for_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    path.write_text("garbage")
    with pytest.raises(CacheLocked, match="unreadable lock file"):
        CacheLock(path, break_lock=True).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with CacheLock(path, break_lock=True):
        pass


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    with CacheLock(path, heartbeat=0.05):
        os.utime(path, (0, 0))
        deadline = time.time() + 30
        while path.stat().st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > time.time() - 30


def test_release_leaves_a_lock_that_is_no_longer_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.zarr.lock"
    lock = CacheLock(path, heartbeat=0).acquire()
    _write_lock(path, token="someone-else")
    with caplog.at_level(logging.ERROR, logger="zarr_parallel.store.lock"):
        lock.release()
    assert path.exists() and "was taken from this run" in caplog.text


def test_a_lock_taken_over_during_the_release_is_left_to_its_new_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run woken inside its release while another run breaks its lock and takes the cache:
    right after the release looked at the lock (its own), the other run's lock is put in its
    place. Reading and then unlinking removed the other run's lock; moving the lock aside and
    then comparing what was moved leaves it."""
    path = tmp_path / "c.zarr.lock"
    lock = CacheLock(path, heartbeat=0).acquire()
    real = LockHolder.from_file.__func__  # type: ignore[attr-defined]
    looked: list[Path] = []

    def look_then_taken_over(cls: type[LockHolder], at: Path) -> LockHolder | None:
        seen = real(cls, at)
        if not looked:
            looked.append(at)
            _write_lock(path, token="the breaker's")  # broken, and taken by the other run
        return seen

    monkeypatch.setattr(LockHolder, "from_file", classmethod(look_then_taken_over))
    lock.release()
    assert looked and json.loads(path.read_text())["token"] == "the breaker's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr.lock"]


def test_many_processes_breaking_one_stale_lock_never_hold_it_together(tmp_path: Path) -> None:
    path = tmp_path / "c.zarr.lock"
    go = tmp_path / "go"
    _write_lock(path, pid=_dead_pid())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(path), str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        lines = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    held = sorted(
        (float(t0), float(t1), mine) for _, t0, t1, mine in (x for x in lines if x[0] == "held")
    )
    refused = [int(x[1]) for x in lines if x[0] == "refused"]
    assert held, lines
    assert len(held) + len(refused) == 6
    assert all(mine == "True" for _, _, mine in held)
    for (_, end, _), (start, _, _) in itertools.pairwise(held):
        assert start >= end, f"two processes held the lock at once: {held}"
    # Whoever was refused was refused because of a live winner, never the stale lock.
    winners = {p.pid for p, x in zip(procs, lines, strict=True) if x[0] == "held"}
    assert set(refused) <= winners
    assert not path.exists()


# ---------------------------------------------------------------------------------------------
# Whole runs


def _request_file(files: list[Path], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    fields = {
        "data_uri": [str(p) for p in files],
        "chunks": {"time": 12, "latitude": 40, "longitude": 72},
        "cache_store": str(tmp_path / "out" / "c.zarr"),
        "deploy_mode": "series",
        "memory_limit": "300MB",
        "num_jobs": 4,
        "retries": 0,
    }
    path = tmp_path / "request.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path, fields


def test_concurrent_run_fails_fast_naming_the_holder(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A real run frozen mid-writes holds the lock; a second run on the cache is refused."""
    request, fields = _request_file(era5_files, tmp_path)
    with frozen_run(request, "job-recorded#1") as first:
        versions = sorted((tmp_path / "out" / "c.zarr.versions").iterdir())
        with pytest.raises(CacheLocked) as info:
            run_request(build_request(**fields))
        message = str(info.value)
        assert f"pid {first.pid}, started" in message and socket.gethostname() in message
        # Refused before planning: the frozen run's staging version is the only one.
        assert sorted((tmp_path / "out" / "c.zarr.versions").iterdir()) == versions
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    result = run_request(build_request(**fields))
    assert result.status == "up to date"


def test_run_takes_over_a_dead_hosts_lock_only_with_break_lock(
    era5_files: list[Path], tmp_path: Path
) -> None:
    _, fields = _request_file(era5_files, tmp_path)
    lock = tmp_path / "out" / "c.zarr.lock"
    lock.parent.mkdir()
    _write_lock(lock, host="node-17", pid=4242)
    old = time.time() - 7200
    os.utime(lock, (old, old))
    with pytest.raises(CacheLocked, match=r"break_lock=True"):
        run_request(build_request(**fields))
    assert not (tmp_path / "out" / "c.zarr.versions").exists()
    result = run_request(build_request(**fields, break_lock=True))
    assert result.status == "done" and not lock.exists()


def _as_if_from_a_dead_host(lock: Path) -> None:
    """Make a live run's lock look like one from another host whose heartbeat stopped an hour
    ago (its token unchanged): what a run paused past the stale threshold on a node leaves."""
    content = json.loads(lock.read_text())
    content["host"] = "node-17"
    lock.write_text(json.dumps(content))
    old = time.time() - 3600
    os.utime(lock, (old, old))


def test_paused_run_whose_lock_was_broken_publishes_nothing(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Pause → break → resume, for real: run A is frozen after its version is complete, run B
    (another request, break_lock) takes the lock over and publishes; A then wakes up.

    Before the fence, A published its older version over B's. Now A stops with exit 1, naming
    the lost lock, and B's version stays published.
    """
    request_a, fields = _request_file(era5_files, tmp_path)
    store = Path(fields["cache_store"])
    request_b = tmp_path / "b.yaml"
    chunks_b = {**fields["chunks"], "time": 24}
    request_b.write_text(yaml.safe_dump({**fields, "chunks": chunks_b, "break_lock": True}))
    with frozen_run(request_a, "before-publish") as a:
        _as_if_from_a_dead_host(store.with_name("c.zarr.lock"))
        b = cli_result(request_b)
        assert b.returncode == 0, b.stderr[-3000:]
        newer = store.resolve()
        os.kill(a.pid, signal.SIGCONT)
        _, err = a.communicate(timeout=300)
    assert a.returncode == 1, err[-3000:]
    assert "no longer holds the lock" in err and "published nothing" in err
    assert store.resolve() == newer, "the run that lost its lock published over the newer one"


def test_job_of_a_run_that_lost_its_lock_records_nothing(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """The fence in every job record: once another run holds the lock, a job of the run that
    lost it raises before writing its record (so a resume never trusts its chunks)."""
    from zarr_parallel.errors import RunFailed
    from zarr_parallel.run.job import run_job
    from zarr_parallel.run.steps import initialise, prepare, run_lock
    from zarr_parallel.store.manifest import recorded_jobs

    _, fields = _request_file(era5_files, tmp_path)
    req = build_request(**fields)
    with run_lock(req) as lock:
        prepared = prepare(req)
        initialise(prepared)
        first = prepared.todo[0]
        run_job(prepared.request_json, str(prepared.version), first)
        _write_lock(lock.path, token="the-other-run")  # another run broke ours and took it
        with pytest.raises(RunFailed, match="no longer holds the lock") as info:
            run_job(prepared.request_json, str(prepared.version), prepared.todo[1])
        assert type(info.value).__name__ == "LockLost"
        assert recorded_jobs(prepared.version, prepared.plan.fingerprint) == {first}


def test_jobs_of_a_run_whose_lock_was_broken_record_nothing_in_the_version_taken_over(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Two real runs of one request, so the second resumes the first's very version.

    Run A is frozen after its first job record, just before its second; its lock is made to
    look like a dead host's. Run B (``break_lock``) takes the lock over, resumes A's version
    (rewriting the version's fence with its own token) and is frozen after its first record.
    A wakes. Before jobs carried their run's token, A's jobs read B's token from the version
    and recorded every job left under B's lock; now A's job stops before recording, A exits 1
    having published nothing, and B finishes and publishes a complete cache.
    """
    from zarr_parallel.store.manifest import iter_job_records

    request_a, fields = _request_file(era5_files, tmp_path)
    store = Path(fields["cache_store"])
    lock = store.with_name("c.zarr.lock")
    request_b = tmp_path / "b.yaml"
    request_b.write_text(yaml.safe_dump({**fields, "break_lock": True}))
    with frozen_run(request_a, "job-written#2") as a:
        (version,) = [
            v for v in (tmp_path / "out" / "c.zarr.versions").iterdir() if v.name[0] != "."
        ]
        assert [r["pid"] for r in iter_job_records(version)] == [a.pid]
        _as_if_from_a_dead_host(lock)
        with frozen_run(request_b, "job-recorded#1") as b:
            fence = json.loads((version / ".zarr-parallel" / "lock.json").read_text())
            assert fence["token"] == json.loads(lock.read_text())["token"], "B resumed A's version"
            os.kill(a.pid, signal.SIGCONT)
            _, err = a.communicate(timeout=300)
            assert a.returncode == 1, err[-3000:]
            assert "no longer holds the lock" in err and "published nothing" in err
            by_a = [r["id"] for r in iter_job_records(version) if r["pid"] == a.pid]
            assert len(by_a) == 1, f"the run that lost its lock recorded jobs {by_a}"
            assert not store.exists() and not store.is_symlink()
            os.kill(b.pid, signal.SIGCONT)
            _, err = b.communicate(timeout=300)
            assert b.returncode == 0, err[-3000:]
    assert store.resolve() == version
    assert cli_result(request_b).stdout.count("up to date") >= 1


@pytest.fixture
def full_disk(tmp_path: Path) -> Any:
    """A real 1 MB tmpfs, filled up. Mounting needs root; elsewhere the test cannot run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_lock_on_a_full_disk_leaves_nothing_and_says_so(
    era5_files: list[Path], full_disk: Path, tmp_path: Path
) -> None:
    """Disk full and check_free_space false: the lock's temporary file was left behind for ever
    and the error was a raw OSError traceback. Now: exit 1, a plain message, nothing left."""
    from zarr_parallel.errors import RunFailed

    lock = CacheLock(full_disk / "c.zarr.lock")
    with pytest.raises(RunFailed, match="No space left on device"):
        lock.acquire()
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    _, fields = _request_file(era5_files, tmp_path)
    request = tmp_path / "full.yaml"
    fields = {**fields, "cache_store": str(full_disk / "c.zarr"), "check_free_space": False}
    request.write_text(yaml.safe_dump(fields))
    proc = cli_result(request)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # The last word is the CLI's plain message (Prefect logs the flow's failure above it).
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run failed: could not write the lock file"), proc.stderr[-3000:]
    assert "No space left on device" in last
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
