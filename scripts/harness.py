"""Helpers shared by the benchmark and soak scripts."""

import glob
import os
import shutil
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "scripts", "lib.sh")


def sh(cmd, **kw):
    return subprocess.run(["bash", "-c", f". '{LIB}'; {cmd}"], check=True, capture_output=True, text=True, **kw)


def free_port():
    return int(sh("free_port").stdout.strip())


def wait_port(port, proc):
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def proc_stat(path):
    """A /proc stat file as (command name, the fields after it); the name may hold spaces or ')'."""
    text = open(path).read()
    end = text.rindex(")")
    return text[text.index("(") + 1:end], text[end + 1:].split()


def cpu_split(pid):
    """User and system CPU seconds of a process so far."""
    fields = proc_stat(f"/proc/{pid}/stat")[1]
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def command_cpu_seconds(name):
    """CPU seconds of every process called NAME, with what its ended children used (PostgreSQL:
    the postmaster collects its ended backends' time)."""
    total = 0
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            comm, fields = proc_stat(path)
        except OSError:
            continue
        if comm == name:
            total += sum(int(v) for v in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_tidepool(work, pg_port, settings, database="* = host=127.0.0.1 port={pg_port}"):
    """Starts the release build on a free port in front of `pg_port`, transaction mode, trust auth,
    with extra `settings` lines; returns (process, port)."""
    port = free_port()
    ini = os.path.join(work, "tidepool.ini")
    with open(ini, "w") as f:
        f.write(f"[databases]\n{database.format(pg_port=pg_port)}\n[pooler]\nlisten_addr = 127.0.0.1\n"
                f"listen_port = {port}\nunix_socket_dir =\nauth_type = trust\npool_mode = transaction\n"
                f"log_connections = 0\nlog_disconnections = 0\nlogfile = {work}/tidepool.log\n{settings}")
    proc = subprocess.Popen([os.path.join(ROOT, ".build", "release", "tidepool"), ini])
    wait_port(port, proc)
    return proc, port


def start_pgbouncer(work, pg_port, settings):
    """Starts PgBouncer on a free port in front of `pg_port`'s postgres database, transaction mode,
    trust auth, with extra `settings` lines (as the postgres OS user when run as root); returns
    (process, port)."""
    port = free_port()
    ini = os.path.join(work, "pgbouncer.ini")
    users = os.path.join(work, "userlist.txt")
    log = os.path.join(work, "pgbouncer.log")
    with open(users, "w") as f:
        f.write('"postgres" ""\n')
    with open(ini, "w") as f:
        f.write(f"[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n"
                f"auth_file = {users}\npool_mode = transaction\nmax_client_conn = 20000\n"
                f"log_connections = 0\nlog_disconnections = 0\nlogfile = {log}\n{settings}")
    os.chmod(ini, 0o644)
    os.chmod(users, 0o644)
    cmd = ["pgbouncer", ini]
    if os.getuid() == 0:
        cmd = ["pgbouncer", "-u", "postgres", ini]
        open(log, "a").close()
        shutil.chown(log, "postgres")
    proc = subprocess.Popen(cmd)
    wait_port(port, proc)
    return proc, port


def record(text):
    """Prints a result and, unless NO_RECORD is set, adds it at the top of BENCHMARKS.md's runs."""
    print(text)
    if os.environ.get("NO_RECORD"):
        return
    path = os.path.join(ROOT, "BENCHMARKS.md")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# Benchmarks\n\nProduced by the scripts under scripts/. Newest run first below the log.\n\n"
                    "## Runs\n\n")
    marker = "## Runs\n\n"
    body = open(path).read()
    with open(path, "w") as f:
        f.write(body.replace(marker, marker + text + "\n", 1))
