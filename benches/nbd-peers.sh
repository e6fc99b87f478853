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

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
PEERS=ember,nbdkit,qemu-nbd
PLAIN=1
LUKS=0
TLS=0
EMBERD_B=

PLAIN_TOO=0
ORIG_ARGS=("$@")
while (($#)); do
    case "$1" in
        --luks) LUKS=1; shift ;;
        --luks-only) LUKS=1; PLAIN=0; shift ;;
        --tls) TLS=1; shift ;;
        --tls-only) TLS=1; PLAIN=0; shift ;;
        --plain-too) PLAIN_TOO=1; shift ;;
        --emberd-b) EMBERD_B="$2"; shift 2 ;;
        *) common_option "$@"; shift "$OPT_SHIFT" ;;
    esac
done

((PLAIN_TOO)) && PLAIN=1
require_tools fio nbdkit qemu-nbd qemu-img nbdinfo python3 certtool
if [[ -n "$EMBERD_B" && ",$PEERS," != *",ember-b,"* ]]; then
    PEERS="$PEERS,ember-b"
fi
split_lists
for p in "${PEER_LIST[@]}"; do
    case "$p" in ember | nbdkit | qemu-nbd) ;; ember-b) [[ -x "$EMBERD_B" ]] || die "ember-b needs --emberd-b" ;; *) die "unknown peer $p" ;; esac
done
need_emberd

work_dirs nbd
# fio's nbd engine finds the TLS rows' CA under $HOME (see above).
BENCH_HOME="$WORK/home"

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
    random_file "$PLAIN_IMG" "$SIZE"
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
        random_file "$PLAIN_IMG" "$SIZE"
    fi
fi

# uri MODE: the client URI (TLS modes: nbds).
uri() {
    if [[ "$1" == tls ]]; then echo "nbds+unix:///?socket=$SOCK"; else echo "nbd+unix:///?socket=$SOCK"; fi
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
    launch "$log" "${cmd[@]}"
    wait_serving "$(uri "$mode")" "$log" "$peer ($mode)"
}

# run_fio JOB JSON MODE: one fio run, with the server's CPU ticks, the ticks per second and
# the wall seconds of the run (ramp included in both) in JSON.cpu.
run_fio() {
    local job="$1" json="$2" mode="$3" t0 c0
    t0=$(date +%s.%N)
    c0=$(ticks "$PEER_PID")
    fio_job "$job" "$(uri "$mode")" "$json"
    echo "$(($(ticks "$PEER_PID") - c0)) $(getconf CLK_TCK) $(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { print a - b }')" >"$json.cpu"
}

MODES=()
((PLAIN)) && MODES+=(plain)
((LUKS)) && MODES+=(luks)
((TLS)) && MODES+=(tls)
npeers=${#PEER_LIST[@]}
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "results in $OUT; ${#MODES[@]} mode(s) x $ROUNDS rounds x $npeers peers x ${#JOB_LIST[@]} jobs x $((RUNTIME + RAMP)) s"
for mode in "${MODES[@]}"; do
    run_rounds "$mode" "$mode"
done

{
    summary_head "$LOAD_BEFORE" "${ORIG_ARGS[@]}"
    echo "# settings: --runtime $RUNTIME --ramp $RAMP --rounds $ROUNDS --size $SIZE --peers $PEERS --jobs $JOBS"
} >"$OUT/summary.txt"
python3 "$ROOT/benches/fio_summary.py" "$OUT" "$PEERS" "$JOBS" "${MODES[*]}" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
log "fio JSON and peer logs kept in $OUT"
