"""Durations: every form ``parse_duration`` accepts, SLURM's day forms in each field that uses it.

SLURM shows partition limits as ``D-HH:MM:SS`` (``sinfo``); the docs tell users to copy them
into ``slurm.walltime``, so every duration field takes them, and bad forms keep the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zarr_parallel.errors import RequestError
from zarr_parallel.orchestration.runners import worker_sizing
from zarr_parallel.request.model import build_request
from zarr_parallel.units import parse_duration

DAY = 86_400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30:00", 1800),
        ("1:30:00", 5400),
        ("30min", 1800),
        ("2h", 7200),
        (90, 90),
        ("45", 45),
        ("1-12", DAY + 12 * 3600),
        ("0-06", 6 * 3600),
        ("2-00:30", 2 * DAY + 1800),
        ("1-00:00:30", DAY + 30),
        ("7-23:59:59", 8 * DAY - 1),
        (" 1-02:03:04 ", DAY + 2 * 3600 + 3 * 60 + 4),
    ],
)
def test_duration_forms(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1-", "is not a duration"),
        ("-1-02", "is not a duration"),
        ("1-2-3", "is not a duration"),
        ("1-02:03:04:05", "is not a duration"),
        ("x-12", "is not a duration"),
        ("1 - 12", "is not a duration"),
        ("1d-12", "is not a duration"),
        ("1:2:3:4", "is not a duration"),
        ("0-00", "must be a positive, finite duration"),
    ],
)
def test_bad_duration_forms(text: str, reason: str) -> None:
    with pytest.raises(RequestError, match=rf"slurm\.walltime='{text}': {reason}\. ") as info:
        parse_duration(text, "slurm.walltime")
    assert "SLURM's 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS'" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "read"),
    [
        ({"worker_timeout": "0-01"}, lambda r: r.timeout_seconds),
        ({"min_version_age": "0-01:00"}, lambda r: r.min_version_age_seconds),
        ({"pause_timeout": "0-01:00:00"}, lambda r: parse_duration(r.pause_timeout)),
    ],
)
def test_day_forms_in_request_fields(
    era5_files: list[Path], tmp_path: Path, fields: dict[str, Any], read: Any
) -> None:
    req = build_request(data_uri=str(era5_files[0]), cache_store=str(tmp_path / "c.zarr"), **fields)
    assert read(req) == 3600


def test_slurm_walltime_day_form_sizes_the_jobs(era5_files: list[Path], tmp_path: Path) -> None:
    """A partition limit copied from ``sinfo`` caps each SLURM job's walltime."""
    req = build_request(
        data_uri=str(era5_files[0]),
        cache_store=str(tmp_path / "c.zarr"),
        deploy_mode="slurm",
        worker_timeout="1-00",
        slurm={"walltime": "1-12:00:00"},
    )
    sizing = worker_sizing(req, max_job_estimate=10**6, jobs=100)
    assert sizing.walltime <= DAY + 12 * 3600
    short = req.model_copy(update={"slurm": req.slurm.model_copy(update={"walltime": "0-12"})})
    with pytest.raises(RequestError, match=r"slurm\.walltime='0-12': is shorter than one job"):
        worker_sizing(short, max_job_estimate=10**6, jobs=100)


def test_bad_walltime_refused_at_validation(era5_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RequestError, match=r"slurm\.walltime.*is not a duration"):
        build_request(
            data_uri=str(era5_files[0]),
            cache_store=str(tmp_path / "c.zarr"),
            slurm={"walltime": "1-12:00:00:00"},
        )
