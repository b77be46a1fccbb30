"""The job records of a staged run's intermediate stores, kept before the run removes them.

A staged plan (#18) writes each intermediate store beside the versions
(``<cache>.versions/.stage-<n>-<fingerprint12>/``) with its own manifest, and removes it after
publish, so by the time ``cache()`` returns the stage jobs' records (their measured reads, times
and peaks) and the intermediate's size are gone. :class:`StageWatcher` polls those folders while
the run goes on and keeps every record it sees and the largest size of each store.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any


class StageWatcher:
    """Poll ``<store>.versions/.stage-*`` every ``interval`` seconds while in a ``with`` block."""

    def __init__(self, store: str, interval: float = 0.5) -> None:
        self.root = Path(f"{store}.versions")
        self.interval = interval
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.sizes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stage-watch", daemon=True)

    def __enter__(self) -> StageWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Keep the records and size of every intermediate store there now."""
        from zarr_parallel.store.manifest import iter_job_records

        for stage in sorted(self.root.glob(".stage-*")):
            with contextlib.suppress(OSError, ValueError):
                for rec in iter_job_records(stage):
                    self.records[(stage.name, str(rec.get("id")))] = rec
                size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
                self.sizes[stage.name] = max(size, self.sizes.get(stage.name, 0))

    @property
    def stage_records(self) -> list[dict[str, Any]]:
        """Every intermediate job record seen."""
        return list(self.records.values())

    @property
    def intermediate_bytes(self) -> int | None:
        """The largest size seen of each intermediate store, added up; None without any."""
        return sum(self.sizes.values()) if self.sizes else None
