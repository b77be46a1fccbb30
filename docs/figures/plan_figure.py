"""Draw docs/figures/plan.svg, the example plan picture of docs/planning.md:
`python docs/figures/plan_figure.py` (``--check``: exit 1 if the committed picture is stale).

The ERA5-like example of the quickstart (60 hourly steps in files of 24, 24 and 12 steps, HDF5
chunks of 6 steps x 40 latitudes x 72 longitudes) cached with target chunks of 8 steps x 40 x 72
within a 1 MB job budget: the aligned units (24 steps) are too large, so jobs are cut at the
target grid and half of the 6-step source chunks are read by two jobs (read amplification 1.5).
Drawn by the package's own picture code from a plan made by the planner, without reading a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.picture import plan_picture
from zarr_parallel.planning.picture_svg import picture_svg
from zarr_parallel.planning.plan import plan_jobs

OUT = Path(__file__).with_name("plan.svg")


def draw() -> str:
    """The example picture's SVG text."""
    # Time: three files of 24, 24 and 12 steps, each chunked by 6 (so 10 source chunks).
    time = AxisMap("time", np.arange(60) // 6, np.full(10, 6))
    axes = (time, AxisMap.uniform("latitude", 73, 40), AxisMap.uniform("longitude", 144, 72))
    t2m = ArrayInput("t2m", axes, (8, 40, 72), 4, 4)
    plan = plan_jobs([t2m], Limits(memory_budget=1_000_000, min_jobs=4))
    return picture_svg(plan_picture(t2m, plan.jobs))


def main(argv: list[str]) -> int:
    """Write the picture, or with ``--check`` say whether the committed one is current."""
    svg = draw() + "\n"
    if "--check" in argv:
        current = OUT.exists() and OUT.read_text() == svg
        print("docs/figures/plan.svg is current" if current else "stale: rerun the script")
        return 0 if current else 1
    OUT.write_text(svg)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
