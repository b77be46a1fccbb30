"""The ``encoding`` transform's ``compression`` (transforms/registry.py): validated when the
request is, kept in its canonical form, and set on the variables it names only."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from zarr_parallel.errors import RequestError
from zarr_parallel.transforms.registry import COMPRESSION_ASKED, apply_transforms, validate_spec


def _dataset() -> xr.Dataset:
    data = np.zeros((2, 3), dtype="f4")
    return xr.Dataset({"t2m": (("time", "x"), data), "d2m": (("time", "x"), data)})


def test_a_variable_gets_its_own_codec() -> None:
    ds = _dataset()
    spec = validate_spec({"type": "encoding", "compression": "Zlib:1"}, "variables['t2m'][0]")
    assert spec["compression"] == "zlib:1"
    out = apply_transforms(ds[["t2m"]], [spec], "variables['t2m']", "t2m")
    assert out["t2m"].encoding[COMPRESSION_ASKED] == "zlib:1"
    assert COMPRESSION_ASKED not in ds["t2m"].encoding  # the input is not changed


def test_a_preprocessor_sets_every_data_variable() -> None:
    spec = validate_spec({"type": "encoding", "compression": "none"}, "preprocessors[0]")
    out = apply_transforms(_dataset(), [spec], "preprocessors")
    assert {out[v].encoding[COMPRESSION_ASKED] for v in ("t2m", "d2m")} == {"none"}


def test_a_bad_codec_is_refused_at_validation() -> None:
    with pytest.raises(RequestError, match=r"preprocessors\[1\]\.compression='zip'"):
        validate_spec({"type": "encoding", "compression": "zip"}, "preprocessors[1]")


def test_other_keys_are_still_refused() -> None:
    with pytest.raises(RequestError, match="are not encoding keys this transform sets"):
        apply_transforms(_dataset(), [{"type": "encoding", "compresion": "zlib"}], "preprocessors")
