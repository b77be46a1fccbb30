"""The wheel as the ecosystem expects it: the package only (no generic top-level names), typed,
with the deployments as package data whose entrypoints import from the installed package."""

from __future__ import annotations

import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from zarr_parallel.orchestration.deploy import PREFECT_FILE

REPO = Path(__file__).resolve().parents[2]
#: What a clone's deployments name, and what the package's name instead.
ENTRYPOINTS = {
    "flows/cache.py:cache_flow": "zarr_parallel.orchestration.cache:cache_flow",
    "flows/recache.py:recache_flow": "zarr_parallel.orchestration.recache:recache_flow",
}


@pytest.fixture(scope="module")
def wheel(built_wheel: Path) -> list[str]:
    """The names in the wheel built from this checkout."""
    with zipfile.ZipFile(built_wheel) as zf:
        return zf.namelist()


def test_wheel_holds_the_package_only(wheel: list[str]) -> None:
    tops = {name.split("/")[0] for name in wheel}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"zarr_parallel"}, sorted(tops)
    for path in ("py.typed", "cli.py", "version.py", "orchestration/prefect.yaml"):
        assert f"zarr_parallel/{path}" in wheel, path
    # Every module of the checkout's package is in the wheel.
    modules = {str(p.relative_to(REPO)) for p in (REPO / "zarr_parallel").rglob("*.py")}
    assert modules <= set(wheel)
    (entry_points,) = (n for n in wheel if n.endswith(".dist-info/entry_points.txt"))
    assert entry_points


def test_console_script_and_extras_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"zarr-parallel": "zarr_parallel.cli:entry"}
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["s3"]] == ["s3fs"]
    assert [d.split(">")[0] for d in extras["netcdf4"]] == ["netCDF4"]
    assert "zarr-parallel[s3,netcdf4]" in extras["dev"], "the tests use both"
    deps = " ".join(project["dependencies"])
    assert "s3fs" not in deps and "netCDF4" not in deps
    assert "aiohttp>=3.12" in project["dependencies"]
    assert {"Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12"} <= (
        set(project["classifiers"])
    )
    assert set(project["urls"]) == {"Homepage", "Documentation", "Issues", "Changelog"}


def _definitions(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    for deployment in config["deployments"]:
        deployment["entrypoint"] = ENTRYPOINTS.get(
            deployment["entrypoint"], deployment["entrypoint"]
        )
    return config


def test_shipped_deployments_match_the_clones() -> None:
    """The package's prefect.yaml is the clone's deployments/prefect.yaml with module
    entrypoints: the same pool, pull step, schedule and parameters."""
    shipped = _definitions(PREFECT_FILE)
    assert shipped == _definitions(REPO / "deployments" / "prefect.yaml")
    assert {d["entrypoint"] for d in shipped["deployments"]} == set(ENTRYPOINTS.values())


def test_module_entrypoints_load_as_prefect_loads_them() -> None:
    # prefect deploy and the worker's flow run both load the entrypoint with this function.
    from prefect.flows import Flow, load_flow_from_entrypoint

    for entrypoint in ENTRYPOINTS.values():
        flow = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
        assert isinstance(flow, Flow)
