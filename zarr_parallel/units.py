"""Parsing and formatting of memory sizes and durations: the one place that decides them."""

from __future__ import annotations

import math
import re

from zarr_parallel.errors import RequestError

_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: str | int | float, parameter: str = "memory_limit") -> int:
    """Parse a memory size into bytes (GB = 10**9 bytes, GiB = 2**30 bytes).

    >>> parse_memory("2GB"), parse_memory("2GiB"), parse_memory("512mb"), parse_memory(1000)
    (2000000000, 2147483648, 512000000, 1000)
    """
    if isinstance(value, bool):
        raise RequestError(parameter, value, "is not a memory size", "Use e.g. '2GB' or '512MiB'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0:
            raise RequestError(
                parameter,
                value,
                "must be a positive, finite size",
                "Use e.g. '2GB' or a number of bytes",
            )
        return int(value)
    match = _MEMORY_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise RequestError(
            parameter,
            value,
            "is not a memory size",
            "Use a number with a unit such as '2GB', '2GiB', '512MB' or a plain number of bytes",
        )
    nbytes = int(float(match.group(1)) * _MEMORY_UNITS[unit or ""])
    if nbytes <= 0:
        raise RequestError(parameter, value, "must be positive", "Use e.g. '2GB'")
    return nbytes


_DURATION_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


_DAYS_RE = re.compile(r"^\s*(\d+)-(\d+)(?::(\d+))?(?::(\d+))?\s*$")


def _slurm_days(value: str) -> float | None:
    """Seconds of SLURM's ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS`` form, or None if not that form.

    >>> _slurm_days("1-12"), _slurm_days("2-00:30"), _slurm_days("1-02:03:04"), _slurm_days("1:00")
    (129600.0, 174600.0, 93784.0, None)
    """
    match = _DAYS_RE.match(value)
    if match is None:
        return None
    days, hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + secs)


def _clock(value: str) -> float | None:
    """Seconds of ``MM:SS`` or ``HH:MM:SS``, or None if not that form."""
    parts = value.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
        return None
    numbers = [int(p) for p in parts]
    if len(numbers) == 2:
        numbers.insert(0, 0)
    return float(numbers[0] * 3600 + numbers[1] * 60 + numbers[2])


def _with_unit(value: str) -> float | None:
    """Seconds of a number with an optional unit (``"30min"``, ``"2h"``, ``"45"``), or None."""
    match = _DURATION_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or (unit and unit not in _DURATION_UNITS):
        return None
    return float(match.group(1)) * _DURATION_UNITS.get(unit or "s", 1)


def parse_duration(value: str | int | float, parameter: str = "worker_timeout") -> float:
    """Parse a duration into seconds.

    Accepted: ``"MM:SS"``, ``"HH:MM:SS"``, SLURM's ``"D-HH"``, ``"D-HH:MM"`` and
    ``"D-HH:MM:SS"`` (as ``sinfo`` shows partition limits), a number with a unit
    (``"30min"``, ``"2h"``) or a plain number of seconds.

    >>> parse_duration("30:00"), parse_duration("1:30:00"), parse_duration("30min")
    (1800.0, 5400.0, 1800.0)
    >>> parse_duration("1-12"), parse_duration("2-00:30"), parse_duration("1-00:00:30")
    (129600.0, 174600.0, 86430.0)
    >>> parse_duration(90)
    90.0
    """
    fix = (
        "Use 'MM:SS', 'HH:MM:SS', SLURM's 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS', "
        "a number with a unit such as '30min' or '2h', or seconds"
    )
    if isinstance(value, bool):
        raise RequestError(parameter, value, "is not a duration", fix)
    seconds: float | None
    if isinstance(value, int | float):
        seconds = float(value)
    elif "-" in str(value).strip().lstrip("-"):
        seconds = _slurm_days(str(value))
    elif ":" in str(value):
        seconds = _clock(str(value))
    else:
        seconds = _with_unit(str(value))
    if seconds is None:
        raise RequestError(parameter, value, "is not a duration", fix)
    if not math.isfinite(seconds) or seconds <= 0:
        # NaN compares false with everything: a NaN deadline would never fire.
        raise RequestError(parameter, value, "must be a positive, finite duration", fix)
    return seconds


def format_bytes(nbytes: float) -> str:
    """Format bytes with decimal units, as memory limits are written.

    >>> format_bytes(2_000_000_000), format_bytes(1536)
    ('2.00 GB', '1.54 kB')
    """
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    """Format seconds as ``H:MM:SS`` (SLURM walltime style).

    >>> format_duration(5400)
    '1:30:00'
    """
    total = round(seconds)
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"
