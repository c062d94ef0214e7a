"""``relaywarden why``: a decision id pasted from a reply leads back to the whole decision in the
event log — rules with file and line, the smallest change, and its risk. Against records the
real server wrote, and against records built from the real decision function."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from relaywarden.cli.main import main
from relaywarden.cli.why_cmd import RISKS, explain_decision, find_decision, parse_decision_id
from relaywarden.config.loader import load_default
from relaywarden.directory import Directory
from relaywarden.events import EventId, EventLog
from relaywarden.policy.relay import SessionFacts, decide_recipient
from tests.support.smtp import SmtpConn

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "schemas" / "why.json").read_text())


@pytest.mark.parametrize("text", ["8f3a2c01", "[decision 8f3a2c01]", "decision 8F3A2C01",
                                  "550 5.7.1 Relay access denied: x; authenticate to relay [decision 8f3a2c01]"])
def test_decision_ids_are_found_in_what_a_user_pastes(text):
    assert parse_decision_id(text) == "8f3a2c01"


def test_text_without_a_decision_id_is_refused():
    with pytest.raises(ValueError):
        parse_decision_id("550 5.7.1 Relay access denied")


def log_decision(log: EventLog, facts: SessionFacts, sender: str, recipient: str, decision_id: str) -> None:
    """Write the event as the server's session does for a RCPT decision."""
    loaded = load_default()
    d = decide_recipient(loaded, Directory.build(loaded), facts, sender, _addr(recipient), decision_id=decision_id)
    inputs = dict(d.inputs)
    top = {k: inputs.pop(k) for k in ("listener", "client", "user")}
    log.emit(d.event, text=d.admin_text, session="s1", **top, decision=d.id, reply=str(d.reply),
             verdict=d.verdict.value, route=d.route,
             rules=[f"{r.rule}: {r.detail} ({r.where})" for r in d.rules], fix=d.fix, **inputs)


def _addr(text: str):
    from relaywarden.protocol.address import parse_rcpt_to
    return parse_rcpt_to(f"<{text}>").address


def test_a_relay_refusal_explained_from_the_log(tmp_path):
    with EventLog(tmp_path / "log") as log:
        log_decision(log, SessionFacts(listener="mx", client_address="192.168.1.20"),
                     "app@example.com", "someone@elsewhere.org", "abcdef12")
        log_decision(log, SessionFacts(listener="mx", client_address="192.168.1.21"),
                     "app@example.com", "someone@other.org", "abcdef34")
    [record] = find_decision(tmp_path / "log", "abcdef12")
    d = explain_decision(record)
    jsonschema.validate(d, SCHEMA)
    assert d["accepted"] is False and d["event"] == {"id": 1709, "name": "RELAY_DENIED"}
    assert d["reply"].startswith("550 5.7.1") and d["client"] == "192.168.1.20"
    assert d["inputs"]["recipient"] == "someone@elsewhere.org"
    assert d["rules"] and all(r["where"] for r in d["rules"])
    assert re.fullmatch(r"<embedded default>:\d+", d["where"])
    assert "192.168.1.20" in d["fix"] and "relay" in d["fix"] and not d["must_not_allow"]
    assert d["risk"] == RISKS[EventId.RELAY_DENIED]


def test_a_public_client_must_not_be_allowed(tmp_path):
    with EventLog(tmp_path / "log") as log:
        log_decision(log, SessionFacts(listener="mx", client_address="203.0.113.9"),
                     "spammer@example.com", "victim@elsewhere.org", "0badc0de")
    r = CliRunner().invoke(main, ["why", "[decision 0badc0de]", "--data-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    jsonschema.validate(d, SCHEMA)
    assert d["must_not_allow"] and d["fix"].startswith("must not be allowed")
    assert d["risk"].startswith("Allowing it would open the server")
    text = CliRunner().invoke(main, ["why", "0badc0de", "--data-dir", str(tmp_path)]).output
    assert "refused" in text and "change none: must not be allowed" in " ".join(text.split())


def test_an_accepted_decision_has_no_fix_and_no_risk(tmp_path):
    with EventLog(tmp_path / "log") as log:
        log_decision(log, SessionFacts(listener="mx", client_address="198.51.100.4"), "a@example.com",
                     "postmaster@example.test", "a1b2c3d4")
    d = explain_decision(find_decision(tmp_path / "log", "a1b2c3d4")[0])
    jsonschema.validate(d, SCHEMA)
    assert d["event"]["id"] == 1721 and d["accepted"] and d["verdict"] == "local"
    assert d["fix"] is None and d["risk"] is None and d["rules"]


def test_a_suspended_relay_right_warns_about_restoring_it(tmp_path):
    with EventLog(tmp_path / "log") as log:
        log_decision(log, SessionFacts(listener="submission", client_address="192.0.2.1", tls=True,
                                       auth_user="nobody@example.test"), "a@example.test", "x@example.com", "a1b2c3d5")
    d = explain_decision(find_decision(tmp_path / "log", "a1b2c3d5")[0])
    assert d["event"]["id"] == 1710 and d["user"] == "nobody@example.test"
    assert "[[mailbox]]" in d["fix"] and "stolen password" in d["risk"]


def test_an_unknown_decision_exits_1(tmp_path):
    r = CliRunner().invoke(main, ["why", "deadbeef", "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no decision deadbeef" in r.output


@pytest.mark.integration
def test_why_for_a_refusal_the_real_server_made(default_server):
    srv = default_server
    with SmtpConn(srv.ports["mx"]) as c:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<someone@outside.test>")
        reply = c.cmd("RCPT TO:<victim@elsewhere.test>")
    assert reply.code == 550
    decision = re.search(r"\[decision ([0-9a-f]+)\]", reply.last).group(1)
    srv.wait_for_event(lambda e: e.get("fields", {}).get("decision") == decision)
    r = srv.run_cli("why", reply.last, "--data-dir", str(srv.data_dir), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    jsonschema.validate(d, SCHEMA)
    assert d["decision"] == decision and d["event"]["id"] == 1709 and d["listener"] == "mx"
    assert d["inputs"] == {"sender": "someone@outside.test", "recipient": "victim@elsewhere.test", "tls": False,
                           "proxy": None, "rdns": None}
    assert srv.config_path.name in d["where"] and re.search(r":\d+$", d["where"])
    assert "relay.entries" in d["fix"] and d["risk"] == RISKS[EventId.RELAY_DENIED]
    text = srv.run_cli("why", decision, "--data-dir", str(srv.data_dir)).stdout
    assert "smallest change that would have allowed it" in text and "what that change risks" in text
