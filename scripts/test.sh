#!/usr/bin/env bash
# The whole test suite from a fresh clone: install everything, lint, type-check, test, build docs.
# Each phase prints its seconds, so a CI log shows where the time goes.
set -euo pipefail
cd "$(dirname "$0")/.."
phase() { echo "== phase: $1 ($((SECONDS - start)) s)"; start=$SECONDS; }
start=$SECONDS
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
phase "set-up"
ruff check zarr_parallel flows deployments tests benchmarks scripts examples
ruff format --check zarr_parallel flows deployments tests benchmarks scripts examples
mypy zarr_parallel flows
phase "ruff, mypy"
if [ -x scripts/slurm-local.sh ] || [ -f scripts/slurm-local.sh ]; then
  bash scripts/slurm-local.sh start
fi
phase "local SLURM"
bash scripts/browser.sh  # headless Chromium: the Prefect UI's plan picture is looked at for real
phase "browser"
python -m pytest -q "$@"
phase "pytest"
# [bench] smoke: figures printed, not asserted (a failed contender is a row saying why, and a
# failure of one of ours is repeated at the end with its traceback). This project's modes on a
# running Prefect server and on a temporary API, beside plain xarray + dask and the floor, on the
# 0.4 GB `smoke` dataset; the full comparison (0.5.0, SLURM, more xarray variants, 1.2-4.2 GB)
# is `python -m benchmarks.suite` without --contenders.
python -m benchmarks.suite --size smoke --repeat 1 --cases misaligned \
  --contenders "zarr-parallel series,zarr-parallel series (Prefect server),zarr-parallel dask_distributed,xarray+dask (source chunks),floor"
phase "benchmark smoke"
NO_MKDOCS_2_WARNING=1 mkdocs build --strict -q
phase "docs"
