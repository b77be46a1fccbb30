#!/usr/bin/env bash
# The whole test suite from a fresh clone: install everything, lint, type-check, test, build docs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
ruff check zarr_parallel flows deployments tests benchmarks
ruff format --check zarr_parallel flows deployments tests benchmarks
mypy zarr_parallel flows
if [ -x scripts/slurm-local.sh ] || [ -f scripts/slurm-local.sh ]; then
  bash scripts/slurm-local.sh start
fi
python -m pytest -q "$@"
python -m benchmarks.suite --size quick --repeat 1 --cases misaligned  # [bench] smoke: figures printed, not asserted
NO_MKDOCS_2_WARNING=1 mkdocs build --strict -q
