"""The benchmark suite: every contender on the same files, same output codec, same cores.

``python -m benchmarks.suite --size full --repeat 3 --docs`` generates (or reuses) the datasets,
installs zarr-parallel 0.5.0 into its own virtualenv, runs each contender in a fresh process per
repetition (interleaved, so load drifts hit all alike), checks every output against a reference
computed with xarray, and writes ``benchmarks/results/<size>.json``, a Markdown table and a PNG
plot (``docs/benchmarks.md`` and ``docs/img/`` with ``--docs``). Figures are printed, never
asserted: CI runs ``--size quick --repeat 1`` to keep the scripts working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
ZP050_VENV = HERE / ".venv-zp050"
MISALIGNED = {"time": 48, "latitude": 180, "longitude": 360}
#: Targets: ML tiles misaligned with the archive layout, one step × full grid (aligned with it),
#: and a box selection that cuts source chunks.
TARGETS: dict[str, dict[str, Any]] = {
    "misaligned": {"chunks": MISALIGNED, "box": None},
    "aligned": {"chunks": {"time": 1, "latitude": -1, "longitude": -1}, "box": None},
    "cut": {"chunks": MISALIGNED, "box": {"latitude": [100, 400], "longitude": [200, 900]}},
}
#: Series mode against a running ``prefect server`` (as deployments and any user with
#: ``PREFECT_API_URL`` run): no temporary API starts inside the timing.
WITH_SERVER = "zarr-parallel series (Prefect server)"
DEFAULT_CONTENDERS = (
    "zarr-parallel series",
    WITH_SERVER,
    "zarr-parallel dask_distributed",
    "zarr-parallel SLURM",
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
XARRAY = (
    "xarray+dask (source chunks)",
    "xarray+dask distributed (source chunks)",
    "xarray+dask (target chunks)",
)
ZP050 = ("zarr-parallel 0.5.0 series", "zarr-parallel 0.5.0 dask_distributed")
OURS = (
    "zarr-parallel series",
    WITH_SERVER,
    "zarr-parallel dask_distributed",
    "zarr-parallel SLURM",
)


def machine() -> dict[str, Any]:
    """Cores, memory, disk, CPU model and load of this machine."""
    import psutil

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = shutil.disk_usage(DATA.parent)
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "disk_free_gib": round(disk.free / 2**30, 1),
        "disk": _disk(DATA.parent),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _disk(path: Path) -> str:
    """File system, device, size and kind of the disk holding ``path`` (Linux)."""
    best = ("", "", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best[1]):
                best = (device, mount, fstype)
    device, _, fstype = best
    name = Path(device).name
    block = Path("/sys/block") / name
    text = f"{fstype or 'unknown'} on {device or 'unknown'}"
    with contextlib.suppress(OSError, ValueError):
        size = int((block / "size").read_text()) * 512
        rotational = (block / "queue" / "rotational").read_text().strip() == "1"
        virtual = "virtio" in os.path.realpath(block / "device" / "driver")
        kind = "virtio disk" if virtual else ("rotational" if rotational else "SSD")
        text += f" ({size / 2**30:.0f} GiB, {kind})"
    return text


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
# Reference and output checks


def _checksums(ds: Any, variables: Sequence[str]) -> dict[str, Any]:
    """Per variable: dtype, shape and the CRC32 of its values in C order (by time blocks)."""
    out = {}
    for name in variables:
        if name not in ds.data_vars:
            out[name] = None
            continue
        var = ds[name]
        crc = 0
        step = 48
        for t in range(0, var.sizes["time"], step):
            block = var.isel(time=slice(t, t + step)).values
            crc = zlib.crc32(block.tobytes(), crc)
        out[name] = [str(var.dtype), list(var.shape), f"{crc:08x}"]
    return out


def reference(case: dict[str, Any]) -> dict[str, Any]:
    """What every output must hold: the source after the case's selection, read by xarray."""
    import xarray as xr

    ds = xr.open_mfdataset(case["files"], engine="h5netcdf", chunks={})
    box = case.get("box") or {}
    if box:
        ds = ds.isel({d: slice(*v) for d, v in box.items()})
    return _checksums(ds, case["variables"])


def output_checksums(store: str, variables: Sequence[str]) -> dict[str, Any]:
    """The same checksums of an output store."""
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=None)
    return _checksums(ds, variables)


def count_files(store: str) -> int:
    """Files of an output store (chunks and metadata; zarr-parallel's manifest excluded)."""
    root = Path(store).resolve()
    if not root.exists():
        return 0
    return sum(1 for p in root.rglob("*") if p.is_file() and ".zarr-parallel" not in p.parts)


def remove_store(store: str) -> None:
    """Remove an output and what zarr-parallel keeps beside it (versions, lock)."""
    path = Path(store)
    for extra in (Path(f"{store}.versions"), Path(f"{store}.lock"), path):
        if extra.is_symlink() or extra.is_file():
            extra.unlink()
        elif extra.is_dir():
            shutil.rmtree(extra, ignore_errors=True)


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


@contextlib.contextmanager
def prefect_server(folder: Path) -> Iterator[str]:
    """A real ``prefect server start`` on loopback (SQLite under ``folder``); yields its API URL."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (folder / "server.log").open("w")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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


def _case_json(spec: DatasetSpec, target: str, files: list[Path], kerchunk: Path) -> dict[str, Any]:
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
    }
    box = t["box"] or {}
    shape = [spec.steps, 721, 1440]
    for i, d in enumerate(("time", "latitude", "longitude")):
        if d in box:
            shape[i] = box[d][1] - box[d][0]
    case["uncompressed_bytes"] = 4 * len(case["variables"]) * shape[0] * shape[1] * shape[2]
    return case


def summarise(runs: list[dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
    """Medians and checks of one contender's runs on one case."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[0].get("error", "failed") if runs else "not run"}
    e2e = statistics.median(r["e2e_s"] for r in ok)
    data = statistics.median(r["data_s"] for r in ok)
    cores = case["cores"]
    nbytes = case["uncompressed_bytes"]
    needed = case["needed_stored_bytes"]
    reads = [r["read_bytes"] for r in ok if r.get("read_bytes") is not None]
    peaks = [p for r in ok for p in r.get("worker_peaks", [])]
    estimates = [e for r in ok for e in r.get("estimates", [])]
    out: dict[str, Any] = {
        "ok": True,
        "runs": len(ok),
        "e2e_s": round(e2e, 2),
        "data_s": round(data, 2),
        # The spread of the repetitions: on a shared VM one contender's runs can differ by a
        # quarter, so a reader should see how far a median can be trusted.
        "e2e_range": [round(min(r["e2e_s"] for r in ok), 1), round(max(r["e2e_s"] for r in ok), 1)],
        "data_range": [
            round(min(r["data_s"] for r in ok), 1),
            round(max(r["data_s"] for r in ok), 1),
        ],
        "e2e_MBps": round(nbytes / e2e / 1e6, 1),
        "data_MBps": round(nbytes / data / 1e6, 1),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in ok), 1),
        "cpu_utilisation": round(
            statistics.median(r["cpu_s"] / (r["process_wall_s"] * cores) for r in ok), 2
        ),
        "max_process_rss": max(r.get("max_process_rss", 0) for r in ok),
        "read_amplification": round(statistics.median(reads) / needed, 3) if reads else None,
        "files": ok[0].get("files"),
        "equal": ok[0].get("equal"),
        "failed_runs": len(runs) - len(ok),
    }
    if peaks:
        out["worker_peak_rss"] = max(p[0] for p in peaks)
        limits = {p[1] for p in peaks}
        out["worker_limit"] = ", ".join(sorted(str(x) for x in limits))
        out["worker_peaks_within_limit"] = all(
            p[1] == "none" or p[0] <= _bytes(p[1]) for p in peaks
        )
    if estimates:
        ratios = [e / max(1, m) for e, m in estimates]
        out["estimate_over_peak"] = [round(min(ratios), 2), round(max(ratios), 2)]
        out["jobs"] = ok[0].get("jobs")
        out["plan_read_amplification"] = ok[0].get("plan_read_amplification")
    for key in ("note",):
        if ok[0].get(key):
            out[key] = ok[0][key]
    return out


def _bytes(text: str) -> int:
    from zarr_parallel.units import parse_memory

    return int(parse_memory(text, "memory_limit"))


def goals(case_results: dict[str, dict[str, Any]], target: str) -> dict[str, Any]:
    """The issue's goals for one case, as measured ratios (higher is better)."""
    out: dict[str, Any] = {}
    ours = {k: v for k, v in case_results.items() if k in OURS and v.get("ok")}
    if not ours:
        return out
    best_name = min(ours, key=lambda k: ours[k]["e2e_s"])
    best = ours[best_name]
    out["ours_best"] = best_name
    for phase in ("e2e_s", "data_s"):
        xr_ok = [case_results[k][phase] for k in XARRAY if case_results.get(k, {}).get("ok")]
        old = [case_results[k][phase] for k in ZP050 if case_results.get(k, {}).get("ok")]
        floor = case_results.get("floor", {})
        tag = phase[:-2]
        if xr_ok:
            out[f"speedup_vs_best_xarray_{tag}"] = round(min(xr_ok) / best[phase], 2)
        if old:
            out[f"speedup_vs_zp050_{tag}"] = round(min(old) / best[phase], 2)
        if floor.get("ok"):
            out[f"fraction_of_floor_{tag}"] = round(floor[phase] / best[phase], 2)
    # 0.5.0's output is not the requested cache (see docs/benchmarks.md): say so with its ratio.
    old_ok = [k for k in ZP050 if case_results.get(k, {}).get("ok")]
    if old_ok:
        out["zp050_output_equal"] = all(case_results[k].get("equal") for k in old_ok)
    out["read_amplification"] = best.get("read_amplification")
    out["memory_within_limits"] = all(
        v.get("worker_peaks_within_limit", True) for v in ours.values()
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite and write its results."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__)
    p.add_argument("--size", default="quick", choices=sorted(SIZES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", default="misaligned,aligned,cut")
    p.add_argument("--layouts", default="archive")
    p.add_argument("--compressions", default="zlib")
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
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.layouts = [c for c in args.layouts.split(",") if c]
    args.compressions = [c for c in args.compressions.split(",") if c]
    skip = {c.strip() for c in args.skip.split(",") if c.strip()}
    contenders = [c for c in args.contenders.split(",") if c and c not in skip]
    once = {c.strip() for c in args.once.split(",") if c.strip()}

    env = dict(os.environ)
    info: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if any(c in ZP050 for c in contenders):
        python, status = ensure_zp050()
        info["zp050"] = status
        if python:
            env["ZP050_PYTHON"] = python
        print(f"zarr-parallel 0.5.0: {status}", flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        envs = {name: {**env, **THREAD_VARIANTS.get(name, {})} for name in contenders}
        if WITH_SERVER in contenders:
            url = stack.enter_context(prefect_server(work / "prefect-server"))
            envs[WITH_SERVER] = {**env, "PREFECT_API_URL": url}
            print(f"Prefect server for {WITH_SERVER!r}: {url}", flush=True)
        results = _run_cases(args, contenders, once, envs, work, info)
    if args.docs:
        from benchmarks.report import write_docs

        write_docs(results, args.size)
    return 0


def _run_cases(
    args: argparse.Namespace,
    contenders: list[str],
    once: set[str],
    envs: dict[str, dict[str, str]],
    work: Path,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Every case × contender × repetition; writes and returns the results."""
    results: dict[str, Any] = {"info": info, "cases": {}}
    for item in build_cases(args):
        spec, target = item["spec"], item["target"]
        t0 = time.perf_counter()
        files = ensure_dataset(spec)
        kerchunk = ensure_kerchunk(spec, files) if any(c in ZP050 for c in contenders) else files[0]
        case = _case_json(spec, target, files, kerchunk)
        box = {d: tuple(v) for d, v in (case["box"] or {}).items()}
        case["needed_stored_bytes"] = stored_bytes_needed(files, case["variables"], box)
        case["timeout"] = args.timeout
        print(f"\n== {case['name']} ({time.perf_counter() - t0:.0f} s to prepare)", flush=True)
        expected = reference(case)
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        for rep in range(args.repeat):
            order = contenders if rep % 2 == 0 else list(reversed(contenders))
            for name in order:
                if rep and (name in once or not any(r.get("ok") for r in runs[name])):
                    continue  # run once, or failed every time so far (the reason is recorded)
                store = str(work / f"{name.replace(' ', '_').replace('/', '_')}.zarr")
                r = run_contender(name, case, store, args.timeout, envs[name])
                if r.get("ok") and ("e2e_s" not in r or "data_s" not in r):
                    r = {**r, "ok": False, "error": r.get("error", "no timings reported")}
                if r.get("ok") and not any(x.get("ok") for x in runs[name]):
                    r["files"] = count_files(store)
                    try:
                        got = output_checksums(store, case["variables"])
                        r["equal"] = got == expected
                        if not r["equal"]:
                            r["note"] = _difference(expected, got)
                    except Exception as e:
                        r["equal"] = False
                        r["note"] = f"output unreadable: {type(e).__name__}: {e}"[:200]
                remove_store(store)
                runs[name].append(r)
                status = (
                    f"{r['e2e_s']:7.1f} s e2e {r['data_s']:7.1f} s data"
                    if r.get("ok")
                    else f"failed: {r.get('error', '')[:150]}"
                )
                print(f"  [{rep + 1}/{args.repeat}] {name:42s} {status}", flush=True)
        summary = {name: summarise(rs, case) for name, rs in runs.items()}
        results["cases"][case["name"]] = {
            "case": {k: v for k, v in case.items() if k not in ("files", "kerchunk")},
            "results": summary,
            "runs": runs,
            "goals": goals(summary, target),
        }
        print(markdown_table(case, summary), flush=True)
        print("goals:", json.dumps(results["cases"][case["name"]]["goals"]), flush=True)
    results["plan_scaling"] = plan_scaling(args.size)
    results["info"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["info"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.results) if args.results else RESULTS / f"{args.size}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")
    return results


def _difference(expected: dict[str, Any], got: dict[str, Any]) -> str:
    parts = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            parts.append(f"{name} missing")
        elif have[:2] != want[:2]:
            parts.append(f"{name} is {have[0]}{have[1]}, expected {want[0]}{want[1]}")
        elif have != want:
            parts.append(f"{name} values differ")
    return "; ".join(parts)


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


def fmt_bytes(n: float | None) -> str:
    """Bytes as MB/GB for tables."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _with_range(median: float, spread: list[float] | None, runs: int, most: int = 1) -> str:
    """A median, with the range of the runs when there were several.

    A contender that ran fewer times than the case's others (``--once``) says how often.
    """
    if runs < 2 or not spread:
        return f"{median} ({runs} run)" if runs < most else f"{median}"
    return f"{median} ({spread[0]}–{spread[1]})" + (f", {runs} runs" if runs < most else "")


def markdown_table(case: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """One case's results as a Markdown table."""
    head = (
        "| contender | end to end (s), median (range) | data phase (s) | MB/s e2e | MB/s data | "
        "CPU s | CPU use | largest process RSS | worker peak / limit | estimate ÷ peak | "
        "read amplification | files | equal |\n" + "|---" * 13 + "|"
    )
    rows = [f"**{case['name']}** ({fmt_bytes(case['uncompressed_bytes'])} uncompressed)", "", head]
    most = max((r["runs"] for r in summary.values() if r.get("ok")), default=1)
    for name, r in summary.items():
        if not r.get("ok"):
            rows.append(f"| {name} | failed: {r.get('error', '')[:120]} |" + " |" * 11)
            continue
        peak = (
            f"{fmt_bytes(r['worker_peak_rss'])} / {r['worker_limit']}"
            if "worker_peak_rss" in r
            else "-"
        )
        est = r.get("estimate_over_peak")
        amp = r.get("read_amplification")
        rows.append(
            f"| {name} | {_with_range(r['e2e_s'], r.get('e2e_range'), r['runs'], most)} | "
            f"{_with_range(r['data_s'], r.get('data_range'), r['runs'], most)} | "
            f"{r['e2e_MBps']} | {r['data_MBps']} | "
            f"{r.get('cpu_s', '-')} | {r['cpu_utilisation']:.0%} | "
            f"{fmt_bytes(r['max_process_rss'])} | {peak} | "
            f"{f'{est[0]}–{est[1]}' if est else '-'} | {amp if amp is not None else '-'} | "
            f"{r.get('files', '-')} | {'yes' if r.get('equal') else 'NO: ' + r.get('note', '')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
