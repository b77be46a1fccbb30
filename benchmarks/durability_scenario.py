"""The durability scenario and its invariants: two requests taking turns on one cache path.

Two requests of one tiny ERA5-like source that differ in content (target chunks of 4 and of 8
steps) share one cache path with ``keep_versions: 1``, so every run that finishes publishes a
new version and prunes the previous one. The checks here say whether the published cache is
whole and equal to a reference, whether a finished run left anything behind, and whether
anything outside the cache changed; :mod:`benchmarks.bench_durability` runs the soak and the
fault sweeps over them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.zygote import Zygote

#: The two contents that take turns on the cache path.
CONTENTS = {"A": 4, "B": 8}


@dataclass
class Scenario:
    """A folder with the sources, the two requests, their reference caches and the cache path."""

    root: Path
    requests: dict[str, Path]
    references: dict[str, Path]
    final: Path
    logs: Path
    outside: dict[str, str] = field(default_factory=dict)
    log_count: int = 0

    def request_fields(self, content: str) -> dict[str, Any]:
        """The request of ``content`` as a mapping."""
        return dict(yaml.safe_load(self.requests[content].read_text()))

    def new_log(self, label: str) -> Path:
        """A fresh log file for one run."""
        self.log_count += 1
        return self.logs / f"{self.log_count:05d}-{label}.log"

    def argv(self, content: str, *extra: str) -> list[str]:
        """The CLI arguments of a run of ``content``."""
        return ["cache", "run", str(self.requests[content]), *extra]


def make_scenario(root: Path, zygote: Zygote, jobs: int = 4) -> Scenario:
    """Write the sources and requests under ``root`` and make both references (clean runs)."""
    from zarr_parallel.examples import make_era5_like

    root.mkdir(parents=True, exist_ok=True)
    files = make_era5_like(
        root / "src", n_files=2, steps_per_file=8, nlat=10, nlon=20, chunks=(4, 10, 20)
    )
    (root / "requests").mkdir()
    logs = root / "logs"
    logs.mkdir()
    requests, references = {}, {}
    for content, steps in CONTENTS.items():
        fields = {
            "data_uri": [str(f) for f in files],
            "chunks": {"time": steps, "latitude": 10, "longitude": 20},
            "cache_store": str(root / "out" / "cache.zarr"),
            "deploy_mode": "series",
            "num_jobs": jobs,
            "keep_versions": 1,
            # Prune the replaced version at once (no reader holds it), so every run prunes.
            "min_version_age": 0,
            "memory_limit": "300MB",
            "retries": 0,
        }
        requests[content] = root / "requests" / f"{content}.yaml"
        requests[content].write_text(yaml.safe_dump(fields))
        references[content] = root / "refs" / f"{content}.zarr"
    scn = Scenario(root, requests, references, root / "out" / "cache.zarr", logs)
    for content, ref in references.items():
        rc = zygote.run(
            scn.argv(content, "--set", f"cache_store={ref}"), scn.new_log(f"ref-{content}"), root
        )
        if rc != 0:
            raise RuntimeError(f"the reference run of {content} failed ({rc})")
    scn.outside = outside_snapshot(scn)
    return scn


def outside_snapshot(scn: Scenario) -> dict[str, str]:
    """SHA-256 of every file under the scenario's folder except the cache's own and the logs."""
    out = {}
    for path in sorted(scn.root.rglob("*")):
        rel = path.relative_to(scn.root)
        if rel.parts[0] in ("out", "logs") or not path.is_file():
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -------------------------------------------------------------------------------------------
# Invariants


@dataclass
class Counts:
    """What a soak or a fault sweep did and found."""

    runs: int = 0
    kills: int = 0
    faults: int = 0
    completed: int = 0
    verified: int = 0
    bytes_lost: int = 0
    where: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Record an invariant that did not hold."""
        self.failures.append(message)

    def text(self) -> str:
        """The counts, one per line."""
        lines = [
            f"runs             {self.runs}",
            f"kills            {self.kills}",
            f"faults injected  {self.faults}",
            f"runs not killed  {self.completed}",
            f"caches verified  {self.verified}",
            f"bytes lost       {self.bytes_lost}",
            f"failures         {len(self.failures)}",
        ]
        if self.where:
            top = ", ".join(f"{k} {v}" for k, v in self.where.most_common())
            lines.append(f"kills by place   {top}")
        lines += [f"  FAILURE: {f}" for f in self.failures[:30]]
        return "\n".join(lines)


def lost_bytes(cache: Path, reference: Path) -> int:
    """Bytes of the reference's array files missing from ``cache`` or different in it."""
    from zarr_parallel.run.verify import cache_files

    want = cache_files(reference)
    try:
        got = cache_files(cache)
    except OSError:
        got = {}
    return sum(len(v) for k, v in want.items() if got.get(k) != v)


def published_content(scn: Scenario, counts: Counts, allowed: set[str], context: str) -> str | None:
    """Which reference the published cache equals (one of ``allowed``), checking it is whole.

    A reader opening the final path must find a complete version that opens and equals a
    reference; anything else is recorded as a failure (with the bytes lost).
    """
    import xarray as xr

    from zarr_parallel.run.verify import cache_differences
    from zarr_parallel.store.manifest import is_complete

    final = scn.final
    if not final.is_symlink():
        if "" not in allowed or final.exists():
            counts.fail(f"{context}: the cache path is not a published link")
        return None
    version = final.resolve()
    if not version.is_dir() or not is_complete(version):
        counts.fail(f"{context}: the cache path resolves to {version}, which is not complete")
        counts.bytes_lost += min(lost_bytes(final, scn.references[c]) for c in allowed - {""})
        return None
    for content in sorted(allowed - {""}):
        if cache_differences(final, scn.references[content]):
            continue
        try:
            with xr.open_zarr(final) as ds, xr.open_zarr(scn.references[content]) as ref:
                if not ds.load().equals(ref.load()):
                    counts.fail(f"{context}: {version.name} reads differently from {content}")
                    return None
        except Exception as e:  # a reader failing on a published cache is the finding
            counts.fail(f"{context}: opening {version.name} failed: {type(e).__name__}: {e}")
            return None
        return content
    counts.bytes_lost += min(lost_bytes(final, scn.references[c]) for c in allowed - {""})
    counts.fail(f"{context}: {version.name} equals none of {sorted(allowed - {''})}")
    return None


def leftovers(scn: Scenario, published: bool = True) -> list[str]:
    """What a finished run must not leave: lock, links, probes, temporaries, other versions.

    A run that found the cache up to date (``published=False``) publishes and prunes nothing,
    so what a killed run's prune left stays until the next publish.
    """
    from zarr_parallel.store.disk_names import (
        LOCK_GUARD,
        PENDING_DIR,
        PRUNING_PREFIX,
        READERS_DIR,
        RETIRED_DIR,
        TEMPORARY_SUFFIXES,
    )
    from zarr_parallel.store.manifest import is_complete
    from zarr_parallel.store.paths import CachePaths

    paths = CachePaths(scn.final)
    out = []
    for entry in sorted(scn.final.parent.iterdir()):
        if entry.name not in (paths.final.name, paths.versions.name):
            out.append(f"beside the cache: {entry.name}")
    current = paths.current()
    for version in paths.versions.iterdir() if paths.versions.is_dir() else []:
        ours = (LOCK_GUARD, PENDING_DIR, RETIRED_DIR, READERS_DIR)
        if version.name in ours or version == current:
            continue
        if not published and (version.name.startswith(PRUNING_PREFIX) or is_complete(version)):
            continue
        if version.name != LOCK_GUARD and version != current:
            out.append(f"another version or folder: {version.name}")
    if current is not None:
        out += [
            f"temporary file {p.relative_to(current)}"
            for p in current.rglob("*")
            if p.name.endswith(TEMPORARY_SUFFIXES)
        ]
    return out


def _pruning_names(scn: Scenario) -> list[str]:
    from zarr_parallel.store.disk_names import PRUNING_PREFIX
    from zarr_parallel.store.paths import CachePaths

    versions = CachePaths(scn.final).versions
    return [p.name for p in versions.glob(f"{PRUNING_PREFIX}*")] if versions.is_dir() else []


def verify_cli(scn: Scenario, content: str) -> tuple[int, str]:
    """``python -m flows.cache verify REQUEST`` (its main, in this process): code and output."""
    from zarr_parallel.orchestration.command import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(["verify", str(scn.requests[content])])
    return code, buffer.getvalue()


def check_finished(
    scn: Scenario,
    counts: Counts,
    content: str,
    context: str,
    log: Path | None = None,
    pruning_left: bool = False,
) -> None:
    """After a run of ``content`` ended with exit 0: its reference, verified, nothing left.

    ``pruning_left``: what a failed removal of an old version left may stay (until the next
    prune) but nothing else may.
    """
    if published_content(scn, counts, {content}, context) != content:
        return
    code, text = verify_cli(scn, content)
    if code != 0:
        counts.fail(f"{context}: verify exited {code}: {text[-500:]}")
        return
    counts.verified += 1
    published = log is None or "zarr-parallel: up to date" not in log.read_text()
    left = leftovers(scn, published)
    if pruning_left:
        left = [x for x in left if not x.endswith(tuple(_pruning_names(scn)))]
    if left:
        counts.fail(f"{context}: left behind {left[:5]}")
    if outside_snapshot(scn) != scn.outside:
        counts.fail(f"{context}: files outside the cache changed")


@contextlib.contextmanager
def harness(folder: str | None = None) -> Iterator[tuple[Scenario, Zygote]]:
    """A scenario in a temporary folder and a zygote, both cleaned up afterwards."""
    zygote = Zygote()
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix="zp-durability-") as tmp:
            yield make_scenario(Path(tmp), zygote), zygote
    finally:
        zygote.close()
