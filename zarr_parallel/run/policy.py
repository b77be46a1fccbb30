"""The operator's policy for requests that arrive through a Prefect deployment.

A deployment's parameters come from whoever can reach the Prefect API (the open-source server
has no accounts): they are untrusted input. Before such a request is planned, the worker checks
it against a policy the operator wrote in a TOML file. The file's path is fixed in the work
pool's job template (``ZARR_PARALLEL_POLICY``, which flow runs cannot override: the pool made by
``python -m deployments`` does not let runs set ``env`` or ``command``); without a file, the
default is closed. Requests from the command line or Python are the local user's own and are not
checked (only the secrets rules of :mod:`zarr_parallel.sources.remote` hold for every door).

An example, with every key (all optional)::

    # /etc/zarr-parallel/policy.toml
    [sources]
    roots = ["/data/era5"]             # local files, Zarr stores and kerchunk-referenced paths
    hosts = ["data.example.org"]       # URL hosts (an S3 URL's host is its bucket); "*.x.org"

    [caches]
    roots = ["/scratch/caches"]        # cache_store / cache_dir and slurm.log_directory

    [env]                              # "${NAME}" references a request may use, and where to
    ARCHIVE_TOKEN = ["data.example.org"]   # the hosts its value may be sent to

    [slurm]
    allow_prologue = false             # slurm.prologue: shell lines in the job script
    allow_directives = false           # slurm.directives: extra #SBATCH lines

    [dask]
    allow_scheduler_address = false    # scheduler_address: the dask protocol unpickles

Relative roots are relative to the deployment's working directory. A root covers everything
below it once symbolic links are resolved, so a link cannot lead outside it.

Without a policy file the default holds: sources and caches only under the deployment's working
directory (so the shipped deployments work as they are), no URL hosts, no ``${NAME}``
references, no SLURM prologue or directives and no scheduler address from a request.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zarr_parallel.errors import RequestError, ZarrParallelError
from zarr_parallel.sources.remote import env_references, option_strings, redact, redact_url

#: The environment variable naming the policy file (set by the work pool's job template).
POLICY_ENV = "ZARR_PARALLEL_POLICY"
#: Where the policy is read from when the pool's template names no file.
DEFAULT_POLICY_PATH = "/etc/zarr-parallel/policy.toml"

_KEYS: dict[str, dict[str, type]] = {
    "sources": {"roots": list, "hosts": list},
    "caches": {"roots": list},
    "env": {},
    "slurm": {"allow_prologue": bool, "allow_directives": bool},
    "dask": {"allow_scheduler_address": bool},
}


class PolicyFileError(ZarrParallelError):
    """The operator's policy file cannot be read or holds something unknown."""


@dataclass(frozen=True)
class Policy:
    """What a deployment run's request may use (see the module docstring).

    Attributes
    ----------
    source_roots, cache_roots
        Absolute folders (symbolic links resolved) under which sources may be read and caches
        written.
    source_hosts
        Host patterns (``fnmatch``, case-insensitive; with ``:port`` only that port) of URLs.
    env
        ``(NAME, host patterns)`` pairs: the ``${NAME}`` references allowed, and where to.
    origin
        Where the policy came from (shown in refusals).
    """

    source_roots: tuple[str, ...] = ()
    source_hosts: tuple[str, ...] = ()
    cache_roots: tuple[str, ...] = ()
    env: tuple[tuple[str, tuple[str, ...]], ...] = ()
    allow_prologue: bool = False
    allow_directives: bool = False
    allow_scheduler_address: bool = False
    origin: str = "the default policy"
    _env_map: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("source_roots", "cache_roots"):
            for root in getattr(self, name):
                if not os.path.isabs(root):
                    raise ValueError(f"{name} must be absolute paths, got {root!r}")
        object.__setattr__(self, "_env_map", dict(self.env))

    def env_hosts(self, name: str) -> tuple[str, ...] | None:
        """The hosts ``${name}`` may be sent to, or None when it may not be used."""
        return self._env_map.get(name)


def default_policy(workdir: str | Path) -> Policy:
    """The closed policy: read and write only under ``workdir``, nothing else."""
    root = os.path.realpath(workdir)
    return Policy(
        source_roots=(root,),
        cache_roots=(root,),
        origin=f"the default policy (no policy file: only under {root})",
    )


def policy_path() -> str:
    """The policy file's path: ``$ZARR_PARALLEL_POLICY`` as the pool sets it, or the default."""
    return os.environ.get(POLICY_ENV) or DEFAULT_POLICY_PATH


def load_policy(path: str | Path | None = None, workdir: str | Path | None = None) -> Policy:
    """Read the operator's policy, or the closed default when the file does not exist.

    Parameters
    ----------
    path
        The TOML file; default :func:`policy_path`.
    workdir
        The deployment's working directory (default: the current one): the default policy's
        root, and what relative roots in the file are relative to.

    Raises
    ------
    PolicyFileError
        The file exists but cannot be read, is not TOML, or holds unknown keys or bad values.
    """
    file = Path(path or policy_path())
    base = Path(workdir or os.getcwd())
    if not file.exists():
        return default_policy(base)
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PolicyFileError(f"the policy file {file} cannot be read: {e}") from e
    return _parse(data, file, base)


def _parse(data: Mapping[str, Any], file: Path, base: Path) -> Policy:
    def bad(key: str, problem: str) -> PolicyFileError:
        return PolicyFileError(f"the policy file {file}: {key} {problem}")

    for section, value in data.items():
        if section not in _KEYS or not isinstance(value, dict):
            raise bad(section, f"is not a policy section (known: {sorted(_KEYS)})")
        for key, item in value.items():
            want = _KEYS[section].get(key, list if section == "env" else None)
            if want is None:
                raise bad(f"{section}.{key}", f"is unknown (known: {sorted(_KEYS[section])})")
            if not isinstance(item, want) or (
                isinstance(item, list) and not all(isinstance(s, str) and s for s in item)
            ):
                raise bad(f"{section}.{key}", f"must be a {want.__name__} of strings or a bool")

    def get(section: str, key: str, default: Any) -> Any:
        return data.get(section, {}).get(key, default)

    def roots(section: str) -> tuple[str, ...]:
        return tuple(os.path.realpath(base / r) for r in get(section, "roots", []))

    return Policy(
        source_roots=roots("sources"),
        source_hosts=tuple(h.lower() for h in get("sources", "hosts", [])),
        cache_roots=roots("caches"),
        env=tuple((n, tuple(h.lower() for h in hs)) for n, hs in data.get("env", {}).items()),
        allow_prologue=get("slurm", "allow_prologue", False),
        allow_directives=get("slurm", "allow_directives", False),
        allow_scheduler_address=get("dask", "allow_scheduler_address", False),
        origin=f"the policy file {file}",
    )


# ---------------------------------------------------------------------------------------------
# Checks


def _refuse(parameter: str, value: Any, problem: str, policy: Policy, fix: str) -> RequestError:
    return RequestError(
        parameter, redact(value), f"{problem}; {policy.origin} guards deployment runs", fix
    )


def host_of(url: str) -> str:
    """A URL's host as the policy compares it: lower case, with the port if one is given."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """True when ``host`` (``name`` or ``name:port``) matches one of ``patterns``."""
    name = host.rsplit(":", 1)[0] if ":" in host else host
    return any(fnmatch.fnmatchcase(host if ":" in p else name, p) for p in patterns)


def path_allowed(path: str | Path, roots: Iterable[str], base: str | Path | None = None) -> bool:
    """True when ``path`` (relative to ``base``; links resolved) lies under one of ``roots``."""
    full = os.path.join(base or os.getcwd(), os.path.expanduser(str(path)))
    if os.path.islink(full):
        real = os.path.realpath(full)
    else:
        # The folder's real path is shared by a glob's many files: resolved once per check.
        folder, name = os.path.split(os.path.normpath(full))
        real = os.path.join(_real_folder(folder), name) if name not in ("", "..") else full
        real = os.path.realpath(real) if name in ("", "..") else real
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@functools.lru_cache(maxsize=256)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _static_part(path: str) -> str:
    """The part of a glob pattern before its first wildcard (the folder it searches)."""
    if not glob.has_magic(path):
        return path
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return str(Path(*parts[:i])) if i else "."
    return path


def _is_url(value: str) -> bool:
    return "://" in value and not value.startswith("file://")


def _local(value: str) -> str:
    return value.removeprefix("file://")


def _option_urls(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """``(parameter, url)`` of every URL string inside storage or open options."""
    return ((p, text) for p, text in option_strings(value, path) if "://" in text)


def check_request(request: Any, policy: Policy, workdir: str | Path | None = None) -> None:
    """Refuse what a deployment run's request may not use under ``policy``.

    Checked: every source path or URL host (``data_uri``, URLs inside ``storage_options`` and
    ``open_options`` such as ``endpoint_url``), the cache path and ``slurm.log_directory``,
    each ``${NAME}`` reference and the hosts it would reach, ``slurm.prologue`` and
    ``slurm.directives``, and ``scheduler_address``. A kerchunk reference's targets are
    checked when it is read (:func:`check_references`).

    Raises
    ------
    RequestError
        Naming the parameter, its value (secrets masked) and the rule that refuses it.
    """
    base = Path(workdir or os.getcwd())
    _real_folder.cache_clear()  # links may have changed since the last check
    uris = [request.data_uri] if isinstance(request.data_uri, str) else list(request.data_uri)
    hosts: list[str] = []
    for uri in uris:
        if _is_url(uri):
            hosts.append(_check_host("data_uri", uri, policy))
        elif not path_allowed(_static_part(_local(uri)), policy.source_roots, base):
            raise _refuse(
                "data_uri",
                uri,
                "lies outside the folders deployment runs may read",
                policy,
                f"Use a source under {_listing(policy.source_roots)}, or ask the operator to add "
                "its folder to [sources] roots in the policy file",
            )
    for name in ("storage_options", "open_options"):
        for parameter, url in _option_urls(getattr(request, name), name):
            if not url.startswith("file://"):
                hosts.append(_check_host(parameter, url, policy))
    check_env_references(request, hosts, policy)
    _check_writes(request, policy, base)
    _check_execution(request, policy)


def _listing(roots: tuple[str, ...]) -> str:
    return " or ".join(roots) if roots else "a listed folder (the policy lists none)"


def _check_host(parameter: str, url: str, policy: Policy) -> str:
    host = host_of(url)
    if not host_allowed(host, policy.source_hosts):
        raise _refuse(
            parameter,
            redact_url(url),
            f"reaches the host {host!r}, which deployment runs may not contact",
            policy,
            "Use a host listed under [sources] hosts in the policy file"
            + (f" ({list(policy.source_hosts)})" if policy.source_hosts else " (none is)")
            + ", or ask the operator to add it",
        )
    return host


def check_env_references(request: Any, hosts: Iterable[str], policy: Policy) -> None:
    """Refuse ``${NAME}`` references the policy does not list, or towards hosts it does not
    list for that name (``hosts``: every host the request's options may be sent to).

    Raises
    ------
    RequestError
        Naming the option that holds the reference.
    """
    hosts = list(dict.fromkeys(hosts))
    for name in ("storage_options", "open_options"):
        for parameter, var in env_references(getattr(request, name), name):
            allowed = policy.env_hosts(var)
            if allowed is None:
                raise _refuse(
                    parameter,
                    "${" + var + "}",
                    f"expands the worker's environment variable {var}, which deployment runs "
                    "may not use",
                    policy,
                    f"Remove it, or ask the operator to list {var} under [env] in the policy "
                    "file with the hosts its value may be sent to",
                )
            outside = [h for h in hosts if not host_allowed(h, allowed)]
            if outside:
                raise _refuse(
                    parameter,
                    "${" + var + "}",
                    f"would send the value of {var} to {outside}, not among the hosts the "
                    f"policy lists for it ({list(allowed)})",
                    policy,
                    f"Use {var} only with sources on {list(allowed)}",
                )


def _check_writes(request: Any, policy: Policy, base: Path) -> None:
    from zarr_parallel.store.paths import resolve_paths

    final = resolve_paths(request).final
    # The cache's versions and lock sit beside it: its folder must lie under a root too.
    if not path_allowed(final.parent, policy.cache_roots, base) or final.name in ("", ".", ".."):
        parameter = "cache_store" if request.cache_store is not None else "cache_dir"
        raise _refuse(
            parameter,
            getattr(request, parameter),
            f"would write {final}, outside the folders deployment runs may write",
            policy,
            f"Put the cache under {_listing(policy.cache_roots)}, or ask the operator to add the "
            "folder to [caches] roots in the policy file",
        )
    # A scratch folder for intermediates, where the request model has one, is a write too.
    temp = getattr(request, "temp_store", None)
    if isinstance(temp, str) and temp and not path_allowed(temp, policy.cache_roots, base):
        raise _refuse(
            "temp_store",
            temp,
            "lies outside the folders deployment runs may write",
            policy,
            f"Leave it unset or use a folder under {_listing(policy.cache_roots)}",
        )
    logs = request.slurm.log_directory
    if logs and not path_allowed(logs, policy.cache_roots, base):
        raise _refuse(
            "slurm.log_directory",
            logs,
            "lies outside the folders deployment runs may write",
            policy,
            "Leave it unset (the logs go into the cache's manifest) or use a folder under "
            f"{_listing(policy.cache_roots)}",
        )


def _check_execution(request: Any, policy: Policy) -> None:
    if request.slurm.prologue and not policy.allow_prologue:
        raise _refuse(
            "slurm.prologue",
            request.slurm.prologue,
            "puts shell lines into the SLURM job script, which deployment runs may not do",
            policy,
            "Remove it; an operator who trusts every user of the Prefect API may set "
            "[slurm] allow_prologue = true",
        )
    if request.slurm.directives and not policy.allow_directives:
        raise _refuse(
            "slurm.directives",
            request.slurm.directives,
            "adds #SBATCH lines to the SLURM job script, which deployment runs may not do",
            policy,
            "Remove them; an operator may set [slurm] allow_directives = true",
        )
    if request.scheduler_address and not policy.allow_scheduler_address:
        raise _refuse(
            "scheduler_address",
            request.scheduler_address,
            "connects the run to a dask scheduler named by the request (the dask protocol "
            "unpickles what it receives), which deployment runs may not do",
            policy,
            "Leave it unset (the run starts its own cluster); an operator may set [dask] "
            "allow_scheduler_address = true",
        )


# ---------------------------------------------------------------------------------------------
# Kerchunk references: checked when read, by whoever reads them in a policed run

_ACTIVE: ContextVar[tuple[Policy, str] | None] = ContextVar("zarr_parallel_policy", default=None)
#: Set while a policed run works, for the processes it starts (job processes, local dask
#: workers): they read the reference again and check it against the same policy file. Its
#: value is the deployment's working directory.
POLICED_ENV = "ZARR_PARALLEL_POLICED_WORKDIR"


@contextlib.contextmanager
def enforced(policy: Policy | None, workdir: str | Path | None = None) -> Iterator[None]:
    """Check kerchunk references read in this context, and in the processes started from it,
    against ``policy`` (None: no checks)."""
    if policy is None:
        yield
        return
    where = str(workdir or os.getcwd())
    token = _ACTIVE.set((policy, where))
    previous = os.environ.get(POLICED_ENV)
    os.environ[POLICED_ENV] = where
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        if previous is None:
            os.environ.pop(POLICED_ENV, None)
        else:
            os.environ[POLICED_ENV] = previous


def active_policy() -> tuple[Policy, str] | None:
    """The policy enforced here and the deployment's working directory, if any.

    In a process a policed run started, the policy file is read again (its path comes from
    the same fixed ``ZARR_PARALLEL_POLICY``).
    """
    found = _ACTIVE.get()
    if found is None and os.environ.get(POLICED_ENV):
        workdir = os.environ[POLICED_ENV]
        found = (load_policy(workdir=workdir), workdir)
    return found


def check_references(refs: Mapping[str, Any], request: Any) -> None:
    """Refuse a kerchunk reference that points outside the enforced policy's roots and hosts.

    Every file the reference names (templates filled in) is checked; local paths are relative
    to the working directory, as fsspec reads them. References generated from a ``gen`` rule
    cannot be listed without generating them, so a policed run refuses them. Does nothing
    outside a policed run.

    Raises
    ------
    RequestError
        On ``data_uri``, naming the first reference target that is not allowed.
    """
    from zarr_parallel.sources.source import referenced_urls

    found = active_policy()
    if found is None:
        return
    policy, workdir = found
    if refs.get("gen"):
        raise _refuse(
            "data_uri",
            request.data_uri,
            "is a kerchunk reference with generated ('gen') references, whose targets cannot "
            "be checked before they are read",
            policy,
            "Use a reference that lists its targets (kerchunk's default output)",
        )
    hosts: list[str] = []
    for url in referenced_urls(refs):
        if _is_url(url):
            hosts.append(_check_host("data_uri", url, policy))
        elif not path_allowed(_local(url), policy.source_roots, workdir):
            raise _refuse(
                "data_uri",
                request.data_uri,
                f"is a kerchunk reference to {url}, outside the folders deployment runs may read",
                policy,
                f"Use a reference whose files lie under {_listing(policy.source_roots)}",
            )
    check_env_references(request, hosts, policy)
