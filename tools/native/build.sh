#!/usr/bin/env bash
# Builds the compiled envelope decoder + column builder (native/, Rust via PyO3) into the
# project's virtualenv: `pip install ./native` runs maturin (from PyPI), which runs cargo
# (crates from crates.io, cached in ~/.cargo). Idempotent: the Makefile calls it again
# only when a file under native/ changes. Usage: tools/native/build.sh <venv python>
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    echo "tools/native/build.sh: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
    exit 1
fi
"$PY" -m pip install -q ./native
"$PY" -c "import meterline_native"  # fails loudly if the build did not land
