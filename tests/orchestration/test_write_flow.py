"""How the write flow hands its tasks to a cluster: no more at once than the cluster runs.

The tasks' own behaviour (retries, crashes, results) is exercised end to end by the deploy-mode
tests on real clusters; these tests pin the hand-out order, which timing on a real cluster
cannot show deterministically.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from zarr_parallel.orchestration import write_flow
from zarr_parallel.orchestration.write_flow import _Submission, _WriteTasks


class _Handle:
    """A stand-in for a cluster handle: its worker count and what its check says."""

    def __init__(
        self, mode: str, concurrency: int, message: str | None = None, threads: tuple[int, ...] = ()
    ) -> None:
        self.mode = mode
        self.concurrency = concurrency
        self.message = message
        self.threads = list(threads)

    def workers(self) -> dict[str, Any]:
        return {f"w{i}": {"nthreads": n} for i, n in enumerate(self.threads)}

    def check(self, max_replacements: int) -> str | None:
        return self.message


def _tasks(handle: Any, groups: int) -> tuple[_WriteTasks, list[int]]:
    tasks = _WriteTasks(
        SimpleNamespace(retries=0),  # type: ignore[arg-type]
        "{}",
        "/tmp/v",
        [[i] for i in range(groups)],
        handle,
        None,  # type: ignore[arg-type]
        logging.getLogger(),
    )
    submitted: list[int] = []

    def submit(index: int, attempts_before: int) -> None:
        submitted.append(index)
        future = SimpleNamespace(wrapped_future=SimpleNamespace(status="pending"))
        tasks.running[index] = _Submission(future, attempts_before, 0.0)  # type: ignore[arg-type]

    tasks.submit = submit  # type: ignore[method-assign]
    return tasks, submitted


def test_a_cluster_gets_a_task_only_when_a_worker_is_free() -> None:
    """4 tasks on 2 workers: 2 handed out, the third when one of them ends, in plan order."""
    tasks, submitted = _tasks(_Handle("dask_distributed", 2), 4)
    tasks.pending.extend(range(4))
    tasks.refill()
    assert submitted == [0, 1]
    tasks.refill()
    assert submitted == [0, 1]
    tasks.running.pop(1)
    tasks.refill()
    assert submitted == [0, 1, 2]
    tasks.running.pop(0)
    tasks.running.pop(2)
    tasks.refill()
    assert submitted == [0, 1, 2, 3]


def test_series_gets_every_task_at_once() -> None:
    """In series mode the task runner's one thread takes them in order: nothing is held back."""
    tasks, submitted = _tasks(_Handle("series", 1), 3)
    tasks.pending.extend(range(3))
    tasks.refill()
    assert submitted == [0, 1, 2]


def test_giving_up_fails_the_tasks_not_yet_handed_out_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """When no worker can come, the waiting tasks' jobs fail with the same message as the
    running ones, and the flow stops waiting."""
    monkeypatch.setattr(write_flow, "_cancel", lambda future: None)
    tasks, submitted = _tasks(_Handle("slurm", 1, "no SLURM job is queued or running"), 3)
    tasks.pending.extend(range(3))
    tasks.refill()
    assert submitted == [0]
    tasks._watch(tasks.handle, 1)  # type: ignore[arg-type]
    assert not tasks.running and not tasks.pending
    assert sorted(tasks.failed) == [0, 1, 2]
    assert {f["message"] for f in tasks.failed.values()} == {"no SLURM job is queued or running"}


def test_a_remote_cluster_gets_a_task_per_worker_thread() -> None:
    """A remote cluster sized by its owner: two workers of 3 threads run 6 tasks at once, more
    than the run's own sizing (2) would give."""
    tasks, submitted = _tasks(_Handle("dask_distributed", 2, threads=(3, 3)), 8)
    tasks.pending.extend(range(8))
    tasks.refill()
    assert submitted == [0, 1, 2, 3, 4, 5]


def test_a_task_that_ended_frees_its_worker_before_its_outcome_is_collected() -> None:
    """The next task goes out as soon as a task ends on its worker, before the flow reads its
    result and reports progress; a task whose worker was lost keeps its slot (it may be
    retried there)."""
    tasks, submitted = _tasks(_Handle("dask_distributed", 2), 4)
    tasks.pending.extend(range(4))
    tasks.refill()
    lost, ended = tasks.running[0].future, tasks.running[1].future
    lost.wrapped_future.status = "lost"  # type: ignore[attr-defined]
    tasks.settle(0, lost)
    tasks.refill()
    assert submitted == [0, 1]
    ended.wrapped_future.status = "finished"  # type: ignore[attr-defined]
    tasks.settle(1, ended)
    tasks.refill()
    assert submitted == [0, 1, 2]
    assert 1 in tasks.running  # still to be collected
    tasks.settle(1, object())  # type: ignore[arg-type]  (a stale future changes nothing)
    tasks.refill()
    assert submitted == [0, 1, 2]
