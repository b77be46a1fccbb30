"""``log_level`` controls what a run prints; the zarr warnings every run used to print are gone."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zarr_parallel.logs import set_log_level

REPO = Path(__file__).resolve().parents[2]


def _run_cli(
    era5_files: list[Path], tmp_path: Path, level: int, *options: str, **env: str
) -> subprocess.CompletedProcess[str]:
    request = {
        "data_uri": [str(p) for p in era5_files],
        "cache_dir": str(tmp_path / "out"),
        "cache_label": f"_log{level}",
        "chunks": {"time": 12},
        "variables": ["t2m"],
        "deploy_mode": "series",
        "log_level": level,
    }
    path = tmp_path / f"request{level}.yaml"
    path.write_text(yaml.safe_dump(request))
    return subprocess.run(
        [sys.executable, "-m", "flows.cache", "run", str(path), *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def test_level_0_prints_only_the_summary(era5_files: list[Path], tmp_path: Path) -> None:
    """No log lines, and no warnings: the manifest-folder and consolidated-metadata warnings
    zarr raised in every run are hidden where the run triggers them. Stderr holds the progress
    lines alone (stderr is not a terminal here: one per phase), and nothing with --quiet."""
    proc = _run_cli(era5_files, tmp_path, 0)
    assert proc.returncode == 0, proc.stderr
    assert [
        line for line in proc.stderr.splitlines() if not line.startswith("zarr-parallel: ")
    ] == []
    assert "zarr-parallel: data " in proc.stderr
    assert proc.stdout.startswith("zarr-parallel: done")
    (tmp_path / "quiet").mkdir()
    quiet = _run_cli(era5_files, tmp_path / "quiet", 0, "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("zarr-parallel: done")


def test_level_2_prints_progress_and_debug(era5_files: list[Path], tmp_path: Path) -> None:
    proc = _run_cli(era5_files, tmp_path, 2)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "INFO    | zarr_parallel.sources.source - source: 3 file(s) via h5netcdf" in err
    assert "DEBUG   | zarr_parallel.sources.source - layout of t2m" in err
    assert "plan: 1 jobs, read amplification 1.00" in err  # the flow's run logger
    assert "Finished in state Completed()" in err
    assert "h5py._conv" not in err, "library noise stays out even when debugging"
    assert "Warning" not in err


def test_log_level_decides_the_run_lines_over_prefect_logging_level(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A user who quiets Prefect with ``PREFECT_LOGGING_LEVEL=WARNING`` still gets the run's
    progress at log_level 1: the flow's run logger follows log_level."""
    proc = _run_cli(era5_files, tmp_path, 1, PREFECT_LOGGING_LEVEL="WARNING")
    assert proc.returncode == 0, proc.stderr
    assert "plan: 1 jobs, read amplification 1.00" in proc.stderr
    assert "Finished in state Completed()" in proc.stderr


@pytest.mark.parametrize(("level", "own"), [(0, 30), (1, 20), (2, 10)])
def test_set_log_level(level: int, own: int) -> None:
    """Logger levels, and the level of a Prefect console handler on the root logger (the
    subprocess tests above show the real console)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    names = ("zarr_parallel", "flows", "distributed", "h5py", "prefect.flow_runs")
    previous = {n: logging.getLogger(n).level for n in names}
    console = PrefectConsoleHandler()
    logging.getLogger().addHandler(console)
    try:
        set_log_level(level)
        assert logging.getLogger("zarr_parallel").level == own
        assert logging.getLogger("flows").level == own
        assert logging.getLogger("distributed").level == (20 if level == 2 else 30)
        assert logging.getLogger("h5py").level == 30
        assert logging.getLogger("prefect.flow_runs").level == min(own, 20)
        assert console.level == own
    finally:
        logging.getLogger().removeHandler(console)
        for name, lvl in previous.items():
            logging.getLogger(name).setLevel(lvl)


def test_bad_level() -> None:
    with pytest.raises(ValueError, match="log_level must be 0, 1 or 2"):
        set_log_level(3)
