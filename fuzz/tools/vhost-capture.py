#!/usr/bin/env python3
"""Seed the vhost fuzz corpora from a real QEMU guest.

A logging proxy between a vhost-user frontend (QEMU) and emberd:

    emberd export --file disk.img --vhost-user /tmp/cap/emberd.sock &
    fuzz/tools/vhost-capture.py /tmp/cap/proxy.sock /tmp/cap/emberd.sock OUTDIR &
    qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/cap/proxy.sock \\
        -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...

It forwards every message both ways (fds included) and writes
- OUTDIR/vhost_user_messages/qemu-connect: the frontend's messages in the input format
  of fuzz_targets/vhost_user_messages.rs, rewritten to fit that target's 1 MiB memfd
  (one region of 1 MiB, the rings moved to 0/0x4000/0x5000 of it);
- OUTDIR/virtio_blk_queue/qemu-NNN: each batch of chains the guest made available (seen
  by polling the avail ring), in the input format of fuzz_targets/virtio_blk_queue.rs:
  the chain's descriptors at their own indexes, indirect tables and request headers
  copied into the 64 KiB image, data buffers moved into the target's zero data region.

A throwaway capture tool: run it by hand when the corpora need refreshing.
"""

import array
import mmap
import os
import socket
import struct
import sys
import threading
import time

GET_FEATURES, SET_FEATURES, SET_MEM_TABLE = 1, 2, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 8, 9, 10
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
SET_BACKEND_REQ_FD, SET_INFLIGHT_FD, ADD_MEM_REG = 21, 32, 37
F_EVENT_IDX, F_INDIRECT = 1 << 29, 1 << 28
IMAGE, DATA_AT, DATA_LEN = 64 << 10, 1 << 20, 16 << 20
MAX_QUEUE_SEEDS = 60

lock = threading.Lock()
regions = []  # (gpa, size, uaddr, mmap)
vrings = {}  # index -> dict(num, desc, avail, used)
features = [0]
messages = []  # (kind, bytes)


def recv_msg(sock):
    fds = array.array("i")
    data, anc, _, _ = sock.recvmsg(12, socket.CMSG_LEN(16 * fds.itemsize))
    if not data:
        return None
    while len(data) < 12:
        more = sock.recv(12 - len(data))
        if not more:
            return None
        data += more
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    size = struct.unpack_from("<I", data, 8)[0]
    payload = b""
    while len(payload) < size:
        more = sock.recv(size - len(payload))
        if not more:
            return None
        payload += more
    return data, payload, list(fds)


def send_msg(sock, hdr, payload, fds):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([hdr + payload], anc)


def gpa_of(ua):
    for gpa, size, uaddr, _ in regions:
        if uaddr <= ua < uaddr + size:
            return gpa + ua - uaddr
    return None


def read(gpa, n):
    for rg, size, _, m in regions:
        if rg <= gpa and gpa + n <= rg + size:
            return m[gpa - rg : gpa - rg + n]
    return None


def record(code, hdr, payload, fds):
    """Rewrite a frontend message for the fuzz target and keep it."""
    kind = 0
    if code == SET_MEM_TABLE:
        payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20, 0x7F0000000000, 0)
        hdr = hdr[:8] + struct.pack("<I", len(payload))
        kind = 2
    elif code == ADD_MEM_REG:
        payload = struct.pack("<QQQQQ", 0, 0, 1 << 20, 0x7F0000000000, 0)
        hdr = hdr[:8] + struct.pack("<I", len(payload))
        kind = 2
    elif code == SET_VRING_ADDR:
        idx, flags = struct.unpack_from("<II", payload, 0)
        ua = 0x7F0000000000
        payload = struct.pack("<IIQQQQ", idx, flags, ua, ua + 0x5000, ua + 0x4000, 0)
    elif code in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
        kind = 1 if fds else 0
    elif code == SET_INFLIGHT_FD:
        kind = 2
    elif code == SET_BACKEND_REQ_FD:
        kind = 6
    elif fds:
        kind = 1
    messages.append(bytes([kind]) + hdr + payload)


def on_frontend_msg(code, payload, fds):
    if code == SET_FEATURES:
        features[0] = struct.unpack_from("<Q", payload, 0)[0]
    elif code == SET_MEM_TABLE:
        n = struct.unpack_from("<I", payload, 0)[0]
        with lock:
            regions.clear()
            for i in range(n):
                gpa, size, ua, off = struct.unpack_from("<QQQQ", payload, 8 + 32 * i)
                m = mmap.mmap(fds[i], size, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
                regions.append((gpa, size, ua, m))
    elif code == ADD_MEM_REG:
        gpa, size, ua, off = struct.unpack_from("<QQQQ", payload, 8)
        m = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)
        with lock:
            regions.append((gpa, size, ua, m))
    elif code == SET_VRING_NUM:
        idx, num = struct.unpack_from("<II", payload, 0)
        vrings.setdefault(idx, {})["num"] = num
    elif code == SET_VRING_ADDR:
        idx, _flags, desc, used, avail, _log = struct.unpack_from("<IIQQQQ", payload, 0)
        v = vrings.setdefault(idx, {})
        v.update(desc=gpa_of(desc), used=gpa_of(used), avail=gpa_of(avail))
    elif code == SET_VRING_BASE:
        idx, num = struct.unpack_from("<II", payload, 0)
        vrings.setdefault(idx, {})["seen"] = num


def forward(src, dst, frontend):
    while True:
        m = recv_msg(src)
        if m is None:
            dst.shutdown(socket.SHUT_WR)
            return
        hdr, payload, fds = m
        code = struct.unpack_from("<I", hdr, 0)[0]
        if frontend:
            record(code, hdr, payload, fds)
            on_frontend_msg(code, payload, fds)
        send_msg(dst, hdr, payload, fds)
        for fd in fds:
            os.close(fd)


def walk(v, head):
    """The chain at `head` as [(table, index, addr, len, flags, next)] (None if bad)."""
    out, table, tlen, idx, ind = [], v["desc"], v["num"], head, False
    for _ in range(v["num"] + 1):
        if idx >= tlen:
            return None
        raw = read(table + 16 * idx, 16)
        if raw is None:
            return None
        addr, ln, fl, nx = struct.unpack("<QIHH", raw)
        out.append(("ind" if ind else "main", idx, addr, ln, fl, nx))
        if fl & 4 and not ind:
            table, tlen, idx, ind = addr, ln // 16, 0, True
            continue
        if not fl & 1:
            return out
        idx = nx
    return None


def queue_seed(v, base, heads, chains):
    """A virtio_blk_queue input holding `chains` (made available at `base`)."""
    size = v["num"]
    img = bytearray(IMAGE)
    # Past the used ring of a 128-entry queue (QEMU's default), to keep seeds short.
    small, small_end = 0x5800, 0x6000  # headers and status bytes
    tables, tables_end = 0x6000, IMAGE  # indirect tables
    data = 0  # offset in the data region
    for first, chain in ((c[0] if c[0][4] & 4 == 0 else c[1], c) for c in chains):
        ind_at = None
        for entry in chain:
            where, idx, addr, ln, fl, nx = entry
            if fl & 4:
                ind_at, tables = tables, tables + ln
                if tables > tables_end:
                    return None
                new_addr = ind_at
            elif entry is first and ln <= 512:
                raw = read(addr, ln) or b""
                new_addr, small = small, small + ((ln + 15) & ~15)
                img[new_addr : new_addr + len(raw)] = raw
            elif ln <= 16:
                new_addr, small = small, small + 16
            else:
                if data + ln > DATA_LEN:
                    data = 0
                new_addr, data = DATA_AT + data, data + ln
            if small > small_end:
                return None
            at = idx * 16 if where == "main" else ind_at + idx * 16
            if at + 16 > IMAGE:
                return None
            img[at : at + 16] = struct.pack("<QIHH", new_addr, ln, fl, nx)
    struct.pack_into("<HH", img, 0x4000, 0, (base + len(heads)) & 0xFFFF)
    for k, h in enumerate(heads):
        struct.pack_into("<H", img, 0x4000 + 4 + 2 * ((base + k) % size), h)
    struct.pack_into("<HH", img, 0x5000, 0, base & 0xFFFF)
    flags = (1 if features[0] & F_EVENT_IDX else 0) | (2 if features[0] & F_INDIRECT else 0)
    head = bytes([size.bit_length() - 1, flags]) + struct.pack("<H", base & 0xFFFF)
    head += bytes([0]) + struct.pack("<H", base & 0xFFFF) + bytes([0])
    return head + bytes(img)


def poll_rings(outdir):
    n = 0
    shapes = set()
    os.makedirs(os.path.join(outdir, "virtio_blk_queue"), exist_ok=True)
    while n < MAX_QUEUE_SEEDS:
        time.sleep(0.002)
        with lock:
            for v in list(vrings.values()):
                if not {"num", "desc", "avail"} <= v.keys() or v["avail"] is None:
                    continue
                raw = read(v["avail"] + 2, 2)
                if raw is None:
                    continue
                idx = struct.unpack("<H", raw)[0]
                seen = v.get("seen", 0)
                new = (idx - seen) & 0xFFFF
                if new == 0 or new > v["num"]:
                    v["seen"] = idx
                    continue
                heads, chains = [], []
                for k in range(new):
                    slot = (seen + k) % v["num"]
                    h = struct.unpack("<H", read(v["avail"] + 4 + 2 * slot, 2))[0]
                    c = walk(v, h)
                    if c is None:
                        break
                    heads.append(h)
                    chains.append(c)
                v["seen"] = idx
                if not heads:
                    continue
                shape = (v["num"], tuple(tuple((e[0], e[3] > 16, e[4]) for e in c) for c in chains),
                         tuple(read(c[-1][2], 1) is not None and bytes(read(c[0][2] if not c[0][4] & 4 else c[1][2], 4) or b"") for c in chains))
                if shape in shapes:
                    continue
                shapes.add(shape)
                seed = queue_seed(v, seen, heads, chains)
                if seed is not None:
                    seed = seed.rstrip(b"\0")
                    path = os.path.join(outdir, "virtio_blk_queue", "qemu-%03d" % n)
                    with open(path, "wb") as f:
                        f.write(seed)
                    n += 1


def main():
    listen_path, backend_path, outdir = sys.argv[1:4]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen_path)
    srv.listen(1)
    front, _ = srv.accept()
    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    back.connect(backend_path)
    threading.Thread(target=poll_rings, args=(outdir,), daemon=True).start()
    t = threading.Thread(target=forward, args=(back, front, False), daemon=True)
    t.start()
    try:
        forward(front, back, True)
    finally:
        os.makedirs(os.path.join(outdir, "vhost_user_messages"), exist_ok=True)
        with open(os.path.join(outdir, "vhost_user_messages", "qemu-connect"), "wb") as f:
            for m in messages[:64]:
                f.write(m)


if __name__ == "__main__":
    main()
