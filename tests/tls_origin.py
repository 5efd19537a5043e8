#!/usr/bin/env python3
"""A small HTTPS origin for tests/tls_backends.rs: Python's ssl (OpenSSL)
on 127.0.0.1, a kernel-picked port printed on the first line of stdout.

Each connection gets an id; the events file gets one line per event:
  conn ID sni=NAME reused=True|False version=TLSv1.3
  req ID METHOD PATH user-agent=UA
Every request is answered 200 with the body "conn=ID sni=NAME path=PATH"
(GET /big/N: N bytes of the pattern 0..255 repeated),
keep-alive, unless --mode says otherwise:
  ok          as above
  garbage     bytes that are not a TLS record, written under TLS, then close
  close_head  half a response head, then close (TLS close, then FIN)
  close_body  a head announcing 1000 bytes, 10 of them, then close
A request with "Upgrade: websocket" gets a 101, then the bytes it sends
are echoed back.
"""

import argparse
import os
import socket
import ssl
import sys
import threading

args = argparse.ArgumentParser()
args.add_argument("--cert", required=True)
args.add_argument("--key", required=True)
args.add_argument("--events", required=True)
args.add_argument("--mode", default="ok")
opts = args.parse_args()

lock = threading.Lock()
events = open(opts.events, "a", buffering=1)


def event(line):
    with lock:
        events.write(line + "\n")
        events.flush()


ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(opts.cert, opts.key)


def sni(sock, name, _ctx):
    # The handshake's server name, kept on the socket it is for.
    sock.pitcher_sni = name


ctx.sni_callback = sni


def read_head(s, buf):
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), rest


def serve(raw, conn_id):
    try:
        s = ctx.wrap_socket(raw, server_side=True)
    except (ssl.SSLError, OSError) as e:
        event(f"handshake_failed {conn_id} {e}")
        raw.close()
        return
    name = getattr(s, "pitcher_sni", None)
    event(f"conn {conn_id} sni={name} reused={s.session_reused} version={s.version()}")
    buf = b""
    try:
        while True:
            head, buf = read_head(s, buf)
            if head is None:
                break
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            fields = {}
            for l in lines[1:]:
                k, _, v = l.partition(":")
                fields[k.strip().lower()] = v.strip()
            n = int(fields.get("content-length", "0"))
            while len(buf) < n:
                chunk = s.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = buf[n:]
            event(f"req {conn_id} {method} {path} user-agent={fields.get('user-agent', '')}")
            if fields.get("upgrade", "").lower() == "websocket":
                s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                if buf:
                    s.sendall(buf)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return
                    s.sendall(chunk)
            if opts.mode == "garbage":
                os.write(s.fileno(), b"\x17\x03\x03\x00\x20" + b"not a record of this session!!!!")
                return
            if opts.mode == "close_head":
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
                return
            if opts.mode == "close_body":
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                return
            if path.startswith("/big/"):
                # N bytes of a repeating pattern (a body large enough for
                # the proxy's splice path, which must not take TLS bytes).
                n_big = int(path[len("/big/"):])
                pattern = bytes(range(256)) * 256
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n_big)
                left = n_big
                while left > 0:
                    piece = pattern[: min(left, len(pattern))]
                    s.sendall(piece)
                    left -= len(piece)
                continue
            body = f"conn={conn_id} sni={name} path={path}".encode()
            s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    except (ssl.SSLError, OSError) as e:
        event(f"error {conn_id} {e}")
    finally:
        try:
            s.close()
        except OSError:
            pass


def main():
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    print(ls.getsockname()[1], flush=True)
    n = 0
    while True:
        raw, _ = ls.accept()
        n += 1
        threading.Thread(target=serve, args=(raw, n), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
