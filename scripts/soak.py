"""Soak test (see soak.sh): mixed load on Tidepool for DURATION seconds while RSS and open file
descriptors are sampled every 10 s; memory must stay flat after warm-up and fds must not grow."""

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import free_port, record, rss_kb, sh, start_tidepool  # noqa: E402

DURATION = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("DURATION", "1800"))
SAMPLE = int(os.environ.get("SAMPLE", "10"))
WORK = tempfile.mkdtemp(prefix="tidepool-soak-")
os.chmod(WORK, 0o755)


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def main():
    pg_port = free_port()
    sh(f"start_postgres '{WORK}/pg' {pg_port} off")
    procs = []
    samples = []
    try:
        sh(f"pgbench -i -q -s 2 -h 127.0.0.1 -p {pg_port} -U postgres postgres")
        tidepool, port = start_tidepool(
            WORK, pg_port, "default_pool_size = 20\nmax_client_conn = 5000\nadmin_users = postgres\nstats_period = 10\n")
        procs.append(tidepool)
        long_tx = os.path.join(WORK, "long.sql")
        with open(long_tx, "w") as f:
            f.write("BEGIN;\nSELECT pg_sleep(0.2);\nUPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1;\n"
                    "END;\n")
        base = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-T", str(DURATION)]
        loads = [
            base + ["-c", "50", "-j", "2", "-S", "-R", "1500"],  # short transactions, simple protocol
            base + ["-c", "20", "-j", "1", "-S", "-M", "prepared", "-R", "500"],  # prepared statements
            base + ["-c", "10", "-j", "1", "-f", long_tx],  # long transactions
            base + ["-c", "4", "-j", "1", "-S", "-C", "-R", "40"],  # a connection per transaction
        ]
        outputs = []
        for cmd in loads:
            p = subprocess.Popen(cmd + ["postgres"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(p)
            outputs.append(p)
        stop = threading.Event()
        admin_errors = []

        def admin_loop():
            while not stop.is_set():
                for command in ("SHOW POOLS", "SHOW STATS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW LATENCY",
                                "SHOW MEM"):
                    r = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d",
                                        "pgbouncer", "-Atc", command], capture_output=True, text=True)
                    if r.returncode != 0:
                        admin_errors.append(r.stderr.strip())
                stop.wait(5)

        admin = threading.Thread(target=admin_loop)
        admin.start()
        start = time.time()
        while time.time() - start < DURATION:
            samples.append((round(time.time() - start), rss_kb(tidepool.pid), fd_count(tidepool.pid)))
            print(f"  t={samples[-1][0]:5}s rss={samples[-1][1]} kB fds={samples[-1][2]}", file=sys.stderr,
                  flush=True)
            time.sleep(SAMPLE)
        stop.set()
        admin.join()
        failed = 0
        processed = 0
        for p in outputs:
            out, _ = p.communicate(timeout=120)
            for line in out.splitlines():
                if line.startswith("number of failed transactions:"):
                    failed += int(line.split(":")[1].split()[0])
                if line.startswith("number of transactions actually processed:"):
                    processed += int(line.split(":")[1].split()[0])
        time.sleep(2)
        samples.append((round(time.time() - start), rss_kb(tidepool.pid), fd_count(tidepool.pid)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
        sh(f"stop_postgres '{WORK}/pg'")

    warm = [s for s in samples if s[0] >= min(120, DURATION // 5)] or samples
    rss = [s[1] for s in warm]
    low, high = min(rss), max(rss)
    first_fd = warm[0][2]
    last_fd = samples[-1][2]
    flat = high <= low * 1.05
    fds_ok = last_fd <= first_fd
    lines = [
        f"### Soak {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {DURATION} s, "
        f"sampled every {SAMPLE} s",
        "",
        f"- Load: 50 clients simple -S at 1,500 tx/s, 20 clients -M prepared at 500 tx/s, 10 clients in 0.2 s "
        f"transactions, 4 clients connecting per transaction, admin SHOW commands every 5 s; pool of 20.",
        f"- {processed} transactions, {failed} failed; admin command errors: {len(admin_errors)}.",
        f"- RSS after warm-up: {low} to {high} kB ({(high - low) * 100 / max(low, 1):.1f} % spread, "
        f"{'flat' if flat else 'NOT flat'} within 5 %).",
        f"- Open fds: {first_fd} after warm-up, {last_fd} after the load ended ({'no growth' if fds_ok else 'GREW'}).",
        "",
        "```",
        f"scripts/soak.sh {DURATION}",
        "```",
        "",
    ]
    text = "\n".join(lines)
    record(text)
    shutil.rmtree(WORK, ignore_errors=True)
    ok = flat and fds_ok and failed == 0 and not admin_errors
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
