#!/usr/bin/env python3
"""A tiny HTTP/1.1 backend for demos and manual tests of Pitcher.

Answers every request with a short text body naming itself and the request,
for example ``hello from alpha: GET /some/path``, plus an ``X-Backend: NAME``
header. Content-Length is always set and connections are kept alive unless
the client asks otherwise, so a proxy can pool them.

    demo_backend.py --name alpha --port 9001
    demo_backend.py --name beta --unix /tmp/beta.sock

Standard library only (python3 >= 3.7).
"""

import argparse
import http.server
import os
import signal
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # persistent connections by default
    # Close a client connection idle this long (seconds), so abandoned
    # keep-alive connections do not pin threads forever.
    timeout = 300

    def _answer(self, send_body=True):
        # Drain a request body, if any, so the connection stays usable.
        received = 0
        length = self.headers.get("Content-Length")
        if length is not None:
            try:
                received = int(length)
            except ValueError:
                self.send_error(400, "bad Content-Length")
                return
            if received < 0:
                self.send_error(400, "bad Content-Length")
                return
            self.rfile.read(received)
        elif "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            received = self._drain_chunked()
        text = "hello from %s: %s %s\n" % (self.server.backend_name, self.command, self.path)
        if received:
            text += "(%d request body bytes)\n" % received
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.server.backend_name)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _drain_chunked(self):
        total = 0
        while True:
            size_line = self.rfile.readline(65537)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailer fields, up to the empty line.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return total
            self.rfile.read(size)
            self.rfile.readline(65537)  # CRLF after the chunk
            total += size

    def do_GET(self):
        self._answer()

    def do_HEAD(self):
        self._answer(send_body=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def version_string(self):
        return "pitcher-demo-backend"

    def address_string(self):
        # Unix-socket clients have no (host, port) address.
        if isinstance(self.client_address, tuple) and self.client_address:
            return str(self.client_address[0])
        return "unix"

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("[%s] %s - %s\n" % (self.server.backend_name, self.address_string(), fmt % args))


class TCPServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True
    allow_reuse_address = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    request_queue_size = 128
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="backend name, echoed in the body and X-Backend")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="TCP port to listen on")
    where.add_argument("--unix", metavar="PATH", help="Unix socket path to listen on (replaced if it exists)")
    parser.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args()

    if args.unix:
        try:
            os.unlink(args.unix)
        except FileNotFoundError:
            pass
        server = UnixServer(args.unix, Handler)
        where_text = "unix:" + args.unix
    else:
        server = TCPServer((args.host, args.port), Handler)
        where_text = "%s:%d" % server.server_address[:2]
    server.backend_name = args.name
    server.verbose = args.verbose

    # Exit quietly on SIGTERM as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.verbose:
        sys.stderr.write("[%s] listening on %s\n" % (args.name, where_text))
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        if args.unix:
            try:
                os.unlink(args.unix)
            except FileNotFoundError:
                pass


if __name__ == "__main__":
    main()
