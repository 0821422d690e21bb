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
