"""Tidepool core behaviour against a real PostgreSQL, through real clients."""

import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg import errors


def psql(dsn, *commands, check=True):
    args = ["psql", dsn, "-X", "-qAt", "-v", "ON_ERROR_STOP=1"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def test_psql_over_tcp_and_unix_socket(tidepool):
    t = tidepool()
    assert psql(t.dsn(), "SELECT 40 + 2").stdout.strip() == "42"
    unix = f"host={t.dir} port={t.port} dbname=postgres user=postgres"
    assert psql(unix, "SELECT 'unix'").stdout.strip() == "unix"


def test_unix_socket_can_be_disabled(tidepool):
    t = tidepool(settings="")
    assert (t.dir / f".s.PGSQL.{t.port}").exists()
    t2 = tidepool(settings="unix_socket_dir =\n")
    # The last unix_socket_dir line wins: empty turns the socket off.
    assert not (t2.dir / f".s.PGSQL.{t2.port}").exists()
    assert psql(t2.dsn(), "SELECT 1").stdout.strip() == "1"


def test_transaction_mode_shares_one_server_between_clients(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as a, t.connect() as b:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert pid_a == pid_b
        # Inside a transaction the server stays with its client.
        a.execute("BEGIN")
        a.execute("SELECT 1")
        got = []
        th = threading.Thread(target=lambda: got.append(b.execute("SELECT pg_backend_pid()").fetchone()[0]))
        th.start()
        time.sleep(0.3)
        assert not got, "second client got a server while the only one was in a transaction"
        a.execute("COMMIT")
        th.join(5)
        assert got == [pid_a]


def test_pool_size_bounds_server_connections(tidepool, pg):
    t = tidepool(settings="default_pool_size = 3\nmax_client_conn = 200\n")
    peak = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak.append(pg.backends("postgres", user="postgres"))
            time.sleep(0.05)

    def work():
        with t.connect() as c:
            for _ in range(10):
                with c.transaction():
                    c.execute("SELECT pg_sleep(0.01)")

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work) for _ in range(30)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    watcher.join()
    assert max(peak) <= 3
    assert max(peak) >= 1


def test_statement_mode_refuses_transactions(tidepool):
    t = tidepool(settings="pool_mode = statement\n")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    with t.connect() as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute("BEGIN")
            c.execute("SELECT 1")
        assert "statement pooling mode" in str(info.value)


def test_session_mode_keeps_server_and_resets_it_afterwards(tidepool):
    t = tidepool(settings="pool_mode = session\ndefault_pool_size = 1\n")
    with t.connect() as a:
        a.execute("PREPARE p AS SELECT 1")
        a.execute("SET work_mem = '7MB'")
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert a.execute("SHOW work_mem").fetchone()[0] == "7MB"
    with t.connect() as b:
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        # DISCARD ALL ran in between.
        assert b.execute("SHOW work_mem").fetchone()[0] == "4MB"
        with pytest.raises(errors.InvalidSqlStatementName):
            b.execute("EXECUTE p")


def test_pool_mode_per_user_and_database(tidepool, pg):
    t = tidepool(
        databases=f"sess = host=127.0.0.1 port={pg.port} dbname=postgres pool_mode=session\n"
        f"* = host=127.0.0.1 port={pg.port}",
        users="stmt = pool_mode=statement",
        settings="pool_mode = transaction\n")
    with t.connect(dbname="sess") as c:
        c.execute("BEGIN")
        c.execute("COMMIT")
        c.execute("PREPARE kept AS SELECT 5")
        assert c.execute("EXECUTE kept").fetchone()[0] == 5
    with pg.connect() as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE stmt LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    with t.connect(user="stmt") as c:
        with pytest.raises(psycopg.Error):
            c.execute("BEGIN")
            c.execute("SELECT 1")


def test_parameters_follow_the_client_to_any_server(tidepool):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect(options="-c TimeZone=UTC", application_name="first") as a, \
            t.connect(application_name="second") as b:
        b.execute("SET TimeZone = 'America/New_York'")
        for _ in range(3):
            assert a.execute("SHOW TimeZone").fetchone()[0] == "UTC"
            assert a.execute("SELECT current_setting('application_name')").fetchone()[0] == "first"
            assert b.execute("SHOW TimeZone").fetchone()[0] == "America/New_York"
            assert b.execute("SELECT current_setting('application_name')").fetchone()[0] == "second"
        # The client sees ParameterStatus values of its own.
        assert a.info.parameter_status("application_name") == "first"
        assert b.info.parameter_status("TimeZone") == "America/New_York"


def test_startup_parameters_are_reported(tidepool):
    t = tidepool()
    with psycopg.connect(t.dsn(), application_name="reporter", autocommit=True) as c:
        assert c.info.parameter_status("application_name") == "reporter"
        assert c.info.parameter_status("server_version").startswith("15")
        assert c.info.parameter_status("client_encoding") == "UTF8"
        assert c.info.backend_pid != 0


def test_cancel_reaches_only_the_clients_own_query(tidepool):
    t = tidepool(settings="default_pool_size = 2\n")
    with t.connect() as a, t.connect() as b:
        a.execute("BEGIN")  # hold a server for a
        a_pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        result = {}

        def long_query():
            try:
                b.execute("SELECT pg_sleep(20)")
                result["b"] = "finished"
            except errors.QueryCanceled:
                result["b"] = "canceled"

        th = threading.Thread(target=long_query)
        th.start()
        time.sleep(0.5)
        started = time.time()
        b.cancel()
        th.join(10)
        assert result.get("b") == "canceled"
        assert time.time() - started < 5
        # a's transaction and server are untouched.
        assert a.execute("SELECT pg_backend_pid()").fetchone()[0] == a_pid
        a.execute("COMMIT")
    # The pooler's cancel key is its own, not a backend's.
    with t.connect() as c:
        assert c.info.backend_pid != c.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_cancel_of_an_idle_client_does_nothing(tidepool):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as idle, t.connect() as busy:
        busy.execute("BEGIN")
        idle.cancel()  # idle has no server: nothing must reach busy's backend
        time.sleep(0.3)
        assert busy.execute("SELECT 1").fetchone()[0] == 1
        busy.execute("COMMIT")


def test_client_vanishing_in_transaction_leaves_no_dirty_server(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\n")
    a = t.connect()
    a.execute("BEGIN")
    a.execute("INSERT INTO items (note) VALUES ('vanished')")
    # Drop the TCP connection without Terminate.
    sock = socket.socket(fileno=a.pgconn.socket)
    sock.shutdown(socket.SHUT_RDWR)
    sock.detach()
    time.sleep(0.3)
    with t.connect() as b:
        row = b.execute("SELECT txid_current_if_assigned(), "
                        "(SELECT count(*) FROM items WHERE note = 'vanished')").fetchone()
        assert row == (None, 0)
        assert b.execute("SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0] == "active"
    a.close()


def test_client_vanishing_mid_copy_leaves_no_dirty_server(tidepool):
    t = tidepool(settings="default_pool_size = 1\n")
    raw = socket.create_connection(("127.0.0.1", t.port))
    startup = b"user\0postgres\0database\0postgres\0\0"
    raw.sendall(struct.pack("!ii", 8 + len(startup), 196608) + startup)
    read_until_ready(raw)
    sql = b"COPY items (note) FROM STDIN\0"
    raw.sendall(b"Q" + struct.pack("!i", 4 + len(sql)) + sql)
    assert b"G" in read_some(raw)
    row = b"half a row"
    raw.sendall(b"d" + struct.pack("!i", 4 + len(row)) + row)
    raw.close()
    time.sleep(0.3)
    with t.connect() as b:
        assert b.execute("SELECT txid_current_if_assigned()").fetchone()[0] is None
        assert b.execute("SELECT count(*) FROM items WHERE note = 'half a row'").fetchone()[0] == 0


def read_some(sock, timeout=5):
    sock.settimeout(timeout)
    return sock.recv(65536)


def read_until_ready(sock):
    data = b""
    while b"Z\0\0\0\x05I" not in data:
        chunk = read_some(sock)
        if not chunk:
            raise AssertionError(f"closed before ReadyForQuery: {data!r}")
        data += chunk
    return data


def test_copy_in_and_out_pass_through(tidepool):
    t = tidepool()
    with t.connect() as c:
        with c.cursor() as cur:
            with cur.copy("COPY items (note) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((f"copied {i}",))
        assert c.execute("SELECT count(*) FROM items WHERE note LIKE 'copied %'").fetchone()[0] == 1000
        with c.cursor() as cur:
            with cur.copy("COPY (SELECT note FROM items WHERE note LIKE 'copied %' ORDER BY id) TO STDOUT") as copy:
                rows = [r for r in copy.rows()]
        assert len(rows) == 1000
        c.execute("DELETE FROM items WHERE note LIKE 'copied %'")


def test_notices_and_errors_pass_through(tidepool):
    t = tidepool()
    notices = []
    with t.connect() as c:
        c.add_notice_handler(lambda n: notices.append(n.message_primary))
        c.execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        with pytest.raises(errors.DivisionByZero):
            c.execute("SELECT 1/0")
        # The connection is usable after an error, in and out of transactions.
        c.execute("BEGIN")
        with pytest.raises(errors.UndefinedTable):
            c.execute("SELECT * FROM no_such_table")
        c.execute("ROLLBACK")
        assert c.execute("SELECT 7").fetchone()[0] == 7
    assert notices == ["hello from the server"]


def test_extended_protocol_pipeline(tidepool):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as c:
        with c.pipeline():
            cursors = [c.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        assert [cur.fetchone()[0] for cur in cursors] == [i * 2 for i in range(50)]
        # An error inside a pipeline aborts the rest up to the Sync, as on a direct connection.
        with pytest.raises(errors.DivisionByZero):
            with c.pipeline():
                c.execute("SELECT 1/0")
                c.execute("SELECT 1")
        assert c.execute("SELECT 'after'").fetchone()[0] == "after"


def test_ssl_request_is_answered_no(tidepool):
    t = tidepool()
    assert psql(t.dsn(sslmode="prefer"), "SELECT 1").stdout.strip() == "1"
    out = psql(t.dsn(sslmode="require"), "SELECT 1", check=False)
    assert out.returncode != 0
    assert "does not support SSL" in out.stderr
    raw = socket.create_connection(("127.0.0.1", t.port))
    raw.sendall(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
    assert read_some(raw) == b"N"
    raw.close()


def test_terminate_releases_the_client(tidepool):
    t = tidepool(settings="max_client_conn = 1\n")
    for _ in range(5):
        with t.connect() as c:
            c.execute("SELECT 1")
        time.sleep(0.05)


def test_startup_parameters_are_kept_refused_with_session_state_ignore_or_dropped_if_ignored(tidepool):
    import asyncio
    import asyncpg

    async def attempt(port, **settings):
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres",
                                     ssl=False, server_settings=settings)
        value = await conn.fetchval("SHOW extra_float_digits")
        await conn.close()
        return value

    t = tidepool()
    assert asyncio.run(attempt(t.port, extra_float_digits="2")) == "2"
    t1 = tidepool(settings="session_state = ignore\n")
    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt(t1.port, extra_float_digits="2"))
    assert info.value.sqlstate == "0A000"
    assert "unsupported startup parameter: extra_float_digits" in str(info.value)
    t2 = tidepool(settings="ignore_startup_parameters = extra_float_digits\n")
    assert asyncio.run(attempt(t2.port, extra_float_digits="2")) == "1"


def test_cancels_never_hit_another_clients_query(tidepool):
    """A cancel races the end of the query it targets; the server must not be handed to another
    client before the cancel has reached PostgreSQL, or that client's query gets cancelled."""
    t = tidepool(settings="default_pool_size = 2\n")
    stop = time.time() + 4
    victim_errors = []

    def victim():
        with t.connect() as c:
            while time.time() < stop:
                try:
                    c.execute("SELECT pg_sleep(0.01)")
                except errors.QueryCanceled as e:
                    victim_errors.append(e)

    victims = [threading.Thread(target=victim) for _ in range(6)]
    for v in victims:
        v.start()
    cancels = 0
    with t.connect() as canceller:
        while time.time() < stop:
            th = threading.Thread(target=lambda: _swallow(canceller, "SELECT pg_sleep(0.01)"))
            th.start()
            time.sleep(0.009)
            canceller.cancel()
            cancels += 1
            th.join(5)
    for v in victims:
        v.join(10)
    assert cancels > 50
    assert victim_errors == []


def _swallow(conn, sql):
    try:
        conn.execute(sql)
    except errors.QueryCanceled:
        pass
