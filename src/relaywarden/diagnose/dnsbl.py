"""The doctor's block list check (KB 895853: the server was added to a "black hole" list).

This module owns looking up each public address of the server (``listener.public_addresses``,
IPv4 and IPv6) in each DNS block list of ``doctor.dnsbl_zones``, and saying what an answer means:

* no record (NXDOMAIN, or a name without an A record): not listed, ok;
* an A record in 127.0.0.0/8: listed, a failure, with the zone's meaning of the return code (the
  Spamhaus ZEN codes are known one by one; other zones get the generic meaning), the reason the
  zone publishes in its TXT record, and the delisting steps: fix the cause first, then the
  zone's removal page;
* 127.255.255.x: the zone refused the query (a public or open resolver, or over its free quota),
  a warning about the resolver, not a listing;
* any other answer: the zone is dead or answers everything (a lapsed domain), a warning;
* a timeout or a failed look-up: a warning, the address could not be checked.

The name looked up is the address reversed (octets for IPv4, nibbles for IPv6) under the zone.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.resolver

from ..config.schema import RouteKind
from .model import SECTION_BLOCKLISTS, Context, Finding, Level

__all__ = ["CHECKS", "Listing", "check_blocklists", "code_meaning", "query_name", "removal_page"]

MAX_CONCURRENT_QUERIES = 8
MAX_TXT_RECORDS = 3
REFUSED_NETWORK = ipaddress.ip_network("127.255.255.0/24")
LISTED_NETWORK = ipaddress.ip_network("127.0.0.0/8")

# Spamhaus ZEN return codes (https://www.spamhaus.org/faqs/dnsbl-usage/), also answered by the
# single lists (sbl., xbl., pbl., sbl-xbl.spamhaus.org) for their own codes.
SPAMHAUS_CODES = {
    "127.0.0.2": "SBL (Spamhaus Block List): the address is a known spam source or spam "
                 "operation, listed by Spamhaus staff",
    "127.0.0.3": "SBL CSS (Combined Spam Sources): the address recently sent mail with the "
                 "traits of spam (snowshoe, a compromised account or an open relay)",
    "127.0.0.4": "XBL (Exploits Block List): a host behind the address is infected (bot, "
                 "malware) or is an open proxy",
    "127.0.0.5": "XBL (Exploits Block List): a compromised or exploited host",
    "127.0.0.6": "XBL (Exploits Block List): a compromised or exploited host",
    "127.0.0.7": "XBL (Exploits Block List): a compromised or exploited host",
    "127.0.0.9": "DROP (Don't Route Or Peer): the whole netblock is hijacked or run by "
                 "criminals; only the network's owner can resolve it",
    "127.0.0.10": "PBL (Policy Block List), listed by the ISP: the address is in a range its "
                  "owner says must not send mail directly to the Internet (dynamic or end-user)",
    "127.0.0.11": "PBL (Policy Block List), listed by Spamhaus: the address looks like a dynamic "
                  "or end-user address that should not send mail directly to the Internet",
}

REFUSAL_CODES = {
    "127.255.255.252": "the zone name is mistyped or not a zone of this list",
    "127.255.255.254": "the query came through a public or open resolver, which the list refuses",
    "127.255.255.255": "the resolver sent more queries than the list's free use allows",
}

REMOVAL_PAGES = {
    "spamhaus.org": "https://check.spamhaus.org/",
    "spamcop.net": "https://www.spamcop.net/bl.shtml (entries expire 24 hours after the spam stops)",
    "barracudacentral.org": "https://www.barracudacentral.org/rbl/removal-request",
    "surriel.com": "https://psbl.org/remove",
    "sorbs.net": "https://www.sorbs.net/delisting/",
    "uceprotect.net": "https://www.uceprotect.net/en/rblcheck.php",
    "mailspike.net": "https://mailspike.org/iplookup.html",
    "abuseat.org": "https://check.spamhaus.org/ (the CBL is now part of the Spamhaus XBL)",
}


@dataclass(frozen=True)
class Listing:
    """The answer of one zone for one address: the A records and the TXT reasons."""

    address: str
    zone: str
    codes: tuple[str, ...]
    reasons: tuple[str, ...] = ()


def query_name(address: str, zone: str) -> str:
    """The DNSBL name of ``address`` in ``zone``: ``2.0.0.127.zone`` for 127.0.0.2, the 32
    reversed nibbles for an IPv6 address (``1.0.0.0...8.b.d.0.1.0.0.2.zone``)."""
    pointer = ipaddress.ip_address(address).reverse_pointer
    for suffix in (".in-addr.arpa", ".ip6.arpa"):
        if pointer.endswith(suffix):
            return f"{pointer[: -len(suffix)]}.{zone}"
    raise ValueError(f"{address}: no reverse form")


def _is_spamhaus(zone: str) -> bool:
    return zone == "spamhaus.org" or zone.endswith(".spamhaus.org")


def code_meaning(zone: str, code: str) -> str:
    """What return code ``code`` of ``zone`` means, in words."""
    if code in REFUSAL_CODES:
        return f"query refused: {REFUSAL_CODES[code]}"
    if _is_spamhaus(zone) and code in SPAMHAUS_CODES:
        return SPAMHAUS_CODES[code]
    try:
        ip = ipaddress.ip_address(code)
    except ValueError:
        return "an answer that is not an address"
    if ip in REFUSED_NETWORK:
        return "query refused by the list (a public resolver, or over quota)"
    if ip in LISTED_NETWORK:
        return "listed (the list's own code; its TXT record and web site say why)"
    return "not a block list answer: the zone answers outside 127.0.0.0/8 (dead or parked list)"


def removal_page(zone: str) -> str:
    """The page where ``zone`` explains a listing and takes removal requests."""
    for domain, page in REMOVAL_PAGES.items():
        if zone == domain or zone.endswith("." + domain):
            return page
    return f"the web site of {zone} (look up the address there; its TXT record often names the page)"


def _public_addresses(ctx: Context) -> dict[str, list[str]]:
    """Each public address of the server and the listeners that publish it, in file order."""
    addresses: dict[str, list[str]] = {}
    for listener in ctx.config.listener:
        for address in listener.public_addresses:
            addresses.setdefault(address, []).append(listener.name)
    return addresses


def _receives_or_sends_directly(ctx: Context) -> str | None:
    """Why the server's addresses matter to block lists even though none is configured (None for
    a server whose listeners are all on loopback: a test or local setup)."""
    if all(ipaddress.ip_address(listener.address).is_loopback for listener in ctx.config.listener):
        return None
    for route in ctx.config.route:
        if route.kind == RouteKind.MX:
            return f"route {route.name} delivers straight to the destinations' MX hosts"
    for listener in ctx.config.listener:
        if listener.anonymous and listener.port == 25:
            return f"listener {listener.name} takes mail from anonymous clients on port 25"
    return None


async def _lookup(ctx: Context, address: str, zone: str) -> Listing | str | None:
    """The listing, None when not listed, or a sentence saying why the zone could not answer."""
    name = query_name(address, zone)
    try:
        answer = await ctx.resolver.resolve(name, "A", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout:
        return f"the look-up of {name} timed out"
    except dns.exception.DNSException as exc:
        return f"the look-up of {name} failed: {exc or type(exc).__name__}"
    codes = tuple(sorted({r.address for r in answer}, key=ipaddress.ip_address))
    return Listing(address, zone, codes, await _reasons(ctx, name))


async def _reasons(ctx: Context, name: str) -> tuple[str, ...]:
    try:
        answer = await ctx.resolver.resolve(name, "TXT", search=False)
    except dns.exception.DNSException:
        return ()
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in list(answer)[:MAX_TXT_RECORDS]]
    return tuple(texts)


def _delisting_steps(listing: Listing, listeners: list[str]) -> str:
    page = removal_page(listing.zone)
    codes = set(listing.codes)
    if _is_spamhaus(listing.zone) and codes <= {"127.0.0.10", "127.0.0.11"}:
        return (f"{listing.address} is in a range meant for end users: send outbound mail through "
                f"your provider's smarthost (a [[route]] with kind = \"smarthost\"), or, if it is a "
                f"static address meant for a mail server, ask the provider to remove it from the PBL "
                f"or request removal at {page}")
    if _is_spamhaus(listing.zone) and "127.0.0.9" in codes:
        return (f"the whole netblock of {listing.address} is listed: only its owner can resolve "
                f"it; contact your provider, or move the server to another address ({page})")
    return (f"first remove the cause, or the address is listed again: run `relaywarden doctor "
            f"--check open-relay` (open relay) and `relaywarden doctor --check accounts` "
            f"(compromised account: suspend it, reset its password, hold its queued mail), and "
            f"check the hosts that send through {listing.address} (listener "
            f"{', '.join(listeners)}) for malware; then request removal of {listing.address} "
            f"at {page}")


def _listed_finding(ctx: Context, listing: Listing, listeners: list[str]) -> Finding:
    evidence = [f"{query_name(listing.address, listing.zone)} -> {code}: "
                f"{code_meaning(listing.zone, code)}" for code in listing.codes]
    evidence += [f"TXT: {reason}" for reason in listing.reasons]
    return Finding("dnsbl.listed", Level.FAIL,
                   f"{listing.address} is listed in {listing.zone}", SECTION_BLOCKLISTS,
                   tuple(evidence), _delisting_steps(listing, listeners),
                   _where_public(ctx, listing.address))


def _refused_finding(ctx: Context, zone: str, listings: list[Listing]) -> Finding:
    evidence = tuple(f"{query_name(listing.address, zone)} -> {code}: {code_meaning(zone, code)}"
                     for listing in listings for code in listing.codes)
    nameservers = getattr(ctx.resolver, "nameservers", [])
    addresses = ", ".join(listing.address for listing in listings)
    return Finding("dnsbl.refused", Level.WARN,
                   f"{zone} refused to answer for {addresses}: the result says nothing about a "
                   "listing", SECTION_BLOCKLISTS, evidence,
                   f"query the block lists through a resolver of your own (a local recursive "
                   f"resolver such as unbound, not a public one like 8.8.8.8): set [dns] "
                   f"nameservers ({ctx.loaded.source.where('dns', 'nameservers')}; now "
                   f"{', '.join(map(str, nameservers)) or 'the system resolver'}), or register for "
                   f"the list's paid or data-query service", ctx.loaded.source.where("dns"))


def _unchecked_finding(ctx: Context, zone: str, problems: list[tuple[str, str]]) -> Finding:
    addresses = ", ".join(address for address, _ in problems)
    return Finding("dnsbl.unchecked", Level.WARN, f"{addresses} could not be checked in {zone}",
                   SECTION_BLOCKLISTS, tuple(problem for _, problem in problems),
                   f"check that the [dns] nameservers answer for {zone} "
                   f"({ctx.loaded.source.where('dns')}), then run `relaywarden doctor --check "
                   "dnsbl` again", _where_zone(ctx, zone))


def _bogus_finding(ctx: Context, listing: Listing) -> Finding:
    evidence = tuple(f"{query_name(listing.address, listing.zone)} -> {code}: "
                     f"{code_meaning(listing.zone, code)}" for code in listing.codes)
    return Finding("dnsbl.zone", Level.WARN,
                   f"{listing.zone} does not answer like a block list", SECTION_BLOCKLISTS,
                   evidence, f"remove {listing.zone} from doctor.dnsbl_zones "
                   f"({_where_zone(ctx, listing.zone)})", _where_zone(ctx, listing.zone))


def _is_refusal(listing: Listing) -> bool:
    return all(ipaddress.ip_address(c) in REFUSED_NETWORK for c in listing.codes)


def _classify(ctx: Context, listing: Listing, listeners: list[str]) -> Finding:
    if not all(ipaddress.ip_address(c) in LISTED_NETWORK for c in listing.codes):
        return _bogus_finding(ctx, listing)
    return _listed_finding(ctx, listing, listeners)


def _where_public(ctx: Context, address: str) -> str:
    for index, listener in enumerate(ctx.config.listener):
        if address in listener.public_addresses:
            position = listener.public_addresses.index(address)
            return ctx.loaded.source.where("listener", index, "public_addresses", position)
    return ctx.loaded.file


def _where_zone(ctx: Context, zone: str) -> str:
    zones = ctx.config.doctor.dnsbl_zones
    if zone in zones:
        return ctx.loaded.source.where("doctor", "dnsbl_zones", zones.index(zone))
    return ctx.loaded.source.where("doctor", "dnsbl_zones")


def _not_configured(ctx: Context) -> list[Finding]:
    where = ctx.loaded.source.where("listener", 0)
    fix = ('set public_addresses = ["<the address the Internet sees>", ...] on the listener the '
           f"Internet reaches ({where}), IPv4 and IPv6")
    why = _receives_or_sends_directly(ctx)
    if why is None:
        return [Finding("dnsbl.no-public-address", Level.SKIP,
                        "no listener has public_addresses: no address to look up in block lists",
                        SECTION_BLOCKLISTS, (), fix, where)]
    return [Finding("dnsbl.no-public-address", Level.WARN,
                    "no listener has public_addresses, so the block lists cannot be checked",
                    SECTION_BLOCKLISTS, (f"it matters here: {why}",), fix, where)]


async def check_blocklists(ctx: Context) -> list[Finding]:
    """Each public address in each zone of doctor.dnsbl_zones."""
    zones = ctx.config.doctor.dnsbl_zones
    addresses = _public_addresses(ctx)
    if not addresses:
        return _not_configured(ctx)
    if not zones:
        return [Finding("dnsbl.no-zones", Level.SKIP, "doctor.dnsbl_zones is empty: no block list "
                        "to look up", SECTION_BLOCKLISTS, (), "list zones in doctor.dnsbl_zones, "
                        'e.g. ["zen.spamhaus.org", "bl.spamcop.net"]', _where_zone(ctx, ""))]
    if not ctx.live:
        return [Finding("dnsbl", Level.SKIP, "block lists not looked up (--offline)",
                        SECTION_BLOCKLISTS, (f"{len(addresses)} public address(es), {len(zones)} "
                                             f"zone(s)",))]
    pairs = [(address, zone) for address in addresses for zone in zones]
    gate = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)

    async def bounded(address: str, zone: str) -> Listing | str | None:
        async with gate:
            return await _lookup(ctx, address, zone)

    results = await asyncio.gather(*(bounded(a, z) for a, z in pairs))
    return _report(ctx, addresses, zones, pairs, results)


def _report(ctx: Context, addresses: dict[str, list[str]], zones: list[str],
            pairs: list[tuple[str, str]], results: list[Listing | str | None]) -> list[Finding]:
    findings: list[Finding] = []
    clean: dict[str, list[str]] = {address: [] for address in addresses}
    refused: dict[str, list[Listing]] = {}
    unchecked: dict[str, list[tuple[str, str]]] = {}
    for (address, zone), result in zip(pairs, results):
        if result is None:
            clean[address].append(zone)
        elif isinstance(result, str):
            unchecked.setdefault(zone, []).append((address, result))
        elif _is_refusal(result):
            refused.setdefault(zone, []).append(result)
        else:
            findings.append(_classify(ctx, result, addresses[address]))
    findings += [_refused_finding(ctx, zone, listings) for zone, listings in refused.items()]
    findings += [_unchecked_finding(ctx, zone, problems) for zone, problems in unchecked.items()]
    for address, ok_zones in clean.items():
        if len(ok_zones) == len(zones):
            findings.append(Finding("dnsbl.clean", Level.OK,
                                    f"{address} is on none of the {len(zones)} block lists",
                                    SECTION_BLOCKLISTS, (f"not listed in {', '.join(ok_zones)}",),
                                    where=_where_public(ctx, address)))
        elif ok_zones:
            findings.append(Finding("dnsbl.clean", Level.OK,
                                    f"{address} is not listed in {', '.join(ok_zones)}",
                                    SECTION_BLOCKLISTS, where=_where_public(ctx, address)))
    return findings


CHECKS = [("dnsbl", check_blocklists)]
