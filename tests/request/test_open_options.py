"""Sources are opened read-only: ``open_options`` holds reading options only.

On the old code ``open_options: {mode: w}`` reached xarray: ``plan`` (which promises to write
nothing) truncated a netCDF source to 239 bytes (netCDF4 engine) and emptied a Zarr store. Each
test hashes every byte of the source before and after.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import yaml

from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.errors import RequestError
from zarr_parallel.orchestration.command import main
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.request.open_options import ALLOWED, check_open_options, read_only
from zarr_parallel.run.steps import prepare


def _digest(path: Path) -> str:
    """SHA-256 over every file's relative name and bytes (a file or a whole store)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def sources(era5_files: list[Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of one netCDF file and a Zarr store made from it."""
    nc = tmp_path / "src" / "one.nc"
    nc.parent.mkdir()
    shutil.copy(era5_files[0], nc)
    store = tmp_path / "src" / "one.zarr"
    with xr.open_dataset(nc) as ds:
        ds.to_zarr(store, consolidated=False)
    return {"netcdf4": nc, "h5netcdf": nc, "zarr": store}


CASES = [("netcdf4", {"mode": "w"}), ("h5netcdf", {"mode": "w"}), ("zarr", {"mode": "w"})]
CASES += [("zarr", {"mode": "w-"}), ("netcdf4", {"clobber": True, "mode": "a"})]
CASES += [("zarr", {"backend_kwargs": {"mode": "w"}}), ("h5netcdf", {"format": "NETCDF3"})]


def _fields(source: Path, engine: str, options: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {
        "data_uri": str(source),
        "engine": engine,
        "open_options": options,
        "cache_store": str(tmp_path / "out" / "c.zarr"),
        "deploy_mode": "series",
    }


@pytest.mark.parametrize(("engine", "options"), CASES)
def test_plan_cli_refuses_writing_options_and_leaves_the_source_unchanged(
    sources: dict[str, Path],
    engine: str,
    options: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = sources[engine]
    before = _digest(source)
    request = tmp_path / "request.yaml"
    request.write_text(yaml.safe_dump(_fields(source, engine, options, tmp_path)))
    assert main(["plan", str(request)]) == 2
    err = capsys.readouterr().err
    key = next(iter(options))
    assert f"open_options['{key}']" in err and "allowed open_options are" in err
    assert "decode_times" in err  # the allowed keys are listed
    assert _digest(source) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("engine", "options"), CASES[:3])
def test_python_api_refuses_writing_options(
    sources: dict[str, Path], engine: str, options: dict[str, Any], tmp_path: Path
) -> None:
    source = sources[engine]
    before = _digest(source)
    with pytest.raises(RequestError, match=r"open_options\['mode'\]") as info:
        ZarrParallelAssembler(str(source), engine=engine, open_options=options).cache(
            cache_store=str(tmp_path / "out" / "c.zarr"), deploy_mode="series"
        )
    assert info.value.parameter == "open_options['mode']"
    assert info.value.value == "w"
    assert "decode_times" in info.value.fix
    assert _digest(source) == before


@pytest.mark.parametrize("engine", ["netcdf4", "zarr"])
def test_unvalidated_request_still_opens_read_only(
    sources: dict[str, Path], engine: str, tmp_path: Path
) -> None:
    """A request that skipped validation (built directly) is refused where the source opens."""
    source = sources[engine]
    before = _digest(source)
    req = CacheRequest(**_fields(source, engine, {"mode": "w"}, tmp_path))
    with pytest.raises(RequestError, match=r"open_options\['mode'\]"):
        prepare(req)
    assert _digest(source) == before


def test_mode_is_forced_to_read() -> None:
    assert read_only("zarr", {"decode_times": False}) == {"decode_times": False, "mode": "r"}
    assert read_only("netcdf4", {})["mode"] == "r"
    assert read_only("kerchunk", {})["mode"] == "r"
    assert "mode" not in read_only("h5netcdf", {})  # its backend has no mode: it only reads


@pytest.mark.parametrize(
    ("engine", "options", "message"),
    [
        ("zarr", {"chunks": {"time": 1}}, "is not a reading option"),
        ("kerchunk", {"consolidated": True}, "is not a reading option"),
        ("netcdf4", {"phony_dims": "sort"}, "is not a reading option"),
        ("h5netcdf", {"decode_times": "yes"}, "must be true/false"),
        ("h5netcdf", {"drop_variables": 3}, "must be a variable name"),
        ("zarr", {"zarr_format": 4}, "must be 2 or 3"),
    ],
)
def test_other_refusals(engine: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        check_open_options(engine, options)


def test_every_allowed_option_is_a_keyword_of_the_backend() -> None:
    """The allow-list names only options xarray's backends (or open_dataset) take."""
    import inspect

    from xarray.backends import plugins

    general = set(inspect.signature(xr.open_dataset).parameters)
    for engine, table in ALLOWED.items():
        backend = plugins.list_engines()["zarr" if engine == "kerchunk" else engine]
        known = general | set(inspect.signature(backend.open_dataset).parameters)
        assert set(table) <= known, (engine, set(table) - known)
        assert "mode" not in table


@pytest.mark.parametrize("engine", ["h5netcdf", "netcdf4", "zarr"])
def test_an_allowed_option_still_works(
    sources: dict[str, Path], engine: str, tmp_path: Path
) -> None:
    source = sources[engine]
    before = _digest(source)
    fields = _fields(source, engine, {"drop_variables": ["d2m"], "decode_times": True}, tmp_path)
    result = ZarrParallelAssembler(**{k: fields.pop(k) for k in ("data_uri", "engine")}).cache(
        **{**fields, "memory_limit": "300MB"}
    )
    assert result.status == "done"
    opts = {"consolidated": False} if engine == "zarr" else {}
    with xr.open_zarr(result.path) as cache, xr.open_dataset(source, engine=engine, **opts) as src:
        assert list(cache.data_vars) == ["t2m"]
        xr.testing.assert_equal(cache.t2m.load(), src.t2m.load())
    assert _digest(source) == before


def test_validation_checks_the_detected_engine(sources: dict[str, Path], tmp_path: Path) -> None:
    """Without ``engine``, the engine detected from ``data_uri`` decides what is allowed."""
    fields = _fields(sources["zarr"], "zarr", {"phony_dims": "sort"}, tmp_path)
    del fields["engine"]
    with pytest.raises(RequestError, match="reading option of the zarr engine"):
        build_request(**fields)
