"""The plan picture: its geometry (counts against brute force) and its SVG, parsed back."""

from __future__ import annotations

import importlib.util
import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarr_parallel.planning.grid import AxisMap
from zarr_parallel.planning.inputs import ArrayInput, Limits
from zarr_parallel.planning.jobs import Job
from zarr_parallel.planning.picture import plan_picture
from zarr_parallel.planning.picture_svg import layout, picture_svg
from zarr_parallel.planning.plan import plan_jobs

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module", autouse=True)
def prefect_api() -> str:
    """No Prefect API: pure geometry (overrides tests/conftest.py's session server)."""
    return ""


def _array(
    shape: tuple[int, ...], source: tuple[int, ...], write: tuple[int, ...], start: int = 0
) -> ArrayInput:
    dims = ("time", "latitude", "longitude")[: len(shape)]
    axes = tuple(
        AxisMap.uniform(d, n, c, start=start if i == 0 else 0, source_size=n + 2 * start)
        for i, (d, n, c) in enumerate(zip(dims, shape, source, strict=True))
    )
    return ArrayInput("t2m", axes, write, 4, 4)


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _of_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if e.get("class") == cls]


def _legend(root: ET.Element) -> dict[str, str]:
    return {e.get("data-key", ""): e.text or "" for e in _of_class(root, "text", "legend")}


def _brute_cut(array: ArrayInput, jobs: list[Job]) -> int:
    """Source chunks read by more than one job, cell by cell."""
    runs = [np.asarray(a.source_boundaries) for a in array.axes]
    cut = 0
    for cell in itertools.product(*(range(len(r) - 1) for r in runs)):
        readers = 0
        for job in jobs:
            if all(
                job.region[d][1] < runs[d][i + 1] and runs[d][i] < job.region[d][2]
                for d, i in enumerate(cell)
            ):
                readers += 1
        cut += readers > 1
    return cut


def test_one_rectangle_per_job_per_panel_and_the_legend_counts() -> None:
    """A budget too small for whole source chunks: jobs cut them; each job is drawn once in
    every panel."""
    array = _array((24, 30, 40), (8, 30, 40), (4, 15, 20))
    plan = plan_jobs([array], Limits(200_000, min_jobs=6))
    root = _parse(picture_svg(plan_picture(array, plan.jobs)))
    panels = _of_class(root, "g", "panel")
    assert len(panels) == 3  # (time, latitude), (time, longitude), (latitude, longitude)
    for panel in panels:
        jobs = [e for e in panel.iter(f"{SVG}rect") if e.get("class") == "job"]
        assert sorted(int(e.get("data-job", "")) for e in jobs) == [j.id for j in plan.jobs]
        assert len({e.get("fill") for e in jobs}) == len(plan.jobs), "a colour per job"
    legend = _legend(root)
    assert legend["jobs"] == f"jobs: {len(plan.jobs)}"
    assert legend["source-chunks"] == f"source chunks: {3 * 1 * 1}"
    assert legend["target-chunks"] == f"target chunks: {6 * 2 * 2}"
    cut = _brute_cut(array, list(plan.jobs))
    assert cut == 3  # every 8-step source chunk is split between two 4-step jobs
    assert legend["cut-chunks"].endswith(f": {cut}")
    assert _of_class(root, "rect", "cut"), "cut source chunks are marked"
    assert "grouped" not in legend


def test_aligned_jobs_cut_nothing_and_a_selection_marks_partial_chunks() -> None:
    array = _array((24, 30), (6, 10), (12, 30), start=3)
    plan = plan_jobs([array], Limits(10**9, min_jobs=2))
    picture = plan_picture(array, plan.jobs)
    root = _parse(picture_svg(picture))
    assert picture.cut_chunks == _brute_cut(array, list(plan.jobs))
    # The selection starts 3 steps into a 6-step chunk and ends 3 steps into another.
    assert picture.axes[0].partial == ((0, 3), (21, 24))
    assert picture.partial_chunks == 2 * 3
    assert _legend(root)["partial-chunks"].endswith(": 6")
    assert len(_of_class(root, "rect", "partial")) == 2


def test_many_jobs_are_grouped_and_the_legend_says_so() -> None:
    array = _array((400, 40), (1, 10), (1, 10))
    jobs = [
        Job(i * 4 + k, ("t2m",), (("time", i, i + 1), ("latitude", 10 * k, 10 * k + 10)), 1, 1, 1)
        for i in range(400)
        for k in range(4)
    ]
    picture = plan_picture(array, jobs, max_marks=300)
    assert picture.grouped and len(picture.marks) <= 300
    assert sorted(j for m in picture.marks for j in m.job_ids) == list(range(1600))
    root = _parse(picture_svg(picture))
    marks = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "job"]
    assert len(marks) == len(picture.marks)  # one panel
    assert sum(int(e.get("data-jobs", "")) for e in marks) == 1600
    legend = _legend(root)
    assert legend["jobs"] == "jobs: 1600"
    assert legend["grouped"].startswith(f"jobs grouped: 1600 jobs drawn as {len(picture.marks)}")
    # 400 source chunks along time: too many lines to draw, and said.
    assert picture.axes[0].source_lines is None
    notes = [e.text for e in _of_class(root, "text", "legend") if e.get("data-key") == "note"]
    assert "source grid along time not drawn (400 chunks)" in notes


def test_one_dimensional_variable_is_a_strip() -> None:
    array = _array((10,), (4,), (5,))
    jobs = [Job(i, ("t2m",), (("time", 5 * i, 5 * i + 5),), 1, 1, 1) for i in (0, 1)]
    picture = plan_picture(array, jobs)
    root = _parse(picture_svg(picture))
    assert len(_of_class(root, "rect", "job")) == 2
    width, height, _ = layout(picture)
    assert root.get("width") == str(width) and root.get("height") == str(height)
    assert picture.cut_chunks == 1 and picture.axes[0].cut == ((4, 8),)


def test_jobs_of_other_variables_are_left_out() -> None:
    array = _array((8, 4), (4, 4), (4, 4))
    jobs = [
        Job(0, ("t2m",), (("time", 0, 4), ("latitude", 0, 4)), 1, 1, 1),
        Job(1, ("t2m",), (("time", 4, 8), ("latitude", 0, 4)), 1, 1, 1),
        Job(2, ("sp",), (("time", 0, 8), ("latitude", 0, 4)), 1, 1, 1),
    ]
    picture = plan_picture(array, jobs)
    assert picture.jobs == 2 and [m.job_ids for m in picture.marks] == [(0,), (1,)]


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 20)),
    source=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    write=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    min_jobs=st.integers(1, 12),
)
def test_counts_match_brute_force(
    shape: tuple[int, int], source: tuple[int, int], write: tuple[int, int], min_jobs: int
) -> None:
    """Whatever the grids, the picture's counts are those found cell by cell."""
    array = _array(shape, source, write)
    plan = plan_jobs([array], Limits(10**9, min_jobs=min_jobs))
    picture = plan_picture(array, plan.jobs)
    assert picture.jobs == len(plan.jobs)
    assert picture.cut_chunks == _brute_cut(array, list(plan.jobs))
    runs = [len(a.source_boundaries) - 1 for a in array.axes]
    assert picture.source_chunks == runs[0] * runs[1]
    assert picture.target_chunks == -(-shape[0] // write[0]) * -(-shape[1] // write[1])
    assert len(_of_class(_parse(picture_svg(picture)), "rect", "job")) == len(plan.jobs)


def test_svg_text_is_escaped() -> None:
    axes = (AxisMap.uniform("a<b", 4, 2),)
    array = ArrayInput("x&y", axes, (2,), 4, 4)
    jobs = [Job(0, ("x&y",), (("a<b", 0, 4),), 1, 1, 1)]
    root = _parse(picture_svg(plan_picture(array, jobs)))  # parses: the names are escaped
    assert "x&y" in "".join(root.itertext())


@pytest.mark.parametrize("n_jobs", [1, 5])
def test_title_counts_jobs(n_jobs: int) -> None:
    array = _array((10,), (10,), (2,))
    jobs = [Job(i, ("t2m",), (("time", 2 * i, 2 * i + 2),), 1, 1, 1) for i in range(n_jobs)]
    title = _parse(picture_svg(plan_picture(array, jobs))).find(f"{SVG}title")
    assert title is not None
    assert title.text == f"Plan of t2m: {n_jobs} job{'s' if n_jobs > 1 else ''}"


def test_the_docs_example_picture_is_current() -> None:
    """docs/figures/plan.svg is what docs/figures/plan_figure.py draws from the code now."""
    script = Path(__file__).resolve().parents[2] / "docs" / "figures" / "plan_figure.py"
    spec = importlib.util.spec_from_file_location("plan_figure", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    svg = module.draw()
    assert module.OUT.read_text() == svg + "\n", "stale: run python docs/figures/plan_figure.py"
    legend = _legend(_parse(svg))
    assert legend["jobs"] == "jobs: 32" and legend["cut-chunks"].endswith(": 20")


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    max_marks=st.integers(1, 60),
)
def test_groups_partition_the_jobs_without_overlap(rows: int, cols: int, max_marks: int) -> None:
    """Grouped or not, every job is in exactly one mark, inside its box, and boxes never
    overlap (jobs tile the array, so groups of neighbours must too)."""
    array = _array((rows * 2, cols * 3), (2, 3), (2, 3))
    jobs = [
        Job(
            r * cols + c,
            ("t2m",),
            (("time", 2 * r, 2 * r + 2), ("latitude", 3 * c, 3 * c + 3)),
            1,
            1,
            1,
        )
        for r in range(rows)
        for c in range(cols)
    ]
    marks = plan_picture(array, jobs, max_marks=max_marks).marks
    assert len(marks) <= max(max_marks, 1) or len(jobs) <= max_marks
    assert sorted(j for m in marks for j in m.job_ids) == [j.id for j in jobs]
    by_id = {j.id: j for j in jobs}
    for m in marks:
        for j in m.job_ids:
            for d, (a, b) in by_id[j].bounds.items():
                assert m.region[d][0] <= a and b <= m.region[d][1]
    area = sum(
        (m.region["time"][1] - m.region["time"][0])
        * (m.region["latitude"][1] - m.region["latitude"][0])
        for m in marks
    )
    assert area == rows * 2 * cols * 3  # boxes cover the array once: no overlap, no gap
