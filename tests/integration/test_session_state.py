"""Session state in transaction pooling (issue 19): each client keeps its own settings, state that
cannot be replayed keeps the client on its server, and nothing reaches another client.

Real PostgreSQL, real drivers; pools of one and two servers so that clients share backends.
"""

import asyncio
import random
import select
import threading

import asyncpg
import psycopg
import pytest
from psycopg import sql

from test_prepared import show


def pooled(tidepool, size, extra=""):
    return tidepool(settings=f"pool_mode = transaction\ndefault_pool_size = {size}\nadmin_users = postgres\n"
                             f"query_wait_timeout = 20\n{extra}")


def extended(conn, query):
    """`query` through the extended protocol's unnamed statement (psycopg itself sends a query
    without parameters as a simple Query)."""
    pgconn = conn.pgconn
    pgconn.send_query_params(query.encode() if isinstance(query, str) else query, None)
    # Waiting in select, not in libpq: a thread blocked inside libpq keeps Python's lock, and the
    # other clients' threads (which may hold the servers this one waits for) would stop too.
    while pgconn.flush() != 0:
        select.select([], [pgconn.socket], [], 1)
    results = []
    while True:
        while pgconn.is_busy():
            select.select([pgconn.socket], [], [], 1)
            pgconn.consume_input()
        r = pgconn.get_result()
        if r is None:
            break
        results.append(r)
    for r in results:
        if r.status == psycopg.pq.ExecStatus.FATAL_ERROR:
            raise psycopg.Error(r.error_message.decode())


def value(conn, query):
    v = conn.execute(query).fetchone()[0]
    return "" if v is None else v


# (what A runs, how anyone reads it, what A then reads)
SETTINGS = [
    ("SET search_path = a_only, public", "SHOW search_path", "a_only, public"),
    ("SET statement_timeout = '4321ms'", "SHOW statement_timeout", "4321ms"),
    ("set app.tenant_id = '42'", "SELECT current_setting('app.tenant_id', true)", "42"),
    ("SELECT set_config('app.other', 'v', false)", "SELECT current_setting('app.other', true)", "v"),
    ("SET ROLE app", "SELECT current_user", "app"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
     "SHOW default_transaction_isolation", "serializable"),
    ("/* a comment */ SET work_mem TO '5MB'", "SHOW work_mem", "5MB"),
]


@pytest.mark.parametrize("statement,probe,expected", SETTINGS, ids=[s[0][:40] for s in SETTINGS])
def test_a_setting_stays_with_its_client(pg, tidepool, statement, probe, expected):
    t = pooled(tidepool, 1)
    with pg.connect() as direct:
        default = value(direct, probe)
    with t.connect() as a, t.connect() as b:
        assert value(a, "SELECT pg_backend_pid()") == value(b, "SELECT pg_backend_pid()"), "one server"
        a.execute(statement)
        for _ in range(3):
            assert value(b, probe) == default
            assert value(a, probe) == expected
        # Rolled back, failed, or SET LOCAL: not the session's.
        with t.connect() as c:
            c.execute("BEGIN")
            c.execute(statement)
            c.execute("ROLLBACK")
            assert value(c, probe) == default
            c.execute("BEGIN")
            local = statement.startswith("SET ") and not statement.startswith("SET SESSION")
            c.execute(statement.replace("SET ", "SET LOCAL ", 1) if local else statement)
            c.execute("ROLLBACK")
            with pytest.raises(psycopg.errors.DivisionByZero):
                c.execute(f"{statement}; SELECT 1/0")
            assert value(c, probe) == default
            assert value(b, probe) == default
        assert value(a, probe) == expected
        a.execute("RESET ALL; RESET ROLE")
        assert value(a, probe) == default


def test_savepoints_and_commit_decide_what_stays(tidepool):
    t = pooled(tidepool, 1)
    with t.connect() as a, t.connect() as b:
        a.execute("BEGIN")
        a.execute("SET app.a = '1'")
        a.execute("SAVEPOINT s")
        a.execute("SET app.b = '2'")
        a.execute("ROLLBACK TO SAVEPOINT s")
        a.execute("COMMIT")
        assert value(b, "SELECT current_setting('app.a', true)") == ""
        assert value(a, "SELECT current_setting('app.a', true) || current_setting('app.b', true)") == "1"
        # A failed statement after a savepoint, undone by rolling back to it.
        a.execute("BEGIN")
        a.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SET app.c = '3'; SELECT 1/0")
        a.execute("ROLLBACK TO s")
        a.execute("SET app.d = '4'")
        a.execute("COMMIT")
        assert value(b, "SELECT current_setting('app.d', true)") == ""
        assert value(a, "SELECT current_setting('app.c', true) || current_setting('app.d', true)") == "4"
        # SET ... FROM CURRENT makes the transaction's SET LOCAL value the session's.
        a.execute("BEGIN")
        a.execute("SET LOCAL app.fc = 'from current'")
        a.execute("SET app.fc FROM CURRENT")
        a.execute("COMMIT")
        for _ in range(2):
            assert value(b, "SELECT current_setting('app.fc', true)") == ""
            assert value(a, "SELECT current_setting('app.fc', true)") == "from current"


def test_pinning_state_keeps_the_client_on_its_server(pg, tidepool):
    t = pooled(tidepool, 2)
    with t.connect() as a, t.connect() as b:
        # Advisory lock: another client cannot take it, its owner can release it.
        assert value(a, "SELECT pg_advisory_lock(42) IS NOT NULL")
        pid = value(a, "SELECT pg_backend_pid()")
        assert [r["cl_pinned"] for r in show(t, "POOLS") if r["database"] == "postgres"] == [1]
        assert sorted(r["pin_reason"] for r in show(t, "CLIENTS") if r["database"] == "postgres") == [
            "", "advisory_lock"]
        for _ in range(5):
            assert value(b, "SELECT pg_try_advisory_lock(42)") is False
            assert value(a, "SELECT pg_backend_pid()") == pid
        assert value(a, "SELECT pg_advisory_unlock(42)") is True
        # b's failed pg_try_advisory_lock pins it too: whether it got the lock is not read.
        assert [r["cl_pinned"] for r in show(t, "POOLS") if r["database"] == "postgres"] == [1]
        b.execute("SELECT pg_advisory_unlock_all()")
        assert [r["cl_pinned"] for r in show(t, "POOLS") if r["database"] == "postgres"] == [0]
        # Temp table: each client has its own.
        a.execute("CREATE TEMP TABLE tt (v int)")
        a.execute("INSERT INTO tt VALUES (1)")
        b.execute("CREATE TEMP TABLE tt (v int)")
        b.execute("INSERT INTO tt VALUES (2), (3)")
        for _ in range(3):
            assert value(a, "SELECT sum(v) FROM tt") == 1
            assert value(b, "SELECT sum(v) FROM tt") == 5
        a.execute("DROP TABLE tt")
        b.execute("DROP TABLE tt")
        # A WITH HOLD cursor outlives its transaction.
        a.execute("BEGIN")
        a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
        a.execute("COMMIT")
        assert value(b, "SELECT count(*) FROM pg_cursors") == 0
        assert value(a, "FETCH 2 FROM c") == 1
        assert value(a, "FETCH 1 FROM c") == 3
        a.execute("CLOSE c")
        # SQL PREPARE (kept per client by the prepared-statement tracker).
        a.execute("PREPARE p AS SELECT 7")
        assert value(a, "EXECUTE p") == 7
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            b.execute("EXECUTE p")
        a.execute("DEALLOCATE p")


def test_listen_does_not_pin_and_notifications_reach_the_listener(tidepool):
    t = pooled(tidepool, 2)
    with t.connect() as a, t.connect() as b, t.connect() as c:
        a.execute("LISTEN news")
        assert [r["cl_pinned"] for r in show(t, "POOLS") if r["database"] == "postgres"] == [0]
        c.execute("SELECT 1")
        b.execute("NOTIFY news, 'hello'")
        got = [n.payload for n in a.notifies(timeout=5, stop_after=1)]
        assert got == ["hello"]
        assert [n for n in c.notifies(timeout=0.5, stop_after=1)] == []
        a.execute("UNLISTEN *")


def test_a_client_leaving_while_pinned_leaves_a_clean_server(tidepool):
    t = pooled(tidepool, 1)
    with t.connect() as a:
        pid = value(a, "SELECT pg_backend_pid()")
        a.execute("SET app.x = 'secret'")
        a.execute("SELECT pg_advisory_lock(7)")
        a.execute("CREATE TEMP TABLE t (v int)")
        a.execute("PREPARE p AS SELECT 1")
        a.execute("BEGIN")
        a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        a.execute("COMMIT")
        a.execute("LISTEN ch")
    with t.connect() as b:
        assert value(b, "SELECT pg_backend_pid()") == pid, "the same server"
        assert value(b, "SELECT current_setting('app.x', true)") == ""
        assert value(b, "SELECT pg_try_advisory_lock(7)") is True
        b.execute("SELECT pg_advisory_unlock(7)")
        assert value(b, "SELECT to_regclass('pg_temp.t')") == ""
        assert value(b, "SELECT count(*) FROM pg_prepared_statements") == 0
        assert value(b, "SELECT count(*) FROM pg_cursors") == 0
        assert value(b, "SELECT count(*) FROM pg_listening_channels()") == 0
    # Pinned clients held the pool's only server: said once, not per pin.
    assert t.log().count("pinned clients hold all its servers") == 1


def test_ignore_mode_is_pgbouncers_behaviour(tidepool):
    t = pooled(tidepool, 1, "session_state = ignore\n")
    with t.connect() as a, t.connect() as b:
        a.execute("SET app.x = 'leaks'")
        assert value(b, "SELECT current_setting('app.x', true)") == "leaks"
        b.execute("RESET app.x")


def test_startup_parameters_are_kept_per_client(pg, tidepool):
    t = pooled(tidepool, 1)

    async def run():
        a = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres", ssl=False,
                                  statement_cache_size=0,
                                  server_settings={"extra_float_digits": "2", "jit": "off", "work_mem": "3MB"})
        b = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres", ssl=False,
                                  statement_cache_size=0)
        out = []
        for _ in range(2):
            out.append(await a.fetchval("SELECT current_setting('extra_float_digits') || current_setting('jit')"
                                        " || current_setting('work_mem')"))
            out.append(await b.fetchval("SELECT current_setting('extra_float_digits') || current_setting('jit')"
                                        " || current_setting('work_mem')"))
        await a.close()
        await b.close()
        return out

    with pg.connect() as direct:
        default = value(direct, "SELECT current_setting('extra_float_digits') || current_setting('jit')"
                                " || current_setting('work_mem')")
    assert asyncio.run(run()) == ["2off3MB", default, "2off3MB", default]
    with t.connect(options="-c statement_timeout=1234") as c, t.connect() as d:
        assert value(c, "SHOW statement_timeout") == "1234ms"
        assert value(d, "SHOW statement_timeout") == "0"
        assert value(c, "SHOW statement_timeout") == "1234ms"


def test_randomized_clients_only_ever_see_their_own_state(pg, tidepool):
    """Eight clients on two servers mix SET, SET LOCAL, rolled-back SETs, set_config, SET ROLE,
    advisory locks and temp tables over the simple and extended protocols; after every step each
    checks that its session shows exactly its own state."""
    t = pooled(tidepool, 2)
    with pg.connect() as direct:
        default_path = value(direct, "SHOW search_path")
    clients, steps = 8, 300
    mismatches = []
    done = [0]
    lock = threading.Lock()

    def client(i):
        rng = random.Random(i)
        expected = {"v": "", "path": default_path, "role": "postgres", "locks": 0, "temp": False}
        with t.connect() as conn:
            simple = psycopg.ClientCursor(conn)

            def run(query, protocol):
                if protocol == "simple":
                    simple.execute(query)
                elif protocol == "extended":
                    extended(conn, query.as_string(conn) if isinstance(query, sql.Composable) else query)
                else:
                    conn.execute(query, prepare=True)  # a named statement

            for step in range(steps):
                protocol = rng.choice(["simple", "extended", "named"])
                kind = rng.random()
                token = f"c{i}s{step}"
                if expected["locks"] or expected["temp"]:
                    # Pins are let go soon: eight clients share two servers.
                    if expected["locks"]:
                        run(f"SELECT pg_advisory_unlock({1000 + i})", protocol)
                        expected["locks"] -= 1
                    elif rng.random() < 0.7:
                        run("DROP TABLE mine", protocol)
                        expected["temp"] = False
                    else:
                        run("INSERT INTO mine VALUES (1)", protocol)
                elif kind < 0.2:
                    run(f"SET app.v = '{token}'", protocol)
                    expected["v"] = token
                elif kind < 0.3:
                    conn.execute("BEGIN")
                    run(f"SET LOCAL app.v = 'local{token}'", protocol)
                    conn.execute("COMMIT")
                elif kind < 0.4:
                    conn.execute("BEGIN")
                    run(f"SET app.v = 'rolledback{token}'", protocol)
                    conn.execute("ROLLBACK")
                elif kind < 0.5:
                    run(sql.SQL("SELECT set_config('app.v', {}, false)").format(sql.Literal(token)), protocol)
                    expected["v"] = token
                elif kind < 0.6:
                    path = rng.choice(["public", "pg_catalog, public", default_path])
                    run(f"SET search_path = {path}", protocol)
                    expected["path"] = path
                elif kind < 0.7:
                    if expected["role"] == "app":
                        run("RESET ROLE", protocol)
                        expected["role"] = "postgres"
                    else:
                        run("SET ROLE app", protocol)
                        expected["role"] = "app"
                elif kind < 0.8:
                    run(f"SELECT pg_advisory_lock({1000 + i})", protocol)
                    expected["locks"] += 1
                elif kind < 0.85:
                    run("CREATE TEMP TABLE mine (v int)", protocol)
                    expected["temp"] = True
                elif kind < 0.9:
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        run(f"SET app.v = 'failed{token}'; SELECT 1/0", "simple")
                else:
                    run("SELECT 1", protocol)
                seen = conn.execute(
                    "SELECT coalesce(current_setting('app.v', true), ''), current_setting('search_path'),"
                    " current_user::text,"
                    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),"
                    " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) > 0").fetchone()
                want = (expected["v"], expected["path"], expected["role"], expected["locks"], expected["temp"])
                if tuple(seen) != want:
                    with lock:
                        mismatches.append((i, step, want, tuple(seen)))
                with lock:
                    done[0] += 1

    errors = []

    def guarded(i):
        try:
            client(i)
        except Exception as e:  # noqa: BLE001 - reported with what the pooler shows
            pins = [(r["id"], r["state"], r["pin_reason"]) for r in show(t, "CLIENTS") if r["pinned"]]
            errors.append((i, repr(e), pins))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert errors == [], "\n".join(map(repr, errors))
    assert done[0] == clients * steps, f"only {done[0]} steps ran"
    assert mismatches == [], mismatches[:5]


def test_pgjdbc_logs_in_and_keeps_its_settings(tidepool, tmp_path):
    """pgjdbc (Debian's libpostgresql-jdbc-java) logs in with no ignore_startup_parameters (it sends
    extra_float_digits) and two connections on one server each keep their own settings, through
    plain and named prepared statements."""
    import os
    import shutil
    import subprocess

    jar = "/usr/share/java/postgresql.jar"
    assert shutil.which("javac") and os.path.exists(jar), "scripts/test.sh installs a JDK and pgjdbc"
    source = os.path.join(os.path.dirname(__file__), "java", "SessionSettings.java")
    subprocess.run(["javac", "-d", str(tmp_path), source], check=True)
    t = pooled(tidepool, 1)
    out = subprocess.run(
        ["java", "-cp", f"{tmp_path}:{jar}", "SessionSettings",
         f"jdbc:postgresql://127.0.0.1:{t.port}/postgres?prepareThreshold=1"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    seen = {}
    for line in filter(None, lines):
        who, name, *value = line.split(" ")
        seen.setdefault((who, name), set()).add(" ".join(value))
    assert seen == {
        ("a", "statement_timeout"): {"4321ms"}, ("b", "statement_timeout"): {"0"},
        ("a", "app.jdbc"): {"mine"}, ("b", "app.jdbc"): {""},
        ("a", "extra_float_digits"): {"3"}, ("b", "extra_float_digits"): {"3"},
    }, out.stdout


def test_refuse_mode_fails_pinning_statements_and_keeps_settings(tidepool):
    t = pooled(tidepool, 1, "session_state = refuse\n")
    with t.connect() as a, t.connect() as b:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            a.execute("SELECT pg_advisory_lock(1)")
        assert "a session advisory lock keeps session state, which session_state = refuse" in str(info.value)
        with pytest.raises(psycopg.Error, match="CREATE TEMP TABLE keeps session state"):
            extended(a, "CREATE TEMP TABLE t (v int)")
        # In a transaction block it fails the transaction, as a failing statement does.
        a.execute("BEGIN")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT 1")
        a.execute("ROLLBACK")
        a.execute("SET app.x = 'a'")
        assert value(b, "SELECT current_setting('app.x', true)") == ""
        assert value(a, "SELECT current_setting('app.x', true)") == "a"
        assert [r["cl_pinned"] for r in show(t, "POOLS") if r["database"] == "postgres"] == [0]


def test_track_extra_parameters_with_session_state_ignore(tidepool):
    """session_state = ignore follows nothing a client does, as PgBouncer; track_extra_parameters
    still keeps the named startup parameters per client: accepted at login (others are refused)
    and set on each server the client is lent, reset on the servers of clients without it."""
    t = pooled(tidepool, 1, "session_state = ignore\ntrack_extra_parameters = work_mem, IntervalStyle\n")
    with t.connect(options="-c work_mem=8MB") as tuned, t.connect() as plain:
        for _ in range(3):  # one server, taken in turn
            assert tuned.execute("SHOW work_mem").fetchone()[0] == "8MB"
            assert plain.execute("SHOW work_mem").fetchone()[0] == "4MB"
    with pytest.raises(psycopg.OperationalError, match="unsupported options startup parameter: lock_timeout"):
        t.connect(options="-c lock_timeout=1s")
