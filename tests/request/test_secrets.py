"""Secrets never reach a file, a log, an artifact or the Prefect database.

Two defences, both checked here on real runs: a literal credential in a request (any header not
on the harmless list, any user name, password or credential-like query in a URL, any
secret-named option) is refused at every door with exit code 2, and what is stored or shown is
masked. The canary test plants secret values where they may legitimately be (environment
variables, expanded through ``${NAME}`` into headers) for a command-line and a Python run against
a real HTTP server on loopback, then searches byte for byte for them in everything written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sources_support import serve_http
from zarr_parallel import RequestError, ZarrParallelAssembler
from zarr_parallel.orchestration.command import main
from zarr_parallel.request.secrets import (
    MASK,
    is_harmless_header,
    redact,
    redact_url,
    url_credentials,
)

PROJECT = Path(__file__).resolve().parents[2]
RUN: dict[str, Any] = {"deploy_mode": "series", "memory_limit": "300MB"}
#: A URL nothing listens on: a refusal must come before any connection is tried.
NOWHERE = "http://127.0.0.1:9"
LITERAL = "lit3ral-s3cret-91ab"


def _request_file(folder: Path, **fields: Any) -> Path:
    path = folder / "request.yaml"
    path.write_text(yaml.safe_dump({"cache_dir": str(folder / "caches"), **RUN, **fields}))
    return path


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [
        (
            {"storage_options": {"headers": {"X-Auth-Token": LITERAL}}},
            "storage_options.headers.X-Auth-Token",
        ),
        (
            {"storage_options": {"https": {"headers": {"Private-Token": LITERAL}}}},
            "storage_options.https.headers.Private-Token",
        ),
        (
            {"storage_options": {"headers": {"X-Debug": LITERAL}}},
            "storage_options.headers.X-Debug",
        ),
        (
            {"storage_options": {"https": {"client_kwargs": {"headers": {"X-Key": LITERAL}}}}},
            "storage_options.https.client_kwargs.headers.X-Key",
        ),
        ({"storage_options": {"github_token": LITERAL}}, "storage_options.github_token"),
        (
            {"storage_options": {"s3": {"endpoint_url": f"http://me:{LITERAL}@127.0.0.1:9"}}},
            "storage_options.s3.endpoint_url",
        ),
        ({"data_uri": f"http://{LITERAL}@127.0.0.1:9/a.nc"}, "data_uri"),
        ({"data_uri": f"{NOWHERE}/a.nc?auth={LITERAL}"}, "data_uri"),
        ({"data_uri": f"http://me:{LITERAL}@127.0.0.1:9/a.nc"}, "data_uri"),
    ],
)
def test_literal_secrets_are_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], parameter: str
) -> None:
    request = _request_file(tmp_path, **{"data_uri": f"{NOWHERE}/a.nc", **fields})
    for command in ("plan", "run"):
        assert main([command, str(request)]) == 2
        out = capsys.readouterr()
        assert f"invalid request: {parameter}=" in out.err, out.err
        # Refused as a secret, before anything was contacted.
        assert re.search(r"holds credentials|is a credential|is an HTTP header", out.err), out.err
        assert "cannot be read" not in out.err
        assert LITERAL not in out.err + out.out
    assert not (tmp_path / "caches").exists()


def test_the_python_api_refuses_a_literal_header(tmp_path: Path) -> None:
    with pytest.raises(RequestError) as e:
        ZarrParallelAssembler(
            f"{NOWHERE}/a.nc", storage_options={"headers": {"X-Auth-Token": LITERAL}}
        ).cache(cache_store=str(tmp_path / "c.zarr"), **RUN)
    assert e.value.parameter == "storage_options.headers.X-Auth-Token"
    assert LITERAL not in str(e.value) and e.value.value == MASK
    assert not (tmp_path / "c.zarr").exists()


def test_harmless_headers_and_references_are_accepted(tmp_path: Path) -> None:
    headers = {
        "Accept": "application/x-netcdf",
        "User-Agent": "zarr-parallel",
        "Cache-Control": "no-cache",
        "Authorization": "Bearer ${ARCHIVE_TOKEN}",
        "X-Auth-Token": "${ARCHIVE_TOKEN}",
    }
    request = _request_file(tmp_path, data_uri=f"{NOWHERE}/a.nc")
    from zarr_parallel.request.request_file import load_request_file

    req = load_request_file(request, [f"storage_options={{headers: {headers}}}"])
    assert req.storage_options["headers"] == headers
    assert all(is_harmless_header(h) for h in ("accept", "User-Agent", "range"))
    assert not is_harmless_header("X-Debug")


def test_what_is_shown_is_masked() -> None:
    assert url_credentials("https://host/a.nc?page=2") is None
    assert redact_url("https://ghp_tok@host/a.nc?auth=x&page=2") == (
        "https://***@host/a.nc?auth=***&page=2"
    )
    stored = {
        "data_uri": "https://tok@host/a.nc",
        "storage_options": {
            "headers": {"X-Debug": "literal", "Accept": "json", "Authorization": "Bearer ${T}"},
            "https": {"client_kwargs": {"headers": {"Private-Token": "literal"}}},
        },
    }
    assert redact(stored) == {
        "data_uri": "https://***@host/a.nc",
        "storage_options": {
            "headers": {"X-Debug": MASK, "Accept": "json", "Authorization": "Bearer ${T}"},
            "https": {"client_kwargs": {"headers": {"Private-Token": MASK}}},
        },
    }


# ---------------------------------------------------------------------------------------------
# The canary

CANARY_TOKEN = "canary-token-7e3f19c2d4"
CANARY_AWS = "canary-aws-5b8a60e1f7"


@pytest.fixture
def served(tmp_path: Path, era5_files: list[Path]) -> Iterator[Any]:
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(era5_files[0], www / era5_files[0].name)
    with serve_http(www) as svc:
        yield svc


def _database_files() -> list[Path]:
    """The session's Prefect database (SQLite) with its journal files."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    path = Path(url.split(":///", 1)[1])
    assert path.is_file(), f"no Prefect database at {path}"
    return sorted(path.parent.glob(path.name + "*"))


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n.decode()}" for n in needles if n in data]
    return found


def test_canary_secrets_reach_no_file_log_or_database(
    tmp_path: Path,
    served: Any,
    era5_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"{served.url}/{era5_files[0].name}"
    options = {
        "http": {
            "headers": {
                "Authorization": "Bearer ${ZP_CANARY_TOKEN}",
                "X-Auth-Token": "${AWS_SECRET_ACCESS_KEY}",
            },
            "client_kwargs": {"headers": {"Private-Token": "${ZP_CANARY_TOKEN}"}},
        }
    }
    fields = {"chunks": {"time": 12}, "storage_options": options, "log_level": 2, **RUN}
    # The command line, in its own process (plan, then run, under the session's API).
    request = tmp_path / "request.yaml"
    request.write_text(
        yaml.safe_dump({"data_uri": url, "cache_store": str(tmp_path / "cli.zarr"), **fields})
    )
    env = {**os.environ, "ZP_CANARY_TOKEN": CANARY_TOKEN, "AWS_SECRET_ACCESS_KEY": CANARY_AWS}
    outputs = []
    for command in ("plan", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "flows.cache", command, str(request)],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs += [done.stdout, done.stderr]
    # Python, in this process, with every log record captured.
    monkeypatch.setenv("ZP_CANARY_TOKEN", CANARY_TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_AWS)
    caplog.set_level("DEBUG")
    result = ZarrParallelAssembler(url, **{k: fields[k] for k in ("chunks", "storage_options")})
    result.cache(
        cache_store=str(tmp_path / "py.zarr"),
        **{k: v for k, v in fields.items() if k not in ("chunks", "storage_options")},
    )
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text]
    # The secrets were really used: the server received them in the headers.
    sent = [h for h in served.stats.headers if h.get("Authorization") == f"Bearer {CANARY_TOKEN}"]
    assert sent and all(h.get("X-Auth-Token") == CANARY_AWS for h in sent)
    assert all(h.get("Private-Token") == CANARY_TOKEN for h in sent)
    # Prefect ships logs and events in batches: let them land before searching the database.
    time.sleep(7)
    needles = [CANARY_TOKEN.encode(), CANARY_AWS.encode()]
    assert (tmp_path / "cli.zarr").exists() and (tmp_path / "py.zarr").exists()
    assert _files_holding(tmp_path, needles) == []  # caches, version folders, manifests, locks
    for text in outputs:
        assert CANARY_TOKEN not in text and CANARY_AWS not in text
    database = _database_files()
    stored = b"".join(p.read_bytes() for p in database)
    # The right database: the runs' parameters are in it (with the references, not values).
    assert b"${ZP_CANARY_TOKEN}" in stored and str(tmp_path / "cli.zarr").encode() in stored
    assert not [n for n in needles if n in stored]


# ---------------------------------------------------------------------------------------------
# Redirects


@pytest.fixture
def redirecting(served: Any) -> Iterator[str]:
    """A server on loopback that redirects every GET/HEAD to the same path on ``served``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_HEAD(self) -> None:
            self.send_response(302)
            self.send_header("Location", served.url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_credential_headers_do_not_follow_a_redirect_to_another_host(
    redirecting: str, served: Any, era5_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp drops Authorization on a redirect to another origin but sends other headers on:
    # an archive (or an open redirect on it) could forward X-Auth-Token anywhere.
    import fsspec

    from zarr_parallel.sources.remote import fsspec_options

    monkeypatch.setenv("ZP_CANARY_TOKEN", CANARY_TOKEN)
    url = f"{redirecting}/{era5_files[0].name}"
    leaky = {"headers": {"X-Auth-Token": "${ZP_CANARY_TOKEN}", "Accept": "*/*"}}
    fs = fsspec.filesystem("http", skip_instance_cache=True, **fsspec_options(leaky, "http"))
    with pytest.raises(Exception, match="not following it with the header") as e:
        fs.cat_file(url, start=0, end=8)
    assert CANARY_TOKEN not in str(e.value)
    assert not any(CANARY_TOKEN in str(h) for h in served.stats.headers)
    # Harmless headers (and Authorization, which aiohttp drops itself) follow as before.
    plain = {"headers": {"Accept": "*/*", "Authorization": "Bearer ${ZP_CANARY_TOKEN}"}}
    fs = fsspec.filesystem("http", skip_instance_cache=True, **fsspec_options(plain, "http"))
    assert fs.cat_file(url, start=0, end=8) == era5_files[0].read_bytes()[:8]
    assert not any(CANARY_TOKEN in str(h) for h in served.stats.headers)
