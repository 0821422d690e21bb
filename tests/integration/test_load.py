"""Load through Tidepool with pgbench: bounded servers, no failed transactions."""

import re
import subprocess
import threading
import time

import pytest


@pytest.fixture(scope="module")
def pgbench_data(pg):
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                    "postgres"], check=True, capture_output=True, timeout=120)


def run_pgbench(t, clients, *args, seconds=5, threads=2):
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-c", str(clients), "-j",
           str(threads), "-T", str(seconds), "-n", *args, "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "aborted" not in text, text[-3000:]
    failed = re.search(r"number of failed transactions: (\d+)", text)
    assert failed and failed.group(1) == "0", text[-3000:]
    processed = int(re.search(r"number of transactions actually processed: (\d+)", text).group(1))
    assert processed > 0
    return text


class Watcher:
    """Samples the number of server connections PostgreSQL sees for the pooled database."""

    def __init__(self, pg):
        self.pg = pg
        self.samples = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        with self.pg.connect() as conn:
            while not self.stop.is_set():
                self.samples.append(conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND datname = 'postgres' AND pid <> pg_backend_pid()").fetchone()[0])
                time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_1000_clients_on_pool_of_20(tidepool, pg, pgbench_data, protocol, script):
    t = tidepool(settings="default_pool_size = 20\nmax_client_conn = 2000\n")
    with Watcher(pg) as w:
        run_pgbench(t, 1000, "-M", protocol, "-b", script, seconds=5)
    assert w.samples and max(w.samples) <= 20, max(w.samples)
    assert max(w.samples) >= 10  # the pool was really used


def test_5000_clients_connected_at_once(tidepool, pg, pgbench_data):
    t = tidepool(settings="default_pool_size = 20\nmax_client_conn = 6000\n")
    with Watcher(pg) as w:
        run_pgbench(t, 5000, "-S", seconds=5, threads=4)
    assert max(w.samples) <= 20


def test_few_clients_many_transactions_across_event_loops(tidepool, pg, pgbench_data):
    """Regression: a server released by a client on one event loop and lent at once to a client on
    the server's own loop lost its link when the first client's late detach arrived, and the second
    client waited forever. Few clients and many short transactions hit that hand-over constantly."""
    t = tidepool(settings="default_pool_size = 20\nthreads = 2\n")
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-n", "-c", "4", "-j", "1",
           "-t", "3000", "-S", "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "number of transactions actually processed: 12000/12000" in out.stdout


def test_connection_per_transaction_from_several_threads(pg, tidepool, pgbench_data):
    """pgbench -C: every transaction is a new client, from two threads, onto 10 servers on several
    event loops. Regression: a server lent on its own loop while the previous lends' attach and
    detach were still queued there lost its owner, and the client's answer was dropped (a hang)."""
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 10\nmax_client_conn = 500\n")
    for _ in range(3):
        run_pgbench(t, 20, "-S", "-C", seconds=3)
