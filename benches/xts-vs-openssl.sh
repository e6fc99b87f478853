#!/bin/sh
# XTS throughput per core: Ember's sector cipher (criterion bench `crypto/benches/xts.rs`)
# next to OpenSSL's `openssl speed -evp aes-256-xts` on the same machine.
# Usage: benches/xts-vs-openssl.sh   (from anywhere in the repository)
#
# Two like-for-like pairs: wall clock (criterion group `xts` vs `openssl speed -elapsed`)
# and CPU time (criterion group `xts-cpu`, thread CPU time, vs plain `openssl speed`, which
# divides by CPU user time). On a loaded machine only the CPU-time pair is meaningful.
set -eu
cd "$(dirname "$0")/.."
echo "== ember-crypto sector cipher (criterion, 1 MiB per call, one core) =="
echo "   xts/...: wall clock; xts-cpu/...: thread CPU time"
cargo bench -p ember-crypto --bench xts -- --warm-up-time 1 --measurement-time 3 2>/dev/null |
  awk '/^xts(-cpu)?\//{name=$1} /thrpt:/ && !/%/{printf "%-38s %s %s\n", name, $(NF-3), $(NF-2)}'
for mode in "-elapsed" ""; do
  echo
  if [ -n "$mode" ]; then
    echo "== openssl speed $mode -evp aes-256-xts (one core, wall clock) =="
  else
    echo "== openssl speed -evp aes-256-xts (one core, CPU user time) =="
  fi
  for b in 512 4096 16384; do
    # shellcheck disable=SC2086
    openssl speed $mode -seconds 2 -evp aes-256-xts -bytes "$b" 2>/dev/null | tail -1 |
      awk -v b="$b" '{v=$NF; sub(/k$/, "", v); printf "aes256-xts %5d-byte blocks: %.2f GB/s\n", b, v * 1000 / 1e9}'
  done
done
echo
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs (wall-clock numbers are only comparable on an idle machine)"
