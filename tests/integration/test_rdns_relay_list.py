"""A relay list entry that names a domain matches clients by forward-confirmed reverse DNS,
looked up by the running server in nsd on loopback before it greets the client."""

import socket

import pytest

from tests.integration.test_dns_rdns import ZONES
from tests.support import nsd
from tests.support.smtp import SmtpConn

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not nsd.available(), reason="nsd not installed")]

CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "devices"
address = "0.0.0.0"
port = {port:devices}
tls = "none"

[listener.relay]
mode = "only"
entries = ["relay.test"]

[[domain]]
name = "example.test"

[[route]]
name = "default"

[dns]
nameservers = ["127.0.0.1"]
port = DNSPORT
timeout = 2.0

[delivery]
enabled = false
"""


class FromAddress(SmtpConn):
    """SmtpConn whose socket is bound to a chosen loopback source address."""

    def __init__(self, port: int, source: str):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        self.sock, self.buf = sock, b""
        self.greeting = self.reply()


@pytest.mark.parametrize("source, relays", [
    ("127.0.0.5", True),     # PTR printer.relay.test, whose A is 127.0.0.5: under relay.test
    ("127.0.0.6", False),    # PTR liar.relay.test, whose A is another address: not confirmed
    ("127.0.0.7", False),    # no PTR
])
def test_domain_entry_matches_only_confirmed_names(tmp_path, start_server, source, relays):
    with nsd.NsdServer(tmp_path, ZONES) as dns:
        srv = start_server(CONFIG.replace("DNSPORT", str(dns.port)))
        with FromAddress(srv.ports["devices"], source) as c:
            assert c.greeting.code == 220
            assert c.cmd("EHLO printer").code == 250
            assert c.cmd("MAIL FROM:<scanner@example.test>").code == 250
            reply = c.cmd("RCPT TO:<someone@example.org>")
            assert (reply.code == 250) is relays, reply
            if not relays:
                assert reply.last.startswith("550 5.7.1")
