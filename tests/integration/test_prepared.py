"""Named prepared statements in transaction mode (max_prepared_statements), with real drivers.

Every scenario runs twice, once straight against PostgreSQL and once through a Tidepool pool of two
servers shared by several connections, and the two transcripts must be identical.
"""

import hashlib
import asyncio
import os
import re
import shutil
import subprocess
import threading

import asyncpg
import psycopg
import pytest

POOLED = "pool_mode = transaction\ndefault_pool_size = 2\nadmin_users = postgres\n"


def show(t, what):
    with psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user="postgres",
                         autocommit=True) as admin:
        cur = admin.execute(f"SHOW {what}")
        names = [c.name for c in cur.description]
        rows = [dict(zip(names, row)) for row in cur.fetchall()]
    return [{k: int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for k, v in r.items()} for r in rows]


def outcome(fn):
    """A result, or the SQLSTATE of the error it raised."""
    try:
        return ("ok", fn())
    except psycopg.Error as e:
        return ("error", e.sqlstate or type(e).__name__)


def psycopg_transcript(connect):
    """Queries, statement re-use, an error mid-pipeline and after it, DEALLOCATE ALL."""
    out = []
    with connect() as conn:
        for i in range(30):
            out.append(outcome(lambda: conn.execute("SELECT %s::int * 2", (i,)).fetchone()))
            out.append(outcome(lambda: conn.execute("SELECT %s::text || 'x'", (str(i),)).fetchone()))
        out.append(outcome(lambda: conn.execute("SELECT 1 / %s::int", (0,)).fetchone()))
        out.append(outcome(lambda: conn.execute("SELECT %s::int + 1", (41,)).fetchone()))
        # A pipeline with an error in the middle: what follows it is aborted, not run.
        results = []
        cursors = []
        try:
            with conn.pipeline():
                for args in (("SELECT %s::int", (1,)), ("SELECT 1 / %s::int", (0,)), ("SELECT %s::int", (3,))):
                    cursors.append(conn.execute(*args))
        except psycopg.Error as e:
            # Raised at the Sync or at an execute after the error arrived: the error is the same.
            results.append(("pipeline error", e.sqlstate))
        results.append(outcome(lambda: cursors[0].fetchone()))
        out.append(results)
        # A pipeline that works, with statements prepared inside it.
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int, %s::text", (i, f"v{i}")) for i in range(10)]
        out.append([c.fetchone() for c in cursors])
        # A transaction using prepared statements, then DEALLOCATE ALL, then the same statements again.
        with conn.transaction():
            out.append(conn.execute("SELECT %s::int * 3", (7,)).fetchone())
        out.append(outcome(lambda: conn.execute("DEALLOCATE ALL").statusmessage))
        for i in range(3):
            out.append(outcome(lambda: conn.execute("SELECT %s::int * 2", (i,)).fetchone()))
        # Unnamed statements still work beside named ones.
        out.append(conn.execute("SELECT %s::int - 1", (10,), prepare=False).fetchone())
    return out


def test_psycopg_prepared_statements_match_a_direct_connection(pg, tidepool):
    t = tidepool(settings=POOLED)
    direct = psycopg_transcript(lambda: pg.connect(prepare_threshold=0))
    pooled = psycopg_transcript(lambda: t.connect(prepare_threshold=0))
    assert pooled == direct
    assert ("error", "22012") in direct


def test_many_clients_reuse_statements_across_transactions_and_servers(pg, tidepool):
    """Eight psycopg connections share two servers; each prepares the same statements and the
    pooler prepares them on whichever server it gets."""
    t = tidepool(settings=POOLED)
    errors = []

    def worker(n):
        try:
            with t.connect(prepare_threshold=0) as conn:
                for i in range(100):
                    assert conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone() == (n + i,)
                    with conn.transaction():
                        assert conn.execute("SELECT %s::text", (f"{n}-{i}",)).fetchone() == (f"{n}-{i}",)
                        assert conn.execute("SELECT count(*) FROM generate_series(1, %s::int)",
                                            (i + 1,)).fetchone() == (i + 1,)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors[:3]
    assert pg.backends() <= 2
    stats = {row["database"]: row for row in show(t, "STATS")}["postgres"]
    # 8 clients x 3 statements were parsed by clients; servers saw far fewer Parse messages.
    assert stats["total_client_parse_count"] >= 24
    assert 0 < stats["total_server_parse_count"] < stats["total_client_parse_count"] + stats["total_bind_count"]
    assert stats["total_bind_count"] >= 8 * 300


async def asyncpg_transcript(connect):
    out = []
    conn = await connect()
    try:
        for i in range(20):
            out.append(await conn.fetchval("SELECT $1::int * 2", i))
            out.append(await conn.fetchrow("SELECT $1::text AS a, $2::int AS b", f"s{i}", i))
        stmt = await conn.prepare("SELECT $1::int + 100")
        for i in range(20):
            out.append(await stmt.fetchval(i))
        try:
            await conn.fetchval("SELECT 1 / $1::int", 0)
        except asyncpg.PostgresError as e:
            out.append(("error", e.sqlstate))
        out.append(await conn.fetchval("SELECT $1::int", 5))
        async with conn.transaction():
            out.append(await conn.fetchval("SELECT $1::int * 3", 3))
            try:
                async with conn.transaction():  # a savepoint that fails
                    await conn.fetchval("SELECT 1 / $1::int", 0)
            except asyncpg.PostgresError as e:
                out.append(("error", e.sqlstate))
            out.append(await conn.fetchval("SELECT $1::int * 3", 4))
        await conn.executemany("SELECT $1::int", [(i,) for i in range(10)])
        cursor_rows = []
        async with conn.transaction():
            async for row in conn.cursor("SELECT g FROM generate_series(1, $1::int) g", 50, prefetch=7):
                cursor_rows.append(row[0])
        out.append(cursor_rows)
    finally:
        await conn.close()
    return out


def test_asyncpg_prepared_statements_match_a_direct_connection(pg, tidepool):
    t = tidepool(settings=POOLED)

    async def run():
        direct = await asyncpg_transcript(
            lambda: asyncpg.connect(host="127.0.0.1", port=pg.port, user="postgres", database="postgres"))
        pooled = await asyncpg_transcript(
            lambda: asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres"))
        assert pooled == direct

        # Several asyncpg connections at once on the two servers.
        async def one(n):
            conn = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres")
            try:
                for i in range(50):
                    assert await conn.fetchval("SELECT $1::int + $2::int", n, i) == n + i
            finally:
                await conn.close()

        await asyncio.gather(*(one(n) for n in range(6)))

    asyncio.run(run())
    assert pg.backends() == 0 or pg.backends() <= 2


def test_small_server_cache_evicts_and_reprepares(pg, tidepool):
    """With max_prepared_statements = 2, five statements in turn keep evicting each other on the
    server; every one still works and the server never holds more than two of them."""
    t = tidepool(settings=POOLED + "max_prepared_statements = 2\n")
    with t.connect(prepare_threshold=0) as conn:
        for round_ in range(4):
            for k in range(5):
                assert conn.execute(f"SELECT %s::int + {k}", (round_,)).fetchone() == (round_ + k,)
                held = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
                assert held <= 2


def test_set_max_prepared_statements_reaches_existing_servers(pg, tidepool):
    """SET max_prepared_statements lowers what servers already open hold: the next statement
    prepared there closes the ones past the new size."""
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 1\nadmin_users = postgres\n"
                          "max_prepared_statements = 20\n")
    with t.connect(prepare_threshold=0) as conn:
        for k in range(6):
            conn.execute(f"SELECT %s::int + {k}", (k,))
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] >= 6
        with t.connect(dbname="pgbouncer") as console:
            console.execute("SET max_prepared_statements = 2")
        conn.execute("SELECT %s::int + 100", (1,))
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] <= 2


def test_client_close_and_deallocate_do_not_break_other_clients(pg, tidepool):
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 1\n")
    with t.connect(prepare_threshold=0) as a, t.connect(prepare_threshold=0) as b:
        assert a.execute("SELECT %s::int", (1,)).fetchone() == (1,)
        assert b.execute("SELECT %s::int", (2,)).fetchone() == (2,)  # same text, same server statement
        a.execute("DEALLOCATE ALL")  # a forgets its statements; the server really drops them
        assert b.execute("SELECT %s::int", (3,)).fetchone() == (3,)
        assert a.execute("SELECT %s::int", (4,)).fetchone() == (4,)
        # psycopg closes its statements with a protocol Close when its own cache overflows.
        a.prepared_max = 1
        for k in range(4):
            assert a.execute(f"SELECT %s::int + {k}", (k,)).fetchone() == (2 * k,)
            assert b.execute("SELECT %s::int", (k,)).fetchone() == (k,)


def test_off_passes_named_statements_through(pg, tidepool):
    """max_prepared_statements = 0: named statements reach the server as they are, so two clients
    on one server collide exactly as they would without the feature."""
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 1\nmax_prepared_statements = 0\n")
    with t.connect(prepare_threshold=0) as a, t.connect(prepare_threshold=0) as b:
        a.execute("SELECT %s::int", (1,))
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            b.execute("SELECT %s::int", (1,))


def test_pgbench_prepared_200_clients_on_10_servers(pg, tidepool):
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                    "postgres"], check=True, capture_output=True, timeout=120)
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 10\nmax_client_conn = 1000\n"
                          "admin_users = postgres\n")
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-c", "200", "-j", "2", "-T", "5",
           "-n", "-M", "prepared", "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert re.search(r"number of failed transactions: 0 ", text), text[-3000:]
    processed = int(re.search(r"number of transactions actually processed: (\d+)", text).group(1))
    assert processed > 0
    stats = {row["database"]: row for row in show(t, "STATS")}["postgres"]
    # Each of pgbench's 7 statements is parsed once per client, and planned afresh for it as
    # PostgreSQL plans every Parse; a client that moves to another server has its statements
    # parsed there for it once (at most 7 per server), never again per transaction.
    assert stats["total_client_parse_count"] >= 200 * 7
    assert stats["total_server_parse_count"] <= stats["total_client_parse_count"] + 10 * 7
    assert stats["total_bind_count"] >= processed * 7


def sql_transcript(connect_a, connect_b):
    """SQL PREPARE / EXECUTE / DEALLOCATE from two connections that use the same names."""
    out = []
    with connect_a() as a, connect_b() as b:
        for conn, value in ((a, 1), (b, 2)):
            out.append(outcome(lambda: conn.execute(f"PREPARE q (int) AS SELECT $1 + {value}").statusmessage))
        for i in range(5):
            out.append(outcome(lambda: a.execute(f"EXECUTE q ({i})").fetchone()))
            out.append(outcome(lambda: b.execute(f"EXECUTE q ({i})").fetchone()))
        out.append(outcome(lambda: a.execute("PREPARE q AS SELECT 0").statusmessage))  # duplicate
        out.append(outcome(lambda: a.execute("DEALLOCATE q").statusmessage))
        out.append(outcome(lambda: a.execute("EXECUTE q (1)").fetchone()))  # gone for a only
        out.append(outcome(lambda: b.execute("EXECUTE q (1)").fetchone()))
        out.append(outcome(lambda: a.execute("DEALLOCATE q").statusmessage))  # twice: an error
        with a.transaction():
            out.append(outcome(lambda: a.execute("PREPARE r AS SELECT 'in tx'").statusmessage))
            out.append(outcome(lambda: a.execute("EXECUTE r").fetchone()))
        out.append(outcome(lambda: a.execute("EXECUTE r").fetchone()))
        # A failed duplicate inside a transaction block aborts it, as in PostgreSQL.
        try:
            with a.transaction():
                a.execute("PREPARE r AS SELECT 1")
        except psycopg.Error as e:
            out.append(("tx error", e.sqlstate))
        out.append(outcome(lambda: a.execute("EXECUTE r").fetchone()))
    return out


def test_sql_prepare_execute_deallocate_are_per_client(pg, tidepool):
    """Two clients share one server and use the same statement name for different queries: each
    sees only its own, as with two direct connections."""
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 1\n")
    direct = sql_transcript(lambda: pg.connect(), lambda: pg.connect())
    pooled = sql_transcript(lambda: t.connect(), lambda: t.connect())
    assert pooled == direct
    assert ("ok", (4,)) in direct and ("ok", (5,)) in direct
    assert ("error", "42P05") in direct and ("error", "26000") in direct


def test_preparing_a_name_twice_names_the_clients_statement(tidepool):
    """The error for a duplicate Parse names the client's statement, as PostgreSQL does, never
    the pooler-wide name the server knows it by."""
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as c:
        first = c.pgconn.prepare(b"s1", b"select 1")
        assert first.status == psycopg.pq.ExecStatus.COMMAND_OK
        again = c.pgconn.prepare(b"s1", b"select 1")
        assert again.status == psycopg.pq.ExecStatus.FATAL_ERROR
        message = again.error_message.decode()
        assert 'prepared statement "s1" already exists' in message, message
        assert "tidepool" not in message
        assert again.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P05"
        assert c.execute("SELECT 2").fetchone()[0] == 2


def test_prepared_statements_recover_after_a_schema_change(pg, tidepool):
    """After ALTER TABLE changes a prepared query's result type, PostgreSQL answers the next
    Bind with 0A000 "cached plan must not change result type" once; a driver then prepares again.
    Through the pooler that new Parse must really reach the servers (every one of them), so the
    drivers recover as they do against PostgreSQL directly: asyncpg (which retries by itself)
    without an error, psycopg (prepare_threshold=0) after at most one per connection."""
    import asyncio

    with pg.connect() as c:
        c.execute("DROP TABLE IF EXISTS stale_plan")
        c.execute("CREATE TABLE stale_plan (a int)")
        c.execute("INSERT INTO stale_plan VALUES (1)")
    t = tidepool(settings="default_pool_size = 3\n")

    async def asyncpg_side(step):
        conn = await asyncpg.connect(host="127.0.0.1", port=t.port, user="postgres", database="postgres",
                                     ssl=False)
        try:
            rows = await conn.fetch("SELECT * FROM stale_plan")
            await step()
            for _ in range(6):  # across the pool's servers
                rows = await conn.fetch("SELECT * FROM stale_plan")
            return [tuple(r) for r in rows]
        finally:
            await conn.close()

    # Every server of the pool prepares the statement before the change.
    warmers = [t.connect(prepare_threshold=0) for _ in range(3)]
    try:
        for c in warmers:
            c.execute("BEGIN")
            c.execute("SELECT * FROM stale_plan").fetchall()
        for c in warmers:
            c.execute("COMMIT")
    finally:
        for c in warmers:
            c.close()

    async def alter():
        with pg.connect() as c:
            c.execute("ALTER TABLE stale_plan ADD COLUMN b int DEFAULT 7")

    assert asyncio.run(asyncpg_side(alter)) == [(1, 7)]
    with pg.connect() as c:
        c.execute("ALTER TABLE stale_plan ADD COLUMN c int DEFAULT 8")
    errors = 0
    with t.connect(prepare_threshold=0) as c:
        for _ in range(6):
            try:
                assert c.execute("SELECT * FROM stale_plan").fetchall() == [(1, 7, 8)]
            except psycopg.errors.FeatureNotSupported:
                errors += 1
    assert errors <= 1


def run_pgjdbc(tmp_path, program, pooled_port, direct_port, *extra):
    """Compiles tests/integration/java/PROGRAM.java and runs it with a prepareThreshold=1 URL for
    `pooled_port` and a plain one for `direct_port`; returns its output's words and its stderr."""
    jar = "/usr/share/java/postgresql.jar"
    assert shutil.which("javac") and os.path.exists(jar), "scripts/test.sh installs a JDK and pgjdbc"
    source = os.path.join(os.path.dirname(__file__), "java", f"{program}.java")
    subprocess.run(["javac", "-d", str(tmp_path), source], check=True)
    out = subprocess.run(
        ["java", "-cp", f"{tmp_path}:{jar}", program,
         f"jdbc:postgresql://127.0.0.1:{pooled_port}/postgres?prepareThreshold=1",
         f"jdbc:postgresql://127.0.0.1:{direct_port}/postgres", *map(str, extra)],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split(), out.stderr


def test_pgjdbc_recovers_from_a_schema_change(pg, tidepool, tmp_path):
    """pgjdbc (Debian's libpostgresql-jdbc-java) with prepareThreshold=1: after ALTER TABLE the same
    PreparedStatement keeps working, as it does directly against PostgreSQL (before, it failed 10
    times in 10 with "cached plan must not change result type" until RECONNECT)."""
    t = tidepool(settings="default_pool_size = 2\nignore_startup_parameters = extra_float_digits\n")

    def run(port):
        words, stderr = run_pgjdbc(tmp_path, "StalePlan", port, pg.port)
        errors, ok = map(int, words)
        return errors, ok, stderr

    assert run(pg.port)[:2] == (0, 10)  # directly: pgjdbc recovers by itself
    errors, ok, stderr = run(t.port)
    assert (errors, ok) == (0, 10), stderr


def test_large_parameters_of_named_statements_go_through(tidepool):
    """A Bind larger than max_buffered_bytes is rewritten from its first bytes and its parameters
    streamed (issue 31, item 4): the answers are PostgreSQL's, on whichever server runs it."""
    t = tidepool(settings="default_pool_size = 2\nmax_buffered_bytes = 8192\n")
    clients = [t.connect(prepare_threshold=0) for _ in range(3)]
    try:
        for size in (100, 50_000, 3_000_000, 70_000):
            for i, c in enumerate(clients):
                text = chr(ord("a") + i) * size
                row = c.execute("SELECT length(%s::text), md5(%s::text)", (text, text), prepare=True).fetchone()
                assert row == (size, hashlib.md5(text.encode()).hexdigest())
    finally:
        for c in clients:
            c.close()
