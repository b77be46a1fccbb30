"""Progress on stderr from real runs: one line per phase when stderr is not a terminal, a live
line in a terminal (a real pseudo-terminal), nothing with ``--quiet``; the job counts and bytes
are those the run's manifest records, in series and on a local dask cluster."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import yaml

from core_support import changed_env, open_cache
from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.orchestration import progress
from zarr_parallel.orchestration.cache import main
from zarr_parallel.orchestration.progress import Reporter, reporting
from zarr_parallel.store.manifest import iter_job_records
from zarr_parallel.store.paths import CachePaths
from zarr_parallel.units import format_bytes

REPO = Path(__file__).resolve().parents[2]
PHASES = ["start-up", "planning", "initialise", "data", "finish", "teardown"]
#: The line a finished phase prints: ``zarr-parallel: data 1.2 s: 5/5 jobs, 5.05 MB, ...``.
LINE = re.compile(
    r"^zarr-parallel: (?P<phase>[a-z-]+(?: \(stage \d+/\d+\))?) [\d.]+ s(?P<rest>.*)$"
)
#: Each deploy mode with the memory limit it needs (a local cluster's workers are processes).
MODES = {"series": "300MB", "dask_distributed": "1GB"}


def _request(folder: Path, files: list[Path], deploy_mode: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "data_uri": [str(f) for f in files],
        "cache_store": str(folder / "out.zarr"),
        "chunks": {"time": 12, "latitude": 73, "longitude": 144},
        "deploy_mode": deploy_mode,
        "memory_limit": MODES[deploy_mode],
        "num_jobs": 4,
    }
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _phase_lines(err: str) -> list[tuple[str, str]]:
    """The lines of finished phases (not the minute lines of a long data phase, with an ETA)."""
    found = [(m["phase"], m["rest"]) for m in map(LINE.match, err.splitlines()) if m]
    return [(phase, rest) for phase, rest in found if ", ETA " not in rest]


def _records(store: Path) -> list[dict[str, Any]]:
    version = CachePaths(store).current()
    assert version is not None
    return list(iter_job_records(version))


def _same_as_source(store: Path, files: list[Path]) -> None:
    source = xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords").load()
    xr.testing.assert_identical(open_cache(store), source)
    for name, var in source.data_vars.items():
        assert open_cache(store)[name].dtype == var.dtype


@pytest.mark.parametrize("deploy_mode", sorted(MODES))
def test_a_line_per_phase_without_a_terminal(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], deploy_mode: str
) -> None:
    request = _request(tmp_path, era5_files, deploy_mode)
    assert main(["run", str(request)]) == 0
    out, err = capsys.readouterr()
    lines = _phase_lines(err)
    assert [phase for phase, _ in lines] == PHASES, err
    # The data line counts the jobs and bytes the manifest recorded as they finished.
    records = _records(tmp_path / "out.zarr")
    written = sum(int(r["bytes"]) for r in records)
    data = dict(lines)["data"]
    assert data.startswith(f": {len(records)}/{len(records)} jobs, {format_bytes(written)}, ")
    assert data.endswith("/s")
    # The summary alone goes to stdout.
    assert out.startswith("zarr-parallel: done") and not _phase_lines(out)
    assert f"written             {format_bytes(written)}" in out
    _same_as_source(tmp_path / "out.zarr", era5_files)


def test_quiet_shows_no_progress(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = _request(tmp_path, era5_files, "series")
    assert main(["run", str(request), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert not _phase_lines(err) and "zarr-parallel:" not in err
    assert out.startswith("zarr-parallel: done")


def test_python_door_progress_option(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``.cache()`` shows progress by default (lines here: stderr is captured), none with
    ``progress=False``; 0.5's positional arguments keep their places."""
    zp = ZarrParallelAssembler([str(p) for p in era5_files], variables=["t2m"])
    result = zp.cache(str(tmp_path / "a.zarr"), 4, False, "series")
    err = capsys.readouterr().err
    assert [phase for phase, _ in _phase_lines(err)] == PHASES
    assert result.status == "done"
    zp.cache(str(tmp_path / "b.zarr"), 4, False, "series", progress=False)
    assert "zarr-parallel:" not in capsys.readouterr().err


def test_stage_labels_and_a_failed_phase(capsys: pytest.CaptureFixture[str]) -> None:
    """A multi-stage plan's data phases are named by stage; a run that stops says where."""
    with pytest.raises(RuntimeError), reporting("lines") as reporter:
        reporter.enter("planning")
        reporter.enter("data", stage=(1, 2))
        reporter.start_jobs(3)
        reporter.jobs(3, 3, 3_000_000)
        reporter.enter("data", stage=(2, 2))
        raise RuntimeError("stopped")
    err = capsys.readouterr().err
    assert [p for p, _ in _phase_lines(err)] == ["start-up", "planning", "data (stage 1/2)"]
    assert "zarr-parallel: stopped in data (stage 2/2) after " in err
    assert [label for label, _ in reporter.phases][-1] == "data (stage 2/2)"
    with pytest.raises(ValueError, match="phase must be one of"):
        Reporter("off").enter("writing")


def test_refused_while_planning_prints_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request refused or halted while planning leaves its message alone on stderr; a long
    data phase prints where it stands every LINE_EVERY_SECONDS."""
    with pytest.raises(RuntimeError), reporting("lines") as reporter:
        reporter.enter("planning")
        raise RuntimeError("invalid request")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "LINE_EVERY_SECONDS", 0.0)
    with reporting("lines") as reporter:
        reporter.enter("data")
        reporter.start_jobs(4)
        reporter.jobs(1, 4, 1_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("zarr-parallel: start-up "), lines
    assert re.fullmatch(
        r"zarr-parallel: data [\d.]+ s: 1/4 jobs, 1\.00 MB, .+/s, ETA \d+:\d\d", lines[1]
    )


def _read_terminal(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    return b"".join(chunks)


def test_a_live_line_in_a_terminal(era5_files: list[Path], tmp_path: Path) -> None:
    """The command's stderr on a pseudo-terminal: a line redrawn in place with the jobs done, a
    bar, the bytes, the rate and the ETA; cleared at the end; the summary on stdout. Prefect's
    log lines (log_level 1) print above the line, never onto it."""
    request = _request(tmp_path, era5_files, "series")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cache", "run", str(request), "--set", "log_level=1"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
        env=changed_env(TERM="xterm-256color", COLUMNS="120"),
    )
    os.close(follower)
    try:
        shown = _read_terminal(leader, proc, timeout=600).decode(errors="replace")
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
        os.close(leader)
    assert proc.returncode == 0, shown[-3000:]
    assert out.startswith("zarr-parallel: done")
    frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\n", "\r").split("\r")
    seen = [f.strip() for f in frames if f.strip()]
    total = len(_records(tmp_path / "out.zarr"))
    data = [f for f in seen if f"/{total} jobs, " in f]
    assert data and f"{total}/{total} jobs" in data[-1], seen[-20:]
    assert "━" in data[-1] and "/s, ETA " in data[-1]
    assert any("zarr-parallel: planning" in f for f in seen)
    assert not _phase_lines("\n".join(seen)), "no per-phase lines in a terminal"
    assert "\x1b[2K" in shown, "the line is cleared when the run ends"
    logged = [m.start() for m in re.finditer(r"\d\d:\d\d:\d\d\.\d{3} \| INFO", shown)]
    assert len(logged) > 3
    torn = [shown[i - 40 : i + 60] for i in logged if not shown[:i].endswith(("\x1b[2K", "\n"))]
    assert not torn, torn
