"""The write subflow: map write tasks over the run's workers, retry what was lost, report.

Failures end in one of three ways, never in a hang:

- a job that raises or passes ``worker_timeout`` fails its task; Prefect retries the task
  (``retries``), and the job's process was killed for real (:mod:`zarr_parallel.run.job_process`);
- a worker that dies mid-task (SIGKILL, ``scancel``, node failure) surfaces at once as a dask
  ``KilledWorker`` (``allowed-failures`` is 0); the task run is marked Crashed and submitted
  again while attempts remain — unless SLURM killed the job for exceeding its memory, which
  would only happen again and is reported as such;
- a cluster that has no worker and can get none
  (:meth:`zarr_parallel.orchestration.cluster.ClusterHandle.check`) fails the jobs still waiting.

Finished jobs are recorded in the manifest as they finish, so a failed run resumes.
"""

from __future__ import annotations

import collections
import math
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture
from prefect.states import Crashed

from zarr_parallel.errors import LockLost, RunFailed, SourceChanged
from zarr_parallel.orchestration.cluster import ClusterHandle, active_cluster
from zarr_parallel.orchestration.progress import watch_jobs
from zarr_parallel.orchestration.tasks import (
    artifact_key,
    attempts_made,
    describe_job,
    describe_region,
    read_job_record,
    write_task,
)
from zarr_parallel.planning.jobs import read_jobs
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.phases import enter_phase
from zarr_parallel.run.stages import stage_request, stage_todo
from zarr_parallel.run.steps import Prepared
from zarr_parallel.store.lock import held_token
from zarr_parallel.store.manifest import plan_record, recorded_jobs

#: Most write task runs per flow run: submitting a task costs ~0.1 s on a DaskTaskRunner.
MAX_TASKS = 200


def group_jobs(job_ids: Sequence[int], max_tasks: int = MAX_TASKS) -> list[list[int]]:
    """Split job ids into at most ``max_tasks`` consecutive groups (one task each).

    >>> group_jobs(range(5), max_tasks=2)
    [[0, 1, 2], [3, 4]]
    """
    ids = list(job_ids)
    if not ids:
        return []
    size = math.ceil(len(ids) / max_tasks)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


@dataclass
class _Submission:
    future: PrefectFuture[Any]
    attempts_before: int
    submitted: float
    #: Its worker is done with it (it ended on the worker), though its outcome is not collected yet.
    settled: bool = False


@dataclass
class _Outcome:
    state: str
    results: list[dict[str, Any]]
    message: str = ""
    error: BaseException | None = None
    worker: str | None = None


@dataclass
class _WriteTasks:
    """The write tasks of one flow run while they run: submitted, watched, retried, collected."""

    req: CacheRequest
    request_json: str
    version: str
    groups: list[list[int]]
    handle: ClusterHandle | None
    progress: UUID
    logger: Any
    fence: str | None = None
    running: dict[int, _Submission] = field(default_factory=dict)
    done_q: queue.Queue[tuple[int, PrefectFuture[Any]]] = field(default_factory=queue.Queue)
    results: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: list[BaseException | None] = field(default_factory=list)
    completed_jobs: int = 0
    pending: collections.deque[int] = field(default_factory=collections.deque)

    @property
    def total(self) -> int:
        """Jobs of all groups."""
        return sum(len(g) for g in self.groups)

    def submit(self, index: int, attempts_before: int) -> None:
        """Submit the write task of group ``index``, with the retries its attempts leave."""
        task = write_task.with_options(
            retries=max(0, self.req.retries - attempts_before), retry_delay_seconds=1
        )
        future = task.submit(
            self.request_json,
            self.version,
            self.groups[index],
            self.req.generate_stats,
            self.fence,
        )
        self.running[index] = _Submission(future, attempts_before, time.monotonic())

        def done(f: PrefectFuture[Any], i: int = index) -> None:
            self.done_q.put((i, f))

        future.add_done_callback(done)

    def slots(self) -> int | None:
        """Write tasks the cluster runs at once (None: no cluster, submit them all).

        A task reaches dask only when a worker can start it. dask hands out a handful of tasks
        at once round robin (they are too few for its queue), so 4 jobs of sizes 2, 1, 2, 1 on
        2 workers ran as 2 + 2 and 1 + 1; handed out as workers free up they run as 2 + 1 and
        1 + 2, the order the planner balances for (:func:`~zarr_parallel.planning.plan.makespan`).
        A worker that dies then takes no queued task down with it either. The workers'
        threads count: a remote cluster's worker may run several tasks at once.
        """
        handle = self.handle
        if handle is None or handle.mode == "series":
            return None
        threads = sum(int(w.get("nthreads") or 1) for w in handle.workers().values())
        return max(1, handle.concurrency, threads)

    def refill(self) -> None:
        """Submit pending groups while the cluster has free slots."""
        slots = self.slots()
        busy = sum(not sub.settled for sub in self.running.values())
        while self.pending and (slots is None or busy < slots):
            self.submit(self.pending.popleft(), 0)
            busy += 1

    def settle(self, index: int, future: PrefectFuture[Any]) -> None:
        """Free the slot of group ``index`` when its task ended on its worker.

        Called before its outcome is collected: reading the result and reporting progress to
        the Prefect API took up to 0.15 s, which the freed worker spent idle. A task whose
        worker was lost keeps its slot until :meth:`_finished` decides on a retry.
        """
        sub = self.running.get(index)
        wrapped = getattr(future, "wrapped_future", None)
        if (
            sub is not None
            and sub.future is future
            and getattr(wrapped, "status", "") == "finished"
        ):
            sub.settled = True

    def run(self) -> None:
        """Submit every group and wait until each has completed, failed or been given up."""
        self.pending = collections.deque(range(len(self.groups)))
        self.refill()
        handle = self.handle
        max_replacements = max(1, (handle.concurrency if handle else 1) * (self.req.retries + 1))
        last_check = time.monotonic()
        while self.running or self.pending:
            self.refill()
            try:
                index, future = self.done_q.get(timeout=1.0)
            except queue.Empty:
                index, future = -1, None
            if handle is not None and (future is None or time.monotonic() - last_check > 2.0):
                # Between completions, and at least every 2 s: replace ended SLURM jobs, and stop
                # waiting for tasks no worker can run.
                last_check = time.monotonic()
                self._watch(handle, max_replacements)
            if future is not None:
                self.settle(index, future)
                self.refill()
                self._finished(index, future)

    def _watch(self, handle: ClusterHandle, max_replacements: int) -> None:
        """Check the cluster; give up on every running task when no worker can come."""
        message = handle.check(max_replacements)
        if not message:
            return
        self.logger.error(
            "giving up on %d write tasks: %s", len(self.running) + len(self.pending), message
        )
        for sub in self.running.values():
            _cancel(sub.future)
        for i in [*self.running, *self.pending]:
            for job_id in self.groups[i]:
                self.failed[job_id] = {"state": "Crashed", "message": message}
        self.running.clear()
        self.pending.clear()

    def _finished(self, index: int, future: PrefectFuture[Any]) -> None:
        """Collect a finished task of group ``index``: its results, a retry, or its failure."""
        current = self.running.get(index)
        if current is None or current.future is not future:
            return
        sub = self.running.pop(index)
        outcome = _outcome(future)
        if outcome.state == "Completed":
            self.results.extend(
                {**r, "attempts": sub.attempts_before + int(r.get("attempts") or 1)}
                for r in outcome.results
            )
            self.completed_jobs += len(self.groups[index])
            update_progress_artifact(
                self.progress, 100.0 * self.completed_jobs / max(1, self.total)
            )
            return
        attempts = sub.attempts_before + attempts_made(Path(self.version), str(future.task_run_id))
        if outcome.state == "Crashed" and self._retry_crashed(index, future, outcome, attempts):
            return
        self.errors.append(outcome.error)
        for job_id in self.groups[index]:
            self.failed[job_id] = {
                "state": outcome.state,
                "message": outcome.message,
                "attempts": attempts,
            }

    def _retry_crashed(
        self, index: int, future: PrefectFuture[Any], outcome: _Outcome, used: int
    ) -> bool:
        """Submit a crashed task again while attempts remain (not after a memory kill).

        False when it is not retried; ``outcome.message`` then says why the worker was lost.
        """
        reason = self.handle.explain(outcome.worker, wait=5.0) if self.handle else None
        what = str(reason or f"the worker running it was lost ({outcome.message})")
        _mark_crashed(future.task_run_id, what)
        memory_kill = reason is not None and reason.kind == "memory"
        if not memory_kill and used <= self.req.retries:
            self.logger.warning(
                "write task for jobs %s: %s; retrying (attempt %d of %d)",
                _ids(self.groups[index]),
                what,
                used + 1,
                self.req.retries + 1,
            )
            self.submit(index, used)
            return True
        outcome.message = what
        return False


@flow(name="zarr-parallel-write")
def write_flow(
    request_json: str,
    version: str,
    groups: list[list[int]],
    cluster_address: str | None = None,
    fence: str | None = None,
) -> list[dict[str, Any]]:
    """Run the write tasks of one version and gather the per-job results.

    Parameters
    ----------
    request_json
        The request, as the workers get it.
    version
        The version folder being written (its ``plan.json`` holds the jobs).
    groups
        Job ids per write task.
    cluster_address
        Scheduler of the run's cluster (None in series mode), watched while waiting.
    fence
        The token the flow holds the cache's lock with; every job checks it before recording.
    """
    req = CacheRequest.model_validate_json(request_json)
    plan = plan_record(Path(version)) or {}
    versions = Path(version).parent
    # The cache's final path (``P`` beside ``P.versions``) keys its artifacts.
    name = str(versions.with_name(versions.name.removesuffix(".versions")))
    progress = cast(
        UUID,
        create_progress_artifact(
            0.0, key=artifact_key("zp-progress", name), description="Share of write jobs done"
        ),
    )
    tasks = _WriteTasks(
        req,
        request_json,
        version,
        groups,
        active_cluster(cluster_address),
        progress,
        get_run_logger(),
        fence,
    )
    tasks.run()
    results, failures = _settle(Path(version), plan, tasks.results, tasks.failed)
    _publish_results(name, results, failures)
    update_progress_artifact(progress, 100.0 * len(results) / max(1, tasks.total))
    if failures:
        _raise_failed(failures, len(results), tasks.total, tasks.errors)
    return results


def write_stages(
    prepared: Prepared, runner: Any, cluster_address: str | None
) -> list[dict[str, Any]]:
    """Run every stage's write jobs in order, then the version's; the version's job results.

    A one-stage plan runs :func:`write_flow` once. A staged plan first writes each intermediate
    store (jobs not yet recorded there), each stage a write flow of its own on the same
    workers, resumable job by job through its own manifest (docs/design.md §3.4).
    """
    logger = get_run_logger()
    plan = prepared.plan
    total = len(plan.stages) + 1
    # The flow holds the lock: its token travels with every job (docs/reliability.md, fencing).
    fence = held_token(prepared.paths.lock)
    for n, stage in enumerate(plan.stages, start=1):
        todo = stage_todo(plan, prepared.intermediates, n)
        enter_phase("data", stage=(n, total))
        logger.info(
            "data (stage %d/%d): %d of %d jobs to run", n, total, len(todo), len(stage.plan.jobs)
        )
        if todo:
            with watch_jobs(Path(prepared.intermediates[n - 1]), todo):
                write_flow.with_options(task_runner=runner, name=f"zarr-parallel-write-stage-{n}")(
                    stage_request(prepared.request, stage).model_dump_json(),
                    prepared.intermediates[n - 1],
                    group_jobs(todo),
                    cluster_address,
                    fence,
                )
    if plan.stages:
        enter_phase("data", stage=(total, total))
        logger.info("data (stage %d/%d): %d jobs to run", total, total, len(prepared.todo))
    else:
        enter_phase("data")
    with watch_jobs(prepared.version, prepared.todo):
        results: list[dict[str, Any]] = write_flow.with_options(task_runner=runner)(
            prepared.request_json,
            str(prepared.version),
            group_jobs(prepared.todo),
            cluster_address,
            fence,
        )
    return results


def _raise_failed(
    failures: list[dict[str, Any]], finished: int, total: int, errors: list[BaseException | None]
) -> None:
    """Raise the run's failure: a lost lock or a source change if a job saw one, else the
    failed jobs."""
    lost = [e for e in errors if isinstance(e, LockLost)]
    if lost:
        # Resuming is for the run that holds the lock now, not for this one.
        raise LockLost(str(lost[0]), failures)
    changed = [e for e in errors if isinstance(e, SourceChanged)]
    if changed:
        # Resuming would not help: the next run plans the changed source afresh.
        raise SourceChanged(changed[0].path, changed[0].change)
    first = "; ".join(_failure_text(f) for f in failures[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    raise RunFailed(
        f"{len(failures)} of {total} write jobs failed: {first}{more}. The {finished} "
        "finished jobs stay recorded: run again (resume='auto') to write only the rest",
        failures,
    )


def _failure_text(failure: dict[str, Any]) -> str:
    head = f"job {failure['id']} {failure['region']}"
    message = str(failure["message"])
    # Job processes name the job and region themselves; do not say it twice.
    return message if message.startswith(head) else f"{head}: {message}"


def _ids(ids: Sequence[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])


def _outcome(future: PrefectFuture[Any]) -> _Outcome:
    """What became of a write task: Completed, Failed (after its retries) or Crashed."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is not None and hasattr(wrapped, "status"):  # a dask future
        if wrapped.status in ("error", "cancelled", "lost"):
            try:
                error = wrapped.exception(timeout=5)
            except BaseException as e:  # cancelled futures raise instead
                error = e
            worker = getattr(getattr(error, "last_worker", None), "name", None)
            return _Outcome("Crashed", [], f"{type(error).__name__}: {error}", error, _name(worker))
        state = wrapped.result()
    else:
        future.wait()
        state = future.state
    if state.is_completed():
        return _Outcome("Completed", list(state.result()))
    error = state.result(raise_on_failure=False)
    if not isinstance(error, BaseException):
        return _Outcome(state.name or "Failed", [], str(state.message))
    return _Outcome(state.name or "Failed", [], str(error), error)


def _name(worker: Any) -> str | None:
    return None if worker is None else str(worker)


def _cancel(future: PrefectFuture[Any]) -> None:
    wrapped = getattr(future, "wrapped_future", None)
    try:
        if wrapped is not None and hasattr(wrapped, "cancel"):
            wrapped.cancel()
    except Exception:  # best effort: the cluster is being given up anyway
        pass


def _mark_crashed(task_run_id: UUID, message: str) -> None:
    """A task run whose worker died stays Running in the API: say what happened instead."""
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as e:  # the report must not fail the run
        get_run_logger().debug("could not mark task run %s crashed: %s", task_run_id, e)


def _settle(
    version: Path,
    plan: dict[str, Any],
    results: list[dict[str, Any]],
    failed: dict[int, dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Completed results and failures per job; jobs of a failed task that were recorded count
    as completed (the manifest is the truth)."""
    done_ids = {int(r["id"]) for r in results}
    jobs = read_jobs(plan)
    recorded = recorded_jobs(version, str(plan.get("fingerprint"))) if failed else set()
    failures = []
    for job_id, info in sorted(failed.items()):
        if job_id in done_ids:
            continue
        if job_id in recorded:
            results.append({**read_job_record(version, job_id), "attempts": info.get("attempts")})
            continue
        failures.append(
            {
                "id": job_id,
                "region": describe_job(jobs, job_id),
                "state": info["state"],
                "attempts": info.get("attempts"),
                "message": info["message"],
            }
        )
    return sorted(results, key=lambda r: int(r["id"])), failures


def _publish_results(
    name: str, results: list[dict[str, Any]], failures: list[dict[str, Any]]
) -> None:
    rows = []
    for r in results:
        peak, estimate = r.get("peak_memory"), r.get("estimated_memory")
        rows.append(
            {
                "job": r["id"],
                "state": "Completed",
                "attempts": r.get("attempts"),
                "region": describe_region(r.get("variables", []), r.get("region", [])),
                "seconds": r.get("seconds"),
                "bytes written": r.get("bytes"),
                "peak memory": peak,
                "estimated memory": estimate,
                "peak / estimate": round(peak / estimate, 2) if peak and estimate else None,
                "host": r.get("host"),
                "slurm job": r.get("slurm_job_id"),
                "message": "",
            }
        )
    for f in failures:
        rows.append(
            {
                "job": f["id"],
                "state": f["state"],
                "attempts": f.get("attempts"),
                "region": f["region"],
                "seconds": None,
                "bytes written": None,
                "peak memory": None,
                "estimated memory": None,
                "peak / estimate": None,
                "host": None,
                "slurm job": None,
                "message": f["message"],
            }
        )
    rows.sort(key=lambda row: int(row["job"]))
    create_table_artifact(rows, key=artifact_key("zp-results", name), description="Write jobs")


__all__ = ["MAX_TASKS", "group_jobs", "write_flow"]
