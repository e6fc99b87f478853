#!/usr/bin/env bash
# Build emberd (release) and start the full daemon on its built-in defaults:
# SQLite store and volumes under ./ember-data (in the repository root), REST API and data
# listeners on loopback only. Extra arguments go to `emberd serve` (see `emberd serve --help`).
#
#   scripts/run.sh               # foreground; Ctrl-C stops it gracefully
#   scripts/run.sh -v            # debug logging
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release -p emberd
exec "${CARGO_TARGET_DIR:-$ROOT/target}/release/emberd" serve "$@"
