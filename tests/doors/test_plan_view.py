"""A plan you can look at: ``ZarrParallelAssembler.plan()`` and ``zarr-parallel plan --picture``.

The plan of the Python door and the command's are one (same figures, same text); neither writes
anything; the picture files are read back (SVG parsed, PNG decoded) and checked for their content.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from zarr_parallel import ZarrParallelAssembler
from zarr_parallel.cli import main as command_main
from zarr_parallel.orchestration.command import main
from zarr_parallel.planning.picture_svg import layout

SVG = "{http://www.w3.org/2000/svg}"
FIELDS: dict[str, Any] = {
    "chunks": {"time": 12, "latitude": 40, "longitude": 72},
    "variables": {"t2m": {}, "d2m": {}},
}
RUN: dict[str, Any] = {"deploy_mode": "series", "num_jobs": 4, "memory_limit": "1GB"}


def _request_file(folder: Path, files: list[Path], **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(files[0].parent, folder)
    data = {"data_uri": f"{rel}/era5_like_*.nc", "cache_dir": "out", **FIELDS, **RUN, **fields}
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _jobs_drawn(svg: ET.Element) -> list[ET.Element]:
    return [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "job"]


def _legend(svg: ET.Element) -> dict[str, str]:
    return {
        e.get("data-key", ""): e.text or ""
        for e in svg.iter(f"{SVG}text")
        if e.get("class") == "legend"
    }


def test_plan_is_the_commands_plan_and_writes_nothing(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = _request_file(tmp_path, era5_files)
    assert main(["plan", str(req)]) == 0
    printed = capsys.readouterr().out.strip()

    assembler = ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS)
    view = assembler.plan(cache_dir=str(tmp_path / "out"), **RUN)
    assert not (tmp_path / "out").exists(), "planning writes nothing"
    # The same figures, printed the same way (the cache path is the same file).
    assert view.text() == printed
    summary = view.summary()
    assert f"jobs:                {summary['jobs']} ({summary['jobs_to_run']} to run)" in printed
    assert summary["jobs"] == len(view.plan.jobs) >= 4
    assert f"read amplification:  {summary['read_amplification']:.2f}" in printed
    assert summary["max_job_memory"] == max(j.memory for j in view.plan.jobs)
    assert summary["strategy"] == "direct"
    assert "strategy:            direct: " in printed
    assert not [line for line in printed.splitlines() if line.startswith("stage ")], "one stage"
    assert view.halts is False and view.slurm_script is None
    assert repr(view).startswith(f"<zarr-parallel plan of {summary['jobs']} jobs>")
    assert printed in repr(view)


def test_notebook_html_shows_the_figures_and_the_picture(
    era5_files: list[Path], tmp_path: Path
) -> None:
    assembler = ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS)
    view = assembler.plan(str(tmp_path / "c.zarr"), **RUN)
    html = view._repr_html_()
    assert f"<td style='text-align:left'>{view.summary()['jobs']} (" in html
    assert "read amplification" in html
    svg = ET.fromstring(re.search(r"<svg.*</svg>", html, re.S).group(0))  # type: ignore[union-attr]
    panels = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert len(panels) == 3
    t2m_jobs = [j for j in view.plan.jobs if "t2m" in j.variables]
    assert len(_jobs_drawn(svg)) == 3 * len(t2m_jobs)
    assert view.variables == ["t2m", "d2m"]
    assert not (tmp_path / "c.zarr").exists()


def test_picture_files_by_suffix(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = _request_file(tmp_path, era5_files)
    svg_path, png_path = tmp_path / "plan.svg", tmp_path / "plan.png"
    assert main(["plan", str(req), "--picture", str(svg_path)]) == 0
    out = capsys.readouterr().out
    jobs = int(re.search(r"^jobs:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    assert f"picture:             {svg_path}" in out
    svg = ET.parse(svg_path).getroot()
    # One rectangle per job in each of the three panels; the legend counts them.
    assert len(_jobs_drawn(svg)) == 3 * jobs
    legend = _legend(svg)
    assert legend["jobs"] == f"jobs: {jobs}"
    # 60 steps in 6-step chunks, 73 latitudes in 40-row chunks, 144 longitudes in 72-column ones
    assert legend["source-chunks"] == f"source chunks: {10 * 2 * 2}"
    assert legend["target-chunks"] == f"target chunks: {5 * 2 * 2}"
    assert svg.find(f"{SVG}title").text == f"Plan of t2m: {jobs} jobs"  # type: ignore[union-attr]

    # The installed command takes the same options.
    args = ["plan", str(req), "--picture", str(png_path), "--picture-variable", "d2m"]
    assert command_main(args) == 0
    capsys.readouterr()
    with Image.open(png_path) as image:
        assert image.format == "PNG"
        width, height, _ = layout(
            ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS)
            .plan(str(tmp_path / "c.zarr"), **RUN)
            .picture("d2m")
        )
        assert image.size == (width, height)
        # Not blank: the jobs' colours are there.
        assert len(image.getcolors(maxcolors=1 << 16) or []) > 10
    assert not (tmp_path / "out").exists()


def test_bad_picture_requests_exit_2(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    req = _request_file(tmp_path, era5_files)
    assert main(["plan", str(req), "--picture", str(tmp_path / "plan.gif")]) == 2
    assert "picture=" in capsys.readouterr().err
    assert main(["plan", str(req), "--picture", "p.svg", "--picture-variable", "sst"]) == 2
    err = capsys.readouterr().err
    assert "picture_variable='sst'" in err and "d2m" in err
    assert main(["run", str(req), "--picture", str(tmp_path / "p.svg")]) == 2
    assert "belong to the plan command" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.svg")) and not (tmp_path / "out").exists()


def test_the_picture_extra_is_pillow() -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["picture"]] == ["pillow"]
    assert "zarr-parallel[picture]" in extras["dev"], "the tests decode PNG pictures"


def test_png_without_pillow_names_the_extra(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS).plan(
        str(tmp_path / "c.zarr"), **RUN
    )
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(ValueError, match=r"zarr-parallel\[picture\]"):
        view.write_picture(tmp_path / "plan.png")
    assert view.write_picture(tmp_path / "plan.svg").exists()  # SVG needs nothing


def test_plan_that_would_halt_shows_its_recommendations(
    era5_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request a run would halt on: .plan() returns it with the recommendations; the command
    prints the same and exits 3, as before."""
    cut = {"preprocessors": [{"type": "isel", "time": [3, 40]}]}
    view = ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS, **cut).plan(
        str(tmp_path / "c.zarr"), **RUN
    )
    assert view.halts and view.recommendations
    assert view.plan.read_amplification > 1
    assert "recommendation 1:" in view.text()
    assert view.picture().partial_chunks > 0

    req = _request_file(tmp_path, era5_files, **cut)
    assert main(["plan", str(req), "--picture", str(tmp_path / "p.svg")]) == 3
    captured = capsys.readouterr()
    assert "recommendation 1:" in captured.out and "Recommendations, best first:" in captured.err
    assert (tmp_path / "p.svg").exists(), "the picture is written before the halt"
    svg = ET.parse(tmp_path / "p.svg").getroot()
    assert [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "partial"]


def test_picture_in_markdown_is_an_inline_svg(era5_files: list[Path], tmp_path: Path) -> None:
    from zarr_parallel.orchestration.plan_report import picture_markdown

    view = ZarrParallelAssembler([str(f) for f in era5_files], **FIELDS).plan(
        str(tmp_path / "c.zarr"), **RUN
    )
    md = picture_markdown(view.svg(), ["jobs: 4"], "Plan of t2m")
    data = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', md).group(1)  # type: ignore[union-attr]
    assert base64.b64decode(data).decode() == view.svg()
    assert io.StringIO(md).readline().startswith("# Plan of t2m")
