#!/usr/bin/env bash
# Debian's headless Chromium and its WebDriver, for the browser test of the per-token page
# (tests/test_token_view.py). Quick when both are there already; installs them as root otherwise.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q && apt-get install -y -q chromium chromium-driver
