"""Faults under load: servers killed, PostgreSQL restarted. Tidepool must not hang, leak or crash,
and must serve again as soon as PostgreSQL does."""

import random
import subprocess
import threading
import time

import psycopg

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
    baseline = t.pid_fd_count()
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
    assert settle_fds(t, baseline) <= baseline + 4 + 10  # at most the pool's servers came back


def test_postgres_restart_under_load(tidepool, second_pg):
    t = tidepool(databases=f"* = host=127.0.0.1 port={second_pg.port}",
                 settings="default_pool_size = 10\nmax_client_conn = 500\nserver_connect_timeout = 2\n")
    wait_serving(t, 5)
    subprocess.run(["pgbench", "-i", "-q", "-h", "127.0.0.1", "-p", str(second_pg.port), "-U", "postgres",
                    "postgres"], check=True, capture_output=True)
    baseline = t.pid_fd_count()
    bench = start_pgbench(t.port, 200, 5, "-S")
    time.sleep(1.5)
    pg_ctl(second_pg, "stop", mode="immediate")
    pg_ctl(second_pg, "start")
    back = time.time()
    assert wait_serving(t, 1.5) == 1
    assert time.time() - back < 1.5
    bench.communicate(timeout=60)  # pgbench ends: clients got errors or went on, none hangs
    assert settle_fds(t, baseline) <= baseline + 4 + 10
