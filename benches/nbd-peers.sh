#!/usr/bin/env bash
# Ember's NBD server side by side with nbdkit and qemu-nbd, on one tmpfs file, with fio's
# nbd engine as the client. See benches/README.md for the method and recorded results.
#
#   benches/nbd-peers.sh [options]
#     --runtime SECS     fio runtime per job (default 10; time_based, after --ramp)
#     --ramp SECS        fio ramp time per job (default 2)
#     --rounds N         rounds; each runs every peer once, order rotated (default 3)
#     --size SIZE        backing file size (default 1G)
#     --dir DIR          where the backing file lives (default /dev/shm)
#     --peers LIST       comma list of ember,nbdkit,qemu-nbd (default: all three)
#     --jobs LIST        comma list of randread,randwrite,seqread,seqwrite (default: all)
#     --luks             also run the LUKS rows (Ember --passphrase-file, nbdkit luks
#                        filter, qemu-nbd luks driver) on a `qemu-img create -f luks` image
#     --luks-only        only the LUKS rows
#     --emberd PATH      emberd binary (default: build it with cargo build --release)
#     --emberd-b PATH    a second emberd build, run as peer `ember-b` (A/B of two builds
#                        in one run; add ember-b to --peers or it is appended)
#     --out DIR          keep fio JSON and peer logs here (default: a fresh /tmp dir)
#
# Workloads (one connection, fio --ioengine=nbd):
#   randread  4 KiB random read,  QD32        randwrite  4 KiB random write, QD32
#   seqread   1 MiB sequential read, QD8      seqwrite   1 MiB sequential write, QD8
set -euo pipefail

RUNTIME=10
RAMP=2
ROUNDS=3
SIZE=1G
DIR=/dev/shm
PEERS=ember,nbdkit,qemu-nbd
JOBS=randread,randwrite,seqread,seqwrite
PLAIN=1
LUKS=0
EMBERD=
EMBERD_B=
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
        --luks) LUKS=1; shift ;;
        --luks-only) LUKS=1; PLAIN=0; shift ;;
        --emberd) EMBERD="$2"; shift 2 ;;
        --emberd-b) EMBERD_B="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for t in fio nbdkit qemu-nbd qemu-img nbdinfo python3; do
    command -v "$t" >/dev/null || die "$t not found: run scripts/install-test-deps.sh"
done
if [[ -n "$EMBERD_B" && ",$PEERS," != *",ember-b,"* ]]; then
    PEERS="$PEERS,ember-b"
fi
IFS=, read -r -a PEER_LIST <<<"$PEERS"
IFS=, read -r -a JOB_LIST <<<"$JOBS"
for p in "${PEER_LIST[@]}"; do
    case "$p" in ember | nbdkit | qemu-nbd) ;; ember-b) [[ -x "$EMBERD_B" ]] || die "ember-b needs --emberd-b" ;; *) die "unknown peer $p" ;; esac
done
for j in "${JOB_LIST[@]}"; do
    case "$j" in randread | randwrite | seqread | seqwrite) ;; *) die "unknown job $j" ;; esac
done

if [[ " ${PEER_LIST[*]} " == *" ember "* && -z "$EMBERD" ]]; then
    log "building emberd (release)"
    (cd "$ROOT" && cargo build --release -q -p emberd) || die "cargo build failed"
    EMBERD="${CARGO_TARGET_DIR:-$ROOT/target}/release/emberd"
fi
[[ -z "$EMBERD" || -x "$EMBERD" ]] || die "$EMBERD is not executable"

WORK="$(mktemp -d "$DIR/ember-nbd-bench.XXXXXX")"
OUT="${OUT:-$(mktemp -d /tmp/ember-nbd-bench-results.XXXXXX)}"
mkdir -p "$OUT"
SOCK="$WORK/nbd.sock"
PEER_PID=

stop_peer() {
    if [[ -n "$PEER_PID" ]]; then
        kill -TERM "$PEER_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
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
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PLAIN_IMG="$WORK/plain.img"
LUKS_IMG="$WORK/luks.img"
PASS_FILE="$WORK/passphrase"

if ((PLAIN)); then
    log "creating $SIZE plain backing file in $WORK (random data)"
    python3 - "$PLAIN_IMG" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1].upper()] if size[-1].upper() in mult else int(size)
chunk = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(chunk)
EOF
fi
if ((LUKS)); then
    log "creating $SIZE LUKS image (qemu-img create -f luks, aes-xts-plain64, full preallocation)"
    printf 'ember-bench-passphrase' >"$PASS_FILE"
    chmod 600 "$PASS_FILE"
    qemu-img create -q -f luks --object "secret,id=sec0,file=$PASS_FILE" \
        -o key-secret=sec0,preallocation=full "$LUKS_IMG" "$SIZE" >/dev/null
fi

# start_peer PEER MODE(plain|luks): start a server on $SOCK; log to $OUT.
start_peer() {
    local peer="$1" mode="$2" log="$OUT/$1-$2.log"
    local -a cmd
    case "$peer/$mode" in
        ember/plain) cmd=("$EMBERD" export --file "$PLAIN_IMG" --nbd "unix:$SOCK") ;;
        ember/luks) cmd=("$EMBERD" export --file "$LUKS_IMG" --nbd "unix:$SOCK"
            --passphrase-file "$PASS_FILE") ;;
        ember-b/plain) cmd=("$EMBERD_B" export --file "$PLAIN_IMG" --nbd "unix:$SOCK") ;;
        ember-b/luks) cmd=("$EMBERD_B" export --file "$LUKS_IMG" --nbd "unix:$SOCK"
            --passphrase-file "$PASS_FILE") ;;
        nbdkit/plain) cmd=(nbdkit -f -U "$SOCK" file "$PLAIN_IMG") ;;
        nbdkit/luks) cmd=(nbdkit -f -U "$SOCK" --filter=luks file "$LUKS_IMG"
            "passphrase=+$PASS_FILE") ;;
        # -t: stay up across connections; --shared=8: several clients; cache=none +
        # aio=io_uring: qemu-nbd's fastest file path here (see benches/README.md).
        qemu-nbd/plain) cmd=(qemu-nbd -f raw -k "$SOCK" -t --shared=8 --cache=none
            --aio=io_uring "$PLAIN_IMG") ;;
        qemu-nbd/luks) cmd=(qemu-nbd -k "$SOCK" -t --shared=8 --cache=none --aio=io_uring
            --object "secret,id=sec0,file=$PASS_FILE"
            --image-opts "driver=luks,key-secret=sec0,file.driver=file,file.filename=$LUKS_IMG") ;;
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
    die "$peer ($mode) did not start serving on $SOCK (log: $log)"
}

run_fio() {
    local job="$1" json="$2" rw bs qd
    case "$job" in
        randread) rw=randread bs=4k qd=32 ;;
        randwrite) rw=randwrite bs=4k qd=32 ;;
        seqread) rw=read bs=1M qd=8 ;;
        seqwrite) rw=write bs=1M qd=8 ;;
    esac
    fio --name="$job" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$json" >/dev/null 2>"$json.err" ||
        die "fio $job failed: $(cat "$json.err")"
}

MODES=()
((PLAIN)) && MODES+=(plain)
((LUKS)) && MODES+=(luks)
npeers=${#PEER_LIST[@]}
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "results in $OUT; ${#MODES[@]} mode(s) x $ROUNDS rounds x $npeers peers x ${#JOB_LIST[@]} jobs x $((RUNTIME + RAMP)) s"
for mode in "${MODES[@]}"; do
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((k = 0; k < npeers; k++)); do
            # Rotate the order each round so no peer always runs first (or last).
            peer="${PEER_LIST[$(((k + round - 1) % npeers))]}"
            start_peer "$peer" "$mode"
            for job in "${JOB_LIST[@]}"; do
                log "round $round/$ROUNDS $mode $peer $job"
                run_fio "$job" "$OUT/$mode-$peer-$job-r$round.json"
            done
            stop_peer
        done
    done
done

{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; runtime ${RUNTIME}s ramp ${RAMP}s; median of $ROUNDS rounds"
    echo "# load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# command: $0 ${ORIG_ARGS[*]}"
    echo "# settings: --runtime $RUNTIME --ramp $RAMP --rounds $ROUNDS --size $SIZE --peers $PEERS --jobs $JOBS"
} >"$OUT/summary.txt"
python3 "$ROOT/benches/fio_summary.py" "$OUT" "$PEERS" "$JOBS" "${MODES[*]}" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
log "fio JSON and peer logs kept in $OUT"
