#!/usr/bin/env python3
"""Capture real NBD clients' traffic as fuzz seeds (fuzz/corpus/nbd_*).

Usage: fuzz/capture_nbd_seeds.py EMBERD OUTDIR

Starts `EMBERD export` of a 1 MiB file on a Unix socket, puts a recording proxy in front
of it, runs real clients through the proxy (qemu-io, nbdinfo, nbdinfo --list/--map,
nbdcopy, nbdsh, fio's nbd engine), and writes, for every connection, the bytes the client
sent, split where the handshake ends:

  OUTDIR/nbd_handshake/CLIENT-N      1 control byte (0: admit every GO) + the client's
                                     handshake bytes (flags, options up to GO)
  OUTDIR/nbd_transmission/CLIENT-N   1 control byte (session bits, as the target reads
                                     them) + the client's bytes after the handshake
  OUTDIR/nbd_conn/CLIENT-N           1 control byte (bit 0: structured) + the same bytes

Transmission seeds are cut at a request boundary at 64 KiB, so that libFuzzer's inputs
stay small. Nothing is written into the source tree unless OUTDIR is there.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading

IHAVEOPT = b"IHAVEOPT"
OPT_EXPORT_NAME, OPT_ABORT, OPT_GO = 1, 2, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 8, 10
REQUEST_MAGIC = 0x25609513
CMD_WRITE = 1
MAX_SEED = 64 * 1024


def relay(src, dst, record):
    try:
        while True:
            b = src.recv(1 << 16)
            if not b:
                break
            if record is not None:
                record.append(b)
            dst.sendall(b)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class Proxy:
    def __init__(self, listen, upstream):
        self.upstream = upstream
        self.conns = []  # one list of byte chunks per connection
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(listen)
        self.sock.listen(64)
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.socket(socket.AF_UNIX)
            u.connect(self.upstream)
            rec = []
            with self.lock:
                self.conns.append(rec)
            threading.Thread(target=relay, args=(c, u, rec), daemon=True).start()
            threading.Thread(target=relay, args=(u, c, None), daemon=True).start()

    def take(self):
        with self.lock:
            out = [b"".join(r) for r in self.conns]
            self.conns = []
        return out


def split(stream):
    """(handshake bytes, transmission bytes, structured, meta) of one client stream."""
    pos = 4
    structured = meta = False
    while pos + 16 <= len(stream) and stream[pos:pos + 8] == IHAVEOPT:
        opt, ln = struct.unpack(">II", stream[pos + 8:pos + 16])
        pos += 16 + ln
        if opt == OPT_STRUCTURED_REPLY:
            structured = True
        elif opt == OPT_SET_META_CONTEXT:
            meta = True
        elif opt in (OPT_GO, OPT_EXPORT_NAME):
            return stream[:pos], stream[pos:], structured, meta
        elif opt == OPT_ABORT:
            break
    return stream[:pos], b"", structured, meta


def cut(tx):
    """The longest prefix of whole requests no longer than MAX_SEED."""
    pos = 0
    while pos + 28 <= len(tx):
        magic, _flags, cmd, _h, _off, ln = struct.unpack(">IHHQQI", tx[pos:pos + 28])
        if magic != REQUEST_MAGIC:
            break
        end = pos + 28 + (ln if cmd == CMD_WRITE else 0)
        if end > MAX_SEED or end > len(tx):
            break
        pos = end
    return tx[:pos]


def main():
    emberd, outdir = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp()
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    src = os.path.join(tmp, "src.img")
    with open(src, "wb") as f:
        f.write(bytes((i // 4096) % 251 for i in range(48 << 10)))
    up = os.path.join(tmp, "emberd.sock")
    px = os.path.join(tmp, "proxy.sock")
    d = subprocess.Popen([emberd, "export", "--file", img, "--nbd", "unix:" + up],
                         stderr=subprocess.DEVNULL)
    while not os.path.exists(up):
        threading.Event().wait(0.05)
    proxy = Proxy(px, up)
    uri = "nbd+unix:///?socket=" + px
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    clients = {
        "qemu-io": ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 8k",
                    "-c", "read -P 0xab 0 8k", "-c", "write -z 64k 64k",
                    "-c", "discard 128k 64k", "-c", "write -P 0x5a -f 192k 4k",
                    "-c", "flush", uri],
        "nbdinfo": ["nbdinfo", "--json", uri],
        "nbdinfo-list": ["nbdinfo", "--list", uri],
        "nbdinfo-map": ["nbdinfo", "--map", uri],
        "nbdcopy-in": ["nbdcopy", "--request-size=16384", src, uri],
        "nbdcopy-out": ["nbdcopy", "--request-size=16384", uri, os.path.join(tmp, "out.img")],
        "nbdsh": ["nbdsh", "-u", uri, "-c",
                  "h.set_strict_mode(0)\nh.pwrite(b'x' * 4096, 0, nbd.CMD_FLAG_FUA)\n"
                  "h.pread(4096, 0, nbd.CMD_FLAG_DF)\n"
                  "h.cache(4096, 0)\nh.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)\n"
                  "h.trim(4096, 8192)\nh.flush()\n"],
        "fio": ["fio", "--name=seed", "--ioengine=nbd", "--uri=" + uri,
                "--rw=randrw", "--bs=4k", "--size=1M", "--number_ios=16",
                "--iodepth=4", "--filename=seed"],
    }
    for name, cmd in clients.items():
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True)
        if r.returncode != 0:
            d.terminate()
            sys.exit(f"{name} failed: {r.stdout.decode()}{r.stderr.decode()}")
        # Let the proxy threads see the client's EOF.
        threading.Event().wait(0.3)
        for i, stream in enumerate(proxy.take()):
            hs, tx, structured, meta = split(stream)
            tag = f"{name}-{i}"
            for target, data in (
                ("nbd_handshake", bytes([0]) + hs),
                ("nbd_transmission", bytes([(2 if structured else 0) | (4 if meta else 0)]) + cut(tx)),
                ("nbd_conn", bytes([1 if structured else 0]) + cut(tx)),
            ):
                if target != "nbd_handshake" and not tx:
                    continue
                os.makedirs(os.path.join(outdir, target), exist_ok=True)
                with open(os.path.join(outdir, target, tag), "wb") as f:
                    f.write(data)
            print(f"{tag}: handshake {len(hs)} bytes, transmission {len(tx)} bytes")
    d.terminate()
    d.wait()


if __name__ == "__main__":
    main()
