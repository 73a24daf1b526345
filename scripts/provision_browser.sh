#!/usr/bin/env bash
# Chromium from the distribution's packages for the browser test; a no-op when one is installed.
set -euo pipefail
for b in chromium chromium-browser google-chrome; do
  command -v "$b" >/dev/null 2>&1 && exit 0
done
echo "[provision] installing Chromium (apt) for the browser test"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
if ! $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
  $SUDO apt-get update -q >/dev/null 2>&1 || true
  $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || {
    echo "[provision] could not install Chromium: install it with your package manager (the browser test needs it)" >&2
    exit 1
  }
fi
