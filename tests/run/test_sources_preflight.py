"""Pre-flight space and inode checks on a real small filesystem (a tmpfs mounted for the test).

Mounting needs root with permission to mount (this machine and CI have both). Where mounting is
refused, the space test falls back to the real filesystem under the test's temporary folder: it
reads its free space and sets ``free_space_reserve`` so that less than the new version is left.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sources_support import RUN
from zarr_parallel import RunFailed, ZarrParallelAssembler
from zarr_parallel.request.model import build_request
from zarr_parallel.run.preflight import InsufficientSpace, check_space, free_space
from zarr_parallel.run.steps import make_plan
from zarr_parallel.sources.target import cached_source
from zarr_parallel.store.paths import resolve_paths

IN_CI = os.environ.get("CI", "").lower() == "true"


@contextmanager
def small_filesystem(folder: Path, size: str, inodes: int) -> Iterator[Path | None]:
    """A tmpfs of ``size`` bytes and ``inodes`` inodes mounted at ``folder/mnt`` (None if
    mounting is not permitted here)."""
    mnt = folder / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_refuses_when_space_is_short(era5_files: list[Path], tmp_path: Path) -> None:
    files = [str(f) for f in era5_files]
    with small_filesystem(tmp_path, "1m", 1000) as mnt:
        if mnt is not None:
            cache, reserve = mnt / "era5.zarr", "0"
        else:  # fallback: a real filesystem with all but 100 kB of its free space reserved
            cache = tmp_path / "era5.zarr"
            reserve = str(free_space(tmp_path).bytes - 100_000)
        with pytest.raises(InsufficientSpace, match=r"is needed but .* is free") as e:
            ZarrParallelAssembler(files, chunks={"time": 12}).cache(
                cache_store=str(cache), free_space_reserve=reserve, **RUN
            )
        err = e.value
        assert err.parameter == "cache_store"
        assert err.needed is not None and err.free is not None
        assert err.needed.bytes > err.free.bytes - int(reserve)
        assert f"{err.needed.bytes} bytes" in str(err)
        # Nothing was written.
        assert not cache.exists() and not Path(f"{cache}.versions").exists()
        # The escape hatch for filesystems that report wrong figures is explicit.
        if mnt is None:
            return
        with pytest.raises(RunFailed):  # it really does not fit: the writes fail
            ZarrParallelAssembler(files, chunks={"time": 12}).cache(
                cache_store=str(cache), check_free_space=False, **RUN
            )


def test_refuses_when_inodes_are_short(era5_files: list[Path], tmp_path: Path) -> None:
    files = [str(f) for f in era5_files]
    with small_filesystem(tmp_path, "64m", 60) as mnt:
        if mnt is None:
            if IN_CI:
                pytest.fail("mounting a tmpfs is not permitted on this CI machine")
            pytest.skip("mounting a tmpfs is not permitted here")
        cache = mnt / "era5.zarr"
        # 6 x 40 x 72 chunks: 10 x 2 x 2 files per variable, more than 60 inodes.
        with pytest.raises(InsufficientSpace, match=r"files and folders are needed .* inodes"):
            ZarrParallelAssembler(files, chunks={"time": 6, "latitude": 40, "longitude": 72}).cache(
                cache_store=str(cache), **RUN
            )
        assert not Path(f"{cache}.versions").exists()


def _usage(folder: Path) -> tuple[int, int]:
    """Bytes allocated (st_blocks) and inodes used by everything under ``folder``."""
    nbytes, inodes = 0, 0
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            st = os.lstat(os.path.join(root, name))
            nbytes += st.st_blocks * 512
            inodes += 1
    return nbytes, inodes


@pytest.mark.parametrize("keep_packing", [False, True])
def test_estimate_is_an_upper_bound_of_what_a_run_uses(
    era5_factory: object, tmp_path: Path, keep_packing: bool
) -> None:
    files = [str(f) for f in era5_factory(n_files=2, steps_per_file=24, packed=True)]  # type: ignore[operator]
    folder = tmp_path / "out"
    folder.mkdir()
    req = build_request(
        data_uri=files,
        chunks={"time": 12, "latitude": 37},
        keep_packing=keep_packing,
        cache_store=str(folder / "c.zarr"),
        **RUN,
    )
    target, plan = make_plan(req)
    estimate = check_space(req, resolve_paths(req), target, plan, cached_source(req))
    ZarrParallelAssembler(
        files, chunks={"time": 12, "latitude": 37}, keep_packing=keep_packing
    ).cache(cache_store=str(folder / "c.zarr"), **RUN)
    used_bytes, used_inodes = _usage(folder)
    assert used_bytes <= estimate.bytes, (used_bytes, estimate)
    assert used_inodes <= estimate.inodes, (used_inodes, estimate)
    # An upper bound, not a wild one.
    assert estimate.bytes <= 3 * used_bytes and estimate.inodes <= 2 * used_inodes, estimate
