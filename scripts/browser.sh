#!/usr/bin/env bash
# Headless Chromium (Debian's package) for the test that looks at the Prefect UI in a real browser
# (tests/orchestration/test_plan_picture_ui.py). Idempotent: installs only when missing.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/tmp/browser-apt.log 2>&1; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends chromium >/tmp/browser-apt.log 2>&1 \
    || { cat /tmp/browser-apt.log >&2; exit 1; }
fi
