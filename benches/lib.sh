# shellcheck shell=bash
# Variables set here (options, OPT_SHIFT) are read by the bench that sources this file.
# shellcheck disable=SC2034
# Shell shared by the peer benches (nbd-peers.sh, iscsi-peers.sh), sourced after ROOT is
# set: common options and their defaults, tool checks, the emberd build, a random backing
# file, starting/stopping one server at a time, the fio runner, the interleaved rounds
# and the summary header. Each bench keeps what is its own: its peers' command lines, its
# extra options, and how it writes and summarises CPU samples.
#
# A bench defines `start_peer PEER MODE` (start the server, set PEER_PID, then
# `wait_serving`) and `run_fio JOB JSON MODE` (call `fio_job` between its CPU samples);
# `run_rounds MODE` drives them.

# Defaults of the options every peer bench has (the bench sets PEERS).
RUNTIME=10
RAMP=2
ROUNDS=3
SIZE=1G
DIR=/dev/shm
JOBS=randread,randwrite,seqread,seqwrite
EMBERD=
OUT=
PEER_PID=
# Stop grace in tenths of a second (SIGTERM, then SIGKILL).
STOP_TENTHS=50
# HOME for nbdinfo and fio (the TLS rows point it at their CA; see nbd-peers.sh).
BENCH_HOME="${HOME:-/root}"

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# The bench's header comment, as its --help.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# common_option ARGS...: take one of the common options (or --help); OPT_SHIFT is how
# many arguments it took. Anything else is an unknown option.
common_option() {
    OPT_SHIFT=2
    case "$1" in
        --runtime) RUNTIME="$2" ;;
        --ramp) RAMP="$2" ;;
        --rounds) ROUNDS="$2" ;;
        --size) SIZE="$2" ;;
        --dir) DIR="$2" ;;
        --peers) PEERS="$2" ;;
        --jobs) JOBS="$2" ;;
        --emberd) EMBERD="$2" ;;
        --out) OUT="$2" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
}

require_tools() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null || die "$t not found: run scripts/install-test-deps.sh"
    done
}

# split_lists: PEERS and JOBS into PEER_LIST and JOB_LIST; every job checked (the bench
# checks its peers).
split_lists() {
    local j
    IFS=, read -r -a PEER_LIST <<<"$PEERS"
    IFS=, read -r -a JOB_LIST <<<"$JOBS"
    for j in "${JOB_LIST[@]}"; do
        case "$j" in randread | randwrite | seqread | seqwrite) ;; *) die "unknown job $j" ;; esac
    done
}

# need_emberd: build emberd (release) if peer `ember` runs and --emberd was not given.
need_emberd() {
    if [[ " ${PEER_LIST[*]} " == *" ember "* && -z "$EMBERD" ]]; then
        log "building emberd (release)"
        (cd "$ROOT" && cargo build --release -q -p emberd) || die "cargo build failed"
        EMBERD="${CARGO_TARGET_DIR:-$ROOT/target}/release/emberd"
    fi
    [[ -z "$EMBERD" || -x "$EMBERD" ]] || die "$EMBERD is not executable"
}

# random_file PATH SIZE: a file of SIZE (1G, 512M, bytes) of random data.
random_file() {
    python3 - "$1" "$2" <<'EOF'
import os, sys
path, size = sys.argv[1], sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1].upper()] if size[-1].upper() in mult else int(size)
chunk = os.urandom(1 << 20)
with open(path, "wb") as f:
    for i in range(n >> 20):
        f.write(chunk)
EOF
}

# work_dirs NAME: WORK (the backing files, the socket $SOCK; a fresh dir in DIR) and OUT
# (results; a fresh dir in /tmp unless --out named one).
work_dirs() {
    WORK="$(mktemp -d "$DIR/ember-$1-bench.XXXXXX")"
    OUT="${OUT:-$(mktemp -d "/tmp/ember-$1-bench-results.XXXXXX")}"
    mkdir -p "$OUT"
    SOCK="$WORK/nbd.sock"
}

# stop_peer: the running server gets SIGTERM, STOP_TENTHS later SIGKILL; its socket goes.
stop_peer() {
    if [[ -n "$PEER_PID" ]]; then
        kill -TERM "$PEER_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < STOP_TENTHS; i++)); do
            kill -0 "$PEER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$PEER_PID" 2>/dev/null || true
        wait "$PEER_PID" 2>/dev/null || true
        PEER_PID=
    fi
    rm -f "$SOCK"
}

# launch LOG CMD...: start CMD in the background as the peer (PEER_PID), its command line
# and output in LOG.
launch() {
    local log="$1"
    shift
    echo "+ $*" >>"$log"
    "$@" </dev/null >>"$log" 2>&1 &
    PEER_PID=$!
}

# wait_serving URI LOG WHAT: wait (30 s) until the peer serves URI on $SOCK, or die.
wait_serving() {
    local uri="$1" log="$2" what="$3" i
    for ((i = 0; i < 300; i++)); do
        if [[ -S "$SOCK" ]] && HOME="$BENCH_HOME" nbdinfo --size "$uri" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$PEER_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$log" >&2
    die "$what did not start serving on $SOCK (log: $log)"
}

# ticks PID: CPU time (user + system) of a process and all its threads, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# fio_job JOB URI JSON: one fio run of a workload over one NBD connection:
#   randread  4 KiB random read,  QD32        randwrite  4 KiB random write, QD32
#   seqread   1 MiB sequential read, QD8      seqwrite   1 MiB sequential write, QD8
fio_job() {
    local job="$1" uri="$2" json="$3" rw bs qd
    case "$job" in
        randread) rw=randread bs=4k qd=32 ;;
        randwrite) rw=randwrite bs=4k qd=32 ;;
        seqread) rw=read bs=1M qd=8 ;;
        seqwrite) rw=write bs=1M qd=8 ;;
    esac
    HOME="$BENCH_HOME" fio --name="$job" --ioengine=nbd --uri="$uri" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$json" >/dev/null 2>"$json.err" ||
        die "fio $job failed: $(cat "$json.err")"
}

# run_rounds MODE [LABEL]: ROUNDS rounds; each starts every peer once (order rotated each
# round, so no peer always runs first or last) and runs every job against it into
# $OUT/MODE-PEER-JOB-rROUND.json. LABEL (e.g. the mode) goes into the progress lines.
run_rounds() {
    local mode="$1" label="${2:+$2 }" npeers=${#PEER_LIST[@]} round k peer job
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((k = 0; k < npeers; k++)); do
            peer="${PEER_LIST[$(((k + round - 1) % npeers))]}"
            start_peer "$peer" "$mode"
            for job in "${JOB_LIST[@]}"; do
                log "round $round/$ROUNDS $label$peer $job"
                run_fio "$job" "$OUT/$mode-$peer-$job-r$round.json" "$mode"
            done
            stop_peer
        done
    done
}

# summary_head LOAD_BEFORE ARGS...: the first lines of summary.txt (ARGS: the bench's).
summary_head() {
    local before="$1"
    shift
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) CPUs; runtime ${RUNTIME}s ramp ${RAMP}s; median of $ROUNDS rounds"
    echo "# load average before: $before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# command: $0 $*"
}
