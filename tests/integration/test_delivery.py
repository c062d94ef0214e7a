"""Delivery end to end: relaywarden accepts, the queue runner delivers over MX (nsd on loopback)
to Postfix's smtp-sink or to local Maildirs, retries 4xx, and bounces 5xx with an NDR that a
real parser reads back."""

from __future__ import annotations

import email
import smtplib
import time

import pytest

from relaywarden.queue.store import SqliteQueue
from tests.support import nsd, sink

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (nsd.available() and sink.available()),
                                 reason="nsd and smtp-sink needed (scripts/install-peers)")]

CONFIG = """
[server]
hostname = "mx.example.test"
auth_failure_delay = 0.0

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "none"
anonymous = false
auth = ["PLAIN"]
auth_plaintext = true
allow_authenticated = true

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["al@example.test"]

[[route]]
name = "internet"
domains = ["*"]
kind = "mx"
port = SINKPORT
tls = "none"

[dns]
nameservers = ["127.0.0.1"]
port = DNSPORT
timeout = 2.0

[delivery]
min_backoff = 1.0
max_backoff = 2.0
max_lifetime = LIFETIME
poll_interval = 0.2
"""

ZONES = {"dest.test": "@ IN MX 10 mail.dest.test.\nmail IN A 127.0.0.1\n",
         "nullmx.test": "@ IN MX 0 .\n"}


@pytest.fixture
def world(tmp_path, start_server):
    def make(*sink_options: str, lifetime: float = 3600.0):
        dns = nsd.NsdServer(tmp_path, ZONES).start()
        peer = sink.SmtpSink(tmp_path, *sink_options).start()
        config = (CONFIG.replace("SINKPORT", str(peer.port)).replace("DNSPORT", str(dns.port))
                  .replace("LIFETIME", str(lifetime)))
        srv = start_server(config, users={"alice@example.test": "pw"})
        cleanups.extend([peer.stop, dns.stop])
        return srv, peer
    cleanups: list = []
    yield make
    for c in cleanups:
        c()


def submit(srv, to: list[str], body: str = "Subject: test\r\n\r\nhello\r\n", sender="alice@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.login("alice@example.test", "pw")
        s.sendmail(sender, to, body)


def maildir_messages(srv, mailbox="alice@example.test") -> list[email.message.Message]:
    local, _, domain = mailbox.partition("@")
    new = srv.data_dir / "mail" / domain / local / "new"
    if not new.exists():
        return []
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(new.iterdir())]


def wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def queue_count(srv) -> int:
    q = SqliteQueue(srv.data_dir / "queue.sqlite")
    try:
        return q.count()
    finally:
        q.close()


def test_relay_over_mx_to_a_sink_and_local_delivery(world):
    srv, peer = world()
    submit(srv, ["bob@dest.test", "al@example.test"])
    [msg] = peer.wait_for(1)
    assert b"Subject: test" in msg and b"Received: from" in msg
    [local] = wait(lambda: maildir_messages(srv))
    assert local["Delivered-To"] == "al@example.test" and local["Return-Path"] == "<alice@example.test>"
    wait(lambda: queue_count(srv) == 0)
    delivered = wait(lambda: {e["fields"]["recipient"] for e in srv.events() if e["name"] == "DELIVERED"} == {"bob@dest.test", "al@example.test"})
    assert delivered


def test_permanent_refusal_bounces_to_the_sender_with_a_readable_ndr(world):
    srv, peer = world("-f", "RCPT")        # smtp-sink answers RCPT with a 5xx
    submit(srv, ["bob@dest.test"])
    [ndr] = wait(lambda: maildir_messages(srv))
    assert ndr.get_content_type() == "multipart/report"
    status = [p for p in ndr.walk() if p.get_content_type() == "message/delivery-status"][0]
    text = status.as_string()
    assert "Final-Recipient: rfc822; bob@dest.test" in text and "Action: failed" in text
    assert "Remote-MTA: dns; mail.dest.test" in text
    from flufl.bounce import scan_message
    assert {a.decode() if isinstance(a, bytes) else a for a in scan_message(ndr)} == {"bob@dest.test"}
    wait(lambda: queue_count(srv) == 0)
    assert wait(lambda: {7004, 4001, 7003} <= {e["id"] for e in srv.events()})


def test_null_mx_fails_at_once_with_5_1_10(world):
    srv, _ = world()
    submit(srv, ["bob@nullmx.test"])
    [ndr] = wait(lambda: maildir_messages(srv))
    assert "5.1.10" in ndr.as_string()


def test_temporary_failure_is_retried_then_expires_with_5_4_7(world):
    srv, peer = world("-r", "RCPT", lifetime=3.0)     # 4xx to every RCPT; 3 s queue lifetime
    submit(srv, ["bob@dest.test"])
    wait(lambda: any(e["name"] == "DEFERRED" for e in srv.events()))
    [ndr] = wait(lambda: maildir_messages(srv), timeout=30)
    assert "Status: 5.4.7" in ndr.as_string()
    assert wait(lambda: len([e for e in srv.events() if e["name"] == "DEFERRED"]) >= 2)


def test_null_sender_never_gets_an_ndr(world):
    srv, _ = world("-f", "RCPT")
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.login("alice@example.test", "pw")
        s.sendmail("<>", ["bob@dest.test"], "Subject: x\r\n\r\nx\r\n")
    wait(lambda: any(e["name"] == "DELIVERY_FAILED" for e in srv.events()))
    wait(lambda: queue_count(srv) == 0)
    time.sleep(1.5)     # info events reach the disk within a second
    assert not any(e["name"] == "NDR_GENERATED" for e in srv.events())


# --- a second relaywarden as the next hop: smarthost with STARTTLS + AUTH, relay refusals -------

PEER_CONFIG = """
[server]
hostname = "smarthost.example.net"
auth_failure_delay = 0.0

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "starttls"
certificate = "{cert}"
key = "{key}"

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
require_tls = true
anonymous = false
auth = ["PLAIN", "LOGIN"]
allow_authenticated = true

[[domain]]
name = "example.net"

[[mailbox]]
address = "relay@example.net"

[[route]]
name = "out"
domains = ["*"]
kind = "smarthost"
hosts = ["127.0.0.1:SINKPORT"]
tls = "none"

[delivery]
poll_interval = 0.2
"""

SMARTHOST_CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "none"
anonymous = false
auth = ["PLAIN"]
auth_plaintext = true
allow_authenticated = true

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"

[[route]]
name = "smarthost"
domains = ["*"]
kind = "smarthost"
hosts = ["127.0.0.1:PEERPORT"]
tls = "TLSPOLICY"
ca_file = "CAFILE"
CREDENTIALS

[delivery]
min_backoff = 1.0
max_backoff = 2.0
max_lifetime = 3600.0
poll_interval = 0.2
"""


@pytest.fixture
def chain(tmp_path, start_server, ca):
    """alice -> relaywarden A -> smarthost (relaywarden B, STARTTLS+AUTH) -> smtp-sink."""
    stops: list = []

    def make(*, listener: str = "submission", credentials: bool = True, tls: str = "required"):
        peer_sink = sink.SmtpSink(tmp_path).start()
        stops.append(peer_sink.stop)
        peer = start_server(PEER_CONFIG.replace("SINKPORT", str(peer_sink.port)),
                            users={"relay@example.net": "relay-pw"}, name="peer")
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        pw = tmp_path / "route-password"
        pw.write_text("relay-pw\n")
        creds = f'username = "relay@example.net"\npassword_file = "{pw}"' if credentials else ""
        config = (SMARTHOST_CONFIG.replace("PEERPORT", str(peer.ports[listener])).replace("TLSPOLICY", tls)
                  .replace("CAFILE", str(ca_file)).replace("CREDENTIALS", creds))
        srv = start_server(config, users={"alice@example.test": "pw"}, name="relay")
        return srv, peer, peer_sink

    yield make
    for s in stops:
        s()


def test_smarthost_with_starttls_and_auth_delivers(chain):
    srv, peer, peer_sink = chain()
    submit(srv, ["carol@example.org"])
    [msg] = peer_sink.wait_for(1)
    assert msg.count(b"Received: from") >= 2          # through both relays
    assert peer.wait_for_event(lambda e: e["name"] == "AUTH_SUCCEEDED" and e.get("user") == "relay@example.net")


def test_route_without_credentials_bounces_with_the_scenario_5_fix(chain):
    srv, _, _ = chain(credentials=False)
    submit(srv, ["carol@example.org"])
    [ndr] = wait(lambda: maildir_messages(srv))
    text = ndr.as_string()
    assert "530" in text and "5.7.0" in text
    assert "username" in text and "password_file" in text      # the fix names the route's keys
    assert "do not have permission" not in text


def test_remote_relay_denial_is_explained_not_called_a_permission_problem(chain):
    # the next hop's anonymous mx listener refuses to relay for us: 550 5.7.1
    srv, _, _ = chain(listener="mx", credentials=False, tls="opportunistic")
    submit(srv, ["carol@example.org"])
    [ndr] = wait(lambda: maildir_messages(srv))
    human = next(p for p in ndr.walk() if p.get_content_type() == "text/plain").get_payload(decode=True).decode()
    assert "5.7.1" in ndr.as_string()
    assert "relay" in human.lower() and "do not have permission" not in human


def test_unreachable_host_defers_and_keeps_the_message(world):
    srv, peer = world()
    peer.stop()                                            # nothing listens on the MX port now
    submit(srv, ["bob@dest.test"])
    event = wait(lambda: next((e for e in srv.events() if e["name"] == "DEFERRED"), None))
    assert event["fields"]["command"] == "CONNECT"
    assert queue_count(srv) == 1


def test_connection_dropped_mid_data_is_retried(world):
    srv, peer = world("-q", ".")                           # smtp-sink hangs up after the final dot
    submit(srv, ["bob@dest.test"])
    assert wait(lambda: len([e for e in srv.events() if e["name"] == "DEFERRED"]) >= 1)
    assert queue_count(srv) == 1


def _send_with_notify(srv, to: str, notify: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.login("alice@example.test", "pw")
        s.sendmail("alice@example.test", [to], "Subject: dsn\r\n\r\nx\r\n", rcpt_options=[f"NOTIFY={notify}"])


def test_notify_success_to_a_next_hop_without_dsn_gives_a_relayed_report(world):
    srv, peer = world("-N")                    # smtp-sink without the DSN extension
    _send_with_notify(srv, "bob@dest.test", "SUCCESS,FAILURE")
    peer.wait_for(1)
    [report] = wait(lambda: maildir_messages(srv))
    text = report.as_string()
    assert "Action: relayed" in text and "Status: 2.0.0" in text
    assert report["Subject"] == "Mail Relayed (no further delivery reports)"


def test_notify_success_to_a_next_hop_with_dsn_is_passed_on_not_answered(world):
    srv, peer = world()                        # smtp-sink offers DSN: it gets NOTIFY and reports itself
    _send_with_notify(srv, "bob@dest.test", "SUCCESS")
    [msg] = peer.wait_for(1)
    wait(lambda: queue_count(srv) == 0)
    time.sleep(1.0)
    assert maildir_messages(srv) == []


def test_notify_success_for_local_delivery_gives_a_delivered_report(world):
    srv, _ = world()
    _send_with_notify(srv, "al@example.test", "SUCCESS")
    msgs = wait(lambda: [m for m in maildir_messages(srv) if m["Subject"] == "Successful Mail Delivery Report"])
    assert "Action: delivered" in msgs[0].as_string()


def test_notify_never_suppresses_the_ndr(world):
    srv, _ = world("-f", "RCPT")
    _send_with_notify(srv, "bob@dest.test", "NEVER")
    wait(lambda: queue_count(srv) == 0)
    time.sleep(1.0)
    assert maildir_messages(srv) == []
