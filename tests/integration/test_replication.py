"""Replication connections through the pooler, unpooled, as PgBouncer 1.23+: pg_basebackup
(physical) and a logical replication subscription, each on a server connection of its own."""

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from conftest import LIB, own_postgres


@pytest.fixture
def fresh_pg():
    """A factory of PostgreSQL servers of the test's own (wal_level = logical, replication
    allowed from loopback), stopped at the end."""
    with contextlib.ExitStack() as started:
        yield lambda: started.enter_context(own_postgres("tidepool-pg-repl-"))


def bindir():
    return subprocess.run(["bash", "-c", f". '{LIB}'; pg_bindir"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_pg_basebackup_and_physical_replication_connections(tidepool, fresh_pg, tmp_path):
    primary = fresh_pg()
    t = tidepool(databases=f"* = host=127.0.0.1 port={primary.port}",
                 settings="admin_users = admin\nmax_db_connections = 2\n")
    target = tmp_path / "backup"
    out = subprocess.run(
        [f"{bindir()}/pg_basebackup", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-w",
         "-D", str(target), "-X", "stream", "-c", "fast", "--no-sync"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + t.log()[-3000:]
    assert (target / "PG_VERSION").read_text().strip() == "15"
    assert (target / "backup_label").exists() and any((target / "pg_wal").iterdir())

    # A physical replication connection: replication commands, its own server, in the limits.
    with psycopg.connect(host="127.0.0.1", port=t.port, user="postgres", dbname="postgres",
                         replication="true", autocommit=True) as r:
        system = r.execute("IDENTIFY_SYSTEM").fetchone()[0]
        system = system.decode() if isinstance(system, bytes) else str(system)
        with primary.connect() as direct:
            assert system == str(direct.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0])
        with t.connect(dbname="pgbouncer", user="admin") as a:
            modes = [row[3] for row in a.execute("SHOW CLIENTS").fetchall()]
        assert "physical" in modes
        with psycopg.connect(host="127.0.0.1", port=t.port, user="postgres", dbname="postgres",
                             replication="true", autocommit=True) as second:
            second.execute("IDENTIFY_SYSTEM")
            # Two servers of their own: max_db_connections = 2 is reached.
            with pytest.raises(psycopg.OperationalError, match="no more connections allowed"):
                psycopg.connect(host="127.0.0.1", port=t.port, user="postgres", dbname="postgres",
                                replication="true")
    # Closed with their clients: pooled clients have the servers again.
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_a_logical_replication_subscription_through_the_pooler(tidepool, fresh_pg):
    publisher = fresh_pg()
    subscriber = fresh_pg()
    t = tidepool(databases=f"* = host=127.0.0.1 port={publisher.port}")
    with publisher.connect() as p:
        p.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        p.execute("INSERT INTO items VALUES (1, 'before')")
        p.execute("CREATE PUBLICATION pub FOR TABLE items")
    with subscriber.connect() as s:
        s.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        s.execute(f"CREATE SUBSCRIPTION sub CONNECTION 'host=127.0.0.1 port={t.port} user=postgres "
                  f"dbname=postgres' PUBLICATION pub")
        try:
            with publisher.connect() as p:
                p.execute("INSERT INTO items SELECT g, 'after ' || g FROM generate_series(2, 50) g")
            deadline = time.time() + 30
            count = 0
            while time.time() < deadline:
                count = s.execute("SELECT count(*) FROM items").fetchone()[0]
                if count == 50:
                    break
                time.sleep(0.2)
            assert count == 50, "the initial copy and the changes arrive through the pooler"
            assert s.execute("SELECT name FROM items WHERE id = 50").fetchone()[0] == "after 50"
            with publisher.connect() as p:
                senders = p.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]
            assert senders >= 1
        finally:
            s.execute("DROP SUBSCRIPTION sub")
    with publisher.connect() as p:
        assert p.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0


@pytest.fixture
def standby_of(tmp_path):
    """A factory of streaming standbys of a primary: same port, on 127.0.0.2."""
    started = []

    def start(primary):
        directory = tempfile.mkdtemp(prefix="tidepool-pg-standby-")
        subprocess.run(["bash", "-c", f". '{LIB}'; start_standby {primary.port} '{directory}' 127.0.0.2"],
                       check=True)
        started.append(directory)
        return directory

    yield start
    for directory in started:
        subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def test_target_session_attrs_picks_the_primary_or_the_standby_of_a_host_list(tidepool, fresh_pg, standby_of):
    """One host list, a primary (127.0.0.1) and its streaming standby (127.0.0.2) on one port: each
    database entry gets only the servers its target_session_attrs accepts, whichever host comes
    first, and a standby-only entry whose standby is gone waits (57P03) rather than using the primary."""
    primary = fresh_pg()
    standby_of(primary)
    hosts = f"host=127.0.0.2,127.0.0.1 port={primary.port} dbname=postgres"
    t = tidepool(
        databases=f"rw = {hosts} target_session_attrs=read-write\n"
                  f"ro = {hosts} target_session_attrs=standby\n"
                  f"anyone = {hosts}\n",
        settings="default_pool_size = 2\nserver_lifetime = 0\nquery_wait_timeout = 3\n")
    for _ in range(6):  # server_lifetime = 0: a new server (the next host) each time
        with t.connect(dbname="rw") as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is False
        with t.connect(dbname="ro") as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
    seen = set()
    for _ in range(6):
        with t.connect(dbname="anyone") as c:
            seen.add(c.execute("SELECT pg_is_in_recovery()").fetchone()[0])
    assert seen == {True, False}  # without target_session_attrs both hosts serve
    assert "server is not read-write (in_hot_standby=on" in t.log()
