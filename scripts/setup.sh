#!/usr/bin/env bash
# Install the project and its development tools into .venv (idempotent; uv from the package index).
# Bytecode is compiled once here: the environment sets PYTHONDONTWRITEBYTECODE, and every worker,
# job process and Prefect server would otherwise recompile Prefect from source (~2.5 s CPU each).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check uv
fi
uv sync --frozen --extra dev --python "${PYTHON:-python3.11}" --quiet --compile-bytecode
