"""``relaywarden doctor --check open-relay --json`` against real servers: the configuration audit
(each open form with its file:line and fix) and the live battery against every listener (a FAIL
listing every attempt that relayed; implicit TLS; PROXY-protocol listeners tested as a stranger).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.support.server import QUEUE_ONLY_CONFIG, RelayServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NO_DELIVERY = "\n[delivery]\nenabled = false\n"

COMMON = """
[[domain]]
name = "example.test"
kind = "authoritative"

[[mailbox]]
address = "postmaster@example.test"

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
""" + NO_DELIVERY


def doctor(srv: RelayServer, check: str = "open-relay", *, offline: bool = False) -> tuple[int, list[dict]]:
    args = ["doctor", "--config", str(srv.config_path), "--data-dir", str(srv.data_dir), "--check", check,
            "--json", "--timeout", "5"]
    if offline:
        args.append("--offline")
    r = srv.run_cli(*args)
    assert r.returncode in (0, 1, 2), r.stderr
    out = json.loads(r.stdout)
    assert out["exit_code"] == r.returncode
    assert all(f["check"].startswith("open-relay") for f in out["findings"]), out
    return r.returncode, out["findings"]


def line_of(path: Path, text: str) -> int:
    return [line.strip() for line in path.read_text().splitlines()].index(text) + 1


def by_check(findings: list[dict], check: str) -> list[dict]:
    return [f for f in findings if f["check"] == check]


# --- healthy ---------------------------------------------------------------------------------


def test_default_configuration_is_closed_by_audit_and_battery(start_server):
    srv = start_server(QUEUE_ONLY_CONFIG, users={"alice@example.test": "pw"})
    code, findings = doctor(srv)
    assert code == 0, findings
    (config,) = by_check(findings, "open-relay.config")
    assert config["level"] == "ok"
    live = by_check(findings, "open-relay.live")
    assert sorted(f["title"].split(" (")[0] for f in live) == ["listener mx", "listener submission"]
    for f in live:
        assert f["level"] == "ok" and "refused all 51 unauthenticated relay attempts" in f["title"], f
    # the battery really talked to the server: its attempts are in the event log as refusals
    refused = [e for e in srv.events() if e["id"] in (1709, 1722, 1713, 1724)]
    assert len(refused) >= 51


def test_offline_skips_the_battery_but_audits(start_server):
    srv = start_server(QUEUE_ONLY_CONFIG)
    code, findings = doctor(srv, offline=True)
    assert code == 0
    assert [f["level"] for f in by_check(findings, "open-relay.live")] == ["skip"]
    assert by_check(findings, "open-relay.config")[0]["level"] == "ok"


def test_battery_skips_a_listener_nobody_runs(tmp_path):
    srv = RelayServer(QUEUE_ONLY_CONFIG, tmp_path / "stopped")      # configured, never started
    code, findings = doctor(srv, "open-relay.live")
    assert code == 0
    assert [f["level"] for f in findings] == ["skip", "skip"]
    assert "is the server running?" in findings[0]["title"]


# --- open relay: all-except ------------------------------------------------------------------

ALL_EXCEPT = """
[server]
hostname = "mx.example.test"
allow_open_relay = true

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
relay = { mode = "all-except", entries = ["192.0.2.66"] }
""" + COMMON


def test_all_except_relay_list_fails_audit_and_battery(start_server):
    srv = start_server(ALL_EXCEPT)
    code, findings = doctor(srv)
    assert code == 2
    (config,) = by_check(findings, "open-relay.config")
    assert config["level"] == "fail"
    assert 'relay mode "all-except"' in config["title"]
    relay_line = line_of(srv.config_path, 'relay = { mode = "all-except", entries = ["192.0.2.66"] }')
    assert config["where"] == f"{srv.config_path}:{relay_line}"
    assert config["fix"].startswith('set mode = "only" on listener mx relay')
    (live,) = by_check(findings, "open-relay.live")
    assert live["level"] == "fail"
    assert live["title"].startswith(f"listener mx (127.0.0.1:{srv.ports['mx']}) is an open relay")
    # every attempt that relayed is listed, with what was sent and the 250 it got
    assert any(e.startswith("foreign sender, foreign recipient: MAIL FROM:<relaytest@example.net> "
                            "RCPT TO:<relaytest@example.net> -> 250") for e in live["evidence"]), live["evidence"]
    relayed = int(live["title"].split(": ")[1].split(" of ")[0])
    assert relayed == len(live["evidence"]) and relayed >= 10


# --- the proxy in the relay list -------------------------------------------------------------

PROXY_IN_RELAY_LIST = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "none"
proxy_from = ["127.0.0.1"]
relay = { mode = "only", entries = ["127.0.0.0/8"] }
""" + COMMON


def test_relay_list_containing_the_proxy_without_proxy_protocol_fails(start_server):
    srv = start_server(PROXY_IN_RELAY_LIST)
    code, findings = doctor(srv)
    assert code == 2
    fails = [f for f in by_check(findings, "open-relay.config") if f["level"] == "fail"]
    assert len(fails) == 1, findings
    (fail,) = fails
    entry_line = line_of(srv.config_path, 'relay = { mode = "only", entries = ["127.0.0.0/8"] }')
    assert fail["where"] == f"{srv.config_path}:{entry_line}"
    assert "contains 127.0.0.1/32, the proxy in front of the listener, and proxy_protocol is off" in fail["title"]
    assert fail["fix"].startswith("set proxy_protocol = true on listener mx")
    # the battery would come from a trusted address: it says so instead of passing the listener
    (live,) = by_check(findings, "open-relay.live")
    assert live["level"] == "skip" and "relay entry 127.0.0.0/8 lets 127.0.0.1 relay" in live["title"]
    assert live["fix"].startswith("run from a host outside the relay list: relaywarden relay-test")


def test_proxy_protocol_listener_is_tested_as_a_stranger(start_server):
    config = PROXY_IN_RELAY_LIST.replace('proxy_from = ["127.0.0.1"]', 'proxy_protocol = true\nproxy_from = ["127.0.0.1"]')
    srv = start_server(config)
    code, findings = doctor(srv)
    assert code == 0, findings
    (live,) = by_check(findings, "open-relay.live")
    assert live["level"] == "ok" and "refused all 51" in live["title"]
    clients = {e.get("client") for e in srv.events() if e["id"] in (1709, 1722)}
    assert clients == {"192.0.2.1"}          # the PROXY header made the battery a stranger


# --- authenticated relay with plaintext AUTH ------------------------------------------------

PLAINTEXT_AUTH = """
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
""" + COMMON


def test_authenticated_relay_with_plaintext_auth_warns(start_server):
    srv = start_server(PLAINTEXT_AUTH)
    code, findings = doctor(srv)
    assert code == 1
    (warn,) = [f for f in findings if f["level"] == "warn"]
    assert warn["where"] == f"{srv.config_path}:{line_of(srv.config_path, 'auth_plaintext = true')}"
    assert warn["fix"].startswith("set auth_plaintext = false on listener submission")
    (live,) = by_check(findings, "open-relay.live")
    assert live["level"] == "ok"


# --- implicit TLS ----------------------------------------------------------------------------

IMPLICIT = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "smtps"
address = "127.0.0.1"
port = {port:smtps}
tls = "implicit"
certificate = "{cert}"
key = "{key}"
""" + COMMON


def test_implicit_tls_listener_gets_the_battery_over_tls(start_server):
    srv = start_server(IMPLICIT)
    code, findings = doctor(srv)
    assert code == 0, findings
    (live,) = by_check(findings, "open-relay.live")
    assert live["level"] == "ok" and "refused all 51" in live["title"]
    deadline = time.monotonic() + 5
    while True:             # info events reach the disk within about a second
        summaries = [e for e in srv.events() if e["id"] == 1109 and e["fields"].get("helo") == "relay-test.invalid"]
        if len(summaries) == 51 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(summaries) == 51 and all('tls="TLSv1' in e["text"] for e in summaries), summaries[:1]
