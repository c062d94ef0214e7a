"""MX resolution: the next hops for a destination domain, in the order they are tried.

This module owns turning a recipient domain into ``Hop`` values (preference, host, addresses,
port) by RFC 5321 section 5.1 and RFC 7505, over one injectable dnspython resolver:

* MX records in preference order; hosts of equal preference are shuffled (RFC 5321 5.1), each
  host resolved to its A and AAAA records (the client tries the addresses in the order given).
* No MX records (NODATA): the implicit MX, the domain's own A/AAAA.  A domain with neither MX nor
  address records cannot receive mail: ``550 5.4.4``, permanent.
* Null MX (RFC 7505, a lone MX ``.``): ``556 5.1.10``, permanent, never retried.
* NXDOMAIN: ``550 5.1.2`` "domain does not exist", permanent.
* SERVFAIL, REFUSED or a timeout: ``451 4.4.3``, temporary.
* An MX host that is an alias (CNAME, forbidden by RFC 2181 10.3 and RFC 5321 5.1) or that has no
  address is skipped.  When no host is left the failure is *temporary*, ``451 4.4.4`` (``451
  4.4.3`` when a host's look-up failed rather than came back empty).  RFC 5321 5.1 only says that
  MX records none of which is usable "MUST be reported as an error"; it does not make it final.
  The domain has published MX records, so it does intend to receive mail (unlike a null MX), and
  an MX host without addresses is nearly always a zone being edited or a host record that lapsed:
  the kind of mistake an administrator fixes within hours.  Retrying until the queue lifetime ends
  (then 5.4.7) loses nothing, whereas bouncing at once would lose mail over a fault of minutes.
* An address literal ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` is that address, port 25.

Errors are ``NextHopError``: the ``status.Reply`` the delivery result and the NDR keep, whether it
is permanent, and a sentence for the administrator naming the record that is wrong.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import idna

from .. import status
from ..status import Reply

__all__ = [
    "MAX_MX_HOSTS",
    "SMTP_PORT",
    "Hop",
    "HostAddresses",
    "LookupOutcome",
    "ascii_domain",
    "NextHopError",
    "host_addresses",
    "literal_address",
    "next_hops",
]

SMTP_PORT = 25
MAX_MX_HOSTS = 10          # MX hosts looked up per domain (Postfix: smtp_mx_address_limit)
MAX_ADDRESSES_PER_HOST = 10


@dataclass(frozen=True, slots=True)
class Hop:
    """One next hop: its MX preference (or smarthost position), name, addresses and port."""

    preference: int
    host: str                       # lower-case A-label name, or the literal address
    addresses: tuple[str, ...]      # IPv4 then IPv6, tried in this order
    port: int = SMTP_PORT


class NextHopError(Exception):
    """No next hop for a domain: the reply to record, and whether retrying may help."""

    def __init__(self, reply: Reply, domain: str, detail: str):
        super().__init__(f"{domain}: {reply}")
        self.reply = reply
        self.domain = domain
        self.detail = detail        # for the administrator: which record is wrong

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent













# --- address look-ups ------------------------------------------------------------------------

class LookupOutcome(Enum):
    FOUND = "found"
    NXDOMAIN = "nxdomain"           # the name does not exist
    NODATA = "nodata"               # it exists but has no A/AAAA records
    ALIAS = "alias"                 # it is a CNAME and aliases were refused
    TEMPORARY = "temporary"         # SERVFAIL, REFUSED, timeout


@dataclass(frozen=True, slots=True)
class HostAddresses:
    """The A and AAAA look-up of one name: its addresses, or why there are none."""

    name: str
    addresses: tuple[str, ...]
    outcome: LookupOutcome
    detail: str

    @property
    def temporary(self) -> bool:
        return self.outcome is LookupOutcome.TEMPORARY


async def host_addresses(resolver: dns.asyncresolver.Resolver, name: str, *,
                         allow_alias: bool = True) -> HostAddresses:
    """A and AAAA records of ``name`` (looked up together); with ``allow_alias=False`` a name
    that is a CNAME counts as having no address (RFC 2181 10.3: an MX must not name an alias)."""
    results = await asyncio.gather(_query(resolver, name, "A"), _query(resolver, name, "AAAA"))
    addresses: list[str] = []
    outcomes: list[tuple[LookupOutcome, str]] = []
    for answer, outcome, detail in results:
        outcomes.append((outcome, detail))
        if answer is None:
            continue
        if not allow_alias and answer.canonical_name != answer.qname:
            outcomes[-1] = (LookupOutcome.ALIAS, f"{name} is an alias (CNAME) for "
                            f"{answer.canonical_name.to_text(omit_final_dot=True)}")
            continue
        addresses.extend(r.address for r in list(answer)[:MAX_ADDRESSES_PER_HOST])
    if addresses:
        return HostAddresses(name, tuple(addresses), LookupOutcome.FOUND, "")
    for wanted in (LookupOutcome.TEMPORARY, LookupOutcome.ALIAS, LookupOutcome.NXDOMAIN):
        for outcome, detail in outcomes:
            if outcome is wanted:
                return HostAddresses(name, (), outcome, detail)
    return HostAddresses(name, (), LookupOutcome.NODATA, f"{name} has no A or AAAA record")


async def _query(resolver: dns.asyncresolver.Resolver, name: str,
                 rdtype: str) -> tuple[dns.resolver.Answer | None, LookupOutcome, str]:
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        return None, LookupOutcome.NXDOMAIN, f"{name} does not exist (NXDOMAIN)"
    except dns.resolver.NoAnswer:
        return None, LookupOutcome.NODATA, f"{name} has no {rdtype} record"
    except dns.exception.Timeout:
        return None, LookupOutcome.TEMPORARY, f"{rdtype} look-up of {name} timed out"
    except dns.exception.DNSException as exc:
        return None, LookupOutcome.TEMPORARY, f"{rdtype} look-up of {name} failed: {exc}"
    return answer, LookupOutcome.FOUND, ""


# --- next hops -------------------------------------------------------------------------------

def literal_address(domain: str) -> str | None:
    """The address of an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), None when
    ``domain`` is a name; raises NextHopError (5.1.2) for a malformed literal."""
    if not domain.startswith("["):
        return None
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            ip = ipaddress.IPv6Address(inner[5:])
        else:
            ip = ipaddress.IPv4Address(inner)
    except ValueError:
        raise NextHopError(status.bad_literal(domain), domain,
                           f"{domain} is neither [IPv4] nor [IPv6:address] (RFC 5321 4.1.3)") from None
    return str(ip)


def ascii_domain(domain: str) -> str:
    """The lower-case A-label form of a destination domain, without a trailing dot."""
    text = domain.strip().rstrip(".").lower()
    try:
        return idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError:
        if text.isascii() and text:
            return text
        raise NextHopError(status.domain_not_found(domain), domain,
                           f"{domain!r} is not a valid domain name") from None


async def next_hops(resolver: dns.asyncresolver.Resolver, domain: str, *,
                    rng: random.Random | None = None) -> list[Hop]:
    """The hops for ``domain`` in the order to try them; raises NextHopError when there is none.

    ``rng`` shuffles hosts of equal preference (tests pass a seeded one).
    """
    literal = literal_address(domain)
    if literal is not None:
        return [Hop(0, literal, (literal,))]
    name = ascii_domain(domain)
    try:
        answer = await resolver.resolve(name, "MX", search=False)
    except dns.resolver.NoAnswer:
        return await _implicit_mx(resolver, name)
    except dns.resolver.NXDOMAIN:
        raise NextHopError(status.domain_not_found(name), name, f"{name} does not exist (NXDOMAIN)") from None
    except dns.exception.DNSException as exc:
        raise NextHopError(status.dns_failure(name), name, f"MX look-up of {name} failed: "
                           f"{_describe(exc)}") from None
    records = [(r.preference, r.exchange) for r in answer]
    if all(exchange == dns.name.root for _, exchange in records):
        raise NextHopError(status.null_mx(name), name,
                           f"{name} publishes a null MX (RFC 7505): it accepts no mail")
    return await _mx_hops(resolver, name, records, rng or random.Random())


async def _implicit_mx(resolver: dns.asyncresolver.Resolver, name: str) -> list[Hop]:
    found = await host_addresses(resolver, name, allow_alias=True)
    if found.addresses:
        return [Hop(0, name, found.addresses)]
    if found.temporary:
        raise NextHopError(status.dns_failure(name), name, found.detail)
    if found.outcome is LookupOutcome.NXDOMAIN:
        raise NextHopError(status.domain_not_found(name), name, found.detail)
    raise NextHopError(status.no_mail_host(name), name,
                       f"{name} has no MX record and no A or AAAA record (RFC 5321 5.1)")


async def _mx_hops(resolver: dns.asyncresolver.Resolver, domain: str,
                   records: list[tuple[int, dns.name.Name]], rng: random.Random) -> list[Hop]:
    ordered = _preference_order(records, rng)[:MAX_MX_HOSTS]
    lookups = await asyncio.gather(*(host_addresses(resolver, host, allow_alias=False)
                                     for _, host in ordered))
    hops = [Hop(pref, host, found.addresses) for (pref, host), found in zip(ordered, lookups)
            if found.addresses]
    if hops:
        return hops
    skipped = "; ".join(found.detail for found in lookups) or "every MX record is '.'"
    if any(found.temporary for found in lookups):
        raise NextHopError(status.dns_failure(domain), domain, f"no usable MX host for {domain}: {skipped}")
    raise NextHopError(status.no_usable_mx(domain), domain, f"no MX host of {domain} has an address "
                       f"(an MX must name a host with A or AAAA records, not an alias): {skipped}")


def _preference_order(records: list[tuple[int, dns.name.Name]],
                      rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first, equal preferences in random order; '.' and duplicates dropped."""
    by_pref: dict[int, list[str]] = {}
    seen: set[str] = set()
    for pref, exchange in sorted(records, key=lambda r: r[0]):
        if exchange == dns.name.root:
            continue
        host = exchange.to_text(omit_final_dot=True).lower()
        if host not in seen:
            seen.add(host)
            by_pref.setdefault(pref, []).append(host)
    out: list[tuple[int, str]] = []
    for pref in sorted(by_pref):
        hosts = sorted(by_pref[pref])
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


def _describe(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
