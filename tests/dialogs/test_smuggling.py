"""SMTP smuggling (CVE-2023-51764 family) and STARTTLS command injection (CVE-2011-0411) over real
sockets.

Each end-of-data variant is sent inside one message, followed by a smuggled transaction
(``MAIL FROM:<evil@...>``, ``RCPT TO:``, ``DATA``, a spoofed message) and finally the real
``CRLF . CRLF``, which a vulnerable server would read as the end of the smuggled message.  The
server must answer the whole DATA with exactly one ``550 5.6.11``, queue nothing, run none of the
smuggled commands (the next reply is the one to our NOOP), and log SMUGGLING_REFUSED (1106).
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from relaywarden.queue.store import SqliteQueue
from tests.support.server import DEFAULT_CONFIG, RelayServer
from tests.support.smtp import SmtpConn, queued_id

EVIL = "evil@attacker.example.net"
SMUGGLED_RCPT = "a.lice@example.test"
MARKER = b"SMUGGLED-BODY-7f3a"
SMUGGLED = (f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<{SMUGGLED_RCPT}>\r\nDATA\r\n"
            "From: ceo@example.test\r\nSubject: urgent wire transfer\r\n\r\n").encode() + MARKER
REAL_END = b"\r\n.\r\n"
# The shared test configuration, with delivery off: what is queued stays in the queue to be read.
CONFIG = DEFAULT_CONFIG + "\n[delivery]\nenabled = false\n"

END_OF_DATA_VARIANTS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\n.\r", id="LF.CR"),
    pytest.param(b"\r.\n", id="CR.LF"),
    pytest.param(b"\r\n\n.\r\n", id="CRLF-LF.CRLF"),
    pytest.param(b"\n\r.\r\n", id="LF-CR.CRLF"),
    pytest.param(b"\r\n.\r\r\n", id="CRLF.CR-CRLF"),
    pytest.param(b"\r\n.\n\r\n", id="CRLF.LF-CRLF"),
    # NUL is refused in message data: a next hop that drops NUL (as many do) would read CRLF.CRLF
    pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
    pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL-CRLF"),
]


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smtp_server(tmp_path_factory, cert_files):
    srv = RelayServer(CONFIG, tmp_path_factory.mktemp("smuggling") / "srv", cert=cert_files[0], key=cert_files[1])
    srv.start()
    yield srv
    srv.stop()


def queue_bodies(srv: RelayServer) -> dict[str, bytes]:
    """Queue id -> stored message data, for every message in the server's queue."""
    with SqliteQueue(srv.data_dir / "queue.sqlite") as q:
        listing = q.due(time.time() + 10**9, 10_000)
        assert q.count() == len(listing)
        return {qid: q.message_data(qid) or b"" for qid, _ in listing}


def session_events(srv: RelayServer, helo: str) -> list[dict]:
    """Every event of the (closed) session that said EHLO ``helo``."""
    summary = srv.wait_for_event(lambda e: e["name"] == "SESSION_SUMMARY"
                                 and e["fields"].get("helo") == helo, timeout=10)
    return [e for e in srv.events() if e.get("session") == summary["session"]]


def open_transaction(c: SmtpConn, helo: str) -> None:
    assert c.cmd(f"EHLO {helo}").code == 250
    assert c.cmd("MAIL FROM:<sender@example.org>").last.startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<alice@example.test>").last.startswith("250 2.1.5")


def assert_nothing_pending(c: SmtpConn) -> None:
    """QUIT is answered next and the connection closes with no other byte from the server."""
    r = c.cmd("QUIT")
    assert r.last.startswith("221 2.0.0"), r
    assert c.closed_by_peer(5.0)
    assert c.buf == b"", f"unexpected replies after QUIT: {c.buf!r}"


def assert_refused_alone(srv: RelayServer, helo: str, before: dict[str, bytes]) -> None:
    """Nothing queued, one SMUGGLING_REFUSED, no smuggled command decided in the session."""
    assert queue_bodies(srv).keys() == before.keys()
    events = session_events(srv, helo)
    refused = [e for e in events if e["id"] == 1106]
    assert len(refused) == 1, events
    assert refused[0]["name"] == "SMUGGLING_REFUSED"
    assert not [e for e in events if e["fields"].get("recipient") == SMUGGLED_RCPT
                or e["fields"].get("sender") == EVIL], events
    summary = [e for e in events if e["name"] == "SESSION_SUMMARY"][0]
    assert summary["fields"]["messages"] == 0 and summary["fields"]["accepted"] == 1, summary


# --- DATA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", END_OF_DATA_VARIANTS)
def test_smuggled_end_of_data_is_refused_once(smtp_server, variant, request):
    helo = f"smuggle-{request.node.callspec.id.lower().replace('.', '-').replace('_', '-')}.example.net"
    payload = b"Subject: hello\r\n\r\nfirst line" + variant + SMUGGLED + REAL_END
    # The variant must not be a real CRLF.CRLF: the message has exactly one end.
    assert (b"\r\n" + payload).count(REAL_END) == 1
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, helo)
        assert c.cmd("DATA").code == 354
        c.send(payload)
        r = c.reply()
        expected = "550 5.6.0 Message refused: NUL" if b"\x00" in variant else "550 5.6.11 Message refused: bare"
        assert r.last.startswith(expected), r
        # Had a smuggled command run, its reply would come before the NOOP's.
        assert c.cmd("NOOP").last == "250 2.0.0 OK"
        assert c.cmd("RCPT TO:<alice@example.test>").code == 503   # the transaction is over
        assert_nothing_pending(c)
    assert_refused_alone(smtp_server, helo, before)
    assert not any(MARKER in body for body in queue_bodies(smtp_server).values())


@pytest.mark.parametrize(("name", "body"), [
    ("bare-lf-in-line", b"Subject: a\r\n\r\nline one\nline two\r\n"),
    ("bare-cr-in-line", b"Subject: a\r\n\r\nline one\rline two\r\n"),
    ("bare-lf-in-header", b"Subject: a\nX-Injected: yes\r\n\r\nbody\r\n"),
    ("bare-cr-before-crlf", b"Subject: a\r\n\r\nbody\r\r\n"),
    ("dot-lf-first-line", b".\n" + SMUGGLED + b"\r\n"),
    ("lf-only-message", b"Subject: a\n\nbody\n"),
    ("crlf-cr-crlf", b"Subject: a\r\n\r\nbody\r\n\r\r\n"),
])
def test_bare_line_endings_inside_lines_are_refused(smtp_server, name, body):
    helo = f"bare-{name}.example.net"
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, helo)
        assert c.cmd("DATA").code == 354
        c.send(body + REAL_END)
        assert c.reply().last.startswith("550 5.6.11"), name
        assert c.cmd("NOOP").last == "250 2.0.0 OK"
        assert_nothing_pending(c)
    assert_refused_alone(smtp_server, helo, before)


def test_clean_message_with_dot_stuffing_is_accepted(smtp_server):
    """The control: CRLF everywhere and a stuffed dot line is one message, stored unstuffed."""
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, "clean.example.net")
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: clean\r\n\r\n..leading dot\r\n.\r\n")
        r = c.reply()
        assert r.code == 250, r
        qid = queued_id(r)
        c.cmd("QUIT")
    assert queue_bodies(smtp_server)[qid].endswith(b"\r\n\r\n.leading dot\r\n")


def test_smuggling_refusal_resets_only_the_transaction(smtp_server):
    """After the 550 the client can send a clean message in the same session."""
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, "again.example.net")
        assert c.cmd("DATA").code == 354
        c.send(b"x\n.\n" + SMUGGLED + REAL_END)
        assert c.reply().last.startswith("550 5.6.11")
        assert c.cmd("MAIL FROM:<sender@example.org>").code == 250
        assert c.cmd("RCPT TO:<alice@example.test>").code == 250
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: second\r\n\r\nfine\r\n.\r\n")
        r = c.reply()
        assert r.code == 250, r
        c.cmd("QUIT")
    assert MARKER not in queue_bodies(smtp_server)[queued_id(r)]


# --- BDAT ------------------------------------------------------------------------------------


def test_bdat_last_chunk_with_bare_lf_and_smuggled_commands(smtp_server):
    helo = "bdat-smuggle.example.net"
    chunk = b"Subject: x\r\n\r\nhello\n.\n" + SMUGGLED + REAL_END
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, helo)
        c.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        assert c.reply().last.startswith("550 5.6.11"), "one reply for the whole chunk"
        assert c.cmd("NOOP").last == "250 2.0.0 OK"
        assert_nothing_pending(c)
    assert_refused_alone(smtp_server, helo, before)


def test_bdat_bare_lf_in_an_earlier_chunk_refuses_the_message(smtp_server):
    helo = "bdat-two-chunks.example.net"
    first, last = b"Subject: x\r\n\r\nline\nsmuggled", b" rest\r\n"
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, helo)
        c.send(f"BDAT {len(first)}\r\n".encode() + first)
        assert c.reply().code in (250, 550)
        c.send(f"BDAT {len(last)} LAST\r\n".encode() + last)
        r = c.reply()
        assert r.last.startswith("550 5.6.11"), r
        assert_nothing_pending(c)
    assert_refused_alone(smtp_server, helo, before)


def test_bdat_bare_cr_is_refused(smtp_server):
    helo = "bdat-cr.example.net"
    chunk = b"Subject: x\r\n\r\nhello\r.\r" + SMUGGLED + b"\r\n"
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, helo)
        c.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
        assert c.reply().last.startswith("550 5.6.11")
        assert_nothing_pending(c)
    assert_refused_alone(smtp_server, helo, before)


def test_bdat_crlf_split_across_chunks_is_accepted(smtp_server):
    """No false positive: a CR closing one chunk and the LF opening the next are one CRLF."""
    first, last = b"Subject: split\r\n\r\nline one\r", b"\nline two\r\n"
    with SmtpConn(smtp_server.ports["mx"]) as c:
        open_transaction(c, "bdat-split.example.net")
        c.send(f"BDAT {len(first)}\r\n".encode() + first)
        assert c.reply().code == 250
        c.send(f"BDAT {len(last)} LAST\r\n".encode() + last)
        r = c.reply()
        assert r.code == 250, r
        c.cmd("QUIT")
    assert queue_bodies(smtp_server)[queued_id(r)].endswith(b"line one\r\nline two\r\n")


# --- STARTTLS --------------------------------------------------------------------------------


def test_commands_pipelined_after_starttls_are_discarded(smtp_server, client_tls):
    helo = "starttls-inject.example.net"
    injected = f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<{SMUGGLED_RCPT}>\r\n".encode()
    before = queue_bodies(smtp_server)
    with SmtpConn(smtp_server.ports["mx"]) as c:
        assert c.cmd(f"EHLO {helo}").code == 250
        c.send(b"STARTTLS\r\n" + injected)
        assert c.reply().last.startswith("220 2.0.0")
        assert c.buf == b""
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):       # no plaintext answer to the injected commands
            c.sock.recv(1)
        c.sock.settimeout(10)
        c.sock = client_tls.wrap_socket(c.sock, server_hostname="mx.example.test")
        assert c.cmd(f"EHLO {helo}").code == 250       # the first reply over TLS is EHLO's
        assert c.cmd(f"RCPT TO:<{SMUGGLED_RCPT}>").code == 503   # MAIL was never run
        c.cmd("QUIT")
    events = session_events(smtp_server, helo)
    pipelined = [e for e in events if e["id"] == 1107]
    assert len(pipelined) == 1 and pipelined[0]["name"] == "PIPELINING_BEFORE_STARTTLS", events
    assert str(len(injected)) in pipelined[0]["fields"]["detail"]
    assert not [e for e in events if e["fields"].get("recipient") == SMUGGLED_RCPT], events
    assert queue_bodies(smtp_server).keys() == before.keys()


def test_starttls_alone_logs_no_pipelining_event(smtp_server, client_tls):
    helo = "starttls-clean.example.net"
    with SmtpConn(smtp_server.ports["mx"]) as c:
        assert c.cmd(f"EHLO {helo}").code == 250
        c.starttls(client_tls)
        assert c.cmd(f"EHLO {helo}").code == 250
        c.cmd("QUIT")
    assert not [e for e in session_events(smtp_server, helo) if e["id"] == 1107]


def test_command_in_the_same_write_as_the_tls_finished_is_answered(smtp_server, client_tls):
    """Only plaintext before the handshake is discarded: a command encrypted in the same write as
    the client's Finished is a real command (it was once lost until the STARTTLS coroutine
    resumed)."""
    with SmtpConn(smtp_server.ports["mx"], timeout=3) as c:
        assert c.cmd("EHLO race.example.net").code == 250
        assert c.cmd("STARTTLS").code == 220
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client_tls.wrap_bio(incoming, outgoing, server_hostname="mx.example.test")
        for _ in range(50):
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    c.sock.sendall(outgoing.read())
                data = c.sock.recv(65536)
                assert data, "server closed during the handshake"
                incoming.write(data)
        tls.write(b"EHLO race.example.net\r\n")
        c.sock.sendall(outgoing.read())           # client Finished and EHLO in one write
        plain = b""
        for _ in range(50):
            if b"\r\n250 " in b"\r\n" + plain:
                break
            try:
                data = c.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            if not data:
                break
            incoming.write(data)
            try:
                while True:
                    plain += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        assert b"250 " in plain, f"no EHLO reply after the handshake: {plain!r}"
