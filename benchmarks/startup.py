"""Start-up of a user's command (#21): the quickstart request against a plain xarray script.

``python -m benchmarks.startup --repeat 3`` makes the quickstart's example files (4 daily files,
73 × 144) and runs, each as a fresh process like a user's command, interleaved over the
repetitions, against a running Prefect server (``PREFECT_API_URL`` set; the suite starts one)
and with Prefect's temporary API (no ``PREFECT_API_URL``):

- ``python -m flows.cache run examples/quickstart.yaml``, default settings, a new cache;
- the same again, the cache up to date;
- ``benchmarks/startup_xarray.py``: a plain xarray script doing the same selection and ``to_zarr``.

It prints each figure with its range, the ratios against the issue's goals (server: new cache
≤ 2.5× the script, up to date ≤ 2×; temporary API: new cache ≤ 6×, start-up overhead = end to
end − data phase ≤ 5 s), and the breakdown by phase (``start-up``, ``planning``, ``initialise``,
``data``, ``finish``, ``teardown``) when the command prints one. The data phase is taken from the
cache's job records (first job start to last job end). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.contenders import PHASES
from benchmarks.datasets import DATA
from benchmarks.host import machine
from benchmarks.prefect_api import contender_environment, prefect_server

ROOT = Path(__file__).resolve().parent.parent
REQUEST = ROOT / "examples" / "quickstart.yaml"
RESULTS = ROOT / "benchmarks" / "results"
CASES = ("new cache", "up to date", "plain xarray script")
#: #21's goals: (api, case) → the most the case may take as a multiple of the plain script.
RATIO_GOALS = {
    ("server", "new cache"): 2.5,
    ("server", "up to date"): 2.0,
    ("temporary API", "new cache"): 6.0,
}
OVERHEAD_GOAL_S = 5.0
#: A phase and its seconds as the command prints them ("wall time 9.1 s (start-up 2.0, data
#: 4.1, ...)"), the unit optional.
_PHASE = re.compile(
    r"(?P<name>start-up|planning|initialise|data(?: \(stage \d+/\d+\))?|finish|teardown)"
    r"[\s:=]+(?P<seconds>\d+(?:\.\d+)?)(?:\s*s\b)?"
)
_WALL = re.compile(r"wall time\s+(?P<seconds>\d+(?:\.\d+)?)\s*s")


def example_files(folder: Path) -> str:
    """The quickstart's example files (made once); their glob."""
    from zarr_parallel.examples import make_era5_like

    if not (folder / "complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_era5_like(folder)
        (folder / "complete").write_text("")
    return str(folder / "era5_like_*.nc")


def parse_output(text: str) -> dict[str, Any]:
    """The phases and the summary's wall time a command printed (whatever of them it prints)."""
    phases: dict[str, float] = {}
    lines = [x for x in text.splitlines() if "wall time" in x] or text.splitlines()
    for line in lines:
        for m in _PHASE.finditer(line):
            if m["name"] in PHASES or m["name"].startswith("data ("):
                phases.setdefault(m["name"], float(m["seconds"]))
    wall = _WALL.search(text)
    return {
        "phases": phases if len(phases) >= 2 else None,
        "summary_wall_s": wall and float(wall[1]),
    }


def data_phase(cache_dir: Path) -> float | None:
    """First job start to last job end, from the job records of the cache in ``cache_dir``."""
    from zarr_parallel.store.manifest import iter_job_records

    for link in cache_dir.glob("*.zarr"):
        records = list(iter_job_records(link.resolve()))
        if records:
            ends = [r["started"] + r["seconds"] for r in records]
            return max(ends) - min(r["started"] for r in records)
    return None


def run_once(
    case: str, files: str, work: Path, env: dict[str, str], timeout: float
) -> dict[str, Any]:
    """One fresh process of ``case``; its wall time, exit code and what it printed."""
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    if case == "plain xarray script":
        out = work / "xarray.zarr"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, str(ROOT / "benchmarks" / "startup_xarray.py"), files, str(out)]
    else:
        if case == "new cache":
            shutil.rmtree(cache_dir, ignore_errors=True)
        command = [sys.executable, "-m", "flows.cache", "run", str(REQUEST)]
        command += ["--set", f"data_uri={files}", "--set", f"cache_dir={cache_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"wall_s": wall, "rc": proc.returncode, "ok": proc.returncode == 0}
    if not result["ok"]:
        result["error"] = (proc.stderr or proc.stdout).strip()[-400:]
    if case != "plain xarray script":
        result.update(parse_output(proc.stdout + "\n" + proc.stderr))
        if case == "new cache" and result["ok"]:
            result["data_s"] = data_phase(cache_dir)
        result["stdout_tail"] = proc.stdout.strip()[-1500:]
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {}
    return {
        "median": round(statistics.median(values), 2),
        "range": [round(min(values), 2), round(max(values), 2)],
        "runs": len(values),
    }


def summarise(runs: dict[str, list[dict[str, Any]]], api: str) -> dict[str, Any]:
    """Medians, ranges, ratios against the script and the goals for one API."""
    figures = {c: _spread([r["wall_s"] for r in runs[c] if r["ok"]]) for c in CASES}
    out: dict[str, Any] = {"figures": figures, "goals": {}}
    script = figures["plain xarray script"].get("median")
    for case in ("new cache", "up to date"):
        median = figures[case].get("median")
        if not (median and script):
            continue
        ratio = round(median / script, 2)
        goal = RATIO_GOALS.get((api, case))
        out["goals"][f"{case} ÷ script"] = {
            "value": ratio,
            "goal": f"≤ {goal}×" if goal else None,
            "met": ratio <= goal if goal else None,
        }
    overheads = [
        r["wall_s"] - r["data_s"] for r in runs["new cache"] if r["ok"] and r.get("data_s")
    ]
    if overheads:
        value = round(statistics.median(overheads), 2)
        out["goals"]["start-up overhead, new cache (s)"] = {
            "value": value,
            "range": [round(min(overheads), 2), round(max(overheads), 2)],
            "goal": f"≤ {OVERHEAD_GOAL_S:g} s" if api == "temporary API" else None,
            "met": value <= OVERHEAD_GOAL_S if api == "temporary API" else None,
        }
    out["breakdown"] = {c: _phases(runs[c]) for c in ("new cache", "up to date")}
    return out


def _phases(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The median of each phase over the runs that printed a breakdown; None when none did."""
    with_phases = [r["phases"] for r in runs if r.get("ok") and r.get("phases")]
    if not with_phases:
        return None
    names = [n for p in with_phases for n in p]
    return {
        n: round(statistics.median(p[n] for p in with_phases if n in p), 2)
        for n in dict.fromkeys(names)
    }


def markdown(results: dict[str, Any]) -> str:
    """The figures, goals and breakdowns as Markdown."""
    lines = [
        "| Prefect API | run (fresh process) | end to end (s), median (range) | ÷ plain script "
        "| goal |",
        "|---|---|---|---|---|",
    ]
    for api, summary in results["apis"].items():
        for case in CASES:
            f = summary["figures"].get(case) or {}
            if not f:
                lines.append(f"| {api} | {case} | failed | | |")
                continue
            goal = summary["goals"].get(f"{case} ÷ script", {})
            met = goal.get("met")
            verdict = f"{goal['goal']} ({'met' if met else 'not met'})" if goal.get("goal") else ""
            lines.append(
                f"| {api} | {case} | {f['median']} ({f['range'][0]}–{f['range'][1]}) | "
                f"{goal.get('value', '-') if case != 'plain xarray script' else '1'} | {verdict} |"
            )
        over = summary["goals"].get("start-up overhead, new cache (s)")
        if over:
            verdict = (
                f"{over['goal']} ({'met' if over['met'] else 'not met'})" if over["goal"] else ""
            )
            lines.append(
                f"| {api} | start-up overhead of the new-cache run (end to end − data phase) | "
                f"{over['value']} ({over['range'][0]}–{over['range'][1]}) | | {verdict} |"
            )
    lines += ["", _breakdown_markdown(results)]
    return "\n".join(lines)


def _breakdown_markdown(results: dict[str, Any]) -> str:
    rows = []
    for api, summary in results["apis"].items():
        for case, phases in summary["breakdown"].items():
            if phases:
                text = ", ".join(f"{n} {s} s" for n, s in phases.items())
                rows.append(f"| {api} | {case} | {text} |")
    if not rows:
        return "Breakdown by phase: the command prints none on this code (no phase figures found)."
    head = "| Prefect API | run | phases (median seconds) |\n|---|---|---|"
    return "Breakdown by phase, as the command printed it:\n\n" + head + "\n" + "\n".join(rows)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--apis", default="server,temporary API", help="comma-separated")
    p.add_argument("--work", default=str(DATA / "startup"))
    p.add_argument("--results", default=str(RESULTS / "startup.json"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    p.add_argument(
        "--from", dest="again", default=None, help="summarise the runs of this results file again"
    )
    args = p.parse_args(argv)
    args.apis = [a.strip() for a in args.apis.split(",") if a.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the start-up cases and print and write their figures (exit 0 whatever they are)."""
    args = _arguments(argv)
    if args.again:
        return _summarise_again(Path(args.again), Path(args.results))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = example_files(work / "example-data")
    base = contender_environment(work)
    base.pop("PREFECT_API_URL", None)
    info = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        a: {c: [] for c in CASES} for a in args.apis
    }
    with contextlib.ExitStack() as stack:
        envs = {"temporary API": base}
        if "server" in args.apis:
            url = stack.enter_context(prefect_server(work / "prefect-server"))
            envs["server"] = {**base, "PREFECT_API_URL": url}
            print(f"Prefect server: {url}", flush=True)
        for rep in range(args.repeat):
            apis = args.apis if rep % 2 == 0 else list(reversed(args.apis))
            for api in apis:
                order = CASES if rep % 2 == 0 else ("plain xarray script", *CASES[:2])
                for case in order:
                    r = run_once(case, files, work / api.replace(" ", "-"), envs[api], args.timeout)
                    runs[api][case].append(r)
                    status = f"{r['wall_s']:6.2f} s" if r["ok"] else f"failed: {r['error'][-200:]}"
                    print(f"  [{rep + 1}/{args.repeat}] {api:14s} {case:20s} {status}", flush=True)
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "info": info,
        "apis": {a: summarise(runs[a], a) for a in args.apis},
        "runs": runs,
    }
    text = markdown(results)
    print("\n" + text, flush=True)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}")
    return 0


def _summarise_again(path: Path, out: Path) -> int:
    """Parse the kept output of each run again and rewrite the summary (the code may differ)."""
    results = json.loads(path.read_text())
    for per_case in results["runs"].values():
        for runs in per_case.values():
            for r in runs:
                if "stdout_tail" in r:
                    r.update(parse_output(r["stdout_tail"]))
    results["apis"] = {a: summarise(results["runs"][a], a) for a in results["runs"]}
    print(markdown(results), flush=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
