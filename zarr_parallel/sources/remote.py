"""Remote sources: storage options per protocol, secrets kept out of everything stored, retries.

A request is stored (the version's ``plan.json``), shipped to workers as JSON and passed to the
Prefect flow as its parameter (Prefect keeps flow-run parameters in its database). So a request
must never hold a secret. The rules, enforced by :func:`check_no_secrets` at validation, for every
door (Python, the command line and deployments):

- credentials come from the environment of the flow and of every worker: the cloud SDKs' own
  variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``...), or ``"${NAME}"`` references inside ``storage_options`` values, expanded
  from the environment only where the options are used (:func:`fsspec_options`), e.g.
  ``{"https": {"headers": {"Authorization": "Bearer ${ARCHIVE_TOKEN}"}}}``;
- every HTTP header is taken for a credential unless it is on the short list of harmless ones
  (:data:`HARMLESS_HEADERS`: ``Accept``, ``User-Agent``, ``Range``...): a literal value of any
  other header (``X-Auth-Token``, ``Private-Token``, ``X-Debug``...) is refused;
- a literal value of a secret-named option (``key``, ``secret``, ``token``, ``password``...) is
  refused, and so is any credential in a URL: a user name or password
  (``https://user:pass@host``, ``https://TOKEN@host``) or a credential-like query parameter
  (``?auth=``, ``?token=``, ``?sig=``, ``X-Amz-*``...).

A deployment run may use only the ``${NAME}`` references the operator's policy lists, towards the
hosts it lists (:mod:`zarr_parallel.run.policy`).

Whatever is logged or recorded passes through :func:`redact` / :func:`redact_text` as a second
defence, and :func:`install_log_redaction` masks the values of secret environment variables (and
of every variable a ``${NAME}`` reference expanded) in every log record of the process (botocore's
debug log, for one, prints the access key id).

Transient failures (HTTP 5xx/429, connection resets, truncated bodies, timeouts) are retried
with exponential backoff inside the job, per request: HTTP(S) through an aiohttp client
middleware (:func:`_retrying_client`), S3 through botocore's ``standard`` retry mode.
``remote_concurrency`` bounds the requests in flight per worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zarr_parallel.errors import RequestError

logger = logging.getLogger(__name__)

MASK = "***"
#: Storage-option keys whose values are credentials (compared case-insensitively, ``-`` = ``_``).
SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "session_token",
        "security_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "access_token",
        "refresh_token",
        "client_secret",
        "account_key",
        "sas_token",
        "credential",
        "credentials",
        "api_key",
        "apikey",
        "connection_string",
        "authorization",
        "proxy_authorization",
        "cookie",
        "x_api_key",
        "x_amz_security_token",
        "auth",
        "private_key",
        "private_key_id",
    }
)
#: Storage-option keys that name a credential though not listed above (``x_auth_token``,
#: ``private_token``, ``github_token``, ``bearer``...): refused as literals too.
_SECRET_KEY_PART = re.compile(
    r"(token|secret|passw|passphrase|credential|auth|api_?key|private|cookie|bearer)"
)
#: HTTP headers whose values are no credentials: the only ones that may be written literally.
HARMLESS_HEADERS = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-type",
        "dnt",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "pragma",
        "range",
        "te",
        "user-agent",
    }
)
#: Query parameters of a URL that carry credentials (pre-signed URLs, SAS tokens, ``?auth=``...).
_SECRET_QUERY = re.compile(
    r"(sig|signature|token|credential|secret|passw|key|auth|session|x-amz-|x-goog-|jwt|code)",
    re.I,
)
#: Environment variables whose values are secrets even if no option names them.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
#: Literal values of secret-named options that are modes, not secrets (gcsfs ``token="anon"``).
_NOT_SECRET_VALUES = frozenset({"anon", "google_default", "cloud", "browser", "cache", ""})
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: What may remain of a secret value once its ``${NAME}`` references are removed: a scheme word.
_SCHEME_ONLY = re.compile(r"^\s*[A-Za-z-]*\s*$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
#: fsspec protocols that mean "the same filesystem" for option lookup.
_FAMILIES = {"http": "https", "https": "http", "s3a": "s3", "gcs": "gs", "gs": "gcs"}
#: Status codes retried as transient.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Body sizes buffered inside the retry loop (so a truncated body is retried too).
_BUFFER_LIMIT = 256 * 2**20


def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


def is_secret_key(key: Any) -> bool:
    """True for a storage-option key whose value is a credential (``token``, ``X-Auth-Token``)."""
    if not isinstance(key, str):
        return False
    norm = _norm(key)
    return norm in SECRET_KEYS or bool(_SECRET_KEY_PART.search(norm))


def is_harmless_header(name: Any) -> bool:
    """True for an HTTP header whose value may be written literally (:data:`HARMLESS_HEADERS`)."""
    return isinstance(name, str) and name.strip().lower().replace("_", "-") in HARMLESS_HEADERS


def _is_headers(key: Any) -> bool:
    return isinstance(key, str) and _norm(key) in ("headers", "default_headers")


def url_credentials(url: str) -> str | None:
    """What in a URL is a credential (``"a user name"``, ``"the query parameter 'sig'"``...),
    or None when it holds none.

    >>> url_credentials("https://TOKEN@host/a.nc")
    'a user name'
    >>> url_credentials("https://host/a.nc?auth=abc") == "the query parameter 'auth'"
    True
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if "@" in parts.netloc:
        return "a user name and password" if parts.password is not None else "a user name"
    for k, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.search(k):
            return f"the query parameter {k!r}"
    return None


def _from_env_only(value: Any) -> bool:
    """True when a secret-bearing value is made of ``${NAME}`` references (and a scheme word)."""
    if not isinstance(value, str) or not _ENV_REF.search(value):
        return False
    return bool(_SCHEME_ONLY.match(_ENV_REF.sub("", value)))


# ---------------------------------------------------------------------------------------------
# Redaction


def redact_url(url: str) -> str:
    """A URL without its user name and password and with credential query values masked.

    >>> redact_url("https://me:hunter2@host/a.nc?X-Amz-Signature=abc&v=1")
    'https://***@host/a.nc?X-Amz-Signature=***&v=1'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        # A user name can be a token itself (https://TOKEN@host): mask all of it.
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secret_values() -> list[str]:
    """Values that must never be written anywhere: secret env variables and referenced ones."""
    names = set(SECRET_ENV) | _REFERENCED
    values = {os.environ.get(n, "") for n in names}
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact_text(text: str) -> str:
    """Text with URLs redacted and the values of secret environment variables masked."""
    out = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for value in secret_values():
        out = out.replace(value, MASK)
    return out


def redact(value: Any, headers: bool = False, env_values: bool = True) -> Any:
    """A copy of ``value`` (dicts, lists, strings) safe to log or store.

    Values of secret-named keys, and of headers not on the harmless list, are masked unless
    they are made of ``${NAME}`` references; strings are passed through :func:`redact_text`
    (with ``env_values=False`` only their URLs are redacted: a stored request must read back
    the same whatever the environment holds). ``headers`` says that ``value`` is a mapping of
    HTTP headers.
    """
    if isinstance(value, Mapping):
        return {k: _redact_item(k, v, headers, env_values) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v, env_values=env_values) for v in value)
    if isinstance(value, str):
        return redact_text(value) if env_values else _URL.sub(lambda m: redact_url(m[0]), value)
    return value


def _redact_item(key: Any, value: Any, headers: bool, env_values: bool) -> Any:
    if isinstance(value, Mapping):
        return redact(value, headers=_is_headers(key), env_values=env_values)
    secret = is_secret_key(key) or (headers and not is_harmless_header(key))
    if secret and value is not None and not isinstance(value, bool) and not _from_env_only(value):
        return MASK
    return redact(value, env_values=env_values)


class _RedactingFactory:
    """Log record factory that masks secret values in the formatted message."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the logger's problem, not ours
            return record
        secrets = secret_values()
        if any(s in message for s in secrets) or ("://" in message and _URL.search(message)):
            safe = redact_text(message)
            if safe != message:
                record.msg, record.args = safe, None
        return record


_INSTALL_LOCK = threading.Lock()
_REFERENCED: set[str] = set()


def install_log_redaction() -> None:
    """Mask secret environment values in every log record of this process (idempotent)."""
    with _INSTALL_LOCK:
        factory = logging.getLogRecordFactory()
        if not isinstance(factory, _RedactingFactory):
            logging.setLogRecordFactory(_RedactingFactory(factory))


# ---------------------------------------------------------------------------------------------
# Validation


def check_no_secrets(
    data_uri: str | list[str],
    storage_options: Mapping[str, Any],
    open_options: Mapping[str, Any] | None = None,
) -> None:
    """Refuse credentials written into the request (see the module docstring).

    ``open_options`` is searched too: it can hold ``backend_kwargs.storage_options``. Every
    string in the options that is a URL is held to the URL rule (an ``endpoint_url`` or a
    proxy with a password in it).

    Raises
    ------
    RequestError
        Naming the parameter, with the secret masked, and how to pass it instead.
    """
    uris = [data_uri] if isinstance(data_uri, str) else list(data_uri)
    for i, uri in enumerate(uris):
        _check_url("data_uri" if isinstance(data_uri, str) else f"data_uri[{i}]", uri)
    found = [*_walk(storage_options, "storage_options"), *_walk(open_options or {}, "open_options")]
    for path, key, value, in_headers in found:
        if isinstance(value, str) and "://" in value:
            _check_url(path, value)
        if isinstance(value, Mapping | bool) or value is None or _from_env_only(value):
            continue
        if is_secret_key(key) and not (isinstance(value, str) and value in _NOT_SECRET_VALUES):
            raise RequestError(
                path,
                MASK,
                "is a credential written into the request, which is stored in the cache's "
                "manifest and in Prefect's database",
                f'Write "${{NAME}}" instead (e.g. "{_example(key)}") and set NAME in the '
                "environment of the flow and the workers; for S3 the AWS_* variables are read "
                "by themselves",
            )
        if in_headers and not is_harmless_header(key):
            raise RequestError(
                path,
                MASK,
                "is an HTTP header written into the request; any header but the harmless ones "
                f"({', '.join(sorted(HARMLESS_HEADERS))}) may carry a credential, and the "
                "request is stored in the cache's manifest and in Prefect's database",
                f'Write "${{NAME}}" instead (e.g. "{_example(key)}") and set NAME in the '
                "environment of the flow and the workers",
            )


def _check_url(parameter: str, url: str) -> None:
    if "://" not in url:
        return
    what = url_credentials(url)
    if what is not None:
        raise RequestError(
            parameter,
            redact_url(url),
            f"holds credentials ({what}), which would be stored in the cache's manifest and in "
            "Prefect",
            "Remove them from the URL and pass them from the environment: for S3 set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; for HTTP(S) use storage_options "
            '{"https": {"headers": {"Authorization": "Bearer ${MY_TOKEN}"}}}',
        )


def option_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(parameter, text)`` for every string inside nested options, e.g.
    ``("storage_options.headers.X-Token", "${TOKEN}")``."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from option_strings(v, f"{path}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from option_strings(v, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def env_references(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(parameter, NAME)`` for every ``${NAME}`` reference inside ``value`` (options)."""
    for parameter, text in option_strings(value, path):
        for m in _ENV_REF.finditer(text):
            yield parameter, m.group(1)


def _example(key: str) -> str:
    if _norm(key) == "authorization":
        return "Bearer ${ARCHIVE_TOKEN}"
    return "${" + re.sub(r"[^A-Z0-9_]", "_", key.upper()) + "}"


def _walk(value: Any, path: str, headers: bool = False) -> Iterable[tuple[str, str, Any, bool]]:
    """``(parameter, key, value, is a header)`` of every item inside nested options."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}"
            yield sub, str(k), v, headers
            yield from _walk(v, sub, _is_headers(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------
# Options for fsspec


def protocol_of(uri: str) -> str:
    """The fsspec protocol of a URI (``file`` for local paths)."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


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


def expand_env(value: Any, parameter: str = "storage_options") -> Any:
    """Replace ``${NAME}`` references with the environment's values (in this process only)."""
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{parameter}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(expand_env(v, parameter) for v in value)
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise RequestError(
                parameter,
                value,
                f"refers to the environment variable {name}, which is not set",
                f"Set {name} in the environment of the flow and of every worker",
            )
        _REFERENCED.add(name)
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


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
