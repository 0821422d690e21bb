"""Unix socket peers (SO_PEERCRED): the pooler's own OS user reaches the console as `pgbouncer`
without a password, and the HBA `peer` method with auth_ident_file maps."""

import getpass
import os
import subprocess

import psycopg
import pytest


def as_postgres_os_user(t, user, dbname, sql):
    """psql over the Unix socket run as the `postgres` OS user; (exit code, output)."""
    cmd = (f"psql -X -h {t.dir} -p {t.port} -U {user} -d {dbname} -w -At -c \"{sql}\"")
    out = subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", cmd], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    return out.returncode, out.stdout + out.stderr


def other_os_user_available():
    return os.getuid() == 0 and getpass.getuser() != "postgres"


def test_the_poolers_own_user_reaches_the_console_as_pgbouncer_over_the_socket(tidepool, tmp_path):
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text('"admin" "secret"\n')
    t = tidepool(settings=f"auth_type = md5\nauth_file = {auth_file}\nadmin_users = admin\n")
    os.chmod(t.dir, 0o755)
    with psycopg.connect(host=str(t.dir), port=t.port, user="pgbouncer", dbname="pgbouncer",
                         autocommit=True) as console:
        assert console.execute("SHOW VERSION").fetchone()[0].startswith("Tidepool")
        console.execute("RECONNECT")  # an admin, not only a stats user
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=t.port, user="pgbouncer", dbname="pgbouncer", password="x")
    if other_os_user_available():
        code, output = as_postgres_os_user(t, "pgbouncer", "pgbouncer", "SHOW VERSION")
        assert code != 0 and "Tidepool" not in output, output


def test_hba_peer_with_an_ident_map(tidepool, tmp_path):
    me = getpass.getuser()
    hba = tmp_path / "hba.conf"
    hba.write_text("local all postgres peer map=staff\nlocal all all peer\nhost all all 0.0.0.0/0 reject\n")
    ident = tmp_path / "ident.conf"
    ident.write_text(f"staff {me} postgres\nstaff /^(pg)-robot$ postgres\n")
    t = tidepool(settings=f"auth_type = hba\nauth_hba_file = {hba}\nauth_ident_file = {ident}\n")
    os.chmod(t.dir, 0o755)
    with psycopg.connect(host=str(t.dir), port=t.port, user="postgres", dbname="postgres", autocommit=True) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "postgres"
    # Not mapped, and not the OS user's own name.
    with pytest.raises(psycopg.OperationalError, match='Peer authentication failed for user "alice"'):
        psycopg.connect(host=str(t.dir), port=t.port, user="alice", dbname="postgres")
    # Over TCP the peer method does not apply: the host line rejects.
    with pytest.raises(psycopg.OperationalError, match="rejected"):
        psycopg.connect(host="127.0.0.1", port=t.port, user="postgres", dbname="postgres")
    if other_os_user_available():
        # The postgres OS user is not in the map for the database user postgres.
        code, output = as_postgres_os_user(t, "postgres", "postgres", "SELECT 1")
        assert code != 0 and 'Peer authentication failed for user "postgres"' in output, output
