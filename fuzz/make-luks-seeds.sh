#!/usr/bin/env bash
# Make the seeds of the LUKS fuzz targets from real headers: `cryptsetup luksFormat`
# (LUKS1 and LUKS2, pbkdf2 and argon2, several keyslots, 4096-byte sectors, a larger
# metadata area) and `qemu-img create -f luks`, with cheap KDFs (the targets cap KDF
# costs low so the fuzzer is not stuck in them) and trimmed to the header area (both
# header copies and the keyslot areas in use; the data area is left out). The keyslot
# the targets try opens with the passphrase "fuzz".
#
#   fuzz/make-luks-seeds.sh OUTDIR     # writes OUTDIR/{luks1_open,luks2_open,luks2_json}/*
#
# The committed seeds under fuzz/corpus/ were made with this (cryptsetup 2.6, QEMU 7.2).
set -Eeuo pipefail
trap 'echo "make-luks-seeds.sh: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR

OUT="${1:?usage: make-luks-seeds.sh OUTDIR}"
for t in cryptsetup qemu-img python3; do
    command -v "$t" >/dev/null || { echo "make-luks-seeds.sh: $t is missing" >&2; exit 1; }
done
mkdir -p "$OUT/luks1_open" "$OUT/luks2_open" "$OUT/luks2_json"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
printf fuzz >"$W/fuzz"
printf other >"$W/other"

cs() { cryptsetup --batch-mode "$@"; }
fast=(--pbkdf pbkdf2 --pbkdf-force-iterations 1000)

# name type size format-args... ; the first keyslot opens with "other" when the name ends
# in -2slots (and "fuzz" is added as the second), else with "fuzz".
make() {
    local name="$1" ty="$2" size="$3"
    shift 3
    local img="$W/$name.img" first="$W/fuzz"
    [[ "$name" == *-2slots ]] && first="$W/other"
    truncate -s "$size" "$img"
    cs luksFormat --type "$ty" "$@" --key-file "$first" "$img"
    if [[ "$name" == *-2slots ]]; then
        cs luksAddKey "${fast[@]}" --key-file "$first" "$img" "$W/fuzz"
    fi
    trim "$img" "$OUT/${ty}_open/$name"
}

# Keep the header area: LUKS1 up to the end of the last active keyslot's material,
# LUKS2 up to the end of the last keyslot area. LUKS2 JSON texts go to luks2_json too.
trim() {
    python3 - "$1" "$2" "$OUT/luks2_json" <<'PY'
import json, struct, sys
src, dst, jdir = sys.argv[1:4]
b = open(src, "rb").read()
if b[6:8] == b"\x00\x01":
    key_bytes = struct.unpack(">I", b[108:112])[0]
    end = 592
    for i in range(8):
        o = 208 + 48 * i
        active, _, off, stripes = struct.unpack(">II32xII", b[o:o + 48])
        if active == 0x00AC71F3:
            end = max(end, off * 512 + -(-key_bytes * stripes // 512) * 512)
else:
    hdr = struct.unpack(">Q", b[8:16])[0]
    text = b[4096:hdr].split(b"\0", 1)[0]
    j = json.loads(text)
    end = 2 * hdr
    for k in j["keyslots"].values():
        end = max(end, int(k["area"]["offset"]) + int(k["area"]["size"]))
    open(jdir + "/" + dst.rsplit("/", 1)[1] + ".json", "wb").write(text)
open(dst, "wb").write(b[:end])
PY
}

make cs-sha256-k256-2slots luks1 4M "${fast[@]}" --hash sha256 --key-size 256
make cs-sha1-k512 luks1 4M "${fast[@]}" --hash sha1 --key-size 512
make cs-sha512-k256 luks1 4M "${fast[@]}" --hash sha512 --key-size 256
make cs-pbkdf2-4k-k256-2slots luks2 20M "${fast[@]}" --sector-size 4096 --key-size 256
make cs-argon2id-k256 luks2 20M --pbkdf argon2id --pbkdf-memory 32 --pbkdf-parallel 1 \
    --pbkdf-force-iterations 4 --key-size 256
make cs-argon2i-k512-md32k luks2 20M --pbkdf argon2i --pbkdf-memory 64 --pbkdf-parallel 2 \
    --pbkdf-force-iterations 4 --key-size 512 --luks2-metadata-size 32k \
    --luks2-keyslots-size 2m --label fuzz-label --subsystem fuzz-sub --sector-size 2048

# QEMU's LUKS1 (its own layout: payload at 4040 sectors), 1 ms of PBKDF2.
qemu-img create -q -f luks --object "secret,id=s0,file=$W/fuzz" \
    -o key-secret=s0,iter-time=1 "$W/qemu.img" 1M
trim "$W/qemu.img" "$OUT/luks1_open/qemu-img"
ls -l "$OUT"/*/
