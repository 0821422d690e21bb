"""Command line and configuration handling of the tidepool binary."""

import os
import re
import subprocess
import time

import psycopg

from conftest import BINARY, Tidepool
from test_security import certs  # noqa: F401  (fixture)


def run(*args, timeout=20):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    out = run("-V")
    assert out.returncode == 0 and out.stdout.startswith("tidepool ")
    out = run("--help")
    assert out.returncode == 0
    for flag in ("-d", "-q", "-v", "-u", "-V", "--check"):
        assert flag in out.stdout


def test_invalid_value_stops_start_up_naming_file_line_and_key(tmp_path):
    ini = tmp_path / "bad.ini"
    ini.write_text("[pgbouncer]\nlisten_port = 6432\npool_mode = sometimes\n")
    out = run(str(ini))
    assert out.returncode != 0
    assert f"{ini}:3: pool_mode:" in out.stderr


def test_check_validates_and_warns_about_unknown_keys(tmp_path):
    ini = tmp_path / "ok.ini"
    ini.write_text("[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 6432\nsome_future_key = 1\n")
    out = run("--check", str(ini))
    assert out.returncode == 0, out.stderr
    assert "some_future_key" in out.stdout
    assert "configuration OK" in out.stdout


def test_include_and_pidfile(tidepool, pg, tmp_path):
    extra = tmp_path / "extra.ini"
    extra.write_text("default_pool_size = 1\n")
    pidfile = tmp_path / "tidepool.pid"
    t = tidepool(settings=f"%include {extra}\npidfile = {pidfile}\n")
    assert int(pidfile.read_text()) == t.proc.pid
    with t.connect() as a, t.connect() as b:
        assert a.execute("SELECT pg_backend_pid()").fetchone() == b.execute("SELECT pg_backend_pid()").fetchone()


def test_connection_lines_are_logged_without_passwords(tidepool, pg):
    t = tidepool(databases=f"appdb = host=127.0.0.1 port={pg.port} user=app password=app-secret")
    with t.connect(dbname="appdb", application_name="logcheck") as c:
        c.execute("SELECT 1")
    time.sleep(0.2)
    # A client that goes without a Terminate.
    import socket
    import struct
    raw = socket.create_connection(("127.0.0.1", t.port))
    body = b"user\0postgres\0database\0appdb\0\0"
    raw.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    raw.recv(4096)
    raw.close()
    time.sleep(0.3)
    log = t.log()
    # PgBouncer 1.25's lines: kind-id, db/user@address, its phrase.
    assert re.search(r"C-\d+: appdb/postgres@127\.0\.0\.1:\d+ login attempt: db=appdb user=postgres tls=no "
                     r"replication=no", log), log
    assert re.search(r"C-\d+: appdb/postgres@127\.0\.0\.1:\d+ closing because: client close request \(age=\d+s\)",
                     log), log
    assert "closing because: client unexpected eof" in log, log
    assert re.search(r"S-\d+: appdb/app@127\.0\.0\.1:\d+ new connection to server \(from 127\.0\.0\.1:\d+\)",
                     log), log
    assert "app-secret" not in log


def test_daemon_mode_detaches_and_writes_pidfile(pg, tmp_path):
    from conftest import free_port, wait_for_port
    import os, signal
    port = free_port()
    pidfile = tmp_path / "d.pid"
    ini = tmp_path / "d.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_port = {port}\n"
                   f"unix_socket_dir =\nauth_type = trust\nlogfile = {tmp_path}/d.log\npidfile = {pidfile}\n")
    out = run("-d", str(ini))
    assert out.returncode == 0
    wait_for_port(port)
    pid = int(pidfile.read_text())
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
    finally:
        os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not pidfile.exists():
            break
        time.sleep(0.1)
    assert not pidfile.exists()


def test_user_switch_and_quiet(pg, tmp_path):
    import os
    import pwd
    from conftest import free_port, wait_for_port
    if os.getuid() != 0:
        import pytest
        pytest.skip("switching users needs root")
    port = free_port()
    ini = tmp_path / "u.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_port = {port}\n"
                   f"unix_socket_dir =\nauth_type = trust\n")
    proc = subprocess.Popen([BINARY, "-q", "-u", "nobody", str(ini)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        status = open(f"/proc/{proc.pid}/status").read()
        uid = int([l for l in status.splitlines() if l.startswith("Uid:")][0].split()[1])
        assert uid == pwd.getpwnam("nobody").pw_uid
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres") as c:
            assert c.execute("SELECT 1").fetchone()[0] == 1
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert out == b"" and err == b""  # -q: nothing on the console


def test_sighup_reloads_without_stopping(tidepool):
    import signal as sig
    t = tidepool()
    t.proc.send_signal(sig.SIGHUP)
    time.sleep(0.3)
    assert t.proc.poll() is None
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    assert "RELOAD: configuration applied" in t.log()


def listening_sockets(port, pid):
    """Inodes of the TCP sockets listening on `port` that process `pid` holds."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                inodes.add(fields[9])
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return {i for i in inodes if f"socket:[{i}]" in held}


def second_pooler(tmp_path, port, pg, settings=""):
    ini = tmp_path / "second.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_addr = 127.0.0.1\n"
                   f"listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nthreads = 2\n{settings}")
    return subprocess.Popen([BINARY, str(ini)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_listener_per_thread_and_the_port_stays_ours_unless_so_reuseport(pg, tmp_path):
    first = Tidepool(pg, "threads = 2\n")
    try:
        # One listening socket per event-loop thread, so a new client is accepted on its own thread.
        assert len(listening_sockets(first.port, first.proc.pid)) == 2
        conns = [first.connect() for _ in range(8)]
        assert [c.execute("SELECT 1").fetchone()[0] for c in conns] == [1] * 8
        for c in conns:
            c.close()
        # A second pooler on the same port fails, as it would against a single socket.
        second = second_pooler(tmp_path, first.port, pg)
        assert second.wait(timeout=20) != 0
        assert "in use" in second.stdout.read().lower()
    finally:
        first.stop()
    # With so_reuseport = 1 on both, both listen on the port (PgBouncer's meaning of the key).
    first = Tidepool(pg, "threads = 2\nso_reuseport = 1\n")
    second = second_pooler(tmp_path, first.port, pg, "so_reuseport = 1\n")
    try:
        deadline = time.time() + 20
        while len(listening_sockets(first.port, second.pid)) < 2 and time.time() < deadline:
            assert second.poll() is None, second.stdout.read()
            time.sleep(0.1)
        assert len(listening_sockets(first.port, second.pid)) == 2
        assert len(listening_sockets(first.port, first.proc.pid)) == 2
    finally:
        second.terminate()
        second.wait(timeout=10)
        first.stop()


def test_login_notify_message(tidepool):
    """login_notify_message: every client is told at login, on a pool and on the console."""
    t = tidepool(settings="login_notify_message = Connected through the pooler\nadmin_users = postgres\n")
    for dbname in ("postgres", "pgbouncer"):
        out = subprocess.run(["psql", t.dsn(dbname=dbname), "-XAtc", "SHOW VERSION" if dbname == "pgbouncer"
                              else "SELECT 1"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "NOTICE:  Connected through the pooler" in out.stderr, out.stderr


def test_set_verbose_changes_the_log_level_at_once(tidepool):
    """verbose is changeable at run time, as in PgBouncer: SET verbose = 1 turns debug lines on."""
    import socket
    import struct
    t = tidepool(settings="admin_users = postgres\n")

    def unknown_cancel():
        s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
        s.sendall(struct.pack("!iiii", 16, 80877102, 12345, 67890))
        s.recv(1)  # closed by the pooler
        s.close()
        time.sleep(0.3)

    unknown_cancel()
    assert "cancel request with an unknown key" not in t.log()
    with t.connect(dbname="pgbouncer") as console:
        console.execute("SET verbose = 1")
    unknown_cancel()
    assert "cancel request with an unknown key" in t.log()


# Every setting PgBouncer 1.25 documents, each with a value other than its default, in every
# section that allows it.
PGBOUNCER_1_25_GLOBAL = """\
logfile = {d}/pooler.log
pidfile = {d}/pooler.pid
listen_addr = 127.0.0.1
listen_port = 16999
unix_socket_dir = {d}
unix_socket_mode = 0700
unix_socket_group = root
user = root
pool_mode = transaction
max_client_conn = 500
default_pool_size = 30
min_pool_size = 1
reserve_pool_size = 2
reserve_pool_timeout = 3
max_db_connections = 50
max_db_client_connections = 400
max_user_connections = 40
max_user_client_connections = 300
server_round_robin = 1
track_extra_parameters = search_path
ignore_startup_parameters = extra_float_digits
peer_id = 1
disable_pqexec = 1
application_name_add_host = 1
conffile = {d}/other.ini
service_name = pooler
job_name = pooler
stats_period = 30
max_prepared_statements = 100
scram_iterations = 8192
auth_type = hba
auth_hba_file = {d}/hba.conf
auth_ident_file = {d}/ident.conf
auth_file = {d}/userlist.txt
auth_user = lookup
auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename = $1
auth_dbname = postgres
syslog = 1
syslog_ident = pooler
syslog_facility = local0
log_connections = 0
log_disconnections = 0
log_pooler_errors = 0
log_stats = 0
verbose = 1
admin_users = admin
stats_users = stats
server_reset_query = RESET ALL
server_reset_query_always = 1
server_check_delay = 10
server_check_query = select 1
server_fast_close = 1
server_lifetime = 1800
server_idle_timeout = 300
server_connect_timeout = 5
server_login_retry = 3
client_login_timeout = 30
autodb_idle_timeout = 600
pool_idle_timeout = 60
dns_max_ttl = 30
dns_nxdomain_ttl = 30
dns_zone_check_period = 60
resolv_conf = /etc/resolv.conf
query_wait_notify = 2
login_notify_message = connected through the pooler
client_tls_sslmode = allow
client_tls_key_file = {certs}/pooler.key
client_tls_cert_file = {certs}/pooler.crt
client_tls_ca_file = {certs}/ca.crt
client_tls_protocols = all
client_tls_ciphers = HIGH
client_tls13_ciphers = TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:TLS_AES_128_CCM_SHA256
client_tls_ecdhcurve = prime256v1
client_tls_dheparams = legacy
server_tls_sslmode = require
server_tls_ca_file = {certs}/ca.crt
server_tls_key_file = {certs}/pooler.key
server_tls_cert_file = {certs}/pooler.crt
server_tls_protocols = tlsv1.3
server_tls_ciphers = HIGH
server_tls13_ciphers = TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
query_timeout = 60
query_wait_timeout = 60
cancel_wait_timeout = 5
client_idle_timeout = 3600
idle_transaction_timeout = 600
transaction_timeout = 900
pkt_buf = 8192
max_packet_size = 1048576
listen_backlog = 256
sbuf_loopcnt = 10
so_reuseport = 1
tcp_defer_accept = 0
tcp_socket_buffer = 65536
tcp_keepalive = 0
tcp_keepcnt = 5
tcp_keepidle = 60
tcp_keepintvl = 10
tcp_user_timeout = 1000
"""

PGBOUNCER_1_25_DATABASE = (
    "app = dbname=appdb host=10.0.0.1,10.0.0.2 port=5433 user=app password=secret auth_user=lookup "
    "auth_query='SELECT usename, passwd FROM pg_shadow WHERE usename = $1' auth_dbname=postgres pool_size=10 "
    "min_pool_size=2 reserve_pool_size=3 connect_query='SELECT 1' pool_mode=session query_wait_timeout=30 "
    "load_balance_hosts=disable target_session_attrs=read-write max_db_connections=20 "
    "max_db_client_connections=200 server_lifetime=600 client_encoding=UTF8 datestyle=ISO timezone=UTC\n"
    "old = host=10.0.0.3 reserve_pool=1\n")

PGBOUNCER_1_25_USER = (
    "app = pool_size=5 reserve_pool_size=1 pool_mode=statement max_user_connections=10 query_timeout=30 "
    "query_wait_timeout=20 idle_transaction_timeout=60 transaction_timeout=120 client_idle_timeout=600 "
    "max_user_client_connections=100\n")


def test_check_reads_every_pgbouncer_1_25_setting(tmp_path, certs):
    """A configuration that uses every key PgBouncer 1.25 documents, each set to a value other than
    its default, in [pgbouncer], [databases], [users] and [peers]: --check accepts it. Keys whose
    effect Tidepool does not have are named in a warning; none is unknown."""
    (tmp_path / "hba.conf").write_text("local all all peer map=m\nhost all all 127.0.0.1/32 scram-sha-256\n")
    (tmp_path / "ident.conf").write_text("m root app\n")
    (tmp_path / "userlist.txt").write_text('"app" "secret"\n')
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"[databases]\n{PGBOUNCER_1_25_DATABASE}\n[users]\n{PGBOUNCER_1_25_USER}\n"
                   "[peers]\n1 = host=/tmp/pooler1 port=6432 pool_size=4\n2 = host=127.0.0.1 port=6433\n\n"
                   "[pgbouncer]\n" + PGBOUNCER_1_25_GLOBAL.format(d=tmp_path, certs=certs))
    out = run("--check", str(ini))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "configuration OK" in out.stdout
    assert "unknown" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr
    # Every key is read: one left out of the table would be "unknown", so the list is checked too.
    keys = [line.split(" = ")[0] for line in PGBOUNCER_1_25_GLOBAL.splitlines()]
    assert len(keys) == len(set(keys)) >= 95
    # Where PgBouncer needs what Tidepool leaves out, the load stops naming the key and why.
    for line, word in (("auth_type = ldap", "LDAP is not supported"), ("auth_type = pam", "PAM is not supported"),
                       ("auth_ldap_options = ldapurl=\"ldap://127.0.0.1/dc=x\"", "LDAP is not supported"),
                       ("client_tls13_ciphers = TLS_AES_256_GCM_SHA384", "(BoringSSL) always offers")):
        bad = tmp_path / "bad.ini"
        bad.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\n{line}\n")
        refused = run("--check", str(bad))
        assert refused.returncode != 0
        assert line.split(" = ")[0] in refused.stderr and word in refused.stderr, refused.stderr


def test_user_key_unix_socket_group_and_conffile(pg, tmp_path):
    """user = (as -u), unix_socket_group and conffile (RELOAD reads that file), as in PgBouncer."""
    import grp
    import pwd
    import signal as sig
    from conftest import free_port, wait_for_port
    if os.getuid() != 0:
        import pytest
        pytest.skip("switching users and groups needs root")
    port = free_port()
    sockets = tmp_path / "sock"
    sockets.mkdir()
    os.chmod(sockets, 0o777)
    other = tmp_path / "other.ini"
    other.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_port = {port}\n"
                     f"unix_socket_dir = {sockets}\nauth_type = trust\nadmin_users = postgres\n"
                     "default_pool_size = 7\n")
    os.chmod(tmp_path, 0o755)
    os.chmod(other, 0o644)
    ini = tmp_path / "u.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_port = {port}\n"
                   f"unix_socket_dir = {sockets}\nauth_type = trust\nadmin_users = postgres\n"
                   f"unix_socket_group = postgres\nconffile = {other}\n")
    proc = subprocess.Popen([BINARY, str(ini)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc=proc)
        assert os.stat(sockets / f".s.PGSQL.{port}").st_gid == grp.getgrnam("postgres").gr_gid

        def pool_size():
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="pgbouncer",
                                 autocommit=True) as a:
                return [r[1] for r in a.execute("SHOW CONFIG").fetchall() if r[0] == "default_pool_size"][0]

        assert pool_size() == "20"
        proc.send_signal(sig.SIGHUP)
        deadline = time.time() + 5
        while pool_size() != "7" and time.time() < deadline:
            time.sleep(0.1)
        assert pool_size() == "7"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    # user = in the file, as -u on the command line.
    ini.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n[pooler]\nlisten_port = {port}\n"
                   "unix_socket_dir =\nauth_type = trust\nuser = nobody\n")
    proc = subprocess.Popen([BINARY, str(ini)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, proc=proc)
        status = open(f"/proc/{proc.pid}/status").read()
        uid = int([l for l in status.splitlines() if l.startswith("Uid:")][0].split()[1])
        assert uid == pwd.getpwnam("nobody").pw_uid
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


def test_syslog(tidepool):
    """syslog, syslog_ident and syslog_facility: the log also goes to /dev/log, with the ident and
    the facility's priority (local3 info = 158); SET syslog = 0 stops it."""
    import pytest
    import socket
    if os.path.exists("/dev/log") or os.getuid() != 0:
        pytest.skip("needs root and no syslog daemon on /dev/log (the test listens there)")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("/dev/log")
    listener.settimeout(5)
    try:
        t = tidepool(settings="syslog = 1\nsyslog_ident = tptest\nsyslog_facility = local3\n"
                              "admin_users = postgres\n")
        with t.connect() as c:
            c.execute("SELECT 1")
        received = []
        deadline = time.time() + 5
        while time.time() < deadline and not any(b"login attempt" in r for r in received):
            received.append(listener.recv(65536))
        line = next(r for r in received if b"login attempt" in r).decode()
        assert line.startswith("<158>") and "tptest[" in line and "INFO C-" in line, line
        with t.connect(dbname="pgbouncer") as console:
            console.execute("SET syslog = 0")
        listener.settimeout(0.5)
        with t.connect() as c:
            c.execute("SELECT 1")
        late = []
        try:
            while True:
                late.append(listener.recv(65536))
        except socket.timeout:
            pass
        # Lines from before the SET may still come (the console's login); none of the new client's.
        assert not any(b"login attempt: db=postgres" in r for r in late), late
    finally:
        listener.close()
        os.unlink("/dev/log")
