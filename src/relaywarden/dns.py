"""DNS look-ups the server needs, over one injectable dnspython resolver.

``make_resolver(config.dns)`` builds it (the configured nameservers and port, or the system's);
tests point it at nsd on loopback.  ``confirmed_name()`` gives a client's forward-confirmed
reverse DNS name (PTR, then A/AAAA of that name must include the address), which relay and
connection lists match their domain entries against: an unconfirmed PTR never matches.
"""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from .config.schema import Dns


def make_resolver(cfg: Dns) -> dns.asyncresolver.Resolver:
    if cfg.nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = list(cfg.nameservers)
        r.port = cfg.port
    else:
        r = dns.asyncresolver.Resolver()
    r.timeout = cfg.timeout
    r.lifetime = cfg.timeout * 2
    return r


async def confirmed_name(resolver: dns.asyncresolver.Resolver, address: str) -> str | None:
    """The forward-confirmed reverse DNS name of ``address`` (lower-case, no trailing dot), or None."""
    try:
        ip = ipaddress.ip_address(address)
        answer = await resolver.resolve(dns.reversename.from_address(str(ip)), "PTR")
    except (ValueError, dns.exception.DNSException):
        return None
    rdtype = "A" if ip.version == 4 else "AAAA"
    for ptr in list(answer)[:5]:            # bounded: a PTR set can be long
        name = ptr.target.to_text().rstrip(".").lower()
        try:
            forward = await resolver.resolve(name, rdtype)
        except dns.exception.DNSException:
            continue
        if any(ipaddress.ip_address(r.address) == ip for r in forward):
            return name
    return None
