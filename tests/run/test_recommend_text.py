"""Recommendations as a user applies them: the YAML for the request file and the ``--set`` line
for the command line, each read back through the request file loader and the CLI's parser.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from zarr_parallel.cli import build_parser
from zarr_parallel.errors import RecommendationsPending
from zarr_parallel.request.model import build_request
from zarr_parallel.request.request_file import load_request_file
from zarr_parallel.run.recommend import (
    Recommendation,
    changes_yaml,
    recommendations_markdown,
    recommendations_text,
    set_options,
)
from zarr_parallel.run.steps import prepare

MID_CHUNK = [{"type": "sel", "time": ["2020-01-01T03:00", "2020-01-02T19:00"]}]
#: Requests that halt: a selection cutting source chunks, and target chunks cutting them.
#: (The chunks case under the xarray path's memory model: see test_recommend.py.)
HALTING = {
    "selection": {"preprocessors": MID_CHUNK, "chunks": {"time": 41}},
    "positions": {"preprocessors": [{"type": "isel", "time": [3, 40]}], "variables": ["d2m"]},
    "chunks": {
        "chunks": {"time": 4, "latitude": 73, "longitude": 144},
        "variables": ["t2m"],
        "memory_limit": "3MB",
        "memory_reserve": "1MB",
    },
}


def _halted(files: list[Path], tmp_path: Path, fields: dict[str, Any]) -> RecommendationsPending:
    base = {
        "data_uri": [str(p) for p in files],
        "cache_store": str(tmp_path / "cache.zarr"),
        "deploy_mode": "series",
        **fields,
    }
    with pytest.raises(RecommendationsPending) as info:
        prepare(build_request(**base))
    assert info.value.recommendations
    return info.value


@pytest.mark.parametrize("case", sorted(HALTING))
def test_yaml_and_set_lines_round_trip(
    era5_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Each recommendation's YAML, pasted into the request file, and its ``--set`` line, parsed
    by the command's own parser, give the request the recommendation's changes make."""
    monkeypatch.setenv("ZARR_PARALLEL_FAST_READ", "0")
    fields = HALTING[case]
    request_file = tmp_path / "request.yaml"
    base = {
        "data_uri": [str(p) for p in era5_files],
        "cache_store": str(tmp_path / "cache.zarr"),
        "deploy_mode": "series",
        **fields,
    }
    request_file.write_text(yaml.safe_dump(base, sort_keys=False))
    pending = _halted(era5_files, tmp_path, fields)
    for rec in pending.recommendations:
        wanted = build_request(**{**base, **rec.changes})
        # The YAML block is the changes, in block style (no flow mappings, no Python reprs).
        block = rec.request_yaml()
        assert yaml.safe_load(block) == rec.changes
        assert "{" not in block and "'" not in block.replace("it's", "")
        # Pasted into the request file (replacing the fields it changes).
        pasted = tmp_path / "pasted.yaml"
        kept = {k: v for k, v in base.items() if k not in rec.changes}
        pasted.write_text(yaml.safe_dump(kept, sort_keys=False) + block)
        assert load_request_file(pasted) == wanted
        # The --set line, split as a shell splits it and parsed by the CLI.
        words = shlex.split(rec.set_options())
        assert words[0] == "--set" and len(words) == 2 * len(rec.changes)
        args = build_parser().parse_args(["run", str(request_file), *words])
        assert load_request_file(request_file, args.overrides) == wanted


def test_set_line_examples() -> None:
    assert set_options({"chunks": {"time": 48}}) == "--set 'chunks={time: 48}'"
    two = set_options({"chunks": {"time": 48, "latitude": -1}, "num_jobs": 4})
    assert two == "--set 'chunks={time: 48, latitude: -1}' --set num_jobs=4"
    # Strings YAML would read as something else are double-quoted inside the shell's quotes.
    dates = set_options({"preprocessors": [{"type": "sel", "time": ["2020-01-01T00:00:00", "x"]}]})
    assert dates == "--set 'preprocessors=[{type: sel, time: [\"2020-01-01T00:00:00\", x]}]'"
    assert shlex.split(set_options({"cache_label": "it's"})) == ["--set", "cache_label=it's"]
    block = changes_yaml({"tiles": {"order": ("lat", "lon")}})
    assert block == "tiles:\n  order:\n  - lat\n  - lon\n"


def test_text_and_markdown_show_yaml_and_set(era5_files: list[Path], tmp_path: Path) -> None:
    """The CLI's text (the exception's message) and the artifact's Markdown show each change as
    YAML and as ``--set`` options, never as a Python dict."""
    pending = _halted(era5_files, tmp_path, HALTING["selection"])
    recs: list[Recommendation] = pending.recommendations
    text = recommendations_text(pending.plan, recs)
    assert text == str(pending)
    markdown = recommendations_markdown(pending.plan, recs)
    for rec in recs:
        assert rec.set_options() in text and rec.set_options() in markdown
        assert f"```yaml\n{rec.request_yaml()}```" in markdown
        indented = "\n".join(f"       {line}" for line in rec.request_yaml().splitlines())
        assert indented in text
    for shown in (text, markdown):
        assert "{'" not in shown and "changes:" not in shown
    assert "in the request file:" in text and "on the command line: --set 'preprocessors=" in text
