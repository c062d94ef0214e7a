"""Table-driven tests of the relay decision (relaywarden.policy.relay).

Each case is (listener, client, rdns, tls, user, RCPT TO) -> verdict, reply code, enhanced code and
event id, decided against configurations parsed from TOML text so that every file:line is real.
"""

from __future__ import annotations

import re

import pytest

from relaywarden import status
from relaywarden.config.loader import LoadedConfig, load_default, parse_text
from relaywarden.directory import Directory
from relaywarden.events import EventId
from relaywarden.policy.relay import (
    Decision,
    SessionFacts,
    Verdict,
    decide_connection,
    decide_mail,
    decide_recipient,
    refuse_address,
    relay_list_allows,
    route_for,
)
from relaywarden.protocol.address import AddressError, parse_rcpt_to

MAIN_TOML = """\
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
anonymous = true

[[listener]]
name = "submission"
address = "127.0.0.1"
port = 2587
require_tls = true
anonymous = false
auth = ["PLAIN", "LOGIN"]
allow_authenticated = true

[[listener]]
name = "devices"
address = "127.0.0.1"
port = 2526
tls = "none"
[listener.relay]
mode = "only"
entries = [
    "192.0.2.10",
    "198.51.100.0/24",
    "2001:db8:1::/48",
    "printers.example.net",
]
[listener.connections]
mode = "only"
entries = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32", "10.0.0.0/8", "example.net"]

[[listener]]
name = "legacy"
address = "127.0.0.1"
port = 2527
tls = "none"
[listener.relay]
mode = "all-except"
entries = ["203.0.113.66"]
[listener.connections]
mode = "all-except"
entries = ["203.0.113.99"]

[[listener]]
name = "partners"
address = "127.0.0.1"
port = 2528
auth = ["PLAIN"]
allow_authenticated = false
accept_domains = ["example.test"]

[[domain]]
name = "example.test"
kind = "authoritative"

[[domain]]
name = "shared.example"
kind = "internal-relay"
route = "legacy-mail"

[[domain]]
name = "partner.example"
kind = "external-relay"

[[domain]]
name = "xn--bcher-kva.example"

[[mailbox]]
address = "alice@example.test"
aliases = ["Alice.Smith@example.test", "alice@old.example"]

[[mailbox]]
address = "bob@example.test"
relay = false

[[mailbox]]
address = "carol@example.test"
enabled = false

[[mailbox]]
address = "dave@shared.example"

[[mailbox]]
address = "erin@shared.example"
enabled = false

[[mailbox]]
address = "hans@bücher.example"

[[mailbox]]
address = "postmaster@example.test"

[[route]]
name = "legacy-mail"
domains = ["shared.example"]
kind = "smarthost"
hosts = ["10.0.0.25:25"]

[[route]]
name = "partner-hub"
domains = ["partner.example"]
kind = "smarthost"
hosts = ["hub.partner.example"]

[[route]]
name = "partner-wild"
domains = ["*.partner.example"]

[[route]]
name = "default"
domains = ["*"]
"""

SCENARIO2_TOML = """\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
anonymous = false
auth = ["PLAIN"]

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"
"""

NO_ROUTE_TOML = """\
[[listener]]
name = "devices"
address = "127.0.0.1"
port = 2526
tls = "none"
[listener.relay]
entries = ["192.0.2.10"]

[[domain]]
name = "partner.example"
kind = "external-relay"
"""

CONFIGS = {
    "main": MAIN_TOML,
    "scenario2": SCENARIO2_TOML,
    "noroute": NO_ROUTE_TOML,
}


def loaded_config(name: str) -> LoadedConfig:
    return parse_text(CONFIGS[name], "test.toml")


def line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based number of the first line containing ``needle`` (after the line with ``after``)."""
    lines = text.splitlines()
    start = 0
    if after is not None:
        start = next(i for i, line in enumerate(lines) if after in line) + 1
    for number, line in enumerate(lines[start:], start=start + 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the configuration")


def rcpt(text: str):
    return parse_rcpt_to(f"<{text}>", utf8_session=True).address


def decide(config: str, listener: str, client: str, recipient: str, *, rdns: str | None = None,
           tls: bool = False, user: str | None = None,
           sender: str | None = "sender@elsewhere.example") -> Decision:
    loaded = loaded_config(config)
    facts = SessionFacts(listener=listener, client_address=client, client_rdns=rdns, tls=tls,
                         auth_user=user)
    return decide_recipient(loaded, Directory.build(loaded), facts, sender, rcpt(recipient))


L, F, R, X = Verdict.LOCAL, Verdict.FORWARD, Verdict.RELAY, Verdict.REFUSE
ACCEPTED = EventId.RECIPIENT_ACCEPTED
UNKNOWN = EventId.RECIPIENT_UNKNOWN
DENIED = EventId.RELAY_DENIED
DENIED_AUTH = EventId.RELAY_DENIED_AUTHENTICATED
ROUTING = EventId.ADDRESS_REFUSED
WRONG = EventId.WRONG_LISTENER
NOT_ACCEPTED = EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED
AUTH_REQUIRED = EventId.AUTHENTICATION_REQUIRED
CONN = EventId.CONNECTION_REFUSED

STRANGER = "203.0.113.9"
ALICE = "alice@example.test"

# (id, config, listener, client, rdns, tls, user, recipient, verdict, code, enhanced, event)
CASES = [
    # --- mx: anonymous, relays for nobody --------------------------------------------------
    ("mx-local", "main", "mx", STRANGER, None, False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-local-upper", "main", "mx", STRANGER, None, False, None, "ALICE@EXAMPLE.TEST", L, 250, "2.1.5", ACCEPTED),
    ("mx-alias", "main", "mx", STRANGER, None, False, None, "alice.smith@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-alias-mixed-case", "main", "mx", STRANGER, None, False, None, "Alice.SMITH@Example.Test", L, 250, "2.1.5", ACCEPTED),
    ("mx-quoted-plain-local", "main", "mx", STRANGER, None, False, None, '"alice"@example.test', L, 250, "2.1.5", ACCEPTED),
    ("mx-unknown", "main", "mx", STRANGER, None, False, None, "nobody@example.test", X, 550, "5.1.1", UNKNOWN),
    ("mx-disabled", "main", "mx", STRANGER, None, False, None, "carol@example.test", X, 550, "5.2.1", UNKNOWN),
    ("mx-relay-suspended-still-receives", "main", "mx", STRANGER, None, False, None, "bob@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-relay-denied", "main", "mx", STRANGER, None, False, None, "bob@example.org", X, 550, "5.7.1", DENIED),
    ("mx-relay-denied-upper", "main", "mx", STRANGER, None, False, None, "BOB@EXAMPLE.ORG", X, 550, "5.7.1", DENIED),
    ("mx-postmaster-bare", "main", "mx", STRANGER, None, False, None, "Postmaster", L, 250, "2.1.5", ACCEPTED),
    ("mx-postmaster-bare-upper", "main", "mx", STRANGER, None, False, None, "POSTMASTER", L, 250, "2.1.5", ACCEPTED),
    ("mx-postmaster-domain", "main", "mx", STRANGER, None, False, None, "PostMaster@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-internal-relay-local", "main", "mx", STRANGER, None, False, None, "dave@shared.example", L, 250, "2.1.5", ACCEPTED),
    ("mx-internal-relay-forward", "main", "mx", STRANGER, None, False, None, "someone@shared.example", F, 250, "2.1.5", ACCEPTED),
    ("mx-internal-relay-disabled", "main", "mx", STRANGER, None, False, None, "erin@shared.example", X, 550, "5.2.1", UNKNOWN),
    ("mx-external-relay", "main", "mx", STRANGER, None, False, None, "x@partner.example", F, 250, "2.1.5", ACCEPTED),
    ("mx-external-relay-upper", "main", "mx", STRANGER, None, False, None, "X@PARTNER.EXAMPLE", F, 250, "2.1.5", ACCEPTED),
    ("mx-subdomain-not-accepted", "main", "mx", STRANGER, None, False, None, "x@sub.partner.example", X, 550, "5.7.1", DENIED),
    ("mx-subdomain-of-ours", "main", "mx", STRANGER, None, False, None, "alice@mail.example.test", X, 550, "5.7.1", DENIED),
    ("mx-lookalike-suffix", "main", "mx", STRANGER, None, False, None, "alice@example.test.evil.test", X, 550, "5.7.1", DENIED),
    ("mx-lookalike-prefix", "main", "mx", STRANGER, None, False, None, "alice@evilexample.test", X, 550, "5.7.1", DENIED),
    ("mx-lookalike-shared", "main", "mx", STRANGER, None, False, None, "x@shared.example.evil.test", X, 550, "5.7.1", DENIED),
    ("mx-lookalike-partner", "main", "mx", STRANGER, None, False, None, "x@partner.example.evil.test", X, 550, "5.7.1", DENIED),
    ("mx-homograph-domain", "main", "mx", STRANGER, None, False, None, "alice@exаmple.test", X, 550, "5.7.1", DENIED),
    ("mx-homograph-local", "main", "mx", STRANGER, None, False, None, "аlice@example.test", X, 550, "5.1.1", UNKNOWN),
    ("mx-literal-v4", "main", "mx", STRANGER, None, False, None, "alice@[127.0.0.1]", X, 550, "5.7.1", DENIED),
    ("mx-literal-v6", "main", "mx", STRANGER, None, False, None, "alice@[IPv6:::1]", X, 550, "5.7.1", DENIED),
    ("mx-percent-hack", "main", "mx", STRANGER, None, False, None, "user%evil.example@example.test", X, 550, "5.7.1", ROUTING),
    ("mx-percent-hack-to-other", "main", "mx", STRANGER, None, False, None, "user%example.test@evil.example", X, 550, "5.7.1", DENIED),
    ("mx-bang-path", "main", "mx", STRANGER, None, False, None, "evil.example!user@example.test", X, 550, "5.7.1", ROUTING),
    ("mx-quoted-at", "main", "mx", STRANGER, None, False, None, '"user@evil.example"@example.test', X, 550, "5.7.1", ROUTING),
    ("mx-quoted-percent", "main", "mx", STRANGER, None, False, None, '"user%evil.example"@example.test', X, 550, "5.7.1", ROUTING),
    ("mx-quoted-bang", "main", "mx", STRANGER, None, False, None, '"evil.example!user"@example.test', X, 550, "5.7.1", ROUTING),
    ("mx-percent-hack-internal-relay", "main", "mx", STRANGER, None, False, None, "user%evil.example@shared.example", X, 550, "5.7.1", ROUTING),
    ("mx-percent-hack-external-relay", "main", "mx", STRANGER, None, False, None, "user%evil.example@partner.example", X, 550, "5.7.1", ROUTING),
    ("mx-source-route-to-other", "main", "mx", STRANGER, None, False, None, "@example.test:user@evil.example", X, 550, "5.7.1", DENIED),
    ("mx-source-route-to-ours", "main", "mx", STRANGER, None, False, None, "@evil.example:alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-idn-u-label", "main", "mx", STRANGER, None, False, None, "hans@bücher.example", L, 250, "2.1.5", ACCEPTED),
    ("mx-idn-a-label", "main", "mx", STRANGER, None, False, None, "hans@xn--bcher-kva.example", L, 250, "2.1.5", ACCEPTED),
    ("mx-idn-upper-u-label", "main", "mx", STRANGER, None, False, None, "HANS@BÜCHER.EXAMPLE", L, 250, "2.1.5", ACCEPTED),
    ("mx-idn-unknown", "main", "mx", STRANGER, None, False, None, "otto@bücher.example", X, 550, "5.1.1", UNKNOWN),
    ("mx-scenario-4", "main", "mx", STRANGER, None, False, None, "alice@old.example", X, 550, "5.7.1", NOT_ACCEPTED),
    ("mx-scenario-4-case", "main", "mx", STRANGER, None, False, None, "ALICE@OLD.EXAMPLE", X, 550, "5.7.1", NOT_ACCEPTED),
    ("mx-ipv6-client-denied", "main", "mx", "2001:db8::99", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("mx-ipv6-loopback-local", "main", "mx", "::1", None, False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("mx-loopback-not-a-relay", "main", "mx", "127.0.0.1", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("mx-rdns-does-not-relay", "main", "mx", STRANGER, "printers.example.net", False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    # --- submission: AUTH required, authenticated relay ----------------------------------
    ("sub-auth-relay", "main", "submission", STRANGER, None, True, ALICE, "bob@example.org", R, 250, "2.1.5", ACCEPTED),
    ("sub-auth-relay-login-case", "main", "submission", STRANGER, None, True, "Alice@Example.Test", "bob@example.org", R, 250, "2.1.5", ACCEPTED),
    ("sub-auth-local", "main", "submission", STRANGER, None, True, ALICE, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("sub-auth-ipv6", "main", "submission", "2001:db8::5", None, True, ALICE, "bob@example.org", R, 250, "2.1.5", ACCEPTED),
    ("sub-auth-literal", "main", "submission", STRANGER, None, True, ALICE, "x@[192.0.2.1]", R, 250, "2.1.5", ACCEPTED),
    ("sub-auth-wildcard-route", "main", "submission", STRANGER, None, True, ALICE, "x@sub.partner.example", R, 250, "2.1.5", ACCEPTED),
    ("sub-auth-external-relay", "main", "submission", STRANGER, None, True, ALICE, "x@partner.example", F, 250, "2.1.5", ACCEPTED),
    ("sub-auth-internal-relay", "main", "submission", STRANGER, None, True, ALICE, "x@shared.example", F, 250, "2.1.5", ACCEPTED),
    ("sub-auth-percent-hack", "main", "submission", STRANGER, None, True, ALICE, "user%evil.example@example.test", X, 550, "5.7.1", ROUTING),
    ("sub-anonymous", "main", "submission", STRANGER, None, True, None, "bob@example.org", X, 530, "5.7.0", AUTH_REQUIRED),
    ("sub-anonymous-local", "main", "submission", STRANGER, None, True, None, "alice@example.test", X, 530, "5.7.0", AUTH_REQUIRED),
    ("sub-no-tls", "main", "submission", STRANGER, None, False, ALICE, "bob@example.org", X, 530, "5.7.0", EventId.TLS_REQUIRED),
    ("sub-relay-suspended", "main", "submission", STRANGER, None, True, "bob@example.test", "x@example.org", X, 550, "5.7.1", DENIED_AUTH),
    ("sub-relay-suspended-local-ok", "main", "submission", STRANGER, None, True, "bob@example.test", "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("sub-disabled-user", "main", "submission", STRANGER, None, True, "carol@example.test", "x@example.org", X, 550, "5.7.1", DENIED_AUTH),
    ("sub-unknown-user", "main", "submission", STRANGER, None, True, "ghost@example.test", "x@example.org", X, 550, "5.7.1", DENIED_AUTH),
    ("sub-scenario-4-authenticated", "main", "submission", STRANGER, None, True, ALICE, "alice@old.example", X, 550, "5.7.1", NOT_ACCEPTED),
    # --- devices: relay list mode only, connection list mode only -------------------------
    ("dev-ip", "main", "devices", "192.0.2.10", None, False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-ip-neighbour", "main", "devices", "192.0.2.11", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("dev-cidr", "main", "devices", "198.51.100.77", None, False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-cidr-v6", "main", "devices", "2001:db8:1::25", None, False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-cidr-v6-outside", "main", "devices", "2001:db8:2::25", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("dev-v4-mapped", "main", "devices", "::ffff:192.0.2.10", None, False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-rdns-child", "main", "devices", "192.0.2.50", "printer1.printers.example.net", False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-rdns-exact", "main", "devices", "192.0.2.50", "printers.example.net", False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-rdns-case-dot", "main", "devices", "192.0.2.50", "PRINTER1.Printers.Example.NET.", False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("dev-rdns-lookalike-prefix", "main", "devices", "192.0.2.50", "evilprinters.example.net", False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("dev-rdns-lookalike-suffix", "main", "devices", "192.0.2.51", "printers.example.net.evil.test", False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("dev-rdns-unknown", "main", "devices", "192.0.2.52", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("dev-connection-by-rdns", "main", "devices", "172.16.5.5", "host.example.net", False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("dev-connection-refused", "main", "devices", STRANGER, None, False, None, "x@example.org", X, 554, "5.7.1", CONN),
    ("dev-connection-refused-local", "main", "devices", STRANGER, None, False, None, "alice@example.test", X, 554, "5.7.1", CONN),
    ("dev-connection-refused-v6", "main", "devices", "2001:db9::1", None, False, None, "alice@example.test", X, 554, "5.7.1", CONN),
    ("dev-local", "main", "devices", "192.0.2.10", None, False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("dev-routing-form-refused", "main", "devices", "192.0.2.10", None, False, None, "user%evil.example@example.test", X, 550, "5.7.1", ROUTING),
    ("dev-scenario-4", "main", "devices", "192.0.2.10", None, False, None, "alice@old.example", X, 550, "5.7.1", NOT_ACCEPTED),
    ("dev-literal", "main", "devices", "192.0.2.10", None, False, None, "x@[203.0.113.5]", R, 250, "2.1.5", ACCEPTED),
    ("dev-private-denied", "main", "devices", "10.1.2.3", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    # --- legacy: relay mode all-except (an open relay the audit refuses) -------------------
    ("legacy-all-except-relays", "main", "legacy", STRANGER, None, False, None, "x@example.org", R, 250, "2.1.5", ACCEPTED),
    ("legacy-excluded", "main", "legacy", "203.0.113.66", None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    ("legacy-excluded-local", "main", "legacy", "203.0.113.66", None, False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("legacy-connection-excluded", "main", "legacy", "203.0.113.99", None, False, None, "alice@example.test", X, 554, "5.7.1", CONN),
    ("legacy-routing-form", "main", "legacy", STRANGER, None, False, None, "evil.example!user@example.test", X, 550, "5.7.1", ROUTING),
    # --- partners: accept_domains, no authenticated relay (scenario 1) -------------------
    ("partners-served", "main", "partners", STRANGER, None, False, None, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("partners-wrong-listener", "main", "partners", STRANGER, None, False, None, "dave@shared.example", X, 550, "5.7.1", WRONG),
    ("partners-wrong-listener-external", "main", "partners", STRANGER, None, False, None, "x@partner.example", X, 550, "5.7.1", WRONG),
    ("partners-authenticated-bypasses", "main", "partners", STRANGER, None, True, ALICE, "dave@shared.example", L, 250, "2.1.5", ACCEPTED),
    ("partners-scenario-1", "main", "partners", STRANGER, None, True, ALICE, "x@example.org", X, 550, "5.7.1", DENIED_AUTH),
    ("partners-anonymous-relay", "main", "partners", STRANGER, None, False, None, "x@example.org", X, 550, "5.7.1", DENIED),
    # --- scenario 2: anonymous off on the only listener ----------------------------------
    ("scenario-2", "scenario2", "mx", STRANGER, None, False, None, "alice@example.test", X, 530, "5.7.0", AUTH_REQUIRED),
    ("scenario-2-authenticated", "scenario2", "mx", STRANGER, None, True, ALICE, "alice@example.test", L, 250, "2.1.5", ACCEPTED),
    ("scenario-2-no-postmaster-domain", "scenario2", "mx", STRANGER, None, True, ALICE, "Postmaster", X, 550, "5.1.1", UNKNOWN),
    # --- no route to a forwarding domain: fails temporarily, never accepts --------------
    ("no-route-forward", "noroute", "devices", STRANGER, None, False, None, "x@partner.example", X, 451, "4.3.0", None),
    ("no-route-relay", "noroute", "devices", "192.0.2.10", None, False, None, "x@example.org", X, 451, "4.3.0", None),
]


@pytest.mark.parametrize(
    "config,listener,client,rdns,tls,user,recipient,verdict,code,enhanced,event",
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_decision_table(config, listener, client, rdns, tls, user, recipient, verdict, code,
                        enhanced, event):
    decision = decide(config, listener, client, recipient, rdns=rdns, tls=tls, user=user)
    assert decision.verdict is verdict, decision.admin_text
    assert decision.reply.code == code, decision.admin_text
    assert decision.reply.enhanced == enhanced, decision.admin_text
    if event is not None:
        assert decision.event is event, decision.admin_text
    assert decision.accepted == (verdict is not Verdict.REFUSE)
    if decision.accepted:
        assert decision.fix is None
        assert "[decision" not in decision.reply.text
    else:
        assert decision.fix
        assert decision.reply.text.endswith(f"[decision {decision.id}]")
        assert decision.rules, "a refusal names the rule that made it"


def test_table_is_large_enough():
    assert len(CASES) >= 80
    assert len({case[0] for case in CASES}) == len(CASES)


# --- what the accepted decisions carry --------------------------------------------------------


@pytest.mark.parametrize("recipient,mailbox", [
    ("alice.smith@example.test", "alice@example.test"),
    ("Postmaster", "postmaster@example.test"),
    ("hans@bücher.example", "hans@xn--bcher-kva.example"),
    ("dave@shared.example", "dave@shared.example"),
])
def test_local_decision_names_the_mailbox(recipient, mailbox):
    decision = decide("main", "mx", STRANGER, recipient)
    assert decision.mailbox == mailbox
    assert decision.route is None


@pytest.mark.parametrize("listener,client,user,recipient,route", [
    ("mx", STRANGER, None, "someone@shared.example", "legacy-mail"),
    ("mx", STRANGER, None, "x@partner.example", "partner-hub"),
    ("submission", STRANGER, ALICE, "x@sub.partner.example", "partner-wild"),
    ("submission", STRANGER, ALICE, "x@example.org", "default"),
    ("devices", "192.0.2.10", None, "x@[203.0.113.5]", "default"),
])
def test_forward_and_relay_decisions_name_the_route(listener, client, user, recipient, route):
    decision = decide("main", listener, client, recipient, tls=True, user=user)
    assert decision.route == route
    assert decision.mailbox is None


@pytest.mark.parametrize("domain,route", [
    ("shared.example", "legacy-mail"),      # the domain's own route
    ("partner.example", "partner-hub"),     # exact beats wildcard
    ("a.partner.example", "partner-wild"),  # wildcard beats "*"
    ("a.b.partner.example", "partner-wild"),
    ("example.org", "default"),
    ("evilpartner.example", "default"),     # "*.partner.example" needs a dot boundary
])
def test_route_for(domain, route):
    assert route_for(loaded_config("main"), domain) == route


def test_route_for_none_without_routes():
    assert route_for(loaded_config("noroute"), "partner.example") is None


# --- replies: the true cause, no configuration leaked --------------------------------------


def test_relay_denied_reply_names_the_cause_without_leaking():
    decision = decide("main", "devices", "192.0.2.11", "bob@example.org")
    text = decision.reply.text
    assert text.startswith("Relay access denied: example.org is not a domain this server "
                           "accepts mail for; authenticate to relay [decision ")
    assert "permission" not in text.lower()
    for leak in ("test.toml", "192.0.2.10", "198.51.100", "printers.example.net", "devices"):
        assert leak not in text
    assert "192.0.2.11 is neither on the relay list of listener devices nor authenticated" \
        in decision.admin_text


def test_literal_reply_says_literal():
    decision = decide("main", "mx", STRANGER, "alice@[127.0.0.1]")
    assert "[127.0.0.1] is an address literal" in decision.reply.text


def test_replies_come_from_the_status_table():
    denied = decide("main", "mx", STRANGER, "x@example.org")
    assert denied.reply == status.relay_denied(
        "example.org is not a domain this server accepts mail for; authenticate to relay"
    ).tagged(denied.id)
    unknown = decide("main", "mx", STRANGER, "nobody@example.test")
    assert unknown.reply == status.user_unknown("nobody@example.test").tagged(unknown.id)
    accepted = decide("main", "mx", STRANGER, ALICE)
    assert accepted.reply == status.recipient_ok()


# --- scenarios 1, 2, 4: reply, event, and a fix naming the key and its line --------------


def test_scenario_1_authenticated_relay_off():
    decision = decide("main", "partners", STRANGER, "x@example.org", tls=True, user=ALICE)
    assert decision.event is EventId.RELAY_DENIED_AUTHENTICATED
    assert int(decision.event) == 1710
    assert str(decision.reply).startswith("550 5.7.1 Relay access denied: example.org")
    line = line_of(MAIN_TOML, "allow_authenticated = false")
    assert f"set allow_authenticated = true on listener partners (test.toml:{line})" \
        in decision.fix
    assert "listener submission" in decision.fix  # the listener that would allow it
    assert f"test.toml:{line}" in decision.admin_text
    assert decision.rules[-1].rule == "allow-authenticated"
    assert decision.rules[-1].where == f"test.toml:{line}"


def test_scenario_2_anonymous_off():
    decision = decide("scenario2", "mx", STRANGER, ALICE)
    assert decision.event is EventId.AUTHENTICATION_REQUIRED
    assert str(decision.reply).startswith("530 5.7.0")
    line = line_of(SCENARIO2_TOML, "anonymous = false")
    assert f"set anonymous = true on listener mx (test.toml:{line})" in decision.fix
    assert "scenario 2" in decision.fix
    assert decision.rules == (decision.rules[0],)
    assert decision.rules[0].where == f"test.toml:{line}"


def test_scenario_4_mailbox_domain_not_accepted():
    decision = decide("main", "mx", STRANGER, "alice@old.example")
    assert int(decision.event) == 1707
    assert str(decision.reply).startswith("550 5.7.1 Relay access denied: old.example is not")
    assert '[[domain]] name = "old.example"' in decision.fix
    mailbox_line = line_of(MAIN_TOML, 'address = "alice@example.test"') - 1
    assert f"test.toml:{mailbox_line}" in decision.fix
    assert "mailbox alice@example.test" in decision.admin_text


def test_wrong_listener_event_1701_points_at_accept_domains():
    decision = decide("main", "partners", STRANGER, "dave@shared.example")
    assert int(decision.event) == 1701
    line = line_of(MAIN_TOML, 'accept_domains = ["example.test"]')
    assert f"accept_domains of listener partners (test.toml:{line})" in decision.fix
    assert "listener mx" in decision.fix  # where shared.example is served
    assert "test.toml" not in decision.reply.text


def test_relay_right_suspended_fix():
    decision = decide("main", "submission", STRANGER, "x@example.org", tls=True,
                      user="bob@example.test")
    assert "relaywarden user enable-relay bob@example.test" in decision.fix
    line = line_of(MAIN_TOML, 'address = "bob@example.test"') - 1
    assert f"set relay = true on mailbox bob@example.test (test.toml:{line})" in decision.fix


def test_relay_denied_fix_for_a_stranger_says_must_not():
    decision = decide("main", "mx", "198.51.100.7", "x@example.org")
    assert decision.fix.startswith("must not be allowed: adding this client to the relay list "
                                   "would let it relay to any domain")
    mx_line = line_of(MAIN_TOML, 'name = "mx"') - 1
    assert f"add 198.51.100.7 to listener mx relay.entries (test.toml:{mx_line})" in decision.fix
    assert "authenticate on listener submission" in decision.fix


def test_relay_denied_fix_for_an_internal_device():
    decision = decide("main", "devices", "10.1.2.3", "x@example.org")
    assert decision.fix.startswith("if 10.1.2.3 is one of your own applications or devices")
    line = line_of(MAIN_TOML, "entries = [", after='name = "devices"')
    assert f"add 10.1.2.3 to listener devices relay.entries (test.toml:{line})" in decision.fix


def test_unknown_recipient_fix():
    decision = decide("main", "mx", STRANGER, "nobody@example.test")
    assert 'add a [[mailbox]] with address = "nobody@example.test"' in decision.fix
    assert 'kind = "internal-relay"' in decision.fix


def test_disabled_mailbox_fix_points_at_the_mailbox():
    decision = decide("main", "mx", STRANGER, "carol@example.test")
    line = line_of(MAIN_TOML, 'address = "carol@example.test"') - 1
    assert f"set enabled = true on mailbox carol@example.test (test.toml:{line})" in decision.fix


# --- rules[].where points at the line that made the rule ----------------------------------


@pytest.mark.parametrize("client,rdns,needle", [
    ("192.0.2.10", None, '"192.0.2.10",'),
    ("198.51.100.77", None, '"198.51.100.0/24",'),
    ("2001:db8:1::25", None, '"2001:db8:1::/48",'),
    ("192.0.2.50", "printer1.printers.example.net", '"printers.example.net",'),
])
def test_relay_rule_where_is_the_entry_line(client, rdns, needle):
    decision = decide("main", "devices", client, "x@example.org", rdns=rdns)
    relay_hits = [r for r in decision.rules if r.rule == "relay-list"]
    assert relay_hits[0].where == f"test.toml:{line_of(MAIN_TOML, needle)}"
    route_hit = decision.rules[-1]
    assert route_hit.rule == "route"
    default_line = line_of(MAIN_TOML, 'domains = ["*"]')
    assert route_hit.where == f"test.toml:{default_line}"


def test_rules_in_order_for_a_local_delivery():
    decision = decide("main", "mx", STRANGER, "alice.smith@example.test")
    assert [r.rule for r in decision.rules] == ["accepted-domain", "mailbox"]
    domain_line = line_of(MAIN_TOML, 'kind = "authoritative"')
    assert decision.rules[0].where == f"test.toml:{domain_line}"
    mailbox_line = line_of(MAIN_TOML, 'address = "alice@example.test"') - 1
    assert decision.rules[1].where == f"test.toml:{mailbox_line}"
    assert "an alias of mailbox alice@example.test" in decision.rules[1].detail


def test_all_except_rule_where_is_the_mode_line():
    decision = decide("main", "legacy", STRANGER, "x@example.org")
    hit = next(r for r in decision.rules if r.rule == "relay-list")
    mode_line = line_of(MAIN_TOML, 'mode = "all-except"')
    assert hit.where == f"test.toml:{mode_line}"
    assert "all-except" in hit.detail


def test_internal_relay_route_where_is_the_domain_route_line():
    decision = decide("main", "mx", STRANGER, "someone@shared.example")
    route_line = line_of(MAIN_TOML, 'route = "legacy-mail"')
    assert decision.rules[-1].where == f"test.toml:{route_line}"


def test_source_route_is_recorded():
    decision = decide("main", "mx", STRANGER, "@evil.example:alice@example.test")
    assert decision.rules[0].rule == "source-route"
    assert decision.recipient == "alice@example.test"


def test_connection_refusal_where_and_fix():
    decision = decide("main", "devices", STRANGER, "alice@example.test")
    line = line_of(MAIN_TOML, 'entries = ["192.0.2.0/24"')
    assert decision.rules[-1].where == f"test.toml:{line}"
    assert f"add {STRANGER} to listener devices connections.entries (test.toml:{line})" \
        in decision.fix


# --- identity, inputs, immutability -----------------------------------------------------


def test_decision_ids_are_unique_hex():
    ids = {decide("main", "mx", STRANGER, "x@example.org").id for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{6,12}", i) for i in ids)


def test_given_decision_id_is_used():
    loaded = loaded_config("main")
    facts = SessionFacts("mx", STRANGER)
    decision = decide_recipient(loaded, Directory.build(loaded), facts, None,
                                rcpt("x@example.org"), decision_id="8f3a2c")
    assert decision.id == "8f3a2c"
    assert decision.reply.text.endswith("[decision 8f3a2c]")


@pytest.mark.parametrize("bad", ["8F3A2C", "abc", "0123456789abc", "xyzxyz"])
def test_bad_decision_id_is_refused(bad):
    loaded = loaded_config("main")
    with pytest.raises(ValueError):
        decide_recipient(loaded, Directory.build(loaded), SessionFacts("mx", STRANGER), None,
                         rcpt("x@example.org"), decision_id=bad)


def test_inputs_kept_for_replay():
    decision = decide("main", "submission", "2001:db8::5", "x@example.org", tls=True, user=ALICE,
                      rdns="client.example.net", sender="alice@example.test")
    assert decision.inputs == {
        "listener": "submission", "client": "2001:db8::5", "rdns": "client.example.net",
        "proxy": None, "tls": True, "user": ALICE, "sender": "alice@example.test",
        "recipient": "x@example.org",
    }


def test_replay_gives_the_same_outcome():
    first = decide("main", "devices", "192.0.2.10", "x@example.org")
    again = decide(first.inputs["listener"] and "main", first.inputs["listener"],
                   first.inputs["client"], first.inputs["recipient"])
    assert (again.verdict, again.reply.code, again.event, again.rules) == \
        (first.verdict, first.reply.code, first.event, first.rules)


def test_decision_is_frozen():
    decision = decide("main", "mx", STRANGER, ALICE)
    with pytest.raises(AttributeError):
        decision.verdict = Verdict.RELAY  # type: ignore[misc]


def test_as_dict_is_json_ready():
    import json
    data = decide("main", "mx", STRANGER, "x@example.org").as_dict()
    assert json.loads(json.dumps(data))["event"] == {"id": 1709, "name": "RELAY_DENIED"}
    assert data["reply"]["code"] == 550 and data["accepted"] is False


def test_no_state_leaks_between_decisions():
    """An authenticated relay, then an anonymous one on the same listener: refused."""
    loaded = loaded_config("main")
    directory = Directory.build(loaded)
    allowed = decide_recipient(loaded, directory, SessionFacts("submission", STRANGER, tls=True,
                                                               auth_user=ALICE),
                               None, rcpt("x@example.org"))
    refused = decide_recipient(loaded, directory, SessionFacts("partners", STRANGER),
                               None, rcpt("x@example.org"))
    assert allowed.verdict is Verdict.RELAY
    assert refused.verdict is Verdict.REFUSE


# --- fail closed -------------------------------------------------------------------------


class BrokenDirectory:
    def find(self, address):
        raise RuntimeError("user database unreadable")

    def login(self, username):
        raise RuntimeError("user database unreadable")


@pytest.mark.parametrize("recipient", ["alice@example.test", "x@example.org", "x@shared.example"])
def test_broken_directory_fails_closed(recipient):
    loaded = loaded_config("main")
    decision = decide_recipient(loaded, BrokenDirectory(), SessionFacts("mx", STRANGER), None,
                                rcpt(recipient))
    assert decision.verdict is Verdict.REFUSE
    assert (decision.reply.code, decision.reply.enhanced) == (451, "4.3.0")
    assert decision.reply == status.policy_error().tagged(decision.id)
    assert "user database unreadable" in decision.admin_text
    assert decision.rules[-1].rule == "fail-closed"


def test_unknown_listener_fails_closed():
    loaded = loaded_config("main")
    decision = decide_recipient(loaded, Directory.build(loaded), SessionFacts("nosuch", STRANGER),
                                None, rcpt(ALICE))
    assert (decision.verdict, decision.reply.code) == (Verdict.REFUSE, 451)


def test_garbage_recipient_object_fails_closed():
    loaded = loaded_config("main")
    decision = decide_recipient(loaded, Directory.build(loaded), SessionFacts("mx", STRANGER),
                                None, object())
    assert (decision.verdict, decision.reply.enhanced) == (Verdict.REFUSE, "4.3.0")


# --- connection and MAIL decisions on their own ------------------------------------------


@pytest.mark.parametrize("listener,client,rdns,refused", [
    ("mx", STRANGER, None, False),
    ("devices", "192.0.2.99", None, False),
    ("devices", "10.9.9.9", None, False),
    ("devices", "172.16.1.1", "a.b.example.net", False),
    ("devices", "172.16.1.1", "example.net.evil.test", True),
    ("devices", STRANGER, None, True),
    ("legacy", "203.0.113.99", None, True),
    ("legacy", "203.0.113.98", None, False),
])
def test_decide_connection(listener, client, rdns, refused):
    decision = decide_connection(loaded_config("main"), SessionFacts(listener, client, rdns))
    if not refused:
        assert decision is None
    else:
        assert decision is not None and str(decision.reply).startswith("554 5.7.1")
        assert decision.event is EventId.CONNECTION_REFUSED


@pytest.mark.parametrize("listener,tls,user,expected", [
    ("mx", False, None, None),
    ("submission", True, ALICE, None),
    ("submission", True, None, "530 5.7.0 Authentication required"),
    ("submission", False, ALICE, "530 5.7.0 Must issue a STARTTLS command first"),
    ("submission", False, None, "530 5.7.0 Must issue a STARTTLS command first"),
])
def test_decide_mail(listener, tls, user, expected):
    loaded = loaded_config("main")
    facts = SessionFacts(listener, STRANGER, tls=tls, auth_user=user)
    decision = decide_mail(loaded, Directory.build(loaded), facts, rcpt("a@elsewhere.example"))
    if expected is None:
        assert decision is None
    else:
        assert str(decision.reply).startswith(expected)
        assert decision.inputs["sender"] == "a@elsewhere.example"


def test_relay_list_allows_without_a_loaded_config():
    loaded = loaded_config("main")
    devices = loaded.config.listener_named("devices")
    allowed, hit = relay_list_allows(devices, SessionFacts("devices", "192.0.2.10"))
    assert allowed and hit.where == "" and "192.0.2.10" in hit.detail
    allowed, _ = relay_list_allows(devices, SessionFacts("devices", "192.0.2.11"))
    assert not allowed


# --- the parser refuses the rest with a 5xx, and refuse_address records it ---------------


@pytest.mark.parametrize("text", [
    "<alice@example.test.>",
    "<alice@@example.test>",
    "<alice@example..test>",
    "<alice@[999.1.1.1]>",
    "<>",
    "<alice@example.test",
])
def test_parser_refusals_are_permanent(text):
    with pytest.raises(AddressError) as caught:
        parse_rcpt_to(text)
    error = caught.value
    assert 500 <= error.code < 600
    loaded = loaded_config("main")
    decision = refuse_address(loaded, SessionFacts("mx", STRANGER), None, text, error.code,
                              error.enhanced, error.reason)
    assert decision.verdict is Verdict.REFUSE
    assert decision.event is EventId.ADDRESS_REFUSED
    assert decision.reply.code == error.code and decision.reply.enhanced == error.enhanced


def test_default_configuration_relays_for_nobody():
    loaded = load_default()
    directory = Directory.build(loaded)
    for client in ("203.0.113.9", "127.0.0.1", "::1", "10.0.0.1"):
        decision = decide_recipient(loaded, directory, SessionFacts("mx", client), None,
                                    rcpt("x@example.org"))
        assert decision.verdict is Verdict.REFUSE and decision.event is EventId.RELAY_DENIED
