#!/usr/bin/env bash
# tools/bench.sh — Pitcher's performance benchmark: Pitcher vs nginx, both
# as a one-worker reverse proxy in front of the same fast nginx origin.
#
# Layout on the machine (2 cores are enough):
#   core 0 (ORIGIN_CPU, WRK_CPU): the origin nginx (1 worker) and wrk
#   core 1 (PROXY_CPU):           the proxy under test, one at a time under
#                                 load (both stay up, the idle one sleeps)
#
# Scenarios (SCENARIOS, default "ka close 64k"):
#   ka     small body, keep-alive client connections
#   close  small body, every request on a new connection (Connection: close)
#   64k    64 KiB body, keep-alive
#   64kclose  64 KiB body, Connection: close
#   1m     1 MiB body, keep-alive
#   1mclose   1 MiB body, Connection: close
#   refused  every request refused with a 503 by a module (Pitcher: the
#          quota module, rate 1/s; nginx: limit_req, 1r/s, not logged):
#          what a refusal costs, against "ka" (a proxied request)
#   calm   small body, keep-alive, at a fixed rate of ADMIT_RATE/4 through
#          the throttle (Pitcher: degrade + throttle modules at
#          ADMIT_RATE, burst a tenth of it; nginx: limit_req at
#          ADMIT_RATE, the same burst, nodelay): the
#          unloaded latency of the overload scenario
#   overload  the same at 2 x ADMIT_RATE: half refused (503), the p99 of
#          all answers and of the admitted ones against calm's
#          (refused, calm, overload run on a second instance of each proxy
#          with these limits; a fixed rate is wrk with tools/lib/rate.lua:
#          RATE_CONNECTIONS connections, one per wrk thread, each on a
#          schedule of its own; the achieved rate is what the req/s
#          column shows; rate.lua times every answer and reports the
#          admitted ones' p50/p99 apart from the 503s, in the notes)
#   idle10k  IDLE_CONNECTIONS (10,000) idle keep-alive connections, each
#          opened after the previous one's response (tools/idle_conns.py):
#          RSS growth per connection of the proxy's processes
#   reuseport  small body, Connection: close, against Pitcher with 2 workers:
#          one listening socket shared by both (PROXIES pitcher_shared) or
#          one SO_REUSEPORT socket per worker (pitcher_reuseport). Adds an
#          "accept balance" table: requests each worker served (from an
#          access log of $pid lines), so how evenly new connections spread.
#          SCENARIOS=reuseport PROXIES="pitcher_shared pitcher_reuseport"
#   routes small body, keep-alive, against one Pitcher per count of
#          ROUTE_COUNTS (default "10 1000 10000") extra routes (see
#          PITCHER_ROUTES), all up at once and run interleaved: the check
#          that a request's cost does not grow with the routing table. Adds
#          a "routes" table: CPU per request for each count side by side and
#          how far apart they are (the goal: within 5%).
#          SCENARIOS=routes (PROXIES is then pitcher_r10 pitcher_r1000 ...)
#   tls_full    HTTPS, a new connection and a full handshake per request (no
#          resumption): `openssl s_time -new -tls1_3 -www /`, S_TIME_CLIENTS
#          of them at once (wrk cannot: it resumes sessions); "CPU µs/req"
#          is then CPU per handshake (+ its one small request)
#   tls_resume  HTTPS, a new connection per request resuming the session
#          (TLS 1.3 ticket): `openssl s_time -reuse -tls1_3 -www /`
#   tls_ka  HTTPS, small body, keep-alive (wrk over TLS: handshakes only at
#          its connections' start)
#          The TLS scenarios give both proxies the same ECDSA P-256
#          certificate (made with openssl in the temp dir); nginx is limited
#          to TLS 1.3 (ssl_protocols TLSv1.3), the s_time clients ask for
#          TLS 1.3, and wrk negotiates it. s_time reports no latency ("-").
#          SCENARIOS="tls_full tls_resume tls_ka"
#
# Fleet throttle (issue 16): the same Pitcher build with the throttle on,
# its rate far above the load (nothing refused), once per host
# (pitcher_throttle_local) and once with scope = "fleet" leasing from a
# redis-server this script starts on a Unix socket
# (pitcher_throttle_fleet). Adds a table of the Redis commands per second
# (INFO commandstats before and after each run) against the requests per
# second. The CPU per request compares the two (the lease thread is in the
# measured process):
#          SCENARIOS=ka PROXIES="pitcher_throttle_local pitcher_throttle_fleet"
#
# For each scenario: a warm-up run per proxy, then ROUNDS rounds in which the
# proxies run interleaved (A, B, A, B, ...). Each run records req/s, p50/p99
# latency, the errors wrk saw, and the CPU time the proxy spent per request:
# utime+stime of all the proxy's processes (the launched pid and all its
# descendants, e.g. nginx master + worker) before and after the run, divided
# by the number of requests wrk completed ("CPU µs/req"). A run during which
# other work kept the proxy's core busy (more than OTHER_LOAD_MAX percent of
# the run) is flagged in the errors column: compare only unflagged rows.
#
# Environment:
#   ROUNDS=2 DURATION=10s WARMUP=3s CONNECTIONS=50 THREADS=1
#   S_TIME_CLIENTS=4             s_time processes at once (tls_full, tls_resume)
#   SCENARIOS="ka close 64k"     ALL=1: every scenario but reuseport
#   ADMIT_RATE                   requests/s the throttle admits (default:
#                                 a quarter of a 3 s closed-loop probe of
#                                 the first proxy, small keep-alive: wrk
#                                 and the origin share a core, and the
#                                 fixed-rate wrk offers well below the
#                                 closed-loop rate, so 2 x ADMIT_RATE must
#                                 stay within what it can offer)
#   RATE_CONNECTIONS=32          connections of the fixed-rate scenarios
#                                 (one wrk thread each: 100 threads kept
#                                 wrk's core saturated and put its own
#                                 queueing into the overload p99)
#   IDLE_CONNECTIONS=10000
#   PROXIES="pitcher nginx"      which proxies to run, in this order;
#                                 "pitcher_b" is a second Pitcher build
#                                 (PITCHER_BIN_B), for before/after A/B runs;
#                                 "pitcher_shared" and "pitcher_reuseport"
#                                 are PITCHER_BIN as master + 2 workers
#                                 (for the reuseport scenario)
#   PITCHER_BIN                  unset: run `cargo build --release` (a no-op
#                                 when up to date) and use
#                                 target/release/pitcher; set: use that
#                                 binary as it is
#   PITCHER_BIN_B                the binary of "pitcher_b" (required when
#                                 PROXIES names it), used as it is
#   PITCHER_MODULES=access_log,headers,throttle  modules enabled in
#                                 Pitcher (default none), to measure what the
#                                 hook pipeline costs; the throttle's rate is
#                                 set far above the load so it only counts
#   PITCHER_ARGS=--single-process  arguments before `-c FILE`. The launched
#                                 process must stay in the foreground; its
#                                 children are accounted too, so
#                                 PITCHER_ARGS=--foreground measures master
#                                 + one worker (the config has workers = 1)
#   ROUTE_COUNTS="10 1000 10000" the extra routes of each Pitcher of the
#                                 routes scenario
#   PITCHER_ROUTES=0             extra routes in Pitcher's configuration, in
#                                 front of the one that serves the load (a
#                                 third each: exact hosts, "*.suffix" hosts,
#                                 path prefixes; every tenth with a header
#                                 condition), to show that the cost of a
#                                 request does not grow with the table:
#                                 SCENARIOS=routes runs 10, 1000 and 10000
#                                 side by side
#   ORIGIN_CPU=0 WRK_CPU=0 PROXY_CPU=1
#   OTHER_LOAD_MAX=10            flag runs whose proxy core was busier than
#                                 the proxy by more than this many percent
#   KEEP_TMP=1                   keep the temp dir (configs, logs, raw wrk
#                                 output) instead of deleting it
#
# Output: progress on stderr, a markdown table on stdout.
set -euo pipefail

ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
S_TIME_CLIENTS=${S_TIME_CLIENTS:-4}
SCENARIOS=${SCENARIOS:-"ka close 64k"}
[[ ${ALL:-0} == 1 ]] && SCENARIOS="ka close 64k 64kclose 1m 1mclose refused calm overload idle10k"
ADMIT_RATE=${ADMIT_RATE:-}
RATE_CONNECTIONS=${RATE_CONNECTIONS:-32}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
PROXIES=${PROXIES:-"pitcher nginx"}
PITCHER_ARGS=${PITCHER_ARGS:---single-process}
PITCHER_MODULES=${PITCHER_MODULES:-}
PITCHER_ROUTES=${PITCHER_ROUTES:-0}
ROUTE_COUNTS=${ROUTE_COUNTS:-"10 1000 10000"}
ORIGIN_CPU=${ORIGIN_CPU:-0}
WRK_CPU=${WRK_CPU:-0}
PROXY_CPU=${PROXY_CPU:-1}
KEEP_TMP=${KEEP_TMP:-0}
OTHER_LOAD_MAX=${OTHER_LOAD_MAX:-10}
NGINX=/usr/sbin/nginx

# The small body every scenario but 64k fetches (same bytes from all hops).
SMALL_BODY='Hello from the origin!'
LARGE_SIZE=65536
HUGE_SIZE=1048576

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Unset PITCHER_BIN: build and use target/release/pitcher.
BUILD_PITCHER=0
[[ -n ${PITCHER_BIN:-} ]] || BUILD_PITCHER=1
PITCHER_BIN=${PITCHER_BIN:-target/release/pitcher}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }
# shellcheck source=tools/lib/procs.sh
source "$ROOT/tools/lib/procs.sh"

# ---------------------------------------------------------------- processes

# Every process this script starts in the background; cleanup() stops them.
STARTED_PIDS=()
TMP=""

# cpu_ticks PID: utime+stime (clock ticks) summed over PID and descendants.
# Ticks are CLK_TCK (100/s, i.e. 10 ms) granular and each process's counters
# are read separately, so one reading may be off by about a tick per process.
# With DURATION=10s and 100k+ requests per run that is < 0.1 µs/req; short
# runs (DURATION=3s) are correspondingly noisier. CPU time of a child that
# exits during a run is not counted (the proxies under test do not fork per
# request; a crashed/respawned worker would show up as errors anyway).
cpu_ticks() {
    local total=0 pid line
    local -a st
    while read -r pid; do
        read -r line 2>/dev/null <"/proc/$pid/stat" || continue
        read -ra st <<<"${line##*) }"
        total=$((total + st[11] + st[12]))   # fields 14 (utime), 15 (stime)
    done < <(proc_tree "$1")
    echo "$total"
}

# core_busy_ticks CPU: all non-idle time of one core (user nice system irq
# softirq steal in /proc/stat), in clock ticks. Compared with the proxy's own
# ticks it shows whether other processes ran on the proxy's core during a
# run. Both are tick-sampled, so they agree only to a few percent.
core_busy_ticks() {
    local line
    local -a f
    while read -r line; do
        [[ $line == "cpu$1 "* ]] || continue
        read -ra f <<<"$line"
        echo "$((f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))"
        return 0
    done </proc/stat
    die "cpu$1 not found in /proc/stat"
}

# check_proxy NAME PORT: the proxy must return exactly the origin's bodies.
check_proxy() {
    local name=$1 port=$2 body size
    body=$(curl -sS --max-time 5 "http://127.0.0.1:$port/") ||
        die "$name: GET / failed"
    [[ $body == "$SMALL_BODY" ]] ||
        die "$name: GET / returned '${body:0:200}', expected '$SMALL_BODY'"
    size=$(curl -sS --max-time 5 -o /dev/null -w '%{size_download}' \
        "http://127.0.0.1:$port/64k") || die "$name: GET /64k failed"
    [[ $size == "$LARGE_SIZE" ]] ||
        die "$name: GET /64k returned $size bytes, expected $LARGE_SIZE"
    size=$(curl -sS --max-time 5 -o /dev/null -w '%{size_download}' \
        "http://127.0.0.1:$port/1m") || die "$name: GET /1m failed"
    [[ $size == "$HUGE_SIZE" ]] ||
        die "$name: GET /1m returned $size bytes, expected $HUGE_SIZE"
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    # Finish the cleanup even if a command fails or stderr has gone away.
    set +e
    trap '' PIPE
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_tree "${STARTED_PIDS[i]}"
    done
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ prereqs

install_missing() {
    local -a pkgs=()
    command -v "$NGINX" >/dev/null || pkgs+=(nginx)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v taskset >/dev/null || pkgs+=(util-linux)
    if [[ " $PROXIES " == *" pitcher_throttle_fleet "* ]]; then
        command -v redis-server >/dev/null || pkgs+=(redis-server)
    fi
    ((${#pkgs[@]})) || return 0
    log "installing ${pkgs[*]} with apt-get"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
        die "apt-get install ${pkgs[*]} failed"
}

install_missing
command -v python3 >/dev/null || die "python3 is required (free ports)"
ncpu=$(nproc)
for c in "$ORIGIN_CPU" "$WRK_CPU" "$PROXY_CPU"; do
    ((c < ncpu)) || die "CPU $c does not exist (nproc=$ncpu); set ORIGIN_CPU/WRK_CPU/PROXY_CPU"
done
CLK_TCK=$(getconf CLK_TCK)

for s in $SCENARIOS; do
    [[ " ka close 64k 64kclose 1m 1mclose refused calm overload idle10k reuseport routes tls_full tls_resume tls_ka " == *" $s "* ]] ||
        die "unknown scenario '$s' in SCENARIOS"
done
# The routes scenario runs one Pitcher per count of ROUTE_COUNTS, alone.
if [[ " $SCENARIOS " == *" routes "* ]]; then
    [[ $SCENARIOS == routes ]] || die "SCENARIOS=routes runs alone (its proxies are its own), not with '$SCENARIOS'"
    PROXIES=""
    for n in $ROUTE_COUNTS; do
        [[ $n =~ ^[0-9]+$ ]] || die "ROUTE_COUNTS must be numbers of routes, not '$n'"
        PROXIES+="${PROXIES:+ }pitcher_r$n"
    done
    [[ -n $PROXIES ]] || die "ROUTE_COUNTS is empty"
fi
for p in $PROXIES; do
    [[ $p == pitcher || $p == pitcher_b || $p == nginx || $p == pitcher_shared || $p == pitcher_reuseport ||
        $p == pitcher_throttle_local || $p == pitcher_throttle_fleet || $p =~ ^pitcher_r[0-9]+$ ]] ||
        die "unknown proxy '$p' in PROXIES"
done
# The TLS scenarios add an HTTPS listener to pitcher, pitcher_b and nginx.
TLS_BENCH=0
[[ " $SCENARIOS " == *" tls_"* ]] && TLS_BENCH=1
if ((TLS_BENCH)); then
    for p in $PROXIES; do
        [[ $p == pitcher || $p == pitcher_b || $p == nginx ]] ||
            die "the TLS scenarios run against pitcher, pitcher_b and nginx, not '$p'"
    done
    command -v openssl >/dev/null || die "openssl is required for the TLS scenarios"
fi
# The limited instances exist for Pitcher builds and nginx.
if [[ " $SCENARIOS " == *" refused "* || " $SCENARIOS " == *" calm "* || " $SCENARIOS " == *" overload "* ]]; then
    for p in $PROXIES; do
        [[ $p == pitcher || $p == pitcher_b || $p == nginx ]] ||
            die "the refused, calm and overload scenarios run against pitcher, pitcher_b and nginx, not '$p'"
    done
fi
[[ -z $ADMIT_RATE || $ADMIT_RATE =~ ^[1-9][0-9]*$ ]] || die "ADMIT_RATE must be a rate in requests/s, not '$ADMIT_RATE'"
# The two-worker proxies exist for the reuseport scenario, and it for them.
if [[ " $SCENARIOS " == *" reuseport "* ]]; then
    for p in $PROXIES; do
        [[ $p == pitcher_shared || $p == pitcher_reuseport ]] ||
            die "SCENARIOS=reuseport runs against PROXIES=\"pitcher_shared pitcher_reuseport\", not '$p'"
    done
fi

[[ $PITCHER_ROUTES =~ ^[0-9]+$ ]] || die "PITCHER_ROUTES must be a number of routes, not '$PITCHER_ROUTES'"
for v in ROUNDS CONNECTIONS THREADS S_TIME_CLIENTS RATE_CONNECTIONS IDLE_CONNECTIONS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ $OTHER_LOAD_MAX =~ ^[0-9]+$ ]] || die "OTHER_LOAD_MAX must be a number of percent, not '$OTHER_LOAD_MAX'"
for v in DURATION WARMUP; do
    [[ ${!v} =~ ^[1-9][0-9]*[smh]?$ ]] || die "$v must be a wrk duration like 10s, not '${!v}'"
done

if [[ " $PROXIES " == *" pitcher "* || " $PROXIES " == *" pitcher_shared "* || " $PROXIES " == *" pitcher_reuseport "* ||
    " $PROXIES " == *" pitcher_r"* || " $PROXIES " == *" pitcher_throttle_"* ]]; then
    # Without PITCHER_BIN the binary is always (re)built — a no-op when it is
    # up to date — so a stale build is never measured by mistake.
    if ((BUILD_PITCHER)); then
        log "building Pitcher (cargo build --release)"
        cargo build --release --quiet ||
            die "cargo build --release failed (PITCHER_BIN=target/release/pitcher benchmarks the last build as it is)"
    fi
    [[ -x $PITCHER_BIN ]] || die "PITCHER_BIN=$PITCHER_BIN is not an executable"
    PITCHER_BIN=$(realpath "$PITCHER_BIN")
fi
if [[ " $PROXIES " == *" pitcher_b "* ]]; then
    [[ -x ${PITCHER_BIN_B:-} ]] || die "PROXIES names pitcher_b: set PITCHER_BIN_B to an executable"
    PITCHER_BIN_B=$(realpath "$PITCHER_BIN_B")
fi

# Other load on the machine skews everything measured here: sample the CPU
# use of the whole machine for a second before starting and warn if it is busy.
machine_busy_percent() {
    local -a a b
    read -ra a </proc/stat
    sleep 1
    read -ra b </proc/stat
    # cpu user nice system idle iowait irq softirq steal
    local total=0 idle i
    for ((i = 1; i <= 8; i++)); do total=$((total + b[i] - a[i])); done
    idle=$((b[4] - a[4] + b[5] - a[5]))
    echo $(((total - idle) * 100 / (total > 0 ? total : 1)))
}
BUSY=$(machine_busy_percent)
if ((BUSY > 10)); then
    log "WARNING: the machine is already ${BUSY}% busy (other processes); results will be noisy"
fi

TMP=$(mktemp -d /tmp/pitcher-bench.XXXXXX)
# nginx workers run as an unprivileged user when started as root: let them
# into the temp dir to read the static 64 KiB file.
chmod 755 "$TMP"
ports=$(free_ports 14) || die "could not pick free ports"
read -r ORIGIN_PORT NGINX_PORT PITCHER_PORT PITCHER_B_PORT SHARED_PORT REUSEPORT_PORT \
    NGINX_TLS_PORT PITCHER_TLS_PORT PITCHER_B_TLS_PORT THROTTLE_LOCAL_PORT THROTTLE_FLEET_PORT \
    NGINX_LIM_PORT PITCHER_LIM_PORT PITCHER_B_LIM_PORT <<<"$ports"
# One ECDSA P-256 certificate for every HTTPS listener.
TLS_CERT=$TMP/tls/cert.pem
TLS_KEY=$TMP/tls/key.pem
if ((TLS_BENCH)); then
    mkdir -p "$TMP/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$TLS_KEY" -out "$TLS_CERT" \
        -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>"$TMP/tls/openssl.log" ||
        die "openssl could not make the benchmark certificate: $(cat "$TMP/tls/openssl.log")"
    chmod -R a+rX "$TMP/tls"
fi
# 10,000 idle client connections need as many fds in the proxy (and the
# client): raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ " $SCENARIOS " == *" idle10k "* ]] && (($(ulimit -n) < IDLE_CONNECTIONS + 200)); then
    die "idle10k needs ulimit -n >= $((IDLE_CONNECTIONS + 200)) (hard limit $(ulimit -Hn)); set IDLE_CONNECTIONS lower"
fi

# ------------------------------------------------------------------- origin

# nginx_common DIR: directives every nginx instance here shares; everything
# (pid, logs, temp paths) lives in DIR, nothing in /etc, /var or /run.
nginx_common() {
    cat <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile $(ulimit -n);
events { worker_connections $(($(ulimit -n) - 100)); }
EOF
}
nginx_http_common() {
    cat <<EOF
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
EOF
}

# start_nginx NAME DIR CPU PORT: validate DIR/nginx.conf, start nginx pinned
# to CPU and wait for PORT. Sets REPLY to the master's pid.
start_nginx() {
    local name=$1 dir=$2 cpu=$3 port=$4
    "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2>"$dir/test.log" || {
        cat "$dir/test.log" >&2
        die "$name: nginx -t rejected $dir/nginx.conf"
    }
    taskset -c "$cpu" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" \
        >"$dir/stderr.log" 2>&1 &
    REPLY=$!
    STARTED_PIDS+=("$REPLY")
    wait_http "$name" "$REPLY" "$port" "$dir/error.log"
}

ORIGIN_DIR=$TMP/origin
mkdir -p "$ORIGIN_DIR/www"
head -c "$LARGE_SIZE" /dev/zero | tr '\0' 'x' >"$ORIGIN_DIR/www/64k"
head -c "$HUGE_SIZE" /dev/zero | tr '\0' 'y' >"$ORIGIN_DIR/www/1m"
chmod -R a+rX "$ORIGIN_DIR/www"
{
    nginx_common "$ORIGIN_DIR"
    cat <<EOF
http {
$(nginx_http_common "$ORIGIN_DIR")
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$ORIGIN_PORT backlog=4096;
        root $ORIGIN_DIR/www;
        location / { return 200 "$SMALL_BODY"; }
        location = /64k { }
        location = /1m { }
    }
}
EOF
} >"$ORIGIN_DIR/nginx.conf"
log "starting origin nginx on 127.0.0.1:$ORIGIN_PORT (cpu $ORIGIN_CPU)"
start_nginx origin "$ORIGIN_DIR" "$ORIGIN_CPU" "$ORIGIN_PORT"
check_proxy origin "$ORIGIN_PORT"

# ------------------------------------------------------------------ proxies

declare -A PROXY_PID PROXY_PORT PROXY_TLS_PORT

launch_nginx() { TLS_PORT=$NGINX_TLS_PORT launch_nginx_as nginx "$NGINX_PORT"; }
# The same with the limits of the refused/calm/overload scenarios.
launch_nginx_lim() { LIMIT_RATE=$ADMIT_RATE launch_nginx_as nginx_lim "$NGINX_LIM_PORT"; }

# launch_nginx_as NAME PORT: the nginx proxy (LIMIT_RATE: with limit_req
# locations /ovl at that rate and /refused at 1r/s; TLS_PORT: its HTTPS
# listener in the TLS scenarios).
launch_nginx_as() {
    local name=$1 port=$2 rate=${LIMIT_RATE:-} dir=$TMP/$1 limits="" lim_locations="" tls_port=${TLS_PORT:-}
    mkdir -p "$dir"
    if [[ -n $rate ]]; then
        limits="
    limit_req_zone \$binary_remote_addr zone=ovl:1m rate=${rate}r/s;
    limit_req_zone \$binary_remote_addr zone=refused:1m rate=1r/s;
    # (one client address here: the key makes the limit global.)
    limit_req_status 503;
    # Refusals are not logged (Pitcher does not log them either).
    limit_req_log_level info;"
        lim_locations="
        location /ovl { limit_req zone=ovl burst=$((rate / 10 + 1)) nodelay; proxy_pass http://origin; }
        location /refused { limit_req zone=refused; proxy_pass http://origin; }"
    fi
    {
        nginx_common "$dir"
        cat <<EOF
http {
$(nginx_http_common "$dir")
$limits
    upstream origin {
        server 127.0.0.1:$ORIGIN_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$port backlog=4096;
$( ((TLS_BENCH)) && [[ -n $tls_port ]] && cat <<TLS
        listen 127.0.0.1:$tls_port ssl backlog=4096;
        ssl_certificate $TLS_CERT;
        ssl_certificate_key $TLS_KEY;
        ssl_protocols TLSv1.3;
        # Resumption by tickets (on by default), as Pitcher does; no cache.
        ssl_session_tickets on;
TLS
)
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # Hold a 64 KiB response in memory (16 x 8k) and never spill a
        # response to a temp file: a streaming proxy does not either.
        proxy_buffers 16 8k;
        proxy_max_temp_file_size 0;
        location / { proxy_pass http://origin; }$lim_locations
    }
}
EOF
    } >"$dir/nginx.conf"
    log "starting $name proxy on 127.0.0.1:$port (cpu $PROXY_CPU)"
    start_nginx "$name" "$dir" "$PROXY_CPU" "$port"
    PROXY_PID[$name]=$REPLY
    PROXY_PORT[$name]=$port
    PROXY_TLS_PORT[$name]=$tls_port
}

launch_pitcher() { TLS_PORT=$PITCHER_TLS_PORT launch_pitcher_build pitcher "$PITCHER_BIN" "$PITCHER_PORT"; }
launch_pitcher_b() { TLS_PORT=$PITCHER_B_TLS_PORT launch_pitcher_build pitcher_b "$PITCHER_BIN_B" "$PITCHER_B_PORT"; }
launch_pitcher_lim() { LIMIT_RATE=$ADMIT_RATE launch_pitcher_build pitcher_lim "$PITCHER_BIN" "$PITCHER_LIM_PORT"; }
launch_pitcher_b_lim() { LIMIT_RATE=$ADMIT_RATE launch_pitcher_build pitcher_b_lim "$PITCHER_BIN_B" "$PITCHER_B_LIM_PORT"; }
# Master + 2 workers, one shared socket or one SO_REUSEPORT socket each; an
# access log of "$pid" lines tells which worker served each request.
launch_pitcher_shared() { WORKERS=2 REUSEPORT=false launch_pitcher_build pitcher_shared "$PITCHER_BIN" "$SHARED_PORT"; }
launch_pitcher_reuseport() { WORKERS=2 REUSEPORT=true launch_pitcher_build pitcher_reuseport "$PITCHER_BIN" "$REUSEPORT_PORT"; }
# The throttle per host, or fleet-wide through Redis (rate far above the load).
launch_pitcher_throttle_local() {
    THROTTLE=host launch_pitcher_build pitcher_throttle_local "$PITCHER_BIN" "$THROTTLE_LOCAL_PORT"
}
launch_pitcher_throttle_fleet() {
    start_redis
    THROTTLE=fleet launch_pitcher_build pitcher_throttle_fleet "$PITCHER_BIN" "$THROTTLE_FLEET_PORT"
}

# start_redis: a redis-server without persistence on $TMP/redis.sock, on
# the origin's core (it serves Pitcher's lease thread, not the load).
REDIS_SOCK=""
start_redis() {
    [[ -z $REDIS_SOCK ]] || return 0
    REDIS_SOCK=$TMP/redis.sock
    taskset -c "$ORIGIN_CPU" redis-server --port 0 --unixsocket "$REDIS_SOCK" --unixsocketperm 700 --save '' \
        --appendonly no >"$TMP/redis.log" 2>&1 &
    STARTED_PIDS+=("$!")
    local i
    for ((i = 0; i < 100; i++)); do
        [[ $(redis-cli -s "$REDIS_SOCK" ping 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    die "redis-server did not start; $(cat "$TMP/redis.log")"
}

# redis_calls: "COMMANDS ROUND_TRIPS" Redis has served (INFO commandstats:
# every command, those the lease script runs included, the INFO commands
# themselves left out; round trips are the EVALSHA calls).
redis_calls() {
    redis-cli -s "$REDIS_SOCK" info commandstats | tr -d '\r' |
        awk -F'[=,:]' '/^cmdstat_/ && $1 != "cmdstat_info" { n += $3 } $1 == "cmdstat_evalsha" { e = $3 }
            END { print n + 0, e + 0 }'
}

# launch_pitcher_build NAME BINARY PORT: one Pitcher build as proxy NAME
# (WORKERS, REUSEPORT: see launch_pitcher_shared; ROUTES: extra routes,
# PITCHER_ROUTES by default; TLS_PORT: its HTTPS listener in the TLS
# scenarios; LIMIT_RATE: with routes /ovl through degrade + throttle at
# that rate and /refused through a quota of 1/s, both answering 503).
launch_pitcher_build() {
    local name=$1 bin=$2 port=$3 workers=${WORKERS:-1} reuseport=${REUSEPORT:-} routes=${ROUTES:-$PITCHER_ROUTES}
    local tls_port=${TLS_PORT:-}
    local dir=$TMP/$name cfg pid
    local -a args
    mkdir -p "$dir"
    cfg=$dir/pitcher.toml
    cat >"$cfg" <<EOF
workers = $workers
pid_file = "$dir/pitcher.pid"
control_socket = "$dir/pitcher.sock"
error_log = "stderr"
log_level = "warn"

[[listeners]]
address = "127.0.0.1:$port"
backlog = 4096
$([[ -n $reuseport ]] && echo "reuseport = $reuseport")
$( ((TLS_BENCH)) && [[ -n $tls_port ]] && printf '\n[[listeners]]\naddress = "127.0.0.1:%s"\nbacklog = 4096\ntls = { certificates = [{ cert = "%s", key = "%s" }] }\n' "$tls_port" "$TLS_CERT" "$TLS_KEY")

[[clusters]]
name = "origin"
backends = ["127.0.0.1:$ORIGIN_PORT"]
keepalive = 64

EOF
    # $routes routes that the load does not take, but that a lookup
    # passes by: the load's host (127.0.0.1) is looked up among the exact
    # hosts, then label by label among the suffixes; its paths walk a trie
    # holding every prefix.
    local j
    for ((j = 0; j < routes; j++)); do
        case $((j % 3)) in
        0) printf '[[routes]]\nhost = "svc%d.example"\npath_prefix = "/v1"\n' "$j" ;;
        1) printf '[[routes]]\nhost = "*.t%d.example"\n' "$j" ;;
        2) printf '[[routes]]\npath_prefix = "/r%d/"\n' "$j" ;;
        esac
        if ((j % 10 == 1)); then printf 'header = { name = "X-Tenant" }\n'; fi
        printf 'cluster = "origin"\n\n'
    done >>"$cfg"
    if [[ -n ${LIMIT_RATE:-} ]]; then
        cat >>"$cfg" <<EOF
[[routes]]
name = "ovl"
path_prefix = "/ovl"
cluster = "origin"
modules = ["degrade", "throttle"]

[[routes]]
name = "refused"
path_prefix = "/refused"
cluster = "origin"
modules = ["quota"]

EOF
    fi
    printf '[[routes]]\npath_prefix = "/"\ncluster = "origin"\n' >>"$cfg"
    if [[ -n ${LIMIT_RATE:-} ]]; then
        cat >>"$cfg" <<EOF

[modules.degrade]

[modules.throttle]
rate_per_sec = $LIMIT_RATE
burst = $((LIMIT_RATE / 10 + 1))
status = 503

[modules.quota]
key = "route"
rate_per_sec = 1
burst = 1
concurrency = 0
status = 503
EOF
    fi
    local m
    for m in ${PITCHER_MODULES//,/ }; do
        case $m in
        access_log) printf '\n[modules.access_log]\npath = "%s/access.log"\nformat = "json"\n' "$dir" >>"$cfg" ;;
        headers) printf '\n[modules.headers]\nresponse_set = { "X-Proxy" = "pitcher" }\nrequest_set = { "X-Bench" = "1" }\n' >>"$cfg" ;;
        throttle) printf '\n[modules.throttle]\nrate_per_sec = 10000000\nburst = 10000000\n' >>"$cfg" ;;
        *) die "unknown module '$m' in PITCHER_MODULES (access_log, headers, throttle)" ;;
        esac
    done
    case ${THROTTLE:-} in
    host) printf '\n[modules.throttle]\nrate_per_sec = 10000000\nburst = 10000000\n' >>"$cfg" ;;
    fleet) printf '\n[modules.throttle]\nrate_per_sec = 10000000\nburst = 10000000\nscope = "fleet"\nredis = "unix:%s"\nfallback_rate_per_sec = 10000000\n' \
        "$REDIS_SOCK" >>"$cfg" ;;
    esac
    if [[ -n $reuseport ]]; then
        # shellcheck disable=SC2016 # $pid is Pitcher's variable
        printf '\n[modules.access_log]\npath = "%s/access.log"\nformat = "custom"\ncustom = "$pid"\n' "$dir" >>"$cfg"
    fi
    "$bin" -t -c "$cfg" >"$dir/test.log" 2>&1 || {
        cat "$dir/test.log" >&2
        die "$name: 'pitcher -t' rejected $cfg"
    }
    read -ra args <<<"$PITCHER_ARGS"
    [[ $workers == 1 ]] || args=(--foreground)
    log "starting $name on 127.0.0.1:$port (cpu $PROXY_CPU): $bin ${args[*]} -c $cfg"
    taskset -c "$PROXY_CPU" "$bin" "${args[@]}" -c "$cfg" >"$dir/stderr.log" 2>&1 &
    pid=$!
    STARTED_PIDS+=("$pid")
    wait_http "$name" "$pid" "$port" "$dir/stderr.log"
    PROXY_PID[$name]=$pid
    PROXY_PORT[$name]=$port
    PROXY_TLS_PORT[$name]=$tls_port
}

# check_tls NAME PORT: HTTPS gives the origin's body, over TLS 1.3.
check_tls() {
    local name=$1 port=$2 body
    body=$(curl -sS --max-time 5 --tlsv1.3 --cacert "$TLS_CERT" --resolve "localhost:$port:127.0.0.1" \
        "https://localhost:$port/") || die "$name: GET https://localhost:$port/ failed"
    [[ $body == "$SMALL_BODY" ]] || die "$name: GET https / returned '${body:0:200}', expected '$SMALL_BODY'"
}

for p in $PROXIES; do
    if [[ $p =~ ^pitcher_r([0-9]+)$ ]]; then
        # One Pitcher per count of the routes scenario, each on a port of its own.
        port=$(free_ports 1) || die "could not pick a free port"
        ROUTES=${BASH_REMATCH[1]} launch_pitcher_build "$p" "$PITCHER_BIN" "$port"
    else
        "launch_$p"
    fi
    check_proxy "$p" "${PROXY_PORT[$p]}"
    if ((TLS_BENCH)); then check_tls "$p" "${PROXY_TLS_PORT[$p]}"; fi
done

# target PROXY SCENARIO: the instance of PROXY a scenario runs against
# (refused, calm, overload: the one with the limits).
target() {
    case $2 in
    refused | calm | overload) echo "${1}_lim" ;;
    *) echo "$1" ;;
    esac
}

# ensure_limited: the instances with limits are up (started when the first
# scenario that needs them comes, once ADMIT_RATE is known).
ensure_limited() {
    local p t rps first=${PROXIES%% *}
    if [[ -z $ADMIT_RATE ]]; then
        log "capacity probe: $first, small keep-alive, closed loop, 3 s"
        taskset -c "$WRK_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d3s \
            "http://127.0.0.1:${PROXY_PORT[$first]}/" >"$TMP/probe.txt" 2>&1 || die "capacity probe failed"
        rps=$(awk '$1 == "Requests/sec:" { printf "%d", $2 }' "$TMP/probe.txt")
        ((rps > 1)) || die "capacity probe: no requests"
        ADMIT_RATE=$((rps / 4))
        log "ADMIT_RATE=$ADMIT_RATE req/s (a quarter of the probe's $rps)"
    fi
    for p in $PROXIES; do
        t=$(target "$p" overload)
        [[ -n ${PROXY_PID[$t]:-} ]] && continue
        "launch_$t"
        # The burst of one admits the first request.
        curl -sS --max-time 5 -o /dev/null "http://127.0.0.1:${PROXY_PORT[$t]}/refused" || die "$t: GET /refused failed"
        [[ $(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PROXY_PORT[$t]}/refused") == 503 ]] ||
            die "$t: /refused is not refused"
    done
}

# rss_kib PID: VmRSS summed over PID and its descendants, in KiB.
rss_kib() {
    local total=0 pid kib
    while read -r pid; do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${kib:-0}))
    done < <(proc_tree "$1")
    echo "$total"
}

# --------------------------------------------------------------------- runs

RESULTS=$TMP/results.tsv
: >"$RESULTS"

scenario_title() {
    case $1 in
    ka) echo "small, keep-alive" ;;
    close) echo "small, Connection: close" ;;
    64k) echo "64 KiB, keep-alive" ;;
    64kclose) echo "64 KiB, Connection: close" ;;
    1m) echo "1 MiB, keep-alive" ;;
    1mclose) echo "1 MiB, Connection: close" ;;
    reuseport) echo "small, Connection: close, 2 workers" ;;
    routes) echo "small, keep-alive, routes" ;;
    tls_full) echo "TLS 1.3 full handshake per request" ;;
    tls_resume) echo "TLS 1.3 resumed handshake per request" ;;
    tls_ka) echo "TLS 1.3 small, keep-alive" ;;
    refused) echo "refused (503 by a module)" ;;
    calm) echo "throttled, ADMIT_RATE/4 offered" ;;
    overload) echo "throttled, 2 x ADMIT_RATE offered" ;;
    idle10k) echo "$IDLE_CONNECTIONS idle keep-alive connections" ;;
    esac
}

# accept_balance PROXY: "N1/N2 (busiest P%)" requests per worker, from the
# access log of $pid lines (written in batches: give it a moment).
accept_balance() {
    local log=$TMP/$1/access.log
    sleep 0.3
    awk '{ n[$1]++; t++ } END {
        if (!t) { print "no log lines"; exit }
        max = 0; s = ""
        for (p in n) { s = s (s == "" ? "" : "/") n[p]; if (n[p] > max) max = n[p] }
        printf "%s (busiest worker %.1f%%)\n", s, 100 * max / t
    }' "$log"
}

# parse_wrk FILE: prints "requests rps p50_ms p99_ms errors detail" (tab
# separated) from wrk --latency output.
parse_wrk() {
    awk '
    function ms(v) {                       # wrk prints 512.00us, 1.23ms, 1.05s, 2.00m
        if (v ~ /us$/) return v / 1000
        if (v ~ /ms$/) return v + 0
        if (v ~ /m$/)  return v * 60000
        if (v ~ /s$/)  return v * 1000
        return v + 0
    }
    $1 == "50%"                 { p50 = ms($2) }
    $1 == "99%"                 { p99 = ms($2) }
    $2 == "requests" && $3 == "in" { reqs = $1 }
    $1 == "Requests/sec:"       { rps = $2 }
    /Socket errors:/ {
        gsub(",", "")
        for (i = 3; i < NF; i += 2) if ($(i + 1) > 0) { sock[$i] = $(i + 1); nsock += $(i + 1) }
    }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    # tools/lib/rate.lua: latency of the admitted answers apart from the
    # refused ones (the percentiles of wrk mix both).
    $1 == "split:"              { ap50 = $4; ap99 = $5; split_seen = 1 }
    END {
        detail = ""
        if (non2xx > 0) detail = "non-2xx/3xx " non2xx
        split("connect read write timeout", kinds, " ")
        for (k = 1; k <= 4; k++) if (kinds[k] in sock)
            detail = detail (detail == "" ? "" : ", ") kinds[k] " " sock[kinds[k]]
        if (reqs == "" || rps == "") { print "parse error" > "/dev/stderr"; exit 1 }
        if (!split_seen) { ap50 = "-"; ap99 = "-" }
        printf "%d\t%.2f\t%.3f\t%.3f\t%d\t%s\t%s\t%s\n", reqs, rps, p50, p99, non2xx + nsock, ap50, ap99, (detail == "" ? "0" : detail)
    }' "$1"
}

# run_s_time SCENARIO PROXY DURATION OUTFILE: S_TIME_CLIENTS `openssl
# s_time` at once (-new: full handshakes; -reuse: resumed), each fetching
# / on every connection; writes wrk-like lines parse_wrk reads: the
# connections made, per second, no latency, and the clients that failed.
run_s_time() {
    local scen=$1 proxy=$2 dur=$3 out=$4 secs mode=-new i total=0 failed=0 n
    secs=${dur%[smh]}
    [[ $dur == *m ]] && secs=$((secs * 60))
    [[ $dur == *h ]] && secs=$((secs * 3600))
    [[ $scen == tls_resume ]] && mode=-reuse
    local -a pids=()
    for ((i = 0; i < S_TIME_CLIENTS; i++)); do
        taskset -c "$WRK_CPU" openssl s_time -connect "127.0.0.1:${PROXY_TLS_PORT[$proxy]}" "$mode" -tls1_3 \
            -time "$secs" -www / >"$out.$i" 2>&1 &
        pids+=($!)
    done
    for ((i = 0; i < S_TIME_CLIENTS; i++)); do
        wait "${pids[i]}" || failed=$((failed + 1))
        # "N connections in T real seconds, B bytes read per connection"
        n=$(awk '/connections in .* real seconds/ { n = $1; b = $(NF - 4) } END { if (b + 0 >= 22) print n + 0; else print 0 }' "$out.$i")
        ((n > 0)) || failed=$((failed + 1))
        total=$((total + n))
    done
    {
        echo "Latency Distribution"
        echo "  50% 0ms"
        echo "  99% 0ms"
        echo "  $total requests in ${secs}s"
        echo "Requests/sec: $(awk -v n="$total" -v s="$secs" 'BEGIN { printf "%.2f", n / s }')"
        ((failed == 0)) || echo "Non-2xx or 3xx responses: $failed"
    } >"$out"
    alive "${PROXY_PID[$proxy]}" || die "$proxy (pid ${PROXY_PID[$proxy]}) died during the run"
}

# run_wrk SCENARIO PROXY DURATION OUTFILE (PROXY: the instance, see target)
run_wrk() {
    local scen=$1 proxy=$2 dur=$3 out=$4 path=/ conns=$CONNECTIONS rate
    local -a hdr=() script=()
    local scheme=http port=${PROXY_PORT[$2]} threads=$THREADS
    if [[ $scen == tls_full || $scen == tls_resume ]]; then
        run_s_time "$@"
        return
    fi
    [[ $scen == tls_ka ]] && scheme=https port=${PROXY_TLS_PORT[$proxy]}
    case $scen in *close | reuseport) hdr=(-H 'Connection: close') ;; esac
    case $scen in
    64k*) path=/64k ;;
    1m*) path=/1m ;;
    refused) path=/refused ;;
    calm | overload) path=/ovl ;;
    esac
    if [[ $scen == calm || $scen == overload ]]; then
        rate=$((ADMIT_RATE / 4))
        [[ $scen == overload ]] && rate=$((2 * ADMIT_RATE))
        ((rate > 0)) || rate=1
        conns=$RATE_CONNECTIONS
        script=(-s "$ROOT/tools/lib/rate.lua")
        # One connection per thread: rate.lua times each answer itself.
        threads=$conns
        BENCH_INTERVAL_MS=$(awk -v c="$conns" -v r="$rate" 'BEGIN { printf "%.3f", c * 1000 / r }')
        export BENCH_INTERVAL_MS
    fi
    if ! taskset -c "$WRK_CPU" wrk -t"$threads" -c"$conns" -d"$dur" --latency "${script[@]}" \
        "${hdr[@]}" "$scheme://127.0.0.1:$port$path" >"$out" 2>&1; then
        cat "$out" >&2
        die "wrk failed against $proxy"
    fi
    alive "${PROXY_PID[$proxy]}" || die "$proxy (pid ${PROXY_PID[$proxy]}) died during the run"
}

log "settings: rounds=$ROUNDS duration=$DURATION warmup=$WARMUP connections=$CONNECTIONS threads=$THREADS"
for scen in $SCENARIOS; do
    if [[ $scen == refused || $scen == calm || $scen == overload ]]; then
        ensure_limited
    fi
    if [[ $scen == idle10k ]]; then
        # One measurement per proxy: RSS growth per idle connection.
        for p in $PROXIES; do
            log "$(scenario_title "$scen"): $p"
            read -r held before after per_conn < <(python3 "$ROOT/tools/idle_conns.py" \
                "${PROXY_PORT[$p]}" "$IDLE_CONNECTIONS" "${PROXY_PID[$p]}") ||
                die "$p: tools/idle_conns.py failed"
            alive "${PROXY_PID[$p]}" || die "$p (pid ${PROXY_PID[$p]}) died with $IDLE_CONNECTIONS idle connections"
            log "$(scenario_title "$scen"): $p: $held connections, RSS $before -> $after KiB, $per_conn bytes per connection"
            printf '%s\t%s\t%s\t\t\t\t\t0\t%s\t0\t%s\n' "$scen" "$p" 1 \
                "$held held, RSS $((before / 1024)) -> $((after / 1024)) MiB" "$per_conn" >>"$RESULTS"
        done
        continue
    fi
    for p in $PROXIES; do
        log "$(scenario_title "$scen"): warm-up $p ($WARMUP)"
        run_wrk "$scen" "$(target "$p" "$scen")" "$WARMUP" "$TMP/wrk-$scen-$p-warmup.txt"
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        for p in $PROXIES; do
            t=$(target "$p" "$scen")
            out=$TMP/wrk-$scen-$p-$r.txt
            [[ $scen == reuseport ]] && sleep 0.3 && : >"$TMP/$p/access.log"
            [[ $p == pitcher_throttle_fleet ]] && read -r redis0 trips0 < <(redis_calls)
            c0=$(core_busy_ticks "$PROXY_CPU")
            t0=$(cpu_ticks "${PROXY_PID[$t]}")
            run_wrk "$scen" "$t" "$DURATION" "$out"
            t1=$(cpu_ticks "${PROXY_PID[$t]}")
            c1=$(core_busy_ticks "$PROXY_CPU")
            if [[ $p == pitcher_throttle_fleet ]]; then
                read -r redis1 trips1 < <(redis_calls)
                printf '%s\t%s\t%s\t%s\t%s\n' "$scen" "$r" "$((redis1 - redis0))" "$((trips1 - trips0))" "$out" \
                    >>"$TMP/redis.tsv"
            fi
            rss=$(rss_kib "${PROXY_PID[$t]}")
            if [[ $scen == reuseport ]]; then
                printf '%s\t%s\t%s\n' "$p" "$r" "$(accept_balance "$p")" >>"$TMP/balance.tsv"
            fi
            IFS=$'\t' read -r reqs rps p50 p99 nerr ap50 ap99 detail < <(parse_wrk "$out") ||
                die "could not parse wrk output $out"
            ((reqs > 0)) || die "$p completed no request in $(scenario_title "$scen")"
            read -r cpu other < <(awk -v t=$((t1 - t0)) -v c=$((c1 - c0)) \
                -v hz="$CLK_TCK" -v n="$reqs" -v d="$DURATION" '
                BEGIN {
                    secs = d + 0; if (d ~ /m$/) secs *= 60; if (d ~ /h$/) secs *= 3600
                    printf "%.2f %d\n", t * 1e6 / hz / n, 100 * (c - t) / hz / secs
                }')
            # Busy time of the proxy's core beyond the proxy's own: other
            # processes competed with it, and the run is not a fair sample.
            if ((other > OTHER_LOAD_MAX)); then
                log "WARNING: cpu $PROXY_CPU was ${other}% busy with other work during this run"
                detail+=" (⚠ cpu $PROXY_CPU ${other}% busy with other work)"
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
                "$scen" "$p" "$r" "$rps" "$p50" "$p99" "$cpu" "$nerr" "$detail" "$other" "$rss" "$ap50" "$ap99" >>"$RESULTS"
            log "$(scenario_title "$scen"): $p round $r: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, $cpu µs/req CPU, other work on cpu $PROXY_CPU ${other}%, errors: $detail"
        done
    done
done

# -------------------------------------------------------------------- table

echo
echo "Pitcher benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
echo "machine ${BUSY}% busy before the start; wrk -t$THREADS -c$CONNECTIONS -d$DURATION on cpu $WRK_CPU, origin nginx on cpu $ORIGIN_CPU, proxy on cpu $PROXY_CPU; $("$NGINX" -v 2>&1 | sed 's/^nginx version: //')$(
    [[ " $PROXIES " == *" pitcher"* ]] && printf ', pitcher %s (%s; modules: %s)' "$(git describe --always --dirty 2>/dev/null || echo 'uncommitted')" "$PITCHER_ARGS" "${PITCHER_MODULES:-none}")"
echo
echo "ADMIT_RATE=${ADMIT_RATE:-unused} req/s; means of $ROUNDS rounds (each run: stderr). RSS: the proxy's processes after the run;"
echo "idle: growth per connection. vs nginx: CPU per request (idle: bytes per connection) over nginx's."
echo
echo "| scenario | proxy | req/s | p50 ms | p99 ms | CPU µs/req | RSS | vs nginx | errors, notes |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
for scen in $SCENARIOS; do
    awk -F'\t' -v s="$scen" -v plist="$PROXIES" -v title="$(scenario_title "$scen")" -v max="$OTHER_LOAD_MAX" '
    $1 == s {
        p = $2; n[p]++; rps[p] += $4; p50[p] += $5; p99[p] += $6; cpu[p] += $7; err[p] += $8
        flagged[p] += ($10 > max); rss[p] += $11; note[p] = $9
        if ($13 != "" && $13 != "-") { na[p]++; ap50[p] += $12; ap99[p] += $13 }
    }
    END {
        np = split(plist, ps, " ")
        for (k = 1; k <= np; k++) {
            p = ps[k]; if (!n[p]) continue
            if (s == "idle10k") {
                ratio = (n["nginx"] && rss["nginx"] > 0) ? sprintf("%.2fx", rss[p] / rss["nginx"]) : "—"
                printf "| %s | %s | — | — | — | — | %.0f B/conn | %s | %s |\n", title, p, rss[p] / n[p], ratio, note[p]
                continue
            }
            ratio = (n["nginx"] && cpu["nginx"] > 0) ? sprintf("%.2fx", (cpu[p] / n[p]) / (cpu["nginx"] / n["nginx"])) : "—"
            notes = note[p]; sub(/ *\(⚠[^)]*\)/, "", notes)
            if (na[p]) notes = notes sprintf("; admitted only: p50 %.3f, p99 %.3f ms", ap50[p] / na[p], ap99[p] / na[p])
            if (flagged[p]) notes = notes sprintf(" ⚠ %d of %d runs disturbed", flagged[p], n[p])
            if (s ~ /^tls_(full|resume)$/) {
                # openssl s_time reports no latency.
                printf "| %s | %s | %.0f | - | - | %.2f | %.1f MiB | %s | %s |\n", title, p,
                    rps[p] / n[p], cpu[p] / n[p], rss[p] / n[p] / 1024, ratio, notes
                continue
            }
            printf "| %s | %s | %.0f | %.3f | %.3f | %.2f | %.1f MiB | %s | %s |\n", title, p,
                rps[p] / n[p], p50[p] / n[p], p99[p] / n[p], cpu[p] / n[p], rss[p] / n[p] / 1024, ratio, notes
        }
    }' "$RESULTS"
done

# What a refusal costs against a proxied request, and the overload p99
# against the calm one (when those scenarios ran).
awk -F'\t' -v plist="$PROXIES" '
    { k = $1 SUBSEP $2; n[k]++; cpu[k] += $7; p99[k] += $6 }
    $13 != "" && $13 != "-" { na[k]++; ap99[k] += $13 }
    END {
        np = split(plist, ps, " ")
        for (i = 1; i <= np; i++) {
            p = ps[i]
            if (n["refused", p] && n["ka", p] && cpu["ka", p] > 0)
                printf "\n%s: a refused request (503) costs %.0f%% of the CPU of a proxied one (refused / small keep-alive)\n", p,
                    100 * (cpu["refused", p] / n["refused", p]) / (cpu["ka", p] / n["ka", p])
            if (n["overload", p] && n["calm", p] && p99["calm", p] > 0)
                printf "\n%s: p99 under overload is %.2fx the calm p99 (all answers, 503s included)\n", p,
                    (p99["overload", p] / n["overload", p]) / (p99["calm", p] / n["calm", p])
            if (na["overload", p] && na["calm", p] && ap99["calm", p] > 0)
                printf "%s: p99 of the admitted requests under overload is %.2fx their calm p99 (503s left out)\n", p,
                    (ap99["overload", p] / na["overload", p]) / (ap99["calm", p] / na["calm", p])
        }
    }' "$RESULTS"
# The routes scenario: CPU per request by size of the routing table, side
# by side, and how far apart (the goal: within 5% of the smallest table).
if [[ $SCENARIOS == routes ]]; then
    echo
    echo "| extra routes | CPU µs/req (mean) | vs $(set -- $ROUTE_COUNTS; echo "$1") routes | req/s (mean) | disturbed runs |"
    echo "|---:|---:|---:|---:|---|"
    awk -F'\t' -v counts="$ROUTE_COUNTS" -v max="$OTHER_LOAD_MAX" '
    { n[$2]++; cpu[$2] += $7; rps[$2] += $4; flagged[$2] += ($10 > max) }
    END {
        k = split(counts, c, " ")
        base = cpu["pitcher_r" c[1]] / n["pitcher_r" c[1]]
        lo = hi = base
        for (i = 1; i <= k; i++) {
            p = "pitcher_r" c[i]
            if (!n[p]) continue
            m = cpu[p] / n[p]
            if (m < lo) lo = m
            if (m > hi) hi = m
            printf "| %d | %.2f | %+.1f%% | %.0f | %d of %d |\n", c[i], m, 100 * (m / base - 1), rps[p] / n[p], flagged[p], n[p]
        }
        printf "\nspread of the means: %.1f%% (highest / lowest - 1; the goal: at most 5%%)\n", 100 * (hi / lo - 1)
    }' "$RESULTS"
fi

# Redis commands against requests, per fleet-throttle run.
if [[ -s $TMP/redis.tsv ]]; then
    echo
    echo "| fleet throttle | run | requests/s | Redis commands/s | lease round trips/s | requests per Redis command |"
    echo "|---|---:|---:|---:|---:|---:|"
    while IFS=$'\t' read -r scen r calls trips out; do
        IFS=$'\t' read -r reqs rps _ < <(parse_wrk "$out")
        awk -v t="$(scenario_title "$scen")" -v r="$r" -v c="$calls" -v e="$trips" -v n="$reqs" -v rps="$rps" -v d="$DURATION" '
            BEGIN { secs = d + 0; if (d ~ /m$/) secs *= 60
                    printf "| %s | #%s | %.0f | %.1f | %.1f | %.0f |\n", t, r, rps, c / secs, e / secs, (c > 0 ? n / c : 0) }'
    done <"$TMP/redis.tsv"
fi

# ratio_table A B LABEL: per scenario, B's mean req/s and CPU per request
# over A's (both must have run).
ratio_table() {
    local a=$1 b=$2 label=$3 scen
    echo
    echo "| scenario | $label req/s | $label CPU per request |"
    echo "|---|---:|---:|"
    for scen in $SCENARIOS; do
        awk -F'\t' -v s="$scen" -v title="$(scenario_title "$scen")" -v a="$a" -v b="$b" '
        $1 == s { n[$2]++; rps[$2] += $4; cpu[$2] += $7 }
        END {
            if (n[a] && n[b] && rps[a] > 0 && cpu[a] > 0)
                printf "| %s | %.3fx | %.3fx |\n", title, (rps[b] / n[b]) / (rps[a] / n[a]), (cpu[b] / n[b]) / (cpu[a] / n[a])
        }' "$RESULTS"
    done
}

# The fleet throttle relative to the local one, from the means.
if [[ " $PROXIES " == *" pitcher_throttle_local "* && " $PROXIES " == *" pitcher_throttle_fleet "* ]]; then
    ratio_table pitcher_throttle_local pitcher_throttle_fleet fleet/local
fi

# How evenly the two workers shared new connections, per run.
if [[ -s $TMP/balance.tsv ]]; then
    echo
    echo "| accept balance (reuseport scenario) | run | requests per worker |"
    echo "|---|---:|---|"
    awk -F'\t' '{ printf "| %s | #%s | %s |\n", $1, $2, $3 }' "$TMP/balance.tsv"
fi

# The second Pitcher build relative to the first (A/B), from the means.
if [[ " $PROXIES " == *" pitcher "* && " $PROXIES " == *" pitcher_b "* ]]; then
    echo
    echo "pitcher_b = $PITCHER_BIN_B"
    ratio_table pitcher pitcher_b pitcher_b/pitcher
fi
