"""A client that keeps sending while its session waits (here: the delay after a failed AUTH), or
that does not read its replies, is not read into memory: the server stops reading, and the
kernel's buffers fill up instead."""

import base64
import socket
import time

from tests.support.server import QUEUE_ONLY_CONFIG


def flood(sock: socket.socket, chunk: bytes, seconds: float = 1.5) -> int:
    """Send ``chunk`` again and again for ``seconds`` (at most 256 MiB); how much was sent."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and sent < 256 * 1024 * 1024:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def test_input_is_not_read_while_the_session_waits(start_server):
    config = QUEUE_ONLY_CONFIG.replace("auth_failure_delay = 0.0", "auth_failure_delay = 3.0").replace(
        'auth = ["PLAIN", "LOGIN"]', 'auth = ["PLAIN", "LOGIN"]\nauth_plaintext = true').replace(
        "require_tls = true", "require_tls = false")
    srv = start_server(config, users={"alice@example.test": "right"})
    sock = socket.create_connection(("127.0.0.1", srv.ports["submission"]), timeout=5)
    sock.recv(1024)
    sock.sendall(b"EHLO flood.example\r\n")
    time.sleep(0.3)
    sock.recv(4096)
    bad = base64.b64encode(b"\0alice@example.test\0wrong").decode()
    sock.sendall(f"AUTH PLAIN {bad}\r\n".encode())
    time.sleep(0.2)                                   # the failed AUTH now waits 3 s
    sent = flood(sock, b"NOOP\r\n" * 10922)          # 64 KiB at a time
    sock.close()
    # without back-pressure the server would have read all of it (hundreds of MiB in 1.5 s on
    # loopback); with it, only its 256 KiB limit plus what the kernel's socket buffers hold
    assert sent < 64 * 1024 * 1024, sent


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_does_not_read_its_replies_stops_being_read(start_server):
    # pipelined EHLOs, each answered with ~200 octets, and no reply read: the replies must not
    # pile up in the server's memory (the transport asks to pause writing; reading pauses)
    srv = start_server(QUEUE_ONLY_CONFIG)
    before = _rss_kib(srv.proc.pid)
    sock = socket.create_connection(("127.0.0.1", srv.ports["mx"]), timeout=5)
    sock.recv(1024)
    sent = flood(sock, b"EHLO flood.example\r\n" * 3276)   # 64 KiB at a time
    grown = _rss_kib(srv.proc.pid) - before
    sock.close()
    assert sent < 64 * 1024 * 1024, sent
    # without it the server read all it could and grew by its replies: 35 MiB in a measurement
    assert grown < 16 * 1024, f"the server grew by {grown} KiB"
    # and it goes on serving others
    with socket.create_connection(("127.0.0.1", srv.ports["mx"]), timeout=5) as other:
        assert other.recv(1024).startswith(b"220 ")
