"""Settings that were parsed but ignored and now take effect, through a real PostgreSQL and real
clients: disable_pqexec, application_name_add_host, log_pooler_errors, server_check_query empty,
server_round_robin; and SHOW CONFIG listing every setting with its default."""

import psycopg
import pytest


def admin(t):
    return t.connect(dbname="pgbouncer", user="admin")


def test_disable_pqexec_closes_simple_queries_but_not_the_extended_protocol(tidepool):
    t = tidepool(settings="disable_pqexec = 1\n")
    # psycopg with parameters uses the extended protocol.
    with t.connect() as c:
        assert c.execute("SELECT %s::int", (7,)).fetchone()[0] == 7
    # Without parameters it sends a simple Query: refused, the connection closed.
    with t.connect() as c:
        with pytest.raises(psycopg.OperationalError, match="PQexec disallowed"):
            c.execute("SELECT 1; SELECT 2")
        assert c.closed or c.broken
    assert "PQexec disallowed" in t.log()  # log_pooler_errors is on by default


def test_application_name_add_host_appends_the_client_address(tidepool, pg):
    t = tidepool(settings="application_name_add_host = 1\ndefault_pool_size = 1\n")
    with t.connect(application_name="billing") as c:
        c.execute("SELECT %s::int", (1,))
        shown = c.execute("SELECT current_setting(%s)", ("application_name",)).fetchone()[0]
    assert shown.startswith("billing - 127.0.0.1:")
    assert int(shown.rsplit(":", 1)[1]) > 0


def test_empty_server_check_query_switches_the_check_off(tidepool):
    t = tidepool(settings="server_check_query =\nserver_check_delay = 0\nadmin_users = admin\n")
    with t.connect() as c:
        for _ in range(3):
            c.execute("SELECT %s::int", (1,))
    assert "server_check_query" not in t.log()
    with admin(t) as a:
        config = {r[0]: (r[1], r[2]) for r in a.execute("SHOW CONFIG").fetchall()}
    assert config["server_check_query"] == ("", "select 1")


def test_show_config_lists_every_setting_with_its_default(tidepool):
    t = tidepool(settings="admin_users = admin\njob_name = nightly\npkt_buf = 8192\nserver_round_robin = 1\n")
    with admin(t) as a:
        rows = {r[0]: r[1:] for r in a.execute("SHOW CONFIG").fetchall()}
    assert len(rows) > 80
    assert rows["job_name"] == ("nightly", "", "yes")
    assert rows["pkt_buf"] == ("8192", "65536", "no")
    assert rows["server_round_robin"] == ("1", "0", "yes")
    assert rows["listen_port"][2] == "no"
    assert "job_name is accepted but has no effect" in t.log()
    assert "pkt_buf is accepted" not in t.log()


def test_server_round_robin_spreads_transactions_over_the_servers(tidepool, pg):
    """With round robin, consecutive transactions of one client use every idle server in turn;
    without it, the server released last goes out again. One event loop: with several, a server
    on the client's own loop is preferred."""
    for round_robin, expect_spread in (("1", True), ("0", False)):
        t = tidepool(settings=f"server_round_robin = {round_robin}\ndefault_pool_size = 3\nthreads = 1\n")
        with t.connect() as warm:
            # Open three servers by holding them at once.
            holders = [t.connect() for _ in range(3)]
            for h in holders:
                h.execute("BEGIN")
                h.execute("SELECT 1")
            for h in holders:
                h.execute("COMMIT")
                h.close()
            pids = {warm.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(6)}
        assert (len(pids) == 3) == expect_spread, (round_robin, pids)
        t.stop()


def test_protocol_3_2_clients_are_answered_with_3_0(tidepool):
    """libpq 18 asking for protocol 3.2 gets NegotiateProtocolVersion with 3.0 and goes on."""
    assert psycopg.pq.version() >= 180000, "psycopg's bundled libpq 18 is needed"
    t = tidepool()
    with t.connect(max_protocol_version="3.2") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
        assert c.pgconn.protocol_version == 3


def test_show_state_uptime_counts_from_start(tidepool):
    """Uptime counts from the start of the process, not from the first SHOW STATE."""
    import time
    t = tidepool(settings="admin_users = admin\n")
    time.sleep(2.2)
    with admin(t) as a:
        state = {r[0]: r[1] for r in a.execute("SHOW STATE").fetchall()}
    assert int(state["uptime"]) >= 2, state


def traced_reads(t, work):
    """The read(2) calls the pooler makes while `work` runs, as (thread, fd, size asked for),
    with None between them where a thread waited in epoll_wait; skipped where ptrace is refused."""
    import re
    import shutil
    import subprocess
    import tempfile
    import time

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    out = tempfile.NamedTemporaryFile(suffix=".strace", delete=False).name
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-s", "0", "-e", "trace=read,epoll_wait", "-o", out,
                               "-p", str(t.proc.pid)], stderr=subprocess.PIPE)
    time.sleep(1.0)
    if tracer.poll() is not None:
        pytest.skip(f"strace cannot attach here: {tracer.stderr.read().decode().strip()}")
    try:
        work()
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    calls = []
    for line in open(out):
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        thread, call = parts
        if call.startswith("epoll_wait("):
            calls.append((thread, None, None))
        else:
            read = re.match(r"read\((\d+), .*?, (\d+)\)", call)
            if read:
                calls.append((thread, int(read.group(1)), int(read.group(2))))
    return calls


def big_result(t):
    with t.connect() as c:
        rows = c.execute("SELECT repeat('x', 1000) FROM generate_series(1, 4000)").fetchall()
        assert len(rows) == 4000


def longest_run(calls):
    """The most reads of one socket a thread made in a row without waiting in epoll_wait."""
    best, last = 0, {}
    for thread, fd, _ in calls:
        if fd is None:
            last.pop(thread, None)
            continue
        fd_before, run = last.get(thread, (None, 0))
        run = run + 1 if fd_before == fd else 1
        last[thread] = (fd, run)
        best = max(best, run)
    return best


def test_pkt_buf_bounds_each_read_and_sbuf_loopcnt_the_reads_per_turn(tidepool):
    """pkt_buf: no read of a connection asks for more than it (4 MB come through in reads of at most
    1 KiB; the default lets them grow to 64 KiB). sbuf_loopcnt: a connection is read at most that
    many times before its thread looks at the others (epoll_wait) again; 0 lets it read on."""
    limited = tidepool(settings="pkt_buf = 1024\nsbuf_loopcnt = 2\nthreads = 1\n")
    calls = traced_reads(limited, lambda: big_result(limited))
    socket_reads = [size for _, fd, size in calls if fd is not None and size > 8]
    assert len(socket_reads) > 3000 and max(socket_reads) <= 1024
    assert longest_run(calls) <= 2
    free = tidepool(settings="sbuf_loopcnt = 0\nthreads = 1\n")
    calls = traced_reads(free, lambda: big_result(free))
    assert max(size for _, fd, size in calls if fd is not None) > 1024
    assert longest_run(calls) > 2
