#!/bin/sh
# Build Ember's tiny test guest into OUTDIR (once; a finished OUTDIR is reused):
#   OUTDIR/vmlinuz        Debian 6.1 cloud kernel
#   OUTDIR/base.cpio      initramfs: busybox-static, virtio/nbd modules, nbd-client, /init
# Tests append their own cpio holding /test.sh (see tests/guest/mod.rs); /init loads the
# virtio-blk modules, runs /test.sh and prints "EMBER-GUEST-EXIT rc=N" before powering off.
# Needs: dpkg-deb, cpio, busybox-static, nbd-client, and the kernel .deb in
# $EMBER_GUEST_CACHE (default /var/cache/ember-test, filled by scripts/install-test-deps.sh)
# or apt-get with the Debian archive reachable.
set -eu
OUT=${1:?usage: build.sh OUTDIR}
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/base.cpio" ]; then
    exit 0
fi
for tool in apt-get apt-cache dpkg-deb cpio; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing" >&2; exit 1; }
done
BUSYBOX=$(command -v busybox || true)
if [ -z "$BUSYBOX" ] || ! "$BUSYBOX" --list | grep -qx sh; then
    echo "build.sh: busybox-static is missing" >&2
    exit 1
fi
NBDCLIENT=$(command -v nbd-client || echo /usr/sbin/nbd-client)
[ -x "$NBDCLIENT" ] || { echo "build.sh: nbd-client is missing" >&2; exit 1; }

WORK=$(mktemp -d "${OUT%/}.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# Newest 6.1 cloud kernel the archive offers (signed image package).
PKG=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V | tail -n 1)
[ -n "$PKG" ] || { echo "build.sh: no linux-image-6.1.0-*-cloud-amd64 in apt (run apt-get update)" >&2; exit 1; }
# scripts/install-test-deps.sh pre-downloads it into $EMBER_GUEST_CACHE; else fetch it now.
CACHE=${EMBER_GUEST_CACHE:-/var/cache/ember-test}
DEB=$(find "$CACHE" -maxdepth 1 -name "${PKG}_*.deb" 2>/dev/null | head -n 1 || true)
if [ -z "$DEB" ]; then
    apt-get download -q -o APT::Sandbox::User=root "$PKG" >/dev/null
    DEB=$(find . -maxdepth 1 -name "${PKG}_*.deb" | head -n 1)
fi
dpkg-deb -x "$DEB" kroot
KVER=${PKG#linux-image-}
cp kroot/boot/vmlinuz-"$KVER" vmlinuz

mkdir -p root/bin root/sbin root/proc root/sys root/dev root/tmp root/lib/modules root/mnt root/etc
cp "$BUSYBOX" root/bin/busybox
MODDIR=kroot/lib/modules/$KVER/kernel
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         failover net_failover virtio_net nbd; do
    f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n 1)
    [ -n "$f" ] || { echo "build.sh: module $m not found in $PKG" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > root/lib/modules/$m.ko ;;
        *.zst) zstd -qdc "$f" > root/lib/modules/$m.ko ;;
        *) cp "$f" root/lib/modules/$m.ko ;;
    esac
done

# nbd-client and the libraries it links.
cp "$NBDCLIENT" root/sbin/nbd-client
for lib in $(ldd "$NBDCLIENT" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}'); do
    mkdir -p root"$(dirname "$lib")"
    cp -L "$lib" root"$lib"
done
# The dynamic loader under its canonical path too.
if [ -e /lib64/ld-linux-x86-64.so.2 ]; then
    mkdir -p root/lib64
    cp -L /lib64/ld-linux-x86-64.so.2 root/lib64/
fi

cat > root/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "EMBER-GUEST: insmod $m failed"
done
echo "EMBER-GUEST-READY"
if [ -f /test.sh ]; then
    sh /test.sh
    rc=$?
else
    rc=127
fi
echo "EMBER-GUEST-EXIT rc=$rc"
sync
poweroff -f
INIT
chmod +x root/init
(cd root && find . | cpio -o -H newc --quiet) > base.cpio

mkdir -p "$OUT"
mv vmlinuz base.cpio "$OUT"/
echo "$PKG" > "$OUT/kernel-package"
