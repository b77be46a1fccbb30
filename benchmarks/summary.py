"""What the suite's runs mean: medians per contender, the issue's goals, the Markdown table.

Shared by :mod:`benchmarks.suite` (which runs the contenders and prints a table per case) and
:mod:`benchmarks.report` (which rebuilds ``docs/benchmarks.md`` from a results file), so both
read the raw runs the same way and neither imports the other.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from zarr_parallel.units import parse_memory

#: Series mode against a running ``prefect server`` (as deployments and any user with
#: ``PREFECT_API_URL`` run): no temporary API starts inside the timing.
WITH_SERVER = "zarr-parallel series (Prefect server)"
XARRAY = (
    "xarray+dask (source chunks)",
    "xarray+dask distributed (source chunks)",
    "xarray+dask (target chunks)",
)
ZP050 = ("zarr-parallel 0.5.0 series", "zarr-parallel 0.5.0 dask_distributed")
#: What a user gets without naming a deploy mode (``auto`` since #21, before it dask_distributed).
DEFAULT = "zarr-parallel default"
#: The same against a running ``prefect server`` (#21's goals against xarray+dask are set there).
DEFAULT_WITH_SERVER = "zarr-parallel default (Prefect server)"
#: Contenders the suite runs with ``PREFECT_API_URL`` set to a server it started.
SERVER_CONTENDERS = (WITH_SERVER, DEFAULT_WITH_SERVER)
RECHUNKER = "rechunker"
OURS = (
    "zarr-parallel series",
    WITH_SERVER,
    "zarr-parallel dask_distributed",
    "zarr-parallel SLURM",
    DEFAULT,
    DEFAULT_WITH_SERVER,
)
#: #18's goals on map → time series: bytes read (source + intermediate) ÷ the source's stored
#: bytes, and the speed-up over rechunker end to end.
READ_GOAL = 2.2
RECHUNKER_GOAL = 3.0
#: #21: ``dask_distributed``'s data phase no slower than series' (numerator, denominator),
#: judged on the runs the suite made side by side.
PAIRED = ("zarr-parallel dask_distributed", "zarr-parallel series")
#: The least coverage asked of the interval around a median of paired ratios.
CONFIDENCE = 0.9


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _spread(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The range of one figure over the repetitions, rounded for the table."""
    values = [r[key] for r in runs]
    return [round(min(values), 1), round(max(values), 1)]


def _worker_memory(peaks: list[list[Any]]) -> dict[str, Any]:
    """The largest worker peak, the limits and whether every peak kept within its limit."""
    if not peaks:
        return {}
    limits = {p[1] for p in peaks}
    return {
        "worker_peak_rss": max(p[0] for p in peaks),
        "worker_limit": ", ".join(sorted(str(x) for x in limits)),
        "worker_peaks_within_limit": all(
            p[1] == "none" or p[0] <= int(parse_memory(p[1], "memory_limit")) for p in peaks
        ),
    }


def _estimate_fit(ok: list[dict[str, Any]]) -> dict[str, Any]:
    """zarr-parallel's job memory estimates ÷ measured peaks (range), with the plan's figures."""
    estimates = [e for r in ok for e in r.get("estimates", [])]
    if not estimates:
        return {}
    ratios = [e / max(1, m) for e, m in estimates]
    return {
        "estimate_over_peak": [round(min(ratios), 2), round(max(ratios), 2)],
        "jobs": ok[0].get("jobs"),
        "plan_read_amplification": ok[0].get("plan_read_amplification"),
    }


def _io_figures(ok: list[dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
    """Bytes read and written (medians), the reads ÷ the source's stored bytes, the plan."""
    out: dict[str, Any] = {}
    stored = case.get("needed_stored_bytes")
    reads = [r["read_bytes"] for r in ok if r.get("read_bytes") is not None]
    if reads and stored:
        out["bytes_read"] = int(statistics.median(reads))
        out["read_over_source"] = round(out["bytes_read"] / stored, 2)
    tree = [r["io"] for r in ok if isinstance(r.get("io"), dict)]
    if tree:
        out["tree_rchar"] = int(statistics.median(t["rchar"] for t in tree))
        out["tree_wchar"] = int(statistics.median(t["wchar"] for t in tree))
    for key in ("intermediate_bytes", "target_bytes"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = int(statistics.median(values))
    first = ok[0]
    for key in (
        "plan_strategy",
        "plan_strategy_reason",
        "plan_stages",
        "phases",
        "intermediate_bytes_planned",
    ):
        if first.get(key) is not None:
            out[key] = first[key]
    for key in ("plan_deploy_mode", "plan_deploy_mode_reason"):
        if first.get(key) is not None:
            out[key] = first[key]
    return out


def summarise(runs: list[dict[str, Any]], case: dict[str, Any]) -> dict[str, Any]:
    """Medians and checks of one contender's runs on one case."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return {"ok": False, "error": runs[0].get("error", "failed") if runs else "not run"}
    e2e = _median(ok, "e2e_s")
    data = _median(ok, "data_s")
    nbytes = case["uncompressed_bytes"]
    reads = [r["read_bytes"] for r in ok if r.get("read_bytes") is not None]
    utilisation = [r["cpu_s"] / (r["process_wall_s"] * case["cores"]) for r in ok]
    out: dict[str, Any] = {
        "ok": True,
        "runs": len(ok),
        "e2e_s": round(e2e, 2),
        "data_s": round(data, 2),
        # The spread of the repetitions: on a shared VM one contender's runs can differ by a
        # quarter, so a reader should see how far a median can be trusted.
        "e2e_range": _spread(ok, "e2e_s"),
        "data_range": _spread(ok, "data_s"),
        "e2e_MBps": round(nbytes / e2e / 1e6, 1),
        "data_MBps": round(nbytes / data / 1e6, 1),
        "cpu_s": round(_median(ok, "cpu_s"), 1),
        "cpu_utilisation": round(statistics.median(utilisation), 2),
        "max_process_rss": max(r.get("max_process_rss", 0) for r in ok),
        "read_amplification": (
            round(statistics.median(reads) / case["needed_stored_bytes"], 3) if reads else None
        ),
        "files": ok[0].get("files"),
        # The output's codec, read from its metadata (results before December 2026 lack it).
        "codec": ok[0].get("codec"),
        "equal": ok[0].get("equal"),
        "failed_runs": len(runs) - len(ok),
    }
    out.update(_worker_memory([p for r in ok for p in r.get("worker_peaks", [])]))
    out.update(_estimate_fit(ok))
    out.update(_io_figures(ok, case))
    if ok[0].get("note"):
        out["note"] = ok[0]["note"]
    return out


def _best_of(case_results: dict[str, dict[str, Any]], names: tuple[str, ...], phase: str) -> Any:
    """The shortest time of ``phase`` among the contenders ``names`` that succeeded, or None."""
    times = [case_results[k][phase] for k in names if case_results.get(k, {}).get("ok")]
    return min(times) if times else None


def goals(
    case_results: dict[str, dict[str, Any]],
    target: str,
    runs: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The issue's goals for one case, as measured ratios (higher is better); with the raw
    ``runs``, also #21's paired comparison (:func:`paired_ratio`)."""
    out: dict[str, Any] = {}
    paired = paired_ratio(runs or {}, *PAIRED, "data_s")
    if paired:
        out["dask_distributed_over_series_data"] = paired
    ours = {k: v for k, v in case_results.items() if k in OURS and v.get("ok")}
    if not ours:
        return out
    best_name = min(ours, key=lambda k: ours[k]["e2e_s"])
    best = ours[best_name]
    out["ours_best"] = best_name
    floor = case_results.get("floor", {})
    for phase in ("e2e_s", "data_s"):
        tag = phase[:-2]
        best_xarray = _best_of(case_results, XARRAY, phase)
        best_old = _best_of(case_results, ZP050, phase)
        if best_xarray is not None:
            out[f"speedup_vs_best_xarray_{tag}"] = round(best_xarray / best[phase], 2)
        if best_old is not None:
            out[f"speedup_vs_zp050_{tag}"] = round(best_old / best[phase], 2)
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
    out.update(_rechunk_goals(case_results, ours, best, target == "timeseries"))
    out.update(_default_goals(case_results))
    return out


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The median of ``values`` and an interval that holds the true median with at least
    ``confidence``, from order statistics alone (no assumption on the distribution).

    The interval runs from the k-th smallest to the k-th largest value, k as large as the
    confidence allows: it misses the median only if k values or more fall on one side, which
    for n independent values has probability 2·P(Binomial(n, ½) < k). With too few values for
    ``confidence`` (fewer than 5 for 0.9), it is their whole range and says what it reaches.

    >>> median_interval([1.02, 0.98, 1.05, 1.01, 1.03])
    {'median': 1.02, 'interval': [0.98, 1.05], 'confidence': 0.93}
    """
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("median_interval needs at least one value")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    # Rounded down: the figure shown is one the interval does reach.
    reached = math.floor(coverage(k) * 100) / 100
    return {
        "median": statistics.median(xs),
        "interval": [xs[k - 1], xs[n - k]],
        "confidence": reached,
    }


def paired_ratio(
    runs: dict[str, list[dict[str, Any]]], numerator: str, denominator: str, key: str
) -> dict[str, Any]:
    """``numerator``'s ``key`` over ``denominator``'s, run by run, and where it stands.

    The suite runs contenders in turn, repetition by repetition (in alternating order), so the
    i-th runs of two contenders met the same state of the machine: their ratio leaves out the
    drift between repetitions that their separate medians keep. Pairs where either run failed
    are left out; nothing is paired unless both made the same number of runs (``--once``).
    ``verdict`` says whether the interval (:func:`median_interval`) lies at or below 1
    (``"not slower"``), above 1 (``"slower"``), or across 1 (``"within the noise"``).
    """
    a, b = runs.get(numerator, []), runs.get(denominator, [])
    if not a or len(a) != len(b):
        return {}
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True) if x.get("ok") and y.get("ok")]
    if not ratios:
        return {}
    stats = median_interval(ratios)
    lo, hi = stats["interval"]
    verdict = "not slower" if hi <= 1.0 else "slower" if lo > 1.0 else "within the noise"
    return {
        "pairs": len(ratios),
        "median": round(stats["median"], 3),
        "interval": [round(lo, 3), round(hi, 3)],
        "confidence": stats["confidence"],
        "verdict": verdict,
        "met": stats["median"] <= 1.0,
    }


def goal_text(value: Any) -> str:
    """A goal's figure for the page; a paired ratio with its pairs, interval and verdict.

    >>> goal_text({"pairs": 5, "median": 1.03, "interval": [0.97, 1.04], "confidence": 0.93,
    ...        "verdict": "within the noise", "met": False})
    '1.03 (5 pairs, 93 % interval 0.97–1.04: within the noise)'
    """
    if isinstance(value, dict) and "interval" in value:
        lo, hi = value["interval"]
        share = round(100 * value["confidence"])
        return (
            f"{value['median']} ({value['pairs']} pairs, {share} % interval {lo}–{hi}: "
            f"{value['verdict']})"
        )
    return str(value)


def _rechunk_goals(
    case_results: dict[str, dict[str, Any]],
    ours: dict[str, dict[str, Any]],
    best: dict[str, Any],
    judged: bool,
) -> dict[str, Any]:
    """#18: reads ≤ 2.2× the source's stored bytes (every mode of ours), ≥ 3× rechunker; the
    figures on every case, whether each goal is met on map → time series (``judged``) only."""
    out: dict[str, Any] = {}
    reads = {k: v["read_over_source"] for k, v in ours.items() if "read_over_source" in v}
    if reads:
        worst = max(reads.values())
        out["reads_over_source_worst_of_ours"] = worst
        if judged:
            out[f"goal_reads_le_{READ_GOAL}x_met"] = worst <= READ_GOAL
    rechunker = case_results.get(RECHUNKER, {})
    if rechunker.get("ok"):
        for phase in ("e2e_s", "data_s"):
            out[f"speedup_vs_rechunker_{phase[:-2]}"] = round(rechunker[phase] / best[phase], 2)
        if judged:
            out[f"goal_ge_{RECHUNKER_GOAL:g}x_rechunker_met"] = (
                out["speedup_vs_rechunker_e2e"] >= RECHUNKER_GOAL
            )
        if "read_over_source" in rechunker:
            out["rechunker_reads_over_source"] = rechunker["read_over_source"]
    return out


def _default_goals(case_results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """#21: the default mode's start-up overhead (end to end − data) and its ratio to xarray,
    with the temporary API and (``..._server``) against a running Prefect server."""
    out: dict[str, Any] = {}
    best_xarray = _best_of(case_results, XARRAY, "e2e_s")
    for name, tag in ((DEFAULT, ""), (DEFAULT_WITH_SERVER, "_server")):
        default = case_results.get(name, {})
        if not default.get("ok"):
            continue
        overhead = round(default["e2e_s"] - default["data_s"], 1)
        out[f"default{tag}_startup_overhead_s"] = overhead
        if best_xarray is not None:
            out[f"default{tag}_vs_best_xarray_e2e"] = round(best_xarray / default["e2e_s"], 2)
        if default.get("plan_deploy_mode"):
            out[f"default{tag}_chose"] = default["plan_deploy_mode"]
    return out


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


def _table_row(name: str, r: dict[str, Any], most: int) -> str:
    """One contender's row of :func:`markdown_table`."""
    if not r.get("ok"):
        return f"| {name} | failed: {r.get('error', '')[:120]} |" + " |" * 12
    peak = (
        f"{fmt_bytes(r['worker_peak_rss'])} / {r['worker_limit']}"
        if "worker_peak_rss" in r
        else "-"
    )
    est = r.get("estimate_over_peak")
    amp = r.get("read_amplification")
    return (
        f"| {name} | {_with_range(r['e2e_s'], r.get('e2e_range'), r['runs'], most)} | "
        f"{_with_range(r['data_s'], r.get('data_range'), r['runs'], most)} | "
        f"{r['e2e_MBps']} | {r['data_MBps']} | "
        f"{r.get('cpu_s', '-')} | {r['cpu_utilisation']:.0%} | "
        f"{fmt_bytes(r['max_process_rss'])} | {peak} | "
        f"{f'{est[0]}–{est[1]}' if est else '-'} | {amp if amp is not None else '-'} | "
        f"{r.get('codec') or '-'} | {r.get('files', '-')} | "
        f"{'yes' if r.get('equal') else 'NO: ' + r.get('note', '')} |"
    )


def _intermediate(r: dict[str, Any]) -> str:
    """Intermediate bytes on disk, or the plan's figure for them when that is all there is."""
    if r.get("intermediate_bytes") is not None:
        return fmt_bytes(r["intermediate_bytes"])
    if r.get("intermediate_bytes_planned") is not None:
        return f"{fmt_bytes(r['intermediate_bytes_planned'])} (planned)"
    return "-"


def _io_row(name: str, r: dict[str, Any], limit: str) -> str:
    """One contender's row of :func:`io_table`."""
    ratio = r.get("read_over_source")
    stages = r.get("plan_stages") or []
    strategy = r.get("plan_strategy") or ("-" if name not in OURS else "(not reported)")
    if stages:
        strategy += f", {len(stages)} stage(s)"
    peak = r.get("worker_peak_rss", r.get("max_process_rss"))
    within = r.get("worker_peaks_within_limit")
    return (
        f"| {name} | {fmt_bytes(r.get('bytes_read'))} | "
        f"{f'{ratio}×' if ratio is not None else '-'} | "
        f"{fmt_bytes(r.get('tree_rchar'))} | {fmt_bytes(r.get('tree_wchar'))} | "
        f"{_intermediate(r)} | {fmt_bytes(r.get('target_bytes'))} | "
        f"{fmt_bytes(peak)} / {limit if within is not None else 'no limit given'}"
        f"{'' if within is None else (' ok' if within else ' OVER')} | "
        f"{strategy} | {r.get('plan_read_amplification', '-') or '-'} | "
        f"{'yes' if r.get('equal') else 'NO'} |"
    )


def io_table(case: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """One case's bytes read and written, memory against the limit and plan, as Markdown.

    Bytes read: zarr-parallel's jobs measure their own reads (``rchar``, source and any
    intermediate); the others' count is their process's ``rchar`` after the imports. The
    process tree's ``rchar``/``wchar`` include the processes a run started and reaped (and what
    they read importing modules). The page cache is hot: bytes asked of files, not of the disk.
    """
    stored = case.get("needed_stored_bytes")
    head = (
        "| contender | bytes read | ÷ source stored | process tree rchar | process tree wchar | "
        "intermediate on disk | target on disk | peak RSS / limit | plan strategy | "
        "plan read amplification | equal |\n" + "|---" * 11 + "|"
    )
    rows = [
        f"Bytes of **{case['name']}** (source stored: {fmt_bytes(stored)}; page cache hot, "
        "so rchar/wchar count bytes asked of files, not of the disk)",
        "",
        head,
    ]
    limit = str(case.get("memory_limit", "2GB"))
    rows += [_io_row(n, r, limit) for n, r in summary.items() if r.get("ok")]
    return "\n".join(rows)


def markdown_table(case: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    """One case's results as a Markdown table."""
    head = (
        "| contender | end to end (s), median (range) | data phase (s) | MB/s e2e | MB/s data | "
        "CPU s | CPU use | largest process RSS | worker peak / limit | estimate ÷ peak | "
        "read amplification | codec | files | equal |\n" + "|---" * 14 + "|"
    )
    rows = [f"**{case['name']}** ({fmt_bytes(case['uncompressed_bytes'])} uncompressed)", "", head]
    most = max((r["runs"] for r in summary.values() if r.get("ok")), default=1)
    rows += [_table_row(name, r, most) for name, r in summary.items()]
    return "\n".join(rows)
