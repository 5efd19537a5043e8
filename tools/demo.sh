#!/usr/bin/env bash
# tools/demo.sh — build Pitcher and watch it do its job: two demo backends
# (alpha with weight 1, beta with weight 2) behind one Pitcher listener,
# a few requests through it, and which backend answered each.
#
#   tools/demo.sh          run the demo, stop everything, exit 0
#   tools/demo.sh --keep   then leave Pitcher running until Ctrl-C
#
# Environment:
#   REQUESTS=9                    how many requests to send
#   PITCHER_BIN=...               use this binary instead of building
#                                 target/release/pitcher
#   PITCHER_ARGS=--foreground     arguments before `-c FILE` (master + 2 workers;
#                                 --single-process for one worker); the launched
#                                 process must stay in the foreground
set -euo pipefail

usage() { sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

KEEP=0
for arg in "$@"; do
    case $arg in
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
done

REQUESTS=${REQUESTS:-9}
PITCHER_ARGS=${PITCHER_ARGS:---foreground}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

say() { printf '%s\n' "$*"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=tools/lib/procs.sh
source "$ROOT/tools/lib/procs.sh"

# ---------------------------------------------------------------- processes

STARTED_PIDS=()
TMP=""

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    trap '' PIPE
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_tree "${STARTED_PIDS[i]}"
    done
    [[ -n $TMP ]] && rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ prereqs

if ! command -v curl >/dev/null; then
    say "installing curl with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl; } >/dev/null ||
        die "could not install curl"
fi
command -v python3 >/dev/null || die "python3 is required for the demo backends"
# The real interpreter, not a wrapper (a pyenv shim, say) that would leave
# python running when its own pid is stopped.
PYTHON=$(python3 -c 'import sys; print(sys.executable)')

if [[ -z ${PITCHER_BIN:-} ]]; then
    say "building Pitcher (cargo build --release) ..."
    cargo build --release --quiet || die "cargo build --release failed"
    PITCHER_BIN=target/release/pitcher
fi
[[ -x $PITCHER_BIN ]] || die "$PITCHER_BIN is not an executable"

TMP=$(mktemp -d /tmp/pitcher-demo.XXXXXX)
ports=$(free_ports 3) || die "could not pick free ports"
read -r ALPHA_PORT BETA_PORT PORT <<<"$ports"

# ----------------------------------------------------------------- backends

declare -A WEIGHT=([alpha]=1 [beta]=2)
declare -A BACKEND_PORT=([alpha]=$ALPHA_PORT [beta]=$BETA_PORT)
for name in alpha beta; do
    "$PYTHON" tools/demo_backend.py --name "$name" --port "${BACKEND_PORT[$name]}" \
        >"$TMP/$name.log" 2>&1 &
    STARTED_PIDS+=("$!")
    wait_http "backend $name" "$!" "${BACKEND_PORT[$name]}" "$TMP/$name.log"
    say "backend $name listening on 127.0.0.1:${BACKEND_PORT[$name]} (weight ${WEIGHT[$name]})"
done

# ------------------------------------------------------------------ pitcher

CFG=$TMP/pitcher.toml
cat >"$CFG" <<EOF
workers = 2
pid_file = "$TMP/pitcher.pid"
control_socket = "$TMP/pitcher.sock"
error_log = "stderr"
log_level = "info"

[[listeners]]
address = "127.0.0.1:$PORT"

[[clusters]]
name = "demo"
backends = ["127.0.0.1:$ALPHA_PORT weight=${WEIGHT[alpha]}", "127.0.0.1:$BETA_PORT weight=${WEIGHT[beta]}"]
keepalive = 8

[[routes]]
path_prefix = "/"
cluster = "demo"
EOF

"$PITCHER_BIN" -t -c "$CFG" >"$TMP/test.log" 2>&1 || {
    cat "$TMP/test.log" >&2
    die "pitcher -t rejected the generated config $CFG"
}
read -ra args <<<"$PITCHER_ARGS"
"$PITCHER_BIN" "${args[@]}" -c "$CFG" >"$TMP/pitcher.log" 2>&1 &
PITCHER_PID=$!
STARTED_PIDS+=("$PITCHER_PID")
wait_http pitcher "$PITCHER_PID" "$PORT" "$TMP/pitcher.log"
say "pitcher listening on 127.0.0.1:$PORT (pid $PITCHER_PID): $PITCHER_BIN ${args[*]} -c pitcher.toml"
say ""

# ----------------------------------------------------------------- requests

declare -A COUNT=([alpha]=0 [beta]=0)
for ((i = 1; i <= REQUESTS; i++)); do
    path=/demo/$i
    body=$(curl -sS --max-time 5 -D "$TMP/headers" "http://127.0.0.1:$PORT$path") ||
        die "request $i (GET $path) failed"
    status=$(head -n 1 "$TMP/headers" | tr -d '\r')
    backend=$(awk -F': *' 'tolower($1) == "x-backend" { sub(/\r$/, "", $2); print $2 }' "$TMP/headers")
    printf '  GET %-9s -> %-6s | %s | %s\n' "$path" "${backend:-?}" "$status" "$body"
    [[ -n $backend && -v COUNT[$backend] ]] ||
        die "response to GET $path came from no known backend (status: $status)"
    COUNT[$backend]=$((COUNT[$backend] + 1))
done

say ""
say "summary: $REQUESTS requests, smooth weighted round robin"
for name in alpha beta; do
    printf '  %-6s weight %d: %d requests\n' "$name" "${WEIGHT[$name]}" "${COUNT[$name]}"
done

if ((KEEP)); then
    say ""
    say "Pitcher keeps running on http://127.0.0.1:$PORT/ (log: $TMP/pitcher.log)."
    say "Try: curl -i http://127.0.0.1:$PORT/hello — press Ctrl-C to stop."
    trap 'say ""; say "stopping"; exit 0' INT
    rc=0
    wait "$PITCHER_PID" || rc=$?
    tail -n 20 "$TMP/pitcher.log" >&2 || true
    die "pitcher exited on its own (status $rc)"
fi
