"""Durability of real runs: a crash soak, file-operation faults, and runs interleaved.

The runs are real command-line runs (``flows.cache.main``) in processes of their own, forked
from one process that imported the command line once (``benchmarks.zygote.Zygote``):
each dies for real (SIGKILL), freezes for real (SIGSTOP), or meets a failing file operation made
by the fault layer of :mod:`zarr_parallel.faults` inside it. Two requests that differ in content
take turns on one cache path with ``keep_versions: 1``, so every finished run publishes and
prunes. The invariants (``benchmarks.durability_scenario``): the published path always resolves to
a complete version equal to a reference, nothing outside the cache changes, a failed run exits
with 1 and a message, and the next run gives the reference byte for byte, passes ``verify`` and
leaves nothing behind. ``python -m benchmarks.bench_durability`` runs the same with hundreds of
kills.

CI runs a short form that still covers every place a run can die and every kind of failing
file operation; the environment makes it longer:

``ZP_SOAK_KILLS`` (default 14)
    Series kills of the soak: one at each named fault point, one inside prune and one from
    outside come first whatever the time, then random kills while kills and time remain.
``ZP_SOAK_SECONDS`` (default 60)
    The time bound of those random kills (the one kill in ``dask_distributed`` mode follows).
``ZP_SWEEP_STRIDE_SCALE`` (default 2)
    Multiplies the stride of each operation's fault sweep (N = 1, 1+stride, ...).
``ZP_SWEEP_SECONDS`` (default 0)
    How long each operation's sweep goes on once that operation failed twice (each of its
    errors at least once; an N past a run's last such operation moves back half-way).

``ZP_PAIR_STRIDE`` (default 3), ``ZP_PAIR_SHIFTS`` (default 1)
    The pairs of fault points (``test_interleaved_pairs``): point k of the first run with
    point k + s·stride of the second, s = 1..shifts; ``ZP_PAIR_STRIDE=1 ZP_PAIR_SHIFTS=10``
    gives every (i, j). ``python -m benchmarks.bench_durability --pairs`` also runs each with
    the same and the other request, stopped and killed.

A full run, as the release tests: ``ZP_SOAK_KILLS=24 ZP_SOAK_SECONDS=150
ZP_SWEEP_STRIDE_SCALE=1 ZP_SWEEP_SECONDS=60 ZP_PAIR_STRIDE=1 ZP_PAIR_SHIFTS=10``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_durability import fault_step, fault_sweep, soak
from benchmarks.durability_pairs import (
    RUN_POINTS,
    Pair,
    PairCounts,
    pair_step,
    recache_pair_step,
    start_from,
    strided_pairs,
    verify_pair_step,
)
from benchmarks.durability_scenario import (
    Counts,
    Scenario,
    check_finished,
    harness,
    published_content,
    verify_cli,
)
from benchmarks.zygote import Zygote
from zarr_parallel import faults
from zarr_parallel.run.verify import location_snapshot
from zarr_parallel.store.disk_names import PRUNING_PREFIX
from zarr_parallel.store.paths import CachePaths

#: Kills of the CI soak (the benchmark makes hundreds); more with ZP_SOAK_KILLS=N.
SOAK_KILLS = int(os.environ.get("ZP_SOAK_KILLS", "14"))
#: Seconds of random kills after the named ones (ZP_SOAK_SECONDS).
SOAK_SECONDS = float(os.environ.get("ZP_SOAK_SECONDS", "60"))
#: How much wider than the release tests' the sweeps' strides are (ZP_SWEEP_STRIDE_SCALE).
STRIDE_SCALE = float(os.environ.get("ZP_SWEEP_STRIDE_SCALE", "2"))
#: Seconds each operation's sweep goes on after its two faults (ZP_SWEEP_SECONDS).
SWEEP_SECONDS = float(os.environ.get("ZP_SWEEP_SECONDS", "0"))


@pytest.fixture(scope="module")
def durability(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Scenario, Zygote]]:
    """The two-request scenario (sources, requests, references) and the run forker."""
    with harness(str(tmp_path_factory.mktemp("durability"))) as made:
        yield made


def _run(
    scn: Scenario, zygote: Zygote, content: str, fault: str | None = None, *extra: str
) -> tuple[int, str]:
    env = {"ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent)}
    if fault:
        env["ZARR_PARALLEL_FAULT"] = fault
    log = scn.new_log(content)
    code = zygote.run(scn.argv(content, *extra), log, scn.root, env)
    return code, log.read_text()


def test_a_reused_pid_is_a_new_run_to_the_zygote(tmp_path: Path) -> None:
    """The kernel reuses pids: a long pair sweep forked a run whose pid an earlier run had had,
    the harness took it for ended (it was in the waited set), never killed it, and that frozen
    run held the lock through every later pair. A pid the zygote forks again starts afresh."""
    import io
    import json as json_

    from benchmarks.zygote import Zygote

    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as out, os.fdopen(write_end, "wb") as feed:
        zygote = Zygote.__new__(Zygote)
        zygote._proc = type("P", (), {"stdin": io.BytesIO(), "stdout": out})()  # type: ignore[assignment]
        zygote._codes, zygote._pids, zygote._waited, zygote._token = {}, {}, set(), 0
        zygote._buffer = b""
        feed.write(b'{"token": 1, "pid": 4242}\n{"pid": 4242, "rc": 0}\n')
        feed.flush()
        first = zygote.spawn(["cache", "run", "x.yaml"], tmp_path / "a.log", tmp_path)
        assert (first, zygote.wait(first, 5)) == (4242, 0) and zygote.ended(first)
        feed.write(json_.dumps({"token": 2, "pid": 4242}).encode() + b"\n")
        feed.flush()
        second = zygote.spawn(["cache", "run", "x.yaml"], tmp_path / "b.log", tmp_path)
        assert second == 4242 and not zygote.ended(second, 0)


def test_fault_specs_parse_and_typos_fail() -> None:
    assert faults.parse("kill@job-recorded#2") == faults.Fault("kill", "job-recorded", 2)
    assert faults.parse("enospc@os.write#3*") == faults.Fault(
        "enospc", None, 1, "write", 3, persistent=True
    )
    spec = faults.parse("stop@prune+os.unlink#4")
    assert (spec.point, spec.operation, spec.operation_nth) == ("prune", "unlink", 4)
    for bad in ("kill@nowhere", "crash@init", "kill@os.chmod#1", "eio@init", "kill"):
        with pytest.raises(ValueError, match="ZARR_PARALLEL_FAULT"):
            faults.parse(bad)


def test_the_file_operation_layer_counts_only_under_its_root(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    with faults.activate("enospc@os.write#2", inside):
        (outside / "a").write_text("x")  # not counted: outside the root
        (inside / "a").write_text("x")  # the first write under the root
        with pytest.raises(OSError, match="injected: write #2") as e:
            (inside / "b").write_text("y")
        assert e.value.errno == 28 and faults.fired()
        (inside / "c").write_text("z")  # transient: the third succeeds
    assert (inside / "c").read_text() == "z"
    with faults.activate("eio@os.replace#1*", inside):
        for name in ("d", "e"):
            (inside / name).write_text("1")
            with pytest.raises(OSError, match="Input/output"):
                os.replace(inside / name, inside / f"{name}2")  # persistent: every one fails
    os.replace(inside / "d", inside / "d2")  # the layer is gone after the block


def test_resume_after_a_kill_inside_prune(durability: tuple[Scenario, Zygote]) -> None:
    """A run killed while it removed the previous version, then that version's request again.

    The half-removed version kept its manifest, so the next run of its request took it up as
    its own interrupted run and failed on its missing arrays, with exit 2 ("invalid request:
    No array found ..."), at every later attempt. Now a version is renamed out of the versions'
    names before it is removed, and the next prune removes what a cut-short removal left.
    """
    scn, zygote = durability
    start_from(scn, zygote, "A")
    assert _run(scn, zygote, "B")[0] == 0
    # A publishes and prunes B's version; killed after 5 files of it were removed.
    code, _ = _run(scn, zygote, "A", "kill@prune+os.unlink#5")
    assert code == -signal.SIGKILL
    counts = Counts()
    assert published_content(scn, counts, {"A"}, "after the kill") == "A"
    versions = CachePaths(scn.final).versions
    assert [p.name for p in versions.iterdir() if p.name.startswith(PRUNING_PREFIX)]
    code, log = _run(scn, zygote, "B")
    assert code == 0, log[-2000:]
    check_finished(scn, counts, "B", "the next run of B")
    assert counts.failures == [] and counts.verified == 1
    assert not list(versions.glob(f"{PRUNING_PREFIX}*")), "the next prune removes the leftover"


def test_a_killed_run_leaves_no_probe_file(durability: tuple[Scenario, Zygote]) -> None:
    """The first file removed under the cache's folder was the writability probe's: a run
    killed just before it left ``.zarr-parallel-probe-*`` beside the cache for good. The probe
    is now an unnamed file."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    code, _ = _run(scn, zygote, "B", "kill@os.unlink#1")
    assert code == -signal.SIGKILL
    assert not list(scn.final.parent.glob(".zarr-parallel-probe-*"))
    assert _run(scn, zygote, "B")[0] == 0
    counts = Counts()
    check_finished(scn, counts, "B", "after the kill")
    assert counts.failures == []


def test_crash_soak(durability: tuple[Scenario, Zygote]) -> None:
    """SIGKILL at every named point, inside prune, from outside, then at random instants (file
    operations, points, inside prune, from outside), and from outside in the dask_distributed
    mode: after each kill the published cache is whole, and the resumed run gives the
    reference, verifies and leaves nothing behind."""
    scn, zygote = durability
    shutil.rmtree(scn.final.parent, ignore_errors=True)
    counts = soak(scn, zygote, SOAK_KILLS, SOAK_SECONDS, seed=16, dask_kills=1, every_point=True)
    print(counts.text())
    assert counts.failures == []
    assert counts.bytes_lost == 0
    missed = {*faults.POINTS, "prune+os.unlink", "outside"} - set(counts.where)
    assert not missed, f"no kill at {sorted(missed)}: {counts.where}"
    assert any(place.endswith("(dask_distributed)") for place in counts.where), counts.where
    assert counts.kills >= min(SOAK_KILLS, 12)
    assert counts.verified >= counts.kills // 2


def test_file_operation_faults(durability: tuple[Scenario, Zygote]) -> None:
    """The N-th write, fsync, open, mkdir, replace, link, symlink, unlink, rmdir of a run fails
    (ENOSPC or EIO), N = 1, 1+stride, ... until a run no longer reaches it: the previous version
    stays published and whole, the run exits 1 with a message, a clean re-run gives the
    reference. Each kind fails at least twice (when runs make it twice). The benchmark
    (``--io-faults``) sweeps every N."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    plan = {
        "write": (("enospc", "eio*"), 23),
        "fsync": (("eio",), 29),
        "open": (("enospc*",), 17),
        "mkdir": (("enospc",), 23),
        "replace": (("eio",), 11),
        "link": (("enospc",), 2),
        "symlink": (("enospc",), 1),
        "unlink": (("eio",), 9),
        "rmdir": (("eio",), 9),
    }
    counts = Counts()
    for operation, (errors, stride) in plan.items():
        # From the end of planning on: the lock's own faults are test_faults_taking_the_lock.
        wider = max(1, round(stride * STRIDE_SCALE))
        fault_sweep(
            scn, zygote, {operation: errors}, SWEEP_SECONDS, wider, counts, "planned", least=2
        )
    print(counts.text())
    assert counts.failures == []
    assert counts.bytes_lost == 0
    # Every kind fails at least twice, except symlink: a run makes one, the publish link
    # (counted where the link is made: zarr_parallel.faults), and its one fault must act.
    for operation in plan:
        failed = sum(n for label, n in counts.where.items() if label.endswith(f" {operation}"))
        least = 1 if operation == "symlink" else 2
        assert failed >= least, f"{operation} failed {failed} times: {counts.where}"
    assert counts.faults >= 2 * len(plan) - 1


@pytest.mark.parametrize("spec", ["enospc@os.write#1", "eio@os.fsync#1", "enospc@os.link#1"])
def test_faults_taking_the_lock(durability: tuple[Scenario, Zygote], spec: str) -> None:
    """The first write, fsync and link under the cache's folder are the lock's: the run must
    fail with exit 1 and a message, leave the published cache and no temporary lock file."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    counts = Counts()
    injected = fault_step(scn, zygote, counts, spec)
    assert injected
    assert counts.failures == []
    assert not list(scn.final.parent.glob("*.tmp"))


#: Where the first run is frozen while the others try: each named fault point of a run.
PAUSES = (
    "planned",
    "initialised",
    "job-recorded#2",
    "before-publish",
    "publish",
    "published",
    "prune",
)


def _frozen(zygote: Zygote, pid: int, point: str) -> None:
    deadline = time.monotonic() + 120
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        assert not zygote.ended(pid), f"the run ended before {point}"
        assert time.monotonic() < deadline, f"the run never reached {point}"
        time.sleep(0.02)


@pytest.mark.parametrize("point", PAUSES)
def test_interleaved_runs(durability: tuple[Scenario, Zygote], point: str) -> None:
    """A run frozen at ``point``; meanwhile a run of the other request, ``verify`` and a
    re-cache of the same cache each stop at once (the lock) and change nothing; the frozen run
    then finishes and publishes its content."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    log = scn.new_log(f"frozen-{point}")
    env = {"ZARR_PARALLEL_FAULT": f"stop@{point}"}
    first = zygote.spawn(scn.argv("B"), log, scn.root, env)
    try:
        _frozen(zygote, first, point)
        snapshot = location_snapshot(scn.final)
        code, text = _run(scn, zygote, "A", None, "--set", "overwrite=true")
        assert code == 1 and "held by a running process" in text, text[-1500:]
        code, text = _run(scn, zygote, "B")
        assert code == 1 and "held by a running process" in text, text[-1500:]
        code, text = verify_cli(scn, "B")
        assert code == 1 and "held" in text, text[-1500:]
        recache = scn.new_log("recache")
        code = zygote.run(["recache", str(scn.requests["A"])], recache, scn.root)
        assert code == 1 and "held" in recache.read_text(), recache.read_text()[-1500:]
        assert location_snapshot(scn.final) == snapshot
        counts = Counts()
        expected = {"B"} if point in ("published", "prune") else {"A"}
        assert published_content(scn, counts, expected, f"while frozen at {point}") in expected
        os.kill(first, signal.SIGCONT)
        assert zygote.wait(first, 300) == 0, log.read_text()[-2000:]
    finally:
        if not zygote.ended(first, 0):
            os.kill(first, signal.SIGKILL)
    check_finished(scn, counts, "B", f"after the run frozen at {point}", log)
    assert counts.failures == [], counts.failures


def _lock_pid(scn: Scenario) -> int | None:
    """The pid holding the cache's lock, or None when nobody holds it."""
    from zarr_parallel.store.lock import LockHolder

    holder = LockHolder.from_file(CachePaths(scn.final).lock)
    return None if holder is None else holder.pid


#: Where a ``verify`` of A is frozen (file operations under the cache's folder; verify passes
#: no named point): before it takes the lock, holding it before reading, and done, releasing it.
VERIFY_PAUSES = {"before-lock": "os.mkdir#1", "locked": "os.unlink#1", "releasing": "os.rename#1"}


@pytest.mark.parametrize("where", list(VERIFY_PAUSES))
def test_interleaved_verify(durability: tuple[Scenario, Zygote], where: str) -> None:
    """``verify`` of A frozen while a run of B tries to write: once verify holds the lock the
    run stops at once (the lock) and verify then reports OK for A; frozen before the lock, the
    run publishes B and verify, continued, fails cleanly (exit 1, naming what changed), never
    a traceback and never OK for the wrong version."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    log = scn.new_log(f"verify-frozen-{where}")
    env = {
        "ZARR_PARALLEL_FAULT": f"stop@{VERIFY_PAUSES[where]}",
        "ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent),
    }
    frozen = zygote.spawn(["cache", "verify", str(scn.requests["A"])], log, scn.root, env)
    counts = Counts()
    try:
        _frozen(zygote, frozen, where)
        # Frozen where meant: holding the lock exactly when past taking it.
        assert _lock_pid(scn) == (None if where == "before-lock" else frozen)
        code, text = _run(scn, zygote, "B")
        if where == "before-lock":
            assert code == 0, text[-2000:]
            check_finished(scn, counts, "B", "B published while verify was frozen")
        else:
            assert code == 1 and "held by a running process" in text, text[-1500:]
            assert published_content(scn, counts, {"A"}, f"verify frozen {where}") == "A"
        os.kill(frozen, signal.SIGCONT)
        code = zygote.wait(frozen, 120)
    finally:
        if not zygote.ended(frozen, 0):
            os.kill(frozen, signal.SIGKILL)
    report = log.read_text()
    assert "Traceback" not in report, report[-2000:]
    if where == "before-lock":
        assert code == 1 and "result    OK" not in report, report[-2000:]
        # It checked the version published when it took the lock (B's) and says so.
        assert "stale: the cache was made from a different request" in report, report[-2000:]
        assert CachePaths(scn.final).current().name in report.splitlines()[0]
        assert published_content(scn, counts, {"B"}, "after verify") == "B"
    else:
        assert code == 0 and "result    OK" in report, report[-2000:]
        code, text = _run(scn, zygote, "B")  # the run refused meanwhile goes through now
        assert code == 0, text[-2000:]
        check_finished(scn, counts, "B", f"B after verify frozen {where}")
    assert counts.failures == [], counts.failures


#: Where ``python -m flows.recache B`` (a full re-cache: A is published) is frozen: before the
#: lock of its decision, holding it, and between the decision and the cache run it starts
#: (which takes the lock again).
RECACHE_PAUSES = {"before-lock": "os.mkdir#1", "deciding": "os.unlink#1", "decided": "os.mkdir#2"}


@pytest.mark.parametrize("where", list(RECACHE_PAUSES))
def test_interleaved_recache(durability: tuple[Scenario, Zygote], where: str) -> None:
    """A re-cache of B frozen while a run re-writes A (``overwrite``): the run is refused while
    the re-cache holds the lock, else publishes; either way the re-cache, continued, finishes
    and publishes B equal to its reference (it plans again under its own lock)."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    log = scn.new_log(f"recache-frozen-{where}")
    env = {
        "ZARR_PARALLEL_FAULT": f"stop@{RECACHE_PAUSES[where]}",
        "ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent),
    }
    frozen = zygote.spawn(["recache", str(scn.requests["B"])], log, scn.root, env)
    counts = Counts()
    try:
        _frozen(zygote, frozen, where)
        assert _lock_pid(scn) == (frozen if where == "deciding" else None)
        code, text = _run(scn, zygote, "A", None, "--set", "overwrite=true")
        if where == "deciding":
            assert code == 1 and "held by a running process" in text, text[-1500:]
        else:
            assert code == 0, text[-2000:]
        assert published_content(scn, counts, {"A"}, f"recache frozen {where}") == "A"
        os.kill(frozen, signal.SIGCONT)
        code = zygote.wait(frozen, 300)
    finally:
        if not zygote.ended(frozen, 0):
            os.kill(frozen, signal.SIGKILL)
    report = log.read_text()
    assert code == 0 and "Traceback" not in report, report[-2000:]
    assert "re-cache            full" in report, report[-2000:]
    check_finished(scn, counts, "B", f"the re-cache frozen {where}", log)
    assert counts.failures == [], counts.failures


def test_recache_cli_up_to_date(durability: tuple[Scenario, Zygote]) -> None:
    """``python -m flows.recache`` on a current cache ended in a KeyError traceback (its
    summary lacked a field the printer reads); it says "up to date" and exits 0."""
    scn, zygote = durability
    start_from(scn, zygote, "A")
    snapshot = location_snapshot(scn.final)
    log = scn.new_log("recache-up-to-date")
    code = zygote.run(["recache", str(scn.requests["A"])], log, scn.root)
    assert code == 0, log.read_text()[-2000:]
    assert "re-cache            up_to_date" in log.read_text()
    assert location_snapshot(scn.final) == snapshot


#: Pairs of the CI: point k of a run frozen (run 1) with point k + PAIR_STRIDE stopped or
#: killed (run 2), for PAIR_SHIFTS shifts (each shift has every point once as i and once as
#: j); ZP_PAIR_STRIDE=1 ZP_PAIR_SHIFTS=10 runs every (i, j); the benchmark's ``--pairs``
#: also varies the request and the action of every pair.
PAIR_STRIDE = int(os.environ.get("ZP_PAIR_STRIDE", "3"))
PAIR_SHIFTS = int(os.environ.get("ZP_PAIR_SHIFTS", "1"))
CI_PAIRS = strided_pairs(PAIR_STRIDE, PAIR_SHIFTS)


#: Pairs that found holes, run every time: run 1 frozen just before it writes the plan of its
#: new version, run 2 of the same request starting that version again and killed at the same
#: place; run 1, continued, wrote its plan into run 2's half-made version (arrays missing), and
#: every later run failed on it until resume was turned off. And run 1 frozen once initialised,
#: run 2 of another request (which removes run 1's staging version) stopped before publishing:
#: run 1, continued, noted its write task's attempt in the removed version, bringing its
#: folders back, left behind after run 2 published (the full sweep's 18 failures, December 6).
FOUND_PAIRS = [
    Pair("init", "init", True, "kill"),
    Pair("init", "init", True, "stop"),
    Pair("initialised", "before-publish", False, "stop"),
]


@pytest.mark.parametrize(
    "pair", CI_PAIRS + FOUND_PAIRS, ids=[p.label for p in CI_PAIRS + FOUND_PAIRS]
)
def test_interleaved_pairs(durability: tuple[Scenario, Zygote], pair: Pair) -> None:
    """Run 1 (of B) frozen at ``pair.first``, its lock made stale; run 2 (of B again, resuming
    its version, or of C) breaks it and is frozen or killed at ``pair.second``; run 1,
    continued, exits 1 (lost lock) having recorded and published nothing; run 2, continued or
    resumed, publishes its reference, verified, nothing left behind, nothing outside changed
    (``benchmarks.durability_pairs``). :data:`FOUND_PAIRS` run every time."""
    scn, zygote = durability
    counts = PairCounts()
    pair_step(scn, zygote, counts, pair)
    print(counts.text())
    assert counts.failures == [], counts.failures
    assert counts.bytes_lost == 0 and counts.verified == 1


def test_pairs_cover_every_point() -> None:
    """The CI's pairs have every point of a run once as run 1's and once as run 2's."""
    assert {p.first for p in CI_PAIRS} == set(RUN_POINTS)
    assert {p.second for p in CI_PAIRS} == set(RUN_POINTS)
    assert {p.same for p in CI_PAIRS} == {True, False}
    assert {p.action for p in CI_PAIRS} == {"stop", "kill"}


#: verify × run pairs of the CI: verify frozen holding its lock, run 2 at these points.
VERIFY_PAIRS = [
    ("locked", Pair("locked", "job-recorded#2", True, "stop")),
    ("releasing", Pair("releasing", "published", True, "kill")),
]


#: re-cache × run pairs of the CI: a full re-cache of B frozen deciding (holding its lock), run 2
#: of B frozen after its first job, or of C killed as it publishes.
RECACHE_PAIRS = [
    ("deciding", Pair("deciding", "job-recorded#2", True, "stop")),
    ("deciding", Pair("deciding", "publish", False, "kill")),
]


#: The holder × run pairs of the CI: (step, where the holder is frozen, pair).
HOLDER_PAIRS = [(verify_pair_step, w, p) for w, p in VERIFY_PAIRS] + [
    (recache_pair_step, w, p) for w, p in RECACHE_PAIRS
]


@pytest.mark.parametrize(
    "step,where,pair",
    HOLDER_PAIRS,
    ids=[f"{s.__name__.split('_')[0]}-{p.label}" for s, _, p in HOLDER_PAIRS],
)
def test_interleaved_holder_pairs(
    durability: tuple[Scenario, Zygote], step: Any, where: str, pair: Pair
) -> None:
    """``verify`` of A, or a full re-cache of B, frozen holding the lock, made stale; a run of B
    (or C) breaks it and is frozen or killed. ``verify``, continued, says OK only for A's
    version or fails cleanly (frozen before it takes the lock, it holds nothing that goes
    stale: ``test_interleaved_verify``); the re-cache ends cleanly (exit 1, or exit 0 having
    published B); the run then finishes to its reference (``benchmarks.durability_pairs``)."""
    scn, zygote = durability
    counts = PairCounts()
    step(scn, zygote, counts, where, pair)
    print(counts.text())
    assert counts.failures == [], counts.failures
    assert counts.verified == 1
