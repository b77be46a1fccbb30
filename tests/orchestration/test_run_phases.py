"""A deployment run's summary artifact (orchestration/run_phases.py); the deployment runs
themselves are in tests/doors/test_deployments.py (a real server and worker)."""

from __future__ import annotations

from prefect import flow

from zarr_parallel.orchestration.run_phases import START_UP, deployment_phases, summary_markdown
from zarr_parallel.run.phases import PHASES, current_clock


def _summary() -> dict:
    return {
        "status": "done",
        "cache": "/data/era5.zarr",
        "jobs": 4,
        "jobs_run": 4,
        "jobs_skipped": 0,
        "bytes_written": 8_070_000,
        "seconds": 9.4,
        "phases": dict(zip(PHASES, (4.1, 0.8, 0.5, 3.6, 0.2, 0.2), strict=True)),
        "queued_seconds": 7.0,
        "deploy_mode": "dask_distributed",
        "cluster_requested_at": 5.4,
        "cluster_requested_during": "initialise",
        "cluster_ready_seconds": 2.5,
        "recache": {"action": "append", "reason": "2 new source file(s)"},
    }


def test_the_summary_artifact_gives_the_wall_time_its_phases_and_what_start_up_counts() -> None:
    text = summary_markdown(_summary())
    assert text.startswith("# Run summary: done")
    assert "| wall time | 9.4 s |" in text
    for name, seconds in zip(PHASES, ("4.1", "0.8", "0.5", "3.6", "0.2", "0.2"), strict=True):
        assert f"| {name} | {seconds} s |" in text
    assert "| queued before a worker took it | 7.0 s |" in text
    assert "| written | 8.07 MB |" in text
    assert "| cluster start | 5.4 s into the run, during initialise (ready 2.5 s later) |" in text
    assert "| re-cache | append: 2 new source file(s) |" in text
    assert START_UP in text


def test_outside_a_deployment_run_nothing_is_timed() -> None:
    @flow(name="zp-test-not-a-deployment")
    def not_a_deployment() -> tuple[bool, dict]:
        with deployment_phases() as report:
            timed = current_clock() is not None
            return timed, report({"status": "done"})

    timed, summary = not_a_deployment()
    assert timed is False and summary == {"status": "done"}
