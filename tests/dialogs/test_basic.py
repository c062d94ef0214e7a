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


def test_a_client_that_leaves_right_after_the_dot_has_its_message_queued_once_and_counted(default_server):
    # the session's summary waits for the queue's answer: it comes after the queued message and
    # counts it, whichever of the commit and the close comes first
    import socket
    import time

    def session_records() -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = {}
        for e in default_server.events():
            if e["id"] in (3001, 1109) and e.get("session"):
                found.setdefault(e["session"], []).append(e)
        return found

    def mine() -> dict[str, list[dict]]:
        return {k: v for k, v in session_records().items()
                if any(e["id"] == 1109 and e["fields"].get("helo") == "leaving.example" for e in v)}

    for n in range(5):
        with socket.create_connection(("127.0.0.1", default_server.ports["mx"]), timeout=5) as sock:
            reader = sock.makefile("rb")
            reader.readline()                                              # 220
            sock.sendall(b"HELO leaving.example\r\n")
            assert reader.readline().startswith(b"250")
            sock.sendall(b"MAIL FROM:<sender@example.org>\r\n")
            assert reader.readline().startswith(b"250")
            sock.sendall(b"RCPT TO:<alice@example.test>\r\n")
            assert reader.readline().startswith(b"250")
            sock.sendall(b"DATA\r\n")
            assert reader.readline().startswith(b"354")
            sock.sendall(f"Subject: leaving {n}\r\n\r\nbye\r\n.\r\n".encode())
            sock.shutdown(socket.SHUT_RDWR)                                # gone before the 250
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new = mine()
        if len(new) == 5:
            break
        time.sleep(0.2)
    assert len(new) == 5, new
    for records in new.values():
        assert [e["id"] for e in records] == [3001, 1109]                  # summary after the message
        assert records[1]["fields"]["messages"] == 1
