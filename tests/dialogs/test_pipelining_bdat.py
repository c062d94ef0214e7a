"""Dialogs for CHUNKING (BDAT, RFC 3030) and for PIPELINING across whole transactions.

BDAT chunks are counted octets: nothing inside a chunk is ever read as a command, no dot-stuffing
applies, and a chunk the server refuses is still read to its end.  One shared ``srv``.
"""

from __future__ import annotations

import pytest

from tests.support.server import DEFAULT_CONFIG
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert_files):
    """The test default configuration (listeners mx and submission, user alice), delivery off."""
    server = queue_only_server(tmp_path_factory.mktemp("pipelining_bdat") / "srv", DEFAULT_CONFIG, cert_files=cert_files,
                               users={"alice@example.test": "correct horse"})
    yield server
    server.stop()


@pytest.fixture
def mx(srv):
    with SmtpConn(srv.ports["mx"]) as c:
        assert c.cmd("EHLO client.example.org").code == 250
        yield c


def envelope(conn: SmtpConn, sender: str = "sender@example.org", rcpt: str = "alice@example.test") -> None:
    assert conn.cmd(f"MAIL FROM:<{sender}>").code == 250
    assert conn.cmd(f"RCPT TO:<{rcpt}>").code == 250


def body_of(data: bytes) -> bytes:
    """The message as the client sent it: the data without our Received header."""
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n", data.index(b"; "))
    return data[end + 2:]


def test_single_chunk_last(srv, mx):
    envelope(mx)
    chunk = b"Subject: bdat\r\n\r\n..dots stay\r\n.\r\nQUIT\r\n"
    mx.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
    done = mx.reply()
    assert done.last.startswith("250 2.0.0") and "queued as" in done.last, done
    _, data = read_queued(srv.data_dir, queued_id(done))
    assert body_of(data) == chunk
    assert mx.cmd("NOOP").code == 250, "the QUIT inside the chunk was data, not a command"


def test_several_chunks(srv, mx):
    envelope(mx)
    parts = [b"Subject: three chunks\r\n", b"\r\nfirst line\r\n", b"second line\r\n"]
    for part in parts[:-1]:
        mx.send(f"BDAT {len(part)}\r\n".encode() + part)
    first, second = mx.reply(), mx.reply()
    assert first.last == f"250 2.0.0 {len(parts[0])} octets received"
    assert second.last == f"250 2.0.0 {len(parts[0]) + len(parts[1])} octets received"
    mx.send(f"BDAT {len(parts[2])} LAST\r\n".encode() + parts[2])
    done = mx.reply()
    _, data = read_queued(srv.data_dir, queued_id(done))
    assert body_of(data) == b"".join(parts)


def test_bdat_zero_last_ends_the_message(srv, mx):
    envelope(mx)
    chunk = b"Subject: zero\r\n\r\nbody\r\n"
    mx.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
    assert mx.reply().last == f"250 2.0.0 {len(chunk)} octets received"
    done = mx.cmd("BDAT 0 LAST")
    assert done.last.startswith("250 2.0.0"), done
    _, data = read_queued(srv.data_dir, queued_id(done))
    assert body_of(data) == chunk


def test_bdat_out_of_sequence(mx):
    run_dialog(mx, """
        c: BDAT 0 LAST
        s: 503 5.5.1
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: BDAT 0 LAST
        s: 503 5.5.1 Bad sequence of commands: need RCPT before BDAT
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: BDAT 0
        s: 250 2.0.0 0 octets received
        c: DATA
        s: 503 5.5.1 Bad sequence of commands: DATA cannot follow BDAT
        c: BDAT 0 LAST
        s: 250 2.0.0
    """)


def test_refused_bdat_chunk_is_not_read_as_commands(srv, mx):
    """A 503 to BDAT must still swallow its octets, else a chunk could smuggle commands."""
    smuggled = b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
    assert mx.cmd("MAIL FROM:<sender@example.org>").code == 250
    mx.send(f"BDAT {len(smuggled)} LAST\r\n".encode() + smuggled)
    assert mx.reply().last.startswith("503 5.5.1")
    # the transaction is still there and has no recipient
    run_dialog(mx, """
        c: DATA
        s: 503 5.5.1 Bad sequence of commands: need RCPT before DATA
        c: RCPT TO:<postmaster@example.test>
        s: 250 2.1.5
        c: BDAT 0 LAST
        s: 250 2.0.0
    """)


def test_refused_bdat_before_mail_swallows_its_chunk(mx):
    smuggled = b"MAIL FROM:<x@example.org>\r\n"
    mx.send(f"BDAT {len(smuggled)}\r\n".encode() + smuggled + b"NOOP\r\n")
    assert mx.reply().last.startswith("503 5.5.1")
    assert mx.reply().last.startswith("250 2.0.0 OK")
    assert mx.cmd("RCPT TO:<alice@example.test>").last.startswith("503 5.5.1 Bad sequence of commands: need MAIL")


def test_rset_discards_the_chunks_received(srv, mx):
    envelope(mx)
    aborted = b"Subject: aborted\r\n\r\n"
    mx.send(f"BDAT {len(aborted)}\r\n".encode() + aborted)
    assert mx.reply().last == f"250 2.0.0 {len(aborted)} octets received"
    assert mx.cmd("RSET").code == 250
    envelope(mx)
    chunk = b"Subject: kept\r\n\r\nonly this\r\n"
    mx.send(f"BDAT {len(chunk)} LAST\r\n".encode() + chunk)
    done = mx.reply()
    assert done.last.startswith("250 2.0.0"), done
    _, data = read_queued(srv.data_dir, queued_id(done))
    assert body_of(data) == chunk
    # and DATA is allowed again in the next transaction
    envelope(mx)
    assert mx.cmd("DATA").code == 354


def test_bdat_syntax_error_closes(mx):
    run_dialog(mx, """
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: BDAT many LAST
        s: 501 5.5.4
    """)
    assert mx.closed_by_peer(5.0)


def test_pipelined_bdat_transaction_in_one_write(srv, mx):
    chunk1, chunk2 = b"Subject: pipelined bdat\r\n", b"\r\nBDAT 1000 LAST\r\n"
    mx.send(b"MAIL FROM:<sender@example.org> BODY=8BITMIME\r\nRCPT TO:<alice@example.test>\r\n"
            + f"BDAT {len(chunk1)}\r\n".encode() + chunk1
            + f"BDAT {len(chunk2)} LAST\r\n".encode() + chunk2
            + b"NOOP\r\n")
    replies = [mx.reply() for _ in range(5)]
    assert [r.last[:9] for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
    _, data = read_queued(srv.data_dir, queued_id(replies[3]))
    assert body_of(data) == chunk1 + chunk2


def test_pipelined_transactions_back_to_back(srv, mx):
    batch = b"".join(
        f"MAIL FROM:<batch{i}@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
        f"Subject: batch {i}\r\n\r\nbody {i}\r\n.\r\n".encode() for i in range(5))
    mx.send(batch + b"QUIT\r\n")
    ids = []
    for i in range(5):
        assert [mx.reply().last[:9] for _ in range(3)] == ["250 2.1.0", "250 2.1.5", "354 End d"]
        done = mx.reply()
        assert done.last.startswith("250 2.0.0"), done
        ids.append(queued_id(done))
    assert mx.reply().last.startswith("221 2.0.0")
    assert len(set(ids)) == 5
    for i, qid in enumerate(ids):
        msg, data = read_queued(srv.data_dir, qid)
        assert msg.sender == f"batch{i}@example.org"
        assert body_of(data) == f"Subject: batch {i}\r\n\r\nbody {i}\r\n".encode()


@pytest.mark.parametrize("line, code", [
    (b"BDAT 6 LAST\x00\r\n", 500),                 # NUL
    ("BDAT 6 LAST \u00e9\r\n".encode(), 500),      # not ASCII, no SMTPUTF8
    (b"BDAT 6 LAST \xff\r\n", 500),                # not UTF-8
    (b"BDAT 6\rLAST\r\n", 501),                   # a bare CR
    (b"bdat 6 " + b"x" * 600 + b"\r\n", 500),      # over the command line limit
])
def test_an_unreadable_bdat_line_closes_before_its_chunk_is_read_as_commands(mx, line, code):
    # the chunk "RSET\r\n" must never be answered as a command: its size is not known
    run_dialog(mx, """
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
    """)
    mx.send(line + b"RSET\r\n")
    assert mx.reply().code == code
    assert mx.closed_by_peer(5.0)
