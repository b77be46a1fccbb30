"""A real ``prefect server start`` and ``prefect worker start`` for the tests that need them.

Each server runs on loopback with SQLite under a temporary folder and its own ``PREFECT_HOME``;
the session's own temporary Prefect API (tests/conftest.py) is left alone: every client and
subprocess is given the server's URL explicitly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PROJECT = Path(__file__).resolve().parent.parent
#: Generous: the machine may be loaded; these are deadlines for real processes, not timings.
SERVER_START_SECONDS = 240


def unavailable(message: str) -> None:
    """A service the test needs did not start: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any ``PREFECT_`` setting, with its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    return env


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started here (its own process group), then reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextmanager
def prefect_server(home: Path, settings: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    """A real ``prefect server start`` on 127.0.0.1, with extra ``settings`` in its environment.

    Yields ``{"url", "home", "log"}``; the server's output goes to ``home / "server.log"``.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = base_env(home / "server")
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home}/prefect.db"
    env.update(settings)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "prefect", "server", "start"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                unavailable(f"prefect server did not start on {url}:\n{tail(log)}")
            time.sleep(0.5)
        yield {"url": url, "home": home, "log": log}
    finally:
        stop(proc)


def write_policy(path: Path, root: Path, hosts: Sequence[str] = ("127.0.0.1",)) -> Path:
    """An operator policy letting deployment runs read and write under ``root`` (the tests'
    temporary folders) and reach ``hosts``; the default would allow only the project folder."""
    base = json.dumps(os.path.realpath(root))  # a TOML basic string is a JSON string
    path.write_text(
        f"[sources]\nroots = [{base}]\nhosts = {json.dumps(list(hosts))}\n"
        f"[caches]\nroots = [{base}]\n"
    )
    return path


def deploy(
    server: Mapping[str, Any], timeout: float, policy: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m deployments [--policy P]`` against ``server``: the process pool (whose job
    template names the policy file) and every deployment."""
    env = base_env(server["home"] / "deploy")
    env["PREFECT_API_URL"] = server["url"]
    return subprocess.run(
        [sys.executable, "-m", "deployments", *(["--policy", str(policy)] if policy else [])],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def prefect_worker(
    server: Mapping[str, Any], pool: str = "zarr-parallel", env: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """A real ``prefect worker start`` polling ``pool`` every second, with ``env`` added to its
    environment; yields its log file."""
    env = {**base_env(server["home"] / "worker"), **(env or {})}
    env.update(PREFECT_API_URL=server["url"], PREFECT_WORKER_QUERY_SECONDS="1")
    log = server["home"] / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
            cwd=server["home"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            unavailable(f"prefect worker did not start:\n{tail(log)}")
        yield log
    finally:
        stop(proc)
