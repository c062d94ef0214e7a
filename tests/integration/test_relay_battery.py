"""The open-relay battery over real sockets: every relay attempt refused with a 5xx, every
legitimate recipient accepted with a 250, and nothing queued for what was refused.

The attempts come from ``tests/support/relay_attempts.py``.  They run unauthenticated against:
(a) the test default configuration (listener ``mx``, and ``submission`` with and without TLS);
(b) a configuration whose relay lists (mode ``only``) name addresses close to, but not, the
loopback client - on an IPv4 and an IPv6 listener;
(c) a configuration with an internal-relay and an external-relay domain, the battery built from
each accepted domain in turn.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from relaywarden.queue.store import SqliteQueue
from relaywarden.diagnose.relay_attempts import ACCEPTED, REFUSED, RelayAttempt, outcome, relay_attempts
from tests.support.server import DEFAULT_CONFIG, RelayServer
from tests.support.smtp import SmtpConn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BATTERY_HELO = "battery.relaytest.example.net"
# Delivery stays off: what is queued stays readable, and no test reaches beyond loopback.
NO_DELIVERY = "\n[delivery]\nenabled = false\n"

RELAY_LIST_CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
anonymous = true
relay = { mode = "only", entries = ["127.0.0.2", "127.0.1.0/24", "192.0.2.0/24", "::ffff:192.0.2.1", "::ffff:127.0.0.2", "2001:db8::/32", "relay.example.net"] }

[[listener]]
name = "mx6"
address = "::1"
port = {port:mx6}
tls = "none"
anonymous = true
relay = { mode = "only", entries = ["::2", "192.0.2.0/24", "::ffff:127.0.0.1", "2001:db8::/32", "fe80::/10"] }

[[domain]]
name = "example.test"
kind = "authoritative"

[[mailbox]]
address = "postmaster@example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["a.lice@example.test"]

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
""" + NO_DELIVERY

DOMAIN_KINDS_CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
anonymous = true

[[domain]]
name = "example.test"
kind = "authoritative"

[[domain]]
name = "shared.test"
kind = "internal-relay"
route = "legacy"

[[domain]]
name = "partner.test"
kind = "external-relay"
route = "partner"

[[mailbox]]
address = "postmaster@example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["a.lice@example.test"]

[[mailbox]]
address = "bob@shared.test"

[[route]]
name = "legacy"
domains = ["shared.test"]
kind = "smarthost"
hosts = ["192.0.2.25:25"]

[[route]]
name = "partner"
domains = ["partner.test"]
kind = "smarthost"
hosts = ["192.0.2.26:25"]

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
""" + NO_DELIVERY


# --- running the battery --------------------------------------------------------------------


def run_attempt(port: int, host: str, attempt: RelayAttempt, *,
                tls: ssl.SSLContext | None = None) -> tuple[str, str]:
    """One attempt on its own connection: (outcome, transcript).  Never sends a message."""
    mail_cmd, rcpt_cmd = attempt.commands
    with SmtpConn(port, host) as c:
        assert c.greeting.code == 220, c.greeting
        assert c.cmd(f"EHLO {BATTERY_HELO}").code == 250
        if tls is not None:
            c.starttls(tls)
            assert c.cmd(f"EHLO {BATTERY_HELO}").code == 250
        mail = c.cmd(mail_cmd)
        rcpt = c.cmd(rcpt_cmd) if mail.code < 400 else None
        transcript = f"{mail_cmd} -> {mail.last}" + (f" | {rcpt_cmd} -> {rcpt.last}" if rcpt else "")
        result = outcome(mail.code, rcpt.code if rcpt else None)
        if result == REFUSED and mail.code < 400:
            # Nothing was accepted, so DATA must not open a message.
            data = c.cmd("DATA")
            assert data.code != 354, f"{transcript} | DATA -> {data.last}"
            c.cmd("QUIT")
    return result, transcript


def run_battery(port: int, host: str, attempts: list[RelayAttempt], *,
                tls: ssl.SSLContext | None = None) -> list[str]:
    """Every attempt that was not refused with a 5xx, with its transcript."""
    failures = []
    for attempt in attempts:
        result, transcript = run_attempt(port, host, attempt, tls=tls)
        if result != REFUSED:
            failures.append(f"{attempt.name}: {result}: {transcript}")
    return failures


def queue_contents(srv: RelayServer) -> dict[str, list[str]]:
    """Queue id -> recipient addresses of every message in the server's queue."""
    q = SqliteQueue(srv.data_dir / "queue.sqlite")
    try:
        assert q.count() == len(listing := q.due(time.time() + 10**9, 10_000))
        return {qid: [r.address for r in rcpts] for qid, rcpts in listing}
    finally:
        q.close()


def battery_sessions_accepted_nothing(srv: RelayServer) -> None:
    """No battery session logged an accepted recipient (read after a marker session's summary)."""
    with SmtpConn(next(iter(srv.ports.values()))) as c:
        c.cmd("EHLO end-of-battery.example.net")
        c.cmd("QUIT")
    srv.wait_for_event(lambda e: e["name"] == "SESSION_SUMMARY"
                       and e["fields"].get("helo") == "end-of-battery.example.net", timeout=10)
    events = srv.events()
    battery = {e.get("session") for e in events if e["name"] == "SESSION_SUMMARY"
               and e["fields"].get("helo") == BATTERY_HELO}
    assert battery, "the battery sessions left no summary"
    accepted = [e for e in events if e.get("session") in battery and e["name"] == "RECIPIENT_ACCEPTED"]
    assert not accepted, accepted


def send_legitimate(port: int, recipients: list[str], host: str = "127.0.0.1") -> list[str]:
    """RCPT each recipient, then send one message; the refused ones are returned."""
    refused = []
    with SmtpConn(port, host) as c:
        assert c.cmd("EHLO legit.example.net").code == 250
        assert c.cmd("MAIL FROM:<sender@example.net>").code == 250
        for rcpt in recipients:
            r = c.cmd(f"RCPT TO:<{rcpt}>")
            if r.code != 250:
                refused.append(f"{rcpt}: {r.last}")
        if len(refused) < len(recipients):
            assert c.cmd("DATA").code == 354
            c.send("Subject: legitimate\r\n\r\nhello\r\n.\r\n")
            assert c.reply().code == 250
        c.cmd("QUIT")
    return refused


def test_battery_has_at_least_thirty_distinct_attempts():
    attempts = relay_attempts("example.test", "alice@example.test", "192.0.2.1")
    assert len(attempts) >= 30
    assert len({a.commands for a in attempts}) == len(attempts)
    assert len({a.name for a in attempts}) == len(attempts)
    # No attempt is a plain local recipient: each one must be refused everywhere.
    plain = [a for a in attempts if a.rcpt_to.lower() in ("<alice@example.test>", "<postmaster@example.test>")]
    assert not plain


def test_outcome_classifies_replies():
    assert outcome(250, 550) == REFUSED
    assert outcome(530, None) == REFUSED
    assert outcome(250, 451) != REFUSED
    assert outcome(250, 250) == ACCEPTED
    with pytest.raises(ValueError):
        outcome(250, None)


# --- (a) the default test configuration ---------------------------------------------------------


@pytest.fixture(scope="module")
def default_srv(tmp_path_factory, cert_files):
    srv = RelayServer(DEFAULT_CONFIG + NO_DELIVERY, tmp_path_factory.mktemp("battery-default") / "srv",
                      cert=cert_files[0], key=cert_files[1])
    srv.start()
    yield srv
    srv.stop()


def test_default_config_mx_refuses_every_relay_attempt(default_srv):
    attempts = relay_attempts("example.test", "alice@example.test", "127.0.0.1")
    failures = run_battery(default_srv.ports["mx"], "127.0.0.1", attempts)
    assert not failures, "\n".join(failures)
    assert queue_contents(default_srv) == {}
    battery_sessions_accepted_nothing(default_srv)


def test_default_config_submission_refuses_unauthenticated_relay(default_srv, client_tls):
    attempts = relay_attempts("example.test", "alice@example.test", "127.0.0.1")
    port = default_srv.ports["submission"]
    assert not run_battery(port, "127.0.0.1", attempts)                    # 530 5.7.0: STARTTLS first
    assert not run_battery(port, "127.0.0.1", attempts, tls=client_tls)    # 530 5.7.0: AUTH first
    result, transcript = run_attempt(port, "127.0.0.1", attempts[0], tls=client_tls)
    assert "530 5.7.0" in transcript, transcript
    assert queue_contents(default_srv) == {}


def test_default_config_accepts_legitimate_recipients(default_srv):
    legit = ["alice@example.test", "a.lice@example.test", "ALICE@example.test", "Alice@EXAMPLE.TEST",
             "postmaster@example.test", "Postmaster"]
    before = queue_contents(default_srv)
    assert send_legitimate(default_srv.ports["mx"], legit) == []
    after = queue_contents(default_srv)
    new = [rcpts for qid, rcpts in after.items() if qid not in before]
    # every RCPT got its 250; the message is queued once per mailbox (alice, postmaster)
    assert len(new) == 1 and sorted(new[0]) == ["alice@example.test", "postmaster@example.test"], after


# --- (b) relay lists that name addresses near, but not, the client ------------------------------


def start_with_ipv6(srv: RelayServer, ipv6_listeners: tuple[str, ...]) -> RelayServer:
    """Start a server with listeners on ::1 (``RelayServer.start`` waits on 127.0.0.1 only)."""
    v6 = {name: srv.ports.pop(name) for name in ipv6_listeners}
    try:
        srv.start()
    finally:
        srv.ports.update(v6)
    deadline = time.monotonic() + 10
    for port in v6.values():
        while True:
            try:
                socket.create_connection(("::1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    return srv


@pytest.fixture(scope="module")
def relay_list_srv(tmp_path_factory):
    srv = RelayServer(RELAY_LIST_CONFIG, tmp_path_factory.mktemp("battery-relay-list") / "srv")
    start_with_ipv6(srv, ("mx6",))
    yield srv
    srv.stop()


def test_relay_list_ipv4_listener_refuses_every_relay_attempt(relay_list_srv):
    attempts = relay_attempts("example.test", "alice@example.test", "127.0.0.1")
    failures = run_battery(relay_list_srv.ports["mx"], "127.0.0.1", attempts)
    assert not failures, "\n".join(failures)
    assert queue_contents(relay_list_srv) == {}


def test_relay_list_ipv6_listener_refuses_every_relay_attempt(relay_list_srv):
    attempts = relay_attempts("example.test", "alice@example.test", "::1")
    failures = run_battery(relay_list_srv.ports["mx6"], "::1", attempts)
    assert not failures, "\n".join(failures)
    assert queue_contents(relay_list_srv) == {}
    battery_sessions_accepted_nothing(relay_list_srv)


def test_relay_list_refusal_names_the_real_cause(relay_list_srv):
    with SmtpConn(relay_list_srv.ports["mx"]) as c:
        c.cmd("EHLO cause.example.net")
        c.cmd("MAIL FROM:<a@example.net>")
        r = c.cmd("RCPT TO:<b@example.org>")
    assert r.last.startswith("550 5.7.1 Relay access denied: example.org is not a domain"), r
    event = relay_list_srv.wait_for_event(
        lambda e: e["id"] == 1709 and e["fields"].get("recipient") == "b@example.org")
    assert "127.0.0.1 is neither on the relay list of listener mx" in event["text"]


def test_relay_list_server_accepts_legitimate_recipients(relay_list_srv):
    legit = ["alice@example.test", "a.lice@example.test", "ALICE@Example.Test"]
    assert send_legitimate(relay_list_srv.ports["mx"], legit) == []
    assert send_legitimate(relay_list_srv.ports["mx6"], legit, host="::1") == []
    assert len(queue_contents(relay_list_srv)) == 2


def test_ipv4_mapped_catch_all_on_a_relay_list_is_refused_at_start(tmp_path):
    """``::ffff:0:0/96`` matches every IPv4 client: it is 0.0.0.0/0 in disguise."""
    config = RELAY_LIST_CONFIG.replace('"::ffff:192.0.2.1"', '"::ffff:0:0/96"')
    srv = RelayServer(config, tmp_path / "srv")
    try:
        with pytest.raises(RuntimeError, match="(?i)open relay|::ffff:0:0/96"):
            srv.start(timeout=10)
    finally:
        srv.stop()


# --- (c) internal-relay and external-relay domains ---------------------------------------------


@pytest.fixture(scope="module")
def domain_kinds_srv(tmp_path_factory):
    srv = RelayServer(DOMAIN_KINDS_CONFIG, tmp_path_factory.mktemp("battery-domains") / "srv")
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(("local_domain", "local_address"), [
    ("example.test", "alice@example.test"),
    ("shared.test", "bob@shared.test"),
    ("partner.test", "someone@partner.test"),
])
def test_domain_kinds_refuse_every_relay_attempt(domain_kinds_srv, local_domain, local_address):
    attempts = relay_attempts(local_domain, local_address, "127.0.0.1")
    failures = run_battery(domain_kinds_srv.ports["mx"], "127.0.0.1", attempts)
    assert not failures, "\n".join(failures)
    assert queue_contents(domain_kinds_srv) == {}
    battery_sessions_accepted_nothing(domain_kinds_srv)


def test_domain_kinds_accept_legitimate_recipients(domain_kinds_srv):
    legit = ["alice@example.test", "A.Lice@example.test", "bob@shared.test", "BOB@Shared.Test",
             "unknown-user@shared.test", "anyone@partner.test", "Someone.Else@PARTNER.test"]
    assert send_legitimate(domain_kinds_srv.ports["mx"], legit) == []
    contents = queue_contents(domain_kinds_srv)
    assert len(contents) == 1
    (qid, recipients), = contents.items()
    # one queue entry per mailbox or forwarded address: alice (twice by alias), bob (twice by case)
    assert len(recipients) == len(legit) - 2
    assert not any("relaytest" in r for r in recipients)
    with SqliteQueue(domain_kinds_srv.data_dir / "queue.sqlite") as q:
        decided = {r.original.strip("<>"): (r.verdict, r.route) for r in q.recipients(qid)}
    assert decided["alice@example.test"][0] == "local"
    assert decided["bob@shared.test"][0] == "local"
    assert decided["unknown-user@shared.test"] == ("forward", "legacy")
    assert decided["anyone@partner.test"] == ("forward", "partner")
    assert not [v for v in decided.values() if v[0] == "relay"]


# --- the battery can fail: a client that may relay is caught by it -----------------------------


def test_battery_reports_a_client_that_may_relay(tmp_path):
    """With 127.0.0.1 on the relay list the plain attempts relay, and the battery says so; the
    routing forms through an accepted domain are still refused."""
    config = DOMAIN_KINDS_CONFIG.replace('anonymous = true\n', 'anonymous = true\nrelay = { mode = "only", entries = ["127.0.0.1"] }\n', 1)
    srv = RelayServer(config, tmp_path / "srv").start()
    try:
        attempts = {a.name: a for a in relay_attempts("example.test", "alice@example.test", "127.0.0.1")}
        port = srv.ports["mx"]
        assert run_attempt(port, "127.0.0.1", attempts["foreign sender, foreign recipient"])[0] == ACCEPTED
        assert run_attempt(port, "127.0.0.1", attempts["null sender"])[0] == ACCEPTED
        failures = run_battery(port, "127.0.0.1", list(attempts.values()))
        assert any(f.startswith("local sender spoofed: accepted") for f in failures), failures
        for name in ("percent hack via local domain", "quoted @ via local domain",
                     "bang path via local domain", "double @, local domain last"):
            assert run_attempt(port, "127.0.0.1", attempts[name])[0] == REFUSED, name
    finally:
        srv.stop()
