"""TLS on both sides, auth_file and auth_query logins (md5 and SCRAM, including SCRAM pass-through
with secrets from auth_query), auth_type = hba with each method, per-address limits, and no
secrets in logs, SHOW CONFIG or /metrics. PostgreSQL here runs with ssl = on and scram-sha-256;
the certificates are made with openssl by the fixture."""

import os
import re
import socket
import struct
import shutil
import subprocess
import tempfile
import time
import urllib.request

import psycopg
import pytest
from psycopg import errors

from conftest import LIB, Postgres, free_port, wait_for_port
from test_auth_limits import login_error
from test_core import read_until_ready

PASSWORDS = ["app-secret", "md5-secret", "auth-secret", "pw-secret", "admin-secret"]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory)


def make_cert(directory, ca, name, cn, san=None):
    """A certificate for `cn` signed by `ca`; `san` like DNS:localhost,IP:127.0.0.1."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=directory)
    ext = []
    if san:
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.ext"]
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", *ext, cwd=directory)
    os.chmod(os.path.join(directory, f"{name}.key"), 0o600)


@pytest.fixture(scope="module")
def certs():
    directory = tempfile.mkdtemp(prefix="tidepool-certs-")
    os.chmod(directory, 0o755)
    for ca in ("ca", "otherca"):
        make_ca(directory, ca)
    make_cert(directory, "ca", "pgserver", "localhost", "DNS:localhost,IP:127.0.0.1")
    make_cert(directory, "ca", "pooler", "localhost", "DNS:localhost,IP:127.0.0.1")
    make_cert(directory, "otherca", "pooler2", "localhost", "DNS:localhost,IP:127.0.0.1")
    make_cert(directory, "ca", "certuser", "certuser")
    make_cert(directory, "ca", "intruder", "someoneelse")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def run_pg(command):
    if os.getuid() == 0:
        command = f"su postgres -s /bin/sh -c \"{command}\""
    subprocess.run(["bash", "-c", f". '{LIB}'; {command}"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_pg(certs):
    """PostgreSQL with ssl = on that refuses plaintext TCP and asks for SCRAM (md5 for md5user)."""
    directory = tempfile.mkdtemp(prefix="tidepool-tlspg-")
    port = free_port()
    subprocess.run(["bash", "-c", f". '{LIB}'; start_postgres '{directory}' {port}"], check=True)
    data = os.path.join(directory, "data")
    for name in ("crt", "key"):
        shutil.copy(os.path.join(certs, f"pgserver.{name}"), os.path.join(data, f"server.{name}"))
        os.chmod(os.path.join(data, f"server.{name}"), 0o600)
        if os.getuid() == 0:
            shutil.chown(os.path.join(data, f"server.{name}"), "postgres", "postgres")
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    with open(os.path.join(data, "pg_hba.conf"), "w") as f:
        f.write("local all all trust\n"
                "hostnossl all all 127.0.0.1/32 reject\n"
                "hostssl all certuser,trustuser,rejectuser,pwuser 127.0.0.1/32 trust\n"
                "hostssl all md5user 127.0.0.1/32 md5\n"
                "hostssl all all 127.0.0.1/32 scram-sha-256\n")
    run_pg(f"\\\"$(pg_bindir)/pg_ctl\\\" -D '{data}' -l '{directory}/postgres.log' -w restart")
    server = Postgres(directory, port)
    with psycopg.connect(host=directory, port=port, dbname="postgres", user="postgres", autocommit=True) as c:
        c.execute("CREATE ROLE authuser LOGIN SUPERUSER PASSWORD 'auth-secret'")
        for role in ("certuser", "trustuser", "rejectuser", "pwuser"):
            c.execute(f"CREATE ROLE {role} LOGIN")
        server.app_verifier = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").fetchone()[0]
        server.md5_verifier = c.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5user'").fetchone()[0]
    yield server
    subprocess.run(["bash", "-c", f". '{LIB}'; stop_postgres '{directory}'"], check=False)
    shutil.rmtree(directory, ignore_errors=True)


def server_tls(certs, mode="verify-full"):
    return f"server_tls_sslmode = {mode}\nserver_tls_ca_file = {certs}/ca.crt\n"


def client_tls(certs, mode="require", cert="pooler", ca=True):
    text = (f"client_tls_sslmode = {mode}\nclient_tls_cert_file = {certs}/{cert}.crt\n"
            f"client_tls_key_file = {certs}/{cert}.key\n")
    if ca:
        text += f"client_tls_ca_file = {certs}/ca.crt\n"
    return text


def databases(pg, host="localhost"):
    return f"* = host={host} port={pg.port}"


def connect(t, user="postgres", password=None, dbname="postgres", **kw):
    extra = {"password": password} if password is not None else {}
    return psycopg.connect(host="127.0.0.1", port=t.port, dbname=dbname, user=user, autocommit=True,
                           connect_timeout=10, prepare_threshold=None, **extra, **kw)


def test_psql_with_sslmode_require_and_verify_full(tidepool, tls_pg, certs):
    t = tidepool(databases=databases(tls_pg), settings=client_tls(certs) + server_tls(certs),
                 userlist='"trustuser" ""\n', )
    for dsn in (f"host=127.0.0.1 port={t.port} dbname=postgres user=trustuser sslmode=require",
                f"host=localhost port={t.port} dbname=postgres user=trustuser sslmode=verify-full "
                f"sslrootcert={certs}/ca.crt"):
        out = subprocess.run(["psql", dsn, "-XAtc", "SELECT current_user"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "trustuser"
    # The pooler's certificate is checked by the client: a client trusting another CA refuses it.
    out = subprocess.run(["psql", f"host=localhost port={t.port} dbname=postgres user=trustuser "
                          f"sslmode=verify-full sslrootcert={certs}/otherca.crt", "-XAtc", "SELECT 1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "certificate verify failed" in out.stderr
    with connect(t, user="trustuser", sslmode="require") as c:
        assert c.pgconn.ssl_in_use
        # Tidepool's own connection to PostgreSQL is encrypted too (plaintext is refused there).
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True


def test_plaintext_client_is_refused_under_require(tidepool, tls_pg, certs):
    t = tidepool(databases=databases(tls_pg), settings=client_tls(certs) + server_tls(certs))
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="trustuser", sslmode="disable")
    assert "SSL required" in str(info.value)
    assert login_error(t, user="trustuser")[0] == "28000"  # asyncpg with ssl=False shows the code
    # Garbage sent right after SSLRequest, before the handshake, is refused.
    import socket
    import struct
    s = socket.create_connection(("127.0.0.1", t.port), timeout=5)
    s.sendall(struct.pack("!ii", 8, 80877103) + b"garbage")
    reply = s.recv(1024)
    assert reply[:1] == b"E" and b"unexpected data after SSLRequest" in reply
    s.close()


def test_server_tls_modes(tidepool, tls_pg, certs):
    # verify-full by name and by IP address (the certificate names both).
    for host in ("localhost", "127.0.0.1"):
        t = tidepool(databases=databases(tls_pg, host), settings=server_tls(certs))
        with connect(t, user="trustuser") as c:
            assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
    # require without a CA encrypts without checking.
    t = tidepool(databases=databases(tls_pg), settings="server_tls_sslmode = require\n")
    with connect(t, user="trustuser") as c:
        assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
    # verify-ca against the wrong CA, and disable against a server that refuses plaintext, fail.
    t = tidepool(databases=databases(tls_pg),
                 settings=f"server_tls_sslmode = verify-ca\nserver_tls_ca_file = {certs}/otherca.crt\n")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="trustuser").execute("SELECT 1")
    assert "server connection failed" in str(info.value)
    t = tidepool(databases=databases(tls_pg), settings="server_tls_sslmode = disable\n")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="trustuser").execute("SELECT 1")
    assert "no pg_hba.conf entry" in str(info.value) or "rejects connection" in str(info.value)


def install_pg_certificate(pg, certs, name):
    """Gives the running PostgreSQL certificate `name` and reloads it."""
    data = os.path.join(pg.dir, "data")
    for ext in ("crt", "key"):
        shutil.copy(os.path.join(certs, f"{name}.{ext}"), os.path.join(data, f"server.{ext}"))
        os.chmod(os.path.join(data, f"server.{ext}"), 0o600)
        if os.getuid() == 0:
            shutil.chown(os.path.join(data, f"server.{ext}"), "postgres", "postgres")
    run_pg(f"\\\"$(pg_bindir)/pg_ctl\\\" -D '{data}' reload")
    time.sleep(0.5)


def test_server_verify_full_checks_the_host_name(tidepool, tls_pg, certs):
    """PostgreSQL given a certificate for another name: verify-ca still connects, verify-full
    refuses, by host name and by IP address."""
    make_cert(certs, "ca", "elsewhere", "elsewhere.example", "DNS:elsewhere.example")
    install_pg_certificate(tls_pg, certs, "elsewhere")
    try:
        t = tidepool(databases=databases(tls_pg), settings=server_tls(certs, "verify-ca"))
        with connect(t, user="trustuser") as c:
            assert c.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
        for host in ("localhost", "127.0.0.1"):
            t = tidepool(databases=databases(tls_pg, host), settings=server_tls(certs, "verify-full"))
            with pytest.raises(psycopg.OperationalError) as info:
                connect(t, user="trustuser").execute("SELECT 1")
            assert "server connection failed" in str(info.value)
    finally:
        install_pg_certificate(tls_pg, certs, "pgserver")


def test_md5_and_scram_logins_from_auth_file(tidepool, tls_pg, certs):
    userlist = f'"app" "{tls_pg.app_verifier}"\n"md5user" "{tls_pg.md5_verifier}"\n'
    t = tidepool(databases=databases(tls_pg), settings="auth_type = md5\n" + server_tls(certs), userlist=userlist)
    with connect(t, user="md5user", password="md5-secret") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "md5user"
    # The auth file holds only a SCRAM verifier: the server login uses the keys from the client's proof.
    with connect(t, user="app", password="app-secret") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "app"
    for user, wrong in (("md5user", "nope"), ("app", "nope")):
        with pytest.raises(psycopg.OperationalError) as info:
            connect(t, user=user, password=wrong)
        assert "password authentication failed" in str(info.value)
        assert login_error(t, user=user, password=wrong)[0] == "28P01"


def auth_query_settings(certs, extra=""):
    return "auth_type = md5\nauth_user = authuser\n" + server_tls(certs) + extra


def test_auth_query_md5_and_scram_pass_through(tidepool, tls_pg, certs):
    # Only auth_user is in the auth file; app (SCRAM) and md5user (md5) are looked up in pg_shadow.
    t = tidepool(databases=databases(tls_pg), settings=auth_query_settings(certs),
                 userlist='"authuser" "auth-secret"\n')
    with connect(t, user="md5user", password="md5-secret") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "md5user"
    # SCRAM from auth_query: the server login must work with what the client's proof gives (the
    # case PgBouncer fails). A second client and a second server login reuse the learned keys.
    with connect(t, user="app", password="app-secret") as c1, connect(t, user="app", password="app-secret") as c2:
        c1.execute("BEGIN")
        c2.execute("BEGIN")
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in (c1, c2)}
        assert len(pids) == 2
        assert c1.execute("SELECT current_user").fetchone()[0] == "app"
        c1.execute("COMMIT")
        c2.execute("COMMIT")
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="app", password="wrong")
    assert "password authentication failed" in str(info.value)
    assert login_error(t, user="app", password="wrong")[0] == "28P01"
    assert login_error(t, user="md5user", password="wrong")[0] == "28P01"
    assert login_error(t, user="nosuchuser", password="x")[0] == "28P01"


def test_auth_query_per_database_and_a_failing_query(tidepool, tls_pg, certs):
    dbs = (f"postgres = host=localhost port={tls_pg.port} auth_user=authuser\n"
           f"broken = host=localhost port={tls_pg.port} dbname=postgres auth_user=authuser "
           f"auth_query='SELECT usename FROM pg_shadow WHERE usename=$1'\n")
    t = tidepool(databases=dbs, settings="auth_type = scram-sha-256\n" + server_tls(certs),
                 userlist='"authuser" "auth-secret"\n')
    with connect(t, user="app", password="app-secret") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="app", password="app-secret", dbname="broken")
    assert "authentication lookup failed" in str(info.value)
    assert "auth_query" in t.log()


def test_hba_methods(tidepool, tls_pg, certs):
    hba = os.path.join(certs, "hba.conf")
    with open(hba, "w") as f:
        f.write("# auth_hba_file for the test\n"
                "host all trustuser 127.0.0.1/32 trust\n"
                "host all rejectuser all reject\n"
                "host all md5user 127.0.0.1/32 md5\n"
                "host all app 127.0.0.1/32 scram-sha-256\n"
                "host all pwuser 127.0.0.1 255.255.255.255 password\n"
                "hostssl all certuser 127.0.0.1/32 cert\n")
    userlist = (f'"app" "{tls_pg.app_verifier}"\n"md5user" "{tls_pg.md5_verifier}"\n"pwuser" "pw-secret"\n'
                f'"certuser" ""\n"trustuser" ""\n"rejectuser" ""\n')
    t = tidepool(databases=databases(tls_pg),
                 settings=f"auth_type = hba\nauth_hba_file = {hba}\n" + server_tls(certs)
                 + client_tls(certs, mode="prefer"), userlist=userlist)
    with connect(t, user="trustuser", sslmode="disable") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "trustuser"
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="rejectuser", sslmode="disable")
    assert "rejected by auth_hba_file line 3" in str(info.value)
    for user, password in (("md5user", "md5-secret"), ("app", "app-secret"), ("pwuser", "pw-secret")):
        with connect(t, user=user, password=password, sslmode="disable") as c:
            assert c.execute("SELECT current_user").fetchone()[0] == user
        with pytest.raises(psycopg.OperationalError) as info:
            connect(t, user=user, password="wrong", sslmode="disable")
        assert "password authentication failed" in str(info.value)
    # cert: a verified client certificate whose CN is the user; nothing else will do.
    with connect(t, user="certuser", sslmode="require", sslcert=f"{certs}/certuser.crt",
                 sslkey=f"{certs}/certuser.key") as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "certuser"
    for kw in ({"sslmode": "require"},
               {"sslmode": "require", "sslcert": f"{certs}/intruder.crt", "sslkey": f"{certs}/intruder.key"}):
        with pytest.raises(psycopg.OperationalError) as info:
            connect(t, user="certuser", **kw)
        assert "certificate authentication failed" in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="certuser", sslmode="disable")
    assert "no auth_hba_file entry" in str(info.value) and "SSL off" in str(info.value)
    with pytest.raises(psycopg.OperationalError) as info:
        connect(t, user="unlisted", sslmode="disable")
    assert "no auth_hba_file entry" in str(info.value)


def test_client_certificates_reload_on_reload(tidepool, tls_pg, certs):
    work = tempfile.mkdtemp(prefix="tidepool-reload-certs-")
    for name in ("crt", "key"):
        shutil.copy(os.path.join(certs, f"pooler.{name}"), os.path.join(work, f"live.{name}"))
    t = tidepool(databases=databases(tls_pg),
                 settings=f"admin_users = postgres\nclient_tls_sslmode = require\nclient_tls_cert_file = {work}/live.crt\n"
                 f"client_tls_key_file = {work}/live.key\n" + server_tls(certs))

    def verified_by(ca):
        dsn = f"host=localhost port={t.port} dbname=postgres user=trustuser sslmode=verify-full sslrootcert={certs}/{ca}.crt"
        return subprocess.run(["psql", dsn, "-XAtc", "SELECT 1"], capture_output=True, timeout=30).returncode == 0

    assert verified_by("ca") and not verified_by("otherca")
    for name in ("crt", "key"):
        shutil.copy(os.path.join(certs, f"pooler2.{name}"), os.path.join(work, f"live.{name}"))
    with connect(t, dbname="pooler", user="postgres") as admin:
        admin.execute("RELOAD")
    assert verified_by("otherca") and not verified_by("ca")
    # A certificate that cannot be read refuses RELOAD and SET, and the one in force stays.
    with open(os.path.join(work, "live.crt"), "w") as f:
        f.write("not a certificate")
    with connect(t, dbname="pooler", user="postgres") as admin:
        with pytest.raises(psycopg.Error, match="RELOAD rejected"):
            admin.execute("RELOAD")
        with pytest.raises(psycopg.Error, match="certificate"):
            admin.execute(f"SET client_tls_cert_file = '{certs}/missing.crt'")
    assert verified_by("otherca")
    shutil.rmtree(work, ignore_errors=True)


def test_per_address_connection_and_rate_limits(tidepool, pg):
    t = tidepool(settings="max_client_conn_per_ip = 3\n")
    held = [t.connect() for _ in range(3)]
    with pytest.raises(psycopg.OperationalError) as info:
        t.connect()
    assert "too many connections from this address" in str(info.value)
    assert "max_client_conn_per_ip" in t.log()
    held.pop().close()
    time.sleep(0.2)
    held.append(t.connect())
    for c in held:
        c.close()
    t = tidepool(settings="client_connect_rate_per_ip = 5\n")
    refused = 0
    started = time.time()
    for _ in range(8):
        try:
            t.connect().close()
        except psycopg.OperationalError as e:
            assert "connecting too fast" in str(e)
            refused += 1
    assert time.time() - started < 1 and refused >= 1
    time.sleep(1.1)
    t.connect().close()


def test_no_secret_in_logs_show_config_or_metrics(tidepool, tls_pg, certs):
    port = free_port()
    userlist = (f'"authuser" "auth-secret"\n"pwuser" "pw-secret"\n"md5user" "{tls_pg.md5_verifier}"\n'
                '"postgres" "admin-secret"\n')
    t = tidepool(databases=databases(tls_pg) + " password=auth-secret user=authuser",
                 settings=auth_query_settings(certs, f"stats_listen_port = {port}\nverbose = 2\nadmin_users = postgres\n"),
                 userlist=userlist)
    with connect(t, user="app", password="app-secret") as c:
        c.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        connect(t, user="app", password="pw-secret")
    with connect(t, dbname="pooler", user="postgres", password="admin-secret") as admin:
        config = str(admin.execute("SHOW CONFIG").fetchall())
        config += str(admin.execute("SHOW DATABASES").fetchall())
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for where, text in (("log", t.log()), ("SHOW CONFIG", config), ("metrics", metrics)):
        for secret in PASSWORDS + [tls_pg.md5_verifier, tls_pg.app_verifier.split("$")[-1]]:
            assert secret not in text, f"{secret} in {where}"


def test_client_tls_protocols(tidepool, tls_pg, certs):
    t = tidepool(databases=databases(tls_pg), settings=client_tls(certs) + "client_tls_protocols = tlsv1.3\n"
                 + server_tls(certs))

    def psql(max_version):
        dsn = (f"host=127.0.0.1 port={t.port} dbname=postgres user=trustuser sslmode=require "
               f"ssl_max_protocol_version={max_version}")
        return subprocess.run(["psql", dsn, "-XAtc", "SHOW server_version"], capture_output=True, text=True,
                              timeout=30)

    assert psql("TLSv1.3").returncode == 0
    refused = psql("TLSv1.2")
    assert refused.returncode != 0 and "protocol" in refused.stderr.lower()


def test_client_tls_protocols_down_to_tls_1_1(tidepool, tls_pg, certs):
    """PgBouncer's older versions are offered when named: TLS 1.1 alone, and TLS 1.3 then refused."""
    t = tidepool(databases=databases(tls_pg), settings=client_tls(certs) + "client_tls_protocols = tlsv1.1\n"
                 + server_tls(certs))

    def handshake(version):
        return subprocess.run(["openssl", "s_client", "-starttls", "postgres", "-connect", f"127.0.0.1:{t.port}",
                               version, "-cipher", "DEFAULT@SECLEVEL=0"],
                              input="", capture_output=True, text=True, timeout=30)

    offered = handshake("-tls1_1")
    assert re.search(r"Protocol *: TLSv1.1\b", offered.stdout), offered.stdout + offered.stderr
    assert handshake("-tls1_3").returncode != 0


def test_check_validates_certificates_and_hba_file(tmp_path, certs):
    from conftest import BINARY
    base = f"[databases]\n* = host=127.0.0.1\n[pooler]\nlisten_port = 6432\n"
    good = tmp_path / "good.ini"
    good.write_text(base + client_tls(certs) + f"auth_type = hba\nauth_hba_file = {certs}/hba.conf\n")
    (tmp_path / "x").write_text("")
    with open(f"{certs}/hba.conf", "w") as f:
        f.write("host all all 127.0.0.1/32 md5\n")
    out = subprocess.run([BINARY, "--check", str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for bad, wanted in ((client_tls(certs).replace("pooler.crt", "missing.crt"), "certificate"),
                        ("auth_type = hba\n", "auth_hba_file"),
                        (f"auth_type = hba\nauth_hba_file = {tmp_path}/x.conf\n", "cannot read")):
        ini = tmp_path / "bad.ini"
        ini.write_text(base + bad)
        out = subprocess.run([BINARY, "--check", str(ini)], capture_output=True, text=True)
        assert out.returncode == 1 and wanted in out.stderr, out.stderr
    hba = tmp_path / "broken.conf"
    hba.write_text("host all all 10.0.0.0/99 md5\n")
    ini = tmp_path / "bad.ini"
    ini.write_text(base + f"auth_type = hba\nauth_hba_file = {hba}\n")
    out = subprocess.run([BINARY, "--check", str(ini)], capture_output=True, text=True)
    assert out.returncode == 1 and "broken.conf:1" in out.stderr, out.stderr


def test_client_tls_ecdhcurve(tidepool, tls_pg, certs):
    """client_tls_ecdhcurve names the one curve offered: a client that has only that one gets in,
    one that has only another does not."""
    t = tidepool(databases=databases(tls_pg), settings=client_tls(certs) + "client_tls_ecdhcurve = secp384r1\n"
                 + server_tls(certs))

    def handshake(group):
        return subprocess.run(["openssl", "s_client", "-starttls", "postgres", "-connect", f"127.0.0.1:{t.port}",
                               "-groups", group], input="", capture_output=True, text=True, timeout=30)

    agreed = handshake("secp384r1")
    assert re.search(r"(Server Temp Key|Negotiated TLS1.3 group): .*(P-384|secp384r1)", agreed.stdout), \
        agreed.stdout + agreed.stderr
    assert handshake("X25519").returncode != 0


@pytest.mark.parametrize("session_state", ["track", "ignore"])
def test_a_client_cannot_replace_another_clients_prepared_statement(tidepool, session_state):
    """Issue 31: the pooler's server-side statement names are visible in pg_prepared_statements;
    a client that deallocated one and prepared its own under that name made every other client's
    Bind of the statement return its rows. SQL naming them is refused (42939)."""
    t = tidepool(settings=f"pool_mode = transaction\ndefault_pool_size = 1\nsession_state = {session_state}\n")
    with t.connect(prepare_threshold=0) as victim, t.connect() as attacker:
        assert victim.execute("SELECT %s::text AS v", ("mine",)).fetchall() == [("mine",)]
        names = [r[0] for r in attacker.execute("SELECT name FROM pg_prepared_statements").fetchall()]
        assert names and all(n.startswith("tidepool_") for n in names)
        for name in names:
            for sql in (f"DEALLOCATE {name}", f'DEALLOCATE PREPARE "{name}"', f"EXECUTE {name}('x')",
                        f"PREPARE {name} AS SELECT 'POISONED'::text AS v"):
                with pytest.raises(psycopg.Error) as refused:
                    attacker.execute(sql)
                assert refused.value.sqlstate == "42939", sql
        for sql in (f"SELECT 1; DEALLOCATE {names[0]}", f"select 1;\n/* c */ PREPARE {names[0].upper()} AS SELECT 2"):
            with pytest.raises(psycopg.Error) as refused:
                attacker.execute(sql)
            assert refused.value.sqlstate == "42939", sql
        for _ in range(3):
            assert victim.execute("SELECT %s::text AS v", ("mine",)).fetchall() == [("mine",)]


def test_console_errors_name_a_file_but_show_none_of_it(tidepool, tmp_path):
    """Issue 31: SET auth_hba_file = '/etc/shadow' answered with the file's first line, and NUL bytes
    in a file forged ErrorResponse fields. Errors now name the file and line only."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:$6$SECRETHASH:19000:0:99999:7:::\x00Cforged\x00\n")
    t = tidepool(settings="admin_users = postgres\n")
    with psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user="postgres",
                         autocommit=True) as admin:
        for key in ("auth_hba_file", "auth_ident_file"):
            with pytest.raises(psycopg.Error) as refused:
                admin.execute(f"SET {key} = '{secret}'")
            text = str(refused.value) + repr(refused.value.diag.message_detail) + repr(refused.value.diag.message_hint)
            assert "SECRETHASH" not in text and "forged" not in text, text
            assert str(secret) in str(refused.value) or "line" in str(refused.value), text


def test_an_hba_rule_for_one_console_name_is_a_rule_for_both(tidepool, tmp_path):
    """Issue 31: a reject line for database pgbouncer did not stop the same console as `pooler`."""
    hba = tmp_path / "hba.conf"
    hba.write_text("host pgbouncer all 127.0.0.1/32 reject\nhost all all 127.0.0.1/32 trust\n")
    t = tidepool(settings=f"auth_type = hba\nauth_hba_file = {hba}\nadmin_users = postgres\n")
    for name in ("pgbouncer", "pooler"):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(host="127.0.0.1", port=t.port, dbname=name, user="postgres", connect_timeout=5)
        assert "rejected" in str(info.value), name
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_admin_users_reach_the_console_at_max_client_conn(tidepool):
    """Issue 31: at max_client_conn the console refused admin_users too, over TCP and the Unix
    socket; PgBouncer lets them in. A small reserve is kept for them, and only for them."""
    t = tidepool(settings="max_client_conn = 3\nadmin_users = postgres\n")
    held = [t.connect() for _ in range(3)]
    try:
        with pytest.raises(psycopg.OperationalError) as full:
            t.connect()
        assert "max_client_conn" in str(full.value)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=t.port, dbname="pgbouncer", user="app", connect_timeout=5)
        for host in ("127.0.0.1", str(t.dir)):
            with psycopg.connect(host=host, port=t.port, dbname="pgbouncer", user="postgres", autocommit=True,
                                 connect_timeout=5) as admin:
                assert admin.execute("SHOW VERSION").fetchone()
    finally:
        for c in held:
            c.close()


def test_a_newline_in_a_name_cannot_forge_a_log_line(tidepool):
    """Issue 31: a newline in a user or database name started a log line of the client's making."""
    t = tidepool(settings="log_connections = 1\n")
    forged = "FORGED LOG pooler error: everything is fine"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=t.port, dbname="nodb\n" + forged, user="u\n" + forged,
                        connect_timeout=5)
    time.sleep(0.3)
    lines = t.log().splitlines()
    assert any("FORGED" in line for line in lines), "the attempt is logged"
    assert not any(line.startswith("FORGED") for line in lines), lines[-5:]


def test_the_stats_port_does_not_hold_half_sent_requests(tidepool):
    """Issue 31: 100 half-sent requests were held 70 s and more, on the clients' descriptor budget.
    The stats port now takes at most 64 connections and closes one whose request has not come
    whole within 10 s."""
    port = free_port()
    t = tidepool(settings=f"stats_listen_port = {port}\n")
    wait_for_port(port)
    import socket
    held = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        held.append(s)

    def open_count():
        alive = 0
        for s in held:
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    time.sleep(1)
    assert open_count() <= 64
    with t.connect() as c:  # the pooler's own clients are not starved
        assert c.execute("SELECT 1").fetchone()[0] == 1
    deadline = time.time() + 20
    while time.time() < deadline and open_count() > 0:
        time.sleep(0.5)
    assert open_count() == 0
    for s in held:
        s.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/live", timeout=5) as r:
        assert r.status == 200


def test_a_tls_handshake_stalled_at_client_hello_ends_at_client_login_timeout(tidepool, certs):
    """Issue 31: a client that asked for TLS and then sent no ClientHello was held past
    client_login_timeout, until the write of its error gave up."""
    import socket
    import struct
    t = tidepool(settings="client_login_timeout = 1\n" + client_tls(certs, mode="allow"))
    s = socket.create_connection(("127.0.0.1", t.port), timeout=10)
    s.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
    assert s.recv(1) == b"S"
    started = time.time()
    s.settimeout(10)
    try:
        while s.recv(1024):
            pass
    except OSError:
        pass
    held = time.time() - started
    s.close()
    assert held < 3, f"closed after {held:.1f} s"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def message(kind, body):
    return kind + struct.pack("!i", 4 + len(body)) + body


LARGE_MESSAGES = {
    # A Query whose text goes on and on; a Bind of a named statement with one huge parameter.
    "query": lambda declared: b"Q" + struct.pack("!i", declared) + b"SELECT length('",
    # An unnamed Parse of one long statement.
    "parse": lambda declared: b"P" + struct.pack("!i", declared) + b"\0SELECT length('",
    # A Query the prepared-statement tracker looks at first (d, p, e: DEALLOCATE, PREPARE, EXECUTE?).
    "delete": lambda declared: b"Q" + struct.pack("!i", declared) + b"  DELETE FROM nowhere WHERE x = '",
    "bind": lambda declared: (message(b"P", b"s\0SELECT $1\0" + struct.pack("!hi", 1, 25))
                              + b"B" + struct.pack("!i", declared) + b"\0s\0" + struct.pack("!hhi", 0, 1, declared - 17)),
}


@pytest.mark.parametrize("settings,message", [
    ("", "query"),
    ("", "bind"),
    ("", "delete"),
    ("", "parse"),
    ("session_state = ignore\n", "parse"),
    ("session_state = ignore\n", "query"),
    ("pool_mode = session\n", "query"),
    ("max_prepared_statements = 0\n", "query"),
])
def test_a_large_message_goes_through_as_it_arrives(tidepool, settings, message):
    """Issue 31 (item 4): a client that declares a message of 900 MB and sends 192 MB of it costs
    the pooler a bounded buffer, not every byte: past what a decision needs, the message goes to
    the server as it comes (PgBouncer: +0)."""
    t = tidepool(settings=settings)
    declared = 900 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", t.port))
    body = f"user\0postgres\0database\0postgres\0\0".encode()
    sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    read_until_ready(sock)
    before = rss_kib(t.proc.pid)
    sock.sendall(LARGE_MESSAGES[message](declared))
    chunk = b"x" * (1024 * 1024)
    for _ in range(192):
        sock.sendall(chunk)
    time.sleep(0.5)
    grown = rss_kib(t.proc.pid) - before
    sock.close()
    assert grown < 48 * 1024, f"the pooler grew by {grown} KiB while 192 MiB of one message went through"
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def protocol_answers(port, name):
    """Close, Describe and Bind of statement `name` over the extended protocol, each with its
    Sync: the message types and SQLSTATEs that come back, as a client sees them."""
    sock = socket.create_connection(("127.0.0.1", port))
    body = b"user\0postgres\0database\0postgres\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    read_until_ready(sock)
    raw = name.encode() + b"\0"
    seen = []
    for request in (message(b"C", b"S" + raw), message(b"D", b"S" + raw),
                    message(b"B", b"\0" + raw + struct.pack("!hhh", 0, 0, 0)) + message(b"E", b"\0" + struct.pack("!i", 0))):
        sock.sendall(request + message(b"S", b""))
        data = read_until_ready(sock)
        while data:
            kind, length = data[:1], struct.unpack("!i", data[1:5])[0]
            payload = data[5:1 + length]
            if kind == b"E":
                fields = dict((f[:1], f[1:].decode()) for f in payload.split(b"\0") if f)
                seen.append(("E", fields[b"C"], name in fields[b"M"]))
            else:
                seen.append(kind.decode())
            data = data[1 + length:]
    sock.close()
    return seen


def test_the_pooler_s_statements_are_out_of_reach_of_the_protocol_too(pg, tidepool):
    """Issue 31 (item 2): a client that Closes, Describes or Binds one of the pooler's statements
    by the name pg_prepared_statements shows is answered as PostgreSQL answers a session that
    does not have that statement (Close: nothing happens; the others: 26000, with the name the
    client used), and the statement stays for the client it belongs to."""
    t = tidepool(settings="pool_mode = transaction\ndefault_pool_size = 1\n")
    with t.connect(prepare_threshold=0) as victim, t.connect() as attacker:
        assert victim.execute("SELECT %s::text AS v", ("mine",)).fetchall() == [("mine",)]
        names = [r[0] for r in attacker.execute("SELECT name FROM pg_prepared_statements").fetchall()]
        assert names
        for name in names:
            answers = protocol_answers(t.port, name)
            assert answers == protocol_answers(pg.port, name)
            assert answers == ["3", "Z", ("E", "26000", True), "Z", ("E", "26000", True), "Z"]
        for _ in range(3):
            assert victim.execute("SELECT %s::text AS v", ("mine",)).fetchall() == [("mine",)]
