"""The benchmark suite: every contender on the same files, same output codec, same cores.

``python -m benchmarks.suite --size full --repeat 3 --docs`` generates (or reuses) the datasets,
installs zarr-parallel 0.5.0 into its own virtualenv, runs each contender in a fresh process per
repetition (interleaved, so load drifts hit all alike), checks every output against a reference
computed with xarray, and writes ``benchmarks/results/<size>.json``, a Markdown table and a PNG
plot (``docs/benchmarks.md`` and ``docs/img/`` with ``--docs``). Figures are printed, never
asserted: CI runs ``--size smoke --repeat 1`` (scripts/test.sh) to keep the scripts working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from benchmarks.datasets import (
    DATA,
    SIZES,
    DatasetSpec,
    ensure_dataset,
    ensure_kerchunk,
    stored_bytes_needed,
)
from benchmarks.host import machine
from benchmarks.outputs import check_output, reference, remove_store
from benchmarks.prefect_api import contender_environment, prefect_server
from benchmarks.rechunker_env import PYTHON_VARIABLE, ensure_rechunker
from benchmarks.report import write_docs
from benchmarks.summary import (
    OURS,
    SERVER_CONTENDERS,
    WITH_SERVER,
    ZP050,
    goal_text,
    goals,
    io_table,
    markdown_table,
    summarise,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
ZP050_VENV = HERE / ".venv-zp050"
#: The end of a failed contender's error output kept in the results (its traceback).
STDERR_TAIL = 3000
#: What every contender writes unless ``--output-codec`` says otherwise: zarr 3's default codec
#: (zstd at its default level), which is zarr-parallel's and xarray's default too. rechunker
#: (zarr 2) is given it explicitly: its own default is Blosc lz4 (contenders.py).
OUTPUT_CODEC = "zstd"
MISALIGNED = {"time": 48, "latitude": 180, "longitude": 360}
#: Targets: ML tiles misaligned with the archive layout, one step × full grid (aligned with it),
#: and a box selection that cuts source chunks.
TARGETS: dict[str, dict[str, Any]] = {
    "misaligned": {"chunks": MISALIGNED, "box": None},
    "aligned": {"chunks": {"time": 1, "latitude": -1, "longitude": -1}, "box": None},
    "cut": {"chunks": MISALIGNED, "box": {"latitude": [100, 400], "longitude": [200, 900]}},
    # Map → time series (#18): the whole span in one chunk, 30 × 30 points, with a memory limit
    # well below one time-series column of source chunks at the month size (3.1 GB a variable).
    "timeseries": {
        "chunks": {"time": -1, "latitude": 30, "longitude": 30},
        "box": None,
        "memory_limit": "1GB",
    },
}
#: The contenders of the map → time-series case (``--contenders`` for it, in the docs' commands).
TIMESERIES_CONTENDERS = (
    "zarr-parallel default",
    "zarr-parallel series",
    "zarr-parallel dask_distributed",
    "rechunker",
    "xarray+dask (source chunks)",
)
DEFAULT_CONTENDERS = (
    "zarr-parallel series",
    WITH_SERVER,
    "zarr-parallel dask_distributed",
    "zarr-parallel SLURM",
    "zarr-parallel default",
    "rechunker",
    "xarray+dask (source chunks)",
    "xarray+dask distributed (source chunks)",
    "xarray+dask (target chunks)",
    "zarr-parallel 0.5.0 series",
    "zarr-parallel 0.5.0 dask_distributed",
    "floor",
)
#: The dask_distributed mode with other threads per job process than its worker's share of the
#: cores (one reader and one encoder each on 2 cores), run by ``python -m benchmarks.threads``.
SHARE_OF_CORES = "zarr-parallel dask_distributed"
THREAD_VARIANTS = {
    f"{SHARE_OF_CORES} (1 reader, 2 encoders)": {
        "ZARR_PARALLEL_THREADS": "1",
        "ZARR_THREADING__MAX_WORKERS": "2",
    },
    # Before 2026-12-03: every job process took all cores, and zarr its default pool.
    f"{SHARE_OF_CORES} (all cores, zarr's default pool)": {
        "ZARR_PARALLEL_THREADS": str(os.cpu_count() or 1),
        "ZARR_THREADING__MAX_WORKERS": str(min(32, (os.cpu_count() or 1) + 4)),
    },
}


# ---------------------------------------------------------------------------------------------
# zarr-parallel 0.5.0 in its own virtualenv


def ensure_zp050() -> tuple[str | None, str]:
    """The python of a virtualenv holding zarr-parallel 0.5.0 from the package index."""
    python = ZP050_VENV / "bin" / "python"
    if python.exists():
        return str(python), "installed"
    uv = shutil.which("uv")
    try:
        if uv:
            cmd = [uv, "venv", "-q", "-p", sys.executable, str(ZP050_VENV)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            env = {**os.environ, "VIRTUAL_ENV": str(ZP050_VENV)}
            subprocess.run(
                [uv, "pip", "install", "-q", "zarr-parallel==0.5.0", "h5netcdf"],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
        else:
            subprocess.run([sys.executable, "-m", "venv", str(ZP050_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "zarr-parallel==0.5.0", "h5netcdf"],
                check=True,
                capture_output=True,
                text=True,
            )
    except subprocess.CalledProcessError as e:
        shutil.rmtree(ZP050_VENV, ignore_errors=True)
        return None, f"zarr-parallel 0.5.0 did not install: {(e.stderr or '').strip()[-300:]}"
    return str(python), "installed now"


# ---------------------------------------------------------------------------------------------
# Running


class TreeCPU:
    """CPU seconds of a contender's processes, sampled while it runs.

    Every ``interval`` seconds: the contender process and its descendants, and the SLURM worker
    processes (dask-jobqueue's ``SLURMCluster`` workers, children of slurmd, not of the
    contender) started since, with their descendants. Each process counts its own user + system
    time (children excluded, so nothing is counted twice), as last seen; a process living less
    than one interval may be missed. ``getrusage(RUSAGE_CHILDREN)`` misses what is not reaped
    through the tree: the job processes of dask workers, and all of SLURM's.
    """

    def __init__(self, root: int, since: float, interval: float = 0.25) -> None:
        self.root, self.since, self.interval = root, since, interval
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-cpu", daemon=True)

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        """CPU seconds of every process seen."""
        return sum(self.seen.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Record the CPU time of every process of the tree now."""
        tops: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            tops.append(psutil.Process(self.root))
        for proc in psutil.process_iter(["cmdline", "create_time"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["create_time"] >= self.since and "SLURMCluster" in cmd:
                tops.append(proc)
        for top in tops:
            with contextlib.suppress(psutil.Error):
                for proc in (top, *top.children(recursive=True)):
                    with contextlib.suppress(psutil.Error):
                        t = proc.cpu_times()
                        key = (proc.pid, proc.create_time())
                        self.seen[key] = max(self.seen.get(key, 0.0), t.user + t.system)


def run_contender(
    name: str, case: dict[str, Any], store: str, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    """Run one contender in a fresh process; add wall time and CPU seconds of its processes."""
    remove_store(store)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.contenders", name, json.dumps(case), store],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    with TreeCPU(proc.pid, time.time() - 1) as cpu:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.communicate()
            return {"ok": False, "error": f"timed out after {timeout:.0f} s ({e})"}
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"ok": False, "error": (stderr or stdout).strip()[-400:]}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    if not result.get("ok") and stderr.strip():
        # The contender prints the traceback of its failure: keep its end, so a crash of one of
        # ours is readable in the CI log (the figure is missing, the smoke goes on).
        result["stderr_tail"] = stderr.strip()[-STDERR_TAIL:]
    result["process_wall_s"] = wall
    result["cpu_s"] = cpu.seconds
    return result


def build_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cases to run: dataset × target."""
    cases = []
    for layout in args.layouts:
        for compression in args.compressions:
            spec = DatasetSpec(args.size, layout, compression)
            for target in args.cases:
                cases.append({"spec": spec, "target": target})
    return cases


def _case_json(
    spec: DatasetSpec,
    target: str,
    files: list[Path],
    kerchunk: Path,
    output_codec: str = OUTPUT_CODEC,
) -> dict[str, Any]:
    t = TARGETS[target]
    case = {
        "name": f"{spec.name} → {target}",
        "dataset": spec.name,
        "target": target,
        "files": [str(f) for f in files],
        "kerchunk": str(kerchunk),
        "chunks": t["chunks"],
        "box": t["box"],
        "source_chunks": list(spec.chunks),
        "variables": ["t2m", "d2m"],
        "cores": os.cpu_count() or 1,
        "memory_limit": t.get("memory_limit", "2GB"),
        "output_codec": output_codec,
    }
    box = t["box"] or {}
    shape = [spec.steps, *spec.grid]
    for i, d in enumerate(("time", "latitude", "longitude")):
        if d in box:
            shape[i] = box[d][1] - box[d][0]
    case["uncompressed_bytes"] = 4 * len(case["variables"]) * shape[0] * shape[1] * shape[2]
    # One time-series column of source chunks (every step of one chunk's footprint, all
    # variables): what a reader holding whole columns would need at once.
    _, cy, cx = spec.chunks
    column = 4 * shape[0] * min(cy, shape[1]) * min(cx, shape[2])
    case["source_column_bytes"] = column * len(case["variables"])
    return case


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with its comma-separated lists split."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__)
    p.add_argument("--size", default="quick", choices=sorted(SIZES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default="misaligned,aligned,cut")
    p.add_argument("--layouts", default="archive")
    p.add_argument("--compressions", default="zlib")
    p.add_argument(
        "--output-codec",
        default=OUTPUT_CODEC,
        help="codec every contender writes, in the request's compression forms ('zstd', "
        "'blosc:lz4:5'...); default: zstd, zarr 3's and zarr-parallel's default",
    )
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS))
    p.add_argument("--skip", default="", help="contenders to leave out (comma-separated)")
    p.add_argument(
        "--once",
        default="xarray+dask (target chunks)",
        help="contenders run in the first repetition only (the slowest, to bound the run time)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per contender run")
    p.add_argument("--work", default=str(DATA / "out"), help="where outputs are written")
    p.add_argument("--results", default=None, help="results JSON (default results/<size>.json)")
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks.md and plot")
    p.add_argument(
        "--no-plan-scaling", action="store_true", help="leave out the planning-cost figures"
    )
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.layouts = [c for c in args.layouts.split(",") if c]
    args.compressions = [c for c in args.compressions.split(",") if c]
    skip = {c.strip() for c in args.skip.split(",") if c.strip()}
    args.contenders = [c for c in args.contenders.split(",") if c and c not in skip]
    args.once = {c.strip() for c in args.once.split(",") if c.strip()}
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write its results.

    Exit 0 whatever the figures: a contender that failed is a row of the table saying why, and
    a failure of one of this project's contenders is repeated at the end with the end of its
    error output (CI runs the suite to keep the scripts working, not to judge figures).
    """
    args = _arguments(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = contender_environment(work)
    info: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if any(c in ZP050 for c in args.contenders):
        python, status = ensure_zp050()
        info["zp050"] = status
        if python:
            env["ZP050_PYTHON"] = python
        print(f"zarr-parallel 0.5.0: {status}", flush=True)
    if "rechunker" in args.contenders:
        python, status = ensure_rechunker()
        info["rechunker"] = status
        if python:
            env[PYTHON_VARIABLE] = python
        print(f"rechunker: {status}", flush=True)
    with contextlib.ExitStack() as stack:
        envs = {name: {**env, **THREAD_VARIANTS.get(name, {})} for name in args.contenders}
        served = [c for c in SERVER_CONTENDERS if c in args.contenders]
        if served:
            url = stack.enter_context(prefect_server(work / "prefect-server"))
            for name in served:
                envs[name] = {**env, "PREFECT_API_URL": url}
            print(f"Prefect server for {', '.join(map(repr, served))}: {url}", flush=True)
        results = _run_cases(args, envs, work, info)
    print_failures_of_ours(results)
    if args.docs:
        write_docs(results, args.size)
    return 0


def _prepare_case(spec: DatasetSpec, target: str, args: argparse.Namespace) -> dict[str, Any]:
    """The case's files (generated on first use) and everything a contender needs to know."""
    t0 = time.perf_counter()
    files = ensure_dataset(spec)
    zp050 = any(c in ZP050 for c in args.contenders)
    kerchunk = ensure_kerchunk(spec, files) if zp050 else files[0]
    case = _case_json(spec, target, files, kerchunk, args.output_codec)
    box = {d: tuple(v) for d, v in (case["box"] or {}).items()}
    case["needed_stored_bytes"] = stored_bytes_needed(files, case["variables"], box)
    case["timeout"] = args.timeout
    print(
        f"\n== {case['name']} ({time.perf_counter() - t0:.0f} s to prepare; memory limit "
        f"{case['memory_limit']}, one column of source chunks "
        f"{case['source_column_bytes'] / 1e9:.2f} GB, {case['needed_stored_bytes'] / 1e9:.2f} GB "
        f"stored; every contender writes {case['output_codec']})",
        flush=True,
    )
    return case


def _status(r: dict[str, Any]) -> str:
    """One run's figures, or why it failed, for the progress line."""
    if r.get("ok"):
        return f"{r['e2e_s']:7.1f} s e2e {r['data_s']:7.1f} s data"
    return f"failed: {r.get('error', '')[:150]}"


def _run_checked(
    name: str,
    case: dict[str, Any],
    store: str,
    env: dict[str, str],
    expected: dict[str, Any] | None,
) -> dict[str, Any]:
    """One run of ``name``; its output is checked against ``expected`` unless None (the suite
    checks the first successful run of each contender)."""
    r = run_contender(name, case, store, case["timeout"], env)
    if r.get("ok") and ("e2e_s" not in r or "data_s" not in r):
        r = {**r, "ok": False, "error": r.get("error", "no timings reported")}
    if r.get("ok") and expected is not None:
        r.update(check_output(store, case["variables"], expected))
    remove_store(store)
    return r


def _run_repetitions(
    args: argparse.Namespace, case: dict[str, Any], envs: dict[str, dict[str, str]], work: Path
) -> dict[str, list[dict[str, Any]]]:
    """Every contender on one case, ``--repeat`` times, in alternating order."""
    expected = reference(case)
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.contenders}
    for rep in range(args.repeat):
        order = args.contenders if rep % 2 == 0 else list(reversed(args.contenders))
        for name in order:
            succeeded = any(r.get("ok") for r in runs[name])
            if rep and (name in args.once or not succeeded):
                continue  # run once, or failed every time so far (the reason is recorded)
            store = str(work / f"{name.replace(' ', '_').replace('/', '_')}.zarr")
            r = _run_checked(name, case, store, envs[name], None if succeeded else expected)
            runs[name].append(r)
            print(f"  [{rep + 1}/{args.repeat}] {name:42s} {_status(r)}", flush=True)
    return runs


def _run_cases(
    args: argparse.Namespace, envs: dict[str, dict[str, str]], work: Path, info: dict[str, Any]
) -> dict[str, Any]:
    """Every case × contender × repetition; writes and returns the results."""
    results: dict[str, Any] = {"info": info, "cases": {}}
    for item in build_cases(args):
        case = _prepare_case(item["spec"], item["target"], args)
        runs = _run_repetitions(args, case, envs, work)
        summary = {name: summarise(rs, case) for name, rs in runs.items()}
        results["cases"][case["name"]] = {
            "case": {k: v for k, v in case.items() if k not in ("files", "kerchunk")},
            "results": summary,
            "runs": runs,
            "goals": goals(summary, item["target"], runs),
        }
        print(markdown_table(case, summary), flush=True)
        print(io_table(case, summary), flush=True)
        case_goals = results["cases"][case["name"]]["goals"]
        print("goals:", json.dumps(case_goals), flush=True)
        if "dask_distributed_over_series_data" in case_goals:
            paired = goal_text(case_goals["dask_distributed_over_series_data"])
            print(f"dask_distributed ÷ series, data phase, run by run: {paired}", flush=True)
    if not args.no_plan_scaling:
        results["plan_scaling"] = plan_scaling(args.size)
    results["info"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["info"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.results) if args.results else RESULTS / f"{args.size}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")
    return results


def print_failures_of_ours(results: dict[str, Any]) -> None:
    """Repeat every failed run of this project's contenders, with the end of its error output."""
    failed = [
        (case_name, name, r)
        for case_name, case in results["cases"].items()
        for name, runs in case["runs"].items()
        if name in OURS or name in THREAD_VARIANTS
        for r in runs
        if not r.get("ok")
    ]
    if not failed:
        return
    print(f"\n== {len(failed)} run(s) of zarr-parallel failed (no figure; the suite goes on):")
    for case_name, name, r in failed:
        print(f"-- {name} on {case_name}: {r.get('error', 'failed')}")
        if r.get("stderr_tail"):
            print(r["stderr_tail"])
    sys.stdout.flush()


def plan_scaling(size: str) -> dict[str, Any]:
    """Planning cost, from [core]'s ``benchmarks/plan_scaling.py`` when it exists."""
    script = HERE / "plan_scaling.py"
    if not script.exists():
        return {"ok": False, "error": "benchmarks/plan_scaling.py is not on this branch yet"}
    args = [sys.executable, "-m", "benchmarks.plan_scaling"]
    if size != "full":
        args += ["--years", "1", "40"]  # the smallest and the 40-year source
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    print(proc.stdout[-3000:], flush=True)
    return {"ok": proc.returncode == 0, "output": proc.stdout[-5000:], "stderr": proc.stderr[-500:]}


if __name__ == "__main__":
    sys.exit(main())
