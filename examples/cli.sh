#!/usr/bin/env bash
# The command-line door: plan, run, run again (up to date), verify and re-cache one request file.
#
#   bash examples/cli.sh                  # example-data/ -> example-cache/ (quickstart.yaml)
#   DATA_DIR=/data/era5 CACHE_DIR=/scratch/me bash examples/cli.sh
#
# Each step is one `zarr-parallel` command; exit codes: 0 done or up to date, 1 run failed,
# 2 invalid request, 3 halted on recommendations.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${DATA_DIR:-$PWD/example-data}"
CACHE_DIR="${CACHE_DIR:-$PWD/example-cache}"
if ! compgen -G "$DATA_DIR/era5_like_*.nc" >/dev/null; then
  python -m zarr_parallel.examples "$DATA_DIR"   # make the ERA5-like example files
fi
request=examples/quickstart.yaml
# --set overrides a field of the request file (a YAML value; dotted keys reach nested fields).
set_dir=(--set "data_uri=$DATA_DIR/era5_like_*.nc" --set "cache_dir=$CACHE_DIR" --set cache_label=_cli)

echo "== plan (writes nothing)"
zarr-parallel plan "$request" "${set_dir[@]}"
echo "== run"
zarr-parallel run "$request" "${set_dir[@]}"
echo "== run again: the cache is up to date, nothing is written"
zarr-parallel run "$request" "${set_dir[@]}"
echo "== verify every value against the source"
zarr-parallel verify "$request" "${set_dir[@]}" --verify-mode full
echo "== re-cache: only what is new in the source would be appended (--check reports, writes nothing)"
zarr-parallel recache "$request" "${set_dir[@]}" --check
zarr-parallel recache "$request" "${set_dir[@]}"
