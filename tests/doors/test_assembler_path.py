"""zarr-parallel 0.5's import path of the Python door still works, and stays light to import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import zarr_parallel
import zarr_parallel.assembler as assembler
from zarr_parallel.api import ZarrParallelAssembler


def test_the_05_import_path_names_the_door() -> None:
    from zarr_parallel.assembler import ZarrParallelAssembler as Old

    assert Old is ZarrParallelAssembler is zarr_parallel.ZarrParallelAssembler
    assert "ZarrParallelAssembler" in dir(assembler)


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match=r"assembler' has no attribute 'Region'"):
        assembler.Region  # noqa: B018
    with pytest.raises(ImportError):
        from zarr_parallel.assembler import Region  # noqa: F401


def test_importing_the_module_loads_no_heavy_library() -> None:
    """Like ``import zarr_parallel``: xarray, zarr, dask and Prefect load on first use only."""
    code = textwrap.dedent(
        """
        import sys
        import zarr_parallel.assembler
        heavy = {"xarray", "zarr", "dask", "prefect", "zarr_parallel.api"} & set(sys.modules)
        assert not heavy, sorted(heavy)
        from zarr_parallel.assembler import ZarrParallelAssembler
        assert "zarr_parallel.api" in sys.modules and ZarrParallelAssembler.__name__
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
