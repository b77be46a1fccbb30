"""What a request may hold: secrets kept out of everything stored, and redaction.

A request is stored (the version's ``plan.json``), shipped to workers as JSON and passed to the
Prefect flow as its parameter (Prefect keeps flow-run parameters in its database). So a request
must never hold a secret. The rules, enforced by :func:`check_no_secrets` at validation, for every
door (Python, the command line and deployments):

- credentials come from the environment of the flow and of every worker: the cloud SDKs' own
  variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE``...), or ``"${NAME}"`` references inside ``storage_options`` values, expanded
  from the environment only where the options are used (:func:`expand_env`, called by
  :func:`zarr_parallel.sources.remote.fsspec_options`), e.g.
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
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zarr_parallel.errors import RequestError

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
