"""Forward-confirmed reverse DNS against a real nsd on loopback."""

import asyncio

import pytest

from relaywarden.config.schema import Dns
from relaywarden.dns import confirmed_name, make_resolver
from tests.support import nsd

pytestmark = pytest.mark.skipif(not nsd.available(), reason="nsd not installed (scripts/install-peers)")

ZONES = {
    "relay.test": "printer IN A 127.0.0.5\nliar IN A 127.0.0.99\n",
    "0.0.127.in-addr.arpa": (
        "$ORIGIN 0.0.127.in-addr.arpa.\n$TTL 60\n"
        "@ IN SOA ns.relay.test. hostmaster.relay.test. 1 3600 600 86400 60\n@ IN NS ns.relay.test.\n"
        "5 IN PTR printer.relay.test.\n6 IN PTR liar.relay.test.\n"),
}


@pytest.fixture(scope="module")
def resolver(tmp_path_factory):
    with nsd.NsdServer(tmp_path_factory.mktemp("dns"), ZONES) as server:
        yield make_resolver(Dns(nameservers=["127.0.0.1"], port=server.port, timeout=2.0))


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.5", "printer.relay.test"),   # PTR and A agree
    ("127.0.0.6", None),                   # PTR says liar.relay.test, whose A is another address
    ("127.0.0.7", None),                   # no PTR at all
])
def test_confirmed_name(resolver, address, expected):
    assert asyncio.run(confirmed_name(resolver, address)) == expected
