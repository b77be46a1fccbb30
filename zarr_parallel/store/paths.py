"""Where a cache lives (:class:`CachePaths`), which versions are its own, and the final path.

A version is this cache's when its manifest names the cache path (or, while zarr was creating
it, its pending record does): only those are ever listed, continued, cleaned or pruned.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.sources.source import source_stem
from zarr_parallel.store.disk_names import PENDING_DIR
from zarr_parallel.store.files import read_json
from zarr_parallel.store.manifest import plan_record, version_owner


@dataclass(frozen=True)
class CachePaths:
    """Where a cache lives: the final link, its versions and its lock file."""

    final: Path

    @property
    def versions(self) -> Path:
        """Folder holding every version of this cache."""
        return self.final.with_name(self.final.name + ".versions")

    @property
    def lock(self) -> Path:
        """Lock file guarding the cache."""
        return self.final.with_name(self.final.name + ".lock")

    def version(self, number: int, fingerprint: str) -> Path:
        """Path of version ``number`` with this plan fingerprint."""
        return self.versions / f"{number}-{fingerprint[:12]}"

    def current(self) -> Path | None:
        """The published version, if any."""
        if self.final.is_symlink():
            return self.final.resolve()
        return None

    @property
    def canonical(self) -> str:
        """The final path with its folder's symlinks resolved: what manifests record."""
        return os.path.join(os.path.realpath(self.final.parent), self.final.name)

    def _numbered(self) -> list[Path]:
        if not self.versions.is_dir():
            return []
        found = [
            p for p in self.versions.iterdir() if p.is_dir() and p.name.split("-")[0].isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name.split("-")[0]))

    def all_versions(self) -> list[Path]:
        """Version folders of this cache (owned, see :func:`owns_version`), oldest first.

        Folders in the versions folder that this cache cannot prove it made (copied from another
        cache, adopted 0.5 stores, anything else) are left out: nothing here ever continues,
        cleans or prunes them.
        """
        return [v for v in self._numbered() if owns_version(self, v)]

    def next_version(self, fingerprint: str) -> Path:
        """A new version folder path for this fingerprint (numbered past every folder there)."""
        existing = self._numbered()
        number = int(existing[-1].name.split("-")[0]) + 1 if existing else 1
        return self.version(number, fingerprint)


def pending_record(paths: CachePaths, version: Path) -> Path:
    """Where the owner of a version still being created is recorded."""
    return paths.versions / PENDING_DIR / f"{version.name}.json"


def owns_version(paths: CachePaths, version: Path) -> bool:
    """True when ``version`` is provably a version of the cache at ``paths.final``.

    Its manifest names this cache path (or, while zarr was creating it, its pending record
    does); versions made before the path was recorded count when they hold a plan with its
    request (only zarr-parallel writes that).
    """
    owner = version_owner(version)
    if owner is None:
        pending = read_json(pending_record(paths, version))
        owner = str(pending["cache_path"]) if pending and pending.get("cache_path") else None
    if owner is not None:
        return owner == paths.canonical
    rec = plan_record(version)
    return rec is not None and "request" in rec


def resolve_paths(req: CacheRequest) -> CachePaths:
    """The final cache path of a request; refuses paths that cannot be written."""
    value: str | None
    if req.cache_store is not None:
        final = Path(req.cache_store).expanduser()
        parameter, value = "cache_store", req.cache_store
    else:
        name = f"{req.cache_name or source_stem(req)}{req.cache_label}.zarr"
        final = Path(str(req.cache_dir)).expanduser() / name
        parameter, value = "cache_dir", req.cache_dir
        # The name (source stem + label) must stay one folder inside cache_dir.
        if os.path.dirname(name) or name in (".", ".."):
            raise RequestError(
                "cache_name",
                req.cache_name or name,
                f"would make the cache {name!r}, which is not a plain folder name in cache_dir",
                "Set cache_name to a plain name such as 'era5'",
            )
    final = Path(os.path.abspath(final))
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RequestError(
            parameter,
            value,
            f"cannot be created: {ancestor} is a file",
            "Choose a folder you can write to",
        )
    # Try it: permission bits say nothing to root, and read-only mounts deny everyone.
    # An unnamed file (O_TMPFILE where the file system has it): a run killed here leaves no
    # probe file beside the user's files.
    try:
        with tempfile.TemporaryFile(prefix=".zarr-parallel-probe-", dir=ancestor):
            pass
    except OSError as e:
        raise RequestError(
            parameter,
            value,
            f"is not writable ({ancestor}: {e.strerror or e})",
            "Choose a folder you can write to, or fix its permissions",
        ) from e
    return CachePaths(final)
