"""Crash soak and file-operation fault injection of real cache runs.

``python -m benchmarks.bench_durability [--kills 300] [--seconds 1800] [--dask-kills 4]
[--io-faults] [--seed 0] [--folder /tmp]``

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

The runs are forked from one process that imported the command line once (a *zygote*), so a run
costs its own work, not 5 s of imports; each is still a separate process that dies for real. The
same functions drive ``tests/test_durability.py`` with fewer kills. The counts printed at the end:
runs, kills, faults injected, caches verified, bytes lost (bytes of reference chunk and metadata
files missing or different in a published cache; must be 0), and every failure found.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Exit code of a forked run that ended with an uncaught exception (a raw traceback).
RAW_TRACEBACK = 70
#: The two contents that take turns on the cache path.
CONTENTS = {"A": 4, "B": 8}
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


# -------------------------------------------------------------------------------------------
# The zygote: one process that imported the CLI and forks a run per request.


def _zygote() -> None:
    """Serve run requests (JSON lines on stdin) by forking; report pids and exit codes."""
    import zarr_parallel.orchestration.cache
    import zarr_parallel.orchestration.recache
    import zarr_parallel.run.verify  # noqa: F401

    out = sys.stdout
    children: set[int] = set()
    buffer = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.01)
        if ready:
            data = os.read(stdin, 65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req)  # never returns
                children.add(pid)
                out.write(json.dumps({"token": req["token"], "pid": pid}) + "\n")
                out.flush()
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                out.write(json.dumps({"pid": pid, "rc": code}) + "\n")
                out.flush()


def _child(req: dict[str, Any]) -> None:
    """In a forked run: set the environment and the fault, run the command, exit."""
    code = RAW_TRACEBACK
    try:
        os.setpgid(0, 0)  # the run and whatever it starts (a dask cluster) form one group
        os.chdir(req["cwd"])
        for key in ("ZARR_PARALLEL_FAULT", "ZARR_PARALLEL_FAULT_ROOT"):
            os.environ.pop(key, None)
        os.environ.update(req.get("env") or {})
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        from zarr_parallel import faults

        faults.install_from_environment()
        command, *argv = req["argv"]
        if command == "recache":
            from zarr_parallel.orchestration.recache import main
        else:
            from zarr_parallel.orchestration.cache import main
        code = main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = RAW_TRACEBACK
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            from zarr_parallel import faults

            if faults.fired():  # the run may have absorbed the failure: say it happened
                os.close(os.open(req["log"] + ".fired", os.O_WRONLY | os.O_CREAT, 0o644))
        os._exit(code)


class Zygote:
    """Start forked runs of ``python -m flows.cache`` (or ``flows.recache``) quickly.

    Each run is a process of its own (its own process group); :meth:`wait` gives its exit code,
    negative for a signal, :data:`RAW_TRACEBACK` for an uncaught exception.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_durability", "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        self._codes: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        self._waited: set[int] = set()
        self._token = 0

    def _read(self, timeout: float) -> None:
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote process ended")
        msg = json.loads(line)
        if "token" in msg:
            self._pids[msg["token"]] = msg["pid"]
        else:
            self._codes[msg["pid"]] = msg["rc"]

    def spawn(
        self, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
    ) -> int:
        """Fork a run of ``argv`` (``["cache", "run", REQUEST, ...]``); returns its pid."""
        assert self._proc.stdin is not None
        self._token += 1
        req = {"token": self._token, "argv": argv, "log": str(log), "cwd": str(cwd), "env": env}
        self._proc.stdin.write((json.dumps(req) + "\n").encode())
        self._proc.stdin.flush()
        deadline = time.monotonic() + 60
        while self._token not in self._pids:
            if time.monotonic() > deadline:
                raise RuntimeError("the zygote did not fork")
            self._read(1.0)
        return self._pids.pop(self._token)

    def ended(self, pid: int, timeout: float = 0.01) -> bool:
        """True once run ``pid`` ended (its code is kept for :meth:`wait`)."""
        if pid in self._waited:
            return True
        if pid not in self._codes:
            self._read(timeout)
        return pid in self._codes

    def wait(self, pid: int, timeout: float = 600.0) -> int:
        """The exit code of run ``pid`` once it ended."""
        deadline = time.monotonic() + timeout
        while pid not in self._codes:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                raise TimeoutError(f"run {pid} did not end within {timeout:.0f} s")
            self._read(0.5)
        self._waited.add(pid)
        return self._codes.pop(pid)

    def run(self, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Run to the end; its exit code."""
        return self.wait(self.spawn(argv, log, cwd, env))

    def close(self) -> None:
        """Stop the zygote."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


# -------------------------------------------------------------------------------------------
# The scenario: tiny sources, two requests on one cache path, their references.


@dataclass
class Scenario:
    """A folder with the sources, the two requests, their reference caches and the cache path."""

    root: Path
    requests: dict[str, Path]
    references: dict[str, Path]
    final: Path
    logs: Path
    outside: dict[str, str] = field(default_factory=dict)
    log_count: int = 0

    def request_fields(self, content: str) -> dict[str, Any]:
        """The request of ``content`` as a mapping."""
        return dict(yaml.safe_load(self.requests[content].read_text()))

    def new_log(self, label: str) -> Path:
        """A fresh log file for one run."""
        self.log_count += 1
        return self.logs / f"{self.log_count:05d}-{label}.log"

    def argv(self, content: str, *extra: str) -> list[str]:
        """The CLI arguments of a run of ``content``."""
        return ["cache", "run", str(self.requests[content]), *extra]


def make_scenario(root: Path, zygote: Zygote, jobs: int = 4) -> Scenario:
    """Write the sources and requests under ``root`` and make both references (clean runs)."""
    from zarr_parallel.examples import make_era5_like

    root.mkdir(parents=True, exist_ok=True)
    files = make_era5_like(
        root / "src", n_files=2, steps_per_file=8, nlat=10, nlon=20, chunks=(4, 10, 20)
    )
    (root / "requests").mkdir()
    logs = root / "logs"
    logs.mkdir()
    requests, references = {}, {}
    for content, steps in CONTENTS.items():
        fields = {
            "data_uri": [str(f) for f in files],
            "chunks": {"time": steps, "latitude": 10, "longitude": 20},
            "cache_store": str(root / "out" / "cache.zarr"),
            "deploy_mode": "series",
            "num_jobs": jobs,
            "keep_versions": 1,
            # Prune the replaced version at once (no reader holds it), so every run prunes.
            "min_version_age": 0,
            "memory_limit": "300MB",
            "retries": 0,
        }
        requests[content] = root / "requests" / f"{content}.yaml"
        requests[content].write_text(yaml.safe_dump(fields))
        references[content] = root / "refs" / f"{content}.zarr"
    scn = Scenario(root, requests, references, root / "out" / "cache.zarr", logs)
    for content, ref in references.items():
        rc = zygote.run(
            scn.argv(content, "--set", f"cache_store={ref}"), scn.new_log(f"ref-{content}"), root
        )
        if rc != 0:
            raise RuntimeError(f"the reference run of {content} failed ({rc})")
    scn.outside = outside_snapshot(scn)
    return scn


def outside_snapshot(scn: Scenario) -> dict[str, str]:
    """SHA-256 of every file under the scenario's folder except the cache's own and the logs."""
    out = {}
    for path in sorted(scn.root.rglob("*")):
        rel = path.relative_to(scn.root)
        if rel.parts[0] in ("out", "logs") or not path.is_file():
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# -------------------------------------------------------------------------------------------
# Invariants


@dataclass
class Counts:
    """What a soak or a fault sweep did and found."""

    runs: int = 0
    kills: int = 0
    faults: int = 0
    completed: int = 0
    verified: int = 0
    bytes_lost: int = 0
    where: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        """Record an invariant that did not hold."""
        self.failures.append(message)

    def text(self) -> str:
        """The counts, one per line."""
        lines = [
            f"runs             {self.runs}",
            f"kills            {self.kills}",
            f"faults injected  {self.faults}",
            f"runs not killed  {self.completed}",
            f"caches verified  {self.verified}",
            f"bytes lost       {self.bytes_lost}",
            f"failures         {len(self.failures)}",
        ]
        if self.where:
            top = ", ".join(f"{k} {v}" for k, v in self.where.most_common())
            lines.append(f"kills by place   {top}")
        lines += [f"  FAILURE: {f}" for f in self.failures[:30]]
        return "\n".join(lines)


def lost_bytes(cache: Path, reference: Path) -> int:
    """Bytes of the reference's array files missing from ``cache`` or different in it."""
    from zarr_parallel.run.verify import cache_files

    want = cache_files(reference)
    try:
        got = cache_files(cache)
    except OSError:
        got = {}
    return sum(len(v) for k, v in want.items() if got.get(k) != v)


def published_content(scn: Scenario, counts: Counts, allowed: set[str], context: str) -> str | None:
    """Which reference the published cache equals (one of ``allowed``), checking it is whole.

    A reader opening the final path must find a complete version that opens and equals a
    reference; anything else is recorded as a failure (with the bytes lost).
    """
    import xarray as xr

    from zarr_parallel.run.verify import cache_differences
    from zarr_parallel.store.manifest import is_complete

    final = scn.final
    if not final.is_symlink():
        if "" not in allowed or final.exists():
            counts.fail(f"{context}: the cache path is not a published link")
        return None
    version = final.resolve()
    if not version.is_dir() or not is_complete(version):
        counts.fail(f"{context}: the cache path resolves to {version}, which is not complete")
        counts.bytes_lost += min(lost_bytes(final, scn.references[c]) for c in allowed - {""})
        return None
    for content in sorted(allowed - {""}):
        if cache_differences(final, scn.references[content]):
            continue
        try:
            with xr.open_zarr(final) as ds, xr.open_zarr(scn.references[content]) as ref:
                if not ds.load().equals(ref.load()):
                    counts.fail(f"{context}: {version.name} reads differently from {content}")
                    return None
        except Exception as e:  # a reader failing on a published cache is the finding
            counts.fail(f"{context}: opening {version.name} failed: {type(e).__name__}: {e}")
            return None
        return content
    counts.bytes_lost += min(lost_bytes(final, scn.references[c]) for c in allowed - {""})
    counts.fail(f"{context}: {version.name} equals none of {sorted(allowed - {''})}")
    return None


def leftovers(scn: Scenario, published: bool = True) -> list[str]:
    """What a finished run must not leave: lock, links, probes, temporaries, other versions.

    A run that found the cache up to date (``published=False``) publishes and prunes nothing,
    so what a killed run's prune left stays until the next publish.
    """
    from zarr_parallel.store.layout import (
        LOCK_GUARD,
        PENDING_DIR,
        PRUNING_PREFIX,
        READERS_DIR,
        RETIRED_DIR,
        TEMPORARY_SUFFIXES,
    )
    from zarr_parallel.store.manifest import is_complete
    from zarr_parallel.store.paths import CachePaths

    paths = CachePaths(scn.final)
    out = []
    for entry in sorted(scn.final.parent.iterdir()):
        if entry.name not in (paths.final.name, paths.versions.name):
            out.append(f"beside the cache: {entry.name}")
    current = paths.current()
    for version in paths.versions.iterdir() if paths.versions.is_dir() else []:
        ours = (LOCK_GUARD, PENDING_DIR, RETIRED_DIR, READERS_DIR)
        if version.name in ours or version == current:
            continue
        if not published and (version.name.startswith(PRUNING_PREFIX) or is_complete(version)):
            continue
        if version.name != LOCK_GUARD and version != current:
            out.append(f"another version or folder: {version.name}")
    if current is not None:
        out += [
            f"temporary file {p.relative_to(current)}"
            for p in current.rglob("*")
            if p.name.endswith(TEMPORARY_SUFFIXES)
        ]
    return out


def _pruning_names(scn: Scenario) -> list[str]:
    from zarr_parallel.store.layout import PRUNING_PREFIX
    from zarr_parallel.store.paths import CachePaths

    versions = CachePaths(scn.final).versions
    return [p.name for p in versions.glob(f"{PRUNING_PREFIX}*")] if versions.is_dir() else []


def verify_cli(scn: Scenario, content: str) -> tuple[int, str]:
    """``python -m flows.cache verify REQUEST`` (its main, in this process): code and output."""
    from zarr_parallel.orchestration.cache import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main(["verify", str(scn.requests[content])])
    return code, buffer.getvalue()


def check_finished(
    scn: Scenario,
    counts: Counts,
    content: str,
    context: str,
    log: Path | None = None,
    pruning_left: bool = False,
) -> None:
    """After a run of ``content`` ended with exit 0: its reference, verified, nothing left.

    ``pruning_left``: what a failed removal of an old version left may stay (until the next
    prune) but nothing else may.
    """
    if published_content(scn, counts, {content}, context) != content:
        return
    code, text = verify_cli(scn, content)
    if code != 0:
        counts.fail(f"{context}: verify exited {code}: {text[-500:]}")
        return
    counts.verified += 1
    published = log is None or "zarr-parallel: up to date" not in log.read_text()
    left = leftovers(scn, published)
    if pruning_left:
        left = [x for x in left if not x.endswith(tuple(_pruning_names(scn)))]
    if left:
        counts.fail(f"{context}: left behind {left[:5]}")
    if outside_snapshot(scn) != scn.outside:
        counts.fail(f"{context}: files outside the cache changed")


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
            with contextlib.suppress(psutil.Error):
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
            counts.where[kill.place] += 1
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


def soak(
    scn: Scenario,
    zygote: Zygote,
    kills: int,
    seconds: float,
    seed: int = 0,
    dask_kills: int = 0,
    counts: Counts | None = None,
) -> Counts:
    """Kill runs until ``kills`` kills (series) or ``seconds`` passed, then ``dask_kills`` more
    in the dask_distributed mode; every invariant is checked after every run."""
    counts = counts or Counts()
    rng = random.Random(seed)
    started = time.monotonic()
    # How long a run takes here: the window of the kills from outside.
    t0 = time.monotonic()
    soak_step(scn, zygote, counts, rng, Kill())
    run_seconds = max(0.5, time.monotonic() - t0)
    while counts.kills < kills and time.monotonic() - started < seconds:
        soak_step(scn, zygote, counts, rng, choose_kill(rng, run_seconds))
    target = counts.kills + dask_kills
    t0 = time.monotonic()
    if dask_kills:
        soak_step(scn, zygote, counts, rng, Kill(), "dask_distributed")
    dask_seconds = max(2.0, time.monotonic() - t0)
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


def fault_sweep(
    scn: Scenario,
    zygote: Zygote,
    operations: dict[str, tuple[str, ...]] | None = None,
    seconds: float = 3600.0,
    stride: int = 1,
    counts: Counts | None = None,
    after: str | None = None,
) -> Counts:
    """For each operation and error: fail its N-th occurrence, N = 1, 1+stride, ... until a run
    no longer reaches it (or ``seconds`` passed).

    An error written ``eio*`` fails every operation from the N-th on (a disk that stays
    broken). ``after`` (a point) counts operations from that point on only.
    """
    counts = counts or Counts()
    started = time.monotonic()
    for operation, errors in (operations or FAULT_ERRORS).items():
        for error in errors:
            n = 1
            while time.monotonic() - started < seconds:
                trigger = f"{after}+os.{operation}" if after else f"os.{operation}"
                persistent = "*" if error.endswith("*") else ""
                spec = f"{error.rstrip('*')}@{trigger}#{n}{persistent}"
                if not fault_step(scn, zygote, counts, spec):
                    break
                counts.where[f"{error} {operation}"] += 1
                n += stride
    return counts


@contextlib.contextmanager
def harness(folder: str | None = None) -> Iterator[tuple[Scenario, Zygote]]:
    """A scenario in a temporary folder and a zygote, both cleaned up afterwards."""
    zygote = Zygote()
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix="zp-durability-") as tmp:
            yield make_scenario(Path(tmp), zygote), zygote
    finally:
        zygote.close()


def main(argv: list[str] | None = None) -> int:
    """Run the soak (and the fault sweep) and print the counts; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=300, help="series-mode kills")
    parser.add_argument("--dask-kills", type=int, default=4, help="dask_distributed kills")
    parser.add_argument("--seconds", type=float, default=1800.0, help="time bound of the soak")
    parser.add_argument("--io-faults", action="store_true", help="also sweep file-op faults")
    parser.add_argument("--stride", type=int, default=1, help="sweep N = 1, 1+stride, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="where the temporary scenario goes")
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zygote:
        _zygote()
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        print("set PREFECT_API_URL (e.g. `prefect server start`): every run shares one API")
        return 2
    t0 = time.monotonic()
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


if __name__ == "__main__":
    sys.exit(main())
