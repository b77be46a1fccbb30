"""The ``zarr-parallel`` command: ``run``, ``plan``, ``verify``, ``recache`` and ``deploy``.

``zarr-parallel run|plan|verify REQUEST.yaml`` is ``python -m flows.cache run|plan|verify`` (the
alias a clone keeps), ``zarr-parallel recache`` is ``python -m flows.recache`` and
``zarr-parallel deploy`` is ``python -m deployments`` for an install: same options, same
behaviour, same exit codes. ``--help`` and ``--version`` answer without importing Prefect,
distributed or dask-jobqueue: only the commands that run flows import them.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

from pydantic import BaseModel

from zarr_parallel.orchestration import set_command_environment
from zarr_parallel.orchestration.options import (
    add_overrides,
    add_plan_options,
    add_progress_options,
    add_recache_options,
    add_verify_options,
)
from zarr_parallel.orchestration.process_exit import exit_now
from zarr_parallel.orchestration.temporary_api import TemporaryApi
from zarr_parallel.request.model import CacheRequest
from zarr_parallel.run.phases import process_start
from zarr_parallel.version import __version__

PROG = "zarr-parallel"
#: The exit codes of every command (docs/design.md §11).
EXIT_CODES = (
    (0, "done, or the cache was up to date"),
    (1, "the run failed (nothing half-written is published)"),
    (2, "invalid request (refused before anything was written)"),
    (3, "halted on recommendations (see recommend_changes)"),
)
#: Widths of the name column in the help's lists and of its lines.
_NAME_WIDTH = 28
_LINE_WIDTH = 100


def request_fields(
    model: type[BaseModel] = CacheRequest, prefix: str = ""
) -> list[tuple[str, str]]:
    """Every request field as ``(name, description)``, nested blocks as dotted names.

    Read from the request model, so ``--help`` lists what a request file and ``--set`` accept.

    Examples
    --------
    >>> dict(request_fields())["slurm.partition"]
    "SLURM partition (queue); default: the cluster's"
    """
    fields: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        nested = info.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            fields.extend(request_fields(nested, f"{prefix}{name}."))
        else:
            fields.append((f"{prefix}{name}", info.description or ""))
    return fields


def _listing(title: str, rows: Sequence[tuple[object, str]], width: int = _NAME_WIDTH) -> str:
    lines = [f"{title}:"]
    for name, text in rows:
        head = f"  {name!s:<{width}}"
        lines.append(
            textwrap.fill(text, _LINE_WIDTH, initial_indent=head, subsequent_indent=" " * len(head))
        )
    return "\n".join(lines)


def exit_codes_text() -> str:
    """The exit codes, as the help prints them."""
    return _listing("exit codes", EXIT_CODES, width=4)


def help_epilog() -> str:
    """The end of ``zarr-parallel --help``: the request fields and the exit codes."""
    fields = _listing(
        "request fields (keys of REQUEST.yaml, or --set KEY=VALUE; see docs/request.md)",
        request_fields(),
    )
    return f"{fields}\n\n{exit_codes_text()}"


def _request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("request", help="request file (YAML or JSON)")
    add_overrides(p)
    add_progress_options(p)


#: The request commands: (name, summary, extra options).
_REQUEST_COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None] | None], ...] = (
    ("run", "cache the dataset as REQUEST.yaml says", None),
    (
        "plan",
        "print the plan (jobs, read amplification, memory; the SLURM job script in SLURM mode) "
        "and draw it with --picture; writes no cache",
        add_plan_options,
    ),
    ("verify", "compare the published cache with its source", add_verify_options),
    ("recache", "bring the cache up to date with its grown or changed source", add_recache_options),
)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (help, ``--version`` and the check of every command's arguments)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Cache netCDF/HDF5, kerchunk and Zarr datasets into Zarr, in parallel and "
        "within a memory limit, orchestrated by Prefect.",
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary, options in _REQUEST_COMMANDS:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=exit_codes_text(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _request_options(sub)
        if options is not None:
            options(sub)
    # deploy's options are prefect deploy's (passed through): its own help prints them.
    commands.add_parser(
        "deploy",
        help="create the work pool and deploy the Prefect deployments "
        "(zarr-parallel deploy --help)",
        add_help=False,
    )
    return parser


def _run_cache(command: str, args: Sequence[str]) -> int:
    # The temporary API starts first, its start overlapping the imports below.
    TemporaryApi.start_early([command, *args])
    # The request stack (xarray, zarr) loads only for the commands that use it: help and
    # --version answer without it (and Prefect loads only when a flow runs).
    from zarr_parallel.orchestration.command import main as cache_main

    return cache_main([command, *args], prog=PROG, started=process_start())


def _run_recache(command: str, args: Sequence[str]) -> int:
    TemporaryApi.start_early(list(args), commands=())  # as above
    # The request stack loads only here, as above (and Prefect only when a flow runs).
    from zarr_parallel.orchestration.recache_command import main as recache_main

    return recache_main(list(args), prog=f"{PROG} {command}", started=process_start())


def _run_deploy(command: str, args: Sequence[str]) -> int:
    # Prefect is imported only by the deploy itself, as above.
    from zarr_parallel.orchestration.deploy import main as deploy_main

    return deploy_main(list(args))


#: What each command runs, with the arguments after its name.
_RUNNERS: dict[str, Callable[[str, Sequence[str]], int]] = {
    "run": _run_cache,
    "plan": _run_cache,
    "verify": _run_cache,
    "recache": _run_recache,
    "deploy": _run_deploy,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``zarr-parallel COMMAND ...``; returns the exit code (0 done or up to date, 1 run failed,
    2 invalid request, 3 halted on recommendations)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["deploy"]:  # deploy passes its options on to prefect deploy
        parser = build_parser()
        parsed = parser.parse_args(args)  # exits on --help, --version and bad arguments
        if parsed.command is None:
            parser.print_usage(sys.stderr)
            print(f"{PROG}: error: give a command: {', '.join(_RUNNERS)}", file=sys.stderr)
            return 2
    command = args[0]
    # The command's process, before Prefect or distributed is imported.
    set_command_environment()
    return _RUNNERS[command](command, args[1:])


def entry() -> NoReturn:
    """The ``zarr-parallel`` script: :func:`main`, then the process ends without the
    interpreter's finalisation (:mod:`zarr_parallel.orchestration.process_exit`)."""
    exit_now(main())


if __name__ == "__main__":
    entry()
