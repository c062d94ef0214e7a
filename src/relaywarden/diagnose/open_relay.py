"""Doctor check 1, KB 895853's first section: is this server an open relay?

Owns two checks:

* ``open-relay.config`` - the configuration audit: the open-relay forms of ``policy.audit``
  (``all-except`` relay lists, 0.0.0.0/0 or ::/0 entries, very broad entries), a relay list that
  contains the proxy or NAT in front of a listener while ``proxy_protocol`` is off (every client
  coming through it would relay), and authenticated relay on a listener that takes AUTH before
  TLS.  Each finding names the key with its file:line and the change to make.
* ``open-relay.live`` - the relay battery (``relay_test.run_battery``, some 50 unauthenticated
  tricks, never DATA) against every listener of the running server; a FAIL lists every attempt
  that relayed.  A listener behind a PROXY-protocol proxy that trusts loopback is tested through
  a PROXY header that makes the battery a stranger from TEST-NET-1; a listener whose relay list
  lets loopback relay cannot be tested from here and is reported as skipped, with the
  ``relay-test`` command to run from outside.
"""

from __future__ import annotations

import asyncio
import ipaddress

from ..config.schema import Listener, Mode, TlsMode
from ..policy import audit
from ..policy.relay import access_list_match
from ..protocol.proxy import build_v1
from .model import SECTION_OPEN_RELAY, Context, Finding, Level
from .relay_attempts import ACCEPTED, DEFERRED, REFUSED
from .relay_test import AttemptOutcome, run_battery

# The battery's client address when it goes through a PROXY header: TEST-NET-1, a stranger.
STRANGER = "192.0.2.1"


# --- configuration audit ---------------------------------------------------------------------


async def check_config(ctx: Context) -> list[Finding]:
    loaded = ctx.loaded
    findings: list[Finding] = []
    for index, listener in enumerate(ctx.config.listener):
        for f in audit._relay_list_findings(loaded, index, listener):
            findings.append(_from_audit(f))
        findings += _proxy_in_relay_list(ctx, index, listener)
        for f in audit._authentication_findings(loaded, index, listener):
            findings.append(_from_audit(f))
    if not any(f.level in (Level.FAIL, Level.WARN) for f in findings):
        findings.append(Finding(
            "open-relay.config", Level.OK,
            "no listener lets unauthenticated strangers relay by configuration", SECTION_OPEN_RELAY,
            tuple(_relay_summary(l) for l in ctx.config.listener)))
    return findings


def _from_audit(f: audit.Finding) -> Finding:
    level = Level.FAIL if f.level == audit.FAIL else Level.WARN
    return Finding("open-relay.config", level, f.message, SECTION_OPEN_RELAY, (), f.fix, f.where)


def _relay_summary(listener: Listener) -> str:
    relay = listener.relay
    entries = ", ".join(relay.entries) or "no entries"
    auth = "authenticated users relay" if listener.allow_authenticated else "no authenticated relay"
    return f"listener {listener.name}: relay mode {relay.mode.value} ({entries}); {auth}"


def _proxy_in_relay_list(ctx: Context, index: int, listener: Listener) -> list[Finding]:
    """A relay entry covering the proxy/NAT in front of the listener while PROXY protocol is off."""
    if listener.proxy_protocol or listener.relay.mode is not Mode.ONLY:
        return []
    where = lambda *path: ctx.loaded.source.where("listener", index, *path)  # noqa: E731
    fronts = [("proxy", ipaddress.ip_network(p, strict=False)) for p in listener.proxy_from]
    fronts += [("public address", ipaddress.ip_network(a)) for a in listener.public_addresses]
    findings = []
    for entry_index, entry in enumerate(listener.relay.entries):
        if not audit._is_network_entry(entry):
            continue
        net = ipaddress.ip_network(entry, strict=False)
        for kind, front in fronts:
            if front.version != net.version or not front.overlaps(net):
                continue
            # Through a proxy without PROXY protocol, every client has the proxy's address: the
            # listener relays for the whole Internet.  A public (NAT) address is only seen as the
            # source when the NAT rewrites sources too (hairpin or masquerading): a risk.
            level = Level.FAIL if kind == "proxy" else Level.WARN
            findings.append(Finding(
                "open-relay.config", level,
                f"listener {listener.name} relay entry {entry} contains {front.with_prefixlen}, the "
                f"{kind} in front of the listener, and proxy_protocol is off: every client that "
                "comes through it appears with that address and may relay to any domain",
                SECTION_OPEN_RELAY,
                (f"relay.entries[{entry_index}] = {entry} ({where('relay', 'entries', entry_index)})",
                 f"{'proxy_from' if kind == 'proxy' else 'public_addresses'} includes {front.with_prefixlen}",
                 f"proxy_protocol = false ({where('proxy_protocol')})"),
                f"set proxy_protocol = true on listener {listener.name} ({where('proxy_protocol')}) so "
                f"that it sees the real client addresses, or remove {entry} from relay.entries "
                f"({where('relay', 'entries', entry_index)})",
                where("relay", "entries", entry_index)))
            break
    return findings


# --- live battery ----------------------------------------------------------------------------


async def check_live(ctx: Context) -> list[Finding]:
    if not ctx.live:
        return [Finding("open-relay.live", Level.SKIP, "live relay battery not run (--offline)",
                        SECTION_OPEN_RELAY, (), None)]
    results = await asyncio.gather(*(_battery_for(ctx, i, l) for i, l in enumerate(ctx.config.listener)))
    return [f for group in results for f in group]


def _connect_address(listener: Listener) -> str:
    if listener.address == "0.0.0.0":
        return "127.0.0.1"
    if listener.address == "::":
        return "::1"
    return listener.address


def _local_domain(ctx: Context, listener: Listener) -> str:
    if listener.accept_domains:
        return listener.accept_domains[0]
    if ctx.config.domain:
        return ctx.config.domain[0].name
    return ctx.config.server.hostname


def _in(networks: list[str], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(n, strict=False) for n in networks)


async def _battery_for(ctx: Context, index: int, listener: Listener) -> list[Finding]:
    host, port = _connect_address(listener), listener.port
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = listener.name
    where = ctx.loaded.source.where("listener", index)
    proxy_header = None
    client = host
    if listener.proxy_protocol and _in(listener.proxy_from, host):
        stranger = STRANGER if ipaddress.ip_address(host).version == 4 else "2001:db8::1"
        proxy_header = build_v1((stranger, 40000), (host, port))
        client = stranger
    # The battery must come from an address the relay list says nothing about: one it trusts
    # (mode only) would relay legitimately, one it singles out (all-except) would hide the open
    # relay that every other client sees.
    match = access_list_match(listener.relay, client, None)
    if match is not None:
        why = (f"relay entry {match[1]} lets {client} relay" if listener.relay.mode is Mode.ONLY
               else f"relay entry {match[1]} excludes {client}, unlike other clients")
        return [Finding(
            "open-relay.live", Level.SKIP,
            f"listener {name}: the battery cannot test an unauthorised client from here ({why})",
            SECTION_OPEN_RELAY,
            (f"the battery would connect from {client}, which the relay list names",),
            f"run from a host outside the relay list: relaywarden relay-test <public address>:{port} "
            f"--local-domain {_local_domain(ctx, listener)}", where)]
    results = await run_battery(host, port, local_domain=_local_domain(ctx, listener), timeout=ctx.timeout,
                                implicit_tls=listener.tls is TlsMode.IMPLICIT, proxy_header=proxy_header)
    return [_battery_finding(name, target, where, results, listener, ctx, index)]


def _attempt_line(r: AttemptOutcome) -> str:
    reply = r.rcpt_reply or r.mail_reply
    return f"{r.name}: MAIL FROM:{r.mail_from} RCPT TO:{r.rcpt_to} -> {reply}"


def _battery_finding(name: str, target: str, where: str, results: list[AttemptOutcome],
                     listener: Listener, ctx: Context, index: int) -> Finding:
    relayed = [r for r in results if r.outcome == ACCEPTED]
    deferred = [r for r in results if r.outcome == DEFERRED]
    errors = [r for r in results if r.outcome not in (ACCEPTED, DEFERRED, REFUSED)]
    refused = len(results) - len(relayed) - len(deferred) - len(errors)
    if relayed:
        relay_where = ctx.loaded.source.where("listener", index, "relay")
        return Finding(
            "open-relay.live", Level.FAIL,
            f"listener {name} ({target}) is an open relay: {len(relayed)} of {len(results)} "
            "unauthenticated relay attempts were accepted", SECTION_OPEN_RELAY,
            tuple(_attempt_line(r) for r in relayed),
            f"close listener {name}'s relay list ({relay_where}): mode = \"only\" with just your own "
            "devices, then restart and rerun `relaywarden doctor --check open-relay`; if every "
            "attempt above uses a routing trick, report it as a bug in relaywarden's address parser",
            where)
    if errors and len(errors) == len(results):
        return Finding(
            "open-relay.live", Level.SKIP,
            f"listener {name} ({target}): the battery could not run (is the server running?)",
            SECTION_OPEN_RELAY, (_attempt_line(errors[0]),),
            f"start the server (relaywarden serve) and rerun, or check listener {name}'s address "
            "and port", where)
    if deferred or errors:
        return Finding(
            "open-relay.live", Level.WARN,
            f"listener {name} ({target}): no attempt relayed, but {len(deferred)} were deferred "
            f"with 4xx and {len(errors)} failed to run", SECTION_OPEN_RELAY,
            tuple(_attempt_line(r) for r in deferred + errors),
            "a relay tester counts a 4xx as a maybe: look at the replies above; rerun with "
            "`relaywarden doctor --check open-relay.live`", where)
    return Finding(
        "open-relay.live", Level.OK,
        f"listener {name} ({target}) refused all {refused} unauthenticated relay attempts",
        SECTION_OPEN_RELAY, (), None, where)


CHECKS = [
    ("open-relay.config", check_config),
    ("open-relay.live", check_live),
]
