"""Remote access: storage options per protocol, retries, redirects and existence checks.

Transient failures (HTTP 5xx/429, connection resets, truncated bodies, timeouts) are retried
with exponential backoff inside the job, per request: HTTP(S) through an aiohttp client
middleware (:func:`_retrying_client`), S3 through botocore's ``standard`` retry mode.
``remote_concurrency`` bounds the requests in flight per worker.

What a request may hold (no secrets, ``${NAME}`` references) and redaction live in
:mod:`zarr_parallel.request.secrets`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

from zarr_parallel.errors import RequestError
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.request.protocols import is_remote, protocol_of
from zarr_parallel.request.secrets import (
    expand_env,
    install_log_redaction,
    is_harmless_header,
    redact_text,
    redact_url,
)

logger = logging.getLogger(__name__)

#: fsspec protocols that mean "the same filesystem" for option lookup.
_FAMILIES = {"http": "https", "https": "http", "s3a": "s3", "gcs": "gs", "gs": "gcs"}
#: Status codes retried as transient.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Body sizes buffered inside the retry loop (so a truncated body is retried too).
_BUFFER_LIMIT = 256 * 2**20


# ---------------------------------------------------------------------------------------------
# Options for fsspec


def _per_protocol(storage_options: Mapping[str, Any]) -> bool:
    import fsspec

    if not storage_options:
        return False
    known = set(fsspec.available_protocols()) | {"http", "https", "s3", "gs", "file"}
    return all(k in known and isinstance(v, Mapping) for k, v in storage_options.items())


def user_options(storage_options: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """The user's options for ``protocol``.

    ``storage_options`` is either keyed by protocol (``{"s3": {...}, "https": {...}}``; ``http``
    and ``https`` share an entry when only one is given) or one flat mapping used for every
    remote protocol.
    """
    if not _per_protocol(storage_options):
        return dict(storage_options) if protocol != "file" else {}
    for key in (protocol, _FAMILIES.get(protocol)):
        if key and key in storage_options:
            return dict(storage_options[key])
    return {}


def fsspec_options(
    storage_options: Mapping[str, Any], protocol: str, concurrency: int = 8, retries: int = 6
) -> dict[str, Any]:
    """The keyword arguments for ``fsspec.filesystem(protocol, ...)`` in this process.

    The user's options for the protocol, with environment references expanded, plus retries with
    backoff and a bound of ``concurrency`` requests in flight: for HTTP(S) a retrying aiohttp
    client; for S3 botocore's ``standard`` retry mode and connection pool size.
    """
    install_log_redaction()
    opts: dict[str, Any] = expand_env(user_options(storage_options, protocol))
    if protocol in ("http", "https"):
        client_kwargs = dict(opts.get("client_kwargs", {}))
        client_kwargs.setdefault("zp_retries", retries)
        client_kwargs.setdefault("zp_concurrency", concurrency)
        opts["client_kwargs"] = client_kwargs
        opts.setdefault("get_client", _retrying_client)
    elif protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs", {}))
        config.setdefault("retries", {"max_attempts": retries + 1, "mode": "standard"})
        config.setdefault("max_pool_connections", concurrency)
        opts["config_kwargs"] = config
    return opts


def fsspec_options_for(uri: str, req: CacheRequest) -> dict[str, Any]:
    """fsspec options for opening ``uri`` in this process ({} for local paths)."""
    if not is_remote(uri):
        return {}
    return fsspec_options(
        req.storage_options, protocol_of(uri), req.remote_concurrency, req.remote_retries
    )


def readable_file(uri: str, req: CacheRequest) -> Any:
    """What h5py and xarray open: the path itself, or an fsspec file object for a URL."""
    if not is_remote(uri):
        return uri
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **fsspec_options_for(uri, req))
    return fs.open(path, "rb")


# ---------------------------------------------------------------------------------------------
# HTTP retries


def backoff_delay(attempt: int, base: float = 0.1, cap: float = 10.0) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2...): exponential with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


#: Request headers aiohttp sets itself, or drops itself on a redirect to another origin.
_SAFE_ON_REDIRECT = frozenset({"host", "content-length", "authorization", "proxy-authorization"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class RedirectRefused(Exception):
    """A server redirected a request carrying credential headers to another origin."""


def _refuse_leaking_redirect(req: Any, resp: Any) -> None:
    """Refuse to follow a redirect to another origin while credential headers ride along.

    aiohttp drops ``Authorization`` on such a redirect but sends every other header again, so
    a server (or an open redirect on it) could forward ``X-Auth-Token: ${TOKEN}`` to any host.
    """
    if resp.status not in _REDIRECTS or "Location" not in resp.headers:
        return
    target = req.url.join(type(req.url)(resp.headers["Location"]))
    if target.origin() == req.url.origin():
        return
    carried = sorted(
        k for k in req.headers if not is_harmless_header(k) and k.lower() not in _SAFE_ON_REDIRECT
    )
    if carried:
        resp.release()
        raise RedirectRefused(
            f"{redact_url(str(req.url))} redirects to another host "
            f"({redact_url(str(target.origin()))}); not following it with the header(s) "
            f"{', '.join(carried)}, which would be sent there too"
        )


def _retry_middleware(retries: int) -> Any:
    import aiohttp

    async def middleware(req: Any, handler: Any) -> Any:
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                resp = await handler(req)
                _refuse_leaking_redirect(req, resp)
                if resp.status in RETRY_STATUSES and not last:
                    logger.debug(
                        "%s %s: HTTP %d, retry %d of %d",
                        req.method,
                        redact_url(str(req.url)),
                        resp.status,
                        attempt + 1,
                        retries,
                    )
                    resp.release()
                    await asyncio.sleep(backoff_delay(attempt + 1))
                    continue
                if resp.status < 300 and req.method == "GET":
                    length = resp.content_length
                    if "Range" in req.headers or (length is not None and length <= _BUFFER_LIMIT):
                        # Read the body here so a truncated one is retried too; fsspec's later
                        # read() returns this buffered body.
                        await resp.read()
                return resp
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                if last:
                    raise
                logger.debug(
                    "%s %s: %s, retry %d of %d",
                    req.method,
                    redact_url(str(req.url)),
                    type(e).__name__,
                    attempt + 1,
                    retries,
                )
                await asyncio.sleep(backoff_delay(attempt + 1))
        raise AssertionError("unreachable: the last attempt returns or raises")

    return middleware


async def _retrying_client(**kwargs: Any) -> Any:
    """An aiohttp session retrying transient failures, with at most ``zp_concurrency`` open
    connections (fsspec's ``get_client`` hook; it receives ``client_kwargs``)."""
    import aiohttp

    retries = int(kwargs.pop("zp_retries", 6))
    concurrency = int(kwargs.pop("zp_concurrency", 8))
    kwargs.setdefault("connector", aiohttp.TCPConnector(limit=concurrency))
    # No overall deadline (a large range may take long), but a silent socket is a failure.
    kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60))
    middlewares = (*kwargs.pop("middlewares", ()), _retry_middleware(retries))
    return aiohttp.ClientSession(middlewares=middlewares, **kwargs)


# ---------------------------------------------------------------------------------------------
# Existence checks


def _status_text(status: int) -> str:
    known = {401: "unauthorised", 403: "forbidden", 404: "not found", 410: "gone"}
    return f"{status} {known[status]}" if status in known else f"HTTP {status}"


def describe_failure(exc: BaseException) -> str:
    """A short reason for a failed remote access: ``404 not found``, ``403 forbidden``..."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return _status_text(status)
        if isinstance(e, PermissionError):
            return "access denied"
        e = e.__cause__ or e.__context__
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return redact_text(f"{type(exc).__name__}: {exc}")


def check_readable(
    urls: Iterable[str], storage_options: Mapping[str, Any], concurrency: int = 8, retries: int = 6
) -> None:
    """Check that every remote URL exists and may be read (metadata requests only).

    Raises
    ------
    RequestError
        Naming the URLs that cannot be read (credentials redacted) and why.
    """
    import fsspec
    from fsspec.asyn import sync

    by_protocol: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        if "://" in url and protocol_of(url) != "file":
            by_protocol.setdefault(protocol_of(url), []).append(url)
    failures: list[tuple[str, str]] = []
    for protocol, group in by_protocol.items():
        fs = fsspec.filesystem(
            protocol, **fsspec_options(storage_options, protocol, concurrency, retries)
        )
        if fs.async_impl:
            failures += sync(fs.loop, _probe_all, fs, group, concurrency)
        else:
            for url in group:
                try:
                    fs.info(url)
                except Exception as e:
                    failures.append((url, describe_failure(e)))
    if failures:
        shown = "; ".join(f"{redact_url(u)} ({why})" for u, why in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise RequestError(
            "data_uri",
            [redact_url(u) for u, _ in failures[:5]],
            f"{len(failures)} remote file(s) cannot be read: {shown}{more}",
            "Check the URLs and that the credentials in the environment (or the storage_options "
            "headers) grant read access",
        )


async def _probe_all(fs: Any, urls: list[str], concurrency: int) -> list[tuple[str, str]]:
    sem = asyncio.Semaphore(concurrency)

    http = "http" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    async def probe(url: str) -> tuple[str, str] | None:
        async with sem:
            try:
                if http:
                    # A HEAD gives the status itself (fsspec reports every failure as "not found").
                    session = await fs.set_session()
                    async with session.head(url, allow_redirects=True, **fs.kwargs) as r:
                        if r.status < 400:
                            return None
                        if r.status not in (405, 501):  # HEAD refused: ask fsspec below
                            return url, _status_text(r.status)
                await fs._info(url)
            except Exception as e:
                return url, describe_failure(e)
            return None

    found = await asyncio.gather(*(probe(u) for u in urls))
    return [f for f in found if f is not None]
