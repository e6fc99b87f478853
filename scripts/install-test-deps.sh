#!/usr/bin/env bash
# Install everything Ember's tests and benches need, on Debian 12 (bookworm), as root.
#
# Idempotent and fast on re-runs: when every package is already installed (and the QEMU
# packages agree on one version) no apt command runs at all.
#
#   scripts/install-test-deps.sh            # install what is missing
#   scripts/install-test-deps.sh --check    # only report what is missing (exit 1 if any)
#
# Environment:
#   EMBER_GUEST_CACHE  where the guest kernel .deb is kept (default /var/cache/ember-test;
#                      tests/guest/build.sh reads it from there)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CHECK_ONLY=0
[[ "${1:-}" == "--check" ]] && CHECK_ONLY=1

log() { printf 'install-test-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

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
    # guest initramfs builder
    busybox-static cpio xz-utils kmod zstd
    # iSCSI backend tests (target + initiator tools)
    tgt libiscsi-bin
    # control-plane store tests
    mariadb-server mariadb-client
    # build and misc
    pkg-config gcc make iproute2 procps util-linux e2fsprogs openssl curl ca-certificates
    python3 python3-pip
)
# QEMU packages must share one version (Debian's qemu-system-x86 conflicts with a newer
# qemu-utils from backports).
QEMU_PINNED=(qemu-utils qemu-block-extra)

APT_UPDATED=0
apt_update_once() {
    ((APT_UPDATED)) && return 0
    [[ $(id -u) -eq 0 ]] || die "apt-get update needs root"
    apt-get update -q
    APT_UPDATED=1
}

installed_version() {
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null |
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

if ((${#missing[@]} == 0 && qemu_skew == 0)); then
    log "all ${#PKGS[@]} packages present"
elif ((CHECK_ONLY)); then
    die "missing: ${missing[*]:-none}; qemu version skew: $qemu_skew"
else
    [[ $(id -u) -eq 0 ]] || die "missing packages (${missing[*]}): run me as root"
    log "installing: ${missing[*]:-(qemu version alignment)}"
    apt_update_once
    V="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
    [[ -n "$V" && "$V" != "(none)" ]] || die "no installable qemu-system-x86 candidate"
    rest=()
    for p in "${PKGS[@]}"; do
        case " ${QEMU_PINNED[*]} qemu-system-x86 " in
            *" $p "*) ;;
            *) rest+=("$p") ;;
        esac
    done
    apt-get install -y -q --allow-downgrades \
        "qemu-system-x86=$V" "qemu-utils=$V" "qemu-block-extra=$V" "${rest[@]}"
fi

# Guest kernel for the QEMU tests: tests/guest/build.sh picks Debian's newest 6.1 cloud
# kernel with `apt-cache search` (so the package lists must be populated; a fresh container
# image often ships without them) and takes its .deb from $EMBER_GUEST_CACHE, which this
# fills (else it runs `apt-get download` itself).
kernel_pkg() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' |
        awk '{print $1}' | sort -V | tail -n 1
}
if [[ -z "$(kernel_pkg)" ]]; then
    ((CHECK_ONLY)) && die "apt lists have no linux-image-6.1.0-*-cloud-amd64 (apt-get update)"
    apt_update_once
fi
kpkg="$(kernel_pkg)"
[[ -n "$kpkg" ]] || die "no linux-image-6.1.0-*-cloud-amd64 package in the apt lists"
GUEST_CACHE="${EMBER_GUEST_CACHE:-/var/cache/ember-test}"
if ! compgen -G "$GUEST_CACHE/${kpkg}_*.deb" >/dev/null; then
    ((CHECK_ONLY)) && die "guest kernel $kpkg not in $GUEST_CACHE"
    mkdir -p "$GUEST_CACHE"
    log "downloading $kpkg into $GUEST_CACHE"
    # apt-get download would drop privileges to _apt, which cannot write into a root dir.
    (cd "$GUEST_CACHE" && apt-get download -q -o APT::Sandbox::User=root "$kpkg")
fi
log "guest kernel: $(compgen -G "$GUEST_CACHE/${kpkg}_*.deb" | head -1)"

# Rust components used by the test command.
if command -v rustup >/dev/null; then
    have="$(rustup component list --installed 2>/dev/null || true)"
    for c in clippy rustfmt; do
        if ! grep -q "^$c" <<<"$have"; then
            ((CHECK_ONLY)) && die "rust component $c missing"
            log "rustup component add $c"
            rustup component add "$c"
        fi
    done
else
    command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs)"
    cargo clippy --version >/dev/null 2>&1 || die "cargo clippy missing"
    cargo fmt --version >/dev/null 2>&1 || die "cargo fmt missing"
fi
log "ok"
