"""Settings that were parsed but ignored and now take effect, through a real PostgreSQL and real
clients: disable_pqexec, application_name_add_host, log_pooler_errors, server_check_query empty,
server_round_robin; and SHOW CONFIG listing every setting with its default."""

import psycopg
import pytest


def admin(t):
    return t.connect(dbname="pgbouncer", user="admin")


def test_disable_pqexec_closes_simple_queries_but_not_the_extended_protocol(tidepool):
    t = tidepool(settings="disable_pqexec = 1\n")
    # psycopg with parameters uses the extended protocol.
    with t.connect() as c:
        assert c.execute("SELECT %s::int", (7,)).fetchone()[0] == 7
    # Without parameters it sends a simple Query: refused, the connection closed.
    with t.connect() as c:
        with pytest.raises(psycopg.OperationalError, match="PQexec disallowed"):
            c.execute("SELECT 1; SELECT 2")
        assert c.closed or c.broken
    assert "PQexec disallowed" in t.log()  # log_pooler_errors is on by default


def test_application_name_add_host_appends_the_client_address(tidepool, pg):
    t = tidepool(settings="application_name_add_host = 1\ndefault_pool_size = 1\n")
    with t.connect(application_name="billing") as c:
        c.execute("SELECT %s::int", (1,))
        shown = c.execute("SELECT current_setting(%s)", ("application_name",)).fetchone()[0]
    assert shown.startswith("billing - 127.0.0.1:")
    assert int(shown.rsplit(":", 1)[1]) > 0


def test_empty_server_check_query_switches_the_check_off(tidepool):
    t = tidepool(settings="server_check_query =\nserver_check_delay = 0\nadmin_users = admin\n")
    with t.connect() as c:
        for _ in range(3):
            c.execute("SELECT %s::int", (1,))
    assert "server_check_query" not in t.log()
    with admin(t) as a:
        config = {r[0]: (r[1], r[2]) for r in a.execute("SHOW CONFIG").fetchall()}
    assert config["server_check_query"] == ("", "select 1")


def test_show_config_lists_every_setting_with_its_default(tidepool):
    t = tidepool(settings="admin_users = admin\npkt_buf = 8192\nserver_round_robin = 1\n")
    with admin(t) as a:
        rows = {r[0]: r[1:] for r in a.execute("SHOW CONFIG").fetchall()}
    assert len(rows) > 80
    assert rows["pkt_buf"] == ("8192", "", "yes")
    assert rows["server_round_robin"] == ("1", "0", "yes")
    assert rows["listen_port"][2] == "no"
    assert "pkt_buf is accepted but has no effect" in t.log()


def test_server_round_robin_spreads_transactions_over_the_servers(tidepool, pg):
    """With round robin, consecutive transactions of one client use every idle server in turn;
    without it, the server released last goes out again. One event loop: with several, a server
    on the client's own loop is preferred."""
    for round_robin, expect_spread in (("1", True), ("0", False)):
        t = tidepool(settings=f"server_round_robin = {round_robin}\ndefault_pool_size = 3\nthreads = 1\n")
        with t.connect() as warm:
            # Open three servers by holding them at once.
            holders = [t.connect() for _ in range(3)]
            for h in holders:
                h.execute("BEGIN")
                h.execute("SELECT 1")
            for h in holders:
                h.execute("COMMIT")
                h.close()
            pids = {warm.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(6)}
        assert (len(pids) == 3) == expect_spread, (round_robin, pids)
        t.stop()


def test_protocol_3_2_clients_are_answered_with_3_0(tidepool):
    """libpq 18 asking for protocol 3.2 gets NegotiateProtocolVersion with 3.0 and goes on."""
    assert psycopg.pq.version() >= 180000, "psycopg's bundled libpq 18 is needed"
    t = tidepool()
    with t.connect(max_protocol_version="3.2") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
        assert c.pgconn.protocol_version == 3


def test_show_state_uptime_counts_from_start(tidepool):
    """Uptime counts from the start of the process, not from the first SHOW STATE."""
    import time
    t = tidepool(settings="admin_users = admin\n")
    time.sleep(2.2)
    with admin(t) as a:
        state = {r[0]: r[1] for r in a.execute("SHOW STATE").fetchall()}
    assert int(state["uptime"]) >= 2, state
