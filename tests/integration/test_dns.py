"""Server host names through the DNS cache: dns_max_ttl, dns_nxdomain_ttl, dns_zone_check_period and
resolv_conf, against a name server run by the test (UDP, loopback) and a PostgreSQL listening on
127.0.0.1 and 127.0.0.2, so that moving a name from one address to the other is a failover the
pooler must follow."""

import os
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

    def __init__(self, sock=None):
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
        self.sock = sock
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
    assert 'could not resolve host "missing.tidepool.test": Domain name not found' in t.log()
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


# Issue 31 (item 1): answers a name server did not send, or sent for another question, are not
# taken. PostgreSQL listens on both addresses, so whichever the pooler is told it reaches: the
# address it connects to shows which answer it believed.
REAL, FORGED = "127.0.0.2", "127.0.0.1"


class HostileNameServer(NameServer):
    """A NameServer that also serves TCP on its port and, per name, misbehaves (`tricks`):
    "other-port": a forged answer (right id and question, FORGED) from another socket first;
    "other-name": a forged answer for another question first, from the right socket;
    "extra-records": the real answer also carries an A record of FORGED for another owner and one
    in the authority section; "servfail": SERVFAIL the first time; "truncated": an empty answer
    with TC over UDP (the real one over TCP); "large": a 40-name CNAME chain of long labels, over
    2 KB (TC over UDP). `delay` holds every real UDP answer back."""

    def __init__(self):
        # A port free for both UDP and TCP: the kernel's free UDP port may be taken for TCP.
        while True:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
                break
            except OSError:
                udp.close()
                tcp.close()
        self.tricks = {}
        self.cnames = {}
        self.delay = 0.0
        self.asked_over_tcp = 0
        super().__init__(udp)
        self.tcp = tcp
        self.tcp.listen(16)
        self.tcp.settimeout(0.2)
        self.tcp_thread = threading.Thread(target=self.serve_tcp, daemon=True)
        self.tcp_thread.start()
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def response(self, packet, question_name=None, forged=False, tc=False, rcode=0):
        (ident,) = struct.unpack("!H", packet[:2])
        qname, end = self.read_name(packet, 12)
        qtype, _ = struct.unpack("!HH", packet[end:end + 4])
        asked = question_name or qname
        question = self.name(asked) + packet[end:end + 4]
        answers, authority = [], []
        if not tc and rcode == 0 and qtype == 1:
            if forged:
                answers.append(struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(FORGED))
            else:
                name = qname
                while name in self.cnames:  # each link's owner: the question's name, then in full
                    owner = struct.pack("!H", 0xC00C) if name == qname else self.name(name)
                    target = self.name(self.cnames[name])
                    answers.append(owner + struct.pack("!HHIH", 5, 1, 60, len(target)) + target)
                    name = self.cnames[name]
                for address in self.records.get(name, []):
                    owner = struct.pack("!H", 0xC00C) if name == qname else self.name(name)
                    answers.append(owner + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address))
                if "extra-records" in self.tricks.get(qname, ()):
                    answers.append(self.name("elsewhere." + ZONE) + struct.pack("!HHIH", 1, 1, 60, 4)
                                   + socket.inet_aton(FORGED))
                    authority.append(struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(FORGED))
        flags = 0x8180 | rcode | (0x0200 if tc else 0)
        header = struct.pack("!HHHHHH", ident, flags, 1, len(answers), len(authority), 0)
        return header + question + b"".join(answers) + b"".join(authority)

    def chain(self, first, length, address):
        """A CNAME chain from `first` through `length` long names to `address`."""
        name = first
        for i in range(length):
            target = f"{'x' * 60}.{i}.{'y' * 40}.{ZONE}"
            self.cnames[name] = target
            name = target
        self.records[name] = [address]

    def serve(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                self.handle(packet, peer)
            except Exception:
                continue

    def handle(self, packet, peer):
        qname, end = self.read_name(packet, 12)
        (qtype,) = struct.unpack("!H", packet[end:end + 2])
        self.questions.append((qname, qtype))
        tricks = self.tricks.get(qname, ())
        if qtype != 1:
            self.sock.sendto(self.response(packet), peer)  # AAAA: no records
            return
        if "other-port" in tricks:
            self.other.sendto(self.response(packet, forged=True), peer)
        if "other-name" in tricks:
            self.sock.sendto(self.response(packet, question_name="elsewhere." + ZONE, forged=True), peer)
        if "servfail" in tricks and self.asked(qname) == 1:
            self.sock.sendto(self.response(packet, rcode=2), peer)
            return
        real = self.response(packet)
        if "truncated" in tricks or len(real) > 512:
            real = self.response(packet, tc=True)
        def send():
            try:
                self.sock.sendto(real, peer)
            except OSError:
                pass  # stopped meanwhile

        threading.Timer(self.delay, send).start()

    def serve_tcp(self):
        while self.running:
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    while True:
                        head = conn.recv(2)
                        if len(head) < 2:
                            break
                        (length,) = struct.unpack("!H", head)
                        packet = b""
                        while len(packet) < length:
                            packet += conn.recv(length - len(packet))
                        self.asked_over_tcp += 1
                        answer = self.response(packet)
                        conn.sendall(struct.pack("!H", len(answer)) + answer)
                except OSError:
                    pass

    def stop(self):
        super().stop()
        self.tcp.close()
        self.other.close()


@pytest.fixture
def hostile_name_server():
    server = HostileNameServer()
    yield server
    server.stop()


@pytest.mark.parametrize("trick", ["other-port", "other-name", "extra-records", "servfail", "truncated", "large"])
def test_only_the_name_servers_answer_to_the_question_asked_is_taken(tidepool, two_address_pg, hostile_name_server,
                                                                      trick):
    pg, ns = two_address_pg, hostile_name_server
    host = f"db.{ZONE}"
    if trick == "large":
        ns.chain(host, 12, REAL)
    else:
        ns.records[host] = [REAL]
    ns.tricks[host] = (trick,)
    ns.delay = 0.3
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write(f"nameserver 127.0.0.1:{ns.port}\noptions timeout:2 attempts:3\n")
    conf.close()
    t = tidepool(settings=f"resolv_conf = {conf.name}\npool_mode = transaction\n",
                 databases=f"app = host={host} port={pg.port} dbname=postgres")
    with t.connect(dbname="app") as conn:
        assert server_address(conn) == REAL
    if trick in ("truncated", "large"):
        assert ns.asked_over_tcp >= 1


def udp_ports_of(pid):
    """The local UDP ports of process `pid`'s sockets (its DNS questions)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].split(":")[1], 16))
    return ports


def test_a_flood_of_forged_answers_does_not_change_the_address(tidepool, two_address_pg, hostile_name_server):
    """While the name server takes 1.5 s to answer, another process sends every one of the 65,536
    ids, with the question asked and FORGED as the answer, to every UDP port the pooler has open.
    The pooler still connects to the address the name server gave."""
    pg, ns = two_address_pg, hostile_name_server
    host = f"db.{ZONE}"
    ns.records[host] = [REAL]
    ns.delay = 1.5
    conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
    conf.write(f"nameserver 127.0.0.1:{ns.port}\noptions timeout:3 attempts:1\n")
    conf.close()
    t = tidepool(settings=f"resolv_conf = {conf.name}\npool_mode = transaction\n",
                 databases=f"app = host={host} port={pg.port} dbname=postgres")
    sent = []

    def flood():
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        deadline = time.time() + 5
        while not ns.asked(host) and time.time() < deadline:
            time.sleep(0.01)
        template = bytearray(HostileNameServer.response(ns, struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0)
                                                         + ns.name(host) + struct.pack("!HH", 1, 1), forged=True))
        for port in udp_ports_of(t.proc.pid):
            for ident in range(65536):
                template[0:2] = struct.pack("!H", ident)
                try:
                    attacker.sendto(template, ("127.0.0.1", port))
                except OSError:
                    pass
            sent.append(port)
        attacker.close()

    attacker = threading.Thread(target=flood)
    attacker.start()
    with t.connect(dbname="app") as conn:
        address = server_address(conn)
    attacker.join()
    assert sent, "the flood found the pooler's question socket"
    assert address == REAL
