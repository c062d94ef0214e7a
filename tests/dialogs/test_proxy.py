"""Dialogs through the PROXY protocol (v1 and v2, headers built with relaywarden.protocol.proxy).

Listeners ``proxied`` (relay list: 192.0.2.10) and ``proxied_local`` (relay list: 127.0.0.1 only)
accept a header from 127.0.0.1; the address it reports is the client in the events, the queue and
the relay decision.  ``direct`` expects PROXY only from ::1, so a loopback IPv4 client is not a
proxy there.
"""

from __future__ import annotations

import time

import pytest

from relaywarden.protocol.proxy import build_v1, build_v2
from tests.support.server import RelayServer
from tests.support.smtp import SmtpConn, queue_only_server, queued_id, read_queued, run_dialog

PROXY_CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "proxied"
address = "127.0.0.1"
port = {port:proxied}
tls = "none"
proxy_protocol = true
proxy_from = ["127.0.0.1"]
relay = { mode = "only", entries = ["192.0.2.10", "2001:db8::/64"] }

[[listener]]
name = "proxied_local"
address = "127.0.0.1"
port = {port:proxied_local}
tls = "none"
proxy_protocol = true
proxy_from = ["127.0.0.0/8"]
relay = { mode = "only", entries = ["127.0.0.1"] }

[[listener]]
name = "direct"
address = "127.0.0.1"
port = {port:direct}
tls = "none"
proxy_protocol = true
proxy_from = ["::1"]

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = queue_only_server(tmp_path_factory.mktemp("proxy") / "srv", PROXY_CONFIG)
    yield server
    server.stop()


def proxied(srv: RelayServer, listener: str, header: bytes) -> SmtpConn:
    conn = SmtpConn(srv.ports[listener], greeting=False)
    conn.send(header)
    conn.greeting = conn.reply()
    assert conn.greeting.last.startswith("220 mx.example.test"), conn.greeting
    return conn


RELAY_ATTEMPT = """
    c: EHLO proxied.example.org
    s: 250
    c: MAIL FROM:<sender@example.org>
    s: 250 2.1.0
    c: RCPT TO:<{rcpt}>
    s: {reply}
"""


def decision_event(srv: RelayServer, rcpt: str) -> dict:
    return srv.wait_for_event(lambda e: e["fields"].get("decision") and e["fields"].get("recipient") == rcpt)


def test_v1_reported_address_is_the_client_everywhere(srv):
    header = build_v1(("192.0.2.10", 40001), ("127.0.0.1", srv.ports["proxied"]))
    with proxied(srv, "proxied", header) as c:
        replies = run_dialog(c, RELAY_ATTEMPT.format(rcpt="v1@example.net", reply="250 2.1.5") + """
            c: DATA
            s: 354
            c: Subject: through a proxy
            c:
            c: .
            s: 250 2.0.0
        """)
    accepted = decision_event(srv, "v1@example.net")
    assert accepted["client"] == "192.0.2.10"
    assert accepted["fields"]["verdict"] == "relay"
    msg, data = read_queued(srv.data_dir, queued_id(replies[-1]))
    assert (msg.client_address, msg.client_port) == ("192.0.2.10", 40001)
    assert [r.verdict for r in msg.recipients] == ["relay"]
    assert data.startswith(b"Received: from proxied.example.org ([192.0.2.10])")


def test_v2_address_not_on_the_relay_list_is_refused(srv):
    header = build_v2(("198.51.100.7", 5000), ("127.0.0.1", srv.ports["proxied"]))
    with proxied(srv, "proxied", header) as c:
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="v2@example.net", reply="550 5.7.1"))
    denied = srv.wait_for_event(lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "v2@example.net")
    assert denied["client"] == "198.51.100.7"
    assert "198.51.100.7" in denied["text"]


def test_v2_ipv6_source(srv):
    header = build_v2(("2001:db8::5", 6000), ("2001:db8::1", 25))
    with proxied(srv, "proxied", header) as c:
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="v6@example.net", reply="250 2.1.5"))
    assert decision_event(srv, "v6@example.net")["client"] == "2001:db8::5"


def test_proxy_address_on_the_relay_list_does_not_open_relay(srv):
    """The relay list names only the proxy (127.0.0.1): a client behind it may not relay."""
    header = build_v1(("203.0.113.9", 40002), ("127.0.0.1", srv.ports["proxied_local"]))
    with proxied(srv, "proxied_local", header) as c:
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="behind@example.net", reply="550 5.7.1"))
    denied = srv.wait_for_event(lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "behind@example.net")
    assert denied["client"] == "203.0.113.9"


def test_v2_local_is_an_unknown_client_not_the_proxy(srv):
    """The relay list covers the proxy (127.0.0.1); a LOCAL header must not borrow its address."""
    with proxied(srv, "proxied_local", build_v2(None, None, local=True)) as c:
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="local@example.net", reply="550 5.7.1"))
    denied = srv.wait_for_event(lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "local@example.net")
    assert denied["client"] == "unknown" and denied["fields"]["proxy"] == "127.0.0.1"


def test_v1_unknown_is_an_unknown_client_not_the_proxy(srv):
    with proxied(srv, "proxied_local", build_v1(None, None)) as c:
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="unknown@example.net", reply="550 5.7.1"))
    denied = srv.wait_for_event(lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "unknown@example.net")
    assert denied["client"] == "unknown"


def test_header_in_pieces(srv):
    header = build_v2(("192.0.2.10", 7000), ("127.0.0.1", srv.ports["proxied"]))
    with SmtpConn(srv.ports["proxied"], greeting=False) as c:
        for i in range(0, len(header), 5):
            c.send(header[i:i + 5])
            time.sleep(0.01)
        assert c.reply().last.startswith("220 ")
        run_dialog(c, RELAY_ATTEMPT.format(rcpt="pieces@example.net", reply="250 2.1.5"))
    assert decision_event(srv, "pieces@example.net")["client"] == "192.0.2.10"


def test_no_greeting_before_the_header(srv):
    with SmtpConn(srv.ports["proxied"], greeting=False) as c:
        c.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.reply()


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 not-an-address 127.0.0.1 1 25\r\n",
    b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 25\r\n",
    b"PROXY TCP9 192.0.2.1 127.0.0.1 1 25\r\n",
    b"EHLO client.example.org\r\n",
    b"\r\n\r\n\x00\r\nQUIX\n",
])
def test_malformed_header_closes_the_connection(srv, bad):
    with SmtpConn(srv.ports["proxied"], greeting=False) as c:
        c.send(bad)
        assert c.closed_by_peer(5.0)
        assert c.buf == b"", "nothing may be said to a connection whose header is bad"
    srv.wait_for_event(lambda e: e["id"] == 1104 and e.get("listener") == "proxied")


def test_corrupt_v2_checksum_is_refused(srv):
    header = bytearray(build_v2(("192.0.2.10", 1), ("127.0.0.1", 25), checksum=True))
    header[-1] ^= 0xFF
    with SmtpConn(srv.ports["proxied"], greeting=False) as c:
        c.send(bytes(header))
        assert c.closed_by_peer(5.0)


def test_header_from_an_address_that_is_not_a_proxy(srv):
    """On ``direct`` only ::1 may send PROXY: 127.0.0.1 is a client, greeted at once."""
    with SmtpConn(srv.ports["direct"]) as c:
        assert c.greeting.last.startswith("220 ")
        header = build_v1(("192.0.2.10", 1), ("127.0.0.1", 25)).decode().rstrip("\r\n")
        run_dialog(c, f"""
            c: {header}
            s: 500 5.5.1
            c: EHLO client.example.org
            s: 250
            c: MAIL FROM:<sender@example.org>
            s: 250 2.1.0
            c: RCPT TO:<direct@example.net>
            s: 550 5.7.1
        """)
    denied = srv.wait_for_event(lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "direct@example.net")
    assert denied["client"] == "127.0.0.1"
