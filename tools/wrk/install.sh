#!/usr/bin/env bash
# Install wrk from Debian (package `wrk`), the C HTTP load generator that
# benchmarks/server_ingest.py --client wrk drives for the single-event load (a client in
# C takes far less of the shared cores than the aiohttp one, so more is left to the server).
#
#   bash tools/wrk/install.sh     # prints the wrk binary's path (last line)
#
# Idempotent: when `wrk` is on PATH it exits at once. Otherwise it runs
# `apt-get install --no-install-recommends wrk` (with sudo when not root), updating the
# package lists once if the first try fails on a fresh machine.
# Exit status is 0 also when installing is impossible (no apt-get, no root, no network):
# `make test` must go on, and the smoke test of `--client wrk` skips with the reason
# printed here and in tests/test_benchmarks_smoke.py.
set -uo pipefail

if command -v wrk >/dev/null; then
    command -v wrk
    exit 0
fi
say() { echo "tools/wrk/install.sh: $*" >&2; }
source "$(dirname "$0")/../lib/apt.sh"
apt_ready tools/wrk/install.sh "wrk (https://github.com/wg/wrk)" || exit 0
apt_install tools/wrk/install.sh wrk || exit 0
if command -v wrk >/dev/null; then
    command -v wrk
else
    say "the wrk package installed no wrk on PATH"
fi
