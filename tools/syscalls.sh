#!/usr/bin/env bash
# tools/syscalls.sh BINARY [SCENARIO] [REQUESTS] — system calls per request
# of one Pitcher build (strace -c on its single worker), the kernel-side
# complement of tools/callgrind.sh. Like it, independent of the host's load.
#
# SCENARIO: ka, close, 64k, 64kclose, 1m, 1mclose, refused (as tools/bench.sh;
# refused: a route whose quota module, 1 request/s, answers 503).
# REQUESTS: how many requests `ab` sends over 10 connections (default 2000).
# Prints strace's table with a "per request" column. Needs strace, ab
# (apache2-utils), nginx (origin), curl, python3.
set -euo pipefail
BIN=$(realpath "$1") SCEN=${2:-ka} N=${3:-2000}
D=$(mktemp -d /tmp/sc.XXXX); chmod 755 "$D"
. "$(dirname "$0")/lib/origin.sh"
pick_ports
start_origin "$D" "$OP"
cat >"$D/p.toml" <<T
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
# refused: a route whose quota module (1 request/s) answers 503 (only
# then: the module would run on the other scenarios' route too).
if [[ $SCEN == refused ]]; then
    cat >>"$D/p.toml" <<T
[[routes]]
name = "refused"
path_prefix = "/refused"
cluster = "o"
modules = ["quota"]
[modules.quota]
key = "route"
rate_per_sec = 1
burst = 1
concurrency = 0
status = 503
T
fi
"$BIN" --single-process -c "$D/p.toml" 2>"$D/p.err" &
PID=$!
trap 'kill -TERM $PID $NG 2>/dev/null; wait $PID $NG 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PP/" && break; sleep 0.1; done
path=/ ka=(-k)
case $SCEN in 64k*) path=/64k ;; 1m*) path=/1m ;; refused) path=/refused ;; esac
case $SCEN in *close) ka=() ;; esac
# Warm the pools and the upstream connections first.
ab -q "${ka[@]}" -c 10 -n 200 "http://127.0.0.1:$PP$path" >/dev/null
strace -c -q -o "$D/strace.txt" -p "$PID" &
ST=$!
sleep 0.5
ab -q "${ka[@]}" -c 10 -n "$N" "http://127.0.0.1:$PP$path" >"$D/ab.txt"
sleep 0.2
kill -INT $ST; wait $ST || true
grep -E "^(Complete|Failed|Non-2xx)" "$D/ab.txt" || true
# strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall.
awk -v n="$N" '
  $1 ~ /^-/ || $1 == "%" { next }
  NF >= 5 { printf "%-14s %9d calls %8.2f per request\n", $NF, $4, $4 / n }
' "$D/strace.txt"
