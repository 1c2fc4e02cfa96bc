#!/usr/bin/env bash
# Build stripe-mock (Stripe's official API mock, a Go module) for the invoicing-export tests.
#
#   bash tools/stripe-mock/install.sh     # prints the stripe-mock binary's path (last line)
#
# `go install github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION` into .cache/bin, with Go's
# module and build caches under .cache/go too, so a machine that has built it once builds
# nothing again and `make clean` removes it all. The binary carries the module version it was
# built from (`go version -m`); when that is the pinned one this script exits at once, so
# it is cheap to run before every `make test`.
#
# The pin: v0.203.0 is what the module proxy served as @latest when the export targets were
# written; its bundled OpenAPI spec has /v1/billing/meter_events and /v1/invoiceitems. Bump
# it here and in meterline/testing/stripe_mock.py (STRIPE_MOCK_VERSION; a test checks both).
#
# Exit status is 0 also when it cannot be built (no `go`, no network): `make test` must go
# on, and the Stripe tests then skip with the reason printed here.
set -uo pipefail

STRIPE_MOCK_VERSION="${STRIPE_MOCK_VERSION:-v0.203.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${METERLINE_CACHE:-$root/.cache}"
bin_dir="$cache/bin"
binary="$bin_dir/stripe-mock"
say() { echo "tools/stripe-mock/install.sh: $*" >&2; }

built_version() {
    # `go version -m` prints "mod <path> <version> <sum>" for the main module.
    go version -m "$1" 2>/dev/null | awk '$1 == "mod" && $2 == "github.com/stripe/stripe-mock" {print $3}'
}

if ! command -v go >/dev/null; then
    if [[ -x "$binary" ]]; then
        # Cannot check its version without go; a binary we built is still better than none.
        echo "$binary"
        exit 0
    fi
    say "no 'go' on PATH: install Go (https://go.dev/dl) to build stripe-mock; the Stripe tests skip"
    exit 0
fi

if [[ -x "$binary" && "$(built_version "$binary")" == "$STRIPE_MOCK_VERSION" ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "$bin_dir"
export GOBIN="$bin_dir"
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${GOCACHE:-$cache/go/build}"
# -modcacherw: Go's module cache is read-only by default, which makes `rm -rf .cache` fail.
if ! go install -modcacherw "github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION" >&2; then
    say "go install github.com/stripe/stripe-mock@$STRIPE_MOCK_VERSION failed; the Stripe tests skip"
    exit 0
fi
echo "$binary"
