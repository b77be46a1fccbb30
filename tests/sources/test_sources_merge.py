"""Files that hold different variables (one variable per file, as ERA5 downloads and CMIP6 come):
merged by variable and joined along time, each variable's chunk grid from its own files; the
errors where grids or steps disagree; steps only some variables have yet are left out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from sources_support import write_variable_month
from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import build_request
from zarr_parallel.run.steps import make_plan
from zarr_parallel.sources.fastread import fast_plan
from zarr_parallel.sources.identity import job_entries
from zarr_parallel.sources.layout import SourceLayout
from zarr_parallel.sources.source import open_source


def _folder(tmp_path: Path, months: dict[str, tuple[int, ...]], **kwargs: object) -> Path:
    """``t2m`` chunked 4 steps, ``d2m`` 2 steps per HDF5 chunk: each keeps its own grid."""
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    for var, wanted in months.items():
        for m in wanted:
            chunk = 4 if var == "t2m" else 2
            write_variable_month(folder, var, m, time_chunk=chunk, **kwargs)  # type: ignore[arg-type]
    return folder


def _open(folder: Path, **extra: object) -> tuple[xr.Dataset, SourceLayout]:
    req = build_request(
        data_uri=str(folder / "*.nc"), cache_store=str(folder.parent / "c.zarr"), **extra
    )
    src = open_source(req)
    return src.dataset, src.layout


THREE = {"t2m": (1, 2, 3), "d2m": (1, 2, 3)}


def test_merged_source_equals_open_mfdataset(tmp_path: Path) -> None:
    folder = _folder(tmp_path, THREE)
    ds, layout = _open(folder)
    files = sorted(str(p) for p in folder.glob("*.nc"))
    with xr.open_mfdataset(files, combine="by_coords") as expected:
        xr.testing.assert_identical(ds.load(), expected.load())
        for name in expected.variables:
            assert ds[name].dtype == expected[name].dtype
    groups = {g.variables: [Path(f).name for f in g.files] for g in layout.groups}
    assert groups == {
        ("d2m",): ["d2m_2020-01.nc", "d2m_2020-02.nc", "d2m_2020-03.nc"],
        ("t2m",): ["t2m_2020-01.nc", "t2m_2020-02.nc", "t2m_2020-03.nc"],
    }
    # Each variable's chunk grid comes from its own files: 4 steps for t2m, 2 for d2m, with
    # the month boundaries (124 and 240 six-hourly steps) as chunk ends.
    t2m, d2m = layout.variables["t2m"], layout.variables["d2m"]
    assert set(np.diff(t2m.boundaries[0])) == {4} and 124 in t2m.boundaries[0]
    assert set(np.diff(d2m.boundaries[0])) == {2} and 240 in d2m.boundaries[0]
    assert t2m.boundaries[0][-1] == d2m.boundaries[0][-1] == ds.sizes["time"] == 364


def test_a_job_checks_only_its_variables_files(tmp_path: Path) -> None:
    folder = _folder(tmp_path, THREE)
    _, layout = _open(folder)
    planned = layout.to_json()
    names = [Path(f).name for f in job_entries(planned, None, ["d2m"], (120, 130))]
    assert names == ["d2m_2020-01.nc", "d2m_2020-02.nc"]
    both = [Path(f).name for f in job_entries(planned, None, ["t2m", "d2m"], (0, 10))]
    assert sorted(both) == ["d2m_2020-01.nc", "t2m_2020-01.nc"]


def test_aligned_plan_reads_each_variables_chunks_once(tmp_path: Path) -> None:
    folder = _folder(tmp_path, THREE)
    req = build_request(
        data_uri=str(folder / "*.nc"),
        cache_store=str(tmp_path / "c.zarr"),
        chunks={"time": 8},
        deploy_mode="series",
        memory_limit="300MB",
        num_jobs=3,
    )
    target, plan = make_plan(req)
    assert plan.read_amplification == pytest.approx(1.0)
    assert plan.read_bytes == plan.needed_bytes
    assert {a.name for a in target.array_inputs()} == {"t2m", "d2m"}


def test_steps_only_some_variables_have_are_left_out_and_reported(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2, 3), "d2m": (1, 2)})
    ds, layout = _open(folder)
    assert ds.sizes["time"] == 124 + 116
    assert str(ds.time.values[-1]).startswith("2020-02-29T18")
    names = [Path(f).name for f in layout.files]
    assert "t2m_2020-03.nc" not in names and len(names) == 4
    (note,) = layout.pending
    assert "124 step(s) of t2m" in note and "t2m_2020-03.nc" in note and "until d2m" in note
    assert layout.variables["t2m"].boundaries[0][-1] == 240


def test_a_static_variable_comes_from_one_file(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2), "d2m": (1, 2)})
    lsm = xr.Dataset(
        {"lsm": (("latitude", "longitude"), np.ones((7, 8), "float32"))},
        coords={"latitude": np.linspace(60.0, 30.0, 7), "longitude": np.arange(0.0, 40.0, 5.0)},
    )
    lsm.to_netcdf(folder / "lsm.nc", engine="netcdf4")
    ds, layout = _open(folder)
    assert ds["lsm"].dims == ("latitude", "longitude") and ds.sizes["time"] == 240
    (group,) = [g for g in layout.groups if "lsm" in g.variables]
    assert [Path(f).name for f in group.files] == ["lsm.nc"]


# ---------------------------------------------------------------------------------------------
# Errors: the files and the parameter named, with the fix


def test_different_grids_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2)})
    for m in (1, 2):
        write_variable_month(folder, "d2m", m, latitude=np.linspace(60.0, 30.0, 13))
    with pytest.raises(
        RequestError, match=r"different grids: 'latitude' has 13 values .* but 7 values"
    ) as e:
        _open(folder)
    assert e.value.parameter == "data_uri"
    assert "d2m_2020-01.nc" in str(e.value) and "t2m_2020-01.nc" in str(e.value)
    assert "separate requests" in e.value.fix


def test_other_steps_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2)})
    for m in (1, 2):
        write_variable_month(folder, "d2m", m, freq="3h")
    with pytest.raises(RequestError, match=r"steps along 'time' disagree") as e:
        _open(folder)
    assert "t2m has no step time=2020-01-01 03:00:00" in str(e.value)
    assert e.value.parameter == "data_uri" and "same steps" in e.value.fix


def test_a_gap_in_one_variable_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2, 3), "d2m": (1, 3)})
    with pytest.raises(RequestError, match=r"d2m has no step time=2020-02-01 00:00:00") as e:
        _open(folder)
    assert "t2m_2020-02.nc" in str(e.value) and "d2m_2020-03.nc" in str(e.value)
    assert "a gap" in str(e.value)


def test_duplicated_steps_of_one_variable_are_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2), "d2m": (1, 2)})
    shutil.copyfile(folder / "d2m_2020-01.nc", folder / "d2m_2020-01b.nc")
    with pytest.raises(RequestError, match=r"'d2m' is in both .* for the same steps") as e:
        _open(folder)
    assert "d2m_2020-01.nc" in str(e.value) and "d2m_2020-01b.nc" in str(e.value)
    assert e.value.fix == "Leave one of the two files out of data_uri"
    # A copy of a later month: found while joining d2m's files.
    (folder / "d2m_2020-01b.nc").unlink()
    shutil.copyfile(folder / "d2m_2020-02.nc", folder / "d2m_2020-02b.nc")
    with pytest.raises(RequestError, match=r"appears twice|'d2m' is in both"):
        _open(folder)


def test_a_variable_in_two_groups_for_the_same_steps_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path, {"t2m": (1, 2), "d2m": (1, 2)})
    with xr.open_mfdataset([folder / "t2m_2020-01.nc", folder / "d2m_2020-01.nc"]) as both:
        both.load().to_netcdf(folder / "both_2020-01.nc", engine="netcdf4")
    with pytest.raises(RequestError, match=r"variable '(t2m|d2m)' is in both") as e:
        _open(folder)
    assert "both_2020-01.nc" in str(e.value) and "for the same steps" in str(e.value)
    assert "drop_variables" in e.value.fix


def test_one_file_per_variable_merges_without_joining(tmp_path: Path) -> None:
    """``t2m.nc`` and ``d2m.nc`` for the same month: merged, no record dimension to join along;
    each variable read (fast path too) from its own file."""
    folder = _folder(tmp_path, {"t2m": (1,), "d2m": (1,)})
    ds, layout = _open(folder)
    assert layout.concat_dim is None
    with xr.open_mfdataset(sorted(str(p) for p in folder.glob("*.nc"))) as expected:
        xr.testing.assert_identical(ds.load(), expected.load())
    assert [Path(f).name for f in layout.files_of("d2m")] == ["d2m_2020-01.nc"]
    assert layout.variables["d2m"].boundaries[0][:3] == (0, 2, 4)
    assert layout.variables["t2m"].boundaries[0][:3] == (0, 4, 8)
    req = build_request(
        data_uri=str(folder / "*.nc"),
        cache_store=str(tmp_path / "c.zarr"),
        deploy_mode="series",
        memory_limit="300MB",
    )
    target, plan = make_plan(req)
    assert plan.read_amplification == pytest.approx(1.0)
    fast = {name: fast_plan(target, req, name) for name in ("t2m", "d2m")}
    assert {n: [Path(f).name for f in fv.files] for n, fv in fast.items() if fv} == {
        "t2m": ["t2m_2020-01.nc"],
        "d2m": ["d2m_2020-01.nc"],
    }


def _cmip_year(folder: Path, var: str, year: int, shift: float = 0.0) -> Path:
    """A CMIP6-like file: one variable with the ``time_bnds`` and ``lat_bnds`` every file of
    the dataset carries (named by the coordinates' ``bounds`` attributes)."""
    times = pd.date_range(f"{year}-01-01", periods=12, freq="MS")
    ends = times + pd.offsets.MonthBegin(1)
    lat = np.linspace(-60.0, 60.0, 7)
    rng = np.random.default_rng(year + len(var))
    ds = xr.Dataset(
        {
            var: (("time", "lat", "lon"), rng.random((12, 7, 8), "float32")),
            "time_bnds": (("time", "bnds"), np.stack([times.values, ends.values], axis=1)),
            "lat_bnds": (("lat", "bnds"), np.stack([lat - 10 + shift, lat + 10], axis=1)),
        },
        coords={"time": times, "lat": lat, "lon": np.arange(0.0, 360.0, 45.0)},
    )
    ds["time"].attrs["bounds"] = "time_bnds"
    ds["lat"].attrs["bounds"] = "lat_bnds"
    path = folder / f"{var}_Amon_{year}.nc"
    ds.to_netcdf(
        path,
        engine="netcdf4",
        encoding={
            "time": {"units": "days since 2000-01-01", "dtype": "int64"},
            "time_bnds": {"units": "days since 2000-01-01", "dtype": "int64"},
            var: {"chunksizes": (3, 7, 8), "zlib": True},
        },
    )
    return path


def test_cmip6_bounds_shared_by_every_file_are_read_once(tmp_path: Path) -> None:
    folder = tmp_path / "cmip"
    folder.mkdir()
    files = {v: [_cmip_year(folder, v, y) for y in (2000, 2001)] for v in ("tas", "pr")}
    ds, layout = _open(folder)
    per_var = [
        xr.open_mfdataset(fs, data_vars="minimal", coords="minimal", compat="override").load()
        for fs in files.values()
    ]
    expected = xr.merge(per_var, compat="override", join="exact")
    assert set(ds.data_vars) == {"tas", "pr", "time_bnds", "lat_bnds"}
    for name in expected.variables:
        xr.testing.assert_equal(ds[name].load(), expected[name])
        assert ds[name].dtype == expected[name].dtype
    # The bounds come from one variable's files (checked equal in the others).
    (bounds,) = [g for g in layout.groups if "time_bnds" in g.variables]
    assert len(bounds.files) == 2
    # Bounds that differ between the files are refused.
    other = tmp_path / "other" / "cmip"
    other.mkdir(parents=True)
    for f in [*files["tas"], files["pr"][1]]:
        shutil.copyfile(f, other / f.name)
    _cmip_year(other, "pr", 2000, shift=1.0)
    with pytest.raises(RequestError, match=r"'lat_bnds', which files of different variables"):
        _open(other)
