"""The command-line options the commands share, defined once.

``zarr-parallel`` (:mod:`zarr_parallel.cli`) checks a command's arguments with them before it
imports Prefect, and the flows' own command lines (``python -m flows.cache``,
``python -m flows.recache``) parse with them: argparse only, so the help stays quick.
"""

from __future__ import annotations

import argparse


def add_overrides(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): override a request field."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a request field (YAML value; dotted keys reach nested fields)",
    )


def add_progress_options(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress on stderr (the summary and errors still print)."""
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="show no progress on stderr (a live line in a terminal, a line per phase otherwise)",
    )


def add_verify_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--verify-mode``, ``--sample`` and ``--seed``; ``prefix`` starts each help text."""
    p.add_argument(
        "--verify-mode",
        choices=("auto", "full", "sample"),
        default="auto",
        help=f"{prefix}compare every chunk (full), a seeded sample, or full up to 2 GB (auto)",
    )
    p.add_argument("--sample", type=int, default=16, help=f"{prefix}chunks sampled per variable")
    p.add_argument("--seed", type=int, default=0, help=f"{prefix}seed of the sample")


def add_recache_options(p: argparse.ArgumentParser) -> None:
    """``--check`` and ``--no-append`` of the re-cache command."""
    p.add_argument("--check", action="store_true", help="only report what a run would do")
    p.add_argument("--no-append", action="store_true", help="re-cache in full when it changed")


def add_plan_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--picture PATH`` and ``--picture-variable NAME`` of the plan command."""
    p.add_argument(
        "--picture",
        metavar="PATH",
        help=f"{prefix}write the plan picture (source and target chunk grids, jobs) to PATH: "
        "SVG or PNG by its suffix",
    )
    p.add_argument(
        "--picture-variable",
        metavar="NAME",
        help=f"{prefix}the variable the picture shows (default: the first)",
    )
