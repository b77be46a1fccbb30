"""Per-variable statistics of the values a job wrote (``generate_stats``), and their merge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def stats_into(parts: list[dict[str, float]]) -> Callable[[np.ndarray], None]:
    """A callback adding the statistics of each piece it is given to ``parts``."""

    def add(piece: np.ndarray) -> None:
        parts.append(value_stats(piece))

    return add


def merge_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-slab statistics of one variable (the form :func:`value_stats` returns)."""
    out: dict[str, float] = {"count": sum(p["count"] for p in parts)}
    if all("nan_count" in p for p in parts):
        out["nan_count"] = sum(p["nan_count"] for p in parts)
        out["sum"] = sum(p["sum"] for p in parts)
        mins = [p["min"] for p in parts if np.isfinite(p["min"])]
        maxs = [p["max"] for p in parts if np.isfinite(p["max"])]
        out["min"] = min(mins) if mins else float("nan")
        out["max"] = max(maxs) if maxs else float("nan")
    return out


def value_stats(values: np.ndarray) -> dict[str, float]:
    """Count, NaN count, minimum, maximum and sum of ``values`` (count only, not numbers)."""
    if not np.issubdtype(values.dtype, np.number):
        return {"count": float(values.size)}
    if not np.issubdtype(values.dtype, np.floating):
        return {
            "count": float(values.size),
            "nan_count": 0.0,
            "min": float(values.min()) if values.size else float("nan"),
            "max": float(values.max()) if values.size else float("nan"),
            "sum": float(values.sum(dtype="float64")),
        }
    # One boolean mask, no copy of the values (jobs' memory estimates hold no extra copy).
    valid = np.isfinite(values)
    n_valid = int(np.count_nonzero(valid))
    return {
        "count": float(values.size),
        "nan_count": float(values.size - n_valid),
        "min": float(np.min(values, where=valid, initial=np.inf)) if n_valid else float("nan"),
        "max": float(np.max(values, where=valid, initial=-np.inf)) if n_valid else float("nan"),
        "sum": float(np.sum(values, where=valid, dtype="float64")) if n_valid else 0.0,
    }


def merge_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Combine per-job statistics into per-variable count/min/max/mean/NaN-count."""
    out: dict[str, dict[str, float]] = {}
    for rec in records:
        for name, s in rec.get("stats", {}).items():
            acc = out.setdefault(
                name, {"count": 0.0, "nan_count": 0.0, "min": np.inf, "max": -np.inf, "sum": 0.0}
            )
            acc["count"] += s.get("count", 0.0)
            acc["nan_count"] += s.get("nan_count", 0.0)
            acc["sum"] += s.get("sum", 0.0)
            if "min" in s and np.isfinite(s["min"]):
                acc["min"] = min(acc["min"], s["min"])
                acc["max"] = max(acc["max"], s["max"])
    for acc in out.values():
        valid = acc["count"] - acc["nan_count"]
        acc["mean"] = acc.pop("sum") / valid if valid else float("nan")
    return out
