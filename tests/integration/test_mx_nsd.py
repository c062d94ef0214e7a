"""MX resolution and route next hops against a real nsd serving zone files on loopback.

Covers RFC 5321 5.1 (preference order, equal preferences shuffled, implicit MX, MX to an alias or
to a host without addresses), RFC 7505 null MX, NXDOMAIN, SERVFAIL-like refusals and timeouts,
AAAA, address literals, and smarthost names resolved with the same resolver.
"""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from relaywarden.config.loader import parse_text
from relaywarden.config.schema import Dns
from relaywarden.delivery.mx import Hop, NextHopError, next_hops
from relaywarden.delivery.routes import RouteChoice, hops_for, resolve_route
from relaywarden.dns import make_resolver
from tests.support import nsd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not nsd.available(), reason="nsd not installed (scripts/install-peers)"),
]

MAIL_ZONE = """\
mx0 IN A 127.0.0.10
mx1 IN A 127.0.0.11
mx2 IN A 127.0.0.12
mx3 IN A 127.0.0.13
mx6 IN AAAA ::1
dual IN A 127.0.0.14
dual IN AAAA 2001:db8::14
noaddr IN TXT "a name with no address"
alias IN CNAME mx1
relay IN A 127.0.0.30
relay6 IN AAAA 2001:db8::30

multi IN MX 20 mx3
multi IN MX 10 mx1
multi IN MX 10 mx2
multi IN MX 5 mx0

v6 IN MX 10 mx6
v6 IN MX 20 dual

null IN MX 0 .
oddnull IN MX 0 .
oddnull IN MX 10 mx1

implicit IN A 127.0.0.20
implicit IN AAAA ::1
implicit4 IN A 127.0.0.21
implicitalias IN CNAME implicit4
nomail IN TXT "v=spf1 -all"

broken IN MX 10 noaddr
broken IN MX 20 missing
broken IN MX 30 alias
partial IN MX 10 noaddr
partial IN MX 20 alias
partial IN MX 30 mx2
lame IN MX 10 host.unserved.test.
lame2 IN MX 10 host.unserved.test.
lame2 IN MX 20 noaddr
"""

ROUTES_TOML = """\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525

[[route]]
name = "hub"
domains = ["hub.example"]
kind = "smarthost"
hosts = ["relay.mail.test:2525", "missing.mail.test", "[::1]:587", "relay6.mail.test", "dual.mail.test"]

[[route]]
name = "dead-names"
domains = ["dead.example"]
kind = "smarthost"
hosts = ["missing.mail.test", "noaddr.mail.test:26"]

[[route]]
name = "lame-names"
domains = ["lame.example"]
kind = "smarthost"
hosts = ["relay.unserved.test"]

[[route]]
name = "internet"
domains = ["*"]
kind = "mx"
"""


@pytest.fixture(scope="module")
def resolver(tmp_path_factory):
    with nsd.NsdServer(tmp_path_factory.mktemp("dns"), {"mail.test": MAIL_ZONE}) as server:
        yield make_resolver(Dns(nameservers=["127.0.0.1"], port=server.port, timeout=2.0))


def hops(resolver, domain: str, seed: int = 0) -> list[Hop]:
    return asyncio.run(next_hops(resolver, domain, rng=random.Random(seed)))


def failure(resolver, domain: str) -> NextHopError:
    with pytest.raises(NextHopError) as info:
        asyncio.run(next_hops(resolver, domain))
    return info.value


def test_mx_in_preference_order(resolver):
    result = hops(resolver, "multi.mail.test")
    assert [h.preference for h in result] == [5, 10, 10, 20]
    assert result[0] == Hop(5, "mx0.mail.test", ("127.0.0.10",), 25)
    assert result[-1] == Hop(20, "mx3.mail.test", ("127.0.0.13",), 25)
    assert {h.host for h in result[1:3]} == {"mx1.mail.test", "mx2.mail.test"}


def test_equal_preferences_are_shuffled(resolver):
    orders = {tuple(h.host for h in hops(resolver, "multi.mail.test", seed)[1:3]) for seed in range(40)}
    assert orders == {("mx1.mail.test", "mx2.mail.test"), ("mx2.mail.test", "mx1.mail.test")}


def test_case_and_trailing_dot(resolver):
    assert {h.host for h in hops(resolver, "MULTI.Mail.Test.")} == {
        "mx0.mail.test", "mx1.mail.test", "mx2.mail.test", "mx3.mail.test"}


def test_aaaa_and_dual_stack_hosts(resolver):
    assert hops(resolver, "v6.mail.test") == [
        Hop(10, "mx6.mail.test", ("::1",), 25),
        Hop(20, "dual.mail.test", ("127.0.0.14", "2001:db8::14"), 25),
    ]


def test_null_mx_is_permanent_5_1_10(resolver):
    err = failure(resolver, "null.mail.test")
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (556, "5.1.10", True)
    assert "null MX" in err.detail


def test_root_mx_beside_real_mx_is_skipped(resolver):
    assert hops(resolver, "oddnull.mail.test") == [Hop(10, "mx1.mail.test", ("127.0.0.11",), 25)]


def test_no_mx_uses_implicit_mx(resolver):
    assert hops(resolver, "implicit.mail.test") == [
        Hop(0, "implicit.mail.test", ("127.0.0.20", "::1"), 25)]


def test_implicit_mx_follows_an_alias(resolver):
    # RFC 5321 5.1: a CNAME found for the domain itself is followed
    assert hops(resolver, "implicitalias.mail.test") == [
        Hop(0, "implicitalias.mail.test", ("127.0.0.21",), 25)]


def test_no_mx_and_no_address_is_permanent(resolver):
    err = failure(resolver, "nomail.mail.test")
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (550, "5.4.4", True)


def test_nxdomain_is_permanent_5_1_2(resolver):
    err = failure(resolver, "nosuch.mail.test")
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (550, "5.1.2", True)
    assert "does not exist" in err.reply.text


def test_mx_to_alias_or_addressless_host_is_skipped(resolver):
    assert hops(resolver, "partial.mail.test") == [Hop(30, "mx2.mail.test", ("127.0.0.12",), 25)]


def test_no_usable_mx_host_is_temporary_4_4_4(resolver):
    err = failure(resolver, "broken.mail.test")
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (451, "4.4.4", False)
    assert "alias.mail.test is an alias (CNAME) for mx1.mail.test" in err.detail
    for name in ("noaddr.mail.test", "missing.mail.test"):
        assert name in err.detail


def test_mx_host_in_unanswered_zone_is_temporary_4_4_3(resolver):
    for domain in ("lame.mail.test", "lame2.mail.test"):
        err = failure(resolver, domain)
        assert (err.reply.code, err.reply.enhanced, err.permanent) == (451, "4.4.3", False)


def test_refused_query_is_temporary_4_4_3(resolver):
    err = failure(resolver, "elsewhere.unserved.test")     # nsd answers REFUSED
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (451, "4.4.3", False)


def test_unreachable_nameserver_is_temporary_4_4_3():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # bound and silent: queries time out
        silent = make_resolver(Dns(nameservers=["127.0.0.1"], port=port, timeout=0.3))
        err = failure(silent, "multi.mail.test")
    assert (err.reply.code, err.reply.enhanced, err.permanent) == (451, "4.4.3", False)


def test_address_literals(resolver):
    assert hops(resolver, "[127.0.0.9]") == [Hop(0, "127.0.0.9", ("127.0.0.9",), 25)]
    assert hops(resolver, "[IPv6:::1]") == [Hop(0, "::1", ("::1",), 25)]
    err = failure(resolver, "[300.1.1.1]")
    assert (err.reply.enhanced, err.permanent) == ("5.1.2", True)


@pytest.fixture(scope="module")
def loaded():
    return parse_text(ROUTES_TOML, "routes.toml")


def test_smarthost_names_resolved_in_order(resolver, loaded):
    result = asyncio.run(hops_for(resolve_route(loaded, "hub.example"), "hub.example", resolver))
    assert result == [
        Hop(0, "relay.mail.test", ("127.0.0.30",), 2525),
        Hop(2, "::1", ("::1",), 587),
        Hop(3, "relay6.mail.test", ("2001:db8::30",), 25),
        Hop(4, "dual.mail.test", ("127.0.0.14", "2001:db8::14"), 25),
    ]


def test_smarthost_without_address_is_temporary(resolver, loaded):
    with pytest.raises(NextHopError) as info:
        asyncio.run(hops_for(resolve_route(loaded, "dead.example"), "dead.example", resolver))
    assert (info.value.reply.enhanced, info.value.permanent) == ("4.4.4", False)
    assert "dead-names" in info.value.detail
    with pytest.raises(NextHopError) as info:
        asyncio.run(hops_for(resolve_route(loaded, "lame.example"), "lame.example", resolver))
    assert (info.value.reply.enhanced, info.value.permanent) == ("4.4.3", False)


def test_mx_route_and_default_route_look_up_mx(resolver, loaded):
    choice = resolve_route(loaded, "multi.mail.test")
    assert choice.name == "internet"
    via_route = asyncio.run(hops_for(choice, "multi.mail.test", resolver, rng=random.Random(1)))
    via_default = asyncio.run(hops_for(RouteChoice(None), "multi.mail.test", resolver,
                                       rng=random.Random(1)))
    assert via_route == via_default == hops(resolver, "multi.mail.test", seed=1)
