# shellcheck shell=bash
# tools/lib/procs.sh — process and port helpers shared by tools/bench.sh and
# tools/demo.sh (sourced, bash only). Every process is found and stopped by
# its pid; nothing here matches processes by name. The caller defines die.

# proc_tree PID: prints PID and all its live descendants, one per line, by
# walking the ppid field of /proc/*/stat.
proc_tree() {
    local -A kids=()
    local f line rest pid
    local -a st
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) }            # fields from 3 (state) on; comm may hold spaces
        read -ra st <<<"$rest"
        kids[${st[1]}]+=" $pid"
    done
    local -a queue=("$1")
    local p c
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        [[ -e /proc/$p ]] && printf '%s\n' "$p"
        for c in ${kids[$p]:-}; do queue+=("$c"); done
    done
}

# alive PID: the process exists and is not a zombie.
alive() {
    local line
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    line=${line##*) }
    [[ ${line:0:1} != Z ]]
}

# stop_tree PID: SIGTERM the process and wait up to 5 s for it; then SIGTERM
# what is left of its descendants (a wrapper may have died without them) and
# after 2 s more SIGKILL any survivor. All by pid.
stop_tree() {
    local root=$1 pid i left sig
    local -a tree
    mapfile -t tree < <(proc_tree "$root")
    kill -TERM "$root" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$root" || break
        sleep 0.1
    done
    for sig in TERM KILL; do
        left=0
        for pid in "${tree[@]}"; do
            if alive "$pid"; then
                if [[ $sig == KILL ]]; then printf 'pid %s did not stop, sending SIGKILL\n' "$pid" >&2; fi
                kill "-$sig" "$pid" 2>/dev/null || true
                left=1
            fi
        done
        ((left)) || break
        for ((i = 0; i < 20 && left; i++)); do
            sleep 0.1
            left=0
            for pid in "${tree[@]}"; do
                if alive "$pid"; then left=1; fi
            done
        done
    done
    wait "$root" 2>/dev/null || true
}

# free_ports N: N distinct free TCP ports on 127.0.0.1 (all bound at once so
# they differ; there is a small race until our servers bind them).
free_ports() {
    "${PYTHON:-python3}" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# wait_http NAME PID PORT LOG: wait (max 10 s) until PORT answers HTTP; fail
# with the log's tail if the process dies or never answers.
wait_http() {
    local name=$1 pid=$2 port=$3 logf=$4 i
    for ((i = 0; i < 100; i++)); do
        if ! alive "$pid"; then
            tail -n 20 "$logf" >&2 || true
            die "$name (pid $pid) exited during startup (log tail above: $logf)"
        fi
        if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/"; then
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    die "$name (pid $pid) did not answer on 127.0.0.1:$port within 10 s (log tail above: $logf)"
}
