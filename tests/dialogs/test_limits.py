"""Dialogs for every limit and defence of a listener, each with a small configuration.

One server for the module with four listeners: ``small`` (small message, recipient, error and
Received-header limits), ``slow`` (1 s command and data timeouts), ``few`` (2 connections in all),
``perclient`` (2 connections per client address) and ``closed`` (a connection list without us).
"""

from __future__ import annotations

import time

import pytest

from tests.support.server import RelayServer
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog

LIMITS_CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "small"
address = "127.0.0.1"
port = {port:small}
tls = "none"
[listener.limits]
max_command_line = 512
max_message_size = 2048
max_recipients = 3
max_errors = 5
max_received_headers = 5

[[listener]]
name = "slow"
address = "127.0.0.1"
port = {port:slow}
tls = "none"
[listener.limits]
command_timeout = 1.0
data_timeout = 1.0

[[listener]]
name = "few"
address = "127.0.0.1"
port = {port:few}
tls = "none"
[listener.limits]
max_connections = 2

[[listener]]
name = "perclient"
address = "127.0.0.1"
port = {port:perclient}
tls = "none"
[listener.limits]
max_connections_per_client = 2

[[listener]]
name = "closed"
address = "127.0.0.1"
port = {port:closed}
tls = "none"
connections = { mode = "only", entries = ["192.0.2.1"] }

[[listener]]
name = "relay"
address = "127.0.0.1"
port = {port:relay}
tls = "none"
relay = { mode = "only", entries = ["127.0.0.1"] }

[[route]]
name = "default"
domains = ["*"]
kind = "mx"

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"

[[mailbox]]
address = "bob@example.test"

[[mailbox]]
address = "carol@example.test"

[[mailbox]]
address = "dave@example.test"
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = queue_only_server(tmp_path_factory.mktemp("limits") / "srv", LIMITS_CONFIG)
    yield server
    server.stop()


@pytest.fixture
def small(srv):
    with SmtpConn(srv.ports["small"]) as c:
        assert c.cmd("EHLO client.example.org").code == 250
        yield c


def limit_event(srv: RelayServer, listener: str, limit: str) -> dict:
    return srv.wait_for_event(lambda e: e["id"] == 1108 and e.get("listener") == listener
                              and (e["fields"].get("limit") == limit or e["fields"].get("kind") == limit))


# --- command line length, NUL and non-ASCII -------------------------------------------------------

def test_command_line_too_long_and_the_session_goes_on(srv, small):
    run_dialog(small, f"""
        c: NOOP {"x" * 510}
        s: 500 5.5.2 Line too long (the limit is 512 octets)
        c: NOOP
        s: 250 2.0.0
    """)
    # a line of exactly 512 octets with its CRLF is allowed
    assert small.cmd("NOOP " + "y" * 505).last.startswith("250 2.0.0")
    limit_event(srv, "small", "line-length")


def test_very_long_line_in_pieces_gets_one_reply(small):
    small.send("NOOP " + "z" * 4000)
    time.sleep(0.2)
    small.send("z" * 4000 + "\r\nNOOP\r\n")
    assert small.reply().last.startswith("500 5.5.2")
    assert small.reply().last.startswith("250 2.0.0")


def test_too_long_line_then_pipelined_commands_in_one_write(small):
    small.send("NOOP " + "w" * 600 + "\r\nNOOP\r\nRSET\r\n")
    assert small.reply().last.startswith("500 5.5.2")
    assert small.reply().last.startswith("250 2.0.0 OK")
    assert small.reply().last.startswith("250 2.0.0 Reset")


@pytest.mark.parametrize("raw", [b"NOOP \x00\r\n", b"EHLO cli\x00ent\r\n", b"NOOP caf\xc3\xa9\r\n",
                                 b"EHLO ex\xc3\xa4mple.org\r\n", b"NOOP \xff\xfe\r\n",
                                 b"VRFY j\xc3\xb6rg\r\n"])
def test_nul_and_non_ascii_in_a_command(srv, small, raw):
    small.send(raw)
    assert small.reply().last.startswith("500 5.5.2")
    assert small.cmd("NOOP").last.startswith("250 2.0.0")
    srv.wait_for_event(lambda e: e["id"] == 1105 and e["fields"].get("kind") == "non-ascii")


# --- message size, data lines, recipients, loops ------------------------------------------------------

def start_data(conn: SmtpConn, rcpts=("alice@example.test",)) -> None:
    assert conn.cmd("MAIL FROM:<sender@example.org>").code == 250
    for r in rcpts:
        assert conn.cmd(f"RCPT TO:<{r}>").code == 250
    assert conn.cmd("DATA").code == 354


def test_size_announced_and_declared(small):
    r = small.cmd("EHLO client.example.org")
    assert "250-SIZE 2048" in r.lines
    run_dialog(small, """
        c: MAIL FROM:<sender@example.org> SIZE=2049
        s: 552 5.3.4 Message size exceeds the limit of 2048 octets
        c: MAIL FROM:<sender@example.org> SIZE=2048
        s: 250 2.1.0
    """)


def test_actual_message_too_big(srv, small):
    start_data(small)
    small.send(("x" * 70 + "\r\n") * 40 + ".\r\n")
    run_dialog(small, """
        s: 552 5.3.4
        # the session goes on, with a new transaction
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: small enough
        c: .
        s: 250 2.0.0
    """)
    limit_event(srv, "small", "size")


def test_bdat_too_big(srv, small):
    start_bdat = "MAIL FROM:<sender@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
    small.send(start_bdat + "BDAT 3000 LAST\r\n" + "y" * 3000)
    assert [small.reply().last[:9] for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "552 5.3.4"]
    # in chunks: the chunk that crosses the limit is refused, and so is the rest of the message
    small.send(start_bdat + "BDAT 1500\r\n" + "y" * 1500 + "BDAT 1500\r\n" + "y" * 1500 + "BDAT 0 LAST\r\n")
    assert [small.reply().last[:9] for _ in range(5)] == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "552 5.3.4", "552 5.3.4"]
    assert small.cmd("RCPT TO:<alice@example.test>").last.startswith("503 5.5.1"), "the transaction is over"
    limit_event(srv, "small", "size")


def test_data_line_too_long(small):
    start_data(small)
    small.send("x" * 1100 + "\r\n.\r\n")
    assert small.reply().last.startswith("552 5.3.4 Message refused: a line is longer than 1000 octets")
    assert small.cmd("NOOP").code == 250


@pytest.mark.parametrize("length, code", [(998, 250), (999, 552)])
def test_data_line_limit_is_exact(small, length, code):
    """1000 octets with the CRLF (RFC 5321 4.5.3.1.6) pass; one more does not, wherever it is."""
    start_data(small)
    small.send("Subject: x\r\n\r\nshort\r\n" + "z" * length + "\r\nshort\r\n.\r\n")
    assert small.reply().code == code


def test_too_many_recipients(srv, small):
    replies = run_dialog(small, """
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: RCPT TO:<bob@example.test>
        s: 250 2.1.5
        c: RCPT TO:<carol@example.test>
        s: 250 2.1.5
        c: RCPT TO:<dave@example.test>
        s: 452 4.5.3 Too many recipients (at most 3 per message)
        c: DATA
        s: 354
        c: .
        s: 250 2.0.0
    """)
    msg, _ = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert [r.address for r in msg.recipients] == ["alice@example.test", "bob@example.test", "carol@example.test"]
    limit_event(srv, "small", "recipients")


def test_recipients_over_the_limit_are_not_errors(srv, small):
    # max_errors is 5: ten refused recipients must not close the session (RFC 5321 4.5.3.1.10)
    small.send("MAIL FROM:<sender@example.org>\r\n" + "RCPT TO:<alice@example.test>\r\n" * 13)
    replies = [small.reply() for _ in range(14)]
    assert [r.code for r in replies] == [250] * 4 + [452] * 10
    replies = run_dialog(small, """
        c: DATA
        s: 354
        c: .
        s: 250 2.0.0
    """)
    msg, _ = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert [r.address for r in msg.recipients] == ["alice@example.test"]


def received_lines(n: int) -> str:
    return "".join(f"Received: from hop{i}.example.org by hop{i + 1}.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   for i in range(n))


def test_mail_loop_by_received_headers(srv, small):
    start_data(small)
    small.send(received_lines(6) + "Subject: loop\r\n\r\nbody\r\n.\r\n")
    assert small.reply().last.startswith("554 5.4.6 Mail loop detected")
    limit_event(srv, "small", "received-headers")
    # at the limit it is not a loop yet; Received lines in the body do not count
    start_data(small)
    small.send(received_lines(5) + "Subject: ok\r\n\r\n" + received_lines(3) + ".\r\n")
    done = small.reply()
    assert done.last.startswith("250 2.0.0"), done
    _, data = read_queued(srv.data_dir, queued_id(done))
    assert data.lower().count(b"\r\nreceived:") + 1 == 5 + 1 + 3


# --- errors per session ----------------------------------------------------------------------------

def test_too_many_errors_closes_the_session(srv):
    with SmtpConn(srv.ports["small"]) as c:
        run_dialog(c, """
            c: EHLO errors.example.org
            s: 250
            c: BAD1
            s: 500 5.5.1
            c: RCPT TO:<alice@example.test>
            s: 503 5.5.1
            c: BAD3
            s: 500 5.5.1
            c: MAIL FROM:<no-brackets@example.org
            s~ 501
            c: BAD5
            s: 500 5.5.1
            s: 421 4.7.0 Too many errors
        """)
        assert c.closed_by_peer(5.0)
    event = srv.wait_for_event(lambda e: e["id"] == 1108 and e["fields"].get("kind") == "too-many-errors")
    assert event["listener"] == "small"


def test_errors_add_up_over_the_session(small):
    for _ in range(4):
        assert small.cmd("BAD").code == 500
    # good commands in between neither count nor reset the count
    assert small.cmd("NOOP").code == 250
    assert small.cmd("RSET").code == 250
    assert small.cmd("BAD").last.startswith("500 5.5.1")
    assert small.reply().last.startswith("421 4.7.0")
    assert small.closed_by_peer(5.0)


# --- timeouts --------------------------------------------------------------------------------------

def test_command_timeout(srv):
    with SmtpConn(srv.ports["slow"]) as c:
        assert c.cmd("EHLO idle.example.org").code == 250
        started = time.monotonic()
        c.sock.settimeout(10)
        r = c.reply()
        waited = time.monotonic() - started
        assert r.last.startswith("421 4.4.2"), r
        assert 0.9 <= waited < 5.0
        assert c.closed_by_peer(5.0)
    limit_event(srv, "slow", "timeout")


def test_activity_resets_the_command_timeout(srv):
    with SmtpConn(srv.ports["slow"]) as c:
        for _ in range(4):
            time.sleep(0.5)
            assert c.cmd("NOOP").code == 250
        assert c.reply().last.startswith("421 4.4.2")


def test_data_timeout(srv):
    with SmtpConn(srv.ports["slow"]) as c:
        c.cmd("EHLO idle.example.org")
        start_data(c)
        c.send("Subject: half a message\r\n")
        c.sock.settimeout(10)
        assert c.reply().last.startswith("421 4.4.2")
        assert c.closed_by_peer(5.0)


# --- connections ---------------------------------------------------------------------------------

def test_connections_per_listener(srv):
    first, second = SmtpConn(srv.ports["few"]), SmtpConn(srv.ports["few"])
    try:
        with SmtpConn(srv.ports["few"]) as third:
            assert third.greeting.last.startswith("421 4.7.0 Too many connections")
            assert third.closed_by_peer(5.0)
        assert first.cmd("NOOP").code == 250
        srv.wait_for_event(lambda e: e["id"] == 1102 and e.get("listener") == "few")
    finally:
        first.close()
    deadline = time.monotonic() + 5
    while True:
        with SmtpConn(srv.ports["few"]) as again:
            if again.greeting.code == 220:
                break
        assert time.monotonic() < deadline, "a closed connection was never freed"
        time.sleep(0.1)
    second.close()


def test_connections_per_client(srv):
    conns = [SmtpConn(srv.ports["perclient"]) for _ in range(2)]
    try:
        with SmtpConn(srv.ports["perclient"]) as third:
            assert third.greeting.last.startswith("421 4.7.0")
            assert third.closed_by_peer(5.0)
        event = srv.wait_for_event(lambda e: e["id"] == 1102 and e.get("listener") == "perclient")
        assert event["client"] == "127.0.0.1"
        assert event["fields"]["from_client"] == 2
    finally:
        for c in conns:
            c.close()


def test_connection_list(srv):
    with SmtpConn(srv.ports["closed"]) as c:
        assert c.greeting.last.startswith("554 5.7.1")
        assert c.closed_by_peer(5.0)
    event = srv.wait_for_event(lambda e: e["id"] == 1101 and e.get("listener") == "closed")
    assert event["client"] == "127.0.0.1"


def test_relayed_addresses_differing_in_case_are_different_recipients(srv):
    # the local part is the destination's to interpret, case included (RFC 5321 2.4); a mailbox
    # of ours is one whatever the case, and an exact repeat is delivered once
    with SmtpConn(srv.ports["relay"]) as c:
        assert c.cmd("EHLO client.example.org").code == 250
        replies = run_dialog(c, """
            c: MAIL FROM:<sender@example.org>
            s: 250 2.1.0
            c: RCPT TO:<John.Smith@remote.example>
            s: 250 2.1.5
            c: RCPT TO:<john.smith@remote.example>
            s: 250 2.1.5
            c: RCPT TO:<JOHN.SMITH@REMOTE.EXAMPLE> NOTIFY=SUCCESS
            s: 250 2.1.5
            c: RCPT TO:<john.smith@Remote.Example>
            s: 250 2.1.5
            c: RCPT TO:<alice@example.test>
            s: 250 2.1.5
            c: RCPT TO:<ALICE@example.test>
            s: 250 2.1.5
            c: DATA
            s: 354
            c: .
            s: 250 2.0.0
        """)
    msg, _ = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert [(r.address, r.notify) for r in msg.recipients] == [
        ("John.Smith@remote.example", ()), ("john.smith@remote.example", ()),
        ("JOHN.SMITH@remote.example", ("SUCCESS",)), ("alice@example.test", ())]


@pytest.mark.parametrize("split", [False, True])
def test_transparency_dots_count_in_neither_size_nor_line_length(srv, small, split):
    # 2048 octets is the limit: with "Subject: x", 172 lines of ".abc" and a line of 1000
    # octets with its CRLF once its dot is removed, the message is 2046 octets, 2219 dot-stuffed
    # (RFC 5321 4.5.2, 4.5.3.1.6; RFC 1870)
    start_data(small)
    stuffed = "Subject: x\r\n\r\n" + "..abc\r\n" * 172 + ".." + "x" * 997 + "\r\n"
    assert len(stuffed) > 2048 + 2
    if split:                                     # "\r\n.." split across two reads, in turn after each octet
        pieces = stuffed.split("\r\n..")
        for index, piece in enumerate(pieces):
            small.send(piece)
            if index < len(pieces) - 1:
                cut = 1 + index % 3
                small.send("\r\n.."[:cut])
                time.sleep(0.001)
                small.send("\r\n.."[cut:])
        small.send(".\r\n")
    else:
        small.send(stuffed + ".\r\n")
    reply = small.reply()
    assert reply.code == 250, reply.last
    msg, data = read_queued(srv.data_dir, queued_id(reply))
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body == (".abc\r\n" * 172 + "." + "x" * 997 + "\r\n").encode()
    # one octet more without the dots is over the line limit, and the size limit still holds
    start_data(small)
    small.send("Subject: x\r\n\r\n.." + "x" * 998 + "\r\n.\r\n")
    assert small.reply().last.startswith("552 5.3.4 Message refused: a line is longer than 1000")
    start_data(small)
    small.send("Subject: x\r\n\r\n" + "..abc\r\n" * 420 + ".\r\n")
    assert small.reply().last.startswith("552 5.3.4 Message size exceeds")
