"""Random multi-client programs, run against PostgreSQL directly and through Tidepool, compared.

A program is a list of clients; each client has startup parameters and a list of steps. Every
client runs on its own thread and connection, all at once, so that on a small pool some wait while
others hold the servers (in a transaction, or pinned by temp tables, locks, cursors). Names that
PostgreSQL keeps per session (temp tables, cursors, prepared statements, settings) are the same
for every client, so that one client's state showing through to another is seen; names that are
global (tables, advisory locks, channels) are each client's own. What a client sees then depends
only on its own session, which PostgreSQL decides: the observations of each client (rows, column names,
SQLSTATEs, notices, the reported parameters after each step, and the notifications it received)
must be the same through Tidepool as directly.

On a divergence `shrink` removes steps while the programs still differ, and `describe` prints
what is left.
"""

import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg

# Error messages too (DIFFERENTIAL_MESSAGES=1, to look into a divergence; they name server-side
# objects, which differ through the pooler).
MESSAGES = os.environ.get("DIFFERENTIAL_MESSAGES") == "1"

# Parameters whose ParameterStatus a client sees.
REPORTED = ["application_name", "DateStyle", "TimeZone", "IntervalStyle", "standard_conforming_strings",
            "client_encoding"]

PROBE = ("SELECT current_setting('search_path') AS search_path, current_setting('statement_timeout') AS st, "
         "coalesce(current_setting('app.v', true), '') AS app_v, current_setting('application_name') AS app, "
         "current_setting('work_mem') AS work_mem, current_user AS cu, session_user AS su, "
         "current_setting('TimeZone') AS tz, current_setting('DateStyle') AS ds, "
         "current_setting('default_transaction_isolation') AS iso")


def steps_for(c):
    """The operations a client may take, as (kind, text) with its own names (`c` is its number)."""
    t = f"dt_{c}"
    return [
        # settings, every form
        ("sql", f"SET search_path = s{c}, public"),
        ("sql", "SET search_path TO DEFAULT"),
        ("sql", "RESET search_path"),
        ("sql", f"SET statement_timeout = {1000 + c}"),
        ("sql", "SET statement_timeout = 1.5e+3"),
        ("sql", "RESET statement_timeout"),
        ("sql", f"SET app.v = 'c{c}'"),
        ("sql", f"SELECT set_config('app.v', 'f{c}', false)"),
        ("sql", f"SELECT set_config('app.v', 'local{c}', true)"),
        ("sql", f"SET LOCAL app.v = 'l{c}'"),
        ("sql", f"SET application_name = 'n{c}'"),
        ("sql", "RESET application_name"),
        ("sql", "SET work_mem = '5MB'"),
        ("sql", "SET work_mem TO DEFAULT"),
        ("sql", "RESET ALL"),
        ("sql", "DISCARD ALL"),
        ("sql", "DISCARD PLANS"),
        ("sql", "DISCARD TEMP"),
        ("sql", "SET ROLE app"),
        ("sql", "RESET ROLE"),
        ("sql", "SET SESSION AUTHORIZATION app"),
        ("sql", "RESET SESSION AUTHORIZATION"),
        ("sql", "SET TIME ZONE 'Asia/Tokyo'"),
        ("sql", "SET DateStyle = 'SQL, DMY'"),
        ("sql", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
        ("sql", "SET IntervalStyle = postgres_verbose"),
        ("probe", PROBE),
        ("probe", PROBE),
        # transactions, savepoints, errors in blocks
        ("sql", "BEGIN"),
        ("sql", "COMMIT"),
        ("sql", "ROLLBACK"),
        ("sql", "SAVEPOINT sp"),
        ("sql", "ROLLBACK TO SAVEPOINT sp"),
        ("sql", "RELEASE SAVEPOINT sp"),
        ("sql", "SELECT 1/0"),
        ("sql", f"SET app.v = 'multi{c}'; SELECT 1"),
        # temp tables
        ("sql", f"CREATE TEMP TABLE tmp (x int)"),
        ("sql", f"INSERT INTO tmp VALUES ({c})"),
        ("sql", f"SELECT count(*), sum(x) FROM tmp"),
        ("sql", f"DROP TABLE tmp"),
        ("sql", f"CREATE TEMP TABLE tmpc (x int) ON COMMIT DROP"),
        # advisory locks (the client's own keys)
        ("sql", f"SELECT pg_advisory_lock({c})"),
        ("sql", f"SELECT pg_try_advisory_lock({c})"),
        ("sql", f"SELECT pg_advisory_unlock({c})"),
        ("sql", "SELECT pg_advisory_unlock_all()"),
        ("sql", f"SELECT pg_advisory_xact_lock({c})"),
        ("sql", "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"),
        # cursors
        ("sql", f"DECLARE cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)"),
        ("sql", f"FETCH 1 FROM cur"),
        ("sql", f"CLOSE cur"),
        # SQL PREPARE
        ("sql", f"PREPARE p AS SELECT $1::int + {c}"),
        ("sql", f"EXECUTE p(1)"),
        ("sql", f"DEALLOCATE p"),
        ("sql", "DEALLOCATE ALL"),
        # protocol statements: unnamed (parameters) and named (prepare=True), and a table that changes
        ("params", f"SELECT %s::int * {c}"),
        ("prepared", f"SELECT * FROM {t}"),
        ("prepared", f"SELECT count(*) FROM {t} WHERE a > %s"),
        ("sql", f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS b int"),
        ("sql", f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS c text"),
        ("sql", f"ALTER TABLE {t} DROP COLUMN IF EXISTS b"),
        # notifications
        ("sql", f"LISTEN ch_{c}"),
        ("sql", f"UNLISTEN ch_{c}"),
        ("sql", "UNLISTEN *"),
        ("sql", f"NOTIFY ch_{c}, 'p{c}'"),
        # the lexer's corners
        ("sql", f"SELECT 1; -- note\rSET app.v = 'cr{c}'"),
        ("sql", f"SET app.v = U&'u\\0061{c}'"),
        ("sql", f"SET app.v = 'a'\n   'b{c}'"),
    ]


STARTUPS = [
    {},
    {"application_name": "startup-app"},
    {"options": "-c search_path=s1,public -c statement_timeout=4321"},
    {"options": "-c work_mem=6MB -c app.v=boot", "application_name": "boot"},
    {"options": "-c DateStyle=German"},
]


def generate(seed, clients=6, length=24):
    rng = random.Random(seed)
    program = []
    for c in range(clients):
        choices = steps_for(c)
        steps = [rng.choice(choices) for _ in range(rng.randint(length // 2, length))]
        # Most clients are psycopg (simple and extended protocol); some asyncpg, whose statement
        # cache prepares every query it fetches with.
        driver = "asyncpg" if rng.random() < 0.25 else "psycopg"
        program.append({"client": c, "startup": rng.choice(STARTUPS), "steps": steps, "driver": driver})
    # Some psycopg clients are pgjdbc (server-side statements from the first execution), chosen
    # apart so that the programs of the seeds before it stay as they were otherwise.
    jdbc = random.Random(seed * 7919 + 1)
    for client in program:
        if jdbc.random() < 0.1 and client["driver"] == "psycopg" and pgjdbc_available():
            client["driver"] = "pgjdbc"
    return program


def setup(connect, program):
    """Tables the programs use, made afresh (ALTER TABLE steps change them)."""
    with connect() as conn:
        for client in program:
            c = client["client"]
            conn.execute(f"DROP TABLE IF EXISTS dt_{c}")
            conn.execute(f"CREATE TABLE dt_{c} (a int)")
            conn.execute(f"INSERT INTO dt_{c} VALUES (1), (2)")
            conn.execute(f"GRANT ALL ON dt_{c} TO app")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS s{c}")


def run_client(connect, client, out):
    seen = []
    notices = []
    notifications = []
    try:
        conn = connect(**client["startup"])
    except psycopg.Error as e:
        out[client["client"]] = [("connect", e.sqlstate)]
        return
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
    conn.add_notify_handler(lambda n: notifications.append((n.channel, n.payload)))
    try:
        for kind, text in client["steps"]:
            try:
                if kind == "params":
                    cur = conn.execute(text, (3,))
                elif kind == "prepared":
                    cur = conn.execute(text, (0,) if "%s" in text else None, prepare=True)
                else:
                    cur = conn.execute(text)
                rows = cur.fetchall() if cur.description else None
                columns = [d.name for d in cur.description] if cur.description else None
                result = ("ok", cur.statusmessage, columns, rows)
            except psycopg.Error as e:
                result = ("error", e.sqlstate) + ((e.diag.message_primary,) if MESSAGES else ())
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.UNKNOWN:
                seen.append((text, result, "connection lost"))
                break
            params = tuple(conn.info.parameter_status(p) for p in REPORTED)
            seen.append((text, result, tuple(notices), params, conn.info.transaction_status.name))
            notices.clear()
        # Notifications still on their way are taken in before the end.
        try:
            conn.execute("ROLLBACK")
            conn.execute("SELECT pg_sleep(0.1)")
        except psycopg.Error:
            pass
        seen.append(("notifications", sorted(notifications)))
    finally:
        conn.close()
    out[client["client"]] = seen


def server_settings(startup):
    """A psycopg startup dict as asyncpg's server_settings."""
    settings = {}
    for word in startup.get("options", "").split():
        if word != "-c":
            name, _, value = word.partition("=")
            settings[name] = value
    if "application_name" in startup:
        settings["application_name"] = startup["application_name"]
    return settings


async def run_asyncpg_client(port, client, out):
    import asyncio

    import asyncpg

    seen = []
    out[client["client"]] = seen  # whatever happens, what was seen is compared
    try:
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres",
                                     server_settings=server_settings(client["startup"]))
    except asyncpg.PostgresError as e:
        seen.append(("connect", e.sqlstate))
        return
    except Exception as e:  # noqa: BLE001 - recorded, so that it is compared too
        seen.append(("connect", type(e).__name__))
        return
    try:
        for kind, text in client["steps"]:
            try:
                if kind == "sql":
                    result = ("ok", await conn.execute(text))
                else:
                    query = text.replace("%s", "$1")
                    args = (0,) if "$1" in query else ()
                    rows = await conn.fetch(query, *args)
                    result = ("ok", [tuple(r.values()) for r in rows], [list(r.keys()) for r in rows[:1]])
            except asyncpg.PostgresError as e:
                result = ("error", e.sqlstate) + ((str(e),) if MESSAGES else ())
            except asyncpg.InterfaceError as e:
                result = ("interface error", type(e).__name__)
            except Exception as e:  # noqa: BLE001 - a driver's own exception is an observation too
                result = ("exception", type(e).__name__)
            if conn.is_closed():
                seen.append((text, result, "connection lost"))
                break
            settings = conn.get_settings()
            params = tuple(getattr(settings, p, None) for p in REPORTED)
            seen.append((text, result, params, conn.is_in_transaction()))
    finally:
        try:
            await asyncio.wait_for(conn.close(), 10)
        except Exception as e:  # noqa: BLE001
            seen.append(("close", type(e).__name__))


JAR = "/usr/share/java/postgresql.jar"  # Debian's libpostgresql-jdbc-java
_java = {"lock": threading.Lock(), "classes": None}


def pgjdbc_available():
    return shutil.which("javac") is not None and os.path.exists(JAR)


def pgjdbc_classes():
    """tests/differential/java/TesterClient.java, compiled once per run."""
    with _java["lock"]:
        if _java["classes"] is None:
            classes = tempfile.mkdtemp(prefix="tidepool-tester-java-")
            subprocess.run(["javac", "-cp", JAR, "-d", classes,
                            str(Path(__file__).parent / "java" / "TesterClient.java")], check=True)
            _java["classes"] = classes
        return _java["classes"]


def run_pgjdbc_client(port, client, out):
    seen = []
    out[client["client"]] = seen
    args = ["java", "-cp", f"{pgjdbc_classes()}:{JAR}", "TesterClient", f"jdbc:postgresql://127.0.0.1:{port}/postgres"]
    startup = client["startup"]
    if "options" in startup:
        args.append("options=" + startup["options"])
    if "application_name" in startup:
        args.append("ApplicationName=" + startup["application_name"])

    def escaped(text):
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")

    steps = "".join(f"{kind}\t{escaped(text)}\n" for kind, text in client["steps"])
    try:
        done = subprocess.run(args, input=steps, capture_output=True, text=True, timeout=110)
    except subprocess.TimeoutExpired:
        seen.append(("timeout",))
        return
    for line in done.stdout.splitlines():
        seen.append(json.loads(line))
    if done.returncode != 0:
        seen.append(("exit", done.returncode))


def run(connect, program):
    """Each client's observations, all clients at once."""
    import asyncio

    setup(connect, program)
    out = {}

    def target(client):
        if client.get("driver") == "asyncpg":
            asyncio.run(run_asyncpg_client(connect.port, client, out))
        elif client.get("driver") == "pgjdbc":
            run_pgjdbc_client(connect.port, client, out)
        else:
            run_client(connect, client, out)

    threads = [threading.Thread(target=target, args=(client,)) for client in program]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    return [out.get(client["client"]) for client in program]


def differs(direct, pooled, program):
    """The first client and step where the two runs differ, or None."""
    a, b = run(direct, program), run(pooled, program)
    for client, (x, y) in enumerate(zip(a, b)):
        if x != y:
            for i, (u, v) in enumerate(zip(x or [], y or [])):
                if u != v:
                    return client, i, u, v
            return client, min(len(x or []), len(y or [])), (x or [])[len(y or []):][:1], (y or [])[len(x or []):][:1]
    return None


def shrink(direct, pooled, program, budget=40):
    """Removes clients, then halves, then single steps, while the two runs still differ (at most
    `budget` tries of both)."""
    tries = 0

    def still(candidate):
        nonlocal tries
        tries += 1
        return differs(direct, pooled, candidate) is not None

    def without(c, start, end):
        candidate = [dict(client, steps=list(client["steps"])) for client in program]
        del candidate[c]["steps"][start:end]
        return candidate

    for c in range(len(program)):
        if tries < budget and program[c]["steps"] and still(without(c, 0, None)):
            program = without(c, 0, None)
    chunk = max(len(client["steps"]) for client in program) // 2
    while chunk >= 1 and tries < budget:
        for c in range(len(program)):
            start = 0
            while start < len(program[c]["steps"]) and tries < budget:
                candidate = without(c, start, start + chunk)
                if still(candidate):
                    program = candidate
                else:
                    start += chunk
        chunk //= 2
    return program


def describe(program):
    lines = []
    for client in program:
        lines.append(f"client {client['client']} ({client.get('driver', 'psycopg')}) startup {client['startup']}:")
        lines += [f"    {kind}: {text!r}" for kind, text in client["steps"]]
    return "\n".join(lines)
