#!/usr/bin/env bash
# Install Prometheus and promtool from Debian (package `prometheus`) for the dashboard tests.
#
#   bash tools/prometheus/install.sh     # prints the prometheus binary's path (last line)
#
# Idempotent: when `prometheus` and `promtool` are on PATH it exits at once. Otherwise it
# runs `apt-get install --no-install-recommends prometheus` (with sudo when not root).
# The package would start a system-wide Prometheus on :9090; the tests start their own on
# a free loopback port, so service starts are refused while installing (policy-rc.d 101,
# the Debian way; an existing policy-rc.d is left as it is).
# Exit status is 0 also when installing is impossible (no apt-get, no root, no network):
# `make test` must go on, and the tests that need Prometheus skip with the reason printed
# here and in tests/dashboards/prom.py.
set -uo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    command -v prometheus
    exit 0
fi
say() { echo "tools/prometheus/install.sh: $*" >&2; }
if ! command -v apt-get >/dev/null; then
    say "no apt-get on this machine: install Prometheus 2.x (prometheus, promtool) by hand"
    exit 0
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        say "not root and no passwordless sudo: cannot apt-get install prometheus"
        exit 0
    fi
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if [[ "$made_policy" == 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
    # A fresh machine has no package lists yet.
    "${sudo[@]}" apt-get update -q >/dev/null || true
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
        say "apt-get install prometheus failed"
        exit 0
    fi
fi
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    command -v prometheus
else
    say "the prometheus package installed no prometheus/promtool on PATH"
fi
