"""``log_level`` above 2 means 2, with a warning, in every door (as zarr-parallel 0.5 read it)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.errors import RequestError
from zarr_parallel.orchestration.cache import cache_flow
from zarr_parallel.request.model import build_request

REPO = Path(__file__).resolve().parents[2]
WARNING = "log_level=9 is above the highest level, 2 (debug): using 2"


def test_python_door_clamps_with_a_warning(
    era5_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    zp = ZarrParallelAssembler([str(p) for p in era5_files], log_level=9)
    with caplog.at_level(logging.WARNING, logger="zarr_parallel"):
        req = zp.request(cache_store=str(tmp_path / "c.zarr"), deploy_mode="series")
    assert req.log_level == 2
    assert WARNING in caplog.text


def test_cli_door_clamps_with_a_warning(era5_files: list[Path], tmp_path: Path) -> None:
    path = tmp_path / "request.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_uri": [str(p) for p in era5_files],
                "cache_store": str(tmp_path / "c.zarr"),
                "deploy_mode": "series",
                "log_level": 9,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cache", "plan", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert WARNING in proc.stderr


def test_deployment_door_clamps_and_its_schema_allows_it(
    era5_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment's parameters pass Prefect's schema, then the request model clamps them."""
    request = {
        "data_uri": [str(p) for p in era5_files],
        "cache_store": str(tmp_path / "c.zarr"),
        "log_level": 9,
    }
    schema = cache_flow.parameters.model_dump()["definitions"]["CacheRequest"]
    assert "maximum" not in schema["properties"]["log_level"]
    with caplog.at_level(logging.WARNING, logger="zarr_parallel"):
        params = cache_flow.validate_parameters({"request": request})
    assert params["request"].log_level == 2
    assert WARNING in caplog.text


@pytest.mark.parametrize("level", [-1, True, 2.5])
def test_levels_that_mean_nothing_are_still_refused(level: object, tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"log_level=.*Use 0, 1 or 2"):
        build_request(data_uri=__file__, cache_store=str(tmp_path / "c.zarr"), log_level=level)
