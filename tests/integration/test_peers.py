"""Several pooler processes on one port (so_reuseport) acting as one for cancel requests: each
cancel key names the process that issued it, and a process that receives another's passes the
request on to that peer ([peers], peer_id), as PgBouncer's peering does."""

import threading
import time

import psycopg
import pytest
from psycopg import errors

from conftest import Tidepool, free_port
from test_admin import admin, rows


def two_peers(pg, tmp_path, peer_ids=(1, 2)):
    port = free_port()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    peers = "".join(f"{i} = host={d} port={port}\n" for i, d in zip((1, 2), dirs))
    return [Tidepool(pg, port=port, settings=f"so_reuseport = 1\nthreads = 2\nunix_socket_dir = {d}\n"
                                             f"peer_id = {peer_id}\nadmin_users = postgres\n[peers]\n{peers}")
            for peer_id, d in zip(peer_ids, dirs)]


def stop_both(pg, *poolers):
    """Stops them and waits until their servers have gone, so the next test counts backends right."""
    for t in poolers:
        t.stop()
    deadline = time.time() + 5
    while pg.backends("postgres") and time.time() < deadline:
        time.sleep(0.05)


def cancels_that_work(t, attempts):
    """Runs a long query `attempts` times, each on a new connection to the shared port, and cancels
    it through the shared port (the kernel picks either process for each): how many were cancelled."""
    cancelled = 0
    for _ in range(attempts):
        with t.connect() as c:
            cancelled += cancelled_while_running(c)
    return cancelled


def cancelled_while_running(c, seconds=5):
    """Whether cancelling a `seconds` long query on `c` a moment after it starts cancels it."""
    outcome = []

    def run():
        try:
            c.execute(f"SELECT pg_sleep({seconds})")
            outcome.append("finished")
        except errors.QueryCanceled:
            outcome.append("cancelled")

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    c.cancel()
    thread.join(seconds + 5)
    return outcome == ["cancelled"]


def test_a_cancel_reaching_the_other_process_is_passed_on(pg, tmp_path):
    a, b = two_peers(pg, tmp_path)
    try:
        # Both processes get clients and cancel requests; every cancel lands.
        assert cancels_that_work(a, 8) == 8
        with admin(a, user="postgres") as console:
            assert rows(console, "SHOW PEERS") == [
                {"peer_id": 1, "host": str(tmp_path / "a"), "port": a.port, "pool_size": 20},
                {"peer_id": 2, "host": str(tmp_path / "b"), "port": a.port, "pool_size": 20}]
            assert [r["database"] for r in rows(console, "SHOW PEER_POOLS")] == ["1", "2"]
            lists = {r["list"]: r["items"] for r in rows(console, "SHOW LISTS")}
            assert lists["peers"] == 2 and lists["peer_pools"] == 2
        assert "passed on" not in a.log() + b.log()
    finally:
        stop_both(pg, a, b)


def test_without_peering_a_cancel_can_reach_the_wrong_process(pg, tmp_path):
    """The case peering exists for: with peer_id 0 the process that gets the request knows no
    such key, so some cancels are lost (each has an even chance of reaching the wrong process)."""
    a, b = two_peers(pg, tmp_path, peer_ids=(0, 0))
    try:
        assert cancels_that_work(a, 10) < 10
    finally:
        stop_both(pg, a, b)


class CancelSplitter:
    """A TCP front for one pooler that sends cancel requests to another one instead (as a load
    balancer might): what reaches the front as a CancelRequest goes to `cancel_port`. It runs in
    a process of its own: libpq's blocking cancel holds the test's interpreter meanwhile."""

    def __init__(self, session_port, cancel_port):
        import multiprocessing
        import socket
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self.process = multiprocessing.get_context("fork").Process(
            target=self.serve, args=(listener, session_port, cancel_port), daemon=True)
        self.process.start()
        listener.close()

    @classmethod
    def serve(cls, listener, session_port, cancel_port):
        import socket
        while True:
            client, _ = listener.accept()
            first = client.recv(8, socket.MSG_PEEK | socket.MSG_WAITALL)
            port = cancel_port if first[4:8] == bytes.fromhex("04d2162e") else session_port
            upstream = socket.create_connection(("127.0.0.1", port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=cls.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self.process.terminate()
        self.process.join(5)


def test_a_cancel_request_is_passed_on_again_by_a_process_it_reached_by_mistake(pg):
    """Peer 2's entry in process 1's [peers] leads to process 3 (a host name with several
    addresses, a load balancer): process 3 passes the request on again, to process 2, which
    cancels the query. PgBouncer allows three such hops; with one, this cancel was lost."""
    ports = {1: free_port(), 2: free_port(), 3: free_port()}
    wrong = {1: {2: ports[3], 3: ports[3]}, 2: {1: ports[1], 3: ports[3]}, 3: {1: ports[1], 2: ports[2]}}
    poolers = {}
    for peer_id in (1, 2, 3):
        peers = "".join(f"{other} = host=127.0.0.1 port={port}\n" for other, port in wrong[peer_id].items())
        poolers[peer_id] = Tidepool(pg, port=ports[peer_id],
                                    settings=f"peer_id = {peer_id}\n[peers]\n{peers}")
    front = CancelSplitter(session_port=ports[2], cancel_port=ports[1])
    try:
        with psycopg.connect(host="127.0.0.1", port=front.port, dbname="postgres", user="postgres",
                             autocommit=True, sslmode="disable") as c:
            assert cancelled_while_running(c, seconds=10)
    finally:
        front.close()
        stop_both(pg, *poolers.values())
