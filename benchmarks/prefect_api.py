"""The Prefect APIs the contenders run against.

A running ``prefect server`` the suite starts for the contender that uses one (as deployments
do), and, for the others, the home and start-up time of the temporary API Prefect starts inside
each run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: The temporary Prefect API's start-up time given to every contender, the 180 s that
#: :mod:`zarr_parallel.orchestration` gives the command line: on a loaded machine a fresh
#: PREFECT_HOME's migrations alone take longer than Prefect's 20 s.
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
TEMPORARY_API_STARTUP_SECONDS = 180


@contextlib.contextmanager
def prefect_server(folder: Path) -> Iterator[str]:
    """A real ``prefect server start`` on loopback (SQLite under ``folder``, made afresh: a
    database grown by earlier invocations slowed every flow-run call, and the figures with it);
    yields its API URL."""
    import shutil
    import socket
    import urllib.request

    shutil.rmtree(folder, ignore_errors=True)  # the suite's own folder under benchmarks/data

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (folder / "server.log").open("w")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {folder / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def contender_environment(work: Path) -> dict[str, str]:
    """This process's environment with the contenders' Prefect home and start-up time set.

    The home is the suite's own (``WORK/prefect-home``), its database migrated before any
    timing: in the shared ``~/.prefect`` a database that another Prefect version migrated makes
    every temporary API exit at start-up with code 3, which Prefect 3.8 takes for "port in use"
    and restarts until its start-up timeout, so the run failed with "Timed out while attempting
    to connect to ephemeral Prefect API server". The start-up time is set in the environment the
    contender starts with, not by the contender or by zarr-parallel once imported: Prefect
    starts its temporary API from whichever thread first needs it (the events and log workers
    run in threads of their own), and a thread outside a ``temporary_settings`` block reads the
    environment, where Prefect's default is 20 s.
    """
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(work / "prefect-home")
    try:
        given = float(env.get(STARTUP_TIMEOUT, "0"))
    except ValueError:
        given = 0.0
    if given < TEMPORARY_API_STARTUP_SECONDS:  # a longer setting of the user's is kept
        env[STARTUP_TIMEOUT] = str(TEMPORARY_API_STARTUP_SECONDS)
    command = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    env_upgrade = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env_upgrade, capture_output=True, text=True, check=False)
    status = "ready" if done.returncode == 0 else f"upgrade failed: {done.stderr.strip()[-300:]}"
    print(
        f"Prefect home of the contenders: {env['PREFECT_HOME']} ({status}, "
        f"{time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return env
