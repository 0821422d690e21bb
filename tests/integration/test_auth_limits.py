"""Client and server authentication, limits and timeouts."""

import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg import errors

from test_core import read_some


def md5_secret(password, user):
    import hashlib
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def sqlstate_of(fn):
    with pytest.raises(psycopg.Error) as info:
        fn()
    return info.value.sqlstate, str(info.value)


def login_error(t, dbname="postgres", user="postgres", password=None):
    """The SQLSTATE and message a login gets (asyncpg reports them for login errors; libpq does not)."""
    import asyncio
    import asyncpg

    async def attempt():
        conn = await asyncpg.connect(host="127.0.0.1", port=t.port, user=user, database=dbname,
                                     password=password, ssl=False, timeout=10)
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value.sqlstate, str(info.value)


USERLIST_TEMPLATE = '"app" "app-secret"\n"md5user" "{md5}"\n"postgres" "pgpass"\n'


@pytest.fixture
def userlist():
    return USERLIST_TEMPLATE.format(md5=md5_secret("md5-secret", "md5user"))


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain"])
def test_client_auth_against_auth_file(tidepool, pg, userlist, auth_type):
    t = tidepool(settings=f"auth_type = {auth_type}\n", userlist=userlist)
    # app logs in to the pooler with its password, and the pooler logs in to PostgreSQL with
    # SCRAM using the password from the auth file.
    with t.connect(dbname="appdb", user="app", password="app-secret") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "app"
    state, message = login_error(t, dbname="appdb", user="app", password="wrong")
    assert state == "28P01"
    assert 'password authentication failed for user "app"' in message
    state, _ = login_error(t, user="nobody", password="x")
    assert state == "28P01"
    assert "wrong" not in t.log() and "app-secret" not in t.log()


def test_md5_secret_in_auth_file_logs_in_to_server_with_md5(tidepool, userlist):
    t = tidepool(settings="auth_type = md5\n", userlist=userlist)
    with t.connect(user="md5user", password="md5-secret") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "md5user"
    state, _ = login_error(t, user="md5user", password="nope")
    assert state == "28P01"


def test_scram_secret_in_auth_file_is_used_with_md5_auth_type(tidepool, pg):
    secret = pg.scalar("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
    assert secret.startswith("SCRAM-SHA-256$")
    # The server side still needs a password: give it in the database entry.
    t = tidepool(
        settings="auth_type = md5\n",
        userlist=f'"app" "{secret}"\n',
        databases=f"appdb = host=127.0.0.1 port={pg.port} password=app-secret")
    with t.connect(dbname="appdb", user="app", password="app-secret") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    state, _ = login_error(t, dbname="appdb", user="app", password="bad")
    assert state == "28P01"


def test_trust_with_auth_file_requires_a_listed_user(tidepool, userlist):
    t = tidepool(settings="auth_type = trust\n", userlist=userlist)
    with t.connect(user="postgres") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    state, _ = login_error(t, user="stranger")
    assert state == "28000"


def test_database_entry_user_and_password(tidepool, pg):
    t = tidepool(databases=f"aliased = host=127.0.0.1 port={pg.port} dbname=appdb user=app password=app-secret")
    with t.connect(dbname="aliased", user="anyone") as c:
        assert c.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")


def test_unknown_database_gets_3D000(tidepool, pg):
    t = tidepool(databases=f"only = host=127.0.0.1 port={pg.port} dbname=postgres")
    state, message = login_error(t, dbname="missing")
    assert state == "3D000"
    assert "no such database: missing" in message  # PgBouncer's words


def test_database_missing_on_server_reports_server_error(tidepool):
    t = tidepool()
    state, message = login_error(t, dbname="not_on_server")
    assert state == "3D000"
    assert "not_on_server" in message


def test_wrong_server_password_is_reported_to_the_client(tidepool, pg):
    t = tidepool(databases=f"appdb = host=127.0.0.1 port={pg.port} user=app password=wrong")
    state, message = login_error(t, dbname="appdb")
    assert state == "28P01"
    assert "server connection failed" in message


def test_max_client_conn_refuses_at_once(tidepool):
    t = tidepool(settings="max_client_conn = 2\n")
    with t.connect() as a, t.connect() as b:
        started = time.time()
        state, message = login_error(t)
        assert state == "53300"
        assert "max_client_conn" in message
        assert time.time() - started < 2
        assert a.execute("SELECT 1").fetchone()[0] == b.execute("SELECT 1").fetchone()[0]
    # Slots come back when clients leave.
    time.sleep(0.2)
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_client_limits_per_database_and_per_user(tidepool, pg):
    """max_db_client_connections and max_user_client_connections (PgBouncer 1.24+), globally, per
    database and per user, with PgBouncer's words; SET changes them at run time; SHOW DATABASES and
    SHOW USERS count the clients; the admin console is not counted."""
    t = tidepool(
        settings="max_db_client_connections = 2\nadmin_users = postgres\n",
        databases=f"postgres = host=127.0.0.1 port={pg.port}\n"
                  f"other = host=127.0.0.1 port={pg.port} dbname=postgres max_db_client_connections=1",
        users="app = max_user_client_connections=1", userlist='"postgres" ""\n"app" "app-secret"\n')

    def show(what):
        with psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user="postgres",
                             autocommit=True) as admin:
            cur = admin.execute(f"SHOW {what}")
            names = [c.name for c in cur.description]
            return {row[0]: dict(zip(names, row)) for row in cur.fetchall()}

    with t.connect() as a, t.connect() as b:
        state, message = login_error(t)
        assert (state, "client connections exceeded (max_db_client_connections)" in message) == ("53300", True)
        databases = show("DATABASES")
        assert (databases["postgres"]["current_client_connections"],
                databases["postgres"]["max_client_connections"]) == (2, 2)
        # The database's own limit, and the user's.
        with t.connect(dbname="other") as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
            state, message = login_error(t, dbname="other")
            assert "max_db_client_connections" in message
            assert show("DATABASES")["other"]["current_client_connections"] == 1
        # Raised at run time.
        with psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user="postgres",
                             autocommit=True) as admin:
            admin.execute("SET max_db_client_connections = 3")
        with t.connect() as d:
            assert d.execute("SELECT 1").fetchone()[0] == 1
        assert a.execute("SELECT 1").fetchone()[0] == b.execute("SELECT 1").fetchone()[0]
    with t.connect(dbname="other", user="app", password="app-secret") as e:
        state, message = login_error(t, dbname="postgres", user="app", password="app-secret")
        assert (state, "client connections exceeded (max_user_client_connections)" in message) == ("53300", True)
        users = show("USERS")
        assert (users["app"]["current_client_connections"], users["app"]["max_user_client_connections"]) == (1, 1)
        assert e.execute("SELECT 1").fetchone()[0] == 1
    time.sleep(0.2)
    assert show("DATABASES")["postgres"]["current_client_connections"] == 0


def test_query_wait_timeout_says_it_waited(tidepool):
    t = tidepool(settings="default_pool_size = 1\nquery_wait_timeout = 1\n")
    with t.connect() as holder, t.connect() as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        started = time.time()
        with pytest.raises(psycopg.OperationalError) as info:
            waiter.execute("SELECT 1")
        waited = time.time() - started
        assert 0.9 <= waited < 3
        assert "query_wait_timeout" in str(info.value)
        assert "waited 1." in str(info.value)
        holder.execute("COMMIT")


def test_waiting_client_that_leaves_takes_no_server(tidepool, pg):
    t = tidepool(settings="default_pool_size = 1\n")
    with t.connect() as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        raw = socket.create_connection(("127.0.0.1", t.port))
        startup = b"user\0postgres\0database\0postgres\0\0"
        raw.sendall(struct.pack("!ii", 8 + len(startup), 196608) + startup)
        time.sleep(0.2)
        raw.recv(65536)
        q = b"SELECT 1\0"
        raw.sendall(b"Q" + struct.pack("!i", 4 + len(q)) + q)
        time.sleep(0.2)
        raw.close()  # gives up while queued
        time.sleep(0.2)
        holder.execute("COMMIT")
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    assert pg.backends(user="postgres") <= 1


def test_server_connect_failure_fails_waiting_clients_fast(tidepool, pg):
    from conftest import free_port
    dead = free_port()
    t = tidepool(databases=f"dead = host=127.0.0.1 port={dead} dbname=postgres",
                 settings="server_connect_timeout = 2\nserver_connect_fail_fast = 1\n")
    started = time.time()
    with pytest.raises(psycopg.OperationalError) as info:
        t.connect(dbname="dead").execute("SELECT 1")
    assert time.time() - started < 3
    assert "server connection failed" in str(info.value)
    # While connecting keeps failing, the next client is told at once.
    started = time.time()
    with pytest.raises(psycopg.OperationalError):
        t.connect(dbname="dead").execute("SELECT 1")
    assert time.time() - started < 1


def hold_transactions(t, n, **kw):
    conns = []
    for _ in range(n):
        c = t.connect(**kw)
        c.execute("BEGIN")
        c.execute("SELECT 1")
        conns.append(c)
    return conns


def test_max_db_connections_spans_user_pools(tidepool, pg):
    with pg.connect() as admin:
        admin.execute("DO $$ BEGIN CREATE ROLE other LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    t = tidepool(settings="max_db_connections = 2\ndefault_pool_size = 5\nquery_wait_timeout = 1\n")
    other = t.connect(user="other")  # its pool learns the server's parameters now
    held = hold_transactions(t, 2, user="postgres")
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            other.execute("SELECT 1")
        assert "query_wait_timeout" in str(info.value)
        assert pg.backends() == 2
    finally:
        other.close()
        for c in held:
            c.close()
    time.sleep(0.3)
    # Idle servers of the other pool make room for this one.
    with t.connect(user="other") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "other"


def test_max_user_connections(tidepool, pg):
    t = tidepool(settings="max_user_connections = 1\nquery_wait_timeout = 1\n", users="postgres = max_user_connections=1")
    held = hold_transactions(t, 1)
    try:
        with t.connect() as c:
            with pytest.raises(psycopg.OperationalError):
                c.execute("SELECT 1")
    finally:
        held[0].close()


def test_per_database_pool_size_and_server_parameters(tidepool, pg):
    t = tidepool(databases=f"tz = host=127.0.0.1 port={pg.port} dbname=postgres pool_size=1 timezone=Asia/Tokyo "
                           f"application_name=from_config")
    with t.connect(dbname="tz") as a, t.connect(dbname="tz") as b:
        assert a.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
        assert a.execute("SELECT current_setting('application_name')").fetchone()[0] == "from_config"
        assert a.execute("SELECT pg_backend_pid()").fetchone() == b.execute("SELECT pg_backend_pid()").fetchone()


def test_refused_server_login_fails_waiting_clients_at_once(tidepool, pg):
    """When the server starts refusing the pooler's login (the password changed), clients waiting
    for a server get the server's error at once, not at query_wait_timeout, though a server
    logged in earlier is still lent; new clients too, until a retry succeeds."""
    t = tidepool(databases=f"appdb = host=127.0.0.1 port={pg.port} user=app password=app-secret pool_size=2",
                 settings="query_wait_timeout = 30\n")
    holder = t.connect(dbname="appdb", user="app")
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    try:
        with pg.connect() as admin:
            admin.execute("ALTER ROLE app PASSWORD 'changed-secret'")
        started = time.time()
        with t.connect(dbname="appdb", user="app") as waiter:
            with pytest.raises(psycopg.OperationalError) as info:
                waiter.execute("SELECT 1")
        assert time.time() - started < 5
        assert "28P01" in str(info.value) or "password authentication failed" in str(info.value)
        with t.connect(dbname="appdb", user="app") as late:
            with pytest.raises(psycopg.OperationalError):
                late.execute("SELECT 1")
        assert holder.execute("SELECT 'still served'").fetchone()[0] == "still served"
    finally:
        with pg.connect() as admin:
            admin.execute("ALTER ROLE app PASSWORD 'app-secret'")
        holder.close()


def test_query_wait_notify_tells_a_queued_client(tidepool):
    """PgBouncer 1.25's query_wait_notify: a client queued that long gets a NOTICE, once."""
    t = tidepool(settings="default_pool_size = 1\nquery_wait_notify = 1\n")
    notices = []
    with t.connect() as a, t.connect() as b:
        b.add_notice_handler(lambda n: notices.append(n.message_primary))
        a.execute("BEGIN")
        a.execute("SELECT 1")
        done = threading.Event()

        def query():
            b.execute("SELECT 1")
            done.set()

        worker = threading.Thread(target=query)
        worker.start()
        time.sleep(2.5)
        assert not done.is_set()
        a.execute("COMMIT")
        worker.join(timeout=10)
        assert done.is_set()
    assert notices == ["No server connection available in postgres backend, client being queued"]


def test_trust_looks_up_users_missing_from_auth_file(tidepool):
    """auth_type = trust with auth_user, as PgBouncer: a user missing from auth_file is looked up
    with auth_query; one PostgreSQL has logs in (its secret then logs in to the server), one it
    does not have is refused."""
    t = tidepool(userlist='"postgres" ""\n', settings="auth_type = trust\nauth_user = postgres\n")
    with t.connect(user="md5user") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "md5user"
    with pytest.raises(psycopg.OperationalError, match="auth_query did not find it"):
        t.connect(user="ghost")


def test_a_flood_of_unknown_users_costs_postgresql_two_connections(tidepool, pg):
    """Issue 31: each login of an unknown user opened its own auth_user connection; 200 at once
    exhausted PostgreSQL's connections for everyone. Lookups now run two at a time per database."""
    t = tidepool(userlist='"postgres" ""\n', settings="auth_type = trust\nauth_user = postgres\nmax_client_conn = 500\n")
    most = 0
    stop = threading.Event()
    # Only connections opened from here on: an earlier test's servers may still be closing.
    with pg.connect() as c:
        since = c.execute("SELECT clock_timestamp()").fetchone()[0]

    def sample():
        nonlocal most
        with pg.connect() as c:
            while not stop.is_set():
                n = c.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                              "AND usename = 'postgres' AND pid <> pg_backend_pid() AND backend_start >= %s",
                              (since,)).fetchone()[0]
                most = max(most, n)
                time.sleep(0.002)

    refused = []

    def login(i):
        try:
            psycopg.connect(host="127.0.0.1", port=t.port, dbname="postgres", user=f"ghost{i}",
                            connect_timeout=30).close()
        except psycopg.OperationalError as e:
            refused.append(str(e))

    sampler = threading.Thread(target=sample)
    sampler.start()
    logins = [threading.Thread(target=login, args=(i,)) for i in range(60)]
    for th in logins:
        th.start()
    for th in logins:
        th.join(60)
    stop.set()
    sampler.join(10)
    assert len(refused) == 60 and all("auth_query did not find it" in e for e in refused), refused[:3]
    assert 1 <= most <= 2, f"{most} auth_user connections at once"
    with t.connect(user="md5user") as c:  # a real user still logs in
        assert c.execute("SELECT current_user").fetchone()[0] == "md5user"


def test_auth_query_never_runs_with_the_clients_startup_settings(tidepool, pg):
    """PgBouncer's CVE-2025-12819 class: an auth_query run with the client's startup search_path
    would read a pg_shadow of the client's making. The lookup logs in as auth_user with its own
    settings only, so the forged row is never seen."""
    import hashlib
    forged = "md5" + hashlib.md5(b"pwned" + b"ghostx").hexdigest()
    with pg.connect() as c:
        c.execute("DROP SCHEMA IF EXISTS evil CASCADE")
        c.execute("CREATE SCHEMA evil")
        c.execute(f"CREATE VIEW evil.pg_shadow AS SELECT 'ghostx'::name AS usename, '{forged}'::text AS passwd")
    try:
        t = tidepool(userlist='"postgres" ""\n', settings="auth_type = md5\nauth_user = postgres\n")
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(host="127.0.0.1", port=t.port, dbname="postgres", user="ghostx", password="pwned",
                            options="-c search_path=evil,pg_catalog", connect_timeout=10)
        assert "password authentication failed" in str(refused.value) or "did not find" in str(refused.value)
    finally:
        with pg.connect() as c:
            c.execute("DROP SCHEMA evil CASCADE")
