"""The temporary Prefect API of an ad hoc run, started first and in the background.

With no ``PREFECT_API_URL`` Prefect 3.8 starts a temporary API when the first client asks for
one (``get_client`` → ``prefect.server.api.server.SubprocessASGIServer.start``): a
``python -m uvicorn ... prefect.server.api.server:create_app`` subprocess on a free port, then
waits for ``/health`` while the run waits with it. Importing ``prefect.server.api.server`` to do
that costs the parent seconds of CPU as well (it is the whole server). This module starts the
same subprocess, with the same arguments and environment, before the command has imported
Prefect at all, so that the server's start overlaps the command's imports and planning; the run
then talks to it through ``PREFECT_API_URL`` (:func:`TemporaryApi.settings`), and the command
stops it when it ends (docs/design.md §2b: no background Prefect server outlives a command).

No Prefect import at module level: the command imports this before Prefect.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from zarr_parallel.orchestration.prefect_home import active_profile, database_at_head

logger = logging.getLogger(__name__)

#: Seconds to wait for the server when ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is
#: unset (the command sets 180: a fresh database is migrated first).
DEFAULT_STARTUP_SECONDS = 180.0
#: uvicorn's exit code when its port was taken meanwhile: start again on another (as Prefect).
#: uvicorn exits with 3 when the app fails to start too (a database it cannot migrate): the port
#: is then free, and the command fails at once instead of restarting until the timeout.
PORT_TAKEN = 3
#: Restarts on another port before giving up (a port taken twice in a row is already rare).
MAX_RESPAWNS = 5


def _port_free(port: int) -> bool:
    """True when nothing listens on ``port`` (the server did not exit for want of it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _exited_message(code: int) -> str:
    """What the command says when the temporary server exits before answering."""
    return (
        "Timed out while attempting to connect to the ephemeral Prefect API server: the "
        f"temporary server exited with code {code} (its messages are above). If they name a "
        "database revision it cannot find, the database in PREFECT_HOME (default ~/.prefect) was "
        "migrated by another Prefect version: set PREFECT_HOME to another folder, or "
        "PREFECT_API_URL to a running Prefect server"
    )


def api_url_configured() -> bool:
    """True when Prefect will talk to a configured API (no temporary one is needed).

    Read without importing Prefect (:func:`configured_api_url`). The run checks again with
    Prefect's own settings (:meth:`TemporaryApi.settings`).
    """
    return configured_api_url() is not None


def configured_api_url() -> str | None:
    """The Prefect API URL configured for this process, read without importing Prefect: the
    environment, then the active profile of ``PREFECT_PROFILES_PATH`` (default
    ``~/.prefect/profiles.toml``); None when neither names one."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    url = active_profile().get("PREFECT_API_URL")
    return str(url) if url else None


#: Words of a command line that run no flow (``run`` is the default command).
_NO_FLOW = frozenset({"plan", "verify", "--plan-only", "-h", "--help", "--version"})


def runs_a_flow(argv: Sequence[str], commands: Sequence[str] = ("run",)) -> bool:
    """True when the command line ``argv`` (after the program) runs a flow: its first word is
    one of ``commands`` or a request file, and no word asks for a plan, a check or help.

    Examples
    --------
    >>> runs_a_flow(["run", "r.yaml"]), runs_a_flow(["r.yaml", "--set", "x=1"])
    (True, True)
    >>> runs_a_flow(["plan", "r.yaml"]), runs_a_flow(["r.yaml", "--plan-only"])
    (False, False)
    """
    if not argv or any(word in _NO_FLOW for word in argv):
        return False
    return argv[0] in commands or not argv[0].startswith("-")


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # Linux: the server gets SIGTERM when the command's process dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TemporaryApi:
    """A temporary Prefect API server process owned by one command."""

    _shared: TemporaryApi | None = None
    _early: TemporaryApi | None = None

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.started = time.monotonic()
        self.ready_seconds = 0.0

    @property
    def api_url(self) -> str:
        """The API's URL (``http://127.0.0.1:PORT/api``)."""
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def begin(cls) -> TemporaryApi:
        """Start the server process and return at once (:meth:`wait` waits for it)."""
        api = cls()
        api._spawn()
        atexit.register(api.stop)
        return api

    @classmethod
    def start_early(cls, argv: Sequence[str], commands: Sequence[str] = ("run",)) -> None:
        """Start the server at a command's very first line when ``argv`` runs a flow and no API
        is configured, so that its start overlaps the command's own imports (about a second of
        the stack) as well; the command takes it with :meth:`take_early`. Only the arguments'
        words are looked at: a wrong guess costs a server stopped unused, never a wrong run."""
        if cls._early is None and runs_a_flow(argv, commands) and not api_url_configured():
            cls._early = cls.begin()

    @classmethod
    def take_early(cls) -> TemporaryApi | None:
        """The server :meth:`start_early` started, handed over once (None if none)."""
        api, cls._early = cls._early, None
        return api

    @classmethod
    def shared(cls) -> TemporaryApi:
        """The process's one server for Python API calls, started on first use and stopped when
        the process exits (a script's later ``cache()`` calls do not start it again)."""
        if cls._shared is None or cls._shared.process is None:
            cls._shared = cls.begin()
        return cls._shared

    @classmethod
    def shared_instance(cls) -> TemporaryApi | None:
        """The server of :meth:`shared`, if started."""
        return cls._shared

    def _spawn(self) -> None:
        # Prefect's own command line (SubprocessASGIServer._run_uvicorn_command); Prefect's folder
        # is found without importing it.
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:  # pragma: no cover - a dependency
            raise RuntimeError("prefect is not installed")
        self.port = _free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        if database_at_head():
            # Migrated already: Prefect's check on start would find nothing to do (0.4 s).
            env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(spec.origin).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(args, env=env, preexec_fn=preexec)
        logger.debug("starting a temporary Prefect API on port %d", self.port)

    def wait(self, timeout: float | None = None) -> str:
        """Wait until the server answers ``/health``; its API URL.

        Raises
        ------
        RuntimeError
            It did not answer within ``timeout`` (default
            ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``), or it exited; the message
            names "the ephemeral Prefect API" as Prefect's own does (the command's exit code 1).
        """
        if self.ready:
            return self.api_url
        if timeout is None:
            timeout = float(
                os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
                or DEFAULT_STARTUP_SECONDS
            )
        deadline = time.monotonic() + timeout
        respawns = 0
        while time.monotonic() < deadline:
            process = self.process
            if process is None:
                break
            code = process.poll()
            if code == PORT_TAKEN and not _port_free(self.port) and respawns < MAX_RESPAWNS:
                respawns += 1
                self._spawn()
                continue
            if code is not None:
                raise RuntimeError(_exited_message(code))
            if _healthy(self.api_url):
                self.ready = True
                self.ready_seconds = time.monotonic() - self.started
                return self.api_url
            time.sleep(0.05)
        raise RuntimeError(
            "Timed out while attempting to connect to the ephemeral Prefect API server "
            f"(waited {timeout:.0f} s for {self.api_url})"
        )

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Prefect settings of a run against this API: its URL, no temporary server of Prefect's
        own (docs/design.md §6), no flow heartbeat (the API ends with the command)."""
        # Prefect is imported here, once the command needs it for the flow.
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            temporary_settings,
        )

        url = self.wait()
        # Said here, once Prefect has set up logging (the command's levels apply).
        logger.info(
            "using the command's temporary Prefect API at %s (it answered %.1f s after its start)",
            url,
            self.ready_seconds,
        )
        updates: dict[Any, Any] = {
            PREFECT_API_URL: url,
            PREFECT_SERVER_EPHEMERAL_ENABLED: False,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        }
        with temporary_settings(updates):
            yield

    def stop(self) -> None:
        """End the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        _drain_prefect_senders()
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drain_prefect_senders(timeout: float = 10.0) -> None:
    """Let Prefect send the logs and events it still holds before the API goes (Prefect drains
    them at exit, when this API would be gone already)."""
    if "prefect" not in sys.modules:
        return
    # Loaded already (a flow ran): these imports cost nothing.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=timeout)
        except Exception as e:  # the run is over; its logs are best-effort
            logger.debug("could not drain %s: %s", service.__name__, e)


def _healthy(api_url: str) -> bool:
    try:
        # No proxy for a loopback server (an http_proxy in the environment would be used).
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


__all__ = ["TemporaryApi", "api_url_configured", "configured_api_url", "runs_a_flow"]
