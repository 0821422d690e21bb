"""LISTEN/NOTIFY in transaction pooling: the pooler's listener connection per pool fans the
notifications out to the clients listening, whichever server they are lent, or none."""

import asyncio
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import free_port
from test_admin_views import http, metric
from test_bad_input import read_all, startup
from test_core import read_until_ready


def walk(data):
    """(type, body) of each whole message in `data`."""
    i = 0
    while i + 5 <= len(data):
        length = struct.unpack("!i", data[i + 1:i + 5])[0]
        if i + 1 + length > len(data):
            return
        yield data[i], data[i + 5:i + 1 + length]
        i += 1 + length


def pooled(tidepool, size=3, extra=""):
    return tidepool(settings=f"pool_mode = transaction\ndefault_pool_size = {size}\nadmin_users = postgres\n"
                             f"max_client_conn = 400\nquery_wait_timeout = 30\n{extra}")


def drain(conn, timeout=0.3):
    """Every notification the connection has received so far, waiting `timeout` for more."""
    return [(n.channel, n.payload) for n in conn.notifies(timeout=timeout)]


def listener_pids(pg):
    with pg.connect() as c:
        return [r[0] for r in c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND query LIKE 'LISTEN%' AND state = 'idle' AND pid <> pg_backend_pid()").fetchall()]


def test_every_listener_gets_its_channels_notifications_once_and_in_order(tidepool, pg):
    t = pooled(tidepool, 3)
    alpha = [t.connect() for _ in range(100)]
    beta = [t.connect() for _ in range(20)]
    bystander = t.connect()
    sender = t.connect()
    stop = threading.Event()
    queried = []
    errors = []

    def keep_querying():
        with t.connect() as c:
            while not stop.is_set():
                try:
                    started = time.time()
                    assert c.execute("SELECT 1").fetchone()[0] == 1
                    queried.append(time.time() - started)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

    workers = [threading.Thread(target=keep_querying) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        for c in alpha:
            c.execute("LISTEN alpha")
        for c in beta:
            c.execute('LISTEN "Beta"')
        bystander.execute("SELECT 1")
        # Listening takes no server: the pool of 3 still serves everyone else.
        with pg.connect() as direct:
            backends = direct.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND datname = 'postgres'").fetchone()[0]
        assert backends <= 4, "three servers and the listener"
        for i in range(30):
            sender.execute(f"NOTIFY alpha, 'a{i}'")
            sender.execute("SELECT pg_notify('Beta', %s)", (f"b{i}",))
            if i == 10:
                sender.execute("BEGIN")
                sender.execute("NOTIFY alpha, 'rolled back'")
                sender.execute("ROLLBACK")
        expected_alpha = [("alpha", f"a{i}") for i in range(30)]
        expected_beta = [("Beta", f"b{i}") for i in range(30)]
        for c in alpha:
            got = []
            deadline = time.time() + 10
            while len(got) < 30 and time.time() < deadline:
                got += drain(c, 0.2)
            got += drain(c, 0.05)
            assert got == expected_alpha
        for c in beta:
            got = []
            deadline = time.time() + 10
            while len(got) < 30 and time.time() < deadline:
                got += drain(c, 0.2)
            assert got == expected_beta
        assert drain(bystander, 0.3) == [], "a client that never listened gets nothing"
        assert drain(sender, 0.1) == []

        # SHOW LISTENS: one row per channel, with its clients.
        with t.connect(dbname="pgbouncer") as admin:
            rows = admin.execute("SHOW LISTENS").fetchall()
        assert sorted((r[0], r[1], r[2], r[3]) for r in rows) == [
            ("postgres", "postgres", "Beta", 20), ("postgres", "postgres", "alpha", 100)]

        # After UNLISTEN a client gets nothing more; the others still do.
        alpha[0].execute("UNLISTEN alpha")
        alpha[1].execute("UNLISTEN *")
        sender.execute("NOTIFY alpha, 'after'")
        assert drain(alpha[2], 2.0) == [("alpha", "after")]
        assert drain(alpha[0], 0.3) == [] and drain(alpha[1], 0.3) == []
    finally:
        stop.set()
        for w in workers:
            w.join()
        for c in alpha + beta + [bystander, sender]:
            c.close()
    assert not errors
    assert len(queried) > 50, "the other clients kept querying"
    # The listener closes once nobody listens.
    deadline = time.time() + 5
    while listener_pids(pg) and time.time() < deadline:
        time.sleep(0.05)
    assert listener_pids(pg) == []


def test_listen_inside_a_transaction_counts_at_commit_and_servers_go_back_clean(tidepool, pg):
    t = pooled(tidepool, 2)
    with t.connect() as a, t.connect() as b, t.connect() as sender:
        a.execute("BEGIN")
        a.execute("LISTEN later")
        # Committed before a's LISTEN: not a's, as with PostgreSQL.
        sender.execute("NOTIFY later, 'before commit'")
        a.execute("COMMIT")
        sender.execute("NOTIFY later, 'after commit'")
        assert drain(a, 2.0) == [("later", "after commit")]
        a.execute("BEGIN")
        a.execute("LISTEN never")
        a.execute("ROLLBACK")
        sender.execute("NOTIFY never, 'x'")
        assert drain(a, 0.5) == []
        # The server a's LISTEN ran on listens on nothing when the next client gets it.
        assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
        # Extended protocol (pgjdbc-style Parse/Bind/Execute/Sync).
        b.pgconn.send_query_params(b"LISTEN ext", None)
        while b.pgconn.is_busy():
            b.pgconn.consume_input()
        while b.pgconn.get_result() is not None:
            pass
        sender.execute("NOTIFY ext, 'extended'")
        assert drain(b, 2.0) == [("ext", "extended")]


def test_asyncpg_add_listener_and_psql(tidepool):
    import asyncpg

    t = pooled(tidepool, 2)

    async def run():
        got = asyncio.Queue()
        conn = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres", ssl=False,
                                     statement_cache_size=0)
        await conn.add_listener("jobs", lambda _c, _pid, channel, payload: got.put_nowait((channel, payload)))
        other = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres",
                                      ssl=False, statement_cache_size=0)
        for i in range(5):
            await other.execute(f"NOTIFY jobs, 'job {i}'")
            await other.fetchval("SELECT 1")
        received = [await asyncio.wait_for(got.get(), 5) for _ in range(5)]
        await conn.remove_listener("jobs", lambda *a: None)
        await other.close()
        await conn.close()
        return received

    assert asyncio.run(run()) == [("jobs", f"job {i}") for i in range(5)]

    # psql prints the notifications that came while its query ran, after the query.
    psql = subprocess.Popen(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-d", "postgres"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    psql.stdin.write("LISTEN psqlchan;\nSELECT pg_sleep(1.5);\n")
    psql.stdin.flush()
    time.sleep(0.7)
    with t.connect() as sender:
        sender.execute("NOTIFY psqlchan, 'hi psql'")
    out, _ = psql.communicate("SELECT 1;\n", timeout=20)
    assert 'Asynchronous notification "psqlchan" with payload "hi psql" received' in out


def test_the_listener_is_reopened_after_pg_terminate_backend(tidepool, pg):
    stats = free_port()
    t = pooled(tidepool, 2, f"stats_listen_addr = 127.0.0.1\nstats_listen_port = {stats}\n")
    with t.connect() as a, t.connect() as sender:
        a.execute("LISTEN survive")
        sender.execute("NOTIFY survive, 'one'")
        assert drain(a, 2.0) == [("survive", "one")]
        [pid] = listener_pids(pg)
        with pg.connect() as direct:
            direct.execute("SELECT pg_terminate_backend(%s)", (pid,))
        killed = time.time()
        while time.time() - killed < 1.0:
            pids = listener_pids(pg)
            if pids and pids != [pid]:
                break
            time.sleep(0.02)
        assert listener_pids(pg) not in ([], [pid]), "listening again within a second"
        sender.execute("NOTIFY survive, 'two'")
        assert drain(a, 2.0) == [("survive", "two")]
        assert "listener connection lost" in t.log()
        _, text = http(stats, "/metrics")
        assert metric(text, "tidepool_listener_reconnects_total", database="postgres") == 1
        assert metric(text, "tidepool_notifications_delivered_total", database="postgres") == 2


def test_a_client_that_does_not_read_is_closed_and_the_others_get_everything(tidepool):
    stats = free_port()
    t = pooled(tidepool, 2, f"notify_queue_size = 50\nstats_listen_addr = 127.0.0.1\nstats_listen_port = {stats}\n")
    count = 3000
    payload = "x" * 7900
    with t.connect() as fast, t.connect() as sender:
        # A raw client, to see exactly what reaches it: it listens, then stops reading.
        slow = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        startup(slow)
        body = b"LISTEN flood\0"
        slow.sendall(b"Q" + struct.pack("!i", 4 + len(body)) + body)
        read_until_ready(slow)
        fast.execute("LISTEN flood")
        got = []

        def read_fast():
            deadline = time.time() + 60
            while len(got) < count and time.time() < deadline:
                got.extend(n.payload for n in fast.notifies(timeout=0.5))

        reader = threading.Thread(target=read_fast)
        reader.start()
        sender.execute("SELECT pg_notify('flood', %s || g) FROM generate_series(1, %s) g", (payload, count))
        reader.join()
        assert got == [payload + str(i) for i in range(1, count + 1)]
        deadline = time.time() + 10
        while "notifications left unread" not in t.log() and time.time() < deadline:
            time.sleep(0.1)
        # The slow client finds the notifications that reached it, in order, then the pooler's FATAL.
        messages = list(walk(read_all(slow, timeout=10)))
        slow.close()
        types = [m[0] for m in messages]
        assert types[-1] == ord("E") and set(types[:-1]) == {ord("A")}
        payloads = [m[1][4:].split(b"\0")[1].decode() for m in messages[:-1]]
        assert payloads == [payload + str(i) for i in range(1, len(payloads) + 1)]
        assert len(payloads) < count
        fields = {chr(f[0]): f[1:].decode() for f in messages[-1][1].split(b"\0") if f}
        assert fields["S"] == "FATAL" and fields["C"] == "54000", fields
        assert "notify_queue_size = 50" in fields["M"]
    assert "notifications left unread" in t.log()
    _, text = http(stats, "/metrics")
    assert metric(text, "tidepool_notifications_dropped_total", database="postgres") > 0


def test_session_mode_passes_listen_through(tidepool, pg):
    t = tidepool(settings="pool_mode = session\n")
    with t.connect() as a, t.connect() as sender:
        a.execute("LISTEN direct")
        assert a.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 1
        sender.execute("NOTIFY direct, 'x'")
        assert drain(a, 2.0) == [("direct", "x")]
    assert listener_pids(pg) == []
