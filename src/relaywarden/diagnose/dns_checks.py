"""The doctor's DNS checks (KB 895853 scenario 3: the MX record points at the wrong server).

This module owns two questions about what DNS publishes for this server:

* ``dns.mx``: for each accepted domain, its MX hosts and their addresses (resolved the way
  delivery resolves them, ``delivery.mx.next_hops``) against the listeners' ``public_addresses``:
  every address must belong to a listener that takes that domain from anonymous clients
  (``anonymous = true``, ``accept_domains`` unset or listing the domain).  An MX at a listener
  that refuses anonymous mail or the domain is a failure (the Internet's mail is refused with 530
  or 1701); an MX at no listener of ours is a failure (or a warning when other MX hosts are ours:
  then connections go "randomly" to the wrong server, as the KB says); no MX at all is a warning.
* ``dns.rdns``: for each public address, its PTR exists, resolves forward to the same address
  (forward-confirmed reverse DNS, ``dns.confirmed_name``) and is the name the server says in
  EHLO (``delivery.helo_name`` or ``server.hostname``), which receivers compare.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

import dns.exception
import dns.resolver
import dns.reversename

from ..config.schema import Domain, Listener
from ..delivery.mx import Hop, NextHopError, ascii_domain, host_addresses, next_hops
from ..dns import confirmed_name
from .model import SCENARIO, SECTION_DNS, Context, Finding, Level

__all__ = ["CHECKS", "MxReport", "check_mx", "check_reverse_dns", "helo_name"]

MAX_PTR_NAMES = 5


@dataclass
class MxReport:
    """Where the MX addresses of one domain lead: served by a listener, refused by ours, foreign."""

    domain: str
    hops: list[Hop]
    implicit: bool = False
    served: list[tuple[Hop, str, str]] = field(default_factory=list)          # hop, address, listener
    refused: list[tuple[Hop, str, list[int]]] = field(default_factory=list)   # hop, address, listeners
    foreign: list[tuple[Hop, str]] = field(default_factory=list)              # hop, address

    def evidence(self, ctx: Context) -> tuple[str, ...]:
        lines: list[str] = []
        label = "implicit MX (no MX record; the domain's own address)" if self.implicit else "MX"
        for hop, address, name in self.served:
            lines.append(f"{label} {hop.preference} {hop.host} -> {address}: listener {name} takes "
                         f"{self.domain} from anonymous clients")
        for hop, address, indexes in self.refused:
            for i in indexes:
                lines.append(f"{label} {hop.preference} {hop.host} -> {address}: listener "
                             f"{ctx.config.listener[i].name} {_refusal(ctx.config.listener[i], self.domain)}")
        for hop, address in self.foreign:
            lines.append(f"{label} {hop.preference} {hop.host} -> {address}: not a public address "
                         "of any listener")
        return tuple(lines)


def _takes_anonymous(listener: Listener, domain: str) -> bool:
    return listener.anonymous and (listener.accept_domains is None or domain in listener.accept_domains)


def _refusal(listener: Listener, domain: str) -> str:
    if not listener.anonymous:
        return "has anonymous = false: the Internet's mail is refused with 530 5.7.0"
    return f"does not list {domain} in accept_domains: mail for it is refused (event 1701)"


def _listeners_at(ctx: Context, address: str) -> list[int]:
    ip = ipaddress.ip_address(address)
    return [i for i, listener in enumerate(ctx.config.listener)
            if any(ipaddress.ip_address(p) == ip for p in listener.public_addresses)]


def _all_public(ctx: Context) -> list[str]:
    seen: list[str] = []
    for listener in ctx.config.listener:
        seen += [a for a in listener.public_addresses if a not in seen]
    return seen


def helo_name(ctx: Context) -> tuple[str, str]:
    """The name the server gives in EHLO to other servers, and the file:line that sets it."""
    if ctx.config.delivery.helo_name:
        return ctx.config.delivery.helo_name.rstrip(".").lower(), ctx.loaded.source.where("delivery", "helo_name")
    return ctx.config.server.hostname.rstrip(".").lower(), ctx.loaded.source.where("server", "hostname")


# --- MX -> addresses -> listener ----------------------------------------------------------------

async def _is_implicit(ctx: Context, domain: str, hops: list[Hop]) -> bool:
    """True when ``hops`` is the implicit MX (no MX record, the domain's own A/AAAA)."""
    if len(hops) != 1 or hops[0].host != ascii_domain(domain) or hops[0].preference != 0:
        return False
    try:                            # "MX 0 domain." gives the same hop; tell them apart
        await ctx.resolver.resolve(ascii_domain(domain), "MX", search=False)
    except dns.resolver.NoAnswer:
        return True
    except dns.exception.DNSException:
        return False
    return False


async def mx_report(ctx: Context, domain: str) -> MxReport:
    """Resolve ``domain`` as delivery would and sort its addresses by the listener they reach."""
    hops = await next_hops(ctx.resolver, domain, rng=random.Random(0))
    report = MxReport(domain, hops, implicit=await _is_implicit(ctx, domain, hops))
    for hop in hops:
        for address in hop.addresses:
            indexes = _listeners_at(ctx, address)
            good = [i for i in indexes if _takes_anonymous(ctx.config.listener[i], domain)]
            if good:
                report.served.append((hop, address, ctx.config.listener[good[0]].name))
            elif indexes:
                report.refused.append((hop, address, indexes))
            else:
                report.foreign.append((hop, address))
    return report


def _mx_record_fix(ctx: Context, domain: str, report: MxReport | None = None) -> str:
    """The DNS records that would send the Internet's mail for ``domain`` to a listener taking it:
    the listener the MX already reaches, else the first that takes the domain anonymously."""
    host, _ = helo_name(ctx)
    candidates = [listener for listener in ctx.config.listener
                  if _takes_anonymous(listener, domain) and listener.public_addresses]
    if not candidates:
        return (f"no listener takes {domain} from anonymous clients at a public address: set "
                f"public_addresses on the listener the Internet reaches and make it take "
                f"{domain} (anonymous = true, accept_domains unset or listing {domain})")
    reached = {name for _, _, name in report.served} if report else set()
    target = next((l for l in candidates if l.name in reached), candidates[0])
    records = [f"{domain}. IN MX 10 {host}."]
    for address in target.public_addresses:
        kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
        records.append(f"{host}. IN {kind} {address}")
    tail = ", and remove the MX records that point elsewhere" if report and report.foreign else ""
    return (f"publish in the zone of {domain}: {'; '.join(records)} (the public addresses of "
            f"listener {target.name}){tail}")


def _wrong_listener_findings(ctx: Context, domain: Domain, report: MxReport) -> list[Finding]:
    findings: list[Finding] = []
    by_listener: dict[int, list[str]] = {}
    for hop, address, indexes in report.refused:
        for i in indexes:
            by_listener.setdefault(i, []).append(f"{hop.host} ({address})")
    for i, hosts in by_listener.items():
        listener = ctx.config.listener[i]
        key = "anonymous" if not listener.anonymous else "accept_domains"
        where = ctx.loaded.source.where("listener", i, key)
        change = ("set anonymous = true" if key == "anonymous"
                  else f'add "{domain.name}" to accept_domains')
        fix = (f"either point the MX of {domain.name} at a listener that takes it "
               f"({_mx_record_fix(ctx, domain.name, report)}), or, if listener {listener.name} is the one "
               f"the Internet should deliver to, {change} on it ({where})")
        findings.append(Finding("dns.mx.wrong-listener", Level.FAIL,
                                f"the MX of {domain.name} reaches listener {listener.name}, which "
                                f"refuses the Internet's mail for it", SCENARIO[3],
                                (*report.evidence(ctx), f"MX hosts affected: {', '.join(hosts)}"),
                                fix, where))
    return findings


def _domain_findings(ctx: Context, domain: Domain, report: MxReport) -> list[Finding]:
    where = ctx.loaded.source.where("domain", ctx.config.domain.index(domain))
    evidence = report.evidence(ctx)
    findings = _wrong_listener_findings(ctx, domain, report)
    if report.foreign and not report.served and not report.refused:
        findings.append(Finding("dns.mx.elsewhere", Level.FAIL,
                                f"the MX of {domain.name} points at no listener of this server",
                                SCENARIO[3], evidence, _mx_record_fix(ctx, domain.name, report), where))
    elif report.foreign:
        hosts = sorted({f"{hop.host} ({address})" for hop, address in report.foreign})
        findings.append(Finding("dns.mx.partly-elsewhere", Level.WARN,
                                f"some MX addresses of {domain.name} are not this server: part of "
                                f"its mail goes to another server", SCENARIO[3], evidence,
                                f"if {', '.join(hosts)} is not a backup MX you run on purpose, "
                                f"{_mx_record_fix(ctx, domain.name, report)}; if it is this server behind "
                                "another address, add that address to public_addresses of the "
                                "listener it reaches", where))
    if report.implicit:
        host, _ = helo_name(ctx)
        findings.append(Finding("dns.mx.implicit", Level.WARN,
                                f"{domain.name} has no MX record: senders fall back to its own "
                                "address (implicit MX, RFC 5321 5.1)", SCENARIO[3], evidence,
                                f"publish {domain.name}. IN MX 10 {host}. in the zone of "
                                f"{domain.name}", where))
    if not findings:
        findings.append(Finding("dns.mx", Level.OK,
                                f"every MX address of {domain.name} reaches a listener that takes "
                                "it from anonymous clients", SCENARIO[3], evidence, where=where))
    return findings


def _lookup_failed(ctx: Context, domain: Domain, exc: NextHopError) -> Finding:
    where = ctx.loaded.source.where("domain", ctx.config.domain.index(domain))
    evidence = (f"{exc.reply}", exc.detail)
    if not exc.permanent:
        return Finding("dns.mx.lookup", Level.WARN, f"the MX of {domain.name} could not be looked up",
                       SCENARIO[3], evidence, "check that the [dns] nameservers answer "
                       f"({ctx.loaded.source.where('dns')}) and that the zone of {domain.name} is "
                       "served, then run `relaywarden doctor --check dns.mx` again", where)
    return Finding("dns.mx.missing", Level.FAIL, f"the Internet cannot deliver mail for {domain.name}",
                   SCENARIO[3], evidence, _mx_record_fix(ctx, domain.name), where)


async def check_mx(ctx: Context) -> list[Finding]:
    """Each accepted domain's MX -> addresses -> a listener that takes the domain anonymously."""
    if not ctx.config.domain:
        return [Finding("dns.mx", Level.SKIP, "no [[domain]] is configured: no MX to check", SCENARIO[3])]
    if not _all_public(ctx):
        return [Finding("dns.mx", Level.SKIP, "no listener has public_addresses: the MX records "
                        "cannot be compared with this server", SCENARIO[3], (),
                        'set public_addresses = ["<the address the Internet sees>"] on the '
                        f"listener the Internet reaches ({ctx.loaded.source.where('listener', 0)})",
                        ctx.loaded.source.where("listener", 0))]
    if not ctx.live:
        return [Finding("dns.mx", Level.SKIP, "MX records not looked up (--offline)", SCENARIO[3])]
    findings: list[Finding] = []
    for domain in ctx.config.domain:
        try:
            report = await mx_report(ctx, domain.name)
        except NextHopError as exc:
            findings.append(_lookup_failed(ctx, domain, exc))
            continue
        findings += _domain_findings(ctx, domain, report)
    return findings


# --- reverse DNS of the public addresses -------------------------------------------------------

async def _ptr_names(ctx: Context, address: str) -> list[str] | str | None:
    """The PTR names of ``address``; None when it has none; a sentence when the look-up failed."""
    name = dns.reversename.from_address(address)
    try:
        answer = await ctx.resolver.resolve(name, "PTR", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout:
        return f"the PTR look-up of {name.to_text(omit_final_dot=True)} timed out"
    except dns.exception.DNSException as exc:
        return f"the PTR look-up of {name.to_text(omit_final_dot=True)} failed: {exc or type(exc).__name__}"
    return [r.target.to_text(omit_final_dot=True).lower() for r in list(answer)[:MAX_PTR_NAMES]]


def _ptr_record_fix(address: str, host: str) -> str:
    pointer = dns.reversename.from_address(address).to_text()
    kind = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
    return (f"ask whoever holds the reverse zone of {address} (your ISP or hosting provider) to "
            f"publish {pointer} IN PTR {host}. and publish {host}. IN {kind} {address} in the zone "
            f"of {host}")


async def _forward_evidence(ctx: Context, names: list[str]) -> list[str]:
    lines = []
    for name in names:
        found = await host_addresses(ctx.resolver, name)
        lines.append(f"{name} -> {', '.join(found.addresses)}" if found.addresses
                     else f"{name} -> {found.detail}")
    return lines


async def _address_finding(ctx: Context, address: str, where: str) -> Finding:
    host, host_where = helo_name(ctx)
    names = await _ptr_names(ctx, address)
    if isinstance(names, str):
        return Finding("dns.rdns.lookup", Level.WARN, f"the reverse DNS of {address} could not be looked up",
                       SECTION_DNS, (names,), "check that the [dns] nameservers answer "
                       f"({ctx.loaded.source.where('dns')}), then run `relaywarden doctor --check "
                       "dns.rdns` again", where)
    if not names:
        return Finding("dns.rdns.missing", Level.FAIL, f"{address} has no reverse DNS (PTR) record",
                       SECTION_DNS, (f"{dns.reversename.from_address(address).to_text()} has no PTR "
                                     "record; many receivers refuse mail from such an address",),
                       _ptr_record_fix(address, host), where)
    confirmed = await confirmed_name(ctx.resolver, address)
    evidence = (f"PTR of {address}: {', '.join(names)}", *await _forward_evidence(ctx, names),
                f"EHLO name: {host} ({host_where})")
    if confirmed is None:
        return Finding("dns.rdns.unconfirmed", Level.FAIL,
                       f"the reverse DNS name of {address} does not resolve back to it",
                       SECTION_DNS, evidence, _ptr_record_fix(address, host), where)
    if confirmed != host and not (host in names and await _resolves_to(ctx, host, address)):
        key = "helo_name" if ctx.config.delivery.helo_name else "hostname"
        return Finding("dns.rdns.helo-mismatch", Level.WARN,
                       f"the reverse DNS name of {address} ({confirmed}) is not the EHLO name {host}",
                       SECTION_DNS, evidence,
                       f'set {key} = "{confirmed}" ({host_where}), or '
                       f"{_ptr_record_fix(address, host)}", host_where)
    return Finding("dns.rdns", Level.OK, f"{address} has reverse DNS {host}, which resolves back to it",
                   SECTION_DNS, evidence, where=where)


async def _resolves_to(ctx: Context, name: str, address: str) -> bool:
    """True when ``name`` resolves forward to ``address``."""
    found = await host_addresses(ctx.resolver, name)
    ip = ipaddress.ip_address(address)
    return any(ipaddress.ip_address(a) == ip for a in found.addresses)


async def check_reverse_dns(ctx: Context) -> list[Finding]:
    """Each public address: PTR present, forward-confirmed, and equal to the EHLO name."""
    addresses = _all_public(ctx)
    if not addresses:
        return [Finding("dns.rdns", Level.SKIP, "no listener has public_addresses: no reverse DNS "
                        "to check", SECTION_DNS, (), 'set public_addresses = ["<the address the '
                        f"Internet sees>\"] on the listener the Internet reaches "
                        f"({ctx.loaded.source.where('listener', 0)})",
                        ctx.loaded.source.where("listener", 0))]
    if not ctx.live:
        return [Finding("dns.rdns", Level.SKIP, "reverse DNS not looked up (--offline)", SECTION_DNS)]
    findings = []
    for address in addresses:
        index = _listeners_at(ctx, address)[0]
        position = ctx.config.listener[index].public_addresses.index(address)
        where = ctx.loaded.source.where("listener", index, "public_addresses", position)
        findings.append(await _address_finding(ctx, address, where))
    return findings


CHECKS = [("dns.mx", check_mx), ("dns.rdns", check_reverse_dns)]
