"""Pool lifecycle against a real PostgreSQL: pre-ping, recycling, reserve pool, warm start,
fast failure and recovery, client-side timeouts, broken servers."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import re
import time

import psycopg
import pytest
from psycopg import errors

from conftest import LIB, free_port, own_postgres


def backend_pids(pg, user="postgres", dbname="postgres"):
    with pg.connect() as c:
        return [r[0] for r in c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = %s "
            "AND usename = %s AND pid <> pg_backend_pid()", (dbname, user)).fetchall()]


def hold_servers(t, n):
    """Opens n servers at once by holding n transactions, then lets them go idle."""
    conns = [t.connect() for _ in range(n)]
    for c in conns:
        c.execute("BEGIN")
        c.execute("SELECT 1")
    for c in conns:
        c.execute("COMMIT")
        c.close()


def test_terminated_idle_servers_give_clients_no_errors(tidepool, pg):
    t = tidepool(settings="default_pool_size = 3\nserver_check_delay = 0\n")
    hold_servers(t, 3)
    pids = backend_pids(pg)
    assert len(pids) == 3
    with pg.connect() as c:
        for pid in pids:
            c.execute("SELECT pg_terminate_backend(%s)", (pid,))
    errors_seen = []

    def work():
        try:
            with t.connect() as c:
                for _ in range(10):
                    c.execute("SELECT 1")
        except psycopg.Error as e:
            errors_seen.append(e)

    threads = [threading.Thread(target=work) for _ in range(5)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors_seen == []
    assert not set(backend_pids(pg)) & set(pids)


@pytest.mark.skipif(os.getuid() != 0, reason="stopping a backend needs the postgres user's rights")
def test_pre_ping_replaces_a_server_that_stopped_answering(tidepool, pg):
    t = tidepool(settings="default_pool_size = 2\nserver_check_delay = 0\nserver_connect_timeout = 1\n")
    hold_servers(t, 1)
    [pid] = backend_pids(pg)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.time()
        with t.connect() as c:
            got = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert got != pid
        assert time.time() - started < 5
        assert "server_check_query" in t.log()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_server_lifetime_replaces_servers(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\nserver_lifetime = 1\n")
    with t.connect() as c:
        first = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(1.3)
        c.execute("SELECT 1")  # released past its lifetime: closed
        second = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert first != second
    time.sleep(0.3)
    assert first not in backend_pids(pg)
    # PgBouncer's words, on the server's own line: S-<id>: db/user@host:port ... (age=Ns)
    assert re.search(r"S-\d+: postgres/postgres@127\.0\.0\.1:\d+ closing because: server lifetime over \(age=\d+s\)",
                     t.log()), t.log()


def test_idle_servers_are_closed_after_server_idle_timeout_with_their_own_log_line(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\nserver_idle_timeout = 0.5\n")
    with t.connect() as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
    deadline = time.time() + 5
    while time.time() < deadline and pid in backend_pids(pg):
        time.sleep(0.1)
    assert pid not in backend_pids(pg)
    assert re.search(r"S-\d+: postgres/postgres@127\.0\.0\.1:\d+ closing because: server idle timeout \(age=\d+s\)",
                     t.log()), t.log()


def test_server_lifetime_per_database(tidepool, pg):
    """PgBouncer 1.24+'s per-database server_lifetime: only that database's servers are replaced."""
    t = tidepool(
        settings="default_pool_size = 1\nserver_lifetime = 3600\n",
        databases=f"short = host=127.0.0.1 port={pg.port} dbname=postgres server_lifetime=1\n"
                  f"long = host=127.0.0.1 port={pg.port} dbname=postgres")
    with t.connect(dbname="short") as s, t.connect(dbname="long") as l:
        pids = [(s.execute("SELECT pg_backend_pid()").fetchone()[0], l.execute("SELECT pg_backend_pid()").fetchone()[0])]
        time.sleep(1.3)
        s.execute("SELECT 1")
        l.execute("SELECT 1")
        pids.append((s.execute("SELECT pg_backend_pid()").fetchone()[0], l.execute("SELECT pg_backend_pid()").fetchone()[0]))
    assert pids[0][0] != pids[1][0], "short's server was replaced"
    assert pids[0][1] == pids[1][1], "long's server was kept"


def test_server_idle_timeout_closes_down_to_min_pool_size(tidepool, pg):
    t = tidepool(
        databases=f"warm = host=127.0.0.1 port={pg.port} dbname=postgres user=postgres min_pool_size=1",
        settings="server_idle_timeout = 1\ndefault_pool_size = 4\n")
    # Warm start: min_pool_size servers are there before any client comes.
    deadline = time.time() + 5
    while len(backend_pids(pg)) < 1 and time.time() < deadline:
        time.sleep(0.1)
    assert len(backend_pids(pg)) == 1
    conns = [t.connect(dbname="warm") for _ in range(3)]
    for c in conns:
        c.execute("BEGIN")
    for c in conns:
        c.execute("COMMIT")
        c.close()
    assert len(backend_pids(pg)) == 3
    time.sleep(2.5)
    assert len(backend_pids(pg)) == 1


def test_reserve_pool_opens_under_a_burst_and_shrinks_back(tidepool, pg):
    t = tidepool(settings="default_pool_size = 2\nreserve_pool_size = 2\nreserve_pool_timeout = 0.3\n")
    peak = []

    def work():
        with t.connect() as c:
            c.execute("SELECT pg_sleep(1.5)")

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    time.sleep(1.0)
    peak.append(len(backend_pids(pg)))
    for th in threads:
        th.join(30)
    assert peak[0] == 4
    assert "taking connection from reserve_pool" in t.log()  # PgBouncer's words
    time.sleep(0.5)
    assert len(backend_pids(pg)) <= 2


def test_client_idle_timeout(tidepool):
    t = tidepool(settings="client_idle_timeout = 1\n")
    with t.connect() as c:
        c.execute("SELECT 1")
        time.sleep(1.5)
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    assert "client_idle_timeout" in t.log()


def test_idle_transaction_timeout(tidepool, pg):
    t = tidepool(settings="idle_transaction_timeout = 1\ndefault_pool_size = 1\n")
    with t.connect() as c:
        c.execute("BEGIN")
        c.execute("SELECT 1")
        time.sleep(1.5)
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
    # The server with the open transaction was not given to anyone.
    with t.connect() as c:
        assert c.execute("SELECT txid_current_if_assigned()").fetchone()[0] is None
    assert "idle_transaction_timeout" in t.log()


def test_query_timeout_cancels_the_query_and_closes(tidepool, pg):
    t = tidepool(settings="query_timeout = 1\n")
    with t.connect() as c:
        started = time.time()
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT pg_sleep(30)")
        assert time.time() - started < 5
    time.sleep(0.5)
    with pg.connect() as admin:
        assert admin.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' "
                             "AND state = 'active'").fetchone()[0] == 0
    assert "query_timeout" in t.log()


def test_per_user_query_timeout(tidepool, pg):
    with pg.connect() as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE patient LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    t = tidepool(settings="query_timeout = 1\n", users="patient = query_timeout=0")
    with t.connect(user="patient") as c:
        c.execute("SELECT pg_sleep(1.5)")
    with t.connect() as c:
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT pg_sleep(1.5)")


def test_transaction_timeout(tidepool):
    t = tidepool(settings="transaction_timeout = 1\n")
    with t.connect() as c:
        c.execute("BEGIN")
        with pytest.raises(psycopg.OperationalError):
            for _ in range(30):
                c.execute("SELECT pg_sleep(0.1)")
    assert "transaction_timeout" in t.log()


def test_cancel_while_waiting_for_a_server(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as holder, t.connect() as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        result = {}

        def wait():
            try:
                waiter.execute("SELECT 'never ran'")
                result["w"] = "ran"
            except errors.QueryCanceled:
                result["w"] = "canceled"

        th = threading.Thread(target=wait)
        th.start()
        time.sleep(0.4)
        waiter.cancel()
        th.join(5)
        assert result.get("w") == "canceled"
        # It never took a server, and it still works once one is free.
        holder.execute("COMMIT")
        assert waiter.execute("SELECT 'works'").fetchone()[0] == "works"


def test_broken_server_fails_only_its_client(tidepool, pg):
    t = tidepool(settings="default_pool_size = 2\n")
    with t.connect() as victim, t.connect() as bystander:
        victim.execute("BEGIN")
        victim_pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
        bystander.execute("BEGIN")
        bystander.execute("SELECT 1")
        with pg.connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (victim_pid,))
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        # Closed here: libpq may not have read the pooler's close yet, and leaving the block would
        # send it a COMMIT (a race of the test's own, seen once under load).
        victim.close()
        assert bystander.execute("SELECT 2").fetchone()[0] == 2
        bystander.execute("COMMIT")
    with t.connect() as c:
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] != victim_pid


@pytest.fixture
def second_pg():
    with own_postgres("tidepool-pg2-") as server:
        yield server


def pg_ctl(pg, action, mode="fast"):
    cmd = f". '{LIB}'; \"$(pg_bindir)/pg_ctl\" -D '{pg.dir}/data' -l '{pg.dir}/postgres.log' -w -m {mode} {action}"
    if os.getuid() == 0:
        cmd = f". '{LIB}'; su postgres -s /bin/sh -c \"\\\"$(pg_bindir)/pg_ctl\\\" -D '{pg.dir}/data' -l '{pg.dir}/postgres.log' -w -m {mode} {action}\""
    subprocess.run(["bash", "-c", cmd], check=True, capture_output=True)


def test_stopped_postgres_is_waited_for_and_pool_recovers_within_a_second(tidepool, second_pg):
    """A database that served and then went away is a restart: clients wait for it up to
    query_wait_timeout and are told why if it does not come back."""
    t = tidepool(databases=f"* = host=127.0.0.1 port={second_pg.port}",
                 settings="server_connect_timeout = 2\nserver_login_retry = 15\nquery_wait_timeout = 2\n")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    pg_ctl(second_pg, "stop")
    started = time.time()
    with pytest.raises(psycopg.OperationalError) as info:
        with t.connect() as c:
            c.execute("SELECT 1")
    assert 1.8 < time.time() - started < 4
    assert "server connection failed" in str(info.value)
    # A client that asks while it is down is served once it is back.
    with t.connect() as c:
        restart = threading.Timer(0.5, pg_ctl, args=(second_pg, "start"))
        restart.start()
        assert c.execute("SELECT 1").fetchone()[0] == 1
        restart.join()
    pg_ctl(second_pg, "stop")
    time.sleep(0.3)
    pg_ctl(second_pg, "start")
    back = time.time()
    while True:
        try:
            with t.connect() as c:
                c.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            assert time.time() - back < 1.0, "pool did not serve again within a second"
            time.sleep(0.05)


def test_server_connect_timeout_covers_a_server_that_never_answers(tidepool):
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts; nobody ever answers the startup packet
    try:
        t = tidepool(databases=f"silent = host=127.0.0.1 port={silent.getsockname()[1]} dbname=x",
                     settings="server_connect_timeout = 1\nserver_connect_fail_fast = 1\n")
        started = time.time()
        with pytest.raises(psycopg.OperationalError) as info:
            t.connect(dbname="silent")
        assert 0.8 < time.time() - started < 3
        assert "timed out" in str(info.value)
    finally:
        silent.close()


def test_host_lists_round_robin_and_disable(tidepool, pg):
    """host=a,b as PgBouncer: round-robin (the default) spreads new servers over the hosts;
    load_balance_hosts=disable stays on the first host that works."""
    t = tidepool(
        settings="default_pool_size = 4\n",
        databases=f"rr = host=127.0.0.1,{pg.dir} port={pg.port} dbname=postgres\n"
                  f"first = host=127.0.0.9,127.0.0.1 port={pg.port} dbname=postgres load_balance_hosts=disable")
    conns = [t.connect(dbname="rr") for _ in range(4)]
    try:
        for c in conns:
            c.execute("BEGIN")
        seen = [c.execute("SELECT inet_server_addr()::text").fetchone()[0] for c in conns]
        assert sorted(map(str, seen)) == sorted(["127.0.0.1/32", "127.0.0.1/32", "None", "None"]), seen
    finally:
        for c in conns:
            c.close()
    # 127.0.0.9 refuses: after that, every new server goes to 127.0.0.1.
    deadline = time.time() + 10
    while True:
        try:
            with t.connect(dbname="first") as c:
                c.execute("SELECT 1")
            break
        except psycopg.Error:
            assert time.time() < deadline
            time.sleep(0.2)
    conns = [t.connect(dbname="first") for _ in range(3)]
    try:
        for c in conns:
            c.execute("BEGIN")
            assert c.execute("SELECT inet_server_addr()::text").fetchone()[0] == "127.0.0.1/32"
    finally:
        for c in conns:
            c.close()


def test_a_pooler_started_before_its_database_serves_the_first_clients_once_it_is_up(tidepool):
    """The first clients of a database that is not up yet wait (up to query_wait_timeout) and
    are served once it is; with server_connect_fail_fast they fail at once instead."""
    directory = tempfile.mkdtemp(prefix="tidepool-pg-late-")
    port = free_port()
    databases = f"late = host=127.0.0.1 port={port} dbname=postgres"
    t = tidepool(databases=databases, settings="query_wait_timeout = 60\n")
    fast = tidepool(databases=databases, settings="server_connect_fail_fast = 1\n")
    results = []

    def first_client():
        started = time.time()
        try:
            with psycopg.connect(t.dsn(dbname="late"), connect_timeout=60) as c:
                results.append((c.execute("SELECT 'served'").fetchone()[0], time.time() - started))
        except psycopg.Error as e:
            results.append((repr(e), time.time() - started))

    th = threading.Thread(target=first_client)
    th.start()
    try:
        time.sleep(1.0)
        assert results == [], "waiting, not failed"
        started = time.time()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(fast.dsn(dbname="late"), connect_timeout=10)
        assert time.time() - started < 5, "the circuit breaker fails at once"
        subprocess.run(["bash", "-c", f". '{LIB}'; start_postgres '{directory}' {port}"], check=True)
        up = time.time()
        th.join(60)
        assert results and results[0][0] == "served", results
        assert time.time() - up < 5
        with psycopg.connect(fast.dsn(dbname="late"), connect_timeout=10) as c:
            # The breaker lets clients through once a probe finds the database up.
            assert c.execute("SELECT 1").fetchone()[0] == 1
    finally:
        th.join(60)
        subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def test_pool_idle_timeout_frees_unused_pools(tidepool):
    """pool_idle_timeout: once a pool has had no client and no server for that long it is freed
    (SHOW POOLS no longer lists it); the next client makes it anew. autodb_idle_timeout does the
    same for databases made from the * entry."""
    t = tidepool(settings="pool_idle_timeout = 1\nserver_idle_timeout = 0.5\nadmin_users = admin\n")
    with t.connect() as c:
        c.execute("SELECT 1")
    with t.connect(dbname="pgbouncer", user="admin") as a:
        assert [r[0] for r in a.execute("SHOW POOLS").fetchall() if r[0] == "postgres"] == ["postgres"]
        deadline = time.time() + 10
        while time.time() < deadline and any(r[0] == "postgres" for r in a.execute("SHOW POOLS").fetchall()):
            time.sleep(0.2)
        assert not any(r[0] == "postgres" for r in a.execute("SHOW POOLS").fetchall())
    assert "freed" in t.log()
    with t.connect() as c:
        assert c.execute("SELECT 2").fetchone()[0] == 2
    auto = tidepool(settings="autodb_idle_timeout = 1\nserver_idle_timeout = 0.5\nadmin_users = admin\n")
    with auto.connect() as c:
        c.execute("SELECT 1")
    deadline = time.time() + 10
    while time.time() < deadline and "freed" not in auto.log():
        time.sleep(0.2)
    assert "freed" in auto.log()
