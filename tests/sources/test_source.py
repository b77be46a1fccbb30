"""Source inspection: the layout read from the files' real HDF5 chunking, each file opened once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.request.model import build_request
from zarr_parallel.sources import combine, layout, remote, source


def test_layout_opens_each_file_once(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two variables in three files: each file is opened twice (once by xarray, once for its
    chunk layout), not once per variable more (a remote file costs round trips)."""
    opened: list[str] = []
    real = remote.readable_file

    def counting(uri: str, req: Any) -> Any:
        opened.append(uri)
        return real(uri, req)

    # xarray opens the files through combine, the chunk layout is read through layout.
    monkeypatch.setattr(combine, "readable_file", counting)
    monkeypatch.setattr(layout, "readable_file", counting)
    req = build_request(data_uri=[str(p) for p in era5_files], cache_store=str(tmp_path / "c"))
    src = source.open_source(req)
    assert Counter(opened) == {str(p): 2 for p in era5_files}
    assert set(src.layout.variables) == {"t2m", "d2m"}
    for var in src.layout.variables.values():
        # HDF5 chunks of 6 steps in files of 24, 24 and 12 steps; 40 of 73 rows; 72 of 144.
        assert var.boundaries[0] == (*range(0, 60, 6), 60)
        assert var.boundaries[1:] == ((0, 40, 73), (0, 72, 144))
