"""Route choice and smarthost parsing (relaywarden.delivery.routes), without DNS.

Names that need resolving and MX routes are tested against nsd in
tests/integration/test_mx_nsd.py.
"""

from __future__ import annotations

import asyncio

import pytest

from relaywarden.config.loader import parse_text
from relaywarden.config.schema import RouteKind, RouteTls
from relaywarden.delivery.mx import Hop, NextHopError
from relaywarden.delivery.routes import (
    DEFAULT_ROUTE_NAME,
    RouteChoice,
    hops_for,
    parse_smarthost,
    resolve_route,
)
from relaywarden.policy.relay import route_for

LISTENER = """\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
"""

ROUTES_TOML = LISTENER + """
[[domain]]
name = "shared.example"
kind = "internal-relay"
route = "legacy"

[[route]]
name = "legacy"
domains = ["legacy.example"]
kind = "smarthost"
hosts = ["10.0.0.25:2525", "[2001:db8::25]:587", "192.0.2.7"]
tls = "required"
ca_file = "/etc/ssl/legacy-ca.pem"
username = "relay"
password_file = "/etc/relaywarden/legacy.pw"

[[route]]
name = "exact"
domains = ["sub.partner.example"]
kind = "smarthost"
hosts = ["192.0.2.1"]

[[route]]
name = "wild"
domains = ["*.partner.example"]
kind = "smarthost"
hosts = ["192.0.2.2"]

[[route]]
name = "deeper-wild"
domains = ["*.eu.partner.example"]
kind = "smarthost"
hosts = ["192.0.2.3"]

[[route]]
name = "internet"
domains = ["*"]
kind = "mx"
tls = "opportunistic"
"""

NO_DEFAULT_TOML = LISTENER + """
[[route]]
name = "only-one"
domains = ["one.example"]
kind = "smarthost"
hosts = ["192.0.2.9:2525"]
"""


@pytest.fixture(scope="module")
def loaded():
    return parse_text(ROUTES_TOML, "routes.toml")


@pytest.mark.parametrize("domain, route", [
    ("sub.partner.example", "exact"),          # exact beats *.partner.example
    ("x.partner.example", "wild"),
    ("a.b.partner.example", "wild"),
    ("x.eu.partner.example", "deeper-wild"),   # the longer wildcard wins
    ("partner.example", "internet"),           # *.partner.example does not match the apex
    ("example.org", "internet"),               # "*" is the default
    ("shared.example", "legacy"),              # the domain's own route
    ("legacy.example", "legacy"),
    ("SUB.Partner.Example.", "exact"),         # case and trailing dot do not change the choice
])
def test_resolve_route_precedence(loaded, domain, route):
    choice = resolve_route(loaded, domain)
    assert choice.name == route
    assert choice.route is not None and choice.route.name == route_for(loaded, domain.lower().rstrip("."))


def test_idn_domain_matches_its_a_label():
    loaded = parse_text(LISTENER + """
[[route]]
name = "books"
domains = ["bücher.example"]
kind = "smarthost"
hosts = ["192.0.2.4"]
""", "idn.toml")
    assert resolve_route(loaded, "BÜCHER.example").name == "books"
    assert resolve_route(loaded, "xn--bcher-kva.example").name == "books"


def test_route_settings_are_exposed(loaded):
    choice = resolve_route(loaded, "legacy.example")
    assert choice.kind is RouteKind.SMARTHOST
    assert choice.tls is RouteTls.REQUIRED
    assert choice.ca_file == "/etc/ssl/legacy-ca.pem"
    assert (choice.username, choice.password_file) == ("relay", "/etc/relaywarden/legacy.pw")


def test_no_matching_route_is_the_default_mx():
    loaded = parse_text(NO_DEFAULT_TOML, "nodefault.toml")
    choice = resolve_route(loaded, "elsewhere.example")
    assert choice == RouteChoice(None)
    assert choice.name == DEFAULT_ROUTE_NAME
    assert choice.kind is RouteKind.MX
    assert choice.tls is RouteTls.OPPORTUNISTIC
    assert choice.username is None and choice.ca_file is None
    assert resolve_route(loaded, "one.example").name == "only-one"


@pytest.mark.parametrize("entry, expected", [
    ("relay.example", ("relay.example", 25)),
    ("Relay.Example.:2525", ("relay.example", 2525)),
    ("192.0.2.1", ("192.0.2.1", 25)),
    ("192.0.2.1:587", ("192.0.2.1", 587)),
    ("[192.0.2.1]:26", ("192.0.2.1", 26)),
    ("[2001:db8::1]:587", ("2001:db8::1", 587)),
    ("[2001:DB8:0::1]", ("2001:db8::1", 25)),
    ("[IPv6:2001:db8::1]:465", ("2001:db8::1", 465)),
    ("2001:db8::1", ("2001:db8::1", 25)),
    ("::1", ("::1", 25)),
    ("[relay.example]:587", ("relay.example", 587)),   # Postfix style: a name, no MX look-up
    ("  mail.example:25 ", ("mail.example", 25)),
    ("bücher.example:25", ("xn--bcher-kva.example", 25)),
])
def test_parse_smarthost(entry, expected):
    assert parse_smarthost(entry) == expected


@pytest.mark.parametrize("entry, words", [
    ("relay.example:", "port"),
    ("relay.example:0", "port"),
    ("relay.example:65536", "port"),
    ("relay.example:smtp", "port"),
    ("[2001:db8::1", "closing"),
    ("[2001:db8::1]587", "':port'"),
    ("2001:db8::1:587:x", "IPv6"),
    (":25", "not a host"),
    ("bad_host name", "not a host"),
    ("a/b:25", "not a host"),
    ("", "not a host"),
])
def test_parse_smarthost_errors(entry, words):
    with pytest.raises(ValueError, match=words):
        parse_smarthost(entry)


class _NoDns:
    """A resolver that must not be asked: literal smarthosts need no DNS."""

    async def resolve(self, *args, **kwargs):
        raise AssertionError(f"unexpected DNS query {args}")


def test_literal_smarthosts_in_order_without_dns(loaded):
    hops = asyncio.run(hops_for(resolve_route(loaded, "legacy.example"), "legacy.example", _NoDns()))
    assert hops == [
        Hop(0, "10.0.0.25", ("10.0.0.25",), 2525),
        Hop(1, "2001:db8::25", ("2001:db8::25",), 587),
        Hop(2, "192.0.2.7", ("192.0.2.7",), 25),
    ]


def test_address_literal_on_default_route_needs_no_dns():
    hops = asyncio.run(hops_for(RouteChoice(None), "[192.0.2.55]", _NoDns()))
    assert hops == [Hop(0, "192.0.2.55", ("192.0.2.55",), 25)]
    hops = asyncio.run(hops_for(RouteChoice(None), "[IPv6:2001:db8::5]", _NoDns()))
    assert hops == [Hop(0, "2001:db8::5", ("2001:db8::5",), 25)]


def test_bad_smarthost_entries_are_skipped_or_deferred():
    loaded = parse_text(LISTENER + """
[[route]]
name = "typo"
domains = ["*"]
kind = "smarthost"
hosts = ["relay.example:99999", "192.0.2.8:2525"]

[[route]]
name = "all-bad"
domains = ["bad.example"]
kind = "smarthost"
hosts = ["relay.example:smtp", "[::1"]
""", "typo.toml")
    hops = asyncio.run(hops_for(resolve_route(loaded, "x.example"), "x.example", _NoDns()))
    assert hops == [Hop(1, "192.0.2.8", ("192.0.2.8",), 2525)]
    with pytest.raises(NextHopError) as info:
        asyncio.run(hops_for(resolve_route(loaded, "bad.example"), "bad.example", _NoDns()))
    err = info.value
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (451, "4.3.5", False)
    assert "all-bad" in err.detail and "relay.example:smtp" in err.detail
