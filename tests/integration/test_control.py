"""PAUSE/RESUME and the signals: SIGUSR1/SIGUSR2, graceful SIGTERM, SIGINT, SIGQUIT."""

import signal
import threading
import time

import psycopg
import pytest


def admin(t):
    return t.connect(dbname="pgbouncer", user="admin")


def test_pause_waits_for_lent_servers_and_resume_releases_the_queue(tidepool):
    t = tidepool(settings="admin_users = admin\ndefault_pool_size = 2\n")
    with t.connect() as busy, t.connect() as later, admin(t) as a:
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        paused = threading.Event()
        th = threading.Thread(target=lambda: (a.execute("PAUSE"), paused.set()))
        th.start()
        time.sleep(0.4)
        assert not paused.is_set(), "PAUSE returned while a server was still lent"
        busy.execute("COMMIT")
        assert paused.wait(5)
        th.join()
        got = []
        waiter = threading.Thread(target=lambda: got.append(later.execute("SELECT 'after resume'").fetchone()[0]))
        waiter.start()
        time.sleep(0.4)
        assert got == []  # queued while paused
        with admin(t) as a2:
            a2.execute("RESUME")
        waiter.join(5)
        assert got == ["after resume"]


def test_sigusr1_pauses_and_sigusr2_resumes(tidepool):
    t = tidepool()
    with t.connect() as c:
        c.execute("SELECT 1")
        t.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        got = []
        th = threading.Thread(target=lambda: got.append(c.execute("SELECT 2").fetchone()[0]))
        th.start()
        time.sleep(0.4)
        assert got == []
        t.proc.send_signal(signal.SIGUSR2)
        th.join(5)
        assert got == [2]


def test_sigterm_waits_for_clients_then_exits(tidepool):
    t = tidepool()
    c = t.connect()
    c.execute("BEGIN")
    c.execute("SELECT 1")
    t.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert t.proc.poll() is None, "exited while a client was still connected"
    with pytest.raises(psycopg.OperationalError):
        t.connect()  # no new clients
    c.execute("INSERT INTO items (note) VALUES ('during sigterm')")
    c.execute("COMMIT")
    c.close()
    t.proc.wait(timeout=5)
    assert t.proc.returncode == 0


def test_sigterm_gives_up_after_shutdown_timeout(tidepool):
    t = tidepool(settings="shutdown_timeout = 1\n")
    c = t.connect()
    c.execute("SELECT 1")
    started = time.time()
    t.proc.send_signal(signal.SIGTERM)
    t.proc.wait(timeout=10)
    assert 0.9 < time.time() - started < 5
    c.close()


def test_sigint_finishes_transactions_in_flight_then_exits(tidepool):
    t = tidepool()
    c = t.connect()
    c.execute("BEGIN")
    c.execute("SELECT 1")
    t.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert t.proc.poll() is None, "exited with a transaction in flight"
    c.execute("COMMIT")
    t.proc.wait(timeout=5)
    assert t.proc.returncode == 0
    c.close()


def test_sigquit_exits_at_once(tidepool):
    t = tidepool()
    c = t.connect()
    c.execute("BEGIN")
    t.proc.send_signal(signal.SIGQUIT)
    t.proc.wait(timeout=5)
    assert t.proc.returncode == 0
    c.close()


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGQUIT), (signal.SIGTERM, signal.SIGTERM),
                                          (signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_while_draining_stops_at_once(tidepool, first, second):
    """A client idle in a session keeps SIGTERM (and one in a transaction keeps SIGINT) waiting;
    SIGQUIT, or a second SIGTERM or SIGINT, then stops the pooler at once, as in PgBouncer."""
    t = tidepool()
    c = t.connect()
    c.execute("BEGIN")
    c.execute("SELECT 1")
    t.proc.send_signal(first)
    time.sleep(0.5)
    assert t.proc.poll() is None, "the first signal waits for the client"
    started = time.time()
    t.proc.send_signal(second)
    t.proc.wait(timeout=5)
    assert time.time() - started < 3
    assert t.proc.returncode == 0
    c.close()


def backends(pg):
    return pg.backends(user="postgres")


def test_reload_shrinks_the_pool_and_adds_databases_without_dropping_clients(tidepool, pg):
    t = tidepool(settings="default_pool_size = 3\nadmin_users = admin\n",
                 databases=f"postgres = host=127.0.0.1 port={pg.port}")
    keep = t.connect()
    conns = [t.connect() for _ in range(3)]
    for c in conns:
        c.execute("BEGIN")
    for c in conns:
        c.execute("COMMIT")
        c.close()
    assert backends(pg) == 3
    text = t.ini.read_text()
    text = text.replace("default_pool_size = 3", "default_pool_size = 1")
    text = text.replace("[databases]\n", f"[databases]\nadded = host=127.0.0.1 port={pg.port} dbname=postgres\n")
    t.ini.write_text(text)
    t.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 3
    while backends(pg) > 1 and time.time() < deadline:
        time.sleep(0.05)
    assert backends(pg) == 1
    assert keep.execute("SELECT 'still here'").fetchone()[0] == "still here"
    with t.connect(dbname="added") as c:
        assert c.execute("SELECT current_database()").fetchone()[0] == "postgres"
    with admin(t) as a:
        config = {r[0]: r[1] for r in a.execute("SHOW CONFIG").fetchall()}
        assert config["default_pool_size"] == "1"
    keep.close()


def test_reload_warms_pools_of_added_databases_and_raised_minimums(tidepool, pg):
    """min_pool_size is kept all the time: a database added by RELOAD, or whose minimum RELOAD
    raises, is warmed without waiting for a client."""
    t = tidepool(databases=f"cold = host=127.0.0.1 port={pg.port} dbname=appdb user=postgres")
    time.sleep(1.5)
    assert pg.backends("appdb") == 0 and pg.backends("postgres") == 0
    text = t.ini.read_text().replace(
        "dbname=appdb user=postgres",
        f"dbname=appdb user=postgres min_pool_size=2\nadded = host=127.0.0.1 port={pg.port} "
        "dbname=postgres user=postgres min_pool_size=1")
    t.ini.write_text(text)
    t.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while (pg.backends("appdb") < 2 or pg.backends("postgres") < 1) and time.time() < deadline:
        time.sleep(0.1)
    assert pg.backends("appdb") == 2
    assert pg.backends("postgres") == 1


def test_invalid_config_on_reload_is_rejected_and_the_old_one_stays(tidepool):
    t = tidepool(settings="default_pool_size = 3\nadmin_users = admin\n")
    good = t.ini.read_text()
    t.ini.write_text(good.replace("default_pool_size = 3", "default_pool_size = lots"))
    with admin(t) as a:
        with pytest.raises(psycopg.Error) as info:
            a.execute("RELOAD")
        assert "default_pool_size" in str(info.value)
        config = {r[0]: r[1] for r in a.execute("SHOW CONFIG").fetchall()}
        assert config["default_pool_size"] == "3"
    assert "RELOAD rejected" in t.log()
    t.ini.write_text(good)
    with admin(t) as a:
        a.execute("RELOAD")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_console_commands_name_only_configured_databases_and_kill_spares_the_console(tidepool, pg):
    """PAUSE, RESUME, KILL, RECONNECT and WAIT_CLOSE of a database the configuration lacks are
    refused with PgBouncer's "no such database"; KILL of every database closes the pools' clients
    but not the console sessions, the one asking included."""
    t = tidepool(settings="admin_users = admin\n",
                 databases=f"postgres = host=127.0.0.1 port={pg.port}")
    with admin(t) as a, admin(t) as other, t.connect() as client:
        client.execute("SELECT 1")
        for command in ["PAUSE nosuchdb", "RESUME nosuchdb", "KILL nosuchdb", "RECONNECT nosuchdb",
                        "WAIT_CLOSE nosuchdb"]:
            with pytest.raises(psycopg.Error) as info:
                a.execute(command)
            assert "no such database: nosuchdb" in str(info.value), command
        a.execute("KILL")
        time.sleep(0.3)
        with pytest.raises(psycopg.OperationalError):
            client.execute("SELECT 1")
        assert a.execute("SHOW VERSION").fetchone()
        assert other.execute("SHOW STATE").fetchall()
        a.execute("RESUME")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_resume_is_refused_in_pgbouncers_words_and_a_pause_covers_pools_made_later(tidepool, pg):
    t = tidepool(settings="admin_users = admin\n")
    with admin(t) as a:
        for command, message in [("RESUME", "pooler is not paused/suspended"),
                                 ("RESUME postgres", "database postgres is not paused")]:
            with pytest.raises(psycopg.Error, match=message) as info:
                a.execute(command)
            assert info.value.sqlstate == "08P01"  # every console error, as PgBouncer
        # PAUSE covers a pool that does not exist yet (template1's first client comes after it).
        a.execute("PAUSE")
        got = []

        def late_client():
            with t.connect(dbname="template1") as c:
                got.append(c.execute("SELECT 'late'").fetchone()[0])

        th = threading.Thread(target=late_client)
        th.start()
        time.sleep(0.5)
        assert got == []
        a.execute("RESUME")
        th.join(10)
        assert got == ["late"]
        # While a shutdown waits for servers, RESUME would undo its pause: refused.
        with t.connect() as busy:
            busy.execute("BEGIN")
            busy.execute("SELECT 1")
            t.proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            with pytest.raises(psycopg.Error, match="pooler is shutting down"):
                a.execute("RESUME")
            busy.execute("COMMIT")
    t.proc.wait(10)


def test_sigint_closes_new_transactions_and_keeps_the_unix_socket_for_the_console(tidepool):
    """SHUTDOWN WAIT_FOR_SERVERS as PgBouncer: the transaction in flight goes on; a client already
    queued, and one that starts a new transaction, are closed with "server shutting down"; TCP stops
    accepting; the Unix socket still lets the console in (and refuses databases) until the end."""
    t = tidepool(settings="default_pool_size = 1\nadmin_users = postgres\n")
    busy = t.connect()
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    idle = t.connect()
    queued_result = []

    def queued_client():
        with t.connect() as c:
            try:
                c.execute("SELECT 1")
                queued_result.append("served")
            except psycopg.Error as e:
                queued_result.append(e)

    th = threading.Thread(target=queued_client)
    th.start()
    time.sleep(0.5)  # queued behind the one server
    t.proc.send_signal(signal.SIGINT)
    th.join(10)
    assert len(queued_result) == 1 and "server shutting down" in str(queued_result[0]), queued_result
    with pytest.raises(psycopg.OperationalError, match="server shutting down"):
        idle.execute("SELECT 1")
    busy.execute("SELECT 2")  # same transaction: still served
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=t.port, user="postgres", dbname="postgres", connect_timeout=3)
    with psycopg.connect(host=str(t.dir), port=t.port, user="postgres", dbname="pgbouncer",
                         autocommit=True) as console:
        assert console.execute("SHOW VERSION").fetchone()[0].startswith("Tidepool")
    with pytest.raises(psycopg.OperationalError, match="server shutting down"):
        psycopg.connect(host=str(t.dir), port=t.port, user="postgres", dbname="postgres")
    assert t.proc.poll() is None, "exited with a transaction in flight"
    busy.execute("COMMIT")
    t.proc.wait(timeout=10)
    assert t.proc.returncode == 0
    assert "server shutting down" in t.log()
    busy.close()
    idle.close()


def test_reload_replaces_servers_whose_connection_settings_changed(tidepool, pg):
    """As PgBouncer: a RELOAD that changes a database's connection string closes its idle servers
    and those in use once released; a database whose entry did not change keeps its servers."""
    t = tidepool(databases=f"moving = host=127.0.0.1 port={pg.port} dbname=postgres\n"
                           f"steady = host=127.0.0.1 port={pg.port} dbname=postgres")
    moving = t.connect(dbname="moving")
    steady = t.connect(dbname="steady")
    assert moving.execute("SELECT current_database()").fetchone()[0] == "postgres"
    steady_pid = steady.execute("SELECT pg_backend_pid()").fetchone()[0]
    t.ini.write_text(t.ini.read_text().replace("moving = host=127.0.0.1 port={} dbname=postgres".format(pg.port),
                                               "moving = host=127.0.0.1 port={} dbname=appdb".format(pg.port)))
    t.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 5
    while "configuration applied" not in t.log() and time.time() < deadline:
        time.sleep(0.05)
    assert moving.execute("SELECT current_database()").fetchone()[0] == "appdb"
    assert steady.execute("SELECT pg_backend_pid()").fetchone()[0] == steady_pid
    moving.close()
    steady.close()


def test_server_fast_close_ends_sessions_on_replaced_servers(tidepool):
    """server_fast_close in session pooling: after RECONNECT a client between transactions is
    closed at once and one inside a transaction when it ends; its COMMIT still succeeds."""
    t = tidepool(settings="pool_mode = session\nserver_fast_close = 1\nadmin_users = admin\n")
    idle = t.connect()
    idle.execute("SELECT 1")
    busy = t.connect()
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    with t.connect(dbname="pgbouncer", user="admin") as a:
        a.execute("RECONNECT")
    time.sleep(0.3)
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    assert busy.execute("SELECT 2").fetchone()[0] == 2  # same transaction, same server
    busy.execute("COMMIT")
    with pytest.raises(psycopg.OperationalError):
        busy.execute("SELECT 3")
    assert "database configuration changed" in t.log()
    # Without it, a session keeps its server until it leaves.
    slow = tidepool(settings="pool_mode = session\nadmin_users = admin\n")
    kept = slow.connect()
    pid = kept.execute("SELECT pg_backend_pid()").fetchone()[0]
    with slow.connect(dbname="pgbouncer", user="admin") as a:
        a.execute("RECONNECT")
    time.sleep(0.3)
    assert kept.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
    for c in (idle, busy, kept):
        c.close()


def test_suspend_drops_what_is_still_busy_after_suspend_timeout(tidepool, pg):
    """SUSPEND waits for lent servers like PAUSE, but at most suspend_timeout: a client still in a
    transaction then is dropped (its server closed, never reused), SUSPEND returns, and RESUME
    serves new clients. A transaction that ends in time is left alone."""
    t = tidepool(settings="admin_users = admin\ndefault_pool_size = 2\nsuspend_timeout = 1\npool_mode = transaction\n")
    with t.connect() as quick, admin(t) as a:
        quick.execute("BEGIN")
        quick.execute("SELECT 1")
        threading.Timer(0.3, lambda: quick.execute("COMMIT")).start()
        started = time.time()
        a.execute("SUSPEND")
        assert time.time() - started < 1.0
        a.execute("RESUME")
        assert quick.execute("SELECT 1").fetchone() == (1,)  # finished in time: kept
    with t.connect() as stuck, admin(t) as a:
        stuck.execute("BEGIN")
        pid = stuck.execute("SELECT pg_backend_pid()").fetchone()[0]
        started = time.time()
        a.execute("SUSPEND")
        assert 0.9 < time.time() - started < 5
        with pytest.raises(psycopg.OperationalError):
            stuck.execute("SELECT 1")
        a.execute("RESUME")
        with t.connect() as fresh:
            assert fresh.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert "suspend_timeout" in t.log()
