"""Every SHOW view under a known load, the control commands against a real PostgreSQL, and the
/metrics and /health endpoints checked against the console."""

import decimal
import json
import re
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from psycopg import errors

from conftest import free_port, wait_for_port
from test_admin import admin, rows


def by(rows_, key):
    return {r[key]: r for r in rows_}


def http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text, name, **labels):
    """The value of one sample of the Prometheus text format."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.rindex("}")]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def hold_and_queue(t, holders=5, waiters=45):
    """`holders` clients inside a transaction on every server, `waiters` queued behind them."""
    held = [t.connect(application_name=f"holder{i}") for i in range(holders)]
    for c in held:
        c.execute("BEGIN")
        c.execute("SELECT 1")
    queued = [t.connect() for _ in range(waiters)]
    threads = [threading.Thread(target=lambda c=c: c.execute("SELECT 1")) for c in queued]
    for th in threads:
        th.start()
    time.sleep(0.8)

    def release():
        for c in held:
            c.execute("COMMIT")
        for th in threads:
            th.join(10)
        for c in held + queued:
            c.close()

    return held, release


def test_every_show_view_under_known_load(tidepool, pg):
    port = free_port()
    t = tidepool(settings=f"default_pool_size = 5\nmax_client_conn = 100\nadmin_users = admin\n"
                          f"stats_listen_port = {port}\ninstance_id = views-test\n")
    # Some finished traffic first, so that the statistics have something to show.
    with t.connect() as c:
        for i in range(20):
            c.execute("SELECT %s::int", (i,))
    held, release = hold_and_queue(t)
    try:
        with admin(t) as a:
            clients = [r for r in rows(a, "SHOW CLIENTS") if r["database"] == "postgres"]
            assert len(clients) == 50
            states = [r["state"] for r in clients]
            assert states.count("waiting") == 45 and states.count("active") == 5
            linked = [r for r in clients if r["link"]]
            assert len(linked) == 5 and all(r["application_name"].startswith("holder") for r in linked)
            assert all(r["addr"] == "127.0.0.1" and r["type"] == "C" for r in clients)
            assert max(int(r["wait"]) * 1_000_000 + int(r["wait_us"]) for r in clients) >= 500_000

            servers = rows(a, "SHOW SERVERS")
            assert [r["state"] for r in servers].count("active") == 5
            backend_pids = {int(r["remote_pid"]) for r in servers}
            with pg.connect() as direct:
                real = {row[0] for row in direct.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'postgres' AND backend_type = 'client backend'"
                    " AND pid <> pg_backend_pid()").fetchall()}
            assert backend_pids <= real and len(backend_pids) == 5
            # Each active server's link is a client whose link is that server.
            client_ptrs = {r["ptr"]: r for r in clients}
            for s in servers:
                assert client_ptrs[s["link"]]["link"] == s["ptr"]

            # SHOW SOCKETS: every client and server, PgBouncer's internal state names and buffer
            # columns; the waiting clients' queries are read and held (not yet passed on).
            sockets = rows(a, "SHOW SOCKETS")
            mine = [r for r in sockets if r["database"] == "postgres"]
            assert [r["type"] for r in mine].count("C") == 50 and [r["type"] for r in mine].count("S") == 5
            assert {r["state"] for r in mine} == {"cl_active", "cl_waiting", "sv_active"}
            assert list(sockets[0].keys())[21:28] == ["recv_pos", "pkt_pos", "pkt_remain", "send_pos",
                                                      "send_remain", "pkt_avail", "send_avail"]
            assert all(r["recv_pos"] > 0 for r in mine if r["state"] == "cl_waiting")
            active = rows(a, "SHOW ACTIVE_SOCKETS")
            assert {r["ptr"] for r in active} <= {r["ptr"] for r in sockets}
            assert len([r for r in active if r["state"] == "cl_waiting"]) == 45
            assert rows(a, "SHOW DNS_HOSTS") == [] and rows(a, "SHOW DNS_ZONES") == []

            users = by(rows(a, "SHOW USERS"), "name")
            assert users["postgres"]["pool_mode"] == "transaction"
            assert users["postgres"]["current_connections"] == 5

            state = {r["key"]: r["value"] for r in rows(a, "SHOW STATE")}
            assert state["active"] == "yes" and state["paused"] == "no" and state["instance_id"] == "views-test"

            mem = by(rows(a, "SHOW MEM"), "name")
            assert int(mem["process_rss"]["size"]) > 1_000_000
            assert int(mem["clients"]["used"]) >= 51 and int(mem["servers"]["used"]) == 5

            stats = by(rows(a, "SHOW STATS"), "database")["postgres"]
            assert int(stats["total_xact_count"]) >= 20 and int(stats["total_query_count"]) >= 20
            assert int(stats["total_received"]) > 0 and int(stats["total_sent"]) > 0
            totals = by(rows(a, "SHOW STATS_TOTALS"), "database")["postgres"]
            assert totals["xact_count"] == stats["total_xact_count"]
            assert list(by(rows(a, "SHOW STATS_AVERAGES"), "database")["postgres"].keys())[1] == \
                "server_assignment_count"
            # TOTALS adds every database up, the console's own row (its queries) too.
            assert by(rows(a, "SHOW TOTALS"), "name")["total_xact_count"]["value"] > stats["total_xact_count"]

            latency = rows(a, "SHOW LATENCY")
            query_total = [r for r in latency if r["database"] == "postgres" and r["kind"] == "query"
                           and r["span"] == "total"][0]
            assert int(query_total["count"]) >= 20
            assert 0 < int(query_total["p50_us"]) <= int(query_total["p99_us"]) <= int(query_total["max_us"])

            # Typed as PgBouncer types them, so that a typed driver reads numbers: psycopg parses
            # every value of a number column (and fails on one that is not a number).
            types = {}
            for what in ("POOLS", "CLIENTS", "SERVERS", "DATABASES", "USERS", "LISTS", "MEM", "STATS",
                         "STATS_TOTALS", "STATS_AVERAGES", "TOTALS", "LATENCY", "STATE", "CONFIG", "SOCKETS"):
                cur = a.execute(f"SHOW {what}")
                assert cur.fetchall()
                types[what] = {d.name: d.type_code for d in cur.description}
            int4, int8, numeric, text = 23, 20, 1700, 25
            assert types["POOLS"]["cl_active"] == int4 and types["POOLS"]["database"] == text
            assert types["CLIENTS"]["port"] == int4 and types["SERVERS"]["remote_pid"] == int4
            assert types["CLIENTS"]["id"] == int8 and types["CLIENTS"]["connect_time"] == text
            assert types["STATS"]["total_xact_count"] == numeric and types["TOTALS"]["value"] == numeric
            assert types["DATABASES"]["pool_size"] == int4 and types["LISTS"]["items"] == int4
            assert types["MEM"]["size"] == int8 and types["LATENCY"]["p99_us"] == int8
            assert types["CONFIG"]["value"] == text and types["STATE"]["value"] == text
            assert isinstance(clients[0]["port"], int) and isinstance(stats["total_xact_count"], decimal.Decimal)

            # /metrics agrees with the console.
            status, text = http(port, "/metrics")
            assert status == 200
            assert metric(text, "tidepool_servers_active", database="postgres", user="postgres") == 5
            assert metric(text, "tidepool_clients_waiting", database="postgres", user="postgres") == 45
            assert metric(text, "tidepool_transactions_total", database="postgres",
                          instance_id="views-test") == int(stats["total_xact_count"])
            assert metric(text, "tidepool_queries_total", database="postgres") == int(stats["total_query_count"])
            assert metric(text, "tidepool_query_time_seconds_count", database="postgres") >= 20
            assert "tidepool_query_time_seconds_bucket" in text
            assert metric(text, "tidepool_info", instance_id="views-test") == 1
    finally:
        release()


def test_stats_count_every_transaction_on_every_thread(tidepool):
    """Each event loop counts its clients' traffic in cells of its own, one per database: SHOW
    STATS and /metrics add them up exactly, and keep the databases apart."""
    port = free_port()
    t = tidepool(settings=f"threads = 4\nadmin_users = admin\nstats_listen_port = {port}\n"
                          "instance_id = cells-test\n")
    counts = {"postgres": (12, 7), "template1": (5, 3)}  # database: (clients, transactions each)

    def work(dbname, n):
        with t.connect(dbname=dbname) as c:
            for i in range(n):
                c.execute("SELECT %s::int", (i,))

    threads = [threading.Thread(target=work, args=(db, n)) for db, (clients, n) in counts.items()
               for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    with admin(t) as a:
        stats = by(rows(a, "SHOW STATS"), "database")
    for db, (clients_, n) in counts.items():
        assert int(stats[db]["total_xact_count"]) == clients_ * n, db
        assert int(stats[db]["total_query_count"]) == clients_ * n, db
    status, text = http(port, "/metrics")
    assert status == 200
    for db, (clients_, n) in counts.items():
        assert metric(text, "tidepool_transactions_total", database=db, instance_id="cells-test") == clients_ * n


def test_health_endpoints(tidepool, pg):
    port = free_port()
    dead = free_port()
    t = tidepool(settings=f"stats_listen_port = {port}\n",
                 databases=f"postgres = host=127.0.0.1 port={pg.port}")
    wait_for_port(port)  # the HTTP listener opens just after the pooler's port
    assert http(port, "/health/live") == (200, '{"status":"live"}')
    status, body = http(port, "/health/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert http(port, "/nope")[0] == 404
    t2 = tidepool(settings=f"stats_listen_port = {free_port()}\n",
                  databases=f"postgres = host=127.0.0.1 port={pg.port}\ngone = host=127.0.0.1 port={dead}")
    port2 = int(re.search(r"stats_listen_port = (\d+)", t2.ini.read_text()).group(1))
    wait_for_port(port2)
    status, body = http(port2, "/health/ready")
    assert status == 503
    reply = json.loads(body)
    assert reply["status"] == "unavailable" and list(reply["databases"]) == ["gone"]


def test_control_commands(tidepool, pg):
    t = tidepool(settings="default_pool_size = 2\nadmin_users = admin\n",
                 databases=f"* = host=127.0.0.1 port={pg.port}\nother = host=127.0.0.1 port={pg.port} dbname=postgres")
    with admin(t) as a:
        # DISABLE refuses new clients of that database only; ENABLE lets them in again.
        assert rows(a, "DISABLE other") == "DISABLE"
        with pytest.raises(psycopg.OperationalError) as info:
            t.connect(dbname="other")
        assert "does not allow connections" in str(info.value)
        assert by(rows(a, "SHOW DATABASES"), "name")["other"]["disabled"] == 1
        with t.connect() as c:
            c.execute("SELECT 1")
        rows(a, "ENABLE other")
        with t.connect(dbname="other") as c:
            c.execute("SELECT 1")

        # RECONNECT replaces servers: idle ones at once, busy ones when they come back.
        with t.connect() as c, t.connect() as busy:
            first = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            busy.execute("BEGIN")
            busy_pid = busy.execute("SELECT pg_backend_pid()").fetchone()[0]
            assert rows(a, "RECONNECT postgres") == "RECONNECT"
            closing = [r for r in rows(a, "SHOW SERVERS") if r["close_needed"] == 1]
            assert [int(r["remote_pid"]) for r in closing] == [busy_pid]
            waiter = threading.Thread(target=lambda: rows(admin(t), "WAIT_CLOSE postgres"))
            waiter.start()
            time.sleep(0.3)
            assert waiter.is_alive()  # the busy server is still in use
            busy.execute("COMMIT")
            waiter.join(10)
            assert not waiter.is_alive()
            assert c.execute("SELECT pg_backend_pid()").fetchone()[0] not in (first, busy_pid)

        # KILL_CLIENT closes one client, by the id SHOW CLIENTS gives.
        victim = t.connect(application_name="victim")
        [row] = [r for r in rows(a, "SHOW CLIENTS") if r["application_name"] == "victim"]
        assert rows(a, f"KILL_CLIENT {row['id']}") == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        with pytest.raises(errors.ProtocolViolation):  # every console error, as PgBouncer
            a.execute("KILL_CLIENT 999999")

        # KILL drops a database's clients and pauses it until RESUME.
        doomed = t.connect(dbname="other")
        doomed.execute("SELECT 1")
        assert rows(a, "KILL other") == "KILL"
        with pytest.raises(psycopg.OperationalError):
            doomed.execute("SELECT 1")
        assert by(rows(a, "SHOW DATABASES"), "name")["other"]["paused"] == 1
        rows(a, "RESUME other")
        with t.connect(dbname="other") as c:
            assert c.execute("SELECT 1").fetchone() == (1,)

        # SUSPEND shows in SHOW STATE until RESUME.
        assert rows(a, "SUSPEND") == "SUSPEND"
        assert {r["key"]: r["value"] for r in rows(a, "SHOW STATE")}["suspended"] == "yes"
        rows(a, "RESUME")
        assert {r["key"]: r["value"] for r in rows(a, "SHOW STATE")}["active"] == "yes"

        # SET changes what can change at run time, and refuses the rest.
        assert rows(a, "SET default_pool_size = 3") == "SET"
        assert by(rows(a, "SHOW CONFIG"), "key")["default_pool_size"]["value"] == "3"
        assert by(rows(a, "SHOW CONFIG"), "key")["listen_port"]["changeable"] == "no"
        for command, words in [("SET listen_port = 1", "listen_port"), ("SET no_such_thing = 1", "no_such_thing"),
                               ("SET default_pool_size = many", "many")]:
            with pytest.raises(errors.ProtocolViolation, match=words):
                a.execute(command)


def test_shutdown_wait_for_clients_from_the_console(tidepool):
    t = tidepool(settings="admin_users = admin\n")
    c = t.connect()
    c.execute("SELECT 1")
    with admin(t) as a:
        assert rows(a, "SHUTDOWN WAIT_FOR_CLIENTS") == "SHUTDOWN"
    time.sleep(0.5)
    assert t.proc.poll() is None  # a client is still connected
    assert c.execute("SELECT 2").fetchone() == (2,)
    c.close()
    t.proc.wait(timeout=10)
    assert t.proc.returncode == 0


def test_shutdown_from_the_console_exits_at_once(tidepool):
    t = tidepool(settings="admin_users = admin\n")
    c = t.connect()
    with admin(t) as a:
        a.execute("SHUTDOWN")
    t.proc.wait(timeout=10)
    assert t.proc.returncode == 0
    with pytest.raises(psycopg.OperationalError):
        c.execute("SELECT 1")


def test_log_stats_and_slow_queries(tidepool):
    t = tidepool(settings="stats_period = 1\nlog_slow_query_ms = 150\ninstance_id = logger-test\n")
    with t.connect() as c:
        c.execute("SELECT pg_sleep(0.2)")
        c.execute("SELECT 1")
    deadline = time.time() + 5
    while time.time() < deadline and "stats: instance=logger-test db=postgres" not in t.log():
        time.sleep(0.2)
    log = t.log()
    assert "stats: instance=logger-test db=postgres" in log
    slow = [line for line in log.splitlines() if "slow query" in line]
    assert len(slow) == 1 and "SELECT pg_sleep(0.2)" in slow[0] and "user=postgres" in slow[0]


def test_show_clients_names_states_as_pgbouncer_1_25(tidepool):
    """idle (logged in, no server; the console's sessions too), active (using a server), waiting."""
    t = tidepool(settings="default_pool_size = 1\nadmin_users = admin\n")
    with t.connect(application_name="idler") as idler, t.connect(application_name="busy") as busy, \
            t.connect(application_name="queued") as queued, admin(t) as a:
        idler.execute("SELECT 1")
        busy.execute("BEGIN")
        queued_thread = threading.Thread(target=lambda: queued.execute("SELECT 1"))
        queued_thread.start()
        time.sleep(0.3)
        states = {r["application_name"]: r["state"] for r in rows(a, "SHOW CLIENTS")}
        assert states["idler"] == "idle" and states["busy"] == "active" and states["queued"] == "waiting"
        assert [s for name, s in states.items() if name not in ("idler", "busy", "queued")] == ["idle"]
        # SHOW LISTS counts the users the pooler knows: here the one with a pool.
        assert {r["list"]: r["items"] for r in rows(a, "SHOW LISTS")}["users"] == 1
        busy.execute("COMMIT")
        queued_thread.join(5)
