#!/usr/bin/env bash
# Ember's one test command: install the test tools, check the installer's fresh-machine
# plan and every shell script, start MariaDB, then fmt, clippy and every test of the
# workspace (unit, protocol and end-to-end with real clients), and finally check that the
# run left the source tree as it found it.
#
#   scripts/test.sh                 # everything (what CI runs through .ci/run)
#   scripts/test.sh -- nbd_         # extra args go to `cargo test` (e.g. a test-name filter)
#
# Works from any directory, as root, with no stdin (CI=true). Exits non-zero if any step
# fails; every step runs even after an earlier one failed, and a summary is printed last.
#
# Environment:
#   CARGO_TARGET_DIR        build dir (default: <repo>/target)
#   EMBER_SKIP_INSTALL=1    do not run scripts/install-test-deps.sh
#   EMBER_TEST_TIMEOUT      limit for the `cargo test` step, in minutes (default 75)
#   EMBER_TEST_MYSQL_URL    use this MariaDB/MySQL instead of starting a local one
#   EMBER_CRASH_CYCLES      SIGKILL/restart cycles of tests/crash.rs (default 50)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
exec </dev/null

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
TEST_TIMEOUT_MIN="${EMBER_TEST_TIMEOUT:-75}"

say() { printf '\n==> %s\n' "$*" >&2; }

STEPS=()
RESULTS=()
TIMES=()
FAILED=0
# step NAME CMD...: run a step, record its outcome and duration.
step() {
    local name="$1"
    shift
    say "$name: $*"
    local t0=$SECONDS rc=0
    "$@" || rc=$?
    STEPS+=("$name")
    TIMES+=($((SECONDS - t0)))
    if ((rc == 0)); then
        RESULTS+=("ok")
    else
        RESULTS+=("FAILED (exit $rc)")
        FAILED=1
    fi
    return 0
}

summary() {
    printf '\n==> summary (%s)\n' "$(date -u +%H:%M:%SZ)" >&2
    local i
    for i in "${!STEPS[@]}"; do
        printf '    %-10s %-18s %4ss\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" >&2
    done
    if ((FAILED)); then
        printf '==> FAILED\n' >&2
    else
        printf '==> all passed in %ss\n' "$SECONDS" >&2
    fi
}

# ---- MariaDB for the control plane's store tests --------------------------------------
MYSQL_STARTED=0
MYSQL_SOCK=/run/mysqld/mysqld.sock
MYSQL_DB=ember_test
MYSQL_USER=ember
MYSQL_PASS=ember

mysql_up() { mysqladmin --socket="$MYSQL_SOCK" --connect-timeout=2 ping >/dev/null 2>&1; }

start_mysql() {
    if [[ -n "${EMBER_TEST_MYSQL_URL:-}" ]]; then
        echo "using EMBER_TEST_MYSQL_URL from the environment"
        return 0
    fi
    if ! mysql_up; then
        command -v mysqld_safe >/dev/null || {
            echo "mysqld_safe not found (mariadb-server)"
            return 1
        }
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld 2>/dev/null || true
        # A fresh data dir (image built without postinst) needs initialising once.
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null || return 1
        fi
        setsid mysqld_safe --user=mysql >/dev/null 2>&1 &
        MYSQL_STARTED=1
        local i
        for ((i = 0; i < 120; i++)); do
            mysql_up && break
            sleep 0.5
        done
        mysql_up || {
            echo "MariaDB did not come up within 60 s"
            tail -20 /var/log/mysql/error.log 2>/dev/null
            return 1
        }
    fi
    # Tests create and drop their own databases (ember_t_<random>); the test user may
    # manage any database whose name starts with "ember_" (see control/README.md).
    mysql --socket="$MYSQL_SOCK" -u root <<SQL || return 1
CREATE DATABASE IF NOT EXISTS \`$MYSQL_DB\`;
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASS';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASS';
ALTER USER '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASS';
ALTER USER '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASS';
GRANT ALL PRIVILEGES ON \`ember\\_%\`.* TO '$MYSQL_USER'@'localhost';
GRANT ALL PRIVILEGES ON \`ember\\_%\`.* TO '$MYSQL_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
    export EMBER_TEST_MYSQL_URL="mysql://$MYSQL_USER:$MYSQL_PASS@127.0.0.1:3306/$MYSQL_DB"
    echo "EMBER_TEST_MYSQL_URL=$EMBER_TEST_MYSQL_URL"
}

stop_mysql() {
    if ((MYSQL_STARTED)); then
        mysqladmin --socket="$MYSQL_SOCK" -u root shutdown >/dev/null 2>&1 || true
        MYSQL_STARTED=0
    fi
}

cleanup() {
    stop_mysql
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- shellcheck and the source tree ----------------------------------------------------
# Every shell script the test command runs or ships (settings in .shellcheckrc).
shellcheck_all() {
    local files=()
    mapfile -t files < <(git ls-files -- '*.sh' .ci/run 2>/dev/null || find . -name '*.sh' -not -path './target/*')
    ((${#files[@]})) || files=(scripts/*.sh tests/guest/build.sh benches/*.sh .ci/run)
    echo "shellcheck ${#files[@]} scripts"
    shellcheck "${files[@]}"
}

# What git sees in the tree, ignored files included, minus the build directory: tests must
# not write into the source tree (they write into temporary directories).
tree_state() {
    git rev-parse --is-inside-work-tree >/dev/null 2>&1 || return 0
    git status --porcelain --ignored=matching --untracked-files=all 2>/dev/null |
        grep -v -e '^!! target/' -e '^!! ember-data/' || true
}

tree_unchanged() {
    if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        echo "not a git checkout: nothing to compare"
        return 0
    fi
    local after
    after="$(tree_state)"
    if [[ "$after" != "$1" ]]; then
        echo "the test run changed the source tree (tests must write into temp dirs only):"
        diff <(printf '%s\n' "$1") <(printf '%s\n' "$after") || true
        return 1
    fi
    echo "source tree unchanged"
}

# ---- the steps ------------------------------------------------------------------------
# Everything runs inside main(), so bash has parsed the whole file before the first step:
# editing or checking out this script while it runs cannot change what it does.
main() {
    TEST_ARGS=()
    if [[ "${1:-}" == "--" ]]; then
        shift
        TEST_ARGS=("$@")
    elif (($#)); then
        echo "usage: scripts/test.sh [-- CARGO_TEST_ARGS...]" >&2
        exit 2
    fi

    local tree_before
    tree_before="$(tree_state)"
    if [[ "${EMBER_SKIP_INSTALL:-0}" != 1 ]]; then
        step deps "$ROOT/scripts/install-test-deps.sh"
    fi
    step plan "$ROOT/scripts/check-install-plan.sh"
    step shellcheck shellcheck_all
    step mariadb start_mysql
    step fmt cargo fmt --all -- --check
    step clippy cargo clippy --workspace --all-targets -- -D warnings
    # Build first so the test timeout covers running, not compiling.
    step build cargo test --workspace --no-run
    step cli-ref "$ROOT/scripts/cli-reference.sh" --check "${CARGO_TARGET_DIR:-$ROOT/target}/debug/emberd"
    step test timeout --signal=TERM --kill-after=60 "${TEST_TIMEOUT_MIN}m" \
        cargo test --workspace --no-fail-fast -- "${TEST_ARGS[@]}"
    # Every fuzz target, one minute in all (scripts/fuzz.sh TARGET SECONDS for longer runs).
    step fuzz "$ROOT/scripts/fuzz.sh"
    step clean-tree tree_unchanged "$tree_before"

    summary
    exit "$FAILED"
}

main "$@"
