#!/usr/bin/env bash
# Ember serving an iSCSI LUN over NBD, side by side with qemu-nbd serving the same LUN
# through QEMU's libiscsi driver (qemu-block-extra), both against one tgtd on loopback,
# with fio's nbd engine as the client. See benches/README.md for recorded results.
#
#   benches/iscsi-peers.sh [options]
#     --runtime SECS     fio runtime per job (default 10; time_based, after --ramp)
#     --ramp SECS        fio ramp time per job (default 2)
#     --rounds N         rounds; each runs every peer once, order rotated (default 3)
#     --size SIZE        LUN size (default 1G; a file of random data)
#     --dir DIR          where the LUN's backing file lives (default /dev/shm)
#     --peers LIST       comma list of ember,qemu-nbd (default: both)
#     --jobs LIST        comma list of randread,randwrite,seqread,seqwrite (default: all)
#     --digests          CRC32C header and data digests (both initiators, tgtd allows them)
#     --emberd PATH      emberd binary (default: build it with cargo build --release)
#     --out DIR          keep fio JSON, CPU samples and logs here (default: a fresh /tmp dir)
#
# Workloads (one NBD connection, fio --ioengine=nbd):
#   randread  4 KiB random read,  QD32        randwrite  4 KiB random write, QD32
#   seqread   1 MiB sequential read, QD8      seqwrite   1 MiB sequential write, QD8
#
# CPU per I/O: the user+system CPU time of the initiator process (emberd or qemu-nbd)
# and of tgtd over each fio job (ramp included), divided by the I/Os of the job (its
# median rate times ramp+runtime), in microseconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
PEERS=ember,qemu-nbd
DIGESTS=0
STOP_TENTHS=100

ORIG_ARGS=("$@")
while (($#)); do
    case "$1" in
        --digests) DIGESTS=1; shift ;;
        *) common_option "$@"; shift "$OPT_SHIFT" ;;
    esac
done

require_tools fio qemu-nbd nbdinfo python3 tgtd tgtadm
split_lists
for p in "${PEER_LIST[@]}"; do
    case "$p" in ember | qemu-nbd) ;; *) die "unknown peer $p" ;; esac
done
need_emberd

work_dirs iscsi
LUN_IMG="$WORK/lun.img"
IQN=iqn.2026-01.org.ember.bench:lun
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CTL=$((PORT % 30000 + 1000))
TGTD_PID=

cleanup() {
    stop_peer
    if [[ -n "$TGTD_PID" ]]; then
        # tgtd only accepts `delete --mode system` once it has no targets.
        tgtadm -C "$CTL" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
        tgtadm -C "$CTL" --op delete --mode system >/dev/null 2>&1 || true
        sleep 0.5
        kill -KILL "$TGTD_PID" 2>/dev/null || true
        wait "$TGTD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "creating $SIZE LUN backing file in $WORK (random data)"
random_file "$LUN_IMG" "$SIZE"

log "starting tgtd on 127.0.0.1:$PORT (management socket $CTL)"
mkdir -p /var/run/tgtd
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT" </dev/null >"$OUT/tgtd.log" 2>&1 &
TGTD_PID=$!
for ((i = 0; i < 100; i++)); do
    tgtadm -C "$CTL" --op show --mode system >/dev/null 2>&1 && break
    sleep 0.1
done
adm() { tgtadm -C "$CTL" --lld iscsi "$@"; }
adm --op new --mode target --tid 1 -T "$IQN"
adm --op new --mode logicalunit --tid 1 --lun 1 -b "$LUN_IMG"
adm --op bind --mode target --tid 1 -I ALL
QUERY=
QEMU_OPTS=
if ((DIGESTS)); then
    adm --op update --mode target --tid 1 --name HeaderDigest --value CRC32C,None
    adm --op update --mode target --tid 1 --name DataDigest --value CRC32C,None
    QUERY="?header_digest=crc32c&data_digest=crc32c"
    QEMU_OPTS=",header-digest=crc32c"
fi
adm --op show --mode target >"$OUT/tgtd-target.txt"

# start_peer PEER: start a server on $SOCK; log to $OUT.
start_peer() {
    local peer="$1" log="$OUT/$1.log"
    local -a cmd
    case "$peer" in
        ember) cmd=("$EMBERD" export --iscsi "iscsi://127.0.0.1:$PORT/$IQN/1$QUERY"
            --nbd "unix:$SOCK") ;;
        # -t: stay up across connections; --shared=8: several clients.
        qemu-nbd) cmd=(qemu-nbd -k "$SOCK" -t --shared=8
            --image-opts "driver=iscsi,transport=tcp,portal=127.0.0.1:$PORT,target=$IQN,lun=1$QEMU_OPTS") ;;
    esac
    launch "$log" "${cmd[@]}"
    wait_serving "nbd+unix:///?socket=$SOCK" "$log" "$peer"
}

# run_fio JOB JSON: one fio run; the CPU ticks of the initiator and of tgtd, the ticks per
# second and the seconds of the run go into the .cpu file next to JSON.
run_fio() {
    local job="$1" json="$2" p0 t0
    p0="$(ticks "$PEER_PID")"
    t0="$(ticks "$TGTD_PID")"
    fio_job "$job" "nbd+unix:///?socket=$SOCK" "$json"
    echo "$(($(ticks "$PEER_PID") - p0)) $(($(ticks "$TGTD_PID") - t0)) $(getconf CLK_TCK) $((RUNTIME + RAMP))" >"${json%.json}.cpu"
}

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
npeers=${#PEER_LIST[@]}
log "results in $OUT; $ROUNDS rounds x $npeers peers x ${#JOB_LIST[@]} jobs x $((RUNTIME + RAMP)) s"
run_rounds iscsi

{
    summary_head "$LOAD_BEFORE" "${ORIG_ARGS[@]}"
    echo "# target: tgtd $(tgtd -V 2>/dev/null || true) on a $SIZE file in $DIR; digests: $DIGESTS"
} >"$OUT/summary.txt"
python3 "$ROOT/benches/fio_summary.py" "$OUT" "$PEERS" "$JOBS" "iscsi" >>"$OUT/summary.txt"
python3 - "$OUT" "$PEERS" "$JOBS" >>"$OUT/summary.txt" <<'EOF'
import glob, json, os, statistics, sys
out, peers, jobs = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
print()
print("CPU per I/O (µs, median of rounds): initiator process / tgtd")
print()
print("| workload | " + " | ".join(f"{p} initiator | {p} tgtd" for p in peers) + " |")
print("|---|" + "---|---|" * len(peers))
for job in jobs:
    row = [job]
    for p in peers:
        ini, tgt = [], []
        for js in sorted(glob.glob(os.path.join(out, f"iscsi-{p}-{job}-r*.json"))):
            text = open(js).read()
            d = json.loads(text[text.index("{"):])["jobs"][0]
            side = d["write"] if d["write"]["io_bytes"] > d["read"]["io_bytes"] else d["read"]
            a, b, hz, secs = (float(x) for x in open(js[:-5] + ".cpu").read().split())
            ios = side["iops"] * secs
            if ios > 0:
                ini.append(a / hz / ios * 1e6)
                tgt.append(b / hz / ios * 1e6)
        row += [f"{statistics.median(ini):.1f}" if ini else "-", f"{statistics.median(tgt):.1f}" if tgt else "-"]
    print("| " + " | ".join(row) + " |")
EOF
cat "$OUT/summary.txt"
log "fio JSON, CPU samples and logs kept in $OUT"
