#!/usr/bin/env python3
"""Reload time and worker memory with a configuration of many routes.

Writes the configuration of tests/proxy_routing_rules.rs's 10,000-route test
(ROUTES routes over CLUSTERS clusters, ``workers = WORKERS``; even routes by
exact host, odd ones by path prefix, every tenth with a header condition),
starts a master in the foreground, and reloads it RELOADS times, each time
with the routes shifted by one cluster (so every reload changes every
route). For each reload: the wall time of ``pitcher -s reload`` (it returns
when every worker confirmed the new configuration), each worker's own apply
time from its log line (``apply_ms``) and the RSS of every worker after it.
Also times ``pitcher -t`` on the file. Prints markdown.

    tools/reload_scale.py                              # target/debug/pitcher
    PITCHER_BIN=target/release/pitcher RELOADS=10 tools/reload_scale.py

The master is started here and stopped by its pid. KEEP_TMP=1 keeps the
directory (configuration, master.log). Standard library only.
"""

import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.abspath(os.environ.get("PITCHER_BIN", os.path.join(ROOT, "target/debug/pitcher")))
ROUTES = int(os.environ.get("ROUTES", "10000"))
CLUSTERS = int(os.environ.get("CLUSTERS", "2000"))
WORKERS = int(os.environ.get("WORKERS", "2"))
RELOADS = int(os.environ.get("RELOADS", "8"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(port, dirname, shift):
    t = [f"workers = {WORKERS}", 'log_level = "info"',
         f'pid_file = "{dirname}/pitcher.pid"', f'control_socket = "{dirname}/ctl.sock"',
         "", "[[listeners]]", f'address = "127.0.0.1:{port}"', ""]
    for i in range(CLUSTERS):
        t.append(f'[[clusters]]\nname = "c{i}"\nbackends = ["127.0.0.1:{9000 + i % 4}"]\n')
    for j in range(ROUTES):
        t.append("[[routes]]")
        if j % 2 == 0:
            t.append(f'host = "svc{j}.example"\npath_prefix = "/v1"')
        else:
            t.append(f'path_prefix = "/r{j}/"')
        if j % 10 == 1:
            t.append('header = { name = "X-Tenant" }')
        t.append(f'cluster = "c{(j + shift) % CLUSTERS}"')
    t.append('[[routes]]\nreturn = { status = 404, body = "none" }\n')
    return "\n".join(t)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid):
    """utime + stime of a process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def run(args, **kw):
    return subprocess.run([BIN] + args, capture_output=True, text=True, timeout=60, **kw)


def main():
    d = tempfile.mkdtemp(prefix="pitcher-reload-")
    conf = os.path.join(d, "pitcher.toml")
    log_path = os.path.join(d, "master.log")
    with open(conf, "w") as f:
        port = free_port()
        f.write(config(port, d, 0))
    size_kb = os.path.getsize(conf) / 1024

    t_runs = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(3):
        t0 = time.monotonic()
        out = run(["-t", "-c", conf])
        t_runs.append(time.monotonic() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            sys.exit(f"-t failed: {out.stderr}")
    t_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    t_peak = after.ru_maxrss / 1024

    log = open(log_path, "w")
    master = subprocess.Popen([BIN, "--foreground", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(children(master.pid)) == WORKERS and run(["-c", conf, "ctl", "status"]).returncode == 0:
                break
            time.sleep(0.1)
        time.sleep(1)
        workers = children(master.pid)
        start_rss = [rss_mb(w) for w in workers]
        rows = []
        for r in range(1, RELOADS + 1):
            with open(conf, "w") as f:
                f.write(config(port, d, r))
            procs = [master.pid] + children(master.pid)
            cpu0 = [cpu_s(p) for p in procs]
            t0 = time.monotonic()
            out = run(["-c", conf, "-s", "reload"])
            wall = time.monotonic() - t0
            if out.returncode != 0:
                sys.exit(f"reload failed: {out.stdout} {out.stderr}")
            time.sleep(0.3)
            # All the reload's CPU, what follows the confirmation included.
            cpu = [cpu_s(p) - c for p, c in zip(procs, cpu0)]
            with open(log_path) as f:
                applies = re.findall(r"configuration reloaded.*?apply_ms: ([0-9.]+)", f.read())
            rows.append((wall, applies[-WORKERS:], cpu, [rss_mb(w) for w in children(master.pid)]))
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
        log.close()

    walls = [w for w, _, _, _ in rows]
    print(f"{ROUTES} routes, {CLUSTERS} clusters, {WORKERS} workers, {size_kb:.0f} KB, {BIN}")
    print()
    print(f"`pitcher -t`: {min(t_runs):.3f}–{max(t_runs):.3f} s wall, "
          f"{t_cpu / len(t_runs):.3f} s CPU per run, {t_peak:.0f} MB peak RSS")
    print(f"worker RSS after start: {', '.join(f'{x:.1f}' for x in start_rss)} MB")
    print()
    print("| reload | `-s reload` wall | master CPU | workers' CPU | worker apply (log) | worker RSS after |")
    print("|---:|---:|---:|---|---|---|")
    for i, (wall, applies, cpu, rss) in enumerate(rows, 1):
        a = ", ".join(f"{float(x):.0f} ms" for x in applies) or "—"
        w = ", ".join(f"{x * 1000:.0f}" for x in cpu[1:])
        print(f"| {i} | {wall * 1000:.0f} ms | {cpu[0] * 1000:.0f} ms | {w} ms | {a} | "
              f"{', '.join(f'{x:.1f}' for x in rss)} MB |")
    print()
    print(f"`-s reload` wall: median {statistics.median(walls) * 1000:.0f} ms, "
          f"min {min(walls) * 1000:.0f}, max {max(walls) * 1000:.0f}; master CPU median "
          f"{statistics.median(c[0] for _, _, c, _ in rows) * 1000:.0f} ms, worker CPU median "
          f"{statistics.median(x for _, _, c, _ in rows for x in c[1:]) * 1000:.0f} ms")
    if os.environ.get("KEEP_TMP"):
        print(f"kept {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)

if __name__ == "__main__":
    main()
