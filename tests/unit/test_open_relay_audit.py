"""Tests of the open-relay audit (relaywarden.policy.audit) and of ``relaywarden explain``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from relaywarden.config.loader import load_default, parse_text
from relaywarden.policy.audit import Finding, check_startable, open_relay_findings
from relaywarden.cli.explain import explain_command

BASE = """\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525

[[domain]]
name = "example.test"

[[mailbox]]
address = "postmaster@example.test"

[[route]]
name = "default"
"""


def with_listener(extra: str) -> str:
    return BASE + "\n" + extra


def devices(relay: str, more: str = "") -> str:
    """A second listener 'devices' with the given [listener.relay] body."""
    return with_listener(f"""\
[[listener]]
name = "devices"
address = "127.0.0.1"
port = 2526
tls = "none"
{more}
[listener.relay]
{relay}
""")


def line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the configuration")


def audit(text: str) -> list[Finding]:
    return open_relay_findings(parse_text(text, "relay.toml"))


# --- the safe configurations pass ------------------------------------------------------------


def test_embedded_default_passes():
    loaded = load_default()
    assert open_relay_findings(loaded) == []
    assert check_startable(loaded) == []


@pytest.mark.parametrize("relay", [
    'entries = ["192.0.2.10"]',
    'entries = ["10.0.0.0/8"]',                # exactly /8 is not "very broad"
    'entries = ["2001:db8::/32"]',
    'entries = ["::ffff:192.0.2.0/120"]',     # an IPv4 /24 written IPv4-mapped
    'entries = ["printers.example.net"]',
    'mode = "only"\nentries = []',
])
def test_narrow_relay_lists_pass(relay):
    text = devices(relay)
    assert audit(text) == []
    assert check_startable(parse_text(text, "relay.toml")) == []


# --- each open form is a fail with its listener and line ---------------------------------


@pytest.mark.parametrize("relay,needle", [
    ('mode = "all-except"', 'mode = "all-except"'),
    ('mode = "all-except"\nentries = ["203.0.113.66"]', 'mode = "all-except"'),
    ('entries = ["0.0.0.0/0"]', '"0.0.0.0/0"'),
    ('entries = ["::/0"]', '"::/0"'),
    ('entries = ["192.0.2.10", "0.0.0.0/0"]', '"0.0.0.0/0"'),
    ('entries = ["::ffff:0:0/96"]', '"::ffff:0:0/96"'),
    ('entries = ["::/8"]', '"::/8"'),
])
def test_open_relay_forms_fail(relay, needle):
    text = devices(relay)
    loaded = parse_text(text, "relay.toml")
    fails = [f for f in open_relay_findings(loaded) if f.level == "fail"]
    assert len(fails) == 1, fails
    fail = fails[0]
    assert fail.listener == "devices"
    assert fail.where == f"relay.toml:{line_of(text, needle)}"
    assert "devices" in fail.message and fail.fix
    assert check_startable(loaded) == fails


def test_all_except_message_and_fix():
    text = devices('mode = "all-except"')
    fail = audit(text)[0]
    assert "open relay" in fail.message and "no exceptions" in fail.message
    assert 'set mode = "only"' in fail.fix


def test_multiline_entries_point_at_the_entry_line():
    text = devices('entries = [\n    "192.0.2.10",\n    "::/0",\n]')
    (fail,) = audit(text)
    entry_line = line_of(text, '"::/0"')
    assert fail.where == f"relay.toml:{entry_line}"


def test_allow_open_relay_still_reports_the_fails():
    text = "[server]\nallow_open_relay = true\n\n" + devices('mode = "all-except"')
    loaded = parse_text(text, "relay.toml")
    assert loaded.config.server.allow_open_relay
    fails = check_startable(loaded)
    assert [f.listener for f in fails] == ["devices"]


# --- warnings ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry,fragment", [
    ("0.0.0.0/4", "IPv4 /4"),
    ("4000::/3", "IPv6 /3"),
    ("::ffff:0.0.0.0/100", "IPv4 /4"),
    ("net", "top-level domain"),
])
def test_broad_entries_warn(entry, fragment):
    text = devices(f'entries = ["{entry}"]')
    (finding,) = audit(text)
    assert finding.level == "warn"
    assert fragment in finding.message
    assert finding.where == f"relay.toml:{line_of(text, entry)}"
    assert check_startable(parse_text(text, "relay.toml")) == []


@pytest.mark.parametrize("more,entry", [
    ('proxy_from = ["192.0.2.1"]', "192.0.2.1"),
    ('proxy_from = ["192.0.2.0/28"]', "192.0.2.8"),
    ('public_addresses = ["198.51.100.5"]', "198.51.100.0/24"),
])
def test_proxy_address_on_relay_list_without_proxy_protocol_warns(more, entry):
    text = devices(f'entries = ["{entry}"]', more)
    (finding,) = audit(text)
    assert finding.level == "warn" and finding.listener == "devices"
    assert "proxy_protocol is off" in finding.message
    assert "set proxy_protocol = true on listener devices" in finding.fix
    entry_line = line_of(text, 'entries = ["' + entry + '"]')
    assert finding.where == f"relay.toml:{entry_line}"


def test_proxy_address_with_proxy_protocol_on_passes():
    text = devices('entries = ["192.0.2.1"]', 'proxy_protocol = true\nproxy_from = ["192.0.2.1"]')
    assert audit(text) == []


def test_authenticated_relay_with_plaintext_auth_warns():
    text = with_listener("""\
[[listener]]
name = "submission"
address = "127.0.0.1"
port = 2587
tls = "none"
anonymous = false
auth = ["PLAIN"]
auth_plaintext = true
allow_authenticated = true
""")
    (finding,) = audit(text)
    assert finding.level == "warn" and finding.listener == "submission"
    assert "in clear" in finding.message
    assert finding.where == f"relay.toml:{line_of(text, 'auth_plaintext = true')}"


def test_authenticated_relay_without_auth_mechanisms_warns():
    text = with_listener("""\
[[listener]]
name = "submission"
address = "127.0.0.1"
port = 2587
allow_authenticated = true
""")
    (finding,) = audit(text)
    assert "no AUTH mechanism" in finding.message
    assert finding.where == f"relay.toml:{line_of(text, 'allow_authenticated = true')}"


def test_scenario_2_only_listener_without_anonymous_warns():
    text = BASE.replace('port = 2525\n', 'port = 2525\nanonymous = false\nauth = ["PLAIN"]\n')
    (finding,) = audit(text)
    assert finding.level == "warn" and finding.listener == "mx"
    assert "scenario 2" in finding.message and "example.test" in finding.message
    assert finding.where == f"relay.toml:{line_of(text, 'anonymous = false')}"
    assert "set anonymous = true on listener mx" in finding.fix


def test_scenario_2_not_reported_when_another_listener_is_anonymous():
    text = BASE.replace('port = 2525\n', 'port = 2525\nanonymous = false\nauth = ["PLAIN"]\n')
    text += '\n[[listener]]\nname = "inbound"\naddress = "127.0.0.1"\nport = 2500\n'
    assert audit(text) == []


def test_domain_left_out_of_every_accept_domains_warns():
    text = BASE.replace("[[mailbox]]", '[[domain]]\nname = "other.test"\n\n[[mailbox]]')
    text = text.replace('port = 2525\n', 'port = 2525\naccept_domains = ["other.test"]\n')
    (finding,) = audit(text)
    assert "no listener accepts mail for example.test" in finding.message


def test_scenario_4_mailbox_address_outside_accepted_domains_warns():
    text = BASE.replace('address = "postmaster@example.test"',
                        'address = "postmaster@example.test"\naliases = ["pm@old.example"]')
    (finding,) = audit(text)
    assert finding.level == "warn"
    assert "scenario 4" in finding.message and "pm@old.example" in finding.message
    assert finding.where == f"relay.toml:{line_of(text, 'pm@old.example')}"
    assert '[[domain]] name = "old.example"' in finding.fix


def test_forwarding_domain_without_route_warns():
    text = BASE.replace('[[route]]\nname = "default"\n', "")
    text += '\n[[domain]]\nname = "partner.example"\nkind = "external-relay"\n'
    (finding,) = audit(text)
    assert "no route" in finding.message
    header_line = line_of(text, 'name = "partner.example"') - 1
    assert finding.where == f"relay.toml:{header_line}"


def test_findings_are_fail_or_warn_only():
    text = devices('entries = ["0.0.0.0/0", "net", "0.0.0.0/4"]')
    assert {f.level for f in audit(text)} == {"fail", "warn"}


# --- explain --------------------------------------------------------------------------------


def run_explain(*args: str):
    return CliRunner().invoke(explain_command, list(args))


def test_explain_relay_denied_on_the_default_configuration():
    result = run_explain("--listener", "mx", "--client", "203.0.113.9", "--from", "a@x.example",
                         "--to", "b@example.org")
    assert result.exit_code == 1, result.output
    out = result.output
    assert "REFUSE" in out and "550 5.7.1 Relay access denied: example.org" in out
    assert "1709 RELAY_DENIED" in out
    assert "relay-list" in out and "<embedded default>:8" in out
    assert "fix" in out and "relay.entries" in out


def test_explain_local_delivery_exits_zero():
    result = run_explain("--listener", "mx", "--client", "203.0.113.9", "--from", "<>",
                         "--to", "Postmaster@example.test")
    assert result.exit_code == 0, result.output
    assert "LOCAL to mailbox postmaster@example.test" in result.output
    assert "250 2.1.5" in result.output and "1721 RECIPIENT_ACCEPTED" in result.output


def test_explain_json():
    result = run_explain("--listener", "mx", "--client", "203.0.113.9", "--from", "a@x.example",
                         "--to", "postmaster@example.test", "--to", "b@example.org", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["accepted"] is False and data["stage"] == "rcpt"
    first, second = data["decisions"]
    assert first["verdict"] == "local" and first["reply"]["code"] == 250
    assert second["verdict"] == "refuse" and second["event"]["id"] == 1709
    assert second["reply"]["enhanced"] == "5.7.1"
    assert second["rules"][-1]["where"] == "<embedded default>:8"
    assert second["inputs"]["client"] == "203.0.113.9"


SCENARIOS_TOML = """\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
anonymous = false
auth = ["PLAIN"]
allow_authenticated = false

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["alice@old.example"]

[[route]]
name = "default"
"""


@pytest.fixture
def scenarios_file(tmp_path):
    path = tmp_path / "relaywarden.toml"
    path.write_text(SCENARIOS_TOML, encoding="utf-8")
    return path


def test_explain_scenario_1(scenarios_file):
    result = run_explain("--config", str(scenarios_file), "--listener", "mx", "--client",
                         "203.0.113.9", "--user", "alice@example.test", "--tls",
                         "--from", "alice@example.test", "--to", "x@example.org", "--json")
    assert result.exit_code == 1
    (decision,) = json.loads(result.output)["decisions"]
    assert decision["event"]["id"] == 1710
    line = line_of(SCENARIOS_TOML, "allow_authenticated = false")
    assert f"set allow_authenticated = true on listener mx ({scenarios_file}:{line})" \
        in decision["fix"]


def test_explain_scenario_2(scenarios_file):
    result = run_explain("--config", str(scenarios_file), "--listener", "mx", "--client",
                         "203.0.113.9", "--from", "a@x.example", "--to", "alice@example.test")
    assert result.exit_code == 1
    assert "MAIL FROM" in result.output and "530 5.7.0" in result.output
    assert "1713 AUTHENTICATION_REQUIRED" in result.output
    line = line_of(SCENARIOS_TOML, "anonymous = false")
    assert f"set anonymous = true on listener mx ({scenarios_file}:{line})" in result.output


def test_explain_scenario_4(scenarios_file):
    result = run_explain("--config", str(scenarios_file), "--listener", "mx", "--client",
                         "203.0.113.9", "--user", "alice@example.test", "--tls",
                         "--from", "a@x.example", "--to", "alice@old.example", "--json")
    (decision,) = json.loads(result.output)["decisions"]
    assert decision["event"]["id"] == 1707
    assert '[[domain]] name = "old.example"' in decision["fix"]
    assert result.exit_code == 1


def test_explain_connection_refused_exits_one(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace('port = 2525\n', 'port = 2525\n[listener.connections]\n'
                                 'mode = "only"\nentries = ["192.0.2.0/24"]\n'), encoding="utf-8")
    result = run_explain("--config", str(path), "--listener", "mx", "--client", "203.0.113.9",
                         "--from", "a@x.example", "--to", "postmaster@example.test", "--json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["stage"] == "connection"
    assert data["decisions"][0]["reply"]["code"] == 554
    assert data["decisions"][0]["event"]["name"] == "CONNECTION_REFUSED"


def test_explain_bad_recipient_is_a_refusal():
    result = run_explain("--listener", "mx", "--client", "203.0.113.9", "--from", "a@x.example",
                         "--to", "user@@example.test", "--json")
    assert result.exit_code == 1
    (decision,) = json.loads(result.output)["decisions"]
    assert decision["event"]["name"] == "ADDRESS_REFUSED"
    assert 500 <= decision["reply"]["code"] < 600


@pytest.mark.parametrize("args,message", [
    (["--listener", "nosuch", "--client", "203.0.113.9"], "no such listener"),
    (["--listener", "mx", "--client", "not-an-ip"], "not an IPv4 or IPv6 address"),
    (["--listener", "mx", "--client", "203.0.113.9", "--config", "/nonexistent/rw.toml"],
     "cannot read"),
])
def test_explain_usage_errors_exit_two(args, message):
    result = CliRunner().invoke(explain_command, [*args, "--from", "a@x.example",
                                                  "--to", "b@example.org"])
    assert result.exit_code == 2
    assert message in result.output


def test_explain_invalid_configuration_exits_two(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace('port = 2525', 'port = 99999'), encoding="utf-8")
    result = run_explain("--config", str(path), "--listener", "mx", "--client", "192.0.2.1",
                         "--from", "a@x.example", "--to", "b@example.org")
    assert result.exit_code == 2
    assert f"{path}:4" in result.output


def test_explain_bad_sender_exits_two():
    result = run_explain("--listener", "mx", "--client", "192.0.2.1", "--from", "a@@x",
                         "--to", "b@example.org")
    assert result.exit_code == 2


def test_explain_missing_to_is_a_usage_error():
    result = run_explain("--listener", "mx", "--client", "192.0.2.1", "--from", "a@x.example")
    assert result.exit_code == 2


# --- what the entries cover together ----------------------------------------------------------


def _quoted(entries: list[str]) -> str:
    return "entries = [" + ", ".join(f'"{e}"' for e in entries) + "]"


@pytest.mark.parametrize("entries,fragment", [
    (["0.0.0.0/1", "128.0.0.0/1"], "100.0 % of all IPv4"),
    ([f"{n}.0.0.0/8" for n in range(256)], "100.0 % of all IPv4"),
    ([f"{n}.0.0.0/8" for n in range(1, 224) if n not in (10, 127)], "of all IPv4"),   # every public /8
    (["128.0.0.0/1"], "50.0 % of all IPv4"),
    (["0.0.0.0/1", "::ffff:128.0.0.0/97"], "100.0 % of all IPv4"),                      # mapped counts as IPv4
    (["2000::/3"], "100.0 % of the IPv6 Internet"),
    (["2000::/4", "3000::/4"], "100.0 % of the IPv6 Internet"),
])
def test_entries_that_together_cover_half_the_internet_fail(entries, fragment):
    text = devices(_quoted(entries))
    loaded = parse_text(text, "relay.toml")
    fails = check_startable(loaded)
    assert len(fails) == 1, fails
    assert fails[0].listener == "devices" and "open relay" in fails[0].message
    assert fragment in fails[0].message
    assert fails[0].where == f"relay.toml:{line_of(text, 'entries = [')}"
    assert "relay.entries" in fails[0].fix


@pytest.mark.parametrize("entries,fragment", [
    (["10.0.0.0/9", "10.128.0.0/9", "11.0.0.0/8"], "as many as an IPv4 /7"),
    (["2001::/17", "2001:8000::/17", "2002::/17", "2002:8000::/17", "2003::/17"], "IPv6 /15"),
])
def test_entries_that_together_are_broad_warn(entries, fragment):
    text = devices(_quoted(entries))
    (finding,) = audit(text)
    assert finding.level == "warn" and fragment in finding.message
    assert check_startable(parse_text(text, "relay.toml")) == []


def test_small_lists_are_not_flagged_together():
    assert audit(devices(_quoted(["192.0.2.0/24", "198.51.100.7", "2001:db8::/48", "10.0.0.0/8"]))) == []
