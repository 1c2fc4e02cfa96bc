#!/usr/bin/env bash
# Install Docker Compose from Debian (package `docker-compose`, v1.29, Python) so that
# tests/test_docker.py can run `docker-compose config`: it validates docker-compose.yml
# (schema, anchors, depends_on conditions, volumes) without a Docker daemon, which the
# build machines do not have and no image could be pulled into anyway.
#
#   bash tools/docker-compose/install.sh   # prints the working command (last line)
#
# Idempotent: when `docker compose version` (the v2 plugin) or `docker-compose version`
# already works it prints that command and exits. Otherwise it runs
# `apt-get install --no-install-recommends docker-compose` (with sudo when not root),
# updating the package lists once if the first try fails on a fresh machine. Exit status
# is 0 also when installing is impossible (no apt-get, no root, no network): `make test`
# must go on, and the compose test skips with the reason printed here and in the test.
set -uo pipefail

found() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif docker-compose version >/dev/null 2>&1; then
        echo "docker-compose"
    else
        return 1
    fi
}

if found; then
    exit 0
fi
say() { echo "tools/docker-compose/install.sh: $*" >&2; }
source "$(dirname "$0")/../lib/apt.sh"
apt_ready tools/docker-compose/install.sh "Docker Compose" || exit 0
apt_install tools/docker-compose/install.sh docker-compose || exit 0
found || say "the docker-compose package installed, but \`docker-compose version\` fails"
exit 0
