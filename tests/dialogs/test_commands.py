"""Dialogs for every SMTP command of RFC 5321: the good path, syntax errors and bad sequences.

One shared server (``srv``, delivery off); each test opens its own connection on the mx listener.
"""

from __future__ import annotations

import pytest

from tests.support.server import DEFAULT_CONFIG
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert_files):
    """The test default configuration (listeners mx and submission, user alice), delivery off."""
    server = queue_only_server(tmp_path_factory.mktemp("commands") / "srv", DEFAULT_CONFIG, cert_files=cert_files,
                               users={"alice@example.test": "correct horse"})
    yield server
    server.stop()


@pytest.fixture
def mx(srv):
    with SmtpConn(srv.ports["mx"]) as c:
        yield c


def test_greeting_and_ehlo_lists_extensions(mx):
    assert mx.greeting.last.startswith("220 mx.example.test ESMTP")
    r = mx.cmd("EHLO client.example.org")
    assert r.code == 250
    assert r.lines[0] == "250-mx.example.test greets client.example.org"
    assert r.last.startswith("250 ")
    assert all(line.startswith("250-") for line in r.lines[:-1])


@pytest.mark.parametrize("line", ["EHLO", "EHLO ", "EHLO two words", "EHLO bad!name", "EHLO -leading.dash"])
def test_ehlo_syntax_errors(mx, line):
    run_dialog(mx, f"""
        c: {line}
        s: 501 5.5.4
        # the session goes on: a correct EHLO still works
        c: EHLO client.example.org
        s: 250
    """)


@pytest.mark.parametrize("line", ["HELO", "HELO a b"])
def test_helo_syntax_errors(mx, line):
    run_dialog(mx, f"""
        c: {line}
        s: 501 5.5.4
    """)


def test_helo_has_no_extensions_and_refuses_parameters(mx):
    r = mx.cmd("HELO client.example.org")
    assert r.lines == ["250 mx.example.test"]
    run_dialog(mx, """
        c: MAIL FROM:<sender@example.org> SIZE=100
        s: 501 5.5.4
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
    """)


def test_address_literal_in_ehlo(mx):
    run_dialog(mx, """
        c: EHLO [127.0.0.1]
        s: 250
        c: EHLO [IPv6:::1]
        s: 250
    """)


def test_full_transaction_is_queued(srv, mx):
    replies = run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: RCPT TO:<postmaster@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: commands
        c:
        c: ..a line that starts with a dot
        c: .
        s~ 250 2\\.0\\.0 .*queued as
    """)
    qid = queued_id(replies[-1])
    msg, data = read_queued(srv.data_dir, qid)
    assert msg.sender == "sender@example.org"
    assert [r.address for r in msg.recipients] == ["alice@example.test", "postmaster@example.test"]
    assert data.endswith(b"Subject: commands\r\n\r\n.a line that starts with a dot\r\n")
    srv.wait_for_event(lambda e: e["id"] == 3001 and e.get("message_id") == qid)


def test_null_sender_and_postmaster_without_domain(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<>
        s: 250 2.1.0
        c: RCPT TO:<Postmaster>
        s: 250 2.1.5
        c: RSET
        s: 250 2.0.0
    """)


def test_two_transactions_in_one_session(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<one@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: one
        c:
        c: .
        s: 250 2.0.0
        c: MAIL FROM:<two@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: .
        s: 250 2.0.0
    """)


@pytest.mark.parametrize("line, reply", [
    ("MAIL FROM:<sender@example.org>", "503 5.5.1 Bad sequence of commands: send EHLO or HELO first"),
    ("RCPT TO:<alice@example.test>", "503 5.5.1"),
    ("DATA", "503 5.5.1"),
    ("BDAT 0 LAST", "503 5.5.1"),
    ("STARTTLS", "503 5.5.1"),
    ("AUTH PLAIN", "503 5.5.1"),
])
def test_bad_sequence_before_ehlo(mx, line, reply):
    run_dialog(mx, f"""
        c: {line}
        s: {reply}
    """)


def test_bad_sequences_inside_a_session(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1 Bad sequence of commands: need MAIL before RCPT
        c: DATA
        s: 503 5.5.1
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: MAIL FROM:<sender@example.org>
        s: 503 5.5.1 Bad sequence of commands: a mail transaction is in progress
        c: DATA
        s: 503 5.5.1 Bad sequence of commands: need RCPT before DATA
        c: STARTTLS
        s: 503 5.5.1
        # a refused recipient leaves no recipient: DATA is still out of sequence
        c: RCPT TO:<nobody@example.test>
        s: 550 5.1.1
        c: DATA
        s: 503 5.5.1
    """)


def test_mail_and_rcpt_syntax_errors(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL sender@example.org
        s: 501 5.5.4
        c: MAIL FROM:sender@example.org
        s~ 501 5\\.1\\.7
        c: MAIL FROM:<sender@@example.org>
        s~ 501 5\\.1\\.7
        c: MAIL FROM:<sender@example.org> FOO=bar
        s: 555 5.5.4
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT alice@example.test
        s: 501 5.5.4
        c: RCPT TO:<>
        s~ 501 5\\.1\\.3
        c: RCPT TO:<alice@example.test> FOO=bar
        s: 555 5.5.4
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
    """)


def test_rset_ends_the_transaction(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: RSET now
        s: 501 5.5.4
        c: RSET
        s: 250 2.0.0 Reset OK
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1
        c: DATA
        s: 503 5.5.1
        # EHLO again also resets a transaction
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: EHLO client.example.org
        s: 250
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1
    """)


def test_noop_vrfy_help_any_time(mx):
    run_dialog(mx, """
        c: NOOP
        s: 250 2.0.0
        c: VRFY alice
        s: 252 2.5.2
        c: HELP
        s: 214 2.0.0
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: NOOP
        s: 250 2.0.0
        c: VRFY alice@example.test
        s: 252 2.5.2
        c: VRFY
        s: 501 5.5.4
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
    """)


def test_help_lists_commands(mx):
    r = mx.cmd("HELP")
    assert r.code == 214
    assert all(line.startswith("214") for line in r.lines)
    assert "MAIL" in r.text and "STARTTLS" in r.text


def test_data_with_argument_is_a_syntax_error(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA now
        s: 501 5.5.4
        c: DATA
        s: 354
        c: .
        s: 250 2.0.0
    """)


def test_unknown_command_is_500_and_logged(srv, mx):
    run_dialog(mx, """
        c: XYZZY plugh
        s: 500 5.5.1
        c: EHLO client.example.org
        s: 250
        c: FOOBARCMD
        s: 500 5.5.1
    """)
    srv.wait_for_event(lambda e: e["id"] == 1105 and e["fields"].get("detail") == "FOOBARCMD")


@pytest.mark.parametrize("line", ["EXPN staff", "TURN", "ETRN example.test", "SEND FROM:<a@b.c>",
                                  "SOML FROM:<a@b.c>", "SAML FROM:<a@b.c>"])
def test_obsolete_and_unsupported_commands_are_502(mx, line):
    run_dialog(mx, f"""
        c: EHLO client.example.org
        s: 250
        c: {line}
        s: 502 5.5.1
        c: NOOP
        s: 250 2.0.0
    """)


def test_commands_are_case_insensitive(mx):
    run_dialog(mx, """
        c: ehlo client.example.org
        s: 250
        c: mail from:<sender@example.org>
        s: 250 2.1.0
        c: rcpt to:<alice@example.test>
        s: 250 2.1.5
        c: rset
        s: 250 2.0.0
    """)


def test_quit_closes(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: QUIT
        s: 221 2.0.0
    """)
    assert mx.closed_by_peer(5.0)


def test_quit_in_transaction_discards_it(srv, mx):
    run_dialog(mx, """
        c: EHLO quitter.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: QUIT
        s: 221 2.0.0
    """)
    assert mx.closed_by_peer(5.0)
    summary = srv.wait_for_event(
        lambda e: e["id"] == 1109 and e["fields"].get("helo") == "quitter.example.org")
    assert summary["fields"]["messages"] == 0
    assert summary["fields"]["accepted"] == 1


def test_session_summary_counts_every_refused_recipient(srv, mx):
    """Refused by the relay decision, by its syntax, or out of sequence: each is a refused RCPT."""
    run_dialog(mx, """
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1
        c: EHLO counter.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<someone@elsewhere.example>
        s: 550 5.7.1
        c: RCPT TO:<no closing bracket@example.test
        s: 501
        c: RCPT TO:<alice@example.test> NOTIFY=SOMETIMES
        s: 501 5.5.4
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: QUIT
        s: 221 2.0.0
    """)
    summary = srv.wait_for_event(
        lambda e: e["id"] == 1109 and e["fields"].get("helo") == "counter.example.org")
    assert (summary["fields"]["accepted"], summary["fields"]["refused"]) == (1, 4)
    assert "rcpts=1/5" in summary["text"]
