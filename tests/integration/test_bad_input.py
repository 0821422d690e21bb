"""Bad and unusual input on the wire gets a clear ErrorResponse or a close, never a crash."""

import socket
import struct
import time

import psycopg

from test_core import read_some, read_until_ready


def connect_raw(t):
    return socket.create_connection(("127.0.0.1", t.port), timeout=5)


def startup(sock, user="postgres", db="postgres"):
    body = f"user\0{user}\0database\0{db}\0\0".encode()
    sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
    return read_until_ready(sock)


def read_all(sock, timeout=5):
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    return data


def error_fields(data):
    """The fields of the first ErrorResponse in data."""
    i = data.index(b"E")
    length = struct.unpack("!i", data[i + 1:i + 5])[0]
    fields = {}
    for part in data[i + 5:i + 1 + length].split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


def still_serving(t):
    with t.connect() as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_malformed_startup_packets(tidepool):
    t = tidepool()
    cases = [
        struct.pack("!i", -5) + b"xxxx",  # negative length
        struct.pack("!i", 3) + b"xxxx",  # shorter than its own header
        struct.pack("!ii", 8, 2 << 16),  # protocol 2
        struct.pack("!ii", 14, 196608) + b"user\0x",  # parameters without terminator
        struct.pack("!i", 5_000_000) + b"\0\3\0\0",  # huge
    ]
    for packet in cases:
        s = connect_raw(t)
        s.sendall(packet)
        data = read_all(s)
        s.close()
        fields = error_fields(data)
        assert fields["S"] == "FATAL"
        assert fields["C"] in ("08P01", "0A000", "54000"), fields
    still_serving(t)


def test_truncated_startup_then_close(tidepool):
    t = tidepool()
    s = connect_raw(t)
    s.sendall(struct.pack("!i", 100) + b"\0\3")
    s.close()
    still_serving(t)


def test_garbage_after_ssl_request(tidepool):
    t = tidepool()
    s = connect_raw(t)
    s.sendall(struct.pack("!ii", 8, 80877103))
    assert read_some(s) == b"N"
    s.sendall(b"\x16\x03\x01\x02\x00garbage-that-is-a-tls-hello")
    fields = error_fields(read_all(s))
    assert fields["C"] in ("08P01", "0A000")
    still_serving(t)


def test_message_length_that_lies(tidepool):
    t = tidepool()
    s = connect_raw(t)
    startup(s)
    s.sendall(b"Q" + struct.pack("!i", 2) + b"SELECT 1\0")
    fields = error_fields(read_all(s))
    assert fields["C"] == "08P01"
    assert "invalid message length" in fields["M"]
    still_serving(t)


def test_message_over_max_packet_size(tidepool):
    t = tidepool(settings="max_packet_size = 1024\n")
    s = connect_raw(t)
    startup(s)
    sql = b"SELECT '" + b"x" * 2000 + b"'\0"
    s.sendall(b"Q" + struct.pack("!i", 4 + len(sql)) + sql)
    fields = error_fields(read_all(s))
    assert fields["C"] == "54000"
    assert "max_packet_size" in fields["M"]
    still_serving(t)


def test_unknown_message_type_gets_the_servers_error(tidepool):
    t = tidepool()
    s = connect_raw(t)
    startup(s)
    s.sendall(b"@" + struct.pack("!i", 4))
    data = read_all(s)
    fields = error_fields(data)
    assert fields["C"] == "08P01"
    still_serving(t)


def assert_stalled_login_closed(t):
    """A client that sends one byte of its startup packet, then nothing, is closed by
    client_login_timeout (set to 1 s) with its error well within 4 s."""
    s = connect_raw(t)
    started = time.time()
    s.sendall(b"\0")
    data = read_all(s, timeout=5)
    assert time.time() - started < 4
    assert "client_login_timeout" in error_fields(data)["M"]


def test_client_login_timeout(tidepool):
    t = tidepool(settings="client_login_timeout = 1\n")
    assert_stalled_login_closed(t)
    still_serving(t)


def test_client_login_timeout_spares_logged_in_clients(tidepool):
    # The timeout is watched by a sweeper per event loop: a client leaves its watch when it has
    # logged in (as a pool client or on the admin console) and is not closed later.
    t = tidepool(settings="client_login_timeout = 1\nadmin_users = postgres\n")
    with t.connect() as c, t.connect(dbname="pgbouncer") as admin:
        time.sleep(2.5)
        assert c.execute("SELECT 1").fetchone()[0] == 1
        assert admin.execute("SHOW VERSION").fetchone() is not None
    # A client that stops half way is still closed in time after those.
    assert_stalled_login_closed(t)


def test_function_call_passes_through(tidepool):
    t = tidepool()
    s = connect_raw(t)
    startup(s)
    # FunctionCall of pg_backend_pid() (OID 2026): no arguments, text result.
    body = struct.pack("!ihhh", 2026, 0, 0, 0)
    s.sendall(b"F" + struct.pack("!i", 4 + len(body)) + body)
    data = read_until_ready(s)
    assert data[0:1] == b"V"
    length = struct.unpack("!i", data[5:9])[0]
    assert int(data[9:9 + length]) > 0
    s.sendall(b"X\0\0\0\x04")
    s.close()


def test_notifications_pass_through_in_session_mode(tidepool):
    t = tidepool(settings="pool_mode = session\n")
    with t.connect() as listener, t.connect() as sender:
        listener.execute("LISTEN tidepool_channel")
        sender.execute("NOTIFY tidepool_channel, 'hello'")
        got = next(listener.notifies(timeout=5, stop_after=1))
        assert (got.channel, got.payload) == ("tidepool_channel", "hello")


def test_no_descriptor_leak_after_bad_clients(tidepool):
    t = tidepool()
    still_serving(t)
    time.sleep(0.3)
    before = t.pid_fd_count()
    for _ in range(50):
        s = connect_raw(t)
        s.sendall(struct.pack("!i", -1))
        read_all(s, timeout=2)
        s.close()
    time.sleep(0.5)
    assert t.pid_fd_count() <= before + 2
