"""The command line and the flow: ``python -m flows.cache [run|plan|verify] REQUEST.yaml``.

Most tests call :func:`flows.cache.main` in this process (the shared session Prefect API); two
run the module in a subprocess, one of them with no ``PREFECT_API_URL`` at all, as the README's
quickstart does. Artifacts are read back through the Prefect API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import xarray as xr
import yaml
from prefect.artifacts import Artifact

from core_support import changed_env, open_cache
from zarr_parallel.orchestration.command import main
from zarr_parallel.orchestration.tasks import artifact_key
from zarr_parallel.request.request_file import load_request_file

REPO = Path(__file__).resolve().parents[2]


def _write_request(folder: Path, files: list[Path], **fields: Any) -> Path:
    """A request file whose paths are relative to its own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(files[0].parent, folder)
    data = {
        "data_uri": f"{rel}/era5_like_*.nc",
        "cache_dir": "out",
        "deploy_mode": "series",
        **fields,
    }
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _artifact(key: str) -> Any:
    art = Artifact.get(key)
    assert art is not None, f"no artifact {key!r}"
    # Table artifacts come back as JSON text.
    return json.loads(art.data) if art.type == "table" else art.data


def _source(files: list[Path]) -> xr.Dataset:
    return xr.open_mfdataset(files, engine="h5netcdf", combine="by_coords")


MID_CHUNK = {"time": ["2020-01-01T03:00", "2020-01-02T19:00"]}  # cuts 6-step chunks at both ends


def test_run_plan_and_up_to_date(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Relative paths resolve against the request file; run prints the summary; a second run
    finds the cache up to date; the plan table and results are keyed artifacts."""
    req_file = _write_request(
        tmp_path / "requests",
        era5_files,
        chunks={"time": 12},
        variables={"t2m": {}},
        cache_label="_cli",
    )
    assert main(["plan", str(req_file)]) == 0
    out = capsys.readouterr().out
    assert "jobs:" in out and "read amplification:  1.00" in out
    assert not (tmp_path / "requests" / "out").exists(), "plan writes nothing"

    assert main([str(req_file)]) == 0  # run is the default command
    out = capsys.readouterr().out
    final = tmp_path / "requests" / "out" / "era5_like_cli.zarr"
    assert "zarr-parallel: done" in out and str(final) in out
    assert "read amplification  1.00" in out and "measured peak" in out
    xr.testing.assert_identical(open_cache(final), _source(era5_files)[["t2m"]].load())
    plan_rows = {r["figure"]: r["value"] for r in _artifact(artifact_key("zp-plan", final))}
    assert plan_rows["read amplification"] == "1.00" and plan_rows["status"] == "fresh"
    results = _artifact(artifact_key("zp-results", final))
    assert sorted(r["job"] for r in results) == list(range(int(plan_rows["jobs"])))
    assert all(r["peak memory"] <= r["estimated memory"] for r in results)

    assert main(["run", str(req_file)]) == 0
    assert "zarr-parallel: up to date" in capsys.readouterr().out

    # verify reads the same request file and checks the published cache (exit 0 when good).
    assert main(["verify", str(req_file), "--verify-mode", "full"]) == 0
    capsys.readouterr()


def test_set_overrides(era5_files: list[Path], tmp_path: Path) -> None:
    """--set values are YAML; dotted keys reach the slurm block; the file is not changed."""
    req_file = _write_request(tmp_path, era5_files)
    text = req_file.read_text()
    req = load_request_file(
        req_file,
        [
            "chunks={time: 24, latitude: -1}",
            "num_jobs=3",
            "recommend_changes=false",
            "memory_limit=1GiB",
            "slurm.partition=short",
            "slurm.directives=[--constraint=intel]",
            "variables=[t2m]",
        ],
    )
    assert req.chunks == {"time": 24, "latitude": -1}
    assert req.num_jobs == 3 and req.recommend_changes == "proceed"
    assert req.memory_bytes == 2**30
    assert req.slurm.partition == "short" and req.slurm.directives == ["--constraint=intel"]
    assert req.variables == {"t2m": []}
    assert req.cache_dir == str(tmp_path / "out")
    assert isinstance(req.data_uri, list) and len(req.data_uri) == len(era5_files)
    assert req_file.read_text() == text


def test_plan_only_flag(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req_file = _write_request(tmp_path, era5_files)
    code = main([str(req_file), "--plan-only", "--set", "num_jobs=4", "--set", "chunks={time: 6}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "jobs:                4 (4 to run)" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "chunks={time: 0}"], "invalid request: chunks['time']=0"),
        (["--set", "bogus=1"], "invalid request: bogus=1: is not a request field"),
        (["--set", "novalue"], "invalid request: --set='novalue': must be key=value"),
        (["--set", "slurm.qos=[1"], "invalid request: --set slurm.qos='[1': is not a YAML value"),
        (["--set", "slurm.nodes=2"], "invalid request: slurm.nodes=2: is not a request field"),
        (["--set", "variables={sp: {}}"], "invalid request: variables=['sp']"),
        (["--set", "memory_limit=lots"], "invalid request: memory_limit='lots'"),
    ],
    ids=[
        "chunks",
        "unknown-key",
        "no-equals",
        "bad-yaml",
        "unknown-slurm-key",
        "variable",
        "memory",
    ],
)
def test_invalid_request_exits_2(
    era5_files: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    req_file = _write_request(tmp_path, era5_files)
    assert main(["run", str(req_file), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_request_file_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "request=" in capsys.readouterr().err
    assert main([]) == 2
    assert "give a command" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert main(["plan", str(tmp_path / "list.yaml")]) == 2
    assert "must be a mapping of request fields" in capsys.readouterr().err


def test_halt_apply_proceed(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A selection cutting source chunks: halt (exit 3, recommendations printed and published),
    apply (the widened, aligned request runs) or proceed (as asked)."""
    req_file = _write_request(
        tmp_path,
        era5_files,
        preprocessors=[{"type": "sel", **MID_CHUNK}],
        variables={"d2m": {}},
        cache_label="_rec",
    )
    final = tmp_path / "out" / "era5_like_rec.zarr"
    assert main(["run", str(req_file)]) == 3
    err = capsys.readouterr().err
    assert "The plan reads 1.17x the source bytes it needs" in err
    assert "1. widen preprocessors[0].time to ['2020-01-01T00:00:00', '2020-01-02T23:00:00']" in err
    assert "2. narrow preprocessors[0].time" in err
    assert not (tmp_path / "out").exists()
    md = _artifact(artifact_key("zp-recommendations", final))
    assert md.startswith("# Run halted on recommendations") and "widen preprocessors[0].time" in md

    assert main(["run", str(req_file), "--set", "recommend_changes=apply"]) == 0
    out = capsys.readouterr().out
    assert "read amplification  1.00" in out and "applied             widen" in out
    src = _source(era5_files)
    widened = src.sel(time=slice("2020-01-01T00:00", "2020-01-02T23:00"))[["d2m"]]
    xr.testing.assert_identical(open_cache(final), widened.load())
    assert "Applied: widen" in _artifact(artifact_key("zp-recommendations", final))

    assert main(["run", str(req_file), "--set", "recommend_changes=proceed"]) == 0
    out = capsys.readouterr().out
    assert "read amplification  1.17" in out
    asked = src.sel(time=slice(*MID_CHUNK["time"]))[["d2m"]]
    xr.testing.assert_identical(open_cache(final), asked.load())


def test_run_failure_exits_1(
    era5_factory: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A source chunk whose compressed bytes are damaged: planning (metadata only) succeeds, the
    job reading it fails on every retry, the run fails with exit 1 and nothing is published."""
    files = era5_factory(n_files=2, steps_per_file=6, chunks=(3, 73, 144), seed=7)
    damaged = tmp_path / "src"
    damaged.mkdir()
    for f in files:
        (damaged / f.name).write_bytes(f.read_bytes())
    target = damaged / files[1].name
    with h5py.File(target, "r") as h5:
        info = h5["t2m"].id.get_chunk_info(0)
    with open(target, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(np.random.default_rng(0).bytes(min(4096, info.size - 32)))
    req_file = _write_request(
        tmp_path / "req", [damaged / f.name for f in files], retries=1, cache_label="_bad"
    )
    assert main(["run", str(req_file)]) == 1
    err = capsys.readouterr().err
    assert "run failed:" in err and "jobs failed" in err
    final = tmp_path / "req" / "out" / "era5_like_bad.zarr"
    assert not final.exists(), "a failed run publishes nothing"


def test_module_in_subprocess_halts_with_3(era5_files: list[Path], tmp_path: Path) -> None:
    req_file = _write_request(
        tmp_path, era5_files, preprocessors=[{"type": "isel", "time": [3, 40]}]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cache", "plan", str(req_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=changed_env(),
    )
    assert proc.returncode == 3, proc.stderr
    assert "Recommendations, best first:" in proc.stderr


def test_cli_without_prefect_api(era5_files: list[Path], tmp_path: Path) -> None:
    """No PREFECT_API_URL: Prefect starts a temporary local API for the run (README path)."""
    req_file = _write_request(tmp_path, era5_files, variables={"t2m": {}}, chunks={"time": 24})
    env = changed_env(PREFECT_API_URL=None, PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cache", "run", str(req_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zarr-parallel: done" in proc.stdout
    final = tmp_path / "out" / "era5_like.zarr"
    xr.testing.assert_identical(open_cache(final), _source(era5_files)[["t2m"]].load())


def test_temporary_api_runs_send_no_heartbeats() -> None:
    # Ad hoc runs on a temporary API (which ends with the process) skip Prefect's flow-run
    # heartbeat, which delays the end of every run by up to 1 s; with a lasting API it stays on.
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from zarr_parallel.orchestration.control import (
        TEMPORARY_API_STARTUP_SECONDS,
        temporary_api_settings,
    )

    default = PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    assert default is not None
    with temporary_settings(restore_defaults={PREFECT_API_URL}), temporary_api_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        startup = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        assert startup >= TEMPORARY_API_STARTUP_SECONDS
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), temporary_api_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == default
