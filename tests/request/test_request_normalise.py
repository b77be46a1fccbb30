"""The planner and the workers see the same request.

A request is planned from Python objects and shipped to the workers as JSON. These tests check
that the two agree: the fields are normalised once (dates to ISO strings, numpy scalars to Python
numbers, tuples to lists; NaN, infinities, non-string keys refused), so that building a request
from its fields and from the JSON round trip of their normal form gives the same request and the
same plan, and that what cannot round-trip is refused with a RequestError (exit 2, nothing
written). The end-to-end case is the one that broke: unquoted YAML dates in a ``sel``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from zarr_parallel.errors import RequestError
from zarr_parallel.orchestration.command import main
from zarr_parallel.request.model import CacheRequest, build_request
from zarr_parallel.request.normalise import normalise_fields
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.steps import make_plan

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies ----------------------------------------------------------------------------------

#: Inside the era5_files data: 2020-01-01T00 .. 2020-01-03T11, hourly.
_START = dt.datetime(2020, 1, 1)
_hours = st.integers(min_value=0, max_value=59)


def _time_forms(hour: int) -> st.SearchStrategy[Any]:
    """The same instant (or its day) spelled as the doors may give it."""
    t = _START + dt.timedelta(hours=hour)
    return st.sampled_from(
        [
            t,
            t.date(),
            np.datetime64(t, "h"),
            np.datetime64(t, "s"),
            pd.Timestamp(t),
            t.isoformat(),
            t.date().isoformat(),
        ]
    )


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    _finite,
    st.text(max_size=8),
    st.dates(),
    st.datetimes(),
    st.integers(min_value=-1000, max_value=1000).map(np.int64),
    st.integers(min_value=-1000, max_value=1000).map(np.int32),
    _finite.map(np.float64),
    st.booleans().map(np.bool_),
    st.text(max_size=4).map(np.str_),
)
#: Nested junk where a request holds free values (attributes).
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
    ),
    max_leaves=12,
)


@st.composite
def _fields(draw: st.DrawFn, era5_files: list[Path], cache: Path) -> dict[str, Any]:
    a, b = sorted(draw(st.lists(_hours, min_size=2, max_size=2)))
    return {
        "data_uri": draw(
            st.sampled_from([[str(p) for p in era5_files], tuple(str(p) for p in era5_files)])
        ),
        "cache_store": str(cache),
        "preprocessors": [
            {
                "type": "sel",
                "time": draw(st.sampled_from([list, tuple]))(
                    [draw(_time_forms(a)), draw(_time_forms(b))]
                ),
            }
        ],
        "chunks": {"time": draw(st.sampled_from([6, np.int64(12), np.int32(24), 12.0]))},
        "num_jobs": draw(st.sampled_from([None, 2, np.int64(3)])),
        "memory_limit": draw(st.sampled_from(["2GB", np.int64(2 * 10**9), 2e9, np.float64(2e9)])),
        "worker_timeout": draw(st.sampled_from(["30:00", 1800, np.float64(900.5), np.int16(600)])),
        "add_attrs": draw(st.dictionaries(st.text(max_size=6), _junk, max_size=4)),
        "deploy_mode": "series",
        "recommend_changes": "proceed",
    }


def _json_form(fields: dict[str, Any]) -> dict[str, Any]:
    """What a worker (or a Prefect parameter) gets: the JSON round trip of the normal form."""
    out = json.loads(json.dumps(normalise_fields(fields), allow_nan=False))
    assert isinstance(out, dict)
    return out


# -- properties ----------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_request_equals_its_json_form(
    era5_files: list[Path], tmp_path: Path, data: st.DataObject
) -> None:
    fields = data.draw(_fields(era5_files, tmp_path / "c.zarr"))
    normal = normalise_fields(fields)
    # The normal form is a fixed point of JSON (no NaN, no tuples, no dates, no numpy).
    assert json.loads(json.dumps(normal, allow_nan=False)) == normal
    req = build_request(**fields)
    assert req == build_request(**_json_form(fields))
    # ...and of the request as shipped to the workers.
    assert CacheRequest.model_validate_json(req.model_dump_json()) == req
    assert req.digest() == build_request(**_json_form(fields)).digest()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(a=_hours, b=_hours, data=st.data())
def test_plan_equals_the_workers_plan(
    era5_files: list[Path], tmp_path: Path, a: int, b: int, data: st.DataObject
) -> None:
    """The plan from the request equals the plan from the JSON the workers receive."""
    a, b = min(a, b), max(a, b)
    sel = [data.draw(_time_forms(a)), data.draw(_time_forms(b))]
    req = build_request(
        data_uri=[str(p) for p in era5_files],
        cache_store=str(tmp_path / "c.zarr"),
        preprocessors=[{"type": "sel", "time": sel}],
        deploy_mode="series",
        recommend_changes="proceed",
    )
    worker = CacheRequest.model_validate_json(req.model_dump_json())
    target, plan = make_plan(req)
    w_target, w_plan = make_plan(worker)
    assert dict(target.dataset.sizes) == dict(w_target.dataset.sizes)
    assert plan.jobs == w_plan.jobs and plan.fingerprint == w_plan.fingerprint


@pytest.mark.parametrize(
    ("fields", "parameter", "pattern"),
    [
        ({"worker_timeout": math.nan}, "worker_timeout", "not a finite number"),
        ({"memory_limit": math.inf}, "memory_limit", "not a finite number"),
        ({"add_attrs": {"x": [1, np.float64("nan")]}}, "add_attrs['x'][1]", "not a finite"),
        (
            {"preprocessors": [{"type": "sel", "latitude": (np.nan, 10)}]},
            "preprocessors[0].latitude[0]",
            "not a finite number",
        ),
        ({"variables": {10: {}}}, "variables", "key that is not a string"),
        ({"add_attrs": {"s": {1, 2}}}, "add_attrs['s']", "is a set"),
        ({"add_attrs": {"b": b"x"}}, "add_attrs['b']", "is a bytes"),
        ({"add_attrs": {"t": np.datetime64("NaT")}}, "add_attrs['t']", "NaT"),
        ({"add_attrs": {"d": dt.timedelta(hours=1)}}, "add_attrs['d']", "time span"),
        ({"add_attrs": {"c": 1j}}, "add_attrs['c']", "is a complex"),
        ({"tiles": {"latitude": 8, "fill_value": math.inf}}, "tiles.fill_value", "finite"),
    ],
    ids=[
        "timeout-nan",
        "memory-inf",
        "attr-nan",
        "sel-nan",
        "int-key",
        "set",
        "bytes",
        "nat",
        "timedelta",
        "complex",
        "fill-inf",
    ],
)
def test_refused_values(
    era5_files: list[Path], tmp_path: Path, fields: dict[str, Any], parameter: str, pattern: str
) -> None:
    base = {"data_uri": str(era5_files[0]), "cache_store": str(tmp_path / "c.zarr")}
    with pytest.raises(RequestError, match=pattern) as info:
        build_request(**{**base, **fields})
    assert info.value.parameter == parameter and info.value.fix
    assert not (tmp_path / "c.zarr").exists()


def test_nan_fill_value_is_none(era5_files: list[Path], tmp_path: Path) -> None:
    """NaN means something as tiles.fill_value: it is spelled None there (JSON has no NaN)."""
    req = build_request(
        data_uri=str(era5_files[0]),
        cache_store=str(tmp_path / "c.zarr"),
        tiles={"latitude": 8, "edge": "pad", "fill_value": np.float32("nan")},
    )
    assert req.tiles is not None and req.tiles["fill_value"] is None
    assert CacheRequest.model_validate_json(req.model_dump_json()) == req


# -- the unquoted YAML date, end to end ----------------------------------------------------------


def test_unquoted_yaml_dates_plan_and_write_the_same(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``time: [2020-01-02, 2020-01-03]`` (YAML dates) means what the quoted strings mean.

    Before, the planner selected up to midnight of 2020-01-03 (25 steps) while the workers got
    strings and selected the whole day; the run failed and every rerun with it.
    """
    folder = tmp_path / "req"
    folder.mkdir()
    path = folder / "request.yaml"
    path.write_text(
        f"data_uri: {era5_files[0].parent}/era5_like_*.nc\n"
        "cache_store: out/dates.zarr\n"
        "deploy_mode: series\n"
        "chunks: {time: 12}\n"
        "preprocessors:\n"
        "  - type: sel\n"
        "    time: [2020-01-02, 2020-01-03]\n"
    )
    assert isinstance(yaml.safe_load(path.read_text())["preprocessors"][0]["time"][0], dt.date)
    req = load_request_file(path)
    assert req.preprocessors[0]["time"] == ["2020-01-02", "2020-01-03"]
    _, plan = make_plan(req)
    planned = max(stop for j in plan.jobs for d, _, stop in j.region if d == "time")
    # The data ends at 2020-01-03T11: the whole of 2020-01-02 and the morning of 2020-01-03.
    assert planned == 36

    assert main(["plan", str(path)]) == 0
    assert not (folder / "out").exists(), "plan writes nothing"
    capsys.readouterr()
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    with xr.open_zarr(folder / "out" / "dates.zarr") as ds:
        assert ds.sizes["time"] == planned
        assert str(ds.time.values[0])[:13] == "2020-01-02T00"
        assert str(ds.time.values[-1])[:13] == "2020-01-03T11"
    capsys.readouterr()
    assert main(["run", str(path)]) == 0  # the rerun agrees with what was written
    assert "up to date" in capsys.readouterr().out


def test_python_objects_and_their_json_form_make_one_cache(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """A run from numpy/pandas values, then its JSON form on the same path: up to date."""
    from zarr_parallel.api import ZarrParallelAssembler

    cache = tmp_path / "np.zarr"
    init = {
        "data_uri": tuple(str(p) for p in era5_files),
        "preprocessors": [
            {"type": "sel", "time": (pd.Timestamp("2020-01-01T06"), np.datetime64("2020-01-02"))}
        ],
        "chunks": {"time": np.int64(6)},
        "variables": ["t2m"],
    }
    first = ZarrParallelAssembler(**init).cache(cache_store=str(cache), deploy_mode="series")
    assert first.status == "done"
    again = ZarrParallelAssembler(**_json_form(init)).cache(
        cache_store=str(cache), deploy_mode="series"
    )
    assert again.status == "up to date"
    with xr.open_zarr(cache) as ds:
        assert ds.sizes["time"] == 42  # 2020-01-01T06 .. the end of 2020-01-02


# -- fuzzing the request-file loader -------------------------------------------------------------

_FIELDS = [
    "add_attrs",
    "chunks",
    "num_jobs",
    "worker_timeout",
    "memory_limit",
    "preprocessors",
    "open_options",
    "tiles",
    "keep_versions",
    "unknown_field",
]
_yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(width=64),  # NaN and infinities included
    st.text(alphabet="abcxyz_-./ 0123456789:", max_size=10),
    st.dates(min_value=dt.date(1900, 1, 1)),
    st.datetimes(min_value=dt.datetime(1900, 1, 1)),
)
_yaml_junk = st.recursive(
    _yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text("abc", min_size=1, max_size=3), st.integers(0, 9)), inner, max_size=3
        ),
    ),
    max_leaves=10,
)
_MUTATIONS = [
    "",
    "num_jobs: 2\nnum_jobs: 3\n",  # a repeated key
    "add_attrs: {a: &x [1, 2], b: *x}\n",  # an alias
    "open_options: {x: &a [1, 1, 1], y: &b [*a, *a, *a], z: [*b, *b, *b]}\n",  # a small bomb
    "add_attrs: {<<: {a: 1}}\n",  # a merge key
    "chunks: {time: true}\n",
    "worker_timeout: .nan\n",
    "preprocessors: [{type: sel, time: [2020-01-02, 2020-01-02 06:00:00]}]\n",
]


@FAST
@given(
    fields=st.dictionaries(st.sampled_from(_FIELDS), _yaml_junk, max_size=4),
    mutation=st.sampled_from(_MUTATIONS),
)
def test_fuzzed_request_files(
    era5_files: list[Path], tmp_path: Path, fields: dict[str, Any], mutation: str
) -> None:
    """Each request file is refused (RequestError, nothing written) or equals its JSON form."""
    cache = tmp_path / "fuzz" / "c.zarr"
    body = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) if fields else ""
    text = f"data_uri: {era5_files[0]}\ncache_store: {cache}\n" + body + mutation
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        req = load_request_file(path)
    except RequestError as e:
        assert e.parameter and e.fix
        assert not cache.parent.exists()
        return
    plain = yaml.safe_load(text)  # accepted: no aliases or repeated keys to differ on
    assert req == build_request(base_dir=path.parent.resolve(), **_json_form(plain))
    assert CacheRequest.model_validate_json(req.model_dump_json()) == req
    assert not cache.parent.exists()


def test_alias_bomb_is_refused_fast(era5_files: list[Path], tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text(
        f"data_uri: {era5_files[0]}\ncache_store: {tmp_path / 'c.zarr'}\nopen_options:\n"
        + "".join(f"  {line}\n" for line in lines)
    )
    started = time.monotonic()
    with pytest.raises(RequestError, match=r"alias \*a0 on line 5"):
        load_request_file(path)
    assert time.monotonic() - started < 2


# -- fuzzed request files, run for real -----------------------------------------------------------

#: The loader fuzz's fields, less those whose effect depends on timing or size rather than on
#: the request's meaning (a fuzzed worker_timeout of 1 s may or may not fire; num_jobs: 900000
#: plans as many jobs as there are chunks): the loader fuzz above covers them.
_RUN_FIELDS = [f for f in _FIELDS if f not in ("worker_timeout", "num_jobs")]
_RUN_MUTATIONS = [
    *_MUTATIONS,
    "add_attrs: {when: 2020-01-02, at: 2020-01-02 06:00:00, nested: [{x: [1.5, null]}]}\n",
    "preprocessors: [{type: sel, time: [2020-01-01 18:00:00, 2020-01-02]}]\nkeep_versions: 2\n",
]
_runs: list[int] = []  # one folder per example (hypothesis reuses the test's tmp_path)


def _cli(*argv: str) -> int:
    """``python -m flows.cache ...`` in this process (as the other CLI tests run it)."""
    return main(list(argv))


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@example(fields={}, mutation=_RUN_MUTATIONS[-1])  # unquoted YAML dates in a sel: the bug
@example(
    fields={"add_attrs": {"a": [dt.date(1999, 12, 31), None, -1.5, {"b": "x y"}]}},
    mutation=_RUN_MUTATIONS[-2],
)
@given(
    fields=st.dictionaries(st.sampled_from(_RUN_FIELDS), _yaml_junk, max_size=2),
    mutation=st.sampled_from(_RUN_MUTATIONS),
)
def test_fuzzed_request_files_run_as_their_normal_form(
    era5_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fields: dict[str, Any],
    mutation: str,
) -> None:
    """A fuzzed request file, run: exit 2 and nothing written, or a cache byte-identical to the
    one its normalised JSON form gives (run as a second file, to a second cache path)."""
    files = era5_factory(n_files=2, steps_per_file=24, nlat=6, nlon=8, chunks=(6, 6, 8))
    _runs.append(len(_runs))
    folder = tmp_path / f"run{_runs[-1]}"
    folder.mkdir()
    first, second = folder / "yaml" / "c.zarr", folder / "json" / "c.zarr"
    body = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) if fields else ""
    head = "deploy_mode: series\nrecommend_changes: proceed\n"
    text = f"data_uri: {files[0].parent}/era5_like_*.nc\ncache_store: {first}\n{head}{body}"
    path = folder / "request.yaml"
    path.write_text(text + mutation)
    code = _cli("run", str(path))
    err = capsys.readouterr().err
    event(f"exit {code}")
    json_path = folder / "request.json"
    if code == 2:
        assert "invalid request:" in err and "Traceback" not in err, err[-2000:]
        assert not first.parent.exists(), "a refused request writes nothing"
        if f"request={str(path)!r}" in err:
            return  # refused as YAML (an alias, a repeated key): it has no one normal form
        try:
            normal = _json_form({**yaml.safe_load(text + mutation), "cache_store": str(second)})
        except (RequestError, ValueError):
            return  # the normal form itself is refused
        # A request is refused exactly when its normal form is.
        json_path.write_text(json.dumps(normal))
        assert _cli("run", str(json_path)) == 2, capsys.readouterr().err[-3000:]
        assert not second.parent.exists()
        return
    assert code == 0, err[-3000:]
    assert first.is_symlink(), "a run that exits 0 publishes its cache"
    # Accepted: the normal form (plain YAML, since the loader accepted no alias or repeated
    # key), as JSON, is the same request; run it to another path.
    normal = _json_form({**yaml.safe_load(text + mutation), "cache_store": str(second)})
    json_path.write_text(json.dumps(normal))
    assert _cli("run", str(json_path)) == 0, capsys.readouterr().err[-3000:]
    from zarr_parallel.run.verify import cache_differences

    assert cache_differences(first, second) == []
    with xr.open_zarr(first) as a, xr.open_zarr(second) as b:
        # Root attributes (add_attrs) are outside cache_differences; provenance names the path.
        assert {k: v for k, v in a.attrs.items() if not k.startswith("zarr_parallel")} == {
            k: v for k, v in b.attrs.items() if not k.startswith("zarr_parallel")
        }
        assert a.sizes == b.sizes
