"""Basic dialogs against the real server over real sockets."""

from tests.support.smtp import SmtpConn, run_dialog


def test_local_delivery_dialog(default_server):
    with SmtpConn(default_server.ports["mx"]) as c:
        assert c.greeting.last.startswith("220 mx.example.test ESMTP")
        run_dialog(c, """
            c: EHLO client.example.org
            s: 250 
            c: MAIL FROM:<sender@example.org>
            s: 250 2.1.0
            c: RCPT TO:<alice@example.test>
            s: 250 2.1.5
            c: RCPT TO:<nobody@example.test>
            s: 550 5.1.1
            c: RCPT TO:<victim@example.net>
            s~ 550 5\\.7\\.1 Relay access denied: example\\.net is not a domain this server accepts mail for.*\\[decision [0-9a-f]+\\]
            c: DATA
            s: 354
            c: Subject: hi
            c:
            c: hello
            c: .
            s~ 250 2\\.0\\.0 .*queued as [0-9a-f]+
            c: QUIT
            s: 221 2.0.0
        """)


def test_the_same_mailbox_twice_is_queued_once(default_server):
    from tests.support.smtp import queued_id, read_queued

    with SmtpConn(default_server.ports["mx"]) as c:
        replies = run_dialog(c, """
            c: EHLO client.example.org
            s: 250
            c: MAIL FROM:<sender@example.org>
            s: 250 2.1.0
            c: RCPT TO:<alice@example.test>
            s: 250 2.1.5
            c: RCPT TO:<ALICE@example.test>
            s: 250 2.1.5
            c: RCPT TO:<a.lice@example.test>
            s: 250 2.1.5
            c: RCPT TO:<postmaster@example.test>
            s: 250 2.1.5
            c: DATA
            s: 354
            c: Subject: twice
            c:
            c: x
            c: .
            s: 250 2.0.0
        """)
    message, _ = read_queued(default_server.data_dir, queued_id(replies[-1]))
    assert sorted(r.route for r in message.recipients) == ["alice@example.test", "postmaster@example.test"]
