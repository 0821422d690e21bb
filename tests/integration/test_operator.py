"""Operator basics (issue 33): the tools people already use on PgBouncer work on Tidepool: promtool
on /metrics, pgcli on the console, PgBouncer's console errors and views, logrotate with SIGHUP,
and the quickstart's console and metrics."""

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import psycopg
import pytest
from psycopg import errors

from conftest import ROOT, free_port, wait_for_port


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def promtool(text):
    assert shutil.which("promtool"), "scripts/test.sh installs Debian's prometheus (promtool)"
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)


def console(t, user="postgres"):
    return psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user=user, autocommit=True)


def test_metrics_pass_promtool_from_the_first_scrape(tidepool):
    port = free_port()
    t = tidepool(settings=f"stats_listen_port = {port}\n")
    wait_for_port(port)
    first = scrape(port)
    checked = promtool(first)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every documented family is there before anything happened, with its help text.
    for family in ("tidepool_transactions_total", "tidepool_wait_time_seconds_total", "tidepool_errors_total",
                   "tidepool_clients_active", "tidepool_query_time_seconds"):
        assert f"# HELP {family} " in first and f"# TYPE {family} " in first, family
    assert "microseconds" not in first
    with t.connect() as c:
        for _ in range(3):
            c.execute("SELECT 1")
    later = scrape(port)
    checked = promtool(later)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    seconds = re.search(r'^tidepool_query_time_seconds_total\{database="postgres"[^}]*\} (\S+)$', later, re.M)
    assert seconds and 0 < float(seconds.group(1)) < 60, "seconds, Prometheus's base unit"


def test_console_errors_are_pgbouncers_08P01(tidepool):
    t = tidepool(settings="admin_users = postgres\nstats_users = watcher\n")
    with console(t) as a:
        for command in ("SHOW NONSENSE", "DROP TABLE x", "SELECT 1", "KILL_CLIENT 424242", "RESUME",
                        "SET no_such_setting = 1"):
            with pytest.raises(errors.ProtocolViolation):
                a.execute(command)
    with console(t, user="watcher") as w:
        for command in ("RELOAD", "SHOW FDS"):
            with pytest.raises(errors.ProtocolViolation):
                w.execute(command)


def test_pgcli_opens_the_console(tidepool):
    """pgcli tells a PgBouncer console by the 08P01 its first SELECT gets."""
    assert shutil.which("pgcli"), "scripts/test.sh installs pgcli"
    t = tidepool(settings="admin_users = postgres\n")
    out = subprocess.run(["pgcli", "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "pgbouncer"],
                         input="SHOW VERSION\n", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TERM": "dumb", "HOME": str(t.dir)})
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.stdout + out.stderr)
    assert "Tidepool" in text and "invalid command" not in text, text[-2000:]


def test_show_users_fds_and_the_consoles_own_stats(tidepool):
    t = tidepool(settings="admin_users = postgres\nstats_users = watcher\n",
                 userlist='"alice" "secret"\n"bob" "secret"\n"postgres" ""\n"watcher" ""\n')
    with t.connect() as c:
        c.execute("SELECT 1")
        with console(t) as a:
            users = {r[0] for r in a.execute("SHOW USERS").fetchall()}
            assert {"alice", "bob", "postgres", "watcher", "pgbouncer"} <= users
            cur = a.execute("SHOW FDS")
            columns = [d.name for d in cur.description]
            assert columns[:8] == ["fd", "task", "user", "database", "addr", "port", "cancel", "link"]
            tasks = [r[1] for r in cur.fetchall()]
            assert "pooler" in tasks and "client" in tasks and "server" in tasks
            for _ in range(4):
                a.execute("SHOW VERSION")
            stats = {r[0]: r for r in a.execute("SHOW STATS").fetchall()}
            assert int(stats["pgbouncer"][2]) >= 6, "the console's own queries are counted"


def test_sighup_reopens_a_rotated_log(tidepool):
    t = tidepool()
    log = t.dir / "tidepool.log"
    rotated = t.dir / "tidepool.log.1"
    with t.connect() as c:
        c.execute("SELECT 1")
    os.rename(log, rotated)
    t.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while time.time() < deadline and not log.exists():
        time.sleep(0.05)
    assert log.exists(), "a new log file after SIGHUP"
    size = rotated.stat().st_size
    with t.connect(application_name="after-rotation") as c:
        c.execute("SELECT 1")
    time.sleep(0.3)
    assert "login attempt" in log.read_text() or log.stat().st_size > 0
    assert rotated.stat().st_size == size, "nothing more written to the renamed file"


def test_prometheus_pgbouncer_exporter_reads_the_console(tidepool):
    exporter = shutil.which("pgbouncer-exporter")
    assert exporter, "scripts/test.sh installs prometheus-pgbouncer-exporter from PyPI"
    t = tidepool(settings="admin_users = postgres\n")
    port = free_port()
    config = t.dir / "exporter.yml"
    config.write_text(f"exporter_host: 127.0.0.1\nexporter_port: {port}\npgbouncers:\n"
                      f"  - dsn: postgresql://postgres@127.0.0.1:{t.port}/pgbouncer\n")
    with t.connect() as c:
        c.execute("SELECT 1")
    proc = subprocess.Popen([exporter, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
        deadline = time.time() + 20
        text = ""
        while time.time() < deadline:
            text = scrape(port)
            if "pgbouncer_pools_client_active_connections" in text:
                break
            time.sleep(0.5)
        assert 'pgbouncer_pools_client_active_connections{' in text, text[-3000:]
        assert re.search(r'^pgbouncer_stats_queries_total\{[^}]*database="postgres"', text, re.M), text[-3000:]
        assert "pgbouncer_up 1" in text or "pgbouncer_up 1.0" in text, text[-3000:]
    finally:
        proc.terminate()
        proc.wait(10)


def test_quickstart_turns_on_the_console_and_metrics():
    """The README's first command: its console line and metrics URL work as printed."""
    port = free_port()
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "quickstart.sh"), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        printed = ""
        deadline = time.time() + 600  # a release build, if the tests did not make one
        while time.time() < deadline and "Metrics:" not in printed:
            line = proc.stdout.readline()
            if not line:
                break
            printed += line
        console_url = re.search(r"Console:\s+psql \"(\S+)\"", printed).group(1)
        metrics_url = re.search(r"Metrics:\s+(\S+)", printed).group(1)
        with psycopg.connect(console_url, autocommit=True) as a:
            assert a.execute("SHOW VERSION").fetchone()[0].startswith("Tidepool")
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            assert promtool(r.read().decode()).returncode == 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
