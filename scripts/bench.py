"""Runs the Tidepool / PgBouncer / PostgreSQL benchmark (see bench.sh) and prints one table."""

import datetime
import glob
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import command_cpu_seconds, cpu_split, free_port, rss_kb, sh, wait_port  # noqa: E402

DURATION = int(os.environ.get("DURATION", "10"))
CLIENTS = [int(c) for c in os.environ.get("CLIENTS", "20 200 1000 5000").split()]
ROUNDS = int(os.environ.get("ROUNDS", "2"))
THREADS = int(os.environ.get("THREADS", str(os.cpu_count())))
MODES = os.environ.get("MODES", "simple extended prepared").split()


def pgbouncer_version():
    out = subprocess.run(["pgbouncer", "-V"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# PgBouncer keeps named prepared statements working in transaction mode from 1.21 on.
BOUNCER_PREPARED = pgbouncer_version() >= (1, 21)
POOL = 20
# max_prepared_statements wherever named prepared statements are kept across servers.
PREPARED_STATEMENTS = 200
WORK = tempfile.mkdtemp(prefix="tidepool-bench-")
os.chmod(WORK, 0o755)
IS_ROOT = os.getuid() == 0


class Pooler:
    def __init__(self, name, port, proc):
        self.name, self.port, self.proc = name, port, proc

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_tidepool(pg_port, prepared=BOUNCER_PREPARED):
    """Tidepool with the features PgBouncer has: named prepared statements are kept across
    servers (max_prepared_statements) only where this PgBouncer does the same, unless `prepared`."""
    settings = (f"default_pool_size = {POOL}\nmax_client_conn = 20000\nthreads = {THREADS}\n"
                f"max_prepared_statements = {PREPARED_STATEMENTS if prepared else 0}\n")
    proc, port = harness.start_tidepool(
        WORK, pg_port, settings,
        database="postgres = host=127.0.0.1 port={pg_port} dbname=postgres")
    return Pooler("tidepool", port, proc)


def start_pgbouncer(pg_port):
    extra = f"max_prepared_statements = {PREPARED_STATEMENTS}\n" if BOUNCER_PREPARED else ""
    proc, port = harness.start_pgbouncer(WORK, pg_port, f"default_pool_size = {POOL}\n{extra}")
    return Pooler("pgbouncer", port, proc)


def pgbench(port, clients, *args, duration=DURATION, logdir=None):
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-c", str(clients),
           "-j", str(min(4, clients)), "-T", str(duration), *args]
    if logdir:
        cmd += ["--log", f"--log-prefix={logdir}/tx", "--sampling-rate=0.2"]
    cmd.append("postgres")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 300)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed ({' '.join(cmd)}):\n{text[-2000:]}")
    result = {
        "tps": float(re.search(r"tps = ([\d.]+)", text).group(1)),
        "avg": float(re.search(r"latency average = ([\d.]+) ms", text).group(1)),
        "tx": int(re.search(r"number of transactions actually processed: (\d+)", text).group(1)),
        "failed": int((re.search(r"number of failed transactions: (\d+)", text) or [0, 0])[1]),
        "cmd": " ".join(cmd),
    }
    if logdir:
        lat = []
        for path in glob.glob(f"{logdir}/tx*"):
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3:
                        lat.append(int(parts[2]))
            os.remove(path)
        lat.sort()
        result["p99"] = lat[int(len(lat) * 0.99) - 1] / 1000 if lat else float("nan")
    return result


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Where the machine's CPU goes during a run, per 100,000 transactions: the pooler's user and system
# time, all PostgreSQL processes, and pgbench (the only child that ends during a run).
CPU_PARTS = ("user", "system", "postgres", "pgbench")


def measure(pooler, clients, mode):
    logdir = tempfile.mkdtemp(dir=WORK)
    user, system = cpu_split(pooler.proc.pid)
    postgres, bench, started = command_cpu_seconds("postgres"), children_cpu(), time.monotonic()
    r = pgbench(pooler.port, clients, "-S", "-M", mode, logdir=logdir)
    wall = time.monotonic() - started
    user_after, system_after = cpu_split(pooler.proc.pid)
    per_100k = 100_000 / max(r["tx"], 1)
    r["user"] = (user_after - user) * per_100k
    r["system"] = (system_after - system) * per_100k
    r["postgres"] = (command_cpu_seconds("postgres") - postgres) * per_100k
    r["pgbench"] = (children_cpu() - bench) * per_100k
    r["cpu_per_100k"] = r["user"] + r["system"]
    r["all"] = sum(r[k] for k in CPU_PARTS)
    r["busy"] = r["all"] / per_100k / wall  # cores kept busy by the three
    shutil.rmtree(logdir, ignore_errors=True)
    return r


def idle_memory(pooler, clients=5000):
    """RSS per idle client: 5000 clients connected and sleeping, minus the RSS with none."""
    time.sleep(0.5)
    base = rss_kb(pooler.proc.pid)
    script = os.path.join(WORK, "idle.sql")
    with open(script, "w") as f:
        f.write("\\sleep 8 s\n")
    proc = subprocess.Popen(["pgbench", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "postgres", "-n",
                             "-c", str(clients), "-j", "4", "-t", "1", "-f", script, "postgres"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6)
    loaded = rss_kb(pooler.proc.pid)
    proc.wait()
    return (loaded - base) * 1024 / clients, base, loaded


def mean(values):
    return sum(values) / len(values)


def main():
    pg_port = free_port()
    sh(f"start_postgres '{WORK}/pg' {pg_port} off")
    pgdir = os.path.join(WORK, "pg")
    rows = []
    commands = []
    try:
        sh(f"pgbench -i -q -s 10 -h 127.0.0.1 -p {pg_port} -U postgres postgres")
        tidepool = start_tidepool(pg_port)
        bouncer = start_pgbouncer(pg_port)
        tracking = None  # Tidepool with prepared statements kept, for -M prepared alone
        direct = pgbench(pg_port, 20, "-S", "-M", "simple", logdir=tempfile.mkdtemp(dir=WORK))
        commands.append(direct["cmd"])
        rows.append(("direct PostgreSQL", 20, "simple", direct, None))
        for clients in CLIENTS:
            for mode in MODES:
                results = {"tidepool": [], "pgbouncer": []}
                # An older PgBouncer cannot run -M prepared in transaction mode at all; Tidepool
                # runs it alone then, with its prepared-statement tracking on.
                poolers = (tidepool, bouncer)
                if mode == "prepared" and not BOUNCER_PREPARED:
                    if tracking is None:
                        tracking = start_tidepool(pg_port, prepared=True)
                    poolers = (tracking,)
                for _ in range(ROUNDS):
                    for pooler in poolers:
                        r = measure(pooler, clients, mode)
                        results[pooler.name].append(r)
                        commands.append(r["cmd"])
                        print(f"  {pooler.name:9} c={clients:5} {mode:8} tps={r['tps']:9.0f} "
                              f"p99={r['p99']:7.1f}ms failed={r['failed']}", file=sys.stderr, flush=True)
                keys = ("tps", "avg", "p99", "cpu_per_100k", "all", "busy", *CPU_PARTS)
                t = {k: mean([r[k] for r in results["tidepool"]]) for k in keys}
                p = None
                if results["pgbouncer"]:
                    p = {k: mean([r[k] for r in results["pgbouncer"]]) for k in keys}
                    p["failed"] = sum(r["failed"] for r in results["pgbouncer"])
                    # Each round's pair ran back to back, so its ratio is the fairer comparison on a
                    # machine whose speed drifts; the table shows their range beside the ratio of means.
                    p["ratios"] = [a["tps"] / b["tps"] for a, b in zip(results["tidepool"], results["pgbouncer"])]
                t["failed"] = sum(r["failed"] for r in results["tidepool"])
                rows.append(("pair", clients, mode, t, p))
        conn_t = pgbench(tidepool.port, 20, "-S", "-C", duration=DURATION)
        conn_p = pgbench(bouncer.port, 20, "-S", "-C", duration=DURATION)
        commands += [conn_t["cmd"], conn_p["cmd"]]
        tidepool.stop()
        bouncer.stop()
        if tracking is not None:
            tracking.stop()
        # Memory is measured on fresh processes: a process that served the load above has memory
        # its allocator kept, which would hide what idle clients cost.
        fresh = start_tidepool(pg_port)
        pgbench(fresh.port, 1, "-S", duration=1)  # one pool, so that both sides start from the same state
        mem_t = idle_memory(fresh)
        fresh.stop()
        fresh = start_pgbouncer(pg_port)
        pgbench(fresh.port, 1, "-S", duration=1)
        mem_p = idle_memory(fresh)
        fresh.stop()
    finally:
        sh(f"stop_postgres '{pgdir}'")

    lines = []
    lines.append(f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                 f"{os.cpu_count()} cores, Tidepool threads={THREADS}, pool_size={POOL}, "
                 f"{DURATION} s per run, {ROUNDS} alternating rounds")
    lines.append("")
    version = ".".join(map(str, pgbouncer_version()))
    lines.append(f"PgBouncer {version}; Tidepool with the same features: max_prepared_statements = "
                 f"{PREPARED_STATEMENTS if BOUNCER_PREPARED else 0}" + ("" if BOUNCER_PREPARED else
                 " (this PgBouncer keeps no prepared statements; Tidepool's -M prepared row runs with "
                 f"{PREPARED_STATEMENTS})")
                 + ".")
    lines.append("")
    lines.append("| clients | protocol | Tidepool tps | PgBouncer tps | ratio (rounds) | Tidepool avg / p99 ms | "
                 "PgBouncer avg / p99 ms | CPU s per 100k tx (T / P) | failed (T / P) |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, clients, mode, t, p in rows:
        if p is None and label == "pair":
            lines.append(f"| {clients} | {mode} | {t['tps']:.0f} | n/a (PgBouncer {'.'.join(map(str, pgbouncer_version()))} "
                         f"has no prepared statements in transaction mode) | | {t['avg']:.2f} / {t['p99']:.2f} | | "
                         f"{t['cpu_per_100k']:.2f} | {t['failed']} |")
            continue
        if p is None:
            lines.append(f"| {clients} | {mode} | direct PostgreSQL: {t['tps']:.0f} | | | "
                         f"{t['avg']:.2f} / {t['p99']:.2f} | | | {t['failed']} |")
            continue
        spread = f"{min(p['ratios']):.2f}-{max(p['ratios']):.2f}"
        lines.append(f"| {clients} | {mode} | {t['tps']:.0f} | {p['tps']:.0f} | {t['tps'] / p['tps']:.2f} ({spread}) | "
                     f"{t['avg']:.2f} / {t['p99']:.2f} | {p['avg']:.2f} / {p['p99']:.2f} | "
                     f"{t['cpu_per_100k']:.2f} / {p['cpu_per_100k']:.2f} | {t['failed']} / {p['failed']} |")
    lines.append("")
    lines.append("Where the CPU goes, seconds per 100,000 transactions (Tidepool / PgBouncer): the pooler's "
                 "user and system time, all PostgreSQL processes, pgbench, their sum, and how many cores "
                 "they kept busy. With the cores saturated, tps is about cores / CPU per transaction, so a "
                 "pooler that made PgBouncer's system calls with no user time at all would reach at most "
                 "(PgBouncer's sum) / (its sum - its user time) times PgBouncer's tps: the last column.")
    lines.append("")
    lines.append("| clients | protocol | pooler user | pooler system | PostgreSQL | pgbench | sum | cores busy | "
                 "ceiling |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, clients, mode, t, p in rows:
        if label != "pair" or p is None:
            continue
        cells = " | ".join(f"{t[k]:.2f} / {p[k]:.2f}" for k in (*CPU_PARTS, "all", "busy"))
        lines.append(f"| {clients} | {mode} | {cells} | {p['all'] / (p['all'] - p['user']):.2f}x |")
    lines.append("")
    lines.append(f"- New connection per transaction (`pgbench -C -S -c 20`): Tidepool {conn_t['tps']:.0f} tps, "
                 f"PgBouncer {conn_p['tps']:.0f} tps ({conn_t['tps'] / conn_p['tps']:.2f}x).")
    lines.append(f"- Memory per idle client (5,000 connected, RSS difference): Tidepool {mem_t[0]:.0f} B "
                 f"({mem_t[1] // 1024} → {mem_t[2] // 1024} MiB), PgBouncer {mem_p[0]:.0f} B "
                 f"({mem_p[1] // 1024} → {mem_p[2] // 1024} MiB).")
    lines.append("")
    lines.append("<details><summary>Commands</summary>\n")
    lines.append("```")
    lines.append("scripts/bench.sh  # " + " ".join(f"{k}={os.environ[k]}" for k in
                                                   ("DURATION", "CLIENTS", "ROUNDS", "THREADS", "MODES")
                                                   if k in os.environ))
    shown = [re.sub(r"-p \d+", "-p PORT", re.sub(r"--log-prefix=\S+", "--log-prefix=DIR/tx", c)) for c in commands]
    for c in dict.fromkeys(shown):
        lines.append(c)
    lines.append("```\n</details>\n")
    table = "\n".join(lines)
    harness.record(table)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
