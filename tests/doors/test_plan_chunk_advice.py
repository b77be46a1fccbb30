"""``zarr-parallel plan`` on a map → time-series request shows a cheaper target chunk shape, and
its ``--set`` options give that plan (docs/planning.md §5, docs/design.md §3.5).

The request is staged (a tight budget through ``memory_reserve``, the xarray read path); the
suggestion is listed under the plan and the command exits 0 (a staged plan does not halt).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from zarr_parallel.orchestration.command import main
from zarr_parallel.planning.strategy import plan_cost
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import make_plan

FIELDS: dict[str, Any] = {
    "chunks": {"time": 96, "latitude": 8, "longitude": 8},
    "deploy_mode": "series",
    "memory_limit": "300MB",
    "memory_reserve": "290MB",
}


@pytest.fixture(scope="module")
def maps(era5_factory: Any) -> list[Path]:
    """Four days of hourly maps, one HDF5 chunk per step × the whole 91 × 180 grid."""
    return era5_factory(n_files=4, steps_per_file=24, nlat=91, nlon=180, chunks=None)


def test_plan_shows_a_cheaper_shape_and_set_gives_it(
    maps: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    path = tmp_path / "request.yaml"
    fields = {"data_uri": [str(p) for p in maps], "cache_dir": "out", **FIELDS}
    path.write_text(yaml.safe_dump(fields, sort_keys=False))

    assert main(["plan", str(path)]) == 0  # listed, not halting
    out = capsys.readouterr().out
    assert re.search(r"^strategy:\s+staged", out, re.M), out
    row = next(line for line in out.splitlines() if line.startswith("recommendation 1:"))
    assert "set chunks['time'] to 24" in row and "no intermediate store" in row
    assert "halts" not in out
    options = shlex.split(row.split("; ")[-1])
    assert options == ["--set", "chunks={time: 24, latitude: 8, longitude: 8}"]

    assert main(["plan", str(path), *options]) == 0
    applied = capsys.readouterr().out
    assert re.search(r"^strategy:\s+direct", applied, re.M), applied
    assert "stage 2" not in applied and "recommendation 1:" not in applied
    assert re.search(r"^read amplification:\s+1\.00", applied, re.M)

    # Cheaper by the planner's model: the bytes it moves through storage.
    base = {**fields, "cache_dir": str(tmp_path / "out")}
    _, asked = make_plan(build_request(**base))
    key, value = options[1].split("=", 1)  # what --set parses: a key and a YAML value
    _, changed = make_plan(build_request(**{**base, key: yaml.safe_load(value)}))
    assert 1.5 * plan_cost(changed) <= plan_cost(asked)
    assert not (tmp_path / "out").exists(), "plan writes nothing"
