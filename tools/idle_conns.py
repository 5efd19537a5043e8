#!/usr/bin/env python3
"""tools/idle_conns.py PORT COUNT PID... -- RSS per idle keep-alive connection.

Opens COUNT client connections to 127.0.0.1:PORT one after the other; each
sends one keep-alive `GET /` and reads the whole response before the next
one opens (so the proxy needs a single backend connection, not one per
client), then stays open and idle. Prints, tab separated: the connections
held, the RSS (sum of VmRSS over the PIDs and their descendants, KiB)
before and after, and the growth per connection in bytes. Measured after
a warm-up of 100 connections (closed again), so first-use costs (pools,
code pages) are not charged to the idle ones. Needs COUNT + a few file
descriptors (ulimit -n).
"""
import os
import socket
import sys
import time


def tree(pids):
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], list(pids)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pids):
    total = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def one(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed before the response head")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response {head[:40]!r}")
    return s


def main():
    port, count, pids = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3:]]
    warm = [one(port) for _ in range(100)]
    for s in warm:
        s.close()
    time.sleep(1.0)
    before = rss_kib(pids)
    held = []
    try:
        for _ in range(count):
            held.append(one(port))
        # Let the proxy park what it parks once the connections go idle.
        time.sleep(1.5)
        after = rss_kib(pids)
    finally:
        for s in held:
            s.close()
    print(f"{len(held)}\t{before}\t{after}\t{(after - before) * 1024 / max(len(held), 1):.0f}")


if __name__ == "__main__":
    main()
