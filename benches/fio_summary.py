#!/usr/bin/env python3
"""Summarise the fio JSON files benches/nbd-peers.sh leaves in its results dir.

usage: fio_summary.py OUT_DIR PEERS JOBS MODES
  PEERS, JOBS: comma lists (e.g. ember,nbdkit,qemu-nbd  randread,seqwrite)
  MODES: space list (plain luks tls)
Files are named MODE-PEER-JOB-rROUND.json (with MODE-PEER-JOB-rROUND.json.cpu: server CPU
ticks, ticks per second, wall seconds of the run). Prints a Markdown table of medians
(IOPS, MiB/s, Ember's ratio to each peer), the server's CPU µs per I/O (median), then
every round's MiB/s.
"""
import glob, json, os, statistics, sys

out, peers, jobs, modes = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(","), sys.argv[4].split()
DESC = {"randread": "4k randread QD32", "randwrite": "4k randwrite QD32",
        "seqread": "1M seq read QD8", "seqwrite": "1M seq write QD8"}

def sample(path):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document.
    doc = json.loads(text[text.index("{"):])
    job = doc["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20)

def cpu_per_io(path):
    """Server CPU µs per I/O of one run: CPU utilisation over the run / IOPS."""
    try:
        with open(path + ".cpu") as f:
            ticks, hz, wall = f.read().split()
    except (OSError, ValueError):
        return None
    iops = sample(path)[0]
    if iops <= 0 or float(wall) <= 0:
        return None
    return (int(ticks) / int(hz)) / float(wall) / iops * 1e6

rows = []
for mode in modes:
    for job in jobs:
        seq = job.startswith("seq")
        med = {}
        for peer in peers:
            s = [sample(p) for p in sorted(glob.glob(os.path.join(out, f"{mode}-{peer}-{job}-r*.json")))]
            if s:
                med[peer] = (statistics.median(x[0] for x in s), statistics.median(x[1] for x in s))
        rows.append((mode, job, seq, med))

# Ratios: each Ember build (ember, and ember-b when an A/B run has one) to every other peer.
embers = [p for p in ("ember", "ember-b") if p in peers]
others = [p for p in peers if p not in embers]
pairs = [(e, p) for e in embers for p in others] + ([("ember-b", "ember")] if len(embers) == 2 else [])
head = ["mode", "workload"]
for p in peers:
    head += [f"{p} IOPS", f"{p} MiB/s"]
head += [f"{e}/{p}" for e, p in pairs]
table = [head]
for mode, job, seq, med in rows:
    r = [mode, DESC[job]]
    for p in peers:
        if p in med:
            r += [f"{med[p][0]:,.0f}", f"{med[p][1]:,.1f}"]
        else:
            r += ["-", "-"]
    for e, p in pairs:
        if e in med and p in med and med[p][1] > 0:
            r.append(f"{med[e][1] / med[p][1]:.2f}x")
        else:
            r.append("-")
    table.append(r)
def show(table):
    w = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(table[0])) + " |")
    print("|" + "|".join("-" * (w[i] + 2) for i in range(len(table[0]))) + "|")
    for row in table[1:]:
        print("| " + " | ".join(c.rjust(w[i]) if i > 1 else c.ljust(w[i]) for i, c in enumerate(row)) + " |")

show(table)

# Server CPU per I/O (median of rounds), where recorded.
print()
print("Server CPU µs per I/O (median of rounds; lower is better):")
print()
cpu = [["mode", "workload"] + peers]
for mode, job, seq, med in rows:
    r = [mode, DESC[job]]
    for p in peers:
        s = [c for c in (cpu_per_io(f) for f in sorted(glob.glob(os.path.join(out, f"{mode}-{p}-{job}-r*.json")))) if c is not None]
        r.append(f"{statistics.median(s):,.1f}" if s else "-")
    cpu.append(r)
show(cpu)

# Every round's MiB/s, to show the spread behind each median.
print()
print("MiB/s of each round:")
print()
spread = [["mode", "workload"] + peers]
for mode, job, seq, med in rows:
    r = [mode, DESC[job]]
    for p in peers:
        s = [sample(f)[1] for f in sorted(glob.glob(os.path.join(out, f"{mode}-{p}-{job}-r*.json")))]
        r.append(" / ".join(f"{x:,.0f}" for x in s) or "-")
    spread.append(r)
show(spread)
