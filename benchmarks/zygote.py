"""A process that imported the command line once and forks a run per request (a *zygote*).

A run then costs its own work, not 5 s of imports; each is still a separate process (its own
process group) that dies for real. :class:`Zygote` starts ``python -m benchmarks.zygote`` and
talks to it in JSON lines; the crash soak (:mod:`benchmarks.bench_durability`) and
``tests/run/test_durability.py`` drive runs through it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Exit code of a forked run that ended with an uncaught exception (a raw traceback).
RAW_TRACEBACK = 70


def serve() -> None:
    """Serve run requests (JSON lines on stdin) by forking; report pids and exit codes."""
    import zarr_parallel.orchestration.cache
    import zarr_parallel.orchestration.recache
    import zarr_parallel.orchestration.recache_command
    import zarr_parallel.run.verify  # noqa: F401

    out = sys.stdout
    children: set[int] = set()
    buffer = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.01)
        if ready:
            data = os.read(stdin, 65536)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req)  # never returns
                children.add(pid)
                out.write(json.dumps({"token": req["token"], "pid": pid}) + "\n")
                out.flush()
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                out.write(json.dumps({"pid": pid, "rc": code}) + "\n")
                out.flush()


def _child(req: dict[str, Any]) -> None:
    """In a forked run: set the environment and the fault, run the command, exit."""
    code = RAW_TRACEBACK
    try:
        os.setpgid(0, 0)  # the run and whatever it starts (a dask cluster) form one group
        os.chdir(req["cwd"])
        for key in ("ZARR_PARALLEL_FAULT", "ZARR_PARALLEL_FAULT_ROOT"):
            os.environ.pop(key, None)
        os.environ.update(req.get("env") or {})
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
        from zarr_parallel import faults

        faults.install_from_environment()
        command, *argv = req["argv"]
        if command == "recache":
            from zarr_parallel.orchestration.recache_command import main
        else:
            from zarr_parallel.orchestration.command import main
        code = main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = RAW_TRACEBACK
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            from zarr_parallel import faults

            if faults.fired():  # the run may have absorbed the failure: say it happened
                os.close(os.open(req["log"] + ".fired", os.O_WRONLY | os.O_CREAT, 0o644))
        os._exit(code)


class Zygote:
    """Start forked runs of ``python -m flows.cache`` (or ``flows.recache``) quickly.

    Each run is a process of its own (its own process group); :meth:`wait` gives its exit code,
    negative for a signal, :data:`RAW_TRACEBACK` for an uncaught exception.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        self._codes: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        self._waited: set[int] = set()
        self._token = 0
        self._buffer = b""

    def _read(self, timeout: float) -> None:
        """Take one message from the zygote, waiting up to ``timeout`` for one."""
        assert self._proc.stdout is not None
        # Lines are split here, not by a buffered readline: two messages that arrive together
        # (a fork and a quick exit) would leave the second in a buffer select() cannot see.
        while b"\n" not in self._buffer:
            fd = self._proc.stdout.fileno()
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the zygote process ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        msg = json.loads(line)
        if "token" in msg:
            self._pids[msg["token"]] = msg["pid"]
        else:
            self._codes[msg["pid"]] = msg["rc"]

    def spawn(
        self, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
    ) -> int:
        """Fork a run of ``argv`` (``["cache", "run", REQUEST, ...]``); returns its pid."""
        assert self._proc.stdin is not None
        self._token += 1
        req = {"token": self._token, "argv": argv, "log": str(log), "cwd": str(cwd), "env": env}
        self._proc.stdin.write((json.dumps(req) + "\n").encode())
        self._proc.stdin.flush()
        deadline = time.monotonic() + 60
        while self._token not in self._pids:
            if time.monotonic() > deadline:
                raise RuntimeError("the zygote did not fork")
            self._read(1.0)
        pid = self._pids.pop(self._token)
        # The kernel reuses pids (a long sweep forks thousands of runs): what was recorded for
        # an earlier run of this pid, reaped before this fork, is not this run's.
        self._waited.discard(pid)
        self._codes.pop(pid, None)
        return pid

    def ended(self, pid: int, timeout: float = 0.01) -> bool:
        """True once run ``pid`` ended (its code is kept for :meth:`wait`)."""
        if pid in self._waited:
            return True
        if pid not in self._codes:
            self._read(timeout)
        return pid in self._codes

    def wait(self, pid: int, timeout: float = 600.0) -> int:
        """The exit code of run ``pid`` once it ended."""
        deadline = time.monotonic() + timeout
        while pid not in self._codes:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                raise TimeoutError(f"run {pid} did not end within {timeout:.0f} s")
            self._read(0.5)
        self._waited.add(pid)
        return self._codes.pop(pid)

    def run(self, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Run to the end; its exit code."""
        return self.wait(self.spawn(argv, log, cwd, env))

    def close(self) -> None:
        """Stop the zygote."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


if __name__ == "__main__":
    serve()
