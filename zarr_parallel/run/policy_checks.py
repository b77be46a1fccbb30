"""A deployment run's request checked against the operator's policy, before planning.

The policy itself (its file, its defaults, path and host matching, and the kerchunk references
checked when read) is in :mod:`zarr_parallel.run.policy`.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zarr_parallel.request.secrets import option_strings
from zarr_parallel.run.policy import (
    Policy,
    check_env_references,
    check_host,
    forget_resolved_folders,
    is_url,
    listing,
    local_path,
    path_allowed,
    refuse,
)
from zarr_parallel.store.paths import resolve_paths


def _static_part(path: str) -> str:
    """The part of a glob pattern before its first wildcard (the folder it searches)."""
    if not glob.has_magic(path):
        return path
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return str(Path(*parts[:i])) if i else "."
    return path


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
    forget_resolved_folders()  # links may have changed since the last check
    uris = [request.data_uri] if isinstance(request.data_uri, str) else list(request.data_uri)
    hosts: list[str] = []
    for uri in uris:
        if is_url(uri):
            hosts.append(check_host("data_uri", uri, policy))
        elif not path_allowed(_static_part(local_path(uri)), policy.source_roots, base):
            raise refuse(
                "data_uri",
                uri,
                "lies outside the folders deployment runs may read",
                policy,
                f"Use a source under {listing(policy.source_roots)}, or ask the operator to add "
                "its folder to [sources] roots in the policy file",
            )
    for name in ("storage_options", "open_options"):
        for parameter, url in _option_urls(getattr(request, name), name):
            if not url.startswith("file://"):
                hosts.append(check_host(parameter, url, policy))
    check_env_references(request, hosts, policy)
    _check_writes(request, policy, base)
    _check_execution(request, policy)


def _check_writes(request: Any, policy: Policy, base: Path) -> None:
    final = resolve_paths(request).final
    # The cache's versions and lock sit beside it: its folder must lie under a root too.
    if not path_allowed(final.parent, policy.cache_roots, base) or final.name in ("", ".", ".."):
        parameter = "cache_store" if request.cache_store is not None else "cache_dir"
        raise refuse(
            parameter,
            getattr(request, parameter),
            f"would write {final}, outside the folders deployment runs may write",
            policy,
            f"Put the cache under {listing(policy.cache_roots)}, or ask the operator to add the "
            "folder to [caches] roots in the policy file",
        )
    # A scratch folder for intermediates, where the request model has one, is a write too.
    temp = getattr(request, "temp_store", None)
    if isinstance(temp, str) and temp and not path_allowed(temp, policy.cache_roots, base):
        raise refuse(
            "temp_store",
            temp,
            "lies outside the folders deployment runs may write",
            policy,
            f"Leave it unset or use a folder under {listing(policy.cache_roots)}",
        )
    logs = request.slurm.log_directory
    if logs and not path_allowed(logs, policy.cache_roots, base):
        raise refuse(
            "slurm.log_directory",
            logs,
            "lies outside the folders deployment runs may write",
            policy,
            "Leave it unset (the logs go into the cache's manifest) or use a folder under "
            f"{listing(policy.cache_roots)}",
        )


#: What a request may only use where the policy allows it: (request field, policy flag, why it
#: is refused, the fix), checked in this order.
_EXECUTION_RULES: tuple[tuple[str, str, str, str], ...] = (
    (
        "slurm.prologue",
        "allow_prologue",
        "puts shell lines into the SLURM job script, which deployment runs may not do",
        "Remove it; an operator who trusts every user of the Prefect API may set "
        "[slurm] allow_prologue = true",
    ),
    (
        "slurm.directives",
        "allow_directives",
        "adds #SBATCH lines to the SLURM job script, which deployment runs may not do",
        "Remove them; an operator may set [slurm] allow_directives = true",
    ),
    (
        "scheduler_address",
        "allow_scheduler_address",
        "connects the run to a dask scheduler named by the request (the dask protocol "
        "unpickles what it receives), which deployment runs may not do",
        "Leave it unset (the run starts its own cluster); an operator may set [dask] "
        "allow_scheduler_address = true",
    ),
)


def _check_execution(request: Any, policy: Policy) -> None:
    for parameter, flag, problem, fix in _EXECUTION_RULES:
        value = functools.reduce(getattr, parameter.split("."), request)
        if value and not getattr(policy, flag):
            raise refuse(parameter, value, problem, policy, fix)
