#!/usr/bin/env python3
"""Logging TCP proxy used to capture iSCSI sessions as test vectors.

Usage: capture.py LISTEN_PORT TARGET_PORT OUT_DIR [CONNECTIONS]

Accepts CONNECTIONS (default 1) connections on 127.0.0.1:LISTEN_PORT, forwards each to
127.0.0.1:TARGET_PORT and writes the bytes of connection N as they went:
OUT_DIR/N-initiator.bin (initiator to target) and OUT_DIR/N-target.bin (target to
initiator). Exits when the last connection closes. Only loopback addresses are used.
"""
import os
import socket
import sys
import threading


def pump(src, dst, log):
    with open(log, "wb") as f:
        while True:
            try:
                b = src.recv(65536)
            except OSError:
                b = b""
            if not b:
                break
            f.write(b)
            try:
                dst.sendall(b)
            except OSError:
                break
    for s in (dst, src):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    listen_port, target_port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    os.makedirs(out, exist_ok=True)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", listen_port))
    ls.listen(4)
    threads = []
    for n in range(count):
        c, _ = ls.accept()
        t = socket.create_connection(("127.0.0.1", target_port))
        for s in (c, t):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a = threading.Thread(target=pump, args=(c, t, f"{out}/{n}-initiator.bin"))
        b = threading.Thread(target=pump, args=(t, c, f"{out}/{n}-target.bin"))
        a.start()
        b.start()
        threads += [a, b]
    for th in threads:
        th.join()


if __name__ == "__main__":
    main()
