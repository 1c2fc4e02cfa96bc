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
source "$(dirname "$0")/../lib/apt.sh"
apt_ready tools/prometheus/install.sh "Prometheus 2.x (prometheus, promtool)" || exit 0

# Debian's prometheus package starts the service on install; no service here (CI,
# containers): policy-rc.d 101 tells invoke-rc.d not to start anything.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${APT_SUDO[@]}" tee "$policy" >/dev/null
    "${APT_SUDO[@]}" chmod 755 "$policy"
    made_policy=1
fi
cleanup() { if [[ "$made_policy" == 1 ]]; then "${APT_SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

apt_install tools/prometheus/install.sh prometheus || exit 0
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    command -v prometheus
else
    say "the prometheus package installed no prometheus/promtool on PATH"
fi
