"""Bounded memory: clients that read slowly (or not at all), send faster than their server takes,
or announce huge messages cost the pooler a bounded amount of memory, and nobody else waits."""

import hashlib
import socket
import struct
import subprocess
import threading
import time

from conftest import RELEASE_BINARY, free_port
from test_admin import admin
from test_admin_views import http, metric
from test_auth_limits import userlist  # noqa: F401  (fixture)
from test_bad_input import error_fields, read_all
from test_faults import message, raw_startup
from test_lifecycle import hold_servers


def rss_mb(t):
    with open(f"/proc/{t.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """The pooler's largest RSS while the `with` block runs, sampled every 0.1 s."""

    def __init__(self, t, before):
        self.t, self.peak = t, before
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self.watch)

    def watch(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, rss_mb(self.t))

    def __enter__(self):
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.watcher.join()


def query(sql):
    return message(b"Q", sql.encode() + b"\0")


def hog(t, sql):
    """A logged-in client that sends `sql` and never reads the answer."""
    s = raw_startup(t.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(query(sql))
    return s


def warm(t, clients=8):
    """Opens the pool's servers and lets the pooler's memory settle, so growth is measured from a
    steady state."""
    hold_servers(t, clients)
    time.sleep(0.5)
    return rss_mb(t)


def test_clients_that_do_not_read_hold_no_memory(tidepool):
    """Five clients that never read a 3 GB result and one that pipelines 400k queries without
    reading: the pooler stops reading their servers, its memory stays put, another client's
    queries are not slowed (checked on the release build: a debug build is ten times slower at
    the pipeline's work), and the memory is back when they leave. SHOW MEM and /metrics show
    what the connections buffer."""
    port = free_port()
    t = tidepool(settings=f"default_pool_size = 8\nadmin_users = admin\nstats_listen_port = {port}\n",
                 binary=RELEASE_BINARY)
    before = warm(t)
    hogs = [hog(t, "select repeat('x', 1000) from generate_series(1, 3000000)") for _ in range(5)]
    pipeliner = raw_startup(t.port)
    pipeliner.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    batch = query("select 1") * 1000

    def push():
        try:
            for _ in range(400):
                pipeliner.sendall(batch)
        except OSError:
            pass  # blocked until the socket timeout: the pooler stopped reading it

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    latencies = []
    peak = before
    try:
        with t.connect() as c:
            end = time.time() + 6
            while time.time() < end:
                started = time.perf_counter()
                assert c.execute("SELECT 1").fetchone()[0] == 1
                latencies.append(time.perf_counter() - started)
                peak = max(peak, rss_mb(t))
                time.sleep(0.02)
        with admin(t) as console:
            mem = {r[0]: r for r in console.execute("SHOW MEM").fetchall()}
        _, metrics = http(port, "/metrics")
    finally:
        for s in hogs:
            s.close()
        pipeliner.close()
    assert peak - before < 150, f"RSS grew from {before:.0f} MB to {peak:.0f} MB"
    if RELEASE_BINARY:
        assert max(latencies) < 0.1, f"slowest select 1: {max(latencies) * 1000:.0f} ms"
    # Six clients hold bytes, each a bounded amount (max_buffered_bytes and a read or two).
    name, largest, holding, _, total = mem["client_buffers"]
    assert 1 <= holding <= 6 and 0 < largest < 2 << 20 and total < 6 * (2 << 20), mem["client_buffers"]
    assert 0 < metric(metrics, "tidepool_buffered_bytes", side="client") < 6 * (2 << 20)
    pusher.join(10)
    time.sleep(1)
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    after = rss_mb(t)
    assert after - before < 50, f"RSS {before:.0f} MB before, {after:.0f} MB after the clients left"


def read_result(sock, rate=None):
    """Reads a simple query's answer up to ReadyForQuery, at most `rate` bytes a second. Returns
    the rows' first column values."""
    data = bytearray()
    started = time.time()
    sock.settimeout(30)
    while not data.endswith(b"Z\0\0\0\x05I"):
        chunk = sock.recv(16384)
        assert chunk, "closed before ReadyForQuery"
        data += chunk
        if rate:
            ahead = len(data) / rate - (time.time() - started)
            if ahead > 0:
                time.sleep(ahead)
    values = []
    i = 0
    while i < len(data):
        kind = data[i:i + 1]
        length = struct.unpack("!i", data[i + 1:i + 5])[0]
        if kind == b"D":
            size = struct.unpack("!i", data[i + 7:i + 11])[0]
            values.append(bytes(data[i + 11:i + 11 + size]))
        elif kind == b"E":
            raise AssertionError(error_fields(bytes(data[i:])))
        i += 1 + length
    return values


def test_slow_reader_gets_the_whole_result_with_memory_bounded(tidepool, pg):
    """A client reading at 1 MB/s gets every row intact while the pooler holds a bounded part of
    the result."""
    rows, width = 10_000, 1000
    sql = f"select repeat(chr(65 + mod(i, 26)), {width}) || i from generate_series(1, {rows}) i order by i"
    expected = pg.scalar(f"select md5(string_agg(v, '' order by n)) from "
                         f"(select row_number() over () n, v from ({sql}) q(v)) r")
    t = tidepool()
    before = warm(t, clients=2)
    s = raw_startup(t.port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.sendall(query(sql))
    with PeakRSS(t, before) as rss:
        values = read_result(s, rate=1_000_000)
    assert len(values) == rows
    assert hashlib.md5(b"".join(values)).hexdigest() == expected
    # Unbounded, the pooler would hold most of the 10 MB result at once.
    assert rss.peak - before < 4, f"RSS grew from {before:.1f} MB to {rss.peak:.1f} MB"
    s.close()


def test_copy_in_faster_than_the_server_takes_is_bounded(tidepool, pg):
    """COPY FROM STDIN of 2 GB into a table slowed by a trigger: the pooler stops reading the
    client while its server cannot take more, every row arrives, and memory stays bounded."""
    with pg.connect() as c:
        c.execute("DROP TABLE IF EXISTS slow_sink")
        c.execute("CREATE UNLOGGED TABLE slow_sink (line text)")
        c.execute("DROP SEQUENCE IF EXISTS slow_sink_rows")
        c.execute("CREATE SEQUENCE slow_sink_rows")
        # Counts each row and drops it (no disk used); sleeps now and then to fall behind.
        c.execute("""CREATE OR REPLACE FUNCTION slow_sink_count() RETURNS trigger AS $$
            BEGIN
                IF nextval('slow_sink_rows') % 50000 = 0 THEN PERFORM pg_sleep(0.05); END IF;
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        c.execute("CREATE TRIGGER slow_sink_count BEFORE INSERT ON slow_sink "
                  "FOR EACH ROW EXECUTE FUNCTION slow_sink_count()")
    t = tidepool()
    before = warm(t, clients=2)
    line = b"y" * 4095 + b"\n"
    chunk = line * 256  # 1 MB
    chunks = 2048
    with PeakRSS(t, before) as rss:
        with t.connect() as c:
            with c.cursor().copy("COPY slow_sink FROM STDIN") as copy:
                for _ in range(chunks):
                    copy.write(chunk)
    arrived = pg.scalar("SELECT last_value FROM slow_sink_rows")
    assert arrived == chunks * 256
    assert rss.peak - before < 100, f"RSS grew from {before:.0f} MB to {rss.peak:.0f} MB"
    with pg.connect() as c:
        c.execute("DROP TABLE slow_sink")
        c.execute("DROP FUNCTION slow_sink_count()")
        c.execute("DROP SEQUENCE slow_sink_rows")


def test_queued_client_is_read_only_up_to_a_bound(tidepool):
    """A client queued for a server (the pool's one server is in a transaction) that sends a 40 MB
    query is read only up to max_buffered_bytes; once the server is free the query runs at once."""
    t = tidepool(settings="default_pool_size = 1\n")
    before = warm(t, clients=1)
    holder = t.connect()
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    s = raw_startup(t.port)
    size = 40 << 20
    sent = threading.Event()

    def send():
        try:
            s.sendall(query(f"select length('{'q' * size}')"))
            sent.set()
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    time.sleep(2)
    assert not sent.is_set(), "the whole query was taken while queued"
    assert rss_mb(t) - before < 20
    started = time.time()
    holder.execute("COMMIT")
    sender.join(20)
    assert sent.is_set()
    s.settimeout(20)
    data = b""
    while b"Z\0\0\0\x05" not in data:
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    assert str(size).encode() in data
    assert time.time() - started < 5
    holder.close()
    s.close()


def test_huge_messages_before_login_are_refused_at_once(tidepool, userlist):
    """A PasswordMessage announcing 1.5 GB is refused at its header (PostgreSQL takes a few kB
    there), and other clients' queries are not slowed."""
    t = tidepool(settings="auth_type = md5\n", userlist=userlist)
    with t.connect(user="md5user", password="md5-secret") as c:
        baseline = []
        for _ in range(20):
            started = time.perf_counter()
            c.execute("SELECT 1")
            baseline.append(time.perf_counter() - started)
        s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        params = b"user\0md5user\0database\0postgres\0\0"
        s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        assert s.recv(65536)[:1] == b"R"  # asked for a password
        started = time.time()
        s.sendall(b"p" + struct.pack("!i", 1_500_000_000) + b"z" * 65536)
        answer = read_all(s, timeout=5)
        assert time.time() - started < 1
        fields = error_fields(answer)
        assert fields["S"] == "FATAL" and fields["C"] == "54000", fields
        during = []
        for _ in range(20):
            started = time.perf_counter()
            c.execute("SELECT 1")
            during.append(time.perf_counter() - started)
        assert max(during) < max(0.05, 5 * max(baseline))


def test_messages_longer_than_postgres_takes_are_refused_at_once(tidepool):
    """A Parse announcing 1.5 GB is refused at its header: PostgreSQL refuses messages over 1 GB,
    so holding or passing it on would only burn memory and time."""
    t = tidepool()
    s = raw_startup(t.port)
    started = time.time()
    s.sendall(b"P" + struct.pack("!i", 1_500_000_000) + b"\0" + b"z" * 65536)
    fields = error_fields(read_all(s, timeout=5))
    assert time.time() - started < 1
    assert fields["C"] == "54000", fields
    s.close()
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def big_bind(t, size, close_another):
    """Parse, Bind with a `size`-byte value, Execute, optionally a pipelined Close of another
    statement, Sync; the seconds until ReadyForQuery."""
    s = raw_startup(t.port)
    value = b"v" * size
    out = message(b"P", b"big\0select length($1::text)\0\0\0")
    out += message(b"B", b"\0big\0" + struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0))
    out += message(b"E", b"\0" + struct.pack("!i", 0))
    if close_another:
        out += message(b"C", b"Sother\0")
    out += message(b"S")
    started = time.perf_counter()
    s.sendall(out)
    s.settimeout(30)
    data = b""
    while not data.endswith(b"Z\0\0\0\x05I"):
        chunk = s.recv(65536)
        assert chunk
        data += chunk
    elapsed = time.perf_counter() - started
    assert str(size).encode() in data
    s.close()
    return elapsed


def test_a_pipelined_close_after_a_big_value_costs_nothing_more(tidepool):
    """A 50 MB Bind value followed by a pipelined Close of another statement (held by the
    prepared-statement tracker) costs about what the same request costs without the Close."""
    t = tidepool()
    plain = min(big_bind(t, 50 << 20, False) for _ in range(2))
    with_close = min(big_bind(t, 50 << 20, True) for _ in range(2))
    assert with_close < 2 * plain + 0.3, f"{plain:.2f} s without the Close, {with_close:.2f} s with it"


def pooler_side_open(port):
    """Whether the pooler's end of the client connection from `port` is still open."""
    out = subprocess.run(["ss", "-tnH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


def test_a_client_that_stops_reading_is_still_timed_out(tidepool, pg):
    """A client that stops reading its result holds its server (the server is not read), but
    query_timeout still applies: the query is cancelled, the client's socket closed although it
    cannot take the error (its buffers are full), and the server closed rather than handed on."""
    t = tidepool(settings="query_timeout = 2\n")
    s = hog(t, "select repeat('x', 1000), 'wedged' from generate_series(1, 3000000)")
    port = s.getsockname()[1]
    time.sleep(0.5)
    sql = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()"
    assert pg.scalar(sql, "%'wedged'%") == 1
    assert pooler_side_open(port)
    started = time.time()
    while time.time() - started < 10:
        if not pooler_side_open(port) and not pg.scalar(sql, "%'wedged'%"):
            break
        time.sleep(0.2)
    elapsed = time.time() - started
    assert 1.0 < elapsed < 5, f"client socket or server still open after {elapsed:.1f} s"
    assert "query_timeout" in t.log()
    s.close()
