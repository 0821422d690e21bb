"""Server host names through the DNS cache: dns_max_ttl, dns_nxdomain_ttl, dns_zone_check_period and
resolv_conf, against a name server run by the test (UDP, loopback) and a PostgreSQL listening on
127.0.0.1 and 127.0.0.2, so that moving a name from one address to the other is a failover the
pooler must follow."""

import socket
import struct
import tempfile
import threading
import time
import urllib.request

import psycopg
import pytest

from conftest import free_port, own_postgres, wait_for_port

ZONE = "tidepool.test"


class NameServer:
    """Answers A questions from `records`, SOA questions for ZONE with `serial`, NXDOMAIN for
    names it does not know; counts the questions."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.records = {}
        self.serial = 1
        self.questions = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @staticmethod
    def read_name(packet, offset):
        labels = []
        while packet[offset]:
            length = packet[offset]
            labels.append(packet[offset + 1:offset + 1 + length].decode())
            offset += length + 1
        return ".".join(labels), offset + 1

    @staticmethod
    def name(text):
        return b"".join(bytes([len(part)]) + part.encode() for part in text.split(".")) + b"\0"

    def answer(self, packet):
        (ident,) = struct.unpack("!H", packet[:2])
        qname, end = self.read_name(packet, 12)
        qtype, _ = struct.unpack("!HH", packet[end:end + 4])
        self.questions.append((qname, qtype))
        question = packet[12:end + 4]
        records = []
        rcode = 0
        if qtype == 6 and qname == ZONE:
            soa = self.name("ns." + ZONE) + self.name("admin." + ZONE) + struct.pack("!IIIII", self.serial, 60, 60,
                                                                                    600, 1)
            records.append(struct.pack("!HHHIH", 0xC00C, 6, 1, 1, len(soa)) + soa)
        elif qname in self.records:
            if qtype == 1:
                for address in self.records[qname]:
                    records.append(struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address))
        elif qname != ZONE:
            rcode = 3
        header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, len(records), 0, 0)
        return header + question + b"".join(records)

    def serve(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                packet, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                self.sock.sendto(self.answer(packet), peer)
            except Exception:  # a malformed question: no answer, as a real server might
                continue

    def asked(self, name, qtype=1):
        return sum(1 for q in self.questions if q == (name, qtype))

    def stop(self):
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def name_server():
    server = NameServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_address_pg():
    """A PostgreSQL of this module's own, listening on 127.0.0.1 and 127.0.0.2."""
    with own_postgres("tidepool-pg-dns-", also_on="127.0.0.2") as server:
        yield server


def start(tidepool, pg, name_server, settings, databases):
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write(f"nameserver 127.0.0.1:{name_server.port}\noptions timeout:1 attempts:1\n")
    conf.close()
    return tidepool(settings=f"resolv_conf = {conf.name}\nadmin_users = postgres\npool_mode = transaction\n"
                             f"{settings}", databases=databases)


def rows(t, sql):
    with t.connect(dbname="pgbouncer") as conn:
        cur = conn.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def server_address(conn):
    return str(conn.execute("SELECT inet_server_addr()").fetchone()[0])


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_name_that_moves_is_followed_after_dns_max_ttl(tidepool, two_address_pg, name_server):
    """The answer is kept for dns_max_ttl; the name looked up again then points elsewhere: new
    servers go there, the idle ones to the old address close at once, and a server in a
    transaction finishes it and closes when released."""
    pg = two_address_pg
    name_server.records[f"db.{ZONE}"] = ["127.0.0.1"]
    t = start(tidepool, pg, name_server, "dns_max_ttl = 1\ndefault_pool_size = 3\n",
              f"app = host=db.{ZONE} port={pg.port} dbname=postgres")
    with t.connect(dbname="app") as a, t.connect(dbname="app") as b:
        assert server_address(a) == "127.0.0.1"
        hosts = rows(t, "SHOW DNS_HOSTS")
        assert [(h["hostname"], h["addrs"]) for h in hosts] == [(f"db.{ZONE}", "127.0.0.1")]
        assert 0 <= hosts[0]["ttl"] <= 1
        b.execute("BEGIN")
        assert server_address(b) == "127.0.0.1"
        name_server.records[f"db.{ZONE}"] = ["127.0.0.2"]
        assert wait_for(lambda: rows(t, "SHOW DNS_HOSTS")[0]["addrs"] == "127.0.0.2")
        # The transaction keeps its server; everyone else reaches the new address.
        assert server_address(b) == "127.0.0.1"
        assert server_address(a) == "127.0.0.2"
        b.execute("COMMIT")
        assert wait_for(lambda: {s["addr"] for s in rows(t, "SHOW SERVERS")} == {"127.0.0.2"})
        assert server_address(b) == "127.0.0.2"
    assert "no longer 127.0.0.1" in t.log()
    # /health/ready reaches the database through the same cache (resolv_conf's name server).
    stats = free_port()
    ready = start(tidepool, pg, name_server, f"stats_listen_port = {stats}\n",
                  f"app = host=db.{ZONE} port={pg.port} dbname=postgres")
    wait_for_port(stats)
    with urllib.request.urlopen(f"http://127.0.0.1:{stats}/health/ready", timeout=5) as reply:
        assert reply.status == 200
    lists = {r["list"]: r["items"] for r in rows(t, "SHOW LISTS")}
    assert lists["dns_names"] == 1 and lists["dns_zones"] == 1


def test_a_name_that_does_not_exist_is_asked_once_per_dns_nxdomain_ttl(tidepool, two_address_pg, name_server):
    """NXDOMAIN is kept for dns_nxdomain_ttl: clients of that database get the lookup failure
    (they wait out query_wait_timeout as for any server that cannot be reached) and the name
    server is not asked again while it is kept, though the pool retries its connect."""
    pg = two_address_pg
    t = start(tidepool, pg, name_server,
              "dns_nxdomain_ttl = 30\nquery_wait_timeout = 2\nserver_login_retry = 0.2\n",
              f"gone = host=missing.{ZONE} port={pg.port} dbname=postgres")
    started = time.time()
    with pytest.raises(psycopg.OperationalError):
        with t.connect(dbname="gone") as conn:
            conn.execute("SELECT 1")
    assert time.time() - started < 10
    assert name_server.asked(f"missing.{ZONE}") == 1
    assert 'could not resolve host "missing.tidepool.test": no such host (NXDOMAIN)' in t.log()
    hosts = rows(t, "SHOW DNS_HOSTS")
    assert [(h["hostname"], h["addrs"]) for h in hosts] == [(f"missing.{ZONE}", "")]
    assert 25 <= hosts[0]["ttl"] <= 30


def test_a_changed_zone_serial_looks_its_names_up_again(tidepool, two_address_pg, name_server):
    """With a long dns_max_ttl the cached address stays until the zone's SOA serial changes;
    dns_zone_check_period asks for it, and a new serial sends the zone's names to the name
    server again."""
    pg = two_address_pg
    name_server.records[f"db.{ZONE}"] = ["127.0.0.1"]
    t = start(tidepool, pg, name_server, "dns_max_ttl = 3600\ndns_zone_check_period = 0.5\n",
              f"app = host=db.{ZONE} port={pg.port} dbname=postgres")
    with t.connect(dbname="app") as conn:
        assert server_address(conn) == "127.0.0.1"
        assert wait_for(lambda: rows(t, "SHOW DNS_ZONES") == [{"zonename": ZONE, "serial": 1, "count": 1}])
        name_server.records[f"db.{ZONE}"] = ["127.0.0.2"]
        time.sleep(1.5)  # three zone checks, same serial: the old answer stays
        assert name_server.asked(ZONE, 6) >= 2
        assert server_address(conn) == "127.0.0.1"
        assert name_server.asked(f"db.{ZONE}") == 1
        name_server.serial = 2
        assert wait_for(lambda: rows(t, "SHOW DNS_HOSTS")[0]["addrs"] == "127.0.0.2")
        assert wait_for(lambda: server_address(conn) == "127.0.0.2")
        assert rows(t, "SHOW DNS_ZONES")[0]["serial"] == 2
