"""The admin console: permissions and the SHOW views under a known load."""

import threading
import time

import psycopg
import pytest
from psycopg import errors


def admin(t, user="admin"):
    return t.connect(dbname="pgbouncer", user=user)


def rows(conn, sql):
    """A result as dicts, or the command tag of a command without rows."""
    cur = conn.execute(sql)
    if cur.description is None:
        return cur.statusmessage
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def test_show_pools_under_known_load(tidepool, pg):
    t = tidepool(settings="default_pool_size = 5\nmax_client_conn = 100\nadmin_users = admin\n")
    holders = [t.connect() for _ in range(5)]
    for c in holders:
        c.execute("BEGIN")
        c.execute("SELECT 1")
    waiters = [t.connect() for _ in range(45)]
    threads = [threading.Thread(target=lambda c=c: c.execute("SELECT 1")) for c in waiters]
    for th in threads:
        th.start()
    time.sleep(0.8)
    with admin(t) as a:
        pools = rows(a, "SHOW POOLS")
        [pool] = [p for p in pools if p["database"] == "postgres" and p["user"] == "postgres"]
        assert list(pools[0].keys())[:7] == ["database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
                                             "cl_waiting_cancel_req", "sv_active"]
        assert pool["sv_active"] == 5
        assert pool["cl_waiting"] == 45
        assert pool["cl_active"] == 5
        assert pool["sv_idle"] == 0
        assert pool["pool_mode"] == "transaction"
        assert int(pool["maxwait"]) * 1_000_000 + int(pool["maxwait_us"]) >= 500_000
        lists = {r["list"]: int(r["items"]) for r in rows(a, "show lists;")}
        assert lists["pools"] >= 1 and lists["used_clients"] >= 50
        assert rows(a, "SHOW VERSION")[0]["version"].startswith("Tidepool")
        config = {r["key"]: r["value"] for r in rows(a, "SHOW CONFIG")}
        assert config["default_pool_size"] == "5"
        assert "DATABASES" in " ".join(r["help"] for r in rows(a, "SHOW HELP"))
    for c in holders:
        c.execute("COMMIT")
    for th in threads:
        th.join(10)
    with admin(t) as a:
        [pool] = [p for p in rows(a, "SHOW POOLS") if p["user"] == "postgres"]
        assert pool["cl_waiting"] == 0 and pool["sv_active"] == 0 and pool["sv_idle"] == 5
    for c in holders + waiters:
        c.close()


def test_show_databases_lists_configured_entries(tidepool, pg):
    t = tidepool(databases=f"main = host=127.0.0.1 port={pg.port} dbname=postgres pool_size=7",
                 settings="admin_users = admin\n")
    with admin(t) as a:
        db, console = rows(a, "SHOW DATABASES")
        assert (db["name"], db["database"], db["pool_size"], db["port"]) == ("main", "postgres", 7, pg.port)
        # The console's own database, as PgBouncer lists it (exporters expect the row).
        assert (console["name"], console["force_user"], console["pool_mode"]) == ("pgbouncer", "pgbouncer",
                                                                                "statement")
        assert console["current_client_connections"] == 1
        [pool] = [p for p in rows(a, "SHOW POOLS") if p["database"] == "pgbouncer"]
        assert pool["user"] == "pgbouncer" and pool["cl_active"] == 1
        assert "pgbouncer" in {r["database"] for r in rows(a, "SHOW STATS")}


def test_console_permissions(tidepool):
    t = tidepool(settings="admin_users = admin\nstats_users = watcher\n")
    with pytest.raises(psycopg.OperationalError) as info:
        admin(t, user="nobody")
    assert "not allowed" in str(info.value)
    with t.connect(dbname="pooler", user="watcher") as w:
        assert "pools" in {r["list"] for r in rows(w, "SHOW LISTS")}
        # Every console error is 08P01, as PgBouncer answers them; the message says which.
        with pytest.raises(errors.ProtocolViolation, match="admin_users"):
            w.execute("RELOAD")
        with pytest.raises(errors.ProtocolViolation, match="SHOW HELP"):
            w.execute("SHOW NONSENSE")
        with pytest.raises(errors.ProtocolViolation, match="SHOW HELP"):
            w.execute("DROP TABLE x")
