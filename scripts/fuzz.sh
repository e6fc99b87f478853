#!/usr/bin/env bash
# Run Ember's fuzz targets (fuzz/, cargo-fuzz over libFuzzer).
#
#   scripts/fuzz.sh                       # every target, sharing EMBER_FUZZ_SECONDS (60) in all
#   scripts/fuzz.sh TARGET [SECONDS]      # one target (default 60 s)
#   scripts/fuzz.sh --list                # the target names
#
# Each run starts from the committed seeds in fuzz/corpus/TARGET, works on a copy in a
# temporary directory (the source tree is never written), and fails on the first crash,
# leak or timeout, printing the input that caused it (libFuzzer saves it under
# $EMBER_FUZZ_ARTIFACTS, default a temp dir that is kept on failure). Prints one summary
# line per target: executions, coverage (libFuzzer's `cov:`), corpus size.
#
# Only the stable Rust toolchain is installable here: cargo-fuzz needs nightly's -Z
# sanitizer flags, so this sets RUSTC_BOOTSTRAP=1 for the fuzz build alone.
#
# Environment:
#   EMBER_FUZZ_SECONDS     total time of an all-targets run (default 60)
#   EMBER_FUZZ_SANITIZER   address (default) or none
#   EMBER_FUZZ_ARTIFACTS   where crash inputs go (default: a temp dir)
#   EMBER_FUZZ_KEEP_CORPUS DIR: also copy each grown corpus to DIR/TARGET (for seeding)
set -Eeuo pipefail
trap 'echo "fuzz.sh: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1
SAN="${EMBER_FUZZ_SANITIZER:-address}"
# The fuzz build has its own target dir, away from the main workspace's.
export CARGO_TARGET_DIR="${EMBER_FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/fuzz}"

command -v cargo-fuzz >/dev/null || {
    echo "fuzz.sh: cargo-fuzz is missing (scripts/install-test-deps.sh installs it)" >&2
    exit 1
}

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' "$FUZZ/Cargo.toml" | grep -v '^ember-fuzz$'; }

if [[ "${1:-}" == "--list" ]]; then
    targets
    exit 0
fi

mapfile -t ALL < <(targets)
if (($#)); then
    SEL=("$1")
    SECS="${2:-60}"
else
    SEL=("${ALL[@]}")
    total="${EMBER_FUZZ_SECONDS:-60}"
    SECS=$((total / ${#SEL[@]}))
    ((SECS >= 2)) || SECS=2
fi

WORK="$(mktemp -d)"
ART="${EMBER_FUZZ_ARTIFACTS:-$WORK/artifacts}"
mkdir -p "$ART"
cleanup() {
    if ((FAILED)); then
        echo "fuzz.sh: crash inputs kept in $ART" >&2
    else
        rm -rf "$WORK"
    fi
}
FAILED=0
trap cleanup EXIT

echo "fuzz.sh: building the fuzz targets (sanitizer: $SAN)"
(cd "$FUZZ" && cargo fuzz build -s "$SAN" --release)

for t in "${SEL[@]}"; do
    corpus="$WORK/corpus/$t"
    mkdir -p "$corpus"
    if [[ -d "$FUZZ/corpus/$t" ]]; then cp -r "$FUZZ/corpus/$t/." "$corpus/"; fi
    log="$WORK/$t.log"
    rc=0
    (cd "$FUZZ" && cargo fuzz run -s "$SAN" --release "$t" "$corpus" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$ART/$t-") >"$log" 2>&1 || rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)"
    n="$(find "$corpus" -type f | wc -l)"
    printf 'fuzz.sh: %-28s %6ss  execs %-10s cov %-6s corpus %s\n' "$t" "$SECS" "${execs:-?}" "${cov:-?}" "$n"
    if [[ -n "${EMBER_FUZZ_KEEP_CORPUS:-}" ]]; then
        mkdir -p "$EMBER_FUZZ_KEEP_CORPUS/$t"
        cp -r "$corpus/." "$EMBER_FUZZ_KEEP_CORPUS/$t/"
    fi
    if ((rc != 0)); then
        FAILED=1
        echo "fuzz.sh: $t FAILED (exit $rc); last lines of its log:" >&2
        tail -n 40 "$log" >&2
    fi
done
exit "$FAILED"
