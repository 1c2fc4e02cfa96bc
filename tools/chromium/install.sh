#!/usr/bin/env bash
# Install headless Chromium from Debian (package `chromium`) for the usage page test
# (tests/server/test_usage_page.py drives it with --headless --dump-dom / --screenshot).
#
#   bash tools/chromium/install.sh     # prints the chromium binary's path (last line)
#
# Idempotent: when `chromium` (or `chromium-browser`) is on PATH it exits at once.
# Otherwise it runs `apt-get install --no-install-recommends chromium` (with sudo when not
# root), updating the package lists once if the first try fails on a fresh machine.
# Exit status is 0 also when installing is impossible (no apt-get, no root, no network):
# `make test` must go on, and the browser test skips with the reason printed here and in
# the test.
set -uo pipefail

for name in chromium chromium-browser; do
    if command -v "$name" >/dev/null; then
        command -v "$name"
        exit 0
    fi
done
say() { echo "tools/chromium/install.sh: $*" >&2; }
if ! command -v apt-get >/dev/null; then
    say "no apt-get on this machine: install Chromium (chromium) by hand"
    exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        say "not root and no passwordless sudo: cannot apt-get install chromium"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null; then
    # A fresh machine has no package lists yet.
    "${sudo[@]}" apt-get update -q >/dev/null || true
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null; then
        say "apt-get install chromium failed"
        exit 0
    fi
fi
if command -v chromium >/dev/null; then
    command -v chromium
else
    say "the chromium package installed no chromium on PATH"
fi
