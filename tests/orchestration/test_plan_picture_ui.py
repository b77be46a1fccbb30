"""The plan picture in the Prefect UI, looked at in a real browser.

A run against a real ``prefect server start`` (with its UI) publishes the plan picture artifact;
headless Chromium (scripts/browser.sh installs Debian's package) opens the artifact's page, runs
the UI's JavaScript, and the page it renders must hold the picture as an image (the UI sanitises
markdown HTML: an escaped or dropped ``<img>`` would fail here), whose SVG is the plan's.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from server_support import PROJECT, base_env, prefect_server, unavailable
from zarr_parallel.orchestration.tasks import artifact_key

pytestmark = pytest.mark.prefect_server
SVG = "{http://www.w3.org/2000/svg}"


def _artifact(url: str, key: str) -> dict[str, object]:
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}}).encode()
    req = urllib.request.Request(
        f"{url}/artifacts/filter", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        found = json.load(r)
    assert found, f"no artifact {key!r}"
    return dict(found[0])


def test_the_ui_shows_the_plan_picture(era5_files: list[Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("no chromium: run scripts/browser.sh")
    rel = os.path.relpath(era5_files[0].parent, tmp_path)
    request = tmp_path / "request.yaml"
    request.write_text(
        yaml.safe_dump(
            {
                "data_uri": f"{rel}/era5_like_*.nc",
                "cache_dir": "out",
                "variables": {"t2m": {}},
                "chunks": {"time": 12},
                "deploy_mode": "series",
                "num_jobs": 4,
            }
        )
    )
    (tmp_path / "prefect").mkdir()
    # The UI asks the API at PREFECT_UI_API_URL (default http://127.0.0.1:4200/api, not this
    # server's port): a relative URL makes it ask the server that served the page.
    with prefect_server(
        tmp_path / "prefect", {"PREFECT_UI_ENABLED": "true", "PREFECT_UI_API_URL": "/api"}
    ) as server:
        env = {**base_env(tmp_path / "client"), "PREFECT_API_URL": server["url"]}
        run = subprocess.run(
            [sys.executable, "-m", "flows.cache", "run", str(request)],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        jobs = int(re.search(r"(\d+) planned", run.stdout).group(1))  # type: ignore[union-attr]
        key = artifact_key("zp-plan-picture", tmp_path / "out" / "era5_like.zarr")
        artifact = _artifact(server["url"], key)
        page = server["url"].removesuffix("/api") + f"/artifacts/artifact/{artifact['id']}"
        dom = subprocess.run(
            [
                browser,
                *("--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"),
                *(f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    (tmp_path / "dom.html").write_text(dom)  # kept for a failure's diagnosis
    # The UI rendered the markdown: the heading, and the picture as an <img> element.
    assert "markdown-renderer" in dom, dom[-2000:]
    img = re.search(r'<img alt="Plan of t2m" src="data:image/svg\+xml;base64,([^"]+)"', dom)
    assert img is not None, "the UI did not render the picture as an image"
    svg = ET.fromstring(base64.b64decode(img.group(1)))
    drawn = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "job"]
    assert len(drawn) == 3 * jobs
