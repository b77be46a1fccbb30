"""The Python door: ``ZarrParallelAssembler(...).cache(...)``, compatible with zarr-parallel 0.5."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zarr_parallel.errors import RequestError
from zarr_parallel.logs import set_log_level
from zarr_parallel.request.model import DEFAULT_DEPLOY_MODE, CacheRequest, build_request
from zarr_parallel.run.phases import PhaseClock
from zarr_parallel.store.manifest import iter_job_records

if TYPE_CHECKING:
    from zarr_parallel.run.plan_view import PlanView

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheResult:
    """What a finished run returns: the final path, the plan summary and per-job results."""

    path: Path
    summary: dict[str, Any]
    jobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``done`` or ``up to date``."""
        return str(self.summary["status"])

    @property
    def phases(self) -> dict[str, float]:
        """Seconds per phase of the call (``start-up``, ``planning``, ``initialise``, ``data``,
        ``finish``, ``teardown``); they add up to ``summary["seconds"]``."""
        return dict(self.summary.get("phases") or {})

    @property
    def stats(self) -> dict[str, dict[str, float]] | None:
        """Per-variable statistics when ``generate_stats=True``."""
        return self.summary.get("stats")

    def open(self, **kwargs: Any) -> Any:
        """Open the cache with xarray."""
        import xarray as xr

        return xr.open_zarr(self.path, **kwargs)


class CacheHandle:
    """A run started with ``await_completion=False``; ``wait()`` gives its result."""

    def __init__(self, request: CacheRequest, progress: bool = False) -> None:
        self._result: CacheResult | None = None
        self._error: BaseException | None = None
        self._progress = progress
        self._thread = threading.Thread(target=self._run, args=(request,), daemon=True)
        self._thread.start()

    def _run(self, request: CacheRequest) -> None:
        try:
            self._result = run_request(request, progress=self._progress)
        except BaseException as e:  # handed to wait()
            self._error = e

    def done(self) -> bool:
        """True once the run has ended."""
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> CacheResult:
        """Block until the run ends; return its result or raise its error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the cache run is still going")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def run_request(request: CacheRequest, progress: bool | str | None = False) -> CacheResult:
    """Run a validated request as the command does (docs/design.md §2b): the temporary Prefect
    API (one per process, when none is configured) starts first, the run plans while it comes
    up, and an up-to-date cache is answered without a flow run. The summary's ``seconds`` and
    ``phases`` count from this call.

    ``progress``: None shows it on stderr (a live line in a terminal or notebook, a line per
    phase otherwise), False nothing (:func:`zarr_parallel.orchestration.progress.reporting`).
    """
    clock = PhaseClock()
    # Deferred: the ad hoc path imports the run stack (xarray, zarr; Prefect only when a flow
    # runs), which `import zarr_parallel` and the command's --help must not pay for.
    from zarr_parallel.orchestration.adhoc import needs_temporary_api, run_ad_hoc
    from zarr_parallel.orchestration.progress import reporting
    from zarr_parallel.orchestration.temporary_api import TemporaryApi

    set_log_level(request.log_level)
    api = TemporaryApi.shared() if needs_temporary_api() else None
    with reporting(progress, since=clock.origin):
        summary = run_ad_hoc(request, clock, api)
    set_log_level(request.log_level)  # after Prefect (if a flow ran) set up its logging
    # Per-job records come from the published version's manifest: they cover every job,
    # including those a resumed run skipped, without shipping them through the flow's result.
    jobs = sorted(iter_job_records(Path(summary["version"])), key=lambda r: int(r["id"]))
    return CacheResult(Path(summary["cache"]), summary, jobs)


class ZarrParallelAssembler:
    """Cache a dataset into Zarr in parallel (zarr-parallel 0.5's API).

    Parameters
    ----------
    data_uri
        A netCDF path, glob or list of paths, a kerchunk ``.json`` or a ``.zarr`` store.
    preprocessors
        Transforms applied in order, e.g. ``[{"type": "sel", "time": [start, end]}]``.
    chunks
        Target chunks ``{dim: size}`` (``-1`` for a whole dimension), or ``"auto"``/``None`` to
        keep the source's chunks.
    cache_label
        Suffix of the cache name (``<cache_dir>/<name><cache_label>.zarr``).
    variables
        Variables to cache, each mapped to ``{}`` or a list of per-variable transforms.
    add_attrs
        Extra global attributes.
    engine
        ``None`` to detect, or ``h5netcdf``, ``netcdf4``, ``kerchunk``, ``zarr``.
    log_level
        0 quiet, 1 info, 2 debug.
    **options
        Any other request field (``zarr_format``, ``shards``, ``open_options``...).
    """

    def __init__(
        self,
        data_uri: str | list[str],
        preprocessors: list[dict[str, Any]] | None = None,
        chunks: dict[str, int] | str | None = None,
        cache_label: str | None = None,
        variables: dict[str, Any] | list[str] | None = None,
        add_attrs: dict[str, Any] | None = None,
        engine: str | None = None,
        log_level: int = 0,
        **options: Any,
    ) -> None:
        self._fields: dict[str, Any] = {
            "data_uri": data_uri,
            "preprocessors": preprocessors,
            "chunks": chunks,
            "cache_label": cache_label or "",
            "variables": variables,
            "add_attrs": add_attrs,
            "engine": engine,
            "log_level": log_level,
            **options,
        }
        # Validate what can be checked now (names, transforms, sizes) without a cache path.
        build_request(**{**self._fields, "cache_store": "/nonexistent-check-only.zarr"})

    def request(
        self,
        cache_store: str | None = None,
        num_jobs: int | None = None,
        generate_stats: bool = False,
        deploy_mode: str = DEFAULT_DEPLOY_MODE,
        simultaneous_worker_limit: int | None = None,
        memory_limit: str | int = "2GB",
        worker_timeout: str | int = "30:00",
        overwrite: bool = True,
        recommend_changes: bool | str = True,
        resume: bool | str = "auto",
        *,
        cache_dir: str | None = None,
        **options: Any,
    ) -> CacheRequest:
        """The validated request :meth:`cache` would run (same arguments)."""
        fields = {
            **self._fields,
            "cache_store": cache_store,
            "cache_dir": cache_dir,
            "num_jobs": num_jobs,
            "generate_stats": generate_stats,
            "deploy_mode": deploy_mode,
            "simultaneous_worker_limit": simultaneous_worker_limit,
            "memory_limit": memory_limit,
            "worker_timeout": worker_timeout,
            "overwrite": overwrite,
            "recommend_changes": recommend_changes,
            "resume": resume,
            **options,
        }
        return build_request(**fields)

    def cache(
        self,
        cache_store: str | None = None,
        num_jobs: int | None = None,
        generate_stats: bool = False,
        deploy_mode: str = DEFAULT_DEPLOY_MODE,
        await_completion: bool = True,
        simultaneous_worker_limit: int | None = None,
        memory_limit: str | int = "2GB",
        worker_timeout: str | int = "30:00",
        overwrite: bool = True,
        recommend_changes: bool | str = True,
        resume: bool | str = "auto",
        *,
        cache_dir: str | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> CacheResult | CacheHandle:
        """Run the cache flow; returns a :class:`CacheResult` (or a handle to ``wait()`` on).

        ``progress`` (not a request field): None shows the run's progress on stderr while
        waiting for it (a live line in a terminal or notebook, a line per phase otherwise) and
        none for ``await_completion=False``; True always shows it, False never.

        Raises
        ------
        RequestError, PlanError
            Invalid input or no plan within the memory limit; nothing is written.
        RecommendationsPending
            The plan would re-read source chunks and ``recommend_changes`` is halt (True).
        RunFailed
            Some jobs failed; finished ones stay recorded for ``resume``.
        """
        if not isinstance(await_completion, bool):
            raise RequestError(
                "await_completion",
                await_completion,
                "must be True or False",
                "Pass await_completion=False to get a handle",
            )
        req = self.request(
            cache_store,
            num_jobs,
            generate_stats,
            deploy_mode,
            simultaneous_worker_limit,
            memory_limit,
            worker_timeout,
            overwrite,
            recommend_changes,
            resume,
            cache_dir=cache_dir,
            **options,
        )
        if progress not in (None, True, False):
            raise RequestError(
                "progress", progress, "must be True, False or None", "Pass progress=False for quiet"
            )
        if not await_completion:
            return CacheHandle(req, progress=bool(progress))
        return run_request(req, progress=progress)

    def plan(
        self,
        cache_store: str | None = None,
        num_jobs: int | None = None,
        generate_stats: bool = False,
        deploy_mode: str = DEFAULT_DEPLOY_MODE,
        await_completion: bool = True,
        simultaneous_worker_limit: int | None = None,
        memory_limit: str | int = "2GB",
        worker_timeout: str | int = "30:00",
        overwrite: bool = True,
        recommend_changes: bool | str = True,
        resume: bool | str = "auto",
        *,
        cache_dir: str | None = None,
        progress: bool | None = None,
        **options: Any,
    ) -> PlanView:
        """Plan what :meth:`cache` with the same arguments would do, and write nothing.

        Returns a :class:`~zarr_parallel.run.plan_view.PlanView`: jobs, read amplification,
        memory per job, the strategy when the planner reports one, the recommendations (also
        when a run would halt on them: ``.halts``), the SLURM job script in SLURM mode and a
        picture of the jobs over the chunk grids (``.write_picture("plan.svg")``; shown in a
        notebook). ``await_completion`` and ``progress`` are accepted for the same signature
        and ignored.

        Raises
        ------
        RequestError, PlanError
            Invalid input or no plan within the memory limit.
        """
        # Deferred: the plan report imports Prefect and dask-jobqueue (seconds), which
        # `import zarr_parallel` must not pay for.
        from zarr_parallel.orchestration.plan_report import describe_plan

        del await_completion, progress  # same keywords as cache(); nothing to wait for
        req = self.request(
            cache_store,
            num_jobs,
            generate_stats,
            deploy_mode,
            simultaneous_worker_limit,
            memory_limit,
            worker_timeout,
            overwrite,
            recommend_changes,
            resume,
            cache_dir=cache_dir,
            **options,
        )
        set_log_level(req.log_level)
        return describe_plan(req)
