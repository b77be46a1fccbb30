"""Crash soak and file-operation fault injection of real cache runs.

``python -m benchmarks.bench_durability [--kills 300] [--seconds 1800] [--dask-kills 4]
[--io-faults] [--seed 0] [--folder /tmp]``, or ``... --pairs [--seconds 3600]``

**Soak.** Two requests of one tiny ERA5-like source that differ in content (target chunks of 4
and of 8 steps) take turns on one cache path with ``keep_versions: 1``, so every run that
finishes publishes a new version and prunes the previous one. Each run is a real run of the
command line (``flows.cache.main``) in its own process, SIGKILLed at a random instant: at the
N-th file operation of a random kind under the cache's folder (N random), at a named fault point
(:mod:`zarr_parallel.faults`), in the middle of pruning, or from outside after a random delay.
After each kill the published path must still resolve to a complete version equal to one of the
two references (readers never see a torn cache) and nothing outside the cache may have changed;
then the same request runs again (that run may be killed too), and once it finishes the cache
must equal its reference byte for byte, ``flows.cache verify`` must pass, and nothing may be left
behind (no lock, no temporary file, no staging version, no other version).

**File-operation faults** (``--io-faults``), in SQLite's style: for each kind of operation
(write, fsync, rename, replace, link, symlink, unlink, rmdir, mkdir, open), the N-th such
operation of a run fails with ENOSPC or EIO, for N = 1, 2, ... until a run no longer reaches an
N-th operation. After each failure the previous version must still be published and intact, the
run must have ended with exit code 1 and a message (never a traceback), and a clean re-run must
give the reference.

**Pairs** (``--pairs``, instead of the soak): two runs interleaved at every pair of fault
points through a lock broken as stale (:mod:`benchmarks.durability_pairs`): run 1 frozen at
point i, its lock made stale, run 2 (``break_lock``; the same request, which resumes run 1's
version, or another) frozen or SIGKILLed at point j; run 1, continued, must exit 1 having
recorded and published nothing; run 2, continued or resumed, must publish its reference. Every
(i, j) of the 10 points, each with the same and the other request, stopped and killed (400
pairs), after ``verify`` frozen holding its lock × every j, stopped and killed (40), and a
re-cache frozen deciding × every j, with B and C, stopped and killed (40). Bounded by
``--seconds``: a pair takes about 5 s here (2 cores), so the whole sweep needs about 40 min
(``--seconds 3600``); a shorter bound stops early and says how many pairs ran of how many (the
pairs are ordered so that every point comes early as i and as j). Printed: pairs run, runs
frozen and killed, j not reached (run 2 had nothing left to do there), caches verified, bytes
lost (must be 0) and every failure.

The runs are forked from one process that imported the command line once (a *zygote*,
:mod:`benchmarks.zygote`), so a run costs its own work, not 5 s of imports; each is still a
separate process that dies for real. The scenario and its invariants are
:mod:`benchmarks.durability_scenario`. The same functions drive ``tests/run/test_durability.py``
with fewer kills. The counts printed at the end: runs, kills, faults injected, caches verified,
bytes lost (bytes of reference chunk and metadata files missing or different in a published
cache; must be 0), and every failure found.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.durability_scenario import (
    CONTENTS,
    Counts,
    Scenario,
    check_finished,
    harness,
    outside_snapshot,
    published_content,
)
from benchmarks.zygote import RAW_TRACEBACK, Zygote
from zarr_parallel import faults

#: Fault points reached in the flow process in every deploy mode (the job points fire in the
#: job processes of dask workers, where they kill a worker, not the run).
FLOW_POINTS = (
    "planned",
    "initialised",
    "before-finalise",
    "before-publish",
    "publish",
    "published",
    "prune",
)
JOB_POINTS = ("init", "job-written", "job-recorded")
#: Kinds of file operation the soak kills at, weighted by how often they occur.
KILL_OPERATIONS = ("write", "fsync", "replace", "mkdir", "open", "unlink", "rmdir", "link")


def _tail(log: Path, n: int = 600) -> str:
    try:
        return log.read_text()[-n:].replace("\n", " | ")
    except OSError:
        return ""


# -------------------------------------------------------------------------------------------
# The soak


@dataclass
class Kill:
    """Where a run is to be killed: a fault spec, or a delay for a kill from outside."""

    spec: str | None = None
    delay: float | None = None

    @property
    def place(self) -> str:
        """A short name for the counts."""
        if self.spec is None:
            return "outside" if self.delay is not None else "none"
        trigger = self.spec.split("@", 1)[1]
        if "+" in trigger:
            return trigger.split("+")[0] + "+" + trigger.split("+")[1].split("#")[0]
        return trigger.split("#")[0]


def choose_kill(rng: random.Random, seconds: float, deploy_mode: str = "series") -> Kill:
    """A random place to kill a run: a file operation, a point, inside prune, or from outside."""
    r = rng.random()
    if deploy_mode != "series":
        if r < 0.6:
            return Kill(delay=rng.uniform(0.5, seconds))
        return Kill(spec=f"kill@{rng.choice(FLOW_POINTS)}")
    if r < 0.45:
        operation = rng.choice(KILL_OPERATIONS)
        limit = 60 if operation in ("write", "fsync", "mkdir", "open", "replace") else 12
        return Kill(spec=f"kill@os.{operation}#{rng.randint(1, limit)}")
    if r < 0.65:
        operation = rng.choice(("unlink", "rmdir"))
        return Kill(spec=f"kill@prune+os.{operation}#{rng.randint(1, 30)}")
    if r < 0.85:
        point = rng.choice(FLOW_POINTS + JOB_POINTS)
        nth = rng.randint(1, 4) if point in ("job-written", "job-recorded") else 1
        return Kill(spec=f"kill@{point}#{nth}")
    return Kill(delay=rng.uniform(0.05, seconds))


def _lingering(pgid: int, wait: float) -> list[int]:
    """Processes of a killed run's group still alive after ``wait`` seconds (then killed)."""
    import psutil

    deadline = time.monotonic() + wait
    while True:
        alive = []
        for proc in psutil.process_iter(["pid"]):
            # A process may end between the listing and getpgid (ProcessLookupError).
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return alive


def run_once(
    scn: Scenario, zygote: Zygote, content: str, kill: Kill, extra: tuple[str, ...] = ()
) -> tuple[int, Path, int]:
    """One run of ``content``, killed as ``kill`` says; its code, log and pid."""
    env = {"ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent)}
    if kill.spec:
        env["ZARR_PARALLEL_FAULT"] = kill.spec
    log = scn.new_log(f"{content}-{kill.place}")
    pid = zygote.spawn(scn.argv(content, *extra), log, scn.root, env)
    if kill.delay is not None:
        deadline = time.monotonic() + kill.delay
        while time.monotonic() < deadline and not zygote.ended(pid):
            pass
        if not zygote.ended(pid, 0):  # never signal a pid the zygote has reaped
            os.kill(pid, signal.SIGKILL)
    return zygote.wait(pid), log, pid


def _after_kill(
    scn: Scenario, counts: Counts, pid: int, before: str, content: str, context: str
) -> None:
    """Invariants right after a kill: whole published cache, nothing else touched."""
    alive = _lingering(pid, 20.0)
    if alive:
        counts.fail(f"{context}: processes of the killed run still alive 20 s later: {alive}")
    published_content(scn, counts, {before, content}, context)
    if outside_snapshot(scn) != scn.outside:
        counts.fail(f"{context}: files outside the cache changed")


def soak_step(
    scn: Scenario,
    zygote: Zygote,
    counts: Counts,
    rng: random.Random,
    kill: Kill,
    deploy_mode: str = "series",
    nested: float = 0.25,
) -> None:
    """Run the other content with ``kill``; then resume (maybe killed again) to the reference."""
    # "" stands for "nothing published yet" (the first run of a soak).
    before = published_content(scn, counts, {"", *CONTENTS}, "before a run") or ""
    content = "B" if before == "A" else "A"
    extra: tuple[str, ...] = ()
    if deploy_mode != "series":
        extra = ("--set", f"deploy_mode={deploy_mode}", "--set", "memory_limit=1GB")
    attempt = 0
    while True:
        attempt += 1
        code, log, pid = run_once(scn, zygote, content, kill, extra)
        counts.runs += 1
        context = f"run {counts.runs} ({content}, {deploy_mode}, {kill.spec or kill.delay})"
        if code == -signal.SIGKILL and (kill.spec or kill.delay is not None):
            counts.kills += 1
            mode = "" if deploy_mode == "series" else f" ({deploy_mode})"
            counts.where[kill.place + mode] += 1
            _after_kill(scn, counts, pid, before, content, context)
        elif code == 0:
            if kill.spec or kill.delay is not None:
                counts.completed += 1
            check_finished(scn, counts, content, context, log)
            return
        else:
            counts.fail(f"{context}: exit {code}: {_tail(log)}")
            if attempt > 3:
                return
        # Resume: usually to the end, sometimes killed again on the way.
        kill = (
            choose_kill(rng, 2.0, deploy_mode) if rng.random() < nested and attempt < 4 else Kill()
        )


def named_kills() -> list[Kill]:
    """One kill at each named point of a run in run order, and one in the middle of removing
    the previous version."""
    # The second job's points: one job is written and recorded, the others are not.
    kills = [
        Kill(spec=f"kill@{p}#2" if p in ("job-written", "job-recorded") else f"kill@{p}")
        for p in faults.POINTS
    ]
    return [*kills, Kill(spec="kill@prune+os.unlink#3")]


def _kill_one(
    scn: Scenario,
    zygote: Zygote,
    counts: Counts,
    rng: random.Random,
    tries: list[Kill],
    deploy_mode: str = "series",
) -> None:
    """Soak steps with each of ``tries`` in turn until one kills its run (a kill from outside
    misses a run that ended sooner than the delay)."""
    for kill in tries:
        before = counts.kills
        soak_step(scn, zygote, counts, rng, kill, deploy_mode, nested=0.0)
        if counts.kills > before:
            return


def soak(
    scn: Scenario,
    zygote: Zygote,
    kills: int,
    seconds: float,
    seed: int = 0,
    dask_kills: int = 0,
    counts: Counts | None = None,
    every_point: bool = False,
) -> Counts:
    """Kill runs until ``kills`` kills (series) or ``seconds`` passed, then ``dask_kills`` more
    in the dask_distributed mode; every invariant is checked after every run.

    ``every_point``: the series kills start with :func:`named_kills` and one from outside, the
    dask_distributed ones with one from outside (or, when the run ended first, at a point of
    the flow process while its workers live), whatever the time; random kills follow while time
    and kills remain, so a short soak still covers every place a run can die.
    """
    counts = counts or Counts()
    rng = random.Random(seed)
    started = time.monotonic()
    # How long a run takes here: the window of the kills from outside.
    t0 = time.monotonic()
    soak_step(scn, zygote, counts, rng, Kill())
    run_seconds = max(0.5, time.monotonic() - t0)
    if every_point:
        for kill in named_kills():
            soak_step(scn, zygote, counts, rng, kill)
        halves = [Kill(delay=run_seconds / 2**i) for i in (1, 2, 3)]
        _kill_one(scn, zygote, counts, rng, halves)
    while counts.kills < kills and time.monotonic() - started < seconds:
        soak_step(scn, zygote, counts, rng, choose_kill(rng, run_seconds))
    target = counts.kills + dask_kills
    t0 = time.monotonic()
    if dask_kills:
        soak_step(scn, zygote, counts, rng, Kill(), "dask_distributed")
    dask_seconds = max(2.0, time.monotonic() - t0)
    if dask_kills and every_point:
        tries = [Kill(delay=dask_seconds / 2), Kill(spec="kill@before-finalise")]
        _kill_one(scn, zygote, counts, rng, tries, "dask_distributed")
    while counts.kills < target and time.monotonic() - started < seconds + 60 * dask_kills:
        kill = choose_kill(rng, dask_seconds, "dask_distributed")
        soak_step(scn, zygote, counts, rng, kill, "dask_distributed", nested=0.0)
    return counts


# -------------------------------------------------------------------------------------------
# File-operation faults


#: Each kind of operation is failed with the error a disk gives for it.
FAULT_ERRORS = {
    "write": ("enospc", "eio", "enospc*"),
    "fsync": ("eio",),
    "open": ("enospc", "enospc*"),
    "mkdir": ("enospc",),
    "rename": ("eio",),
    "replace": ("eio",),
    "link": ("enospc",),
    "symlink": ("enospc",),
    "unlink": ("eio",),
    "rmdir": ("eio",),
}


def fault_step(scn: Scenario, zygote: Zygote, counts: Counts, spec: str) -> bool:
    """One run with the fault ``spec``; returns False when the fault never acted (run done).

    A failed run must leave the previous version published and whole and end with exit 1 (a
    message, no traceback); the clean re-run must then give its reference.
    """
    before = published_content(scn, counts, set(CONTENTS), "before a faulty run") or "A"
    content = "B" if before == "A" else "A"
    env = {"ZARR_PARALLEL_FAULT": spec, "ZARR_PARALLEL_FAULT_ROOT": str(scn.final.parent)}
    log = scn.new_log(f"{content}-{spec.replace('@', '_').replace('#', '_').replace('*', 'p')}")
    code = zygote.run(scn.argv(content), log, scn.root, env)
    counts.runs += 1
    text = log.read_text() if log.exists() else ""
    context = f"run {counts.runs} ({content}, {spec})"
    injected = Path(f"{log}.fired").exists() or "(injected:" in text
    if injected:
        counts.faults += 1
    if code == 0:
        # The fault acted where a failure is harmless (a best-effort clean-up), or not at all.
        # A removal of the old version that failed half-way is finished by the next prune.
        check_finished(scn, counts, content, context, log, pruning_left=injected)
        return injected
    # Prefect logs the traceback of a failed task; what the user reads last is the CLI's line.
    last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
    if code == RAW_TRACEBACK:
        counts.fail(f"{context}: exit {code}, an uncaught exception: {_tail(log, 800)}")
    elif code != 1 or not last[0].startswith(("run failed:", "failed:")):
        counts.fail(f"{context}: exit {code}, expected 1 and a message: {_tail(log)}")
    published_content(scn, counts, {before}, context)
    if outside_snapshot(scn) != scn.outside:
        counts.fail(f"{context}: files outside the cache changed")
    rerun = scn.new_log(f"{content}-rerun")
    code = zygote.run(scn.argv(content), rerun, scn.root)
    counts.runs += 1
    if code != 0:
        counts.fail(f"{context}: the clean re-run exited {code}: {_tail(rerun)}")
        # Do not let one failure cascade: start the next step from a clean cache.
        code = zygote.run(
            scn.argv(content, "--set", "resume=false"), scn.new_log("reset"), scn.root
        )
        return injected
    check_finished(scn, counts, content, f"{context}, re-run", rerun)
    return injected


def _sweep(
    scn: Scenario,
    zygote: Zygote,
    counts: Counts,
    spec: str,
    label: str,
    stride: int,
    deadline: float,
    owed: int,
) -> int:
    """Fail the N-th operation of ``spec`` (``spec.format(N)``), N = 1, 1+stride, ... until a
    run no longer reaches it or the ``deadline`` passed; returns how often a fault acted.

    Until ``owed`` faults acted the deadline does not count, and an N past the run's last such
    operation moves half-way back towards the last N that acted (so a wide stride still fails
    an operation a run makes only a few times more than once).
    """
    acted, n, last = 0, 1, 0
    while acted < owed or time.monotonic() < deadline:
        if fault_step(scn, zygote, counts, spec.format(n)):
            counts.where[label] += 1
            acted, last = acted + 1, n
            n += stride
        elif acted < owed and n - last > 1:
            n = last + (n - last) // 2
        else:
            break
    return acted


def fault_sweep(
    scn: Scenario,
    zygote: Zygote,
    operations: dict[str, tuple[str, ...]] | None = None,
    seconds: float = 3600.0,
    stride: int = 1,
    counts: Counts | None = None,
    after: str | None = None,
    least: int = 0,
) -> Counts:
    """For each operation and error: fail its N-th occurrence, N = 1, 1+stride, ... until a run
    no longer reaches it (or ``seconds`` passed).

    An error written ``eio*`` fails every operation from the N-th on (a disk that stays
    broken). ``after`` (a point) counts operations from that point on only. ``least``: each
    operation is failed at least that often (over its errors) and each error at least once,
    whatever the time, when runs reach the operation that often.
    """
    counts = counts or Counts()
    deadline = time.monotonic() + seconds
    for operation, errors in (operations or FAULT_ERRORS).items():
        trigger = f"{after}+os.{operation}" if after else f"os.{operation}"
        acted = 0
        for error in errors:
            persistent = "*" if error.endswith("*") else ""
            spec = f"{error.rstrip('*')}@{trigger}#{{}}{persistent}"
            label = f"{error} {operation}"
            # Every error at least once, the operation at least ``least`` times.
            owed = max(1, least - acted) if least else 0
            acted += _sweep(scn, zygote, counts, spec, label, stride, deadline, owed)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Run the soak (and the fault sweep) and print the counts; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=300, help="series-mode kills")
    parser.add_argument("--dask-kills", type=int, default=4, help="dask_distributed kills")
    parser.add_argument("--seconds", type=float, default=1800.0, help="time bound of the soak")
    parser.add_argument("--io-faults", action="store_true", help="also sweep file-op faults")
    parser.add_argument(
        "--pairs", action="store_true", help="instead of the soak: every pair of fault points"
    )
    parser.add_argument("--stride", type=int, default=1, help="sweep N = 1, 1+stride, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="where the temporary scenario goes")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("set PREFECT_API_URL (e.g. `prefect server start`): every run shares one API")
        return 2
    t0 = time.monotonic()
    if args.pairs:
        return _pairs(args.folder, args.seconds)
    with harness(args.folder) as (scn, zygote):
        counts = soak(scn, zygote, args.kills, args.seconds, args.seed, args.dask_kills)
        print(f"soak ({time.monotonic() - t0:.0f} s)\n{counts.text()}", flush=True)
        failed = bool(counts.failures or counts.bytes_lost)
        if args.io_faults:
            t1 = time.monotonic()
            io_counts = fault_sweep(scn, zygote, seconds=args.seconds, stride=args.stride)
            print(f"file-operation faults ({time.monotonic() - t1:.0f} s)\n{io_counts.text()}")
            failed = failed or bool(io_counts.failures or io_counts.bytes_lost)
    return 1 if failed else 0


def _pairs(folder: str | None, seconds: float) -> int:
    """The pair sweep (``--pairs``); exit 1 on any failure or lost byte."""
    from benchmarks.durability_pairs import (
        all_recache_pairs,
        all_verify_pairs,
        pair_sweep,
        sweep_order,
    )

    t0 = time.monotonic()
    pairs, verify_pairs, recache_pairs = sweep_order(), all_verify_pairs(), all_recache_pairs()
    with harness(folder) as (scn, zygote):
        counts = pair_sweep(scn, zygote, pairs, verify_pairs, seconds, recache_pairs=recache_pairs)
    total = len(pairs) + len(verify_pairs) + len(recache_pairs)
    print(f"pairs ({time.monotonic() - t0:.0f} s, {counts.pairs} of {total})\n{counts.text()}")
    return 1 if counts.failures or counts.bytes_lost else 0


if __name__ == "__main__":
    sys.exit(main())
