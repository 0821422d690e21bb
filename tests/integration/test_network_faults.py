"""Peers that vanish from the network without a word (no FIN, no RST): found by TCP keepalive on
client sockets as on server sockets, within the configured time. The vanishing is real: the peer
sits in its own network namespace, joined to this one by a veth pair whose link is cut."""

import os
import subprocess
import sys
import textwrap
import time

import pytest


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: (namespace, address here, address
    there, the link's name there). Skipped where namespaces cannot be made (not root)."""
    tag = os.getpid() % 10000
    name, here_link, there_link = f"tpns{tag}", f"tpa{tag}", f"tpb{tag}"
    octet = os.getpid() % 200 + 20
    here, there = f"10.213.{octet}.1", f"10.213.{octet}.2"
    if ip("netns", "add", name, check=False).returncode != 0:
        pytest.skip("network namespaces need root")
    try:
        ip("link", "add", here_link, "type", "veth", "peer", "name", there_link)
        ip("link", "set", there_link, "netns", name)
        ip("addr", "add", f"{here}/30", "dev", here_link)
        ip("link", "set", here_link, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{there}/30", "dev", there_link)
        ip("netns", "exec", name, "ip", "link", "set", there_link, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, here, there, there_link
    finally:
        ip("link", "del", here_link, check=False)
        ip("netns", "del", name, check=False)


CLIENT = textwrap.dedent("""
    import sys, time, psycopg
    conn = psycopg.connect(host=sys.argv[1], port=int(sys.argv[2]), dbname="postgres", user="postgres",
                           prepare_threshold=None)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # opens a transaction
    print(pid, flush=True)
    time.sleep(600)
""")


def test_vanished_client_inside_a_transaction_frees_its_server(tidepool, pg, netns):
    """A client in another namespace opens a transaction, then its link is cut and it dies (its
    FIN never arrives). Keepalive probes on the client socket find it gone: the pooler closes it,
    and its server, idle in a transaction, is closed rather than kept."""
    name, here, _, there_link = netns
    idle, interval, count = 2, 1, 2
    t = tidepool(settings=f"listen_addr = 127.0.0.1,{here}\ntcp_keepalive = 1\ntcp_keepidle = {idle}\n"
                          f"tcp_keepintvl = {interval}\ntcp_keepcnt = {count}\n")
    client = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", CLIENT, here, str(t.port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid = int(client.stdout.readline())
        assert pg.scalar("SELECT state FROM pg_stat_activity WHERE pid = %s", pid) == "idle in transaction"
        # Let the client's last ACK through: with data unacknowledged, retransmissions (and
        # tcp_user_timeout), not keepalive, are what find the peer gone.
        time.sleep(0.5)
        ip("netns", "exec", name, "ip", "link", "set", there_link, "down")
        cut = time.time()
        client.kill()
        client.wait()
        limit = idle + interval * count
        while time.time() - cut < limit + 6:
            if not pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pid):
                break
            time.sleep(0.1)
        freed = time.time() - cut
        assert freed < limit + 3, f"server still held {freed:.1f} s after the client vanished\n{t.log()[-2000:]}"
        assert freed > idle - 0.5, f"freed after {freed:.1f} s: before keepalive could have noticed"
        with t.connect() as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.fixture
def pg_in_netns(netns):
    """A PostgreSQL inside the namespace, reached over the veth pair: (namespace, its address, port,
    the link's name there)."""
    import shutil
    import tempfile

    from conftest import LIB, free_port
    name, _, there, there_link = netns
    directory = tempfile.mkdtemp(prefix="tidepool-pgns-")
    port = free_port()
    subprocess.run(["ip", "netns", "exec", name, "bash", "-c",
                    f". '{LIB}'; start_postgres '{directory}' {port} off {there}"], check=True)
    try:
        yield name, there, port, there_link
    finally:
        subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def test_server_path_dropped_ends_in_errors_and_heals(tidepool, pg_in_netns):
    """The path to PostgreSQL drops packets (link cut, no RST): a client whose query is in flight
    gets an error once keepalive gives the server up, a new client gets one at
    server_connect_timeout, and once the path is back the pool serves again at once."""
    import threading

    import psycopg
    name, there, port, there_link = pg_in_netns
    idle, interval, count = 2, 1, 2
    t = tidepool(databases=f"* = host={there} port={port}",
                 settings=f"tcp_keepalive = 1\ntcp_keepidle = {idle}\ntcp_keepintvl = {interval}\n"
                          f"tcp_keepcnt = {count}\nserver_connect_timeout = 2\nquery_wait_timeout = 3\n"
                          "server_login_retry = 1\n")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    outcome = {}

    def in_flight():
        try:
            with t.connect() as c:
                ready.set()
                c.execute("SELECT pg_sleep(30)")
        except psycopg.Error as e:
            outcome["error"] = str(e)
        outcome["at"] = time.time()

    ready = threading.Event()
    runner = threading.Thread(target=in_flight)
    runner.start()
    assert ready.wait(10)
    time.sleep(0.5)  # the query reached the server and was acknowledged
    ip("netns", "exec", name, "ip", "link", "set", there_link, "down")
    cut = time.time()
    try:
        # A new client, while the path is down: its server cannot be reached.
        started = time.time()
        with pytest.raises(psycopg.OperationalError):
            with t.connect() as c:
                c.execute("SELECT 1")
        new_client = time.time() - started
        runner.join(idle + interval * count + 10)
        assert "error" in outcome, outcome
    finally:
        ip("netns", "exec", name, "ip", "link", "set", there_link, "up")
    healed = time.time()
    assert new_client < 3 + 2, f"new client waited {new_client:.1f} s"
    # Keepalive probes start after `idle` seconds without traffic (the query was sent 0.5 s
    # before the cut) and give up after `count` unanswered ones.
    assert outcome["at"] - cut < idle + interval * count + 2, outcome
    while True:
        try:
            with t.connect() as c:
                assert c.execute("SELECT 1").fetchone()[0] == 1
            break
        except psycopg.OperationalError:
            assert time.time() - healed < 3, "the pool did not serve again after the path came back"
            time.sleep(0.1)
