"""Connect storm (see storm.sh): N clients connect to Tidepool at once, each logs in, runs one query
and stays connected until every client has been served; then all leave. Pool of 20."""

import asyncio
import datetime
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import free_port, record, rss_kb, sh, start_tidepool  # noqa: E402

CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
WORK = tempfile.mkdtemp(prefix="tidepool-storm-")
os.chmod(WORK, 0o755)


async def read_until_ready(reader):
    """Reads messages until ReadyForQuery; returns the types seen."""
    types = []
    while True:
        header = await reader.readexactly(5)
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        await reader.readexactly(length - 4)
        types.append(kind)
        if kind == b"Z":
            return types


async def client(port, everyone_served, counts, connects):
    try:
        async with connects:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        params = b"user\0postgres\0database\0postgres\0\0"
        writer.write(struct.pack("!ii", 8 + len(params), 196608) + params)
        if b"E" in await read_until_ready(reader):
            raise RuntimeError("login refused")
        query = b"SELECT 1\0"
        writer.write(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        if b"E" in await read_until_ready(reader):
            raise RuntimeError("query failed")
        counts["served"] += 1
        if counts["served"] == CLIENTS:
            everyone_served.set()
        await everyone_served.wait()
        writer.write(b"X\0\0\0\x04")
        await writer.drain()
        writer.close()
    except Exception as e:  # noqa: BLE001 - counted and reported
        counts["failed"] += 1
        counts.setdefault("errors", []).append(repr(e))
        if counts["served"] + counts["failed"] == CLIENTS:
            everyone_served.set()


async def storm(port):
    everyone_served = asyncio.Event()
    counts = {"served": 0, "failed": 0}
    connects = asyncio.Semaphore(1000)  # connects in flight at once (the kernel's accept backlog)
    start = time.time()
    await asyncio.gather(*(client(port, everyone_served, counts, connects) for _ in range(CLIENTS)))
    return counts, time.time() - start


def main():
    pg_port = free_port()
    sh(f"start_postgres '{WORK}/pg' {pg_port} off")
    tidepool = None
    try:
        tidepool, port = start_tidepool(
            WORK, pg_port, f"default_pool_size = 20\nmax_client_conn = {CLIENTS + 100}\nquery_wait_timeout = 120\n")
        rss_before = rss_kb(tidepool.pid)
        counts, seconds = asyncio.run(storm(port))
        rss_peak = rss_kb(tidepool.pid)
    finally:
        if tidepool is not None and tidepool.poll() is None:
            tidepool.terminate()
            tidepool.wait(timeout=30)
        sh(f"stop_postgres '{WORK}/pg'")
    lines = [
        f"### Connect storm {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {CLIENTS} clients, "
        f"pool of 20",
        "",
        f"- {counts['served']} served, {counts['failed']} failed, in {seconds:.1f} s "
        f"({counts['served'] / seconds:.0f} logins+queries per second); all {CLIENTS} held open at the end.",
        f"- Tidepool RSS {rss_before // 1024} MiB before, {rss_peak // 1024} MiB with every client connected.",
        "",
        "```",
        f"scripts/storm.sh {CLIENTS}",
        "```",
        "",
    ]
    if counts.get("errors"):
        lines.insert(3, f"- First errors: {counts['errors'][:3]}")
    text = "\n".join(lines)
    record(text)
    shutil.rmtree(WORK, ignore_errors=True)
    sys.exit(0 if counts["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
