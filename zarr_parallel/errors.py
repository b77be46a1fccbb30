"""Error hierarchy: every error a user can meet derives from :class:`ZarrParallelError`."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any


class ZarrParallelError(Exception):
    """Base class of all zarr-parallel errors.

    Every error of the hierarchy pickles (Prefect stores a failed run's exception, dask carries
    a job's across processes), whatever its ``__init__`` takes: it is rebuilt from its
    ``args`` and attributes, with the same message. A value that does not pickle (a user's
    object in a request field, say) travels as its ``repr``. The error it was raised from
    (``__cause__``) travels too, as itself or, when it would not load again, as a
    :class:`RuntimeError` holding its type and message, so a stored failure still says why.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # An OSError's arguments hold more than its args (the file name): take its own.
        args = OSError.__reduce__(self)[1] if isinstance(self, OSError) else self.args
        state = {name: _picklable(value) for name, value in vars(self).items()}
        _make_chain_picklable(self)
        # Python's own pickling of exceptions drops __cause__; a run's stored failure then
        # loses the reason (a h5py or zarr error) that its message summarises.
        if self.__cause__ is not None:
            state["__cause__"] = self.__cause__
        return (_rebuild, (type(self), tuple(_picklable(a) for a in args), state))


def _make_chain_picklable(error: BaseException) -> None:
    """Replace a ``__cause__`` or ``__context__`` that would not survive pickling by a summary.

    tblib (which dask and distributed install for exceptions that pass through them) pickles
    both links as they are, after calling ``__reduce__``: an S3 client error, say, that cannot be
    rebuilt from its args would make the whole error fail to load. The live error is changed
    in place only for such a link; its message keeps the type and the text.
    """
    suppress = error.__suppress_context__  # setting __cause__ would set it
    for link in ("__cause__", "__context__"):
        linked = getattr(error, link)
        if linked is not None:
            safe = _picklable_cause(linked)
            if safe is not linked:
                setattr(error, link, safe)
    error.__suppress_context__ = suppress


def _picklable(value: Any) -> Any:
    try:
        pickle.dumps(value)
    except Exception:  # any object may refuse in its own way (TypeError, PicklingError...)
        return repr(value)
    return value


def _picklable_cause(cause: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(cause))
    except Exception:  # an exception class may refuse to pickle or to rebuild from its args
        return RuntimeError(f"{type(cause).__name__}: {cause}")
    return cause


def _rebuild(cls: type[ZarrParallelError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """An error of ``cls`` with these ``args`` and attributes, without calling ``__init__``."""
    error = cls.__new__(cls, *args)  # sets args (and an OSError's errno, strerror, filename)
    cause = state.pop("__cause__", None)
    error.__dict__.update(state)
    if cause is not None:
        error.__cause__ = cause
    return error


class _ParameterError(ZarrParallelError, ValueError):
    """An error about one request parameter, with its value and a fix."""

    def __init__(self, parameter: str, value: Any, problem: str, fix: str) -> None:
        self.parameter = parameter
        self.value = value
        self.problem = problem
        self.fix = fix
        super().__init__(f"{parameter}={value!r}: {problem}. {fix}")


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


class RunFailed(ZarrParallelError):
    """Some write jobs failed; completed jobs stay recorded for ``resume``."""

    def __init__(self, message: str, failed: Sequence[dict[str, Any]] = ()) -> None:
        self.failed = list(failed)
        super().__init__(message)


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
