"""The machine the figures were measured on: cores, memory, disk, CPU model and load."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import psutil

from benchmarks.datasets import DATA


def machine() -> dict[str, Any]:
    """Cores, memory, disk, CPU model and load of this machine."""
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
