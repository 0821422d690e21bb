"""Faults under load: servers killed, PostgreSQL restarted. Tidepool must not hang, leak or crash,
and must serve again as soon as PostgreSQL does."""

import os
import random
import re
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from test_lifecycle import pg_ctl, second_pg  # noqa: F401  (fixture)


def start_pgbench(port, clients, seconds, *args):
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-n", "-c", str(clients), "-j", "2",
           "-T", str(seconds), *args, "postgres"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_serving(t, within):
    deadline = time.time() + within
    while True:
        try:
            with t.connect() as c:
                return c.execute("SELECT 1").fetchone()[0]
        except psycopg.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def fd_targets(t):
    """What each of the pooler's descriptors is open to (socket:[inode], a file, anon_inode:...)."""
    targets = []
    for fd in os.listdir(f"/proc/{t.proc.pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{t.proc.pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def fd_report(t):
    """What the pooler opened since `fd_baseline` and its sockets' states (from `ss`): for an
    assertion's message, so that a leak seen once in CI can be told apart from a slow close."""
    added = sorted(set(fd_targets(t)) - set(getattr(t, "fd_baseline_targets", [])))
    try:
        sockets = subprocess.run(["ss", "-tanpe"], capture_output=True, text=True).stdout
    except OSError as error:
        sockets = f"(ss: {error})"
    mine = "\n".join(line for line in sockets.splitlines() if f"pid={t.proc.pid}," in line)
    return f"opened since the baseline: {added}\nsockets:\n{mine}"


def fd_baseline(t):
    """The pooler's descriptor count now, remembering what they are for `settle_fds`'s report."""
    t.fd_baseline_targets = fd_targets(t)
    return t.pid_fd_count()


def settle_fds(t, baseline, slack=4, within=5.0):
    deadline = time.time() + within
    while t.pid_fd_count() > baseline + slack and time.time() < deadline:
        time.sleep(0.1)
    return t.pid_fd_count()


def test_terminating_random_servers_under_load(tidepool, pg):
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"],
                   check=True, capture_output=True)
    t = tidepool(settings="default_pool_size = 10\nmax_client_conn = 500\n")
    wait_serving(t, 5)
    baseline = fd_baseline(t)
    bench = start_pgbench(t.port, 100, 6, "-S")
    stop = time.time() + 5
    killed = 0
    with pg.connect() as admin:
        while time.time() < stop:
            pids = [r[0] for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = 'postgres' "
                "AND pid <> pg_backend_pid() AND usename = 'postgres'").fetchall()]
            if pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (random.choice(pids),))
                killed += 1
            time.sleep(0.1)
    out, _ = bench.communicate(timeout=60)  # no client may hang
    assert killed > 20, out
    assert "tps" in out or "aborted" in out
    assert wait_serving(t, 2) == 1
    assert settle_fds(t, baseline) <= baseline + 4 + 10, fd_report(t)  # at most the pool's servers came back


def kill_postgres(pg):
    """SIGKILL to the postmaster and every backend, as the OOM killer or a crash would."""
    with open(f"{pg.dir}/data/postmaster.pid") as f:
        postmaster = int(f.readline())
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(postmaster, signal.SIGKILL)
    # Gone before the test goes on (a new postmaster refuses shared memory still attached).
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in [postmaster, *children]) and time.time() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("clients,mode", [(200, "immediate"), (1000, "immediate"), (1000, "fast"), (200, "kill")])
def test_postgres_restart_under_load(tidepool, second_pg, clients, mode):
    """Clients inside a transaction get an error, clients outside one wait through the restart, and
    the pool serves within a second of PostgreSQL being back. With SIGKILL (no goodbye from any
    backend) a client inside a transaction gets its error within a second."""
    t = tidepool(databases=f"* = host=127.0.0.1 port={second_pg.port}",
                 settings="default_pool_size = 10\nmax_client_conn = 2000\nserver_connect_timeout = 2\n")
    wait_serving(t, 5)
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(second_pg.port), "-U", "postgres",
                    "postgres"], check=True, capture_output=True)
    baseline = fd_baseline(t)
    in_transaction = [t.connect() for _ in range(3)]
    for c in in_transaction:
        c.execute("BEGIN")
        c.execute("SELECT 1")
    idle = [t.connect() for _ in range(20)]
    bench = start_pgbench(t.port, clients, 6, "-S")
    time.sleep(2.5 if clients > 200 else 1.5)
    if mode == "kill":
        kill_postgres(second_pg)
        started = time.time()
        with pytest.raises(psycopg.OperationalError) as info:
            in_transaction.pop().execute("SELECT 1")
        assert time.time() - started < 1.0
        # An error with words, not libpq's own for a silent close: PgBouncer's (which applications
        # match to retry) when the backend died without one, or the backend's own last words.
        message = str(info.value)
        assert "server conn crashed?" in message or "terminating connection" in message, message
    else:
        pg_ctl(second_pg, "stop", mode=mode)
    results = []

    def query(c):
        try:
            results.append(c.execute("SELECT 1").fetchone()[0])
        except psycopg.Error as e:
            results.append(e)

    waiting = [threading.Thread(target=query, args=(c,)) for c in idle]
    for thread in waiting:
        thread.start()
    time.sleep(0.5)
    assert results == [], "clients outside a transaction must wait while PostgreSQL is down"
    pg_ctl(second_pg, "start")
    back = time.time()
    assert wait_serving(t, 1.0) == 1
    assert time.time() - back < 1.0, "the pool did not serve within a second of PostgreSQL being back"
    for thread in waiting:
        thread.join(timeout=10)
    assert results == [1] * len(idle)
    for c in in_transaction:
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    for c in in_transaction + idle:
        c.close()
    bench.communicate(timeout=60)  # pgbench ends: clients got errors or went on, none hangs
    assert settle_fds(t, baseline) <= baseline + 4 + 10, fd_report(t)


def test_socket_reset_during_tls_negotiation_is_waited_out(tidepool):
    """A server socket reset while TLS is being negotiated (PostgreSQL stopping as the SSLRequest
    arrives) is a lost connection that clients wait through, not a TLS set-up refusal that fails them
    at once."""
    import socket
    import struct
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()

    def reset_each_after_sslrequest():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(8)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST: the pooler's read fails with ECONNRESET

    resetter = threading.Thread(target=reset_each_after_sslrequest, daemon=True)
    resetter.start()
    try:
        t = tidepool(databases=f"* = host=127.0.0.1 port={listener.getsockname()[1]}",
                     settings="server_tls_sslmode = prefer\nquery_wait_timeout = 2\n")
        started = time.time()
        with pytest.raises(psycopg.OperationalError) as info:
            t.connect().execute("SELECT 1")
        # Told at query_wait_timeout, with the reason there was no server.
        assert time.time() - started >= 1.5, str(info.value)
        assert "Connection reset by peer" in str(info.value) and "TLS" not in str(info.value), str(info.value)
    finally:
        stop.set()
        resetter.join()
        listener.close()


def raw_startup(port, user="postgres", database="postgres"):
    """A socket that has logged in with the v3 protocol (trust) and read up to ReadyForQuery."""
    import socket
    import struct
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    params = f"user\0{user}\0database\0{database}\0\0".encode()
    s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    data = b""
    while b"Z\0\0\0\x05" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    return s


def message(kind, body=b""):
    import struct
    return kind + struct.pack("!i", 4 + len(body)) + body


def test_client_vanishing_mid_pipeline_leaves_no_dirty_server(tidepool, pg):
    """Parse/Bind/Execute of an INSERT inside BEGIN, no Sync, then the client is gone: the server
    must not go back to the pool with that transaction open."""
    with pg.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS vanish_pipeline (v int)")
        c.execute("TRUNCATE vanish_pipeline")
    t = tidepool(settings="default_pool_size = 1\n")
    baseline = None
    for _ in range(5):
        s = raw_startup(t.port)
        if baseline is None:
            baseline = fd_baseline(t)
        s.sendall(message(b"Q", b"BEGIN\0"))
        s.recv(65536)
        s.sendall(message(b"P", b"\0INSERT INTO vanish_pipeline VALUES (1)\0\0\0")
                  + message(b"B", b"\0\0\0\0\0\0\0\0")
                  + message(b"E", b"\0\0\0\0\0"))
        time.sleep(0.05)
        s.close()
    with t.connect() as c:
        # The only server is clean: no transaction from the vanished clients, nothing committed.
        assert c.execute("SELECT txid_current_if_assigned()").fetchone()[0] is None
        assert c.execute("SELECT count(*) FROM vanish_pipeline").fetchone()[0] == 0
    assert settle_fds(t, baseline) <= baseline + 4, fd_report(t)


def test_client_vanishing_mid_startup_leaks_nothing(tidepool):
    import socket
    t = tidepool()
    wait_serving(t, 5)
    baseline = fd_baseline(t)
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        # Half a length word, part of a startup packet, or a whole one and no password answer.
        s.sendall([b"\0\0", b"\0\0\0\x30\0\x03\0\0user\0post", b"\0\0\0\x08"][i % 3])
        s.close()
    assert settle_fds(t, baseline) <= baseline + 4, fd_report(t)
    assert wait_serving(t, 2) == 1


def test_reload_under_load_loses_nothing(tidepool, pg):
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"],
                   check=True, capture_output=True)
    t = tidepool(settings="default_pool_size = 10\nmax_client_conn = 500\nadmin_users = postgres\n")
    wait_serving(t, 5)
    bench = start_pgbench(t.port, 50, 5, "-S")
    sizes = [4, 12, 6, 10]
    deadline = time.time() + 4
    i = 0
    with t.connect(dbname="pgbouncer") as admin:
        while time.time() < deadline:
            t.ini.write_text(t.ini.read_text().replace(f"default_pool_size = {sizes[(i - 1) % 4] if i else 10}",
                                                       f"default_pool_size = {sizes[i % 4]}"))
            admin.execute("RELOAD")
            i += 1
            time.sleep(0.3)
    out, _ = bench.communicate(timeout=60)
    assert i >= 8
    assert re.search(r"number of failed transactions: 0 ", out), out[-2000:]
    assert "aborted" not in out


def test_sigterm_under_write_load_loses_no_committed_transaction(tidepool, pg):
    """SIGTERM while pgbench -N writes: Tidepool stops accepting, lets the connected clients finish,
    and every transaction pgbench counts as done is in the table."""
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"],
                   check=True, capture_output=True)
    before = pg.scalar("SELECT count(*) FROM pgbench_history")
    t = tidepool(settings="default_pool_size = 10\nmax_client_conn = 500\nshutdown_timeout = 60\n")
    wait_serving(t, 5)
    bench = start_pgbench(t.port, 20, 4, "-N")
    time.sleep(1.5)
    t.proc.send_signal(signal.SIGTERM)
    out, _ = bench.communicate(timeout=60)
    t.proc.wait(timeout=30)
    assert t.proc.returncode == 0
    processed = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    assert re.search(r"number of failed transactions: 0 ", out), out[-2000:]
    assert pg.scalar("SELECT count(*) FROM pgbench_history") - before == processed


def test_stopped_backend_under_load_frees_the_client_and_the_slot(tidepool, pg):
    """A backend paused with SIGSTOP never answers: query_timeout frees its client, and the server
    slot goes back to the pool (the server is closed), so other clients keep being served."""
    t = tidepool(settings="default_pool_size = 2\nquery_timeout = 1\n")
    victim = t.connect()
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    victim.execute("BEGIN")
    victim.execute("SELECT 1")  # the victim keeps this backend
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.time()
        with pytest.raises(psycopg.Error):
            victim.execute("SELECT 1")
        assert time.time() - started < 5
        # Both slots serve other clients again: the stopped backend's server was closed.
        results = []

        def work(n):
            with t.connect() as c:
                for _ in range(20):
                    results.append(c.execute("SELECT %s::int", (n,)).fetchone()[0])

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(20)
        assert len(results) == 80
        with pg.connect() as direct:
            assert pid in {r[0] for r in direct.execute("SELECT pid FROM pg_stat_activity").fetchall()}
    finally:
        os.kill(pid, signal.SIGCONT)
        victim.close()


def test_tcp_keepalive_settings_reach_server_sockets(tidepool, pg):
    """tcp_keepidle & co. are set on server connections, so a peer that vanished from the network
    is found by keepalive probes (a stopped backend on this host still answers probes: that case
    is query_timeout's, above)."""
    t = tidepool(settings="tcp_keepalive = 1\ntcp_keepidle = 7\ntcp_keepintvl = 3\ntcp_keepcnt = 2\n")
    with t.connect() as c:
        c.execute("SELECT 1")
        out = subprocess.run(["ss", "-tnopH", "state", "established", f"( dport = :{pg.port} )"],
                             capture_output=True, text=True, check=True).stdout
    mine = [line for line in out.splitlines() if f"pid={t.proc.pid}," in line]
    assert mine, out
    for line in mine:
        m = re.search(r"timer:\(keepalive,([\d.]+)(ms|sec|min)", line)
        assert m, line
        seconds = float(m.group(1)) * {"ms": 0.001, "sec": 1, "min": 60}[m.group(2)]
        assert seconds <= 7.0, line


def test_tcp_socket_buffer_and_tcp_defer_accept(tidepool, pg):
    """tcp_socket_buffer sizes both sides' TCP sockets (the kernel doubles what it is given), and
    tcp_defer_accept keeps a client that says nothing out of the pooler (no login timeout starts)."""
    t = tidepool(settings="tcp_socket_buffer = 24576\ntcp_defer_accept = 1\nclient_login_timeout = 1\n")
    with t.connect() as c:
        c.execute("SELECT 1")
        out = subprocess.run(["ss", "-tnmpH", "state", "established"], capture_output=True, text=True,
                             check=True).stdout
    lines = out.splitlines()
    mine = [(line, lines[i + 1] if i + 1 < len(lines) else "") for i, line in enumerate(lines)
            if f"pid={t.proc.pid}," in line]
    assert len(mine) >= 2, out  # the client's socket and the server's
    for line, memory in mine:
        both = line + memory
        assert "rb49152" in both and "tb49152" in both, both
    # A silent TCP client: deferred, so the pooler never sees it and logs no login timeout.
    import socket
    silent = socket.create_connection(("127.0.0.1", t.port))
    time.sleep(1.5)
    silent.close()
    assert "client_login_timeout" not in t.log() and "login timed out" not in t.log()


def test_terminated_servers_fail_only_the_clients_inside_a_transaction(tidepool, pg):
    """Every 100 ms the servers of clients sitting inside a transaction are terminated, while other
    clients run autocommit queries on the same pool: only the clients in a transaction see errors,
    and every client's next statement works (nobody is handed a dead server)."""
    t = tidepool(settings="default_pool_size = 8\n")
    stop = threading.Event()
    autocommit_errors = []
    served = []

    def autocommit_worker():
        with t.connect() as c:
            while not stop.is_set():
                try:
                    c.execute("SELECT 1")
                    served.append(1)
                except psycopg.Error as e:
                    autocommit_errors.append(repr(e))
                    return

    workers = [threading.Thread(target=autocommit_worker) for _ in range(4)]
    for w in workers:
        w.start()
    in_transaction_errors = 0
    for _ in range(10):
        holders = [t.connect() for _ in range(2)]
        for h in holders:
            h.execute("BEGIN")
            h.execute("SELECT 1")
        with pg.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'postgres' "
                          "AND state = 'idle in transaction' AND pid <> pg_backend_pid()")
        for h in holders:
            try:
                h.execute("SELECT 1")
            except psycopg.Error:
                in_transaction_errors += 1
            h.close()
        with t.connect() as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.1)
    stop.set()
    for w in workers:
        w.join(10)
    assert in_transaction_errors == 20
    assert not autocommit_errors, autocommit_errors[:3]
    assert len(served) > 100


@pytest.mark.parametrize("prepared", [False, True])
def test_a_server_postgresql_ends_as_it_is_lent_is_replaced_not_the_clients_end(tidepool, pg, prepared):
    """PostgreSQL ends idle servers of the pool (idle_session_timeout here, pg_terminate_backend
    below) at the moment clients are lent them: nothing of the client's ran there, so the client
    gets another server instead of losing its connection."""
    t = tidepool(
        databases=f"postgres = host=127.0.0.1 port={pg.port} connect_query='SET idle_session_timeout = 120'",
        settings="default_pool_size = 2\nmax_client_conn = 50\n")
    kw = {"prepare_threshold": 0} if prepared else {}
    errors = []
    served = []

    def client(seed):
        rng = random.Random(seed)
        with t.connect(**kw) as c:
            for i in range(40):
                time.sleep(rng.uniform(0.10, 0.14))
                try:
                    assert c.execute("SELECT %s::int", (i,)).fetchone()[0] == i
                    served.append(1)
                except psycopg.Error as e:
                    errors.append(repr(e))
                    return

    workers = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors[:3]
    assert len(served) == 120
    assert "idle server is going" in t.log() or "terminating connection due to idle-session timeout" in t.log()

    # pg_terminate_backend of the pool's idle server, then at once a query: whether the pooler
    # has read the server's farewell yet or not, the query gets a server that works.
    with t.connect(**kw) as c, pg.connect() as admin:
        for i in range(25):
            c.execute("SELECT %s::int", (i,))
            pids = [r[0] for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'postgres' AND backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND application_name <> 'psql'").fetchall()]
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) pid", (pids,))
            assert c.execute("SELECT %s::int", (i,)).fetchone()[0] == i
