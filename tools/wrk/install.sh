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
if ! command -v apt-get >/dev/null; then
    say "no apt-get on this machine: install wrk (https://github.com/wg/wrk) by hand"
    exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        say "not root and no passwordless sudo: cannot apt-get install wrk"
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends wrk >/dev/null; then
    # A fresh machine has no package lists yet.
    "${sudo[@]}" apt-get update -q >/dev/null || true
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends wrk >/dev/null; then
        say "apt-get install wrk failed"
        exit 0
    fi
fi
if command -v wrk >/dev/null; then
    command -v wrk
else
    say "the wrk package installed no wrk on PATH"
fi
