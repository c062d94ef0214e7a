"""Routes: which ``[[route]]`` carries mail for a destination domain, and its next hops.

This module owns the step between "this recipient leaves on a route" and "connect to these
addresses": ``resolve_route()`` picks the route (the domain's own ``route``, else exact beats
``*.x`` beats ``*``, by ``relaywarden.policy.relay.route_for``, so policy and delivery never
disagree), and ``hops_for()`` turns it into ``Hop`` values:

* ``kind = "smarthost"``: the ``hosts`` in the order written (``host``, ``host:port``,
  ``[host]:port``, ``192.0.2.1:2525``, ``[2001:db8::1]:587``, a bare IPv6 address); names are
  resolved to A/AAAA (an alias is fine here), addresses are used as they are.  A smarthost that
  cannot be used is the administrator's to fix, so every failure here is temporary (4.x.x): mail is
  never bounced over a typo in the route.
* ``kind = "mx"``, or no route at all (the built-in default): MX look-up (``delivery.mx``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import re
from dataclasses import dataclass

import dns.asyncresolver

from ..config.loader import LoadedConfig
from ..config.schema import Route, RouteKind, RouteTls
from ..policy.relay import route_for
from .. import status
from ..status import Reply
from .mx import SMTP_PORT, Hop, HostAddresses, NextHopError, ascii_domain, host_addresses, next_hops

__all__ = [
    "DEFAULT_ROUTE_NAME",
    "RouteChoice",
    "hops_for",
    "parse_smarthost",
    "resolve_route",
]

DEFAULT_ROUTE_NAME = "default-mx"

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?")


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The route chosen for a domain; ``route`` None is the built-in default (MX, opportunistic
    TLS, no credentials)."""

    route: Route | None

    @property
    def name(self) -> str:
        return self.route.name if self.route else DEFAULT_ROUTE_NAME

    @property
    def kind(self) -> RouteKind:
        return self.route.kind if self.route else RouteKind.MX

    @property
    def tls(self) -> RouteTls:
        return self.route.tls if self.route else RouteTls.OPPORTUNISTIC

    @property
    def ca_file(self) -> str | None:
        return self.route.ca_file if self.route else None

    @property
    def username(self) -> str | None:
        return self.route.username if self.route else None

    @property
    def password_file(self) -> str | None:
        return self.route.password_file if self.route else None


def resolve_route(loaded: LoadedConfig, domain: str) -> RouteChoice:
    """The route for ``domain`` (any case, U-label or A-label, trailing dot or not)."""
    try:
        name = ascii_domain(domain)
    except NextHopError:
        name = domain.strip().rstrip(".").lower()
    route_name = route_for(loaded, name)
    for route in loaded.config.route:
        if route.name == route_name:
            return RouteChoice(route)
    return RouteChoice(None)


@functools.lru_cache(maxsize=256)     # the routes' entries, parsed again for every message otherwise
def parse_smarthost(text: str) -> tuple[str, int]:
    """``(host, port)`` from a smarthost entry; the host is an address or a lower-case name.

    Raises ValueError saying what is wrong.
    """
    entry = text.strip()
    if entry.startswith("["):
        inner, sep, rest = entry[1:].partition("]")
        if not sep:
            raise ValueError(f"smarthost {text!r}: '[' without a closing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"smarthost {text!r}: only ':port' may follow ']'")
        host, port = _bracketed_host(text, inner), _port(text, rest[1:] if rest else None)
        return host, port
    if entry.count(":") > 1:              # a bare IPv6 address, no port possible
        try:
            return str(ipaddress.IPv6Address(entry)), SMTP_PORT
        except ValueError:
            raise ValueError(f"smarthost {text!r}: write an IPv6 address with a port as "
                             "[2001:db8::1]:587") from None
    host, sep, port_text = entry.partition(":")
    return _plain_host(text, host), _port(text, port_text if sep else None)


def _bracketed_host(text: str, inner: str) -> str:
    candidate = inner[5:] if inner[:5].lower() == "ipv6:" else inner
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return _plain_host(text, inner)   # Postfix-style [name]: the name, never an MX look-up


def _plain_host(text: str, host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    name = host
    if not host.isascii():
        try:
            name = ascii_domain(host)
        except NextHopError:
            name = ""
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f"smarthost {text!r}: {host!r} is not a host name or address")
    return name.rstrip(".").lower()


def _port(text: str, port_text: str | None) -> int:
    if port_text is None:
        return SMTP_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"smarthost {text!r}: port {port_text!r} is not a number from 1 to 65535")
    return int(port_text)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True








async def hops_for(choice: RouteChoice, domain: str, resolver: dns.asyncresolver.Resolver, *,
                   rng: random.Random | None = None) -> list[Hop]:
    """The hops for mail to ``domain`` on the chosen route; raises NextHopError when none."""
    if choice.kind is RouteKind.SMARTHOST and choice.route is not None:
        return await _smarthost_hops(choice.route, domain, resolver)
    return await next_hops(resolver, domain, rng=rng)


async def _smarthost_hops(route: Route, domain: str,
                          resolver: dns.asyncresolver.Resolver) -> list[Hop]:
    problems: list[str] = []
    parsed: list[tuple[int, str, int]] = []
    for index, entry in enumerate(route.hosts):
        try:
            host, port = parse_smarthost(entry)
        except (ValueError, NextHopError) as exc:
            problems.append(str(exc))
            continue
        parsed.append((index, host, port))
    names = [host for _, host, _ in parsed if not _is_address(host)]
    found = dict(zip(names, await asyncio.gather(*(host_addresses(resolver, n) for n in names))))
    hops: list[Hop] = []
    for index, host, port in parsed:
        if _is_address(host):
            hops.append(Hop(index, host, (host,), port))
        elif found[host].addresses:
            hops.append(Hop(index, host, found[host].addresses, port))
        else:
            problems.append(found[host].detail)
    if hops:
        return hops
    raise NextHopError(_no_hop_reply(route.name, parsed, found), domain,
                       f"route {route.name}: no usable smarthost: {'; '.join(problems)}")


def _no_hop_reply(route: str, parsed: list[tuple[int, str, int]],
                  found: dict[str, HostAddresses]) -> Reply:
    if not parsed:
        return status.misconfigured(route)
    if any(lookup.temporary for lookup in found.values()):
        return status.smarthost_dns_failure(route)
    return status.no_smarthost_address(route)
