"""Integration fixtures: a real throwaway PostgreSQL and real Tidepool processes.

Nothing here is mocked. PostgreSQL is started through scripts/lib.sh (as the postgres OS user
when run as root); Tidepool is the binary built by `swift build` (TIDEPOOL_BIN overrides it).
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Thousands of clients need thousands of descriptors, here and in the processes started from here.
try:
    import resource

    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
except (ImportError, ValueError, OSError):
    pass
LIB = ROOT / "scripts" / "lib.sh"


def free_port():
    out = subprocess.run(["bash", "-c", f". '{LIB}'; free_port"], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def wait_for_port(port, timeout=20.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class Postgres:
    def __init__(self, directory, port):
        self.dir = directory
        self.port = port

    def connect(self, dbname="postgres", user="postgres", **kw):
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user, autocommit=True, **kw)

    # The tests' own observing connections: a backend of an earlier one can still be exiting
    # (seen in pg_stat_activity) when the next one counts.
    OBSERVER = "tidepool-test-observer"

    def scalar(self, sql, *args, dbname="postgres"):
        with self.connect(dbname=dbname, application_name=self.OBSERVER) as conn:
            return conn.execute(sql, args).fetchone()[0]

    def backends(self, dbname="postgres", user=None):
        """Client backends of a database (not counting the tests' own observers)."""
        sql = ("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
               f"AND datname = %s AND application_name <> '{self.OBSERVER}'")
        args = [dbname]
        if user:
            sql += " AND usename = %s"
            args.append(user)
        with self.connect(application_name=self.OBSERVER) as conn:
            return conn.execute(sql, args).fetchone()[0]


@contextlib.contextmanager
def own_postgres(prefix="tidepool-pg-", also_on=""):
    """A PostgreSQL of the caller's own (listening on 127.0.0.1 and `also_on` when given), stopped
    and removed afterwards."""
    directory = tempfile.mkdtemp(prefix=prefix)
    port = free_port()
    subprocess.run(["bash", "-c", f". '{LIB}'; start_postgres '{directory}' {port} off {also_on}"], check=True)
    try:
        yield Postgres(directory, port)
    finally:
        subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pg():
    directory = tempfile.mkdtemp(prefix="tidepool-pg-")
    port = free_port()
    subprocess.run(["bash", "-c", f". '{LIB}'; start_postgres '{directory}' {port}"], check=True)
    server = Postgres(directory, port)
    with server.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, note text)")
        conn.execute("GRANT ALL ON items, items_id_seq TO app, md5user")
    yield server
    subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
    shutil.rmtree(directory, ignore_errors=True)


BINARY = os.environ.get("TIDEPOOL_BIN", str(ROOT / ".build" / "debug" / "tidepool"))
# The production build, for the tests whose bounds are about speed (scripts/test.sh builds it);
# without it they check what they can with BINARY.
RELEASE_BINARY = os.environ.get("TIDEPOOL_RELEASE_BIN")


class Tidepool:
    """A running tidepool process with its own config."""

    def __init__(self, pg, settings="", databases=None, users="", userlist=None, extra_args=(), binary=None,
                 port=None):
        self.dir = Path(tempfile.mkdtemp(prefix="tidepool-"))
        self.port = port or free_port()
        self.pg = pg
        if databases is None:
            databases = f"* = host=127.0.0.1 port={pg.port}"
        if userlist is not None:
            (self.dir / "userlist.txt").write_text(userlist)
            settings = f"auth_file = {self.dir / 'userlist.txt'}\n" + settings
        ini = textwrap.dedent("""\
            [databases]
            {databases}

            [users]
            {users}

            [pooler]
            listen_addr = 127.0.0.1
            listen_port = {port}
            unix_socket_dir = {dir}
            auth_type = trust
            logfile = {dir}/tidepool.log
            {settings}
            """).format(databases=databases, users=users, port=self.port, dir=self.dir, settings=settings)
        self.ini = self.dir / "pooler.ini"
        self.ini.write_text(ini)
        self.proc = subprocess.Popen([binary or BINARY, *extra_args, str(self.ini)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError("tidepool did not start:\n" + self.output())

    def dsn(self, dbname="postgres", user="postgres", **extra):
        parts = {"host": "127.0.0.1", "port": self.port, "dbname": dbname, "user": user, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, dbname="postgres", user="postgres", autocommit=True, **kw):
        # Named prepared statements in transaction mode are another issue's work: keep psycopg
        # on unnamed statements unless a test asks otherwise.
        kw.setdefault("prepare_threshold", None)
        return psycopg.connect(host="127.0.0.1", port=self.port, dbname=dbname, user=user,
                               autocommit=autocommit, connect_timeout=10, **kw)

    def log(self):
        path = self.dir / "tidepool.log"
        return path.read_text() if path.exists() else ""

    def output(self):
        return (self.proc.stdout.read().decode() if self.proc.stdout else "") + self.log()

    def pid_fd_count(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def tidepool(pg):
    started = []

    def start(**kw):
        t = Tidepool(pg, **kw)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()
        assert t.proc.returncode == 0, f"tidepool exited with {t.proc.returncode}:\n{t.output()[-6000:]}"
        shutil.rmtree(t.dir, ignore_errors=True)
    # The next test counts backends: wait until the servers of this one have really gone.
    deadline = time.time() + 5
    while time.time() < deadline and (pg.backends("postgres") or pg.backends("appdb")):
        time.sleep(0.05)
