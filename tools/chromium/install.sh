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
source "$(dirname "$0")/../lib/apt.sh"
apt_ready tools/chromium/install.sh "Chromium (chromium)" || exit 0
apt_install tools/chromium/install.sh chromium || exit 0
if command -v chromium >/dev/null; then
    command -v chromium
else
    say "the chromium package installed no chromium on PATH"
fi
