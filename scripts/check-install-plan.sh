#!/usr/bin/env bash
# The fresh-machine path of scripts/install-test-deps.sh, exercised on any machine: run its
# decision logic (--plan) against an empty dpkg database, an empty guest-kernel cache and
# empty apt lists, and check that it plans to update apt, install every package it names
# and fetch the guest kernel, and exits 0. Then check that on this machine (after the
# deps step) it plans nothing. Run by scripts/test.sh as the `install-plan` step.
set -Eeuo pipefail
trap 'echo "check-install-plan: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INSTALL="$ROOT/scripts/install-test-deps.sh"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fail() {
    echo "check-install-plan: FAILED: $*" >&2
    exit 1
}

# An empty dpkg database, as on a machine with nothing installed.
mkdir -p "$TMP/dpkg/updates" "$TMP/cache"
: >"$TMP/dpkg/status"

plan="$(EMBER_DPKG_ADMINDIR="$TMP/dpkg" EMBER_GUEST_CACHE="$TMP/cache" EMBER_APT_LISTS_EMPTY=1 \
    EMBER_TOOLS_MISSING=1 EMBER_OPENSTACK_VENV="$TMP/openstack-venv" "$INSTALL" --plan)" ||
    fail "--plan exited with $? on an empty machine"

# Every package of the script's PKGS list must be planned.
mapfile -t want < <(sed -n '/^PKGS=(/,/^)/p' "$INSTALL" | grep -v '^ *#' | sed '1d;$d' | tr ' ' '\n' | grep -v '^$')
((${#want[@]} > 20)) || fail "could not read the package list (${#want[@]} entries)"
for p in "${want[@]}"; do
    grep -qx "install $p" <<<"$plan" || fail "plan does not install $p:"$'\n'"$plan"
done
grep -qx "apt-update" <<<"$plan" || fail "plan does not update the apt lists"
grep -q "^guest-kernel " <<<"$plan" || fail "plan does not fetch the guest kernel"
for t in "rust-component clippy" "rust-component rustfmt" "cargo-install cargo-fuzz" \
    "openstack-venv $TMP/openstack-venv"; do
    grep -q "^$t" <<<"$plan" || fail "plan lacks '$t':"$'\n'"$plan"
done
n_install="$(grep -c '^install ' <<<"$plan")"
((n_install == ${#want[@]})) || fail "plan installs $n_install packages, the list has ${#want[@]}"
echo "check-install-plan: empty machine: apt-update, ${#want[@]} packages, guest kernel, rust components, cargo-fuzz, OpenStack client venv — ok"

# On this machine, after the deps step, nothing is left to do.
if [[ "${EMBER_SKIP_INSTALL:-0}" != 1 ]]; then
    now="$("$INSTALL" --plan)" || fail "--plan exited with $? on this machine"
    [[ -z "$now" ]] || fail "after the install, --plan still plans:"$'\n'"$now"
    echo "check-install-plan: this machine: nothing to do — ok"
fi
