#!/usr/bin/env python3
"""Memory and processes of a Pitcher instance during binary upgrades under load.

Starts a master (``workers = WORKERS``) in front of tools/demo_backend.py,
runs the load of issue 12's measurement against it (wrk with CONNECTIONS
keep-alive connections over THREADS threads, and CLOSE clients that open a
connection per request), samples every process of
the instance (every process whose command line names the test's
configuration file) every 10 ms, and upgrades the binary UPGRADES times (a
fresh copy renamed over the master's path, then ``pitcher -s upgrade``).
Prints, as markdown: for each upgrade, the steady RSS just before it and
the peak RSS and PSS summed over the instance (with their ratio to it),
the most processes seen at once, wrk's totals and errors, the connections
handed over and closed (``ctl status``), and the backend connections opened
during each upgrade (the new generation's pools start empty).

    tools/upgrade_rss.py                      # target/debug/pitcher
    PITCHER_BIN=target/release/pitcher WORKERS=4 tools/upgrade_rss.py

Every process is started here and stopped by its pid. KEEP_TMP=1 keeps the
directory (configuration, master.log). Standard library only.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.abspath(os.environ.get("PITCHER_BIN", os.path.join(ROOT, "target/debug/pitcher")))
WORKERS = int(os.environ.get("WORKERS", "2"))
UPGRADES = int(os.environ.get("UPGRADES", "4"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "20"))
THREADS = int(os.environ.get("THREADS", "2"))
CLOSE = int(os.environ.get("CLOSE", "8"))
SAMPLE = 0.01


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def family(needle):
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        # Masters and workers; not the `-s upgrade` or `ctl` commands.
        if needle in cmd and state != "Z" and ("--foreground" in cmd or "worker process" in cmd):
            pids.append(int(d))
    return pids


def memory(pid):
    """(RSS, PSS) in KiB, or None if the process is gone."""
    try:
        rss = pss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
        return rss, pss
    except OSError:
        return None


def roles(needle):
    """[(master|worker, (RSS, PSS))] of the instance now."""
    out = []
    for p in family(needle):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                name = "worker" if b"worker process" in f.read() else "master"
        except OSError:
            continue
        m = memory(p)
        if m:
            out.append((name, m))
    return sorted(out)


def sample(needle):
    """(processes, RSS, PSS) summed, and the processes, in one pass."""
    each = roles(needle)
    return (len(each), sum(m[0] for _, m in each), sum(m[1] for _, m in each)), each


def backend_ports(bport):
    """Local ports of the TCP connections to the backend port now."""
    ports = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(remote.split(":")[1], 16) == bport and state == "01":
                ports.add(int(local.split(":")[1], 16))
    return ports


def pitcher(conf, *args):
    return subprocess.run([BIN, "-c", conf, *args], capture_output=True, text=True, timeout=60)


def main():
    tmp = tempfile.mkdtemp(prefix="pitcher-upgrade-rss")
    os.chmod(tmp, 0o755)
    procs = []
    try:
        exe = os.path.join(tmp, "pitcher")
        shutil.copy2(BIN, exe)
        bport, pport = free_port(), free_port()
        conf = os.path.join(tmp, "pitcher.toml")
        with open(conf, "w") as f:
            f.write(
                f'workers = {WORKERS}\npid_file = "{tmp}/pitcher.pid"\ncontrol_socket = "{tmp}/pitcher.sock"\n'
                'drain_timeout_ms = 10000\nupgrade_timeout_ms = 20000\nlog_level = "info"\n'
                f'[[listeners]]\naddress = "127.0.0.1:{pport}"\n'
                f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{bport}"]\n'
                '[[routes]]\npath_prefix = "/"\ncluster = "app"\n'
            )
        backend = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tools/demo_backend.py"), "--name", "a", "--port", str(bport)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(backend)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", bport), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        log = open(os.path.join(tmp, "master.log"), "w")
        master = subprocess.Popen([exe, "--foreground", "-c", conf], stdout=log, stderr=log)
        procs.append(master)
        deadline = time.time() + 20
        while time.time() < deadline:
            st = pitcher(conf, "ctl", "--json", "status")
            if st.returncode == 0 and all(w.get("ready") for w in json.loads(st.stdout)["data"]["workers"]):
                break
            time.sleep(0.1)
        duration = 4 + 4 * UPGRADES
        wrk = subprocess.Popen(
            ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration}s", f"http://127.0.0.1:{pport}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(wrk)
        closing = None
        if CLOSE:
            closing = subprocess.Popen(
                ["wrk", "-t1", f"-c{CLOSE}", f"-d{duration}s", "-H", "Connection: close",
                 f"http://127.0.0.1:{pport}/"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(closing)
        time.sleep(1.0)

        def steady_now(seconds):
            """The instance's mean (processes, RSS, PSS) over `seconds`."""
            got = []
            end = time.time() + seconds
            while time.time() < end:
                got.append(sample(conf)[0])
                time.sleep(SAMPLE)
            return tuple(sum(s[k] for s in got) // len(got) for k in range(3))

        first = steady_now(1.5)
        rows = []
        for i in range(UPGRADES):
            # Each upgrade is measured against the instance it starts from
            # (the first master runs in the foreground and keeps its
            # startup's pages; the masters of later generations do not).
            base = steady_now(0.5) if i else first
            new = os.path.join(tmp, ".pitcher.new")
            shutil.copy2(BIN, new)
            os.rename(new, exe)
            peak = (0, 0, 0)
            at_peak = []
            seen = backend_ports(bport)
            opened = set()
            up = subprocess.Popen([BIN, "-c", conf, "-s", "upgrade"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            settled_at = None
            t0 = time.time()
            while True:
                s, each = sample(conf)
                opened |= backend_ports(bport) - seen
                if s[1] > peak[1]:
                    at_peak = each
                peak = tuple(max(a, b) for a, b in zip(peak, s))
                if up.poll() is not None and s[0] == WORKERS + 1:
                    settled_at = settled_at or time.time()
                    if time.time() - settled_at > 0.3:
                        break
                if time.time() - t0 > 30:
                    break
                time.sleep(SAMPLE)
            out = up.communicate()[0].strip()
            st = json.loads(pitcher(conf, "ctl", "--json", "status").stdout)["data"]["handover"]
            prev = st.get("previous_generation") or {}
            rows.append((i + 1, base, peak, at_peak, time.time() - t0, out, st.get("received"), prev.get("handed_over"),
                         prev.get("closed"), len(opened)))
            time.sleep(1.0)
        wrk_out = wrk.communicate(timeout=duration + 30)[0]
        close_out = closing.communicate(timeout=duration + 30)[0] if closing else ""
        print(f"binary: {BIN}; workers = {WORKERS}; wrk -t{THREADS} -c{CONNECTIONS} keep-alive"
              f" + wrk -c{CLOSE} Connection: close\n")
        per = ", ".join(f"{name} {m[0] / 1024:.1f}" for name, m in roles(conf))
        print(f"steady before the first upgrade: {first[0]} processes, RSS {first[1] / 1024:.1f} MiB, "
              f"PSS {first[2] / 1024:.1f} MiB; at the end (RSS MiB per process): {per}\n")
        print("| upgrade | steady RSS before | peak processes | peak RSS (x steady) | peak PSS (x steady) | took | "
              "received by new | handed over by old | closed by old | backend connections opened | "
              "at the peak (RSS MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for i, base, peak, at_peak, took, out, received, handed, closed, opened in rows:
            ok = "" if "upgrade complete" in out else f" ({out})"
            print(f"| {i}{ok} | {base[1] / 1024:.1f} MiB | {peak[0]} | {peak[1] / 1024:.1f} MiB ({peak[1] / base[1]:.2f}x) | "
                  f"{peak[2] / 1024:.1f} MiB ({peak[2] / base[2]:.2f}x) | {took:.2f} s | {received} | {handed} | "
                  f"{closed} | {opened} | {', '.join(f'{n} {m[0] / 1024:.1f}' for n, m in at_peak)} |")
        for name, out in (("keep-alive", wrk_out), ("close", close_out)):
            if not out:
                continue
            print(f"\nwrk ({name}):")
            for line in out.splitlines():
                if "requests in" in line or "errors" in line.lower() or "Non-2xx" in line:
                    print("    " + line.strip())
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for pid in family(os.path.join(tmp, "pitcher.toml")):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if os.environ.get("KEEP_TMP"):
            print(f"\nkept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
