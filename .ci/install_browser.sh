#!/usr/bin/env bash
# What tests/test_web_browser.py needs on a fresh Debian (bookworm) machine: Debian's chromium
# package, which Playwright drives through executable_path (so no `playwright install` download),
# and the playwright Python package (its wheel bundles the driver). Idempotent.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
python -m pip install -q "playwright>=1.40"
(command -v chromium >/dev/null 2>&1 && chromium --version 2>/dev/null) || chromium-browser --version
