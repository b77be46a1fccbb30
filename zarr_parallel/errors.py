"""Error hierarchy: every error a user can meet derives from :class:`ZarrParallelError`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ZarrParallelError(Exception):
    """Base class of all zarr-parallel errors."""


class _ParameterError(ZarrParallelError, ValueError):
    """An error about one request parameter, with its value and a fix."""

    def __init__(self, parameter: str, value: Any, problem: str, fix: str) -> None:
        self.parameter = parameter
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{parameter}={value!r}: {problem}. {fix}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the exception picklable across Prefect/dask process boundaries.
        return (type(self), (self.parameter, self.value, self.problem, self.fix))


class RequestError(_ParameterError):
    """The request is invalid (raised before anything is written)."""


class PlanError(_ParameterError):
    """The request is valid but no safe plan exists (e.g. the memory limit is too small)."""


class RecommendationsPending(ZarrParallelError, ValueError):
    """The plan would re-read source chunks; the run halted with recommendations.

    Attributes
    ----------
    plan
        The plan as requested (a :class:`zarr_parallel.planning.plan.Plan`).
    recommendations
        Alternatives, best first; each has ``changes``, ``read_amplification``,
        ``job_memory_bytes`` and ``sentence``.
    """

    def __init__(self, plan: Any, recommendations: Sequence[Any], message: str) -> None:
        self.plan = plan
        self.recommendations = list(recommendations)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.plan, self.recommendations, str(self)))


class RunFailed(ZarrParallelError):
    """Some write jobs failed; completed jobs stay recorded for ``resume``."""

    def __init__(self, message: str, failed: Sequence[dict[str, Any]] = ()) -> None:
        self.failed = list(failed)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.failed))


class LockLost(RunFailed):
    """The run no longer holds its cache's lock (another run broke it): it stopped, and
    published nothing."""


class VersionUnavailable(ZarrParallelError, FileNotFoundError):
    """A cache version a reader opened is missing, incomplete or was pruned while open.

    Raised instead of returning fill values: caches are written with every chunk present, so a
    missing chunk file always means the version is gone (or damaged).
    """


class CacheLocked(ZarrParallelError):
    """Another run holds the cache's lock file; ``.holder`` says who (host, pid, start time)."""

    def __init__(self, path: Any, holder: Any, message: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.holder, str(self)))


class SourceChanged(RunFailed):
    """A source file changed after the run planned it; the run stops before publishing.

    ``path`` names the file (or Zarr array folder, or URL) and ``change`` says what differs.
    """

    def __init__(self, path: str, change: str, message: str | None = None) -> None:
        self.path = path
        self.change = change
        super().__init__(
            message
            or (
                f"the source {path} changed while the run was copying it ({change}); the run "
                "stops before publishing, so the cache keeps its previous version. Run again "
                "once the source is stable: the next run plans the source as it is then"
            )
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.change, str(self)))
