"""Support for the source tests: real servers on loopback (HTTP with ranges, S3 with moto),
kerchunk references pointing at them, and the cache comparison they all use.

Not mocks: the HTTP server speaks HTTP/1.1 over a socket (HEAD, GET, single byte ranges) and
can fail a deterministic ~30 % of requests the way real archives do (503/500 replies, connection
resets, bodies cut short); the S3 server is moto's standalone server in its own process, with
authentication enforced.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import xarray as xr

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def kerchunk_refs(files: list[Path], base_url: str) -> dict[str, Any]:
    """A kerchunk reference document joining ``files`` along time, pointing at ``base_url``."""
    from kerchunk.combine import MultiZarrToZarr
    from kerchunk.hdf import SingleHdf5ToZarr

    singles = []
    for f in files:
        with open(f, "rb") as fh:
            singles.append(SingleHdf5ToZarr(fh, f"{base_url}/{f.name}").translate())
    combined = MultiZarrToZarr(
        singles, concat_dims=["time"], identical_dims=["latitude", "longitude"]
    ).translate()
    return dict(combined)


#: Run settings of every source test that is not about deploy modes.
RUN: dict[str, Any] = {"deploy_mode": "series", "memory_limit": "300MB"}
#: Target chunks aligned with the test files' HDF5 chunks (6 steps).
CHUNKS = {"time": 12}
_LOCAL: dict[str, Path] = {}


def local_reference_cache(files: list[Path], folder: Path) -> Path:
    """The cache of ``files`` read locally (made once per session): what remote caches equal."""
    from zarr_parallel import ZarrParallelAssembler

    key = repr([str(f) for f in files])
    if key not in _LOCAL:
        out = folder / "local.zarr"
        ZarrParallelAssembler([str(f) for f in files], chunks=CHUNKS).cache(
            cache_store=str(out), **RUN
        )
        _LOCAL[key] = out
    return _LOCAL[key]


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Same data, coordinates, dtypes, encodings and attributes (provenance aside), and
    byte-identical array metadata and chunk files."""
    a, b = xr.open_zarr(cache), xr.open_zarr(reference)
    prov = [k for k in a.attrs if k.startswith("zarr_parallel_")]
    assert prov, "provenance attributes are missing"
    xr.testing.assert_identical(a.drop_attrs(deep=False), b.drop_attrs(deep=False))
    assert {k: v for k, v in a.attrs.items() if k not in prov} == {
        k: v for k, v in b.attrs.items() if not k.startswith("zarr_parallel_")
    }
    for name in a.variables:
        assert a[name].dtype == b[name].dtype
    ra, rb = cache.resolve(), reference.resolve()
    files_a = sorted(p.relative_to(ra) for p in ra.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(rb) for p in rb.rglob("*") if p.is_file())
    arrays = [p for p in files_a if p.parts[0] not in (".zarr-parallel", "zarr.json")]
    assert arrays == [p for p in files_b if p.parts[0] not in (".zarr-parallel", "zarr.json")]
    for rel in arrays:
        assert (ra / rel).read_bytes() == (rb / rel).read_bytes(), rel


@dataclass
class Stats:
    """What the server saw: every request, and the failures it injected."""

    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    #: The headers of every request, as received (what a client sent the server).
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ranges(self, path: str) -> Counter[tuple[int, int]]:
        """Successful GET byte ranges of one file (start, end inclusive) and their counts."""
        out: Counter[tuple[int, int]] = Counter()
        with self.lock:
            for method, p, rng, status in self.requests:
                if method == "GET" and p == path and rng and status == 206:
                    a, b = rng.split("-")
                    out[(int(a), int(b))] += 1
        return out


def _failures_for(key: str) -> int:
    """Deterministic number of failed attempts before success: 70 % none, 20 % one, 10 % two.

    About 29 % of all requests fail ((0.2 + 0.2) / 1.4), spread over every kind of request.
    """
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return 0 if h < 7 else (1 if h < 9 else 2)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.server
        with srv.stats.lock:
            srv.stats.headers.append(dict(self.headers.items()))
            srv.stats.in_flight += 1
            srv.stats.max_in_flight = max(srv.stats.max_in_flight, srv.stats.in_flight)
        try:
            if srv.delay:
                time.sleep(srv.delay)
            self._answer(body)
        finally:
            with srv.stats.lock:
                srv.stats.in_flight -= 1

    def _answer(self, body: bool) -> None:
        srv = self.server
        path = self.path.split("?")[0]
        rng_header = self.headers.get("Range")
        key = f"{self.command} {path} {rng_header}"
        if srv.flaky:
            with srv.stats.lock:
                srv.attempts[key] += 1
                attempt = srv.attempts[key]
            if attempt <= _failures_for(key):
                self._fail(attempt + int(hashlib.md5(key.encode()).hexdigest()[:2], 16), body)
                return
        file = (srv.root / path.lstrip("/")).resolve()
        if not file.is_file() or srv.root not in file.parents:
            self._reply(404, b"not found", body)
            return
        if path in srv.forbidden:
            self._reply(403, b"forbidden", body)
            return
        data = file.read_bytes()
        size = len(data)
        version = _version_headers(file) if srv.versions else {}
        if rng_header:
            m = _RANGE.match(rng_header.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self._reply(416, b"", body)
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(416, None)
                return
            chunk = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            for name, value in version.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(chunk)
            self._record(206, f"{start}-{end}")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        for name, value in version.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)
        self._record(200, None)

    def _reply(self, status: int, payload: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)
        self._record(status, None)

    def _fail(self, kind: int, body: bool) -> None:
        mode = ("503", "500", "reset", "truncate")[kind % (4 if body else 3)]
        with self.server.stats.lock:
            self.server.stats.injected[mode] += 1
            self.server.stats.failed.append(
                (self.command, self.path.split("?")[0], self.headers.get("Range"), mode)
            )
        if mode in ("503", "500"):
            self._reply(int(mode), b"try again", body)
            return
        if mode == "reset":
            # Close without a reply: the client sees the connection drop.
            self.close_connection = True
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.connection.close()
            return
        # Promise a body and send only part of it, then drop the connection.
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.wfile.flush()
        self.close_connection = True

    def _record(self, status: int, rng: str | None) -> None:
        with self.server.stats.lock:
            self.server.stats.requests.append((self.command, self.path.split("?")[0], rng, status))


def _version_headers(file: Path) -> dict[str, str]:
    """ETag and Last-Modified as a file server derives them (nginx: modification time and size)."""
    st = file.stat()
    return {
        "ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"',
        "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, flaky: bool, versions: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root.resolve()
        self.flaky = flaky
        #: Send ETag and Last-Modified, as real file servers and object stores do.
        self.versions = versions
        self.stats = Stats()
        self.attempts: Counter[str] = Counter()
        self.forbidden: set[str] = set()
        #: Seconds each request waits before it is answered (to make overlap observable).
        self.delay = 0.0


@dataclass
class HTTPService:
    """A running server: its base URL, what it saw, and the paths it refuses (403)."""

    url: str
    stats: Stats
    server: _Server

    def forbid(self, path: str) -> None:
        """Answer 403 for ``path`` from now on."""
        self.server.forbidden.add(path)

    def reset_failures(self) -> None:
        """Start the deterministic failure pattern afresh (every key fails again)."""
        with self.stats.lock:
            self.server.attempts.clear()
            self.stats.injected.clear()
            self.stats.failed.clear()


@contextmanager
def serve_http(root: Path, flaky: bool = False, versions: bool = False) -> Iterator[HTTPService]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) until the block ends (``versions``:
    with ETag and Last-Modified headers)."""
    server = _Server(root, flaky, versions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HTTPService(f"http://127.0.0.1:{server.server_address[1]}", server.stats, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Service:
    """A moto S3 server with authentication enforced and one IAM user's keys."""

    endpoint: str
    access_key: str
    secret_key: str


@contextmanager
def serve_s3(log_path: Path) -> Iterator[S3Service]:
    """Run moto's server on loopback in a subprocess, with authentication enforced.

    moto checks signatures only after ``INITIAL_NO_AUTH_ACTION_COUNT`` unauthenticated actions;
    the first one creates an IAM user whose access key the tests then use, so a wrong secret
    really is refused.
    """
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    # The moto of the interpreter running the tests: a ``moto_server`` found on PATH may be
    # another Python's (a pyenv shim), whose moto refused every signed listing here.
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start: {log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="cache-reader")
        key = iam.create_access_key(UserName="cache-reader")["AccessKey"]
        iam.put_user_policy(
            UserName="cache-reader",
            PolicyName="s3-all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
            '"Action": "s3:*", "Resource": "*"}]}',
        )
        yield S3Service(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------------------------
# One variable per file (ERA5 downloads, CMIP6): ``t2m_2020-01.nc``, ``d2m_2020-01.nc``...


def write_variable_month(
    folder: Path,
    var: str,
    month: int,
    time_chunk: int = 4,
    freq: str = "6h",
    latitude: Any = None,
    packed: bool = False,
) -> Path:
    """Write ``<var>_2020-<month>.nc``: one variable, one month of steps every ``freq``, on a
    small 7 × 8 grid, HDF5-chunked ``(time_chunk, 7, 8)`` with zlib, as a CDS download is."""
    import numpy as np
    import pandas as pd

    start = pd.Timestamp(f"2020-{month:02d}-01")
    times = pd.date_range(start, start + pd.offsets.MonthBegin(1), freq=freq, inclusive="left")
    lat = np.linspace(60.0, 30.0, 7) if latitude is None else np.asarray(latitude)
    lon = np.arange(0.0, 40.0, 5.0)
    seed = sum(map(ord, var)) * 100 + month
    data = np.random.default_rng(seed).random((times.size, lat.size, lon.size), "float32")
    ds = xr.Dataset(
        {var: (("time", "latitude", "longitude"), 250 + 40 * data, {"units": "K"})},
        coords={"time": times, "latitude": lat, "longitude": lon},
    )
    enc: dict[str, Any] = {"chunksizes": (time_chunk, lat.size, lon.size), "zlib": True}
    if packed:  # int16 with scale_factor/add_offset, as ERA5 ships them
        enc.update(dtype="int16", scale_factor=0.01, add_offset=270.0, _FillValue=-32767)
    path = Path(folder) / f"{var}_2020-{month:02d}.nc"
    ds.to_netcdf(
        path,
        engine="netcdf4",
        encoding={var: enc, "time": {"units": "hours since 2020-01-01", "dtype": "int64"}},
    )
    return path
