#!/usr/bin/env bash
# tools/callgrind.sh BINARY [SCENARIO] [DURATION] — user-space instructions
# per request of one Pitcher build, counted by valgrind's callgrind.
#
# Wall-clock CPU per request (tools/bench.sh) swings by ±25% run to run on a
# shared virtual machine; an instruction count does not: the same binary
# and load give the same figure within ~1%, whatever else the host does.
# Use it for before/after comparisons of a change to the data path (it does
# not see kernel time: syscalls and wake-ups are bench.sh's job).
#
# SCENARIO: ka (small body, keep-alive; default), close (Connection: close),
# 64k (64 KiB body, keep-alive), refused (every request answered 503 by the
# quota module). DURATION: wrk's -d (default 5s).
# The figure is (instructions of a run under load − instructions of a run
# that served one request) / requests, so start-up and shutdown cancel out.
# Needs valgrind, wrk, nginx (origin), curl, python3; KEEP=1 keeps the
# callgrind output for callgrind_annotate. ROUTES=N puts N more routes in
# front of the one that serves the load (as PITCHER_ROUTES of bench.sh:
# exact hosts, `*.suffix` hosts, path prefixes, every tenth with a header
# condition), to compare the cost of a lookup in small and large tables.
set -euo pipefail
BIN=$(realpath "$1") SCEN=${2:-ka} DUR=${3:-5s}
D=$(mktemp -d /tmp/cg.XXXX); chmod 755 $D
. "$(dirname "$0")/lib/origin.sh"
pick_ports
start_origin "$D" "$OP"
cat > $D/p.toml <<T
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
T
for ((j = 0; j < ${ROUTES:-0}; j++)); do
  case $((j % 3)) in
  0) printf '[[routes]]\nhost = "svc%d.example"\npath_prefix = "/v1"\n' "$j" ;;
  1) printf '[[routes]]\nhost = "*.t%d.example"\n' "$j" ;;
  2) printf '[[routes]]\npath_prefix = "/r%d/"\n' "$j" ;;
  esac
  if ((j % 10 == 1)); then printf 'header = { name = "X-Tenant" }\n'; fi
  printf 'cluster = "o"\n'
done >> $D/p.toml
printf '[[routes]]\npath_prefix = "/"\ncluster = "o"\n' >> $D/p.toml
# refused: a route whose quota module (1 request/s) answers 503 (only
# then: the modules would run on the other scenarios' route too).
[ $SCEN = refused ] && printf '[[routes]]\nname = "refused"\npath_prefix = "/refused"\ncluster = "o"\nmodules = ["quota"]\n[modules.quota]\nkey = "route"\nrate_per_sec = 1\nburst = 1\nconcurrency = 0\nstatus = 503\n' >> $D/p.toml
run() { # $1 duration or "none"
  valgrind --tool=callgrind --callgrind-out-file=$D/cg.out.%p $BIN --single-process -c $D/p.toml 2>$D/vg.err & local VP=$!
  for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$PP/ && break; sleep 0.2; done
  local n=1
  if [ "$1" != none ]; then
    local path=/ hdr=()
    [ $SCEN = 64k ] && path=/64k
    [ $SCEN = refused ] && path=/refused
    [ $SCEN = close ] && hdr=(-H "Connection: close")
    n=$(wrk -t1 -c10 -d$1 "${hdr[@]}" http://127.0.0.1:$PP$path | awk '/requests in/ {print $1}')
    n=$((n+1))
  fi
  kill -TERM $VP; wait $VP || true
  local ir=$(grep -h "^summary:" $D/cg.out.$VP | awk '{print $2}')
  echo "$n $ir"
}
read -r n0 i0 < <(run none)
read -r n1 i1 < <(run $DUR)
kill $NG; wait $NG 2>/dev/null || true
echo "$SCEN $(basename $BIN) routes=$((${ROUTES:-0} + 1)): requests=$((n1-n0)) instr/req=$(( (i1-i0)/(n1-n0) ))"
[ -n "${KEEP:-}" ] && echo "kept $D" || rm -rf $D
