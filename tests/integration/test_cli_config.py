"""Command line and configuration handling of the tidepool binary."""

import os
import subprocess
import time

import psycopg

from conftest import BINARY, Tidepool


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
    log = t.log()
    assert "login attempt: db=appdb user=postgres" in log
    assert "closing client" in log and "client close request" in log
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
