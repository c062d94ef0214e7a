"""Dialogs for the ESMTP extensions: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, DSN.

STARTTLS and AUTH are in test_tls_auth.py, CHUNKING (BDAT) in test_pipelining_bdat.py.  One shared
server (``srv``, delivery off); what was acknowledged is read back from the queue.
"""

from __future__ import annotations

import pytest

from tests.support.server import DEFAULT_CONFIG
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog

DEFAULT_SIZE = 35 * 1024 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert_files):
    """The test default configuration (listeners mx and submission, user alice), delivery off."""
    server = queue_only_server(tmp_path_factory.mktemp("extensions") / "srv", DEFAULT_CONFIG, cert_files=cert_files,
                               users={"alice@example.test": "correct horse"})
    yield server
    server.stop()


@pytest.fixture
def mx(srv):
    with SmtpConn(srv.ports["mx"]) as c:
        yield c


def ehlo_keywords(conn: SmtpConn) -> list[str]:
    r = conn.cmd("EHLO client.example.org")
    assert r.code == 250, r
    return [line[4:] for line in r.lines[1:]]


def test_mx_offers_the_extensions(mx):
    assert ehlo_keywords(mx) == ["PIPELINING", f"SIZE {DEFAULT_SIZE}", "8BITMIME", "SMTPUTF8",
                                 "ENHANCEDSTATUSCODES", "CHUNKING", "DSN", "STARTTLS"]


def test_enhanced_status_codes_on_every_reply_after_ehlo(mx):
    replies = run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: NOOP
        s: 250 2.0.0
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<nobody@example.test>
        s: 550 5.1.1
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: BOGUS
        s: 500 5.5.1
        c: RSET
        s: 250 2.0.0
        c: QUIT
        s: 221 2.0.0
    """)
    for r in replies[1:]:
        assert r.last[4].isdigit() and r.last[5] == ".", r


def test_pipelined_transaction_in_one_write(srv, mx):
    mx.send("EHLO pipeliner.example.org\r\n"
            "MAIL FROM:<sender@example.org>\r\n"
            "RCPT TO:<alice@example.test>\r\n"
            "RCPT TO:<nobody@example.test>\r\n"
            "RCPT TO:<postmaster@example.test>\r\n"
            "DATA\r\n")
    replies = [mx.reply() for _ in range(5)]
    assert [r.last[:9] for r in replies[1:]] == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5"]
    assert mx.reply().code == 354
    mx.send("Subject: pipelined\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    done, rset, noop, quit_ = (mx.reply() for _ in range(4))
    assert done.last.startswith("250 2.0.0") and "queued as" in done.last
    assert (rset.last[:9], noop.last[:9], quit_.last[:9]) == ("250 2.0.0", "250 2.0.0", "221 2.0.0")
    msg, _ = read_queued(srv.data_dir, queued_id(done))
    assert [r.address for r in msg.recipients] == ["alice@example.test", "postmaster@example.test"]


def test_pipelined_errors_keep_their_order(mx):
    mx.send("EHLO client.example.org\r\nRCPT TO:<alice@example.test>\r\nMAIL FROM:<a@example.org>\r\n"
            "MAIL FROM:<b@example.org>\r\nDATA\r\nRSET\r\n")
    codes = [mx.reply().last[:9] for _ in range(6)]
    assert codes == ["250 START", "503 5.5.1", "250 2.1.0", "503 5.5.1", "503 5.5.1", "250 2.0.0"]


def test_size_declared(mx):
    run_dialog(mx, f"""
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> SIZE={DEFAULT_SIZE + 1}
        s: 552 5.3.4
        c: MAIL FROM:<sender@example.org> SIZE=many
        s: 501 5.5.4
        c: MAIL FROM:<sender@example.org> SIZE
        s: 501 5.5.4
        c: MAIL FROM:<sender@example.org> SIZE=99999999999999999999999
        s: 501 5.5.4
        c: MAIL FROM:<sender@example.org> SIZE={DEFAULT_SIZE}
        s: 250 2.1.0
    """)


def test_8bitmime(srv, mx):
    replies = run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> BODY=BINARYMIME
        s: 555 5.5.4
        c: MAIL FROM:<sender@example.org> BODY=9BIT
        s: 555 5.5.4
        c: MAIL FROM:<sender@example.org> BODY=7BIT
        s: 250 2.1.0
        c: RSET
        s: 250 2.0.0
        c: MAIL FROM:<sender@example.org> BODY=8BITMIME
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
    """)
    mx.send("Subject: caf\xc3\xa9\r\n\r\n\xe2\x82\xac 8-bit body\r\n.\r\n".encode("latin-1"))
    done = mx.reply()
    assert done.last.startswith("250 2.0.0"), done
    msg, data = read_queued(srv.data_dir, queued_id(done))
    assert msg.body_type == "8BITMIME"
    assert data.endswith("Subject: café\r\n\r\n€ 8-bit body\r\n".encode())
    assert replies[0].code == 250


def test_smtputf8_addresses_only_with_the_parameter(srv, mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<jörg@example.org>
        s: 553 5.6.7
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<jörg@example.test>
        s: 553 5.6.7
        c: RSET
        s: 250 2.0.0
        c: MAIL FROM:<jörg@example.org> SMTPUTF8 BODY=8BITMIME
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: grüße
        c:
        c: .
    """)
    done = mx.reply()
    assert done.last.startswith("250 2.0.0"), done
    msg, data = read_queued(srv.data_dir, queued_id(done))
    assert msg.sender == "jörg@example.org"
    assert msg.smtputf8 is True
    assert b"with UTF8SMTP id" in data


def test_smtputf8_takes_no_value_and_needs_ehlo(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> SMTPUTF8=yes
        s: 501 5.5.4
        c: HELO client.example.org
        s: 250
        c: MAIL FROM:<jörg@example.org> SMTPUTF8
        s: 501 5.5.4
    """)


def test_dsn_parameters_are_kept_with_the_message(srv, mx):
    replies = run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> RET=HDRS ENVID=batch+2B42
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Alice+40example.test
        s: 250 2.1.5
        c: RCPT TO:<postmaster@example.test> NOTIFY=NEVER
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: dsn
        c:
        c: .
        s: 250 2.0.0
    """)
    msg, _ = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert (msg.dsn_ret, msg.dsn_envid) == ("HDRS", "batch+42")
    alice, postmaster = msg.recipients
    assert alice.notify == ("SUCCESS", "FAILURE")
    assert alice.orcpt == "rfc822;Alice@example.test"
    assert postmaster.notify == ("NEVER",)
    assert postmaster.orcpt is None


def test_dsn_ret_full(srv, mx):
    replies = run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> RET=full
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test> NOTIFY=delay
        s: 250 2.1.5
        c: DATA
        s: 354
        c: .
        s: 250 2.0.0
    """)
    msg, _ = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert msg.dsn_ret == "FULL" and msg.dsn_envid is None
    assert msg.recipients[0].notify == ("DELAY",)


@pytest.mark.parametrize("params", ["RET=BOTH", "RET", "ENVID=bad+zz", "ENVID=" + "x" * 101,
                                    "RET=FULL RET=HDRS",
                                    # decoded control characters would forge lines in every DSN
                                    "ENVID=x+0D+0AFinal-Recipient:rfc822;ceo@v.example+0D+0AAction:delivered",
                                    "ENVID=a+00b", "ENVID=a+7Fb", "ENVID=a+09b", "ENVID=+C3+A9t+C3+A9"])
def test_dsn_bad_mail_parameters(mx, params):
    run_dialog(mx, f"""
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org> {params}
        s: 501 5.5.4
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
    """)


@pytest.mark.parametrize("params", ["NOTIFY=SOMETIMES", "NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS,SUCCESS",
                                    "NOTIFY", "ORCPT=alice@example.test", "ORCPT=rfc822;bad+zz",
                                    "ORCPT=rfc822;"])
def test_dsn_bad_rcpt_parameters(mx, params):
    run_dialog(mx, f"""
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test> {params}
        s: 501 5.5.4
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
    """)
