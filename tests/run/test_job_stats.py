"""Per-variable statistics of a job's values and their merge (run/job_stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from zarr_parallel.run.job_stats import merge_parts, merge_stats, stats_into, value_stats


def test_statistics_of_pieces_merge_to_those_of_the_whole() -> None:
    values = np.random.default_rng(5).standard_normal((6, 50)).astype("f4")
    values[2, 3:9] = np.nan
    parts: list[dict[str, float]] = []
    add = stats_into(parts)
    for piece in values:
        add(piece)
    merged = merge_parts(parts)
    whole = value_stats(values)
    assert merged["count"] == whole["count"] == 300
    assert merged["nan_count"] == whole["nan_count"] == 6
    assert merged["min"] == whole["min"] == pytest.approx(float(np.nanmin(values)))
    assert merged["max"] == whole["max"] == pytest.approx(float(np.nanmax(values)))
    assert merged["sum"] == pytest.approx(whole["sum"], rel=1e-9)


def test_integers_all_nan_pieces_and_values_that_are_not_numbers() -> None:
    ints = value_stats(np.arange(10, dtype="i2"))
    assert (ints["min"], ints["max"], ints["sum"], ints["nan_count"]) == (0, 9, 45, 0)
    empty = value_stats(np.full(4, np.nan, dtype="f8"))
    assert empty["nan_count"] == 4 and np.isnan(empty["min"]) and empty["sum"] == 0
    assert value_stats(np.array(["a", "b"])) == {"count": 2.0}
    merged = merge_stats([{"stats": {"x": empty}}, {"stats": {"x": value_stats(np.ones(4))}}])
    assert merged["x"]["count"] == 8 and merged["x"]["mean"] == 1.0
    assert merged["x"]["min"] == merged["x"]["max"] == 1.0
