#!/usr/bin/env bash
# Install the project, make a small ERA5-like example dataset and cache it with the flow.
# Extra arguments go to the CLI, e.g. `--set deploy_mode=series` or `--set num_jobs=8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
if ! compgen -G "example-data/era5_like_*.nc" >/dev/null; then
  python -m zarr_parallel.examples example-data
fi
zarr-parallel run examples/quickstart.yaml "$@"
