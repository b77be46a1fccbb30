"""Runs interleaved at every pair of fault points, through a lock broken as stale.

A run frozen (SIGSTOP) holds the cache's lock, so another run only gets past it once the lock
is broken as stale (``break_lock``; on another host, a lock whose heartbeat stopped, which is
what a frozen run's lock becomes: its heartbeat thread is frozen too). One pair (i, j):

1. The cache holds content A, published by a clean run.
2. Run 1, of B, is frozen at point i; its lock is made to look like a lock of a dead host
   (the host's name changed, its heartbeat an hour old; its token unchanged).
3. Run 2 (``break_lock``), of B again (the same request: it resumes run 1's version) or of C
   (another request), breaks the lock and is frozen or SIGKILLed at point j.
4. Run 1 is continued. It must find that it lost the lock: exit 1, no job recorded and
   nothing published by it after it woke.
5. Run 2 is continued (or, killed, a fresh run of its request resumes it) and must finish:
   the published cache then equals run 2's reference, passes ``verify``, nothing is left
   behind and nothing outside the cache changed (``benchmarks.durability_scenario``).

Where run 2 ends before it reaches j (the same request once run 1 published: up to date), the
pair reduces to "run 1 continued after a finished run 2"; it is counted as unreached.

``verify`` × run: ``verify`` of A holds the lock while it reads, and its lock can go stale as a
run's does, so it is frozen at each of its places (see :data:`VERIFY_PAUSES`), its lock made
stale, and a run of B breaks it and is frozen or killed at j; ``verify``, continued, must end
without a traceback and report OK only for the version it took when it held the lock (A's).
Frozen before it takes the lock, ``verify`` holds nothing that can go stale: that pair reduces
to a single interleaving, covered by ``test_interleaved_verify``.

Re-cache × run: a re-cache of B (a full one: A is published) holds the lock while it decides;
frozen there (:data:`RECACHE_PAUSES`), its lock made stale, run 2 (B or C) breaks it and is
frozen or killed at j. The re-cache, continued, must end as the command ends a failure it
reports (exit 1) or having published B (exit 0), never in an uncaught exception; run 2 then
finishes to its reference (to B when run 2 had finished before the re-cache published). Its
full re-cache is a cache run, so its own run points are the run × run pairs; between its
decision and that run it holds nothing.

:func:`pair_sweep` runs a list of pairs (every pair: :func:`sweep_order`; the CI's strided
subset: :func:`strided_pairs`); ``python -m benchmarks.bench_durability --pairs`` runs them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from benchmarks.durability_scenario import (
    Counts,
    Scenario,
    check_finished,
    outside_snapshot,
    published_content,
)
from benchmarks.zygote import RAW_TRACEBACK, Zygote
from zarr_parallel import faults

#: Every named point of a run, in run order (the job points at the second job: one job is
#: recorded before it, others after it).
RUN_POINTS = tuple(f"{p}#2" if p in ("job-written", "job-recorded") else p for p in faults.POINTS)
#: Where ``verify`` of A is frozen holding its lock (file operations under the cache's folder,
#: as in tests/run/test_durability.py): holding it before reading, and done, releasing it.
VERIFY_PAUSES = {"locked": "os.unlink#1", "releasing": "os.rename#1"}
#: Where a re-cache of B is frozen holding its lock: deciding (tests/run/test_durability.py).
RECACHE_PAUSES = {"deciding": "os.unlink#1"}
#: The third content, run 2's "other request" (chunks of 2 steps: 4 jobs, as A and B).
OTHER, OTHER_STEPS = "C", 2
#: What a run that lost its lock says when it stops (``LockLost``, zarr_parallel.store.manifest):
#: the lock is another's, or the version it wrote was removed by the run that took it over.
LOST = ("no longer holds the lock", "took the cache's lock over", "lost its lock fence record")


@dataclass(frozen=True)
class Pair:
    """Run 1 frozen at ``first``; run 2 (same request or not) stopped or killed at ``second``."""

    first: str
    second: str
    same: bool = True
    action: str = "stop"

    @property
    def label(self) -> str:
        """A short name for the counts and logs."""
        return f"{self.first}x{self.second}-{'same' if self.same else 'other'}-{self.action}"


@dataclass
class PairCounts(Counts):
    """What a pair sweep did and found."""

    pairs: int = 0
    frozen: int = 0
    unreached: int = 0

    def text(self) -> str:
        """The counts, one per line."""
        head = [
            f"pairs run        {self.pairs}",
            f"runs frozen      {self.frozen}",
            f"j not reached    {self.unreached}",
        ]
        return "\n".join([*head, super().text()])


def all_pairs(points: tuple[str, ...] = RUN_POINTS) -> list[Pair]:
    """Every pair of points, each with the same and the other request, stopped and killed."""
    return [
        Pair(i, j, same, action)
        for i in points
        for j in points
        for same in (True, False)
        for action in ("stop", "kill")
    ]


def sweep_order(points: tuple[str, ...] = RUN_POINTS) -> list[Pair]:
    """:func:`all_pairs` ordered by shift: (k, k + s) for s = 0, 1, ..., each with the four
    variants, so a sweep cut short by its time bound has still had every point as i and j."""
    n = len(points)
    return [
        Pair(points[k], points[(k + s) % n], same, action)
        for s in range(n)
        for k in range(n)
        for same in (True, False)
        for action in ("stop", "kill")
    ]


def strided_pairs(
    stride: int = 3, shifts: int = 1, points: tuple[str, ...] = RUN_POINTS
) -> list[Pair]:
    """A deterministic subset: point k as i with point k + s·stride as j, s = 1..shifts.

    Each shift pairs every point once as i and once as j; the request (same, other) and the
    action (stop, kill) alternate along the list, the same request only where run 2 reaches
    j (:func:`same_reaches`).
    """
    n = len(points)
    out = []
    for s in range(1, shifts + 1):
        for k in range(n):
            m = len(out)
            i, j = points[k], points[(k + s * stride) % n]
            same = m % 2 == 0 and same_reaches(i, j)
            out.append(Pair(i, j, same, "stop" if m % 4 < 2 else "kill"))
    return out


def same_reaches(first: str, second: str) -> bool:
    """Whether run 2 of run 1's own request can reach ``second`` after run 1 froze at
    ``first``: once run 1 recorded every job (or published) there is nothing left to write,
    and ``init`` comes only in a version made afresh (or made again: one without its plan)."""
    done = RUN_POINTS.index(first) >= RUN_POINTS.index("before-finalise")
    return not done and (second != "init" or first in ("planned", "init"))


def add_other_content(scn: Scenario, zygote: Zygote) -> None:
    """Give the scenario a third request, C, and its reference (once)."""
    if OTHER in scn.requests:
        return
    fields = scn.request_fields("A")
    fields["chunks"] = {**fields["chunks"], "time": OTHER_STEPS}
    request = scn.requests["A"].with_name(f"{OTHER}.yaml")
    request.write_text(yaml.safe_dump(fields))
    scn.requests[OTHER] = request
    scn.references[OTHER] = scn.references["A"].with_name(f"{OTHER}.zarr")
    argv = scn.argv(OTHER, "--set", f"cache_store={scn.references[OTHER]}")
    if zygote.run(argv, scn.new_log(f"ref-{OTHER}"), scn.root) != 0:
        raise RuntimeError(f"the reference run of {OTHER} failed")
    scn.outside = outside_snapshot(scn)


def start_from(scn: Scenario, zygote: Zygote, content: str = "A") -> None:
    """Start from a cache location holding ``content`` alone, published by a clean run.

    The first time a run makes it and the location is copied aside; later it is copied back (a
    run costs seconds, a copy milliseconds). Aside means beside the scenario's folder, where the
    check that nothing outside the cache changed does not look.
    """
    shutil.rmtree(scn.final.parent, ignore_errors=True)
    pristine = scn.root.parent / f"{scn.root.name}-fresh-{content}"
    if pristine.exists():
        shutil.copytree(pristine, scn.final.parent, symlinks=True)
        return
    assert zygote.run(scn.argv(content), scn.new_log(f"fresh-{content}"), scn.root) == 0
    shutil.copytree(scn.final.parent, pristine, symlinks=True)


def make_stale(lock: Path) -> None:
    """Make a live lock look like one of another host whose heartbeat stopped an hour ago
    (its token unchanged): what a run paused past the stale threshold on a node leaves."""
    content = json.loads(lock.read_text())
    content["host"] = "node-gone"
    lock.write_text(json.dumps(content))
    old = time.time() - 3600
    os.utime(lock, (old, old))


def wait_stopped(zygote: Zygote, pid: int, seconds: float = 180.0) -> bool:
    """True once run ``pid`` is frozen; False when it ended first."""
    deadline = time.monotonic() + seconds
    while True:
        if zygote.ended(pid):
            return False
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {pid} neither froze nor ended in {seconds:.0f} s")
        time.sleep(0.02)


def freeze_group(pid: int, settle: float = 0.5) -> None:
    """Freeze the rest of frozen run ``pid``'s process group too, as a paused machine would.

    The fault stops the run's process; a job process of its (series and local modes run each
    job in one) finishes the job it is in, record included, and only then waits for the next
    one. Once no process of the group has used CPU for ``settle`` seconds (the record is
    written, the job process waits), the whole group is stopped: the job process must not race
    with the run that breaks the lock.
    """
    deadline = time.monotonic() + 30
    last: dict[int, float] = {}
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    times = child.cpu_times()
                    now[child.pid] = times.user + times.system
        if now == last:  # nothing of the group ran for ``settle`` seconds: it waits
            break
        last = now
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGSTOP)


def thaw_group(pid: int) -> None:
    """Continue every process of run ``pid``'s group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)


def records_by(scn: Scenario, pid: int) -> set[tuple[str, int]]:
    """(version, job id) of every job record written by process ``pid``."""
    from zarr_parallel.store.manifest import iter_job_records
    from zarr_parallel.store.paths import CachePaths

    versions = CachePaths(scn.final).versions
    out = set()
    for version in versions.iterdir() if versions.is_dir() else []:
        with contextlib.suppress(OSError):
            out |= {
                (version.name, int(r["id"]))
                for r in iter_job_records(version)
                if r.get("pid") == pid
            }
    return out


def _link(scn: Scenario) -> str | None:
    return os.readlink(scn.final) if scn.final.is_symlink() else None


def _env(spec: str, scn: Scenario) -> dict[str, str]:
    return {"ZARR_PARALLEL_FAULT": spec, "ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent)}


def _tail(log: Path, n: int = 800) -> str:
    with contextlib.suppress(OSError):
        return log.read_text()[-n:].replace("\n", " | ")
    return ""


def _continue_lost(
    scn: Scenario, zygote: Zygote, counts: Counts, pid: int, log: Path, context: str
) -> None:
    """Continue the run whose lock was broken: exit 1 naming the lost lock, nothing done."""
    link, recorded = _link(scn), records_by(scn, pid)
    thaw_group(pid)
    code = zygote.wait(pid, 300)
    text = log.read_text() if log.exists() else ""
    if code != 1 or not any(words in text for words in LOST):
        counts.fail(f"{context}: the run that lost its lock exited {code}: {_tail(log)}")
    if code == RAW_TRACEBACK:
        counts.fail(f"{context}: the run that lost its lock ended in an uncaught exception")
    if _link(scn) != link:
        counts.fail(f"{context}: the run that lost its lock published ({link} -> {_link(scn)})")
    extra = records_by(scn, pid) - recorded
    if extra:
        counts.fail(f"{context}: the run that lost its lock recorded jobs {sorted(extra)}")


def _second(
    scn: Scenario, zygote: Zygote, counts: Counts, content: str, spec: str, label: str
) -> tuple[int, Path, str]:
    """Start run 2 (``break_lock``) with the fault ``spec``: its pid, log and state
    (``frozen``, ``killed``, ``done`` when it ended before the point, ``failed``)."""
    log = scn.new_log(f"pair-2-{label}")
    argv = scn.argv(content, "--set", "break_lock=true")
    pid = zygote.spawn(argv, log, scn.root, _env(spec, scn))
    counts.runs += 1
    if wait_stopped(zygote, pid):
        freeze_group(pid)
        counts.frozen += 1  # type: ignore[attr-defined]
        return pid, log, "frozen"
    code = zygote.wait(pid)
    if code == -signal.SIGKILL and spec.startswith("kill@"):
        counts.kills += 1
        return pid, log, "killed"
    if code == 0:
        return pid, log, "done"
    return pid, log, "failed"


def _finish_second(
    scn: Scenario,
    zygote: Zygote,
    counts: Counts,
    content: str,
    second: tuple[int, Path, str],
    context: str,
    left_by_init: bool = False,
) -> None:
    """Run 2 continued (or resumed by a fresh run) to the end, then its cache checked."""
    pid, log, state = second
    if state == "frozen":
        thaw_group(pid)
        code = zygote.wait(pid, 300)
    elif state == "killed":
        log = scn.new_log(f"pair-resume-{content}")
        code = zygote.run(scn.argv(content), log, scn.root)
        counts.runs += 1
    else:
        code = 0 if state == "done" else 1
    if code != 0:
        counts.fail(f"{context}: run 2 ({content}) then exited {code}: {_tail(log)}")
        return
    counts.completed += 1
    found = Counts()
    check_finished(scn, found, content, context, log)
    counts.verified += found.verified
    counts.bytes_lost += found.bytes_lost
    for failure in found.failures:
        if not (left_by_init and _only_staging_left(scn, failure)):
            counts.fail(failure)
        else:
            counts.where["staging left by run 1 (init)"] += 1


def _only_staging_left(scn: Scenario, failure: str) -> bool:
    """True when ``failure`` says only that incomplete staging versions were left: what run 1
    frozen inside writing its new version's metadata (``init``) writes there when continued,
    before its first job finds the lost lock. Never published; the next run removes it."""
    from zarr_parallel.store.manifest import is_complete
    from zarr_parallel.store.paths import CachePaths

    if ": left behind [" not in failure:
        return False
    versions = CachePaths(scn.final).versions
    names = [n for n in failure.split(": left behind ", 1)[1].strip("[]").split(", ")]
    prefix = "'another version or folder: "
    return all(
        n.startswith(prefix) and not is_complete(versions / n[len(prefix) : -1]) for n in names
    )


def pair_step(scn: Scenario, zygote: Zygote, counts: PairCounts, pair: Pair) -> None:
    """One pair (see the module's docstring); every invariant is checked, failures counted."""
    from zarr_parallel.store.paths import CachePaths

    add_other_content(scn, zygote)
    start_from(scn, zygote, "A")
    counts.pairs += 1
    context = f"pair {pair.label}"
    content = "B" if pair.same else OTHER
    log1 = scn.new_log(f"pair-1-{pair.label}")
    first = zygote.spawn(scn.argv("B"), log1, scn.root, _env(f"stop@{pair.first}", scn))
    counts.runs += 1
    second: tuple[int, Path, str] | None = None
    try:
        if not wait_stopped(zygote, first):
            counts.fail(f"{context}: run 1 never reached {pair.first}: {_tail(log1)}")
            return
        freeze_group(first)
        counts.frozen += 1
        before = "B" if pair.first in ("published", "prune") else "A"
        make_stale(CachePaths(scn.final).lock)
        second = _second(scn, zygote, counts, content, f"{pair.action}@{pair.second}", pair.label)
        counts.where[f"{pair.second} {second[2]}"] += 1
        if second[2] == "failed":
            counts.fail(f"{context}: run 2 failed before {pair.second}: {_tail(second[1])}")
            return
        if second[2] == "done":
            counts.unreached += 1
        published_content(scn, counts, {before, content}, f"{context}, run 2 {second[2]}")
        _continue_lost(scn, zygote, counts, first, log1, context)
        _finish_second(scn, zygote, counts, content, second, context, pair.first == "init")
    finally:
        for pid in (first, second[0] if second else None):
            if pid is not None and not zygote.ended(pid, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # its job processes, frozen too
                zygote.wait(pid, 60)


def _verify_verdict(scn: Scenario, code: int | None, log: Path, version: Path | None) -> str:
    """What is wrong with a continued ``verify``'s end ("" when nothing): a traceback, an exit
    other than 0 or 1, or OK said for another version than A's."""
    from zarr_parallel.run.verify import cache_differences
    from zarr_parallel.store.disk_names import PRUNING_PREFIX

    report = log.read_text()
    if "Traceback" in report or code not in (0, 1):
        return f"verify exited {code}"
    if code != 0:
        return ""
    said = [line for line in report.splitlines() if line.startswith("verify ")]
    named = version is not None and bool(said) and f"(version {version.name})" in said[0]
    ok = "result    OK" in report and version is not None and named
    # Done reading, verify may have lost its version to run 2's prune since: renamed out of the
    # versions' names first (zarr_parallel.store.publish), it is still there.
    checked = version
    if version is not None and not version.exists():
        checked = version.with_name(PRUNING_PREFIX + version.name)
    if not ok or checked is None or cache_differences(checked, scn.references["A"]):
        return "verify said OK but not for A's version"
    return ""


def verify_pair_step(
    scn: Scenario, zygote: Zygote, counts: PairCounts, where: str, pair: Pair
) -> None:
    """``verify`` of A frozen at ``where`` holding its lock, made stale; run 2 of B
    (``pair.second``, ``pair.action``) breaks it; ``verify`` continued never says OK for
    another version than A's, nor ends in a traceback; run 2 then finishes."""
    from zarr_parallel.store.paths import CachePaths

    def verdict(code: int | None, log: Path, second: tuple[int, Path, str]) -> str:
        problem = _verify_verdict(scn, code, log, version)
        return problem and f"{problem}: {_tail(log)}"

    start_from(scn, zygote, "A")
    version = CachePaths(scn.final).current()
    argv = ["cache", "verify", str(scn.requests["A"])]
    spec = f"stop@{VERIFY_PAUSES[where]}"
    _holder_pair(scn, zygote, counts, (argv, spec, f"verify {where}"), pair, verdict)


def recache_pair_step(
    scn: Scenario, zygote: Zygote, counts: PairCounts, where: str, pair: Pair
) -> None:
    """A full re-cache of B frozen at ``where`` holding its lock, made stale; run 2 (B or C,
    ``pair.second``, ``pair.action``) breaks it; the re-cache continued exits 1 (a failure it
    reports) or 0 having published B, never in an uncaught exception; run 2 then finishes."""

    def verdict(code: int | None, log: Path, second: tuple[int, Path, str]) -> str:
        # Exit 1 is a failure the command reported (a lock held, a lock lost); an uncaught
        # exception exits RAW_TRACEBACK.
        if code not in (0, 1):
            return f"the re-cache exited {code}: {_tail(log)}"
        if code == 0:
            published_content(scn, counts, {"B"}, f"{context}: the re-cache's publish")
        return ""

    add_other_content(scn, zygote)
    start_from(scn, zygote, "A")
    context = f"recache {where} x {pair.label}"
    argv = ["recache", str(scn.requests["B"])]
    spec = f"stop@{RECACHE_PAUSES[where]}"
    _holder_pair(scn, zygote, counts, (argv, spec, f"recache {where}"), pair, verdict)


Verdict = Callable[[int | None, Path, tuple[int, Path, str]], str]


def _holder_pair(
    scn: Scenario,
    zygote: Zygote,
    counts: PairCounts,
    holder: tuple[list[str], str, str],
    pair: Pair,
    verdict: Verdict,
) -> None:
    """A command (``holder``: its argv, fault spec and name) frozen holding the lock, made
    stale; run 2 (B, or C when ``pair.same`` is False) breaks it at ``pair.second``; the
    command continued is judged by ``verdict`` ("" when right); run 2 then finishes (to B
    when it had ended before and the command then published B)."""
    from zarr_parallel.store.paths import CachePaths

    argv, spec, name = holder
    counts.pairs += 1
    content = "B" if pair.same else OTHER
    context = f"{name} x {pair.second}-{content}-{pair.action}"
    log = scn.new_log(f"pair-{name.replace(' ', '-')}")
    frozen = zygote.spawn(argv, log, scn.root, _env(spec, scn))
    counts.runs += 1
    second: tuple[int, Path, str] | None = None
    try:
        if not wait_stopped(zygote, frozen):
            counts.fail(f"{context}: never froze: {_tail(log)}")
            return
        freeze_group(frozen)
        counts.frozen += 1
        make_stale(CachePaths(scn.final).lock)
        second = _second(scn, zygote, counts, content, f"{pair.action}@{pair.second}", context)
        counts.where[f"{pair.second} {second[2]}"] += 1
        if second[2] == "failed":
            counts.fail(f"{context}: run 2 failed before {pair.second}: {_tail(second[1])}")
            return
        thaw_group(frozen)
        code = zygote.wait(frozen, 300)
        problem = verdict(code, log, second)
        if problem:
            counts.fail(f"{context}: {problem}")
        last = "B" if second[2] == "done" and code == 0 and argv[0] == "recache" else content
        _finish_second(scn, zygote, counts, last, second, context)
    finally:
        for pid in (frozen, second[0] if second else None):
            if pid is not None and not zygote.ended(pid, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # its job processes, frozen too
                zygote.wait(pid, 60)


def pair_sweep(
    scn: Scenario,
    zygote: Zygote,
    pairs: list[Pair],
    verify_pairs: Sequence[tuple[str, Pair]] = (),
    seconds: float = 3600.0,
    counts: PairCounts | None = None,
    recache_pairs: Sequence[tuple[str, Pair]] = (),
) -> PairCounts:
    """Run ``verify_pairs``, ``recache_pairs`` then ``pairs`` in order until done or
    ``seconds`` passed."""
    counts = counts or PairCounts()
    deadline = time.monotonic() + seconds
    steps = [(verify_pair_step, vp) for vp in verify_pairs]
    steps += [(recache_pair_step, rp) for rp in recache_pairs]
    for step, (where, pair) in steps:
        if time.monotonic() > deadline:
            return counts
        step(scn, zygote, counts, where, pair)
    for pair in pairs:
        if time.monotonic() > deadline:
            return counts
        pair_step(scn, zygote, counts, pair)
    return counts


def all_verify_pairs(points: tuple[str, ...] = RUN_POINTS) -> list[tuple[str, Pair]]:
    """Each of ``verify``'s places holding the lock × each point of run 2, stopped and killed."""
    return [
        (where, Pair(where, j, True, action))
        for where in VERIFY_PAUSES
        for j in points
        for action in ("stop", "kill")
    ]


def all_recache_pairs(points: tuple[str, ...] = RUN_POINTS) -> list[tuple[str, Pair]]:
    """Each place a re-cache holds the lock × each point of run 2, with B and C, stopped and
    killed."""
    return [
        (where, Pair(where, j, same, action))
        for where in RECACHE_PAUSES
        for j in points
        for same in (True, False)
        for action in ("stop", "kill")
    ]
