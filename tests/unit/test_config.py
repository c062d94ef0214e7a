"""The configuration: schema validation, errors that name file:line, key and fix; the line map;
the embedded default and its commented rendering; the generated reference page."""

from pathlib import Path

import pytest

from relaywarden.config.document import render, render_markdown
from relaywarden.config.loader import ConfigError, load_default, parse_text, scan_lines

BASE = """
[[listener]]
name = "mx"
port = 2525
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "t.toml")
    return info.value.problems


@pytest.mark.parametrize("snippet, line, key, words", [
    ('[[listener]]\nname = "mx"\nport = 70000\n', 3, "listener[0].port", "less than or equal to 65535"),
    ('[[listener]]\nname = "mx"\ntls = "startls"\n', 3, "listener[0].tls", "'startls'"),
    ('[[listener]]\nname = "mx"\nbogus = 1\n', 3, "listener[0].bogus", "unknown key 'bogus'"),
    ('[[listener]]\nname = "MX!"\n', 2, "listener[0].name", "lower-case"),
    ('[[listener]]\nname = "mx"\naddress = "1.2.3"\n', 3, "listener[0].address", "not an IPv4 or IPv6 address"),
    ('[[listener]]\nname = "mx"\n[listener.relay]\nentries = [\n  "10.0.0.0/8",\n  "192.0.2.0/33",\n]\n', 6,
     "listener[0].relay.entries[1]", "prefix length '33' is not valid for IPv4"),
    ('[[listener]]\nname = "mx"\n[listener.relay]\nentries = ["10.1.2.3/8"]\n', 4,
     "listener[0].relay.entries[0]", "host bits set: the network is 10.0.0.0/8"),
    ('[[listener]]\nname = "mx"\n[listener.relay]\nentries = ["2001:db8::/129"]\n', 4,
     "listener[0].relay.entries[0]", "not valid for IPv6 (0 to 128)"),
    ('[[listener]]\nname = "mx"\n[listener.relay]\nmode = "except"\n', 4, "listener[0].relay.mode", "'except'"),
    (BASE + '[[domain]]\nname = "example.test."\n', 6, "domain[0].name", "trailing dot"),
    (BASE + '[[domain]]\nname = "a..b"\n', 6, "domain[0].name", "not a valid domain"),
    (BASE + '[[domain]]\nname = "x.test"\nkind = "relay"\n', 7, "domain[0].kind", "'relay'"),
    (BASE + '[[mailbox]]\naddress = "nobody"\n', 6, "mailbox[0].address", "local@domain"),
    (BASE + '[[mailbox]]\naddress = "a@x.test"\npassword_hash = "hunter2"\n', 7, "mailbox[0].password_hash", "never a plaintext"),
    (BASE + '[[route]]\nname = "r"\nkind = "smarthost"\n', 5, "route[0]", "needs hosts"),
    ('[[listener]]\nname = "mx"\nauth = ["PLAIN"]\ntls = "none"\n', 1, "listener[0]", "auth_plaintext"),
    ('[[listener]]\nname = "mx"\nproxy_protocol = true\n', 1, "listener[0]", "proxy_from is empty"),
    # a value of the wrong TOML type is named, not converted
    ("[server]\nallow_open_relay = 1\n" + BASE, 2, "server.allow_open_relay",
     "must be a TOML boolean, got the integer 1: write it as true or false"),
    ('[server]\nallow_open_relay = "yes"\n' + BASE, 2, "server.allow_open_relay", "got the string 'yes'"),
    ('[[listener]]\nname = "mx"\nanonymous = "true"\n', 3, "listener[0].anonymous", "must be a TOML boolean"),
    ('[[listener]]\nname = "mx"\nport = "2525"\n', 3, "listener[0].port", "must be a TOML integer, got the string '2525'"),
    ('[[listener]]\nname = "mx"\nport = 2525.0\n', 3, "listener[0].port", "got the float 2525.0"),
    ('[[listener]]\nname = "mx"\nport = true\n', 3, "listener[0].port", "got true"),
    (BASE + '[delivery]\npoll_interval = "1"\n', 6, "delivery.poll_interval", "must be a TOML number"),
])
def test_errors_name_line_key_and_fix(snippet, line, key, words):
    problems = errors(snippet)
    assert any(p.startswith(f"t.toml:{line}: {key}:") and words in p for p in problems), problems


def test_cross_checks():
    assert any("used twice" in p for p in errors(BASE + BASE.replace("2525", "2526")))
    assert any("belongs to two mailboxes" in p for p in errors(
        BASE + '[[domain]]\nname = "x.test"\n[[mailbox]]\naddress = "a@x.test"\n[[mailbox]]\naddress = "b@x.test"\naliases = ["A@x.test"]\n'))
    assert any("route 'nope' does not exist" in p for p in errors(BASE + '[[domain]]\nname = "x.test"\nroute = "nope"\n'))
    assert any("no [[listener]]" in p for p in errors("[server]\n"))


def test_an_integer_is_a_good_float():
    loaded = parse_text(BASE + "[delivery]\npoll_interval = 2\n", "t.toml")
    assert loaded.config.delivery.poll_interval == 2.0


@pytest.mark.parametrize("text, line, key, words", [
    (BASE + '[[listener]]\nname = "mx"\nport = 2526\n', 6, "listener[1].name",
     "listener name 'mx' is used twice (also listener[0]): give each [[listener]] its own name"),
    (BASE + '[[listener]]\nname = "other"\nport = 2525\n', 7, "listener[1].port",
     "would listen on the socket of listener mx (127.0.0.1 port 2525, listener[0]): give it another port"),
    ('[[listener]]\nname = "a"\naddress = "0.0.0.0"\nport = 2625\n[[listener]]\nname = "b"\naddress = "127.0.0.1"\nport = 2625\n',
     8, "listener[1].port", "on the socket of listener a (0.0.0.0 port 2625"),
    (BASE + '[[domain]]\nname = "x.test"\n[[domain]]\nname = "x.test"\n', 8, "domain[1].name",
     "domain 'x.test' is listed twice (also domain[0]): keep one [[domain]] table"),
    (BASE + '[[domain]]\nname = "x.test"\nroute = "nope"\n', 7, "domain[0].route",
     "route 'nope' does not exist: add a [[route]] named 'nope'"),
    (BASE + '[[domain]]\nname = "x.test"\n[[mailbox]]\naddress = "a@x.test"\n[[mailbox]]\naddress = "b@x.test"\n'
     'aliases = ["A@x.test"]\n', 11, "mailbox[1].aliases[0]", "belongs to two mailboxes (a@x.test and b@x.test)"),
    (BASE + 'accept_domains = ["y.test"]\n[[domain]]\nname = "x.test"\n', 5, "listener[0].accept_domains[0]",
     "accept_domains lists y.test, which is not a [[domain]]: add a [[domain]] named y.test"),
])
def test_cross_checks_name_the_line_key_and_fix(text, line, key, words):
    problems = errors(text)
    assert any(p.startswith(f"t.toml:{line}: {key}: ") and words in p for p in problems), problems


def test_listeners_on_different_families_or_ports_may_share_an_address():
    parse_text('[[listener]]\nname = "a"\naddress = "0.0.0.0"\nport = 2625\n'
               '[[listener]]\nname = "b"\naddress = "::"\nport = 2625\n'
               '[[listener]]\nname = "c"\naddress = "127.0.0.1"\nport = 2626\n', "t.toml")


def test_toml_syntax_error_names_file():
    assert errors("[[listener]\n")[0].startswith("t.toml: TOML syntax error")


def test_line_map_follows_array_tables_and_multiline_arrays():
    text = '[[listener]]\nname = "a"\n[listener.relay]\nentries = [\n  "10.0.0.0/8", # x\n  "192.0.2.1",\n]\n[[listener]]\nname = "b"\nallow_authenticated = true\n'
    lines = scan_lines(text)
    assert lines[("listener", 0)] == 1
    assert lines[("listener", 0, "relay", "entries", 0)] == 5
    assert lines[("listener", 0, "relay", "entries", 1)] == 6
    assert lines[("listener", 1, "allow_authenticated")] == 10


def test_idn_domains_are_stored_as_a_labels():
    loaded = parse_text(BASE + '[[domain]]\nname = "bücher.example"\n', "t.toml")
    assert loaded.config.domain[0].name == "xn--bcher-kva.example"


def test_embedded_default_is_safe_and_round_trips():
    loaded = load_default()
    cfg = loaded.config
    assert [(l.name, l.port) for l in cfg.listener] == [("mx", 2525), ("submission", 2587)]
    mx, sub = cfg.listener
    assert mx.anonymous and not mx.relay.entries and not mx.allow_authenticated
    assert not sub.anonymous and sub.allow_authenticated and sub.auth == ["PLAIN", "LOGIN"] and not sub.auth_plaintext
    assert cfg.domain[0].name == "example.test" and cfg.mailbox[0].address == "postmaster@example.test"
    rendered = render(cfg)
    again = parse_text(rendered, "rendered.toml")
    assert again.config == cfg
    # every key of a listener is written with its meaning
    assert "# Accept mail from clients that did not authenticate" in rendered
    assert "Default: false." in rendered


def test_reference_page_is_up_to_date():
    page = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert page.read_text() == render_markdown(), "run: python -m relaywarden.config.document > docs/configuration.md"
