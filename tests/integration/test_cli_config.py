"""Command line and configuration handling of the tidepool binary."""

import subprocess
import time

import psycopg

from conftest import BINARY


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
