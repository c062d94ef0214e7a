"""Nothing acknowledged with 250 is lost when the server dies: SIGKILL right after the reply.

The real server runs as a child process. A client sends mail and reads the 250 after DATA; the
server is killed with SIGKILL at once (no chance to flush anything), restarted, and killed again,
for several rounds. Then every queue id the client was given must be in the queue with its
envelope and its data byte for byte. A second test kills the server once while many clients
send concurrently: every id any client saw before the kill is present after the restart.
"""

from __future__ import annotations

import hashlib
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from relaywarden.queue.store import SqliteQueue
from tests.support.server import RelayServer
from tests.support.smtp import SmtpConn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
anonymous = true

[[domain]]
name = "example.test"
kind = "authoritative"

[[mailbox]]
address = "postmaster@example.test"

[[mailbox]]
address = "alice@example.test"

[[route]]
name = "default"
domains = ["*"]
kind = "mx"

# the queue keeps what was acknowledged (no local delivery takes it out before we look)
[delivery]
enabled = false
"""

ROUNDS = 10
QUEUED = re.compile(r"^250 2\.0\.0 .*queued as ([0-9a-f]+)")
RECIPIENTS = ("postmaster@example.test", "alice@example.test")


def body_for(tag: str) -> bytes:
    """A message of 1-17 KiB whose every line depends on ``tag``; no line starts with a dot."""
    seed = hashlib.sha256(tag.encode()).digest()
    lines = [f"Subject: crash test {tag}", f"Message-ID: <{seed.hex()[:24]}@client.example.org>", ""]
    for i in range(16 + seed[0] * 4):
        lines.append(f"{i:05d} " + hashlib.sha256(seed + i.to_bytes(4, "big")).hexdigest())
    return ("\r\n".join(lines) + "\r\n").encode()


def send_one(conn: SmtpConn, sender: str, recipient: str, body: bytes) -> str:
    """One transaction on an open, greeted connection; returns the queue id from the 250."""
    for line, code in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{recipient}>", 250), ("DATA", 354)):
        r = conn.cmd(line)
        assert r.code == code, f"{line} -> {r}"
    conn.send(body + b".\r\n")
    reply = conn.reply()
    m = QUEUED.match(reply.last)
    assert m, f"end of DATA -> {reply}"
    return m.group(1)


def sigkill(srv: RelayServer) -> None:
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    assert srv.proc.returncode == -signal.SIGKILL


def assert_all_queued(data_dir: Path, acknowledged: dict[str, tuple[str, str, bytes]]) -> None:
    with SqliteQueue(data_dir / "queue.sqlite") as q:
        for queue_id, (sender, recipient, body) in acknowledged.items():
            stored = q.get(queue_id)
            assert stored is not None, f"acknowledged {queue_id} is not in the queue"
            assert stored.sender == sender
            assert [r.address for r in stored.recipients] == [recipient]
            data = q.message_data(queue_id)
            assert data is not None and data.startswith(b"Received: from "), queue_id
            assert data.endswith(body), f"{queue_id}: data differs from what was sent"
            assert stored.size == len(data)


def test_sigkill_right_after_each_250_loses_nothing(tmp_path: Path) -> None:
    srv = RelayServer(CONFIG, tmp_path / "srv")
    acknowledged: dict[str, tuple[str, str, bytes]] = {}
    try:
        for round_no in range(ROUNDS):
            srv.start()
            with SmtpConn(srv.ports["mx"]) as conn:
                assert conn.cmd("EHLO crash.client.example.org").code == 250
                # 1 to 3 messages on the connection; the kill follows the last 250 immediately
                for n in range(1 + round_no % 3):
                    sender = f"sender{round_no}.{n}@client.example.org"
                    recipient = RECIPIENTS[(round_no + n) % 2]
                    body = body_for(f"{round_no}/{n}")
                    queue_id = send_one(conn, sender, recipient, body)
                    acknowledged[queue_id] = (sender, recipient, body)
                sigkill(srv)
        assert len(acknowledged) == sum(1 + r % 3 for r in range(ROUNDS))
        assert_all_queued(srv.data_dir, acknowledged)
        # and the server starts on that queue and keeps accepting
        srv.start()
        with SmtpConn(srv.ports["mx"]) as conn:
            assert conn.cmd("EHLO crash.client.example.org").code == 250
            body = body_for("after")
            acknowledged[send_one(conn, "after@client.example.org", RECIPIENTS[0], body)] = (
                "after@client.example.org", RECIPIENTS[0], body)
        assert srv.stop() == 0
        assert_all_queued(srv.data_dir, acknowledged)
    finally:
        srv.kill()


CLIENTS = 12
KILL_AFTER = 150          # acknowledgements (all clients together) before the SIGKILL
PER_CLIENT_MAX = 200      # each client stops by itself if the server is never killed


def test_sigkill_among_concurrent_clients_loses_nothing(tmp_path: Path) -> None:
    srv = RelayServer(CONFIG, tmp_path / "srv").start()
    acknowledged: dict[str, tuple[str, str, bytes]] = {}
    lock = threading.Lock()
    enough = threading.Event()
    errors: list[str] = []

    def client(no: int) -> None:
        try:
            with SmtpConn(srv.ports["mx"], timeout=20) as conn:
                if conn.cmd(f"EHLO c{no}.client.example.org").code != 250:
                    return
                for seq in range(PER_CLIENT_MAX):
                    sender = f"c{no}.{seq}@client.example.org"
                    recipient = RECIPIENTS[seq % 2]
                    body = body_for(f"c{no}/{seq}")
                    queue_id = send_one(conn, sender, recipient, body)
                    with lock:
                        acknowledged[queue_id] = (sender, recipient, body)
                        if len(acknowledged) >= KILL_AFTER:
                            enough.set()
        except (OSError, ConnectionError):
            return   # the server died under this client: what it was not told about may be lost
        except AssertionError as exc:
            with lock:
                errors.append(f"client {no}: {exc}")

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        assert enough.wait(120), f"only {len(acknowledged)} acknowledgements; errors {errors}"
        sigkill(srv)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=max(1.0, 30 - (time.monotonic() - killed_at)))
        assert not any(t.is_alive() for t in threads), "a client hung after the server died"
        # 421 or a torn reply to a client is fine; a malformed 250 is not
        assert not [e for e in errors if "end of DATA" in e and "250" in e], errors
        with lock:
            seen = dict(acknowledged)
        assert len(seen) >= KILL_AFTER
        srv.start()
        assert_all_queued(srv.data_dir, seen)
        assert srv.stop() == 0
    finally:
        srv.kill()
