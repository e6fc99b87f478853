#!/bin/sh
# XTS throughput per core: Ember's sector cipher (criterion bench `crypto/benches/xts.rs`)
# next to OpenSSL's `openssl speed -evp aes-256-xts` on the same machine.
# Usage: benches/xts-vs-openssl.sh   (from anywhere in the repository)
#
# Criterion measures wall-clock time. `openssl speed` divides by *CPU user time* by
# default, which flatters it on a loaded machine; its `-elapsed` (wall-clock) figures are
# the like-for-like comparison and are printed first.
set -eu
cd "$(dirname "$0")/.."
echo "== ember-crypto sector cipher (criterion, 1 MiB per call, one core, wall clock) =="
cargo bench -p ember-crypto --bench xts -- --warm-up-time 1 --measurement-time 3 2>/dev/null |
  awk '/^xts\//{name=$1} /thrpt:/{printf "%-34s %s %s\n", name, $(NF-3), $(NF-2)}'
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
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs (numbers are only comparable on an idle machine)"
