#!/usr/bin/env bash
# tools/allocs.sh BINARY [REQUESTS] — heap allocations per request of one
# Pitcher build on the steady keep-alive path, counted by valgrind's DHAT
# (every malloc/realloc of the process, the access log's writer thread
# included), with the access_log (JSON to a file), headers and throttle
# modules on, as issue 13 asks.
#
# The figure is (blocks allocated in a run that served REQUESTS keep-alive
# requests − blocks of a run that served 1) / (REQUESTS − 1), so start-up,
# the first connection's buffers and shutdown cancel out. Requests go over
# 4 keep-alive connections (curl's --parallel would open more; a tiny
# Python client keeps exactly 4). Needs valgrind, nginx (origin), python3.
# MODULES="access_log headers throttle" chooses the modules (empty: none).
# REFUSED=1: the route has the quota module at 1 request/s, so (after the
# first) every request is answered 503 by the module: allocations per
# refusal (MODULES defaults to none then).
set -euo pipefail
BIN=$(realpath "$1") N=${2:-2000}
REFUSED=${REFUSED:-0}
if [[ $REFUSED == 1 ]]; then MODULES=${MODULES-""}; else MODULES=${MODULES-"access_log headers throttle"}; fi
D=$(mktemp -d /tmp/allocs.XXXX); chmod 755 "$D"
trap 'kill ${NG:-} 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$D"' EXIT
. "$(dirname "$0")/lib/origin.sh"
pick_ports
start_origin "$D" "$OP"
cat > "$D/p.toml" <<T
workers = 1
pid_file = "$D/p.pid"
control_socket = "$D/p.sock"
error_log = "stderr"
log_level = "warn"
[[listeners]]
address = "127.0.0.1:$PP"
[[clusters]]
name = "o"
backends = ["127.0.0.1:$OP"]
keepalive = 64
[[routes]]
path_prefix = "/"
cluster = "o"
T
if [[ $REFUSED == 1 ]]; then
    printf 'modules = ["quota"]\n[modules.quota]\nkey = "route"\nrate_per_sec = 1\nburst = 1\nconcurrency = 0\nstatus = 503\n' >>"$D/p.toml"
fi
for m in $MODULES; do
    case $m in
    access_log) printf '\n[modules.access_log]\npath = "%s/access.log"\nformat = "json"\n' "$D" >>"$D/p.toml" ;;
    headers) printf '\n[modules.headers]\nresponse_set = { "X-Proxy" = "pitcher" }\nrequest_set = { "X-Bench" = "1" }\n' >>"$D/p.toml" ;;
    throttle) printf '\n[modules.throttle]\nrate_per_sec = 10000000\nburst = 10000000\n' >>"$D/p.toml" ;;
    *) echo "unknown module $m" >&2; exit 2 ;;
    esac
done
"$BIN" -t -c "$D/p.toml" >/dev/null || { echo "pitcher -t refused $D/p.toml" >&2; exit 1; }
# N requests over 4 keep-alive connections, each response read whole.
client() {
    python3 - "$PP" "$1" "$REFUSED" <<'PY'
import socket, sys
port, n, refused = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(min(4, n))]
req = b"GET /x HTTP/1.1\r\nHost: bench\r\nUser-Agent: allocs\r\n\r\n"
for i in range(n):
    c = conns[i % len(conns)]
    c.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += c.recv(65536)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += c.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") or (refused and head.startswith(b"HTTP/1.1 503")), head
PY
}
run() { # $1 requests
    valgrind --tool=dhat --dhat-out-file="${DHAT_OUT:-/dev/null}" "$BIN" --single-process -c "$D/p.toml" 2>"$D/vg.err" & local VP=$!
    for _ in $(seq 100); do python3 -c "import socket;socket.create_connection(('127.0.0.1',$PP))" 2>/dev/null && break; sleep 0.2; done
    kill -0 $VP || { cat "$D/vg.err" >&2; exit 1; }
    client "$1"
    sleep 0.5 # the access log's writer thread catches up
    kill -TERM $VP; wait $VP || true
    grep -m1 "Total:" "$D/vg.err" | sed 's/.* in \([0-9,]*\) blocks.*/\1/' | tr -d ,
}
b1=$(run 1)
bn=$(run "$N")
echo "$(basename "$BIN") modules=[$MODULES]$( ((REFUSED)) && echo ' refused by quota'): requests=$N blocks(1)=$b1 blocks($N)=$bn allocations/request=$(python3 -c "print(round(($bn-$b1)/($N-1), 3))")"
