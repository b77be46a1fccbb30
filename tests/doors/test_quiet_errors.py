"""Errors without noise: what the commands print when a request is bad or a run fails.

An invalid request at the default log level prints the one message (exit 2), through both doors
that print (``zarr-parallel run`` and ``python -m flows.cache``); Prefect's tracebacks only at
``log_level=2``. No "Failed to serialize" warning (every error of the hierarchy pickles, whatever
it holds), no note about a ``num_jobs`` the user never set, and no "Port 8787 is already in use"
from the local cluster. The commands run in subprocesses, as a user runs them.
"""

from __future__ import annotations

import copyreg
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tblib.pickling_support
import yaml

from core_support import changed_env
from zarr_parallel import errors
from zarr_parallel.errors import ZarrParallelError
from zarr_parallel.run import chunk_reuse, job_process, policy, preflight
from zarr_parallel.store import raw_chunks

REPO = Path(__file__).resolve().parents[2]
COMMAND = str(Path(sys.executable).with_name("zarr-parallel"))
#: The two doors that print: the installed command and the clone's module.
DOORS = {
    "zarr-parallel": [COMMAND, "run"],
    "flows.cache": [sys.executable, "-m", "flows.cache", "run"],
}
UNKNOWN_VARIABLE = "invalid request: variables=['sp']: are not variables of the source. "
#: A transform plug-in whose error carries a value that does not pickle (here a generator).
PLUGIN = """
from zarr_parallel.errors import RequestError


def needs_level(ds, ctx, **kwargs):
    raise RequestError(
        ctx.parameter, (name for name in ds.sizes), "has no level dimension", "Use data with levels"
    )
"""


def _request(folder: Path, files: list[Path], **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "data_uri": [str(f) for f in files],
        "cache_dir": str(folder / "out"),
        "deploy_mode": "series",
        **fields,
    }
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(args: list[str], **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=600, env=changed_env(**env)
    )


@pytest.mark.parametrize("door", sorted(DOORS))
def test_invalid_request_prints_one_message(
    door: str, era5_files: list[Path], tmp_path: Path
) -> None:
    """A variable the source lacks (found while planning, inside the flow): the message alone."""
    request = _request(tmp_path, era5_files, variables=["sp"])
    proc = _run([*DOORS[door], str(request)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert proc.stderr.startswith(UNKNOWN_VARIABLE), proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_plan_error_prints_one_message(era5_files: list[Path], tmp_path: Path) -> None:
    """No plan fits the memory limit (a PlanError from the plan task): one line, exit 2."""
    request = _request(tmp_path, era5_files, memory_limit="300MB", memory_reserve="299.99MB")
    proc = _run([*DOORS["flows.cache"], str(request)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("invalid request: memory_limit="), lines


def test_tracebacks_at_debug_level(era5_files: list[Path], tmp_path: Path) -> None:
    """log_level=2 shows the refusal's traceback, then the same message. The command refuses the
    request while planning ahead, before any flow run (docs/design.md §2b), so the traceback is
    the command's own, not Prefect's."""
    request = _request(tmp_path, era5_files, variables=["sp"], log_level=2)
    proc = _run([*DOORS["zarr-parallel"], str(request)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr[-3000:]
    assert "RequestError" in proc.stderr and "Task run failed" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(UNKNOWN_VARIABLE)


def test_error_that_does_not_pickle_gives_no_serializer_warning(
    era5_files: list[Path], tmp_path: Path
) -> None:
    """Prefect stores a failed flow's exception: an error holding a value that does not pickle
    (a plug-in's) used to warn "Failed to serialize object of type 'RequestError'"."""
    plugins = tmp_path / "plugins"
    dist = plugins / "zp_quiet_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (plugins / "zp_quiet_plugin.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zp-quiet-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[zarr_parallel.transforms]\nneeds_level = zp_quiet_plugin:needs_level\n"
    )
    request = _request(tmp_path, era5_files, preprocessors=[{"type": "needs_level"}])
    proc = _run([*DOORS["zarr-parallel"], str(request)], PYTHONPATH=str(plugins))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "serialize" not in proc.stderr and "Failed to write result" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "has no level dimension" in lines[0], proc.stderr[-3000:]


def _error_classes() -> set[type[ZarrParallelError]]:
    """Every public error class of the hierarchy (those of the modules imported above)."""
    found: set[type[ZarrParallelError]] = set()
    todo = [ZarrParallelError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return {cls for cls in found if not cls.__name__.startswith("_")}


@dataclass(frozen=True)
class _Plan:
    """Stands in for a plan: a module-level class, so it pickles."""

    jobs: tuple[int, ...] = (1, 2)


#: Realistic arguments for every error of the hierarchy (a new error must add its line).
ERRORS: dict[type[ZarrParallelError], tuple[Any, ...]] = {
    errors.ZarrParallelError: ("something failed",),
    errors.RequestError: ("chunks['time']", 0, "must be a positive integer", "Use 24"),
    errors.PlanError: ("memory_limit", "300MB", "no plan fits", "Raise memory_limit to 1GB"),
    errors.RecommendationsPending: (_Plan(), [{"changes": {"chunks": {"time": 6}}}], "halted"),
    errors.RunFailed: ("1 of 4 write jobs failed", [{"job": 1, "error": "OSError: bad"}]),
    errors.LockLost: ("the lock of /data/c.zarr was broken", [{"job": 2}]),
    errors.VersionUnavailable: ("/data/c.zarr: version 3 was pruned while open",),
    errors.CacheLocked: ("/data/c.zarr", {"host": "n1", "pid": 42}, "locked by n1:42"),
    errors.SourceChanged: ("/data/a.nc", "size: 1 → 2"),
    preflight.InsufficientSpace: ("cache_store", "/data/c.zarr", "needs 3 GB, 1 GB free", "Free"),
    chunk_reuse.AppendNotPossible: ("t2m: the published version's codec differs",),
    job_process.JobInterrupted: ("job 3 stopped",),
    job_process.JobTimedOut: ("job 3 passed its deadline of 30:00",),
    job_process.JobMemoryExceeded: ("job 3 grew past 2 GB",),
    job_process.JobProcessDied: ("the job process ended (signal 9)",),
    job_process.WorkerClosing: ("worker-1 is closing",),
    job_process.JobError: ("ValueError: cannot carry this",),
    policy.PolicyFileError: ("/etc/zarr-parallel/policy.toml: unknown key 'x'",),
    raw_chunks.ChunkReleased: (
        "/c.zarr.versions/.stage-1-ab/t2m/c/0/0/0: this chunk was released",
    ),
}


def _same(a: BaseException, b: BaseException) -> bool:
    return type(a) is type(b) and str(a) == str(b) and a.args == b.args and vars(a) == vars(b)


@pytest.mark.parametrize("cls", sorted(ERRORS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_error_pickles(cls: type[ZarrParallelError]) -> None:
    error = cls(*ERRORS[cls])
    assert _same(pickle.loads(pickle.dumps(error)), error)


def test_an_os_error_keeps_its_file_name() -> None:
    error = errors.VersionUnavailable(2, "No such file or directory", "/data/c.zarr/t2m/c/0")
    again = pickle.loads(pickle.dumps(error))
    assert _same(again, error) and (again.errno, again.filename) == (2, error.filename)


def test_the_table_names_every_error() -> None:
    assert _error_classes() == set(ERRORS)


def test_a_value_that_does_not_pickle_travels_as_its_repr() -> None:
    lock = threading.Lock()
    error = errors.RequestError("open_options['lock']", lock, "is not a reading option", "Drop")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.value == repr(lock) and again.fix == "Drop"
    failed = errors.RunFailed("1 job failed", [{"job": 1, "handle": lock}])
    assert pickle.loads(pickle.dumps(failed)).failed == repr([{"job": 1, "handle": lock}])


class _Unpicklable(Exception):
    """A library's error that cannot be rebuilt from its args (it needs two, gets one)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


def test_the_cause_travels_with_the_error() -> None:
    try:
        try:
            raise OSError(5, "Input/output error", "/data/era5_000.nc")
        except OSError as e:
            raise errors.RunFailed("job 3 failed") from e
    except errors.RunFailed as e:
        again = pickle.loads(pickle.dumps(e))
    assert isinstance(again.__cause__, OSError)
    assert again.__cause__.filename == "/data/era5_000.nc"
    try:
        raise errors.RunFailed("job 4 failed") from _Unpicklable(7, "bad chunk")
    except errors.RunFailed as e:
        again = pickle.loads(pickle.dumps(e))
    # Our summary, or the error itself where tblib's pickling (installed for every exception
    # class by importing dask.multiprocessing) knows how to rebuild it.
    assert str(again.__cause__).endswith("7: bad chunk")


def test_the_chain_loads_where_dask_installed_tblib() -> None:
    """dask and distributed install tblib's pickling for exceptions that pass through them,
    which pickles ``__cause__`` and ``__context__`` as they are."""
    try:
        try:
            raise _Unpicklable(7, "bad chunk")
        except _Unpicklable:
            raise errors.RunFailed("job 4 failed") from _Unpicklable(8, "bad read")
    except errors.RunFailed as e:
        error = e
    tblib.pickling_support.install(error)
    try:
        again = pickle.loads(pickle.dumps(error))
    finally:
        for cls in (errors.RunFailed, _Unpicklable):
            copyreg.dispatch_table.pop(cls, None)
    assert str(again) == "job 4 failed"
    # tblib rebuilds such errors itself once installed for their class, else our summary.
    assert str(again.__cause__).endswith("8: bad read")
    assert str(again.__context__).endswith("7: bad chunk")
    assert again.__suppress_context__


@pytest.fixture
def port_8787_taken() -> Iterator[None]:
    """Port 8787 held by someone else (another dask cluster's dashboard, say)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 8787))
        sock.listen()
    except OSError:
        pass  # already taken: just as good
    try:
        yield
    finally:
        sock.close()


def test_no_port_warning_from_the_local_cluster(
    era5_files: list[Path], tmp_path: Path, port_8787_taken: None
) -> None:
    """A dask_distributed run at log level 0 prints the summary alone (stderr: its progress
    lines only), even with 8787 taken."""
    request = _request(
        tmp_path,
        era5_files,
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=1,
        variables=["t2m"],
        chunks={"time": 24},
    )
    proc = _run([*DOORS["flows.cache"], str(request)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [
        line for line in proc.stderr.splitlines() if not line.startswith("zarr-parallel: ")
    ] == []
    assert proc.stdout.startswith("zarr-parallel: done")


def test_num_jobs_note_only_when_asked(era5_files: list[Path], tmp_path: Path) -> None:
    """One aligned unit: a plan that cannot reach the num_jobs the user set says so; a minimum
    derived from the worker count (2 per worker) is not the user's and is not mentioned."""
    request = _request(
        tmp_path,
        era5_files,
        deploy_mode="dask_distributed",
        simultaneous_worker_limit=2,
        memory_limit="1GB",
        variables=["t2m"],  # two variables would be a job each, one per worker
        chunks={"time": -1, "latitude": -1, "longitude": -1},
    )
    plan = [COMMAND, "plan", str(request)]
    derived = _run(plan)
    assert derived.returncode == 0, derived.stderr[-3000:]
    assert "jobs:                1 (1 to run)" in derived.stdout
    assert "asked, but" not in derived.stdout + derived.stderr
    asked = _run([*plan, "--set", "num_jobs=4"])
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert "note:                num_jobs=4 asked, but whole aligned units allow only 1" in (
        asked.stdout
    )
