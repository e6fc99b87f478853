#!/usr/bin/env bash
# Install everything Ember's tests and benches need, on Debian 12 (bookworm), as root.
#
# Works from a machine that has nothing but a Rust toolchain, and is idempotent and fast on
# re-runs: when every package is already installed (and the QEMU packages agree on one
# version) no apt command runs at all.
#
#   scripts/install-test-deps.sh            # install what is missing
#   scripts/install-test-deps.sh --check    # only report what is missing (exit 1 if any)
#   scripts/install-test-deps.sh --plan     # print what an install would do, one action a
#                                           # line, change nothing, exit 0
#
# --plan prints lines of the form
#   apt-update
#   install PACKAGE             (one line per missing Debian package)
#   align-qemu VERSION          (QEMU packages to be brought to one version)
#   guest-kernel PACKAGE|unknown
#   rust-component NAME
#   cargo-install CRATE VERSION
#   openstack-venv PATH         (the OpenStack clients' virtualenv to be (re)built)
# The test command runs it against an empty package database (scripts/check-install-plan.sh)
# so that the fresh-machine path is exercised even on a machine that has everything.
#
# Environment:
#   EMBER_GUEST_CACHE     where the guest kernel .deb is kept (default /var/cache/ember-test;
#                         tests/guest/build.sh reads it from there)
#   EMBER_DPKG_ADMINDIR   dpkg database to read installed packages from (dpkg-query
#                         --admindir; default: the system's). For --plan tests.
#   EMBER_APT_LISTS_EMPTY=1  behave as if apt's package lists were empty (a fresh image)
#   EMBER_TOOLS_MISSING=1    behave as if no rustup component or cargo tool were installed
#   EMBER_OPENSTACK_VENV  the virtualenv of the OpenStack clients tests/openstack.rs runs
#                         (default /var/cache/ember-test/openstack-venv; outside the source
#                         tree), built with Debian's python3 from the pinned
#                         tests/openstack/requirements.txt
set -Eeuo pipefail

export DEBIAN_FRONTEND=noninteractive
MODE=install
case "${1:-}" in
    "") ;;
    --check) MODE=check ;;
    --plan) MODE=plan ;;
    *)
        echo "usage: install-test-deps.sh [--check|--plan]" >&2
        exit 2
        ;;
esac

log() { printf 'install-test-deps: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
# No silent exits: any command that fails under `set -e` names itself and its line.
trap 'rc=$?; log "error: line $LINENO: \`$BASH_COMMAND\` exited with status $rc"; exit $rc' ERR

# Debian packages the tests and benches call (grep tests/ for require_tool to extend this).
PKGS=(
    # NBD clients and peers
    nbdkit libnbd-bin python3-libnbd nbd-client
    # QEMU: guest tests (TCG), qemu-io/qemu-img/qemu-nbd/qemu-storage-daemon, LUKS driver
    qemu-system-x86 qemu-utils qemu-block-extra
    # load generator and profiler for benches
    fio linux-perf
    # LUKS interoperability
    cryptsetup-bin
    # TLS credentials for the NBD TLS tests (psktool, certtool)
    gnutls-bin
    # guest initramfs builder
    busybox-static cpio xz-utils kmod zstd
    # iSCSI backend tests (target + initiator tools)
    tgt libiscsi-bin
    # control-plane store tests (single MariaDB and a Galera cluster; rsync for the
    # Galera state transfer of control/tests/common/galera.rs)
    mariadb-server mariadb-client galera-4 rsync
    # metrics checks (promtool)
    prometheus
    # the test command's own checks, the OpenStack client virtualenv
    shellcheck git python3 python3-pip python3-venv
    # build and misc
    pkg-config libssl-dev gcc g++ make iproute2 procps util-linux e2fsprogs openssl curl ca-certificates
    # losetup (loop devices as host block LUNs in the block-device tests)
    mount
)
# QEMU packages must share one version (Debian's qemu-system-x86 conflicts with a newer
# qemu-utils from backports, which some images preinstall).
QEMU_PINNED=(qemu-utils qemu-block-extra)

APT_UPDATED=0
apt_update_once() {
    ((APT_UPDATED)) && return 0
    [[ $(id -u) -eq 0 ]] || die "apt-get update needs root"
    log "apt-get update"
    apt-get update -q || die "apt-get update failed (is the Debian mirror reachable?)"
    APT_UPDATED=1
}

# installed_version PKG: the installed version, or nothing. Never fails: a package that
# dpkg does not know is simply not installed (dpkg-query exits 1 for it).
installed_version() {
    local admindir=()
    [[ -n "${EMBER_DPKG_ADMINDIR:-}" ]] && admindir=(--admindir="$EMBER_DPKG_ADMINDIR")
    { dpkg-query "${admindir[@]}" -W -f='${Status} ${Version}\n' "$1" 2>/dev/null || true; } |
        awk '$1=="install" && $3=="installed" {print $4}'
}

missing=()
for p in "${PKGS[@]}"; do
    [[ -n "$(installed_version "$p")" ]] || missing+=("$p")
done
qemu_sys_v="$(installed_version qemu-system-x86)"
qemu_skew=0
if [[ -n "$qemu_sys_v" ]]; then
    for p in "${QEMU_PINNED[@]}"; do
        v="$(installed_version "$p")"
        if [[ -n "$v" && "$v" != "$qemu_sys_v" ]]; then
            log "$p $v differs from qemu-system-x86 $qemu_sys_v"
            qemu_skew=1
        fi
    done
fi

# Guest kernel for the QEMU tests: tests/guest/build.sh picks Debian's newest 6.1 cloud
# kernel with `apt-cache search` (so the package lists must be populated; a fresh image
# often ships without them) and takes its .deb from $EMBER_GUEST_CACHE, which this fills.
kernel_pkg() {
    [[ "${EMBER_APT_LISTS_EMPTY:-0}" == 1 ]] && return 0
    { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' 2>/dev/null || true; } |
        awk '{print $1}' | sort -V | tail -n 1
}
GUEST_CACHE="${EMBER_GUEST_CACHE:-/var/cache/ember-test}"
kernel_cached() { compgen -G "$GUEST_CACHE/${1}_*.deb" >/dev/null; }

# Rust components and cargo tools the test command uses.
TOOLS_MISSING="${EMBER_TOOLS_MISSING:-0}"
rust_missing=()
if command -v rustup >/dev/null; then
    have="$(rustup component list --installed 2>/dev/null || true)"
    [[ "$TOOLS_MISSING" == 1 ]] && have=""
    for c in clippy rustfmt; do
        grep -q "^$c" <<<"$have" || rust_missing+=("$c")
    done
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
    cargo clippy --version >/dev/null 2>&1 || die "cargo clippy missing and no rustup to add it"
    cargo fmt --version >/dev/null 2>&1 || die "cargo fmt missing and no rustup to add it"
fi

# cargo-fuzz drives the fuzz targets (scripts/fuzz.sh); pinned so runs are repeatable.
CARGO_TOOLS=("cargo-fuzz 0.13.2")
cargo_missing=()
for t in "${CARGO_TOOLS[@]}"; do
    name="${t% *}"
    ver="${t#* }"
    have_v="$({ "$name" --version 2>/dev/null || "$HOME/.cargo/bin/$name" --version 2>/dev/null || true; } | awk '{print $2}')"
    [[ "$TOOLS_MISSING" == 1 ]] && have_v=""
    [[ "$have_v" == "$ver" ]] || cargo_missing+=("$t")
done

# The OpenStack clients (python-cinderclient, -barbicanclient, -glanceclient,
# -openstackclient, keystoneauth1 and their dependencies, every version pinned) live in a
# virtualenv outside the source tree; a stamp file records which requirements built it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OS_REQS="$ROOT/tests/openstack/requirements.txt"
OS_VENV="${EMBER_OPENSTACK_VENV:-/var/cache/ember-test/openstack-venv}"
[[ -f "$OS_REQS" ]] || die "missing $OS_REQS"
os_reqs_sum="$(sha256sum "$OS_REQS" | awk '{print $1}')"
venv_ok() {
    [[ -x "$OS_VENV/bin/python" && -x "$OS_VENV/bin/openstack" ]] &&
        [[ "$(cat "$OS_VENV/.ember-requirements" 2>/dev/null || true)" == "$os_reqs_sum" ]]
}

if [[ "$MODE" == plan ]]; then
    kpkg="$(kernel_pkg)"
    if ((${#missing[@]})) || [[ -z "$kpkg" ]]; then echo "apt-update"; fi
    for p in "${missing[@]}"; do echo "install $p"; done
    ((qemu_skew)) && echo "align-qemu $qemu_sys_v"
    if [[ -z "$kpkg" ]]; then
        echo "guest-kernel unknown"
    elif ! kernel_cached "$kpkg"; then
        echo "guest-kernel $kpkg"
    fi
    for c in "${rust_missing[@]}"; do echo "rust-component $c"; done
    for t in "${cargo_missing[@]}"; do echo "cargo-install $t"; done
    venv_ok || echo "openstack-venv $OS_VENV"
    exit 0
fi

# ---- packages ---------------------------------------------------------------------------
if ((${#missing[@]} == 0 && qemu_skew == 0)); then
    log "all ${#PKGS[@]} packages present"
elif [[ "$MODE" == check ]]; then
    die "missing: ${missing[*]:-none}; qemu version skew: $qemu_skew"
else
    [[ $(id -u) -eq 0 ]] || die "missing packages (${missing[*]}): run me as root"
    log "installing: ${missing[*]:-(qemu version alignment)}"
    apt_update_once
    V="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
    [[ -n "$V" && "$V" != "(none)" ]] || die "no installable qemu-system-x86 candidate in apt"
    rest=()
    for p in "${PKGS[@]}"; do
        case " ${QEMU_PINNED[*]} qemu-system-x86 " in
            *" $p "*) ;;
            *) rest+=("$p") ;;
        esac
    done
    # Package scripts must not start services on their own (mariadb-server's postinst would
    # start MariaDB under a service manager this machine may not have): the test command
    # starts what it needs itself.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=1
    fi
    rc=0
    apt-get install -y -q --allow-downgrades -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold \
        "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" "${rest[@]}" || rc=$?
    ((made_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install failed with status $rc (see apt's output above)"
    # Check, rather than trust: every package must now be installed.
    still=()
    for p in "${PKGS[@]}"; do
        [[ -n "$(installed_version "$p")" ]] || still+=("$p")
    done
    ((${#still[@]} == 0)) || die "still not installed after apt-get: ${still[*]}"
fi

# ---- guest kernel -----------------------------------------------------------------------
if [[ -z "$(kernel_pkg)" ]]; then
    [[ "$MODE" == check ]] && die "apt lists have no linux-image-6.1.0-*-cloud-amd64 (apt-get update)"
    apt_update_once
fi
kpkg="$(kernel_pkg)"
[[ -n "$kpkg" ]] || die "no linux-image-6.1.0-*-cloud-amd64 package in the apt lists"
if ! kernel_cached "$kpkg"; then
    [[ "$MODE" == check ]] && die "guest kernel $kpkg not in $GUEST_CACHE"
    mkdir -p "$GUEST_CACHE"
    log "downloading $kpkg into $GUEST_CACHE"
    # apt-get download would drop privileges to _apt, which cannot write into a root dir.
    (cd "$GUEST_CACHE" && apt-get download -q -o APT::Sandbox::User=root "$kpkg") ||
        die "apt-get download $kpkg failed"
fi
log "guest kernel: $(compgen -G "$GUEST_CACHE/${kpkg}_*.deb" | head -1)"

# ---- Rust components --------------------------------------------------------------------
for c in "${rust_missing[@]}"; do
    [[ "$MODE" == check ]] && die "rust component $c missing"
    log "rustup component add $c"
    rustup component add "$c" || die "rustup component add $c failed"
done
for t in "${cargo_missing[@]}"; do
    [[ "$MODE" == check ]] && die "cargo tool missing: $t"
    log "cargo install ${t% *} --version ${t#* } --locked"
    cargo install --locked --quiet "${t% *}" --version "${t#* }" ||
        die "cargo install ${t% *} failed"
done
# ---- OpenStack clients' virtualenv --------------------------------------------------------
if venv_ok; then
    log "OpenStack clients: $OS_VENV"
else
    [[ "$MODE" == check ]] && die "the OpenStack client virtualenv $OS_VENV is missing or stale"
    log "building the OpenStack client virtualenv $OS_VENV (pinned: $OS_REQS)"
    rm -rf "$OS_VENV"
    mkdir -p "$(dirname "$OS_VENV")"
    /usr/bin/python3 -m venv "$OS_VENV" || die "python3 -m venv $OS_VENV failed"
    "$OS_VENV/bin/pip" install -q --disable-pip-version-check -r "$OS_REQS" ||
        die "pip install -r $OS_REQS failed (is PyPI reachable?)"
    for f in "$OS_VENV/bin/python" "$OS_VENV/bin/openstack"; do
        [[ -x "$f" ]] || die "$f missing after pip install"
    done
    printf '%s\n' "$os_reqs_sum" >"$OS_VENV/.ember-requirements"
fi
log "ok"
