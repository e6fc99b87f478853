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
#     --peers LIST       comma list of ember,ember-2path,qemu-nbd (default: ember,qemu-nbd);
#                        ember-2path: Ember through both portals of the tgtd (multipath)
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

RUNTIME=10
RAMP=2
ROUNDS=3
SIZE=1G
DIR=/dev/shm
PEERS=ember,qemu-nbd
JOBS=randread,randwrite,seqread,seqwrite
DIGESTS=0
EMBERD=
OUT=

ORIG_ARGS=("$@")
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --runtime) RUNTIME="$2"; shift 2 ;;
        --ramp) RAMP="$2"; shift 2 ;;
        --rounds) ROUNDS="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --peers) PEERS="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --digests) DIGESTS=1; shift ;;
        --emberd) EMBERD="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for t in fio qemu-nbd nbdinfo python3 tgtd tgtadm; do
    command -v "$t" >/dev/null || die "$t not found: run scripts/install-test-deps.sh"
done
IFS=, read -r -a PEER_LIST <<<"$PEERS"
IFS=, read -r -a JOB_LIST <<<"$JOBS"
for p in "${PEER_LIST[@]}"; do
    case "$p" in ember | ember-2path | qemu-nbd) ;; *) die "unknown peer $p" ;; esac
done
for j in "${JOB_LIST[@]}"; do
    case "$j" in randread | randwrite | seqread | seqwrite) ;; *) die "unknown job $j" ;; esac
done

if [[ " ${PEER_LIST[*]} " == *" ember"* && -z "$EMBERD" ]]; then
    log "building emberd (release)"
    (cd "$ROOT" && cargo build --release -q -p emberd) || die "cargo build failed"
    EMBERD="${CARGO_TARGET_DIR:-$ROOT/target}/release/emberd"
fi
[[ -z "$EMBERD" || -x "$EMBERD" ]] || die "$EMBERD is not executable"

WORK="$(mktemp -d "$DIR/ember-iscsi-bench.XXXXXX")"
OUT="${OUT:-$(mktemp -d /tmp/ember-iscsi-bench-results.XXXXXX)}"
mkdir -p "$OUT"
SOCK="$WORK/nbd.sock"
LUN_IMG="$WORK/lun.img"
IQN=iqn.2026-01.org.ember.bench:lun
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CTL=$((PORT % 30000 + 1000))
PEER_PID=
TGTD_PID=

stop_peer() {
    if [[ -n "$PEER_PID" ]]; then
        kill -TERM "$PEER_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$PEER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$PEER_PID" 2>/dev/null || true
        wait "$PEER_PID" 2>/dev/null || true
        PEER_PID=
    fi
    rm -f "$SOCK"
}
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
python3 - "$LUN_IMG" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1].upper()] if size[-1].upper() in mult else int(size)
chunk = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(chunk)
EOF

log "starting tgtd on 127.0.0.1:$PORT and 127.0.0.2:$PORT (management socket $CTL)"
mkdir -p /var/run/tgtd
tgtd -f -C "$CTL" --iscsi "portal=127.0.0.1:$PORT,portal=127.0.0.2:$PORT" </dev/null >"$OUT/tgtd.log" 2>&1 &
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

start_peer() {
    local peer="$1" log="$OUT/$1.log"
    local -a cmd
    case "$peer" in
        ember) cmd=("$EMBERD" export --iscsi "iscsi://127.0.0.1:$PORT/$IQN/1$QUERY"
            --nbd "unix:$SOCK") ;;
        ember-2path) cmd=("$EMBERD" export
            --iscsi "iscsi://127.0.0.1:$PORT,127.0.0.2:$PORT/$IQN/1$QUERY" --nbd "unix:$SOCK") ;;
        # -t: stay up across connections; --shared=8: several clients.
        qemu-nbd) cmd=(qemu-nbd -k "$SOCK" -t --shared=8
            --image-opts "driver=iscsi,transport=tcp,portal=127.0.0.1:$PORT,target=$IQN,lun=1$QEMU_OPTS") ;;
    esac
    echo "+ ${cmd[*]}" >>"$log"
    "${cmd[@]}" </dev/null >>"$log" 2>&1 &
    PEER_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        if [[ -S "$SOCK" ]] && nbdinfo --size "nbd+unix:///?socket=$SOCK" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$PEER_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$log" >&2
    die "$peer did not start serving on $SOCK (log: $log)"
}

# CPU ticks (user + system) of a process and all its threads.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

run_fio() {
    local job="$1" json="$2" rw bs qd p0 t0
    case "$job" in
        randread) rw=randread bs=4k qd=32 ;;
        randwrite) rw=randwrite bs=4k qd=32 ;;
        seqread) rw=read bs=1M qd=8 ;;
        seqwrite) rw=write bs=1M qd=8 ;;
    esac
    p0="$(ticks "$PEER_PID")"
    t0="$(ticks "$TGTD_PID")"
    fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$json" >/dev/null 2>"$json.err" ||
        die "fio $job failed: $(cat "$json.err")"
    echo "$(($(ticks "$PEER_PID") - p0)) $(($(ticks "$TGTD_PID") - t0)) $(getconf CLK_TCK) $((RUNTIME + RAMP))" >"${json%.json}.cpu"
}

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
npeers=${#PEER_LIST[@]}
log "results in $OUT; $ROUNDS rounds x $npeers peers x ${#JOB_LIST[@]} jobs x $((RUNTIME + RAMP)) s"
for ((round = 1; round <= ROUNDS; round++)); do
    for ((k = 0; k < npeers; k++)); do
        peer="${PEER_LIST[$(((k + round - 1) % npeers))]}"
        start_peer "$peer"
        for job in "${JOB_LIST[@]}"; do
            log "round $round/$ROUNDS $peer $job"
            run_fio "$job" "$OUT/iscsi-$peer-$job-r$round.json"
        done
        stop_peer
    done
done

{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; runtime ${RUNTIME}s ramp ${RAMP}s; median of $ROUNDS rounds"
    echo "# load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# command: $0 ${ORIG_ARGS[*]}"
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
