"""``relaywarden doctor --check scenarios.N --json`` against real servers with real traffic.

For each of KB 895853's scenarios 1, 2, 4, 5 and 6: a server configured with the scenario's
mistake, the SMTP traffic that makes it visible in the event log, the doctor's failure naming the
exact key with its file:line (or command), and the healthy configuration it reports ok.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from relaywarden.protocol.proxy import build_v1
from relaywarden.protocol.sasl import client_plain
from tests.support import nsd
from tests.support.server import RelayServer
from tests.support.smtp import SmtpConn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

USER, PASSWORD = "alice@example.test", "correct horse"
NO_DELIVERY = "\n[delivery]\nenabled = false\n"

COMMON = """
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
"""


# --- helpers ---------------------------------------------------------------------------------


def doctor(srv: RelayServer, check: str, *, config: Path | None = None, offline: bool = True) -> tuple[int, list[dict]]:
    args = ["doctor", "--config", str(config or srv.config_path), "--data-dir", str(srv.data_dir),
            "--check", check, "--json", "--timeout", "3"]
    if offline:
        args.append("--offline")
    r = srv.run_cli(*args)
    assert r.returncode in (0, 1, 2), r.stderr
    out = json.loads(r.stdout)
    assert out["exit_code"] == r.returncode
    findings = [f for f in out["findings"] if f["check"].startswith(check)]
    assert findings, out
    return r.returncode, findings


def line_of(path: Path, text: str, *, after: str | None = None) -> int:
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = lines.index(after) if after is not None else 0
    return lines.index(text, start) + 1


def fixed(srv: RelayServer, old: str, new: str, *, after: str | None = None) -> Path:
    """A copy of the server's configuration with one line changed (the administrator's fix)."""
    lines = srv.config_path.read_text().splitlines()
    index = line_of(srv.config_path, old, after=after) - 1
    lines[index] = new
    path = srv.config_path.with_name("fixed.toml")
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_events(srv: RelayServer, event_id: int, count: int = 1, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in srv.events() if e["id"] == event_id]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} events {event_id}: {[e['id'] for e in srv.events()]}")


def authenticate(c: SmtpConn, client_tls) -> None:
    assert c.cmd("EHLO client.example.test").code == 250
    c.starttls(client_tls)
    assert c.cmd("EHLO client.example.test").code == 250
    assert c.cmd(f"AUTH PLAIN {client_plain(USER, PASSWORD)}").code == 235


def send(port: int, rcpt: str, *, sender: str = "someone@example.org", helo: str = "mail.example.org",
         proxy: bytes | None = None) -> str:
    """One anonymous session up to RCPT; the last RCPT (or MAIL) reply line."""
    with SmtpConn(port, greeting=proxy is None) as c:
        if proxy is not None:
            c.send(proxy)
            c.reply()
        c.cmd(f"EHLO {helo}")
        r = c.cmd(f"MAIL FROM:<{sender}>")
        if r.code == 250:
            r = c.cmd(f"RCPT TO:<{rcpt}>")
        c.cmd("QUIT")
    return r.last


# --- scenario 1 ------------------------------------------------------------------------------

SCENARIO_1 = """
[server]
hostname = "mx.example.test"
auth_failure_delay = 0.0

[[listener]]
name = "smtp"
address = "127.0.0.1"
port = {port:smtp}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
auth = ["PLAIN", "LOGIN"]
allow_authenticated = false

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
anonymous = false
auth = ["PLAIN", "LOGIN"]
allow_authenticated = true
""" + COMMON + NO_DELIVERY


def relay_as_alice(port: int, client_tls) -> str:
    with SmtpConn(port) as c:
        authenticate(c, client_tls)
        assert c.cmd(f"MAIL FROM:<{USER}>").code == 250
        r = c.cmd("RCPT TO:<friend@example.org>")
        c.cmd("QUIT")
    return r.last


def test_scenario_1_refused_authenticated_relay_fails_with_allow_authenticated(start_server, client_tls):
    srv = start_server(SCENARIO_1, users={USER: PASSWORD})
    assert relay_as_alice(srv.ports["smtp"], client_tls).startswith("550 5.7.1")
    wait_events(srv, 1710)
    code, findings = doctor(srv, "scenarios.1")
    assert code == 2
    (fail,) = [f for f in findings if f["level"] == "fail"]
    line = line_of(srv.config_path, "allow_authenticated = false", after='name = "smtp"')
    where = f"{srv.config_path}:{line}"
    assert fail["where"] == where and fail["section"].startswith("scenario 1")
    assert fail["fix"].startswith(f"set allow_authenticated = true on listener smtp ({where})")
    assert "listener submission" in fail["fix"]
    assert any(f"{USER} (1)" in e for e in fail["evidence"]), fail["evidence"]
    assert any("friend@example.org" in e for e in fail["evidence"])

    # The fix applied: the same events no longer point at a listener that refuses.
    code, findings = doctor(srv, "scenarios.1", config=fixed(srv, "allow_authenticated = false",
                                                             "allow_authenticated = true", after='name = "smtp"'))
    assert code == 0 and [f["level"] for f in findings] == ["ok"], findings


def test_scenario_1_healthy_user_relays_and_doctor_is_ok(start_server, client_tls):
    srv = start_server(SCENARIO_1, users={USER: PASSWORD})
    assert relay_as_alice(srv.ports["submission"], client_tls).startswith("250")
    wait_events(srv, 1721)
    code, findings = doctor(srv, "scenarios.1")
    assert code == 0
    assert all(f["level"] == "ok" for f in findings), findings
    assert "listener smtp offers AUTH without authenticated relay" in findings[0]["title"]


# --- scenario 2 ------------------------------------------------------------------------------

SCENARIO_2 = """
[server]
hostname = "mx.example.test"
auth_failure_delay = 0.0

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
anonymous = false
auth = ["PLAIN", "LOGIN"]
""" + COMMON + NO_DELIVERY


def test_scenario_2_anonymous_off_on_the_mx_listener_fails(start_server):
    srv = start_server(SCENARIO_2)
    for _ in range(2):
        assert send(srv.ports["mx"], "alice@example.test").startswith("530 5.7.0")
    wait_events(srv, 1713, 2)
    code, findings = doctor(srv, "scenarios.2")
    assert code == 2
    (fail,) = findings
    where = f"{srv.config_path}:{line_of(srv.config_path, 'anonymous = false')}"
    assert fail["level"] == "fail" and fail["where"] == where
    assert fail["fix"].startswith(f"set anonymous = true on listener mx ({where})")
    assert "listener mx is the Internet's: it is named mx" in fail["evidence"]
    assert any("2 sessions refused with 530 5.7.0" in e and "127.0.0.1" in e for e in fail["evidence"])

    code, findings = doctor(srv, "scenarios.2", config=fixed(srv, "anonymous = false", "anonymous = true"))
    assert code == 0 and findings[0]["level"] == "ok"


MX_LISTENER = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "inbound"
address = "127.0.0.1"
port = {port:inbound}
tls = "none"
anonymous = ANON
public_addresses = ["192.0.2.25"]

[[listener]]
name = "devices"
address = "127.0.0.1"
port = {port:devices}
tls = "none"
relay = { mode = "only", entries = ["127.0.0.1"] }

[dns]
nameservers = ["127.0.0.1"]
port = DNSPORT
timeout = 2.0
""" + COMMON + NO_DELIVERY


@pytest.mark.skipif(not nsd.available(), reason="nsd not installed")
@pytest.mark.parametrize("anonymous", ["false", "true"])
def test_scenario_2_finds_the_internet_listener_by_its_mx(start_server, tmp_path, anonymous):
    zones = {"example.test": "@ IN MX 10 mx\nmx IN A 192.0.2.25\n"}
    with nsd.NsdServer(tmp_path, zones) as dns_server:
        srv = start_server(MX_LISTENER.replace("ANON", anonymous).replace("DNSPORT", str(dns_server.port)))
        code, findings = doctor(srv, "scenarios.2", offline=False)
    (finding,) = findings
    assert "the MX of the accepted domains points at its public address 192.0.2.25" in json.dumps(finding)
    if anonymous == "false":
        assert code == 2 and finding["level"] == "fail"
        assert finding["title"].startswith("anonymous access is off on listener inbound")
        line = line_of(srv.config_path, "anonymous = false")
        assert finding["fix"].startswith(f"set anonymous = true on listener inbound ({srv.config_path}:{line})")
    else:
        assert code == 0 and finding["level"] == "ok"


# --- scenario 4 ------------------------------------------------------------------------------

SCENARIO_4 = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"

[[domain]]
name = "example.test"
kind = "authoritative"

[[mailbox]]
address = "postmaster@example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["a.lice@example.test", "alice@oldname.test"]

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
""" + NO_DELIVERY


def test_scenario_4_refused_alias_fails_with_the_domain_to_add(start_server):
    srv = start_server(SCENARIO_4)
    code, findings = doctor(srv, "scenarios.4")        # before any traffic: a warning
    assert code == 1 and findings[0]["level"] == "warn"

    assert send(srv.ports["mx"], "alice@oldname.test").startswith("550 5.7.1")
    wait_events(srv, 1707)
    code, findings = doctor(srv, "scenarios.4")
    assert code == 2
    (fail,) = findings
    assert fail["level"] == "fail"
    assert fail["title"] == "mail to alice@oldname.test is refused: oldname.test is not an accepted domain"
    assert fail["fix"].startswith(f'add [[domain]] name = "oldname.test" kind = "authoritative" to {srv.config_path}')
    aliases = line_of(srv.config_path, 'aliases = ["a.lice@example.test", "alice@oldname.test"]')
    assert fail["where"] == f"{srv.config_path}:{aliases}"
    assert any("1 recipient in oldname.test refused with 550 5.7.1" in e for e in fail["evidence"])

    healthy = srv.config_path.with_name("fixed.toml")
    healthy.write_text(srv.config_path.read_text() + '\n[[domain]]\nname = "oldname.test"\nkind = "authoritative"\n')
    code, findings = doctor(srv, "scenarios.4", config=healthy)
    assert code == 0 and findings[0]["level"] == "ok"


# --- scenario 5 ------------------------------------------------------------------------------

DESTINATION = """
[server]
hostname = "smarthost.example.net"
auth_failure_delay = 0.0

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
require_tls = true
anonymous = false
auth = ["PLAIN"]
allow_authenticated = true

[[domain]]
name = "example.net"

[[mailbox]]
address = "relay@example.net"

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
""" + NO_DELIVERY

ORIGIN = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "apps"
address = "127.0.0.1"
port = {port:apps}
tls = "none"
relay = { mode = "only", entries = ["127.0.0.1"] }

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"

[[route]]
name = "smarthost"
domains = ["*"]
kind = "smarthost"
hosts = ["127.0.0.1:PEERPORT"]
tls = "required"
ca_file = "CAFILE"
CREDENTIALS

[delivery]
min_backoff = 1.0
max_backoff = 2.0
poll_interval = 0.2
"""


@pytest.fixture
def chain(start_server, tmp_path, ca):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    def make(password: str | None) -> RelayServer:
        peer = start_server(DESTINATION, users={"relay@example.net": "relay-pw"}, name="peer")
        creds = ""
        if password is not None:
            pw = tmp_path / "route-password"
            pw.write_text(password + "\n")
            creds = f'username = "relay@example.net"\npassword_file = "{pw}"'
        config = (ORIGIN.replace("PEERPORT", str(peer.ports["submission"])).replace("CREDENTIALS", creds)
                  .replace("CAFILE", str(ca_file)))
        srv = start_server(config, name="origin")
        with SmtpConn(srv.ports["apps"]) as c:
            c.cmd("EHLO app.example.test")
            assert c.cmd("MAIL FROM:<app@example.test>").code == 250
            assert c.cmd("RCPT TO:<carol@example.org>").code == 250
            assert c.cmd("DATA").code == 354
            assert c.cmd("Subject: report\r\n\r\nnightly report\r\n.").code == 250
            c.cmd("QUIT")
        return srv
    return make


def test_scenario_5_route_without_credentials_fails_with_the_route_keys(chain):
    srv = chain(None)
    wait_events(srv, 7003)
    code, findings = doctor(srv, "scenarios.5")
    assert code == 2
    (fail,) = findings
    where = f"{srv.config_path}:{line_of(srv.config_path, '[[route]]')}"
    assert fail["level"] == "fail" and fail["where"] == where
    assert fail["title"] == ("the destination of route smarthost requires authentication and the "
                             "route has no credentials")
    assert fail["fix"].startswith('set username = "<login at 127.0.0.1>" and password_file = ')
    assert f"on [[route]] smarthost ({where})" in fail["fix"]
    assert any("530 5.7.0" in e and "carol@example.org" in e for e in fail["evidence"]), fail["evidence"]


def test_scenario_5_wrong_password_fails_naming_password_file(chain):
    srv = chain("not-the-password")
    wait_events(srv, 7004)          # 535 is retried (7004 + 7002 per attempt) until the message expires
    code, findings = doctor(srv, "scenarios.5")
    assert code == 2
    (fail,) = findings
    assert fail["title"].startswith("the destination of route smarthost rejects the route's credentials")
    pw_line = next(n for n, line in enumerate(srv.config_path.read_text().splitlines(), 1)
                   if line.startswith("password_file = "))
    assert fail["where"] == f"{srv.config_path}:{pw_line}"
    assert f"({srv.config_path}:{pw_line})" in fail["fix"]
    assert any("535 5.7.8" in e for e in fail["evidence"]), fail["evidence"]


def test_scenario_5_route_with_credentials_delivers_and_is_ok(chain):
    srv = chain("relay-pw")
    wait_events(srv, 7001)
    code, findings = doctor(srv, "scenarios.5")
    assert code == 0 and findings[0]["level"] == "ok", findings


# --- scenario 6 ------------------------------------------------------------------------------

BEHIND_PROXY = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
public_addresses = ["192.0.2.25"]
proxy_protocol = PROXY
proxy_from = ["PROXY_FROM"]
""" + COMMON + NO_DELIVERY


def test_scenario_6_proxy_without_proxy_protocol_fails(start_server):
    srv = start_server(BEHIND_PROXY.replace("PROXY", "false", 1).replace("PROXY_FROM", "127.0.0.1"))
    for i in range(3):
        assert send(srv.ports["mx"], "alice@example.test", helo=f"client{i}.example.org").startswith("250")
    wait_events(srv, 1109, 4)           # the start-up probe and three SMTP sessions
    code, findings = doctor(srv, "scenarios.6")
    assert code == 2
    (fail,) = findings
    where = f"{srv.config_path}:{line_of(srv.config_path, 'proxy_protocol = false')}"
    assert fail["check"] == "scenarios.6.proxy" and fail["where"] == where
    assert fail["title"] == ("listener mx is behind a proxy without PROXY protocol: every client "
                             "appears as 127.0.0.1")
    assert fail["fix"].startswith(f"set proxy_protocol = true on listener mx ({where})")
    assert any("all 3 SMTP sessions" in e for e in fail["evidence"]), fail["evidence"]


def test_scenario_6_proxy_whose_address_changed_fails_with_proxy_from(start_server):
    # The proxy moved to 127.0.0.1; the configuration still trusts its old address.
    srv = start_server(BEHIND_PROXY.replace("PROXY", "true", 1).replace("PROXY_FROM", "10.9.9.9"))
    header = build_v1(("198.51.100.7", 40000), ("192.0.2.25", 25))
    with SmtpConn(srv.ports["mx"]) as c:
        assert c.cmd(header.decode().strip()).last.startswith("500 5.5.1")
        c.cmd("QUIT")
    wait_events(srv, 1105)
    code, findings = doctor(srv, "scenarios.6")
    assert code == 2
    (fail,) = findings
    assert fail["title"].startswith("127.0.0.1 sends PROXY protocol headers to listener mx")
    line = line_of(srv.config_path, 'proxy_from = ["10.9.9.9"]')
    assert fail["fix"].startswith(f"add 127.0.0.1 to proxy_from of listener mx ({srv.config_path}:{line})")


def test_scenario_6_proxy_with_proxy_protocol_is_ok(start_server):
    srv = start_server(BEHIND_PROXY.replace("PROXY", "true", 1).replace("PROXY_FROM", "127.0.0.1"))
    for i in range(3):
        header = build_v1((f"198.51.100.{i + 1}", 40000 + i), ("192.0.2.25", 25))
        assert send(srv.ports["mx"], "alice@example.test", proxy=header).startswith("250")
    sessions = wait_events(srv, 1109, 3)
    assert {e["client"] for e in sessions} >= {"198.51.100.1", "198.51.100.2", "198.51.100.3"}
    code, findings = doctor(srv, "scenarios.6")
    assert code == 0 and [f["level"] for f in findings] == ["ok"], findings


def test_scenario_6_clients_dialling_an_address_not_in_public_addresses_warn(start_server):
    """The PROXY header names the address the client dialled; here the Internet reaches the proxy
    at 203.0.113.80 while the configuration still says 192.0.2.25 (an address that moved)."""
    srv = start_server(BEHIND_PROXY.replace("PROXY", "true", 1).replace("PROXY_FROM", "127.0.0.1"))
    for i in range(3):
        header = build_v1((f"198.51.100.{i + 1}", 40000 + i), ("203.0.113.80", 25))
        assert send(srv.ports["mx"], "alice@example.test", proxy=header).startswith("250")
    wait_events(srv, 1109, 3)
    code, findings = doctor(srv, "scenarios.6")
    assert code == 1
    (warn,) = findings
    assert warn["check"] == "scenarios.6.public-address" and "203.0.113.80" in warn["title"]
    line = line_of(srv.config_path, 'public_addresses = ["192.0.2.25"]')
    assert warn["where"] == f"{srv.config_path}:{line}"
    assert "set public_addresses of listener mx" in warn["fix"]


PUBLISHED = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
public_addresses = ["192.0.2.25"]
accept_domains = ["example.test"]

[[listener]]
name = "partners"
address = "127.0.0.1"
port = {port:partners}
tls = "none"
accept_domains = ["partner.test"]

[[domain]]
name = "partner.test"
kind = "authoritative"

[[mailbox]]
address = "orders@partner.test"
""" + COMMON + NO_DELIVERY


def test_scenario_6_published_address_leads_to_the_wrong_listener(start_server):
    srv = start_server(PUBLISHED)
    # The Internet's mail for example.test arrives at the partners listener (rule not updated).
    assert send(srv.ports["partners"], "alice@example.test").startswith("5")
    wait_events(srv, 1701)
    code, findings = doctor(srv, "scenarios.6")
    assert code == 2
    (fail,) = findings
    assert fail["check"] == "scenarios.6.published"
    assert fail["title"].startswith("mail for example.test arrives at listener partners")
    assert "listener mx serves example.test and is published at 192.0.2.25" in " ".join(fail["evidence"])
    assert "forwards to listener partners instead of 127.0.0.1:" in fail["fix"]


def test_scenario_6_mail_at_the_right_listener_is_ok(start_server):
    srv = start_server(PUBLISHED)
    assert send(srv.ports["mx"], "alice@example.test").startswith("250")
    assert send(srv.ports["partners"], "orders@partner.test").startswith("250")
    wait_events(srv, 1721, 2)
    code, findings = doctor(srv, "scenarios.6")
    assert code == 0 and findings[0]["level"] == "ok", findings


def test_scenarios_without_an_event_log_skip_the_traffic_checks(tmp_path):
    srv = RelayServer(SCENARIO_4, tmp_path / "cold")           # never started: no log directory
    code, findings = doctor(srv, "scenarios")
    levels = {f["check"]: f["level"] for f in findings}
    assert levels["scenarios.5"] == "skip" and levels["scenarios.6"] == "skip"
    assert levels["scenarios.4"] == "warn" and code == 1


def test_scenario_4_sees_the_user_database_too(start_server):
    # a mailbox added with `relaywarden user add` in a domain that is not accepted
    srv = start_server(SCENARIO_4.replace(', "alice@oldname.test"', ""))
    code, findings = doctor(srv, "scenarios.4")
    assert code == 0 and findings[0]["level"] == "ok"
    added = srv.run_cli("user", "add", "dave@nowhere.example", "--password", "x", "--data-dir", str(srv.data_dir))
    assert added.returncode == 0, added.stderr
    code, findings = doctor(srv, "scenarios.4")
    assert code == 1
    (warn,) = findings
    assert warn["title"] == "dave@nowhere.example cannot receive mail: nowhere.example is not an accepted domain"
    assert warn["where"] == f"{srv.data_dir / 'users.json'}, user dave@nowhere.example"
    assert "delete the user: relaywarden user delete dave@nowhere.example" in warn["fix"]
    deleted = srv.run_cli("user", "delete", "dave@nowhere.example", "--data-dir", str(srv.data_dir))
    assert deleted.returncode == 0, deleted.stderr
    code, findings = doctor(srv, "scenarios.4")
    assert code == 0
