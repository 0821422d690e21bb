"""Memory and latency with clients that do not read (see slowclients.sh): for Tidepool and
PgBouncer in front of the same PostgreSQL, five clients that never read a 3 GB result and one that
pipelines 400k queries without reading, while another client runs `select 1` every 20 ms."""

import datetime
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import free_port, rss_kb, sh  # noqa: E402

import psycopg  # noqa: E402

SECONDS = int(os.environ.get("SECONDS_UNDER_LOAD", "6"))
WORK = tempfile.mkdtemp(prefix="tidepool-slowclients-")
os.chmod(WORK, 0o755)


def message(kind, body):
    return kind + struct.pack("!i", 4 + len(body)) + body


def logged_in(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    params = b"user\0postgres\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    data = b""
    while b"Z\0\0\0\x05" not in data:
        data += s.recv(65536)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s


def probe(name, pid, port):
    before = rss_kb(pid)
    hogs = [logged_in(port) for _ in range(5)]
    for s in hogs:
        s.sendall(message(b"Q", b"select repeat('x', 1000) from generate_series(1, 3000000)\0"))
    pipeliner = logged_in(port)
    batch = message(b"Q", b"select 1\0") * 1000

    def push():
        try:
            for _ in range(400):
                pipeliner.sendall(batch)
        except OSError:
            pass

    threading.Thread(target=push, daemon=True).start()
    peak, latencies = before, []
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True,
                         prepare_threshold=None) as c:
        end = time.time() + SECONDS
        while time.time() < end:
            started = time.perf_counter()
            c.execute("select 1")
            latencies.append(time.perf_counter() - started)
            peak = max(peak, rss_kb(pid))
            time.sleep(0.02)
    for s in hogs + [pipeliner]:
        s.close()
    time.sleep(3)
    after = rss_kb(pid)
    latencies.sort()
    return (f"| {name} | {before / 1024:.1f} | {peak / 1024:.1f} | {after / 1024:.1f} | "
            f"{latencies[len(latencies) // 2] * 1000:.1f} | {latencies[-1] * 1000:.1f} |")


def main():
    pg_port = free_port()
    sh(f"start_postgres '{WORK}/pg' {pg_port} off")
    rows = []
    poolers = [("Tidepool", harness.start_tidepool)]
    if shutil.which("pgbouncer"):
        poolers.append(("PgBouncer", harness.start_pgbouncer))
    try:
        for name, start in poolers:
            proc, port = start(WORK, pg_port, "default_pool_size = 8\n")
            try:
                rows.append(probe(name, proc.pid, port))
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        sh(f"stop_postgres '{WORK}/pg'")
        shutil.rmtree(WORK, ignore_errors=True)
    harness.record("\n".join([
        f"### Clients that do not read, {datetime.date.today()} (`scripts/slowclients.sh`)",
        "",
        "Five clients never read `select repeat('x', 1000) from generate_series(1, 3000000)`, one "
        "pipelines 400k `select 1` without reading; another runs `select 1` every 20 ms meanwhile "
        f"({SECONDS} s). RSS of the pooler in MB before, at its peak, and 3 s after they left; latency of "
        "the other client's `select 1` in ms.",
        "",
        "| pooler | RSS before | RSS peak | RSS after | select 1 median | select 1 max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]))


if __name__ == "__main__":
    main()
