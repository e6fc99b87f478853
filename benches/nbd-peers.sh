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
#     --tls              also run the TLS rows: each peer requires TLS with the same x509
#                        server certificate (Ember --tls-creds, nbdkit --tls=require
#                        --tls-certificates, qemu-nbd --tls-creds), fio over nbds+unix://
#     --tls-only         only the TLS rows (add --plain-too for Ember's plaintext rows,
#                        to compare its CPU per I/O with and without TLS)
#     --plain-too        with --tls-only: the plain rows as well
#     --emberd PATH      emberd binary (default: build it with cargo build --release)
#     --emberd-b PATH    a second emberd build, run as peer `ember-b` (A/B of two builds
#                        in one run; add ember-b to --peers or it is appended)
#     --out DIR          keep fio JSON and peer logs here (default: a fresh /tmp dir)
#
# Workloads (one connection, fio --ioengine=nbd):
#   randread  4 KiB random read,  QD32        randwrite  4 KiB random write, QD32
#   seqread   1 MiB sequential read, QD8      seqwrite   1 MiB sequential write, QD8
#
# Each row also gives the server's CPU time per I/O (utime+stime of the server process
# over the fio run, /proc/PID/stat, divided by the I/Os done in that time).
#
# TLS uses x509 (server certificate, made with certtool at start), not PSK: fio 3.33's
# nbd engine does not let libnbd read the local files a URI names (tls-psk-file=,
# tls-certificates=), so fio finds the CA in libnbd's default directory,
# $HOME/.pki/libnbd, with HOME pointed at the bench's work dir. The record layer (AES-GCM)
# is the same whatever authenticated the handshake.
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
TLS=0
EMBERD=
EMBERD_B=
OUT=

PLAIN_TOO=0
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
        --tls) TLS=1; shift ;;
        --tls-only) TLS=1; PLAIN=0; shift ;;
        --plain-too) PLAIN_TOO=1; shift ;;
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

((PLAIN_TOO)) && PLAIN=1
for t in fio nbdkit qemu-nbd qemu-img nbdinfo python3 certtool; do
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

TLS_DIR="$WORK/tls"
if ((TLS)); then
    log "creating a CA and a server certificate in $TLS_DIR (certtool)"
    mkdir -p "$TLS_DIR" "$WORK/home/.pki/libnbd"
    printf 'cn = Ember bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$WORK/ca.info"
    printf 'cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' >"$WORK/server.info"
    certtool --generate-privkey --outfile "$WORK/ca-key.pem" 2>/dev/null
    certtool --generate-self-signed --load-privkey "$WORK/ca-key.pem" --template "$WORK/ca.info" \
        --outfile "$TLS_DIR/ca-cert.pem" 2>/dev/null
    certtool --generate-privkey --outfile "$TLS_DIR/server-key.pem" 2>/dev/null
    certtool --generate-certificate --load-privkey "$TLS_DIR/server-key.pem" \
        --load-ca-certificate "$TLS_DIR/ca-cert.pem" --load-ca-privkey "$WORK/ca-key.pem" \
        --template "$WORK/server.info" --outfile "$TLS_DIR/server-cert.pem" 2>/dev/null
    cp "$TLS_DIR/ca-cert.pem" "$WORK/home/.pki/libnbd/"
    if ((!PLAIN)); then
        log "creating $SIZE plain backing file in $WORK"
        head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom >"$PLAIN_IMG"
    fi
fi

# uri MODE: the client URI (TLS modes: nbds).
uri() {
    if [[ "$1" == tls ]]; then echo "nbds+unix:///?socket=$SOCK"; else echo "nbd+unix:///?socket=$SOCK"; fi
}

# cpu_ticks: utime+stime of the server process (all its threads), in clock ticks.
cpu_ticks() {
    awk '{print $14 + $15}' "/proc/$PEER_PID/stat" 2>/dev/null || echo 0
}

# start_peer PEER MODE(plain|luks|tls): start a server on $SOCK; log to $OUT.
start_peer() {
    local peer="$1" mode="$2" log="$OUT/$1-$2.log"
    local -a cmd
    case "$peer/$mode" in
        ember/plain) cmd=("$EMBERD" export --file "$PLAIN_IMG" --nbd "unix:$SOCK") ;;
        ember/luks) cmd=("$EMBERD" export --file "$LUKS_IMG" --nbd "unix:$SOCK"
            --passphrase-file "$PASS_FILE") ;;
        ember/tls) cmd=("$EMBERD" export --file "$PLAIN_IMG" --nbd "unix:$SOCK"
            --tls-creds "$TLS_DIR") ;;
        ember-b/tls) cmd=("$EMBERD_B" export --file "$PLAIN_IMG" --nbd "unix:$SOCK"
            --tls-creds "$TLS_DIR") ;;
        nbdkit/tls) cmd=(nbdkit -f -U "$SOCK" --tls=require --tls-certificates="$TLS_DIR"
            file "$PLAIN_IMG") ;;
        qemu-nbd/tls) cmd=(qemu-nbd -f raw -k "$SOCK" -t --shared=8 --cache=none
            --aio=io_uring --object "tls-creds-x509,id=t0,dir=$TLS_DIR,endpoint=server"
            --tls-creds=t0 "$PLAIN_IMG") ;;
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
        if [[ -S "$SOCK" ]] && HOME="$WORK/home" nbdinfo --size "$(uri "$mode")" >/dev/null 2>&1; then
            return 0
        fi
        kill -0 "$PEER_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -5 "$log" >&2
    die "$peer ($mode) did not start serving on $SOCK (log: $log)"
}

run_fio() {
    local job="$1" json="$2" mode="$3" rw bs qd t0 c0
    case "$job" in
        randread) rw=randread bs=4k qd=32 ;;
        randwrite) rw=randwrite bs=4k qd=32 ;;
        seqread) rw=read bs=1M qd=8 ;;
        seqwrite) rw=write bs=1M qd=8 ;;
    esac
    t0=$(date +%s.%N)
    c0=$(cpu_ticks)
    HOME="$WORK/home" fio --name="$job" --ioengine=nbd --uri="$(uri "$mode")" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json --output="$json" >/dev/null 2>"$json.err" ||
        die "fio $job failed: $(cat "$json.err")"
    # Server CPU seconds and wall seconds over the run (ramp included in both).
    echo "$(($(cpu_ticks) - c0)) $(getconf CLK_TCK) $(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }')" >"$json.cpu"
}

MODES=()
((PLAIN)) && MODES+=(plain)
((LUKS)) && MODES+=(luks)
((TLS)) && MODES+=(tls)
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
                run_fio "$job" "$OUT/$mode-$peer-$job-r$round.json" "$mode"
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
