"""Dialogs for STARTTLS (trustme certificates) and SMTP AUTH PLAIN / LOGIN on the submission listener.

The shared ``srv`` has listener ``mx`` (anonymous, STARTTLS offered, no AUTH) and
``submission`` (require_tls, anonymous off, AUTH PLAIN LOGIN after TLS, authenticated relay) and
the user alice@example.test with password "correct horse".
"""

from __future__ import annotations

import base64

import pytest

from relaywarden.protocol.sasl import client_plain
from tests.support.server import DEFAULT_CONFIG
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog

USER, PASSWORD = "alice@example.test", "correct horse"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert_files):
    """The test default configuration (listeners mx and submission, user alice), delivery off."""
    server = queue_only_server(tmp_path_factory.mktemp("tls_auth") / "srv", DEFAULT_CONFIG, cert_files=cert_files,
                               users={"alice@example.test": "correct horse"})
    yield server
    server.stop()


@pytest.fixture
def mx(srv):
    with SmtpConn(srv.ports["mx"]) as c:
        yield c


@pytest.fixture
def submission(srv):
    with SmtpConn(srv.ports["submission"]) as c:
        yield c


@pytest.fixture
def submission_tls(submission, client_tls):
    """A submission connection after EHLO, STARTTLS and EHLO again."""
    assert submission.cmd("EHLO client.example.org").code == 250
    submission.starttls(client_tls)
    r = submission.cmd("EHLO client.example.org")
    assert r.code == 250
    return submission


def extension_names(reply) -> list[str]:
    return [line[4:] for line in reply.lines[1:]]


# --- STARTTLS ----------------------------------------------------------------------------------

def test_starttls_resets_the_session(srv, mx, client_tls):
    first = mx.cmd("EHLO client.example.org")
    assert "STARTTLS" in extension_names(first)
    mx.starttls(client_tls)
    assert mx.sock.version() in ("TLSv1.2", "TLSv1.3")
    replies = run_dialog(mx, """
        # RFC 3207: everything learnt before the handshake is forgotten; EHLO is needed again
        c: MAIL FROM:<sender@example.org>
        s: 503 5.5.1 Bad sequence of commands: send EHLO or HELO first
        c: EHLO client.example.org
        s: 250
        c: STARTTLS
        s: 503 5.5.1 TLS already active
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: RCPT TO:<alice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: over TLS
        c:
        c: .
        s: 250 2.0.0
    """)
    assert "STARTTLS" not in extension_names(replies[1])
    msg, data = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert msg.tls is not None and msg.tls.startswith("TLSv1.")
    received = data.split(b"\r\n\r\n", 1)[0].decode()
    assert received.startswith("Received: from client.example.org ([127.0.0.1])")
    assert "with ESMTPS id" in received and f"(using {msg.tls.split()[0]} with cipher" in received


def test_starttls_forgets_a_transaction(mx, client_tls):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<sender@example.org>
        s: 250 2.1.0
        c: STARTTLS
        s: 503 5.5.1
        c: RSET
        s: 250 2.0.0
    """)
    mx.starttls(client_tls)
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: RCPT TO:<alice@example.test>
        s: 503 5.5.1 Bad sequence of commands: need MAIL before RCPT
    """)


def test_starttls_with_argument_is_a_syntax_error(mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: STARTTLS now
        s: 501 5.5.4
    """)


def test_failed_handshake_is_logged_and_closed(srv, mx):
    run_dialog(mx, """
        c: EHLO client.example.org
        s: 250
        c: STARTTLS
        s: 220 2.0.0
        c: this is not a TLS client hello
    """)
    assert mx.closed_by_peer(10.0)
    srv.wait_for_event(lambda e: e["id"] == 1103)


# --- AUTH before TLS ------------------------------------------------------------------------------

def test_submission_before_tls(srv, submission):
    r = submission.cmd("EHLO client.example.org")
    names = extension_names(r)
    assert "STARTTLS" in names and not any(n.startswith("AUTH") for n in names)
    run_dialog(submission, f"""
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 538 5.7.11
        c: MAIL FROM:<{USER}>
        s: 530 5.7.0 Must issue a STARTTLS command first
    """)
    srv.wait_for_event(lambda e: e["id"] == 1712 and e.get("listener") == "submission")


def test_mx_has_no_auth(mx, client_tls):
    mx.cmd("EHLO client.example.org")
    mx.starttls(client_tls)
    r = mx.cmd("EHLO client.example.org")
    assert not any(n.startswith("AUTH") for n in extension_names(r))
    run_dialog(mx, f"""
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 503 5.5.1 AUTH not available
    """)


# --- AUTH after TLS -------------------------------------------------------------------------------

def test_submission_after_tls_offers_auth(submission, client_tls):
    submission.cmd("EHLO client.example.org")
    submission.starttls(client_tls)
    r = submission.cmd("EHLO client.example.org")
    assert "AUTH PLAIN LOGIN" in extension_names(r)
    assert "STARTTLS" not in extension_names(r)


def test_anonymous_mail_on_submission_is_530(srv, submission_tls):
    run_dialog(submission_tls, """
        c: MAIL FROM:<sender@example.org>
        s: 530 5.7.0
    """)
    srv.wait_for_event(lambda e: e["id"] == 1713 and e.get("listener") == "submission")


def test_auth_plain_then_relay_to_an_external_domain(srv, submission_tls):
    replies = run_dialog(submission_tls, f"""
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 503 5.5.1 Already authenticated
        c: EHLO client.example.org
        s: 250
        c: MAIL FROM:<{USER}> AUTH=<{USER}>
        s: 250 2.1.0
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 503 5.5.1 Bad sequence of commands: a mail transaction is in progress
        c: RCPT TO:<friend@example.net>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: relayed after AUTH
        c:
        c: .
        s: 250 2.0.0
    """)
    assert not any(n.startswith("AUTH") for n in extension_names(replies[2]))
    msg, data = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert msg.auth_user == USER
    assert msg.listener == "submission"
    assert msg.tls is not None
    assert [(r.address, r.verdict) for r in msg.recipients] == [("friend@example.net", "relay")]
    assert b"with ESMTPSA id" in data
    event = srv.wait_for_event(lambda e: e["id"] == 1708 and e["fields"].get("method") == "PLAIN")
    assert event["user"] == USER
    assert event["client"] == "127.0.0.1"
    assert event["listener"] == "submission"


def test_auth_plain_with_empty_initial_response_prompt(submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH PLAIN
        s: 334
        c: {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
    """)


def test_auth_login(srv, submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH LOGIN
        s: 334 VXNlcm5hbWU6
        c: {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 235 2.7.0
    """)
    event = srv.wait_for_event(lambda e: e["id"] == 1708 and e["fields"].get("method") == "LOGIN")
    assert event["user"] == USER


def test_auth_login_with_initial_response(submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH LOGIN {b64(USER)}
        s: 334 UGFzc3dvcmQ6
        c: {b64(PASSWORD)}
        s: 235 2.7.0
    """)


def test_wrong_password(srv, submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH PLAIN {client_plain(USER, "wrong horse")}
        s: 535 5.7.8
        c: MAIL FROM:<{USER}>
        s: 530 5.7.0
        # a failure does not end the session: the right password still works
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
    """)
    event = srv.wait_for_event(
        lambda e: e["id"] == 1711 and e["fields"].get("reason") == "wrong password")
    assert event["user"] == USER


def test_unknown_user(srv, submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH LOGIN
        s: 334
        c: {b64("mallory@example.test")}
        s: 334
        c: {b64("guess")}
        s: 535 5.7.8
    """)
    event = srv.wait_for_event(lambda e: e["id"] == 1711 and e.get("user") == "mallory@example.test")
    assert event["fields"]["reason"] == "no such user"
    assert event["fields"]["method"] == "LOGIN"


def test_auth_cancelled(submission_tls):
    run_dialog(submission_tls, f"""
        c: AUTH LOGIN
        s: 334
        c: *
        s: 501 5.0.0
        c: AUTH PLAIN
        s: 334
        c: *
        s: 501 5.0.0
        c: AUTH LOGIN
        s: 334
        c: {b64(USER)}
        s: 334
        c: *
        s: 501 5.0.0
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
    """)


def test_auth_syntax_errors(submission_tls):
    run_dialog(submission_tls, """
        c: AUTH
        s: 501 5.5.4
        c: AUTH CRAM-MD5
        s: 504 5.5.4
        c: AUTH PLAIN a b c
        s: 501 5.5.4
        c: AUTH PLAIN not-base64!
        s: 501 5.5.2
        c: AUTH PLAIN
        s: 334
        c: %%%%
        s: 501 5.5.2
    """)


def test_authenticated_state_is_forgotten_on_new_connection(submission_tls, srv):
    run_dialog(submission_tls, f"""
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
        c: QUIT
        s: 221 2.0.0
    """)
    with SmtpConn(srv.ports["submission"]) as again:
        run_dialog(again, """
            c: EHLO client.example.org
            s: 250
            c: MAIL FROM:<sender@example.org>
            s: 530 5.7.0
        """)


def test_queue_holds_everything_that_was_acknowledged(srv, submission_tls):
    """After the 250: envelope, Received header first, DSN parameters, auth user and TLS facts."""
    replies = run_dialog(submission_tls, f"""
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
        c: MAIL FROM:<{USER}> RET=FULL ENVID=QUEUE-CHECK-1 BODY=8BITMIME SIZE=200
        s: 250 2.1.0
        c: RCPT TO:<Friend@Example.NET> NOTIFY=FAILURE,DELAY ORCPT=rfc822;Friend+40Example.NET
        s: 250 2.1.5
        c: RCPT TO:<a.lice@example.test>
        s: 250 2.1.5
        c: DATA
        s: 354
        c: Subject: everything kept
        c:
        c: body
        c: .
        s: 250 2.0.0
    """)
    msg, data = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert msg.sender == USER
    assert [(r.original.split(" ")[0], r.verdict) for r in msg.recipients] == [
        ("<Friend@Example.NET>", "relay"), ("<a.lice@example.test>", "local")]
    friend, alias = msg.recipients
    assert friend.address.lower() == "friend@example.net"
    assert (alias.address, alias.route) == ("a.lice@example.test", USER)   # an alias goes to its mailbox
    assert (friend.notify, friend.orcpt) == (("FAILURE", "DELAY"), "rfc822;Friend@Example.NET")
    assert (msg.dsn_ret, msg.dsn_envid, msg.body_type) == ("FULL", "QUEUE-CHECK-1", "8BITMIME")
    assert msg.auth_user == USER and msg.listener == "submission" and msg.client_address == "127.0.0.1"
    assert msg.tls is not None and msg.tls.split()[0] in ("TLSv1.2", "TLSv1.3")
    assert msg.helo == "client.example.org"
    assert data.startswith(b"Received: from client.example.org ([127.0.0.1])\r\n\tby mx.example.test (relaywarden) with ESMTPSA id ")
    assert data.endswith(b"\r\nSubject: everything kept\r\n\r\nbody\r\n")
    assert msg.size == len(data)


def test_an_over_long_auth_response_ends_the_exchange(submission_tls):
    # RFC 4954 4: 500 5.5.6, and the next line is a command again, not a second response
    run_dialog(submission_tls, f"""
        c: AUTH PLAIN
        s: 334
        c: {"A" * 13000}
        s: 500 5.5.6 Authentication exchange line is too long
        c: NOOP
        s: 250 2.0.0
        c: AUTH PLAIN {client_plain(USER, PASSWORD)}
        s: 235 2.7.0
    """)
