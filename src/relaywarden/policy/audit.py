"""The open-relay audit: configuration findings that make or risk an open relay, and the start check.

This module owns the question "can an unauthenticated stranger relay through this configuration,
or is it one mistake away from that?".  ``open_relay_findings`` returns every finding (``fail``:
the configuration is an open relay; ``warn``: a risk or a KB 895853 scenario waiting to happen),
each with the listener, the file:line that causes it and the fix.  ``check_startable`` returns
the fails, which stop ``serve`` and ``check-config`` unless ``server.allow_open_relay = true``.
``doctor`` shows the same findings.  Pure: reads only the loaded configuration.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..config.loader import LoadedConfig
from ..config.schema import DomainKind, Listener, Mode
from .relay import route_for

__all__ = ["Finding", "check_startable", "open_relay_findings"]

FAIL = "fail"
WARN = "warn"

# Prefixes shorter than these cover so much of the Internet that the list is nearly open.
_BROAD_IPV4 = 8
_BROAD_IPV6 = 16
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_IPV6_GLOBAL = ipaddress.ip_network("2000::/3")     # every global unicast address (RFC 4291 2.4)


@dataclass(frozen=True)
class Finding:
    """One audit result: ``level`` is "fail" or "warn"; ``where`` is "file:line"."""

    level: str
    listener: str
    message: str
    where: str
    fix: str


def check_startable(loaded: LoadedConfig) -> list[Finding]:
    """The open-relay fails: ``serve`` and ``check-config`` refuse the configuration when this is
    not empty, unless ``server.allow_open_relay = true``; then the server starts and logs each
    one as event OPEN_RELAY_ALLOWED at every start."""
    return [f for f in open_relay_findings(loaded) if f.level == FAIL]


def open_relay_findings(loaded: LoadedConfig) -> list[Finding]:
    """Every open-relay finding of the configuration, fails and warnings, in file order."""
    findings: list[Finding] = []
    for index, listener in enumerate(loaded.config.listener):
        findings += _relay_list_findings(loaded, index, listener)
        findings += _proxy_findings(loaded, index, listener)
        findings += _authentication_findings(loaded, index, listener)
    findings += _unreachable_domain_findings(loaded)
    findings += _mailbox_domain_findings(loaded)
    findings += _route_findings(loaded)
    return findings


# ---------------------------------------------------------------------------------------------


def _relay_list_findings(loaded: LoadedConfig, index: int, listener: Listener) -> list[Finding]:
    where = _at(loaded, index)
    name = listener.name
    relay = listener.relay
    if relay.mode is Mode.ALL_EXCEPT:
        excluded = (f"except {len(relay.entries)} entr{'y' if len(relay.entries) == 1 else 'ies'}"
                    if relay.entries else "with no exceptions at all")
        return [Finding(
            FAIL, name,
            f'listener {name} is an open relay: relay mode "all-except" lets every client on the '
            f"Internet relay to any domain without authenticating ({excluded})",
            where("relay", "mode"),
            f'set mode = "only" on listener {name} relay and list in entries just the addresses '
            "of your own applications and devices; users should authenticate instead",
        )]
    findings = []
    for entry_index, entry in enumerate(relay.entries):
        problem = _breadth(entry)
        if problem is None:
            continue
        level, text = problem
        findings.append(Finding(
            level, name,
            f"listener {name} relay entry {entry} {text}",
            where("relay", "entries", entry_index),
            f"replace {entry} in listener {name} relay.entries with the addresses or small "
            "networks of the machines that must relay",
        ))
    if not any(f.level == FAIL for f in findings):
        findings += _union_findings(name, relay.entries, where("relay", "entries"),
                                    broad_entry=bool(findings))
    return findings


def _union_findings(name: str, entries: list[str], where: str, broad_entry: bool) -> list[Finding]:
    """What the relay entries cover together: two /1 entries, or 256 /8 entries, each narrow
    enough on its own, open the listener to every IPv4 client as surely as 0.0.0.0/0."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for entry in entries:
        if not _is_network_entry(entry):
            continue
        net = ipaddress.ip_network(entry, strict=False)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        elif net.subnet_of(_IPV4_MAPPED):        # a mapped client is matched as IPv4
            v4.append(ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)))
        else:
            v6.append(net)
    covered4 = sum(n.num_addresses for n in ipaddress.collapse_addresses(v4))
    covered6 = sum(_IPV6_GLOBAL.num_addresses if n.supernet_of(_IPV6_GLOBAL) else n.num_addresses
                   for n in ipaddress.collapse_addresses(v6) if n.overlaps(_IPV6_GLOBAL))
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    fix = (f"list in listener {name} relay.entries only the addresses or small networks of the "
           "machines that must relay; users should authenticate instead")
    findings = []
    if covered4 * 2 >= 2 ** 32:
        findings.append(Finding(
            FAIL, name, f"listener {name} is an open relay: its relay entries together ({count}) "
            f"cover {_share(covered4, 2 ** 32)} of all IPv4 addresses", where, fix))
    elif covered4 >= 2 ** (33 - _BROAD_IPV4) and not broad_entry:      # as much as one broad entry
        findings.append(Finding(
            WARN, name, f"listener {name} relay entries together ({count}) cover {covered4:,} IPv4 "
            f"addresses ({_share(covered4, 2 ** 32)} of all), as many as an IPv4 /{_BROAD_IPV4 - 1}",
            where, fix))
    if covered6 * 2 >= _IPV6_GLOBAL.num_addresses:
        findings.append(Finding(
            FAIL, name, f"listener {name} is an open relay: its relay entries together ({count}) "
            f"cover {_share(covered6, _IPV6_GLOBAL.num_addresses)} of the IPv6 Internet "
            f"({_IPV6_GLOBAL}, every global unicast address)", where, fix))
    elif covered6 >= 2 ** (129 - _BROAD_IPV6) and not broad_entry:
        findings.append(Finding(
            WARN, name, f"listener {name} relay entries together ({count}) cover as many IPv6 "
            f"addresses as an IPv6 /{_BROAD_IPV6 - 1}", where, fix))
    return findings


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %"


def _breadth(entry: str) -> tuple[str, str] | None:
    """Whether a relay entry is open to everyone (fail) or very broad (warn)."""
    if not _is_network_entry(entry):
        if "." not in entry:
            return (WARN, "is a whole top-level domain: any client whose reverse DNS ends in "
                          f".{entry} may relay, and anyone can get such a name")
        return None
    net = ipaddress.ip_network(entry, strict=False)
    if net.prefixlen == 0:
        return (FAIL, "matches every address: the listener relays for the whole Internet")
    if net.version == 6:
        if net.supernet_of(_IPV4_MAPPED):
            return (FAIL, "contains every IPv4-mapped address (::ffff:0:0/96): the listener "
                          "relays for the whole IPv4 Internet")
        if net.subnet_of(_IPV4_MAPPED):
            v4_prefix = net.prefixlen - 96
            if v4_prefix < _BROAD_IPV4:
                return (WARN, f"covers an IPv4 /{v4_prefix}, a large part of the Internet")
            return None
        if net.prefixlen < _BROAD_IPV6:
            return (WARN, f"is an IPv6 /{net.prefixlen}, a large part of the Internet")
        return None
    if net.prefixlen < _BROAD_IPV4:
        return (WARN, f"is an IPv4 /{net.prefixlen}, a large part of the Internet")
    return None


def _proxy_findings(loaded: LoadedConfig, index: int, listener: Listener) -> list[Finding]:
    if listener.proxy_protocol or listener.relay.mode is not Mode.ONLY:
        return []
    where = _at(loaded, index)
    fronts = [ipaddress.ip_network(p, strict=False) for p in listener.proxy_from]
    fronts += [ipaddress.ip_network(a) for a in listener.public_addresses]
    findings = []
    for entry_index, entry in enumerate(listener.relay.entries):
        if not _is_network_entry(entry):
            continue
        net = ipaddress.ip_network(entry, strict=False)
        hit = next((f for f in fronts if f.version == net.version and f.overlaps(net)), None)
        if hit is None:
            continue
        findings.append(Finding(
            WARN, listener.name,
            f"listener {listener.name} relay entry {entry} contains {hit.with_prefixlen}, the "
            "proxy or NAT in front of the listener, and proxy_protocol is off: every client "
            "that comes through it appears with that address and may relay",
            where("relay", "entries", entry_index),
            f"set proxy_protocol = true on listener {listener.name} ({where('proxy_protocol')}) "
            f"so that it sees the real client addresses, or remove {entry} from relay.entries",
        ))
    return findings


def _authentication_findings(loaded: LoadedConfig, index: int,
                             listener: Listener) -> list[Finding]:
    if not listener.allow_authenticated:
        return []
    where = _at(loaded, index)
    name = listener.name
    findings = []
    if listener.auth_plaintext:
        findings.append(Finding(
            WARN, name,
            f"listener {name} lets authenticated users relay and accepts AUTH before TLS: "
            "passwords that unlock relaying cross the network in clear, ready to be stolen",
            where("auth_plaintext"),
            f"set auth_plaintext = false on listener {name} (clients then authenticate after "
            "STARTTLS)",
        ))
    if not listener.auth:
        findings.append(Finding(
            WARN, name,
            f"listener {name} has allow_authenticated = true but offers no AUTH mechanism, so "
            "no client can authenticate there",
            where("allow_authenticated"),
            f'set auth = ["PLAIN", "LOGIN"] on listener {name}, or remove allow_authenticated',
        ))
    return findings


def _unreachable_domain_findings(loaded: LoadedConfig) -> list[Finding]:
    """Scenario 2: an authoritative domain that no anonymous listener takes mail for."""
    config = loaded.config
    findings = []
    for d_index, domain in enumerate(config.domain):
        if domain.kind is not DomainKind.AUTHORITATIVE:
            continue
        serving = [(i, l) for i, l in enumerate(config.listener)
                   if l.accept_domains is None or domain.name in l.accept_domains]
        if any(l.anonymous for _, l in serving):
            continue
        closed = serving[0] if serving else None
        if closed is None:
            findings.append(Finding(
                WARN, "",
                f"no listener accepts mail for {domain.name}: every listener's accept_domains "
                "leaves it out, so mail from the Internet is refused (event 1701)",
                loaded.source.where("domain", d_index),
                f"add {domain.name} to accept_domains of the listener your MX points at",
            ))
            continue
        index, listener = closed
        findings.append(Finding(
            WARN, listener.name,
            f"{domain.name} is reachable only through listener {listener.name}, which has "
            "anonymous = false: servers on the Internet cannot authenticate, so all mail for "
            f"{domain.name} is refused with 530 5.7.0 (KB 895853 scenario 2)",
            loaded.source.where("listener", index, "anonymous"),
            f"set anonymous = true on listener {listener.name} if it is the one your MX points "
            "at, or add a listener with anonymous = true (and no relay) for the Internet",
        ))
    return findings


def _mailbox_domain_findings(loaded: LoadedConfig) -> list[Finding]:
    """Scenario 4: mailbox addresses in no accepted domain."""
    accepted = {d.name for d in loaded.config.domain}
    findings = []
    for m_index, mailbox in enumerate(loaded.config.mailbox):
        for key, a_index, address in _mailbox_addresses(mailbox):
            domain = address.rpartition("@")[2]
            if domain in accepted:
                continue
            path = ("mailbox", m_index, key) if a_index is None else \
                ("mailbox", m_index, key, a_index)
            findings.append(Finding(
                WARN, "",
                f"mailbox {mailbox.address} has the address {address}, but {domain} is not an "
                "accepted domain: mail to it is refused with 550 5.7.1 (event 1707, KB 895853 "
                "scenario 4)",
                loaded.source.where(*path),
                f'add [[domain]] name = "{domain}" kind = "authoritative", or remove {address} '
                "from the mailbox",
            ))
    return findings


def _mailbox_addresses(mailbox) -> list[tuple[str, int | None, str]]:
    out: list[tuple[str, int | None, str]] = [("address", None, mailbox.address)]
    out += [("aliases", i, alias) for i, alias in enumerate(mailbox.aliases)]
    return out


def _route_findings(loaded: LoadedConfig) -> list[Finding]:
    """Forwarding domains with no route would be refused with 451 at every RCPT."""
    findings = []
    for d_index, domain in enumerate(loaded.config.domain):
        if domain.kind is DomainKind.AUTHORITATIVE or route_for(loaded, domain.name):
            continue
        findings.append(Finding(
            WARN, "",
            f"{domain.name} is an {domain.kind.value} domain but no route leads to it: its "
            "mail cannot be forwarded",
            loaded.source.where("domain", d_index),
            f'set route on [[domain]] {domain.name} or add a [[route]] with domains = ["*"]',
        ))
    return findings


def _is_network_entry(entry: str) -> bool:
    """An IP or CIDR entry (as the schema tells them apart), not a reverse-DNS domain."""
    return ":" in entry or bool(re.fullmatch(r"[0-9./]+", entry))


def _at(loaded: LoadedConfig, index: int):
    return lambda *path: loaded.source.where("listener", index, *path)
