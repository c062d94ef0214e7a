"""Doctor check 6: KB 895853 scenarios 1, 2, 4, 5 and 6, each from the configuration and the
recent event log (``[doctor] window_hours``).

* ``scenarios.1`` - a listener that offers AUTH but has ``allow_authenticated`` off, where
  authenticated users were refused relay (event 1710): fix ``allow_authenticated``.
* ``scenarios.2`` - the listener the Internet delivers to (the one whose ``public_addresses`` the
  MX points at, one on port 25, or one named ``mx``) with ``anonymous`` off; the 530 refusals
  (event 1713) it caused.
* ``scenarios.4`` - mailbox addresses in no accepted domain and the recent refusals of mail to
  them (event 1707): the ``[[domain]]`` to add.
* ``scenarios.5`` - deliveries the destination refused for want of authentication (530, 5.7.0
  with "auth", 5.7.3; 535 / 5.7.8 for rejected credentials) in events 7002/7003/7004, by route:
  the route's ``username`` / ``password_file``.
* ``scenarios.6`` - a listener behind a proxy without PROXY protocol (recent sessions all from one
  ``proxy_from`` or public address; PROXY headers answered "500 unrecognised"), and public
  addresses that recent connections contradict (mail for a domain arriving at a listener that
  does not serve it, event 1701, while another listener is published for it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import dns.exception

from ..config.schema import Listener
from ..delivery.mx import NextHopError, next_hops
from ..events import EventId
from ..policy.relay import route_for
from .accounts import command
from .model import SCENARIO, Context, Finding, Level
from .relay_test import BATTERY_HELO

SAMPLES = 5                 # evidence lines quoted per finding
MIN_SESSIONS_BEHIND_PROXY = 3


# --- shared helpers --------------------------------------------------------------------------


def _since(ctx: Context) -> float:
    return ctx.now - ctx.config.doctor.window_hours * 3600


def _window(ctx: Context) -> str:
    hours = ctx.config.doctor.window_hours
    return f"the last {hours:g} h"


def _recent(ctx: Context, *ids: int) -> list[dict]:
    return list(ctx.events(ids=set(ids), since=_since(ctx)))


def _no_log(ctx: Context) -> bool:
    return not ctx.log_dir.exists()


def _where(ctx: Context, *path: str | int) -> str:
    return ctx.loaded.source.where(*path)


def _domain_of(address: str | None) -> str:
    return (address or "").rpartition("@")[2].lower()


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _sample(events: Iterable[dict], line) -> tuple[str, ...]:
    events = list(events)
    out = [line(e) for e in events[-SAMPLES:]]
    if len(events) > SAMPLES:
        out.insert(0, f"{len(events)} events; the last {SAMPLES}:")
    return tuple(out)


def _refusal_line(e: dict) -> str:
    f = e.get("fields", {})
    who = f"{e.get('user')} from {e.get('client')}" if e.get("user") else str(e.get("client"))
    return f"{e['time']} {e['id']} {who}: <{f.get('recipient', '')}> {f.get('reply', '')}".rstrip()


# --- scenario 1: authenticated users cannot relay ------------------------------------------------


async def scenario_1(ctx: Context) -> list[Finding]:
    listeners = ctx.config.listener
    offering = [(i, l) for i, l in enumerate(listeners) if l.auth and not l.allow_authenticated]
    if not offering:
        relaying = [l.name for l in listeners if l.allow_authenticated]
        text = (f"authenticated users may relay on listener {', '.join(relaying)}" if relaying
                else "no listener offers AUTH, so no user authenticates to relay")
        return [Finding("scenarios.1", Level.OK, text, SCENARIO[1])]
    denied = _recent(ctx, EventId.RELAY_DENIED_AUTHENTICATED)
    others = [l.name for l in listeners if l.allow_authenticated]
    findings = []
    for index, listener in offering:
        where = _where(ctx, "listener", index, "allow_authenticated")
        mine = [e for e in denied if e.get("listener") == listener.name]
        if not mine:
            findings.append(Finding(
                "scenarios.1", Level.OK,
                f"listener {listener.name} offers AUTH without authenticated relay, and no "
                f"authenticated user was refused relay there in {_window(ctx)}", SCENARIO[1],
                (), None, where))
            continue
        users = Counter(str(e.get("user")) for e in mine)
        also = (f"; or have these clients submit through listener {', '.join(others)}, which "
                "allows authenticated relay") if others else ""
        findings.append(Finding(
            "scenarios.1", Level.FAIL,
            f"authenticated users cannot relay through listener {listener.name}: "
            f"{_n(len(mine), 'recipient')} refused with 550 5.7.1 in {_window(ctx)} (event 1710)", SCENARIO[1],
            (f"users refused: {', '.join(f'{u} ({n})' for u, n in users.most_common())}",
             f"listener {listener.name}: auth = {list(listener.auth)}, allow_authenticated = false "
             f"({where})",
             *_sample(mine, _refusal_line)),
            f"set allow_authenticated = true on listener {listener.name} ({where}){also}",
            where))
    return findings


# --- scenario 2: anonymous access off on the Internet's listener ---------------------------------


async def _mx_addresses(ctx: Context) -> tuple[set[str], list[str]]:
    """Every address the accepted domains' MX records lead to, and what could not be looked up."""
    addresses: set[str] = set()
    problems: list[str] = []
    for domain in ctx.config.domain:
        try:
            hops = await asyncio.wait_for(next_hops(ctx.resolver, domain.name, rng=random.Random(0)),
                                          ctx.timeout * 2)
        except (NextHopError, dns.exception.DNSException, asyncio.TimeoutError, OSError) as exc:
            problems.append(f"MX of {domain.name} not looked up: {exc}")
            continue
        for hop in hops:
            addresses.update(str(ipaddress.ip_address(a)) for a in hop.addresses)
    return addresses, problems


async def internet_listeners(ctx: Context) -> tuple[dict[int, str], list[str]]:
    """Listener index -> why it is the one the Internet delivers to; and DNS problems met."""
    found: dict[int, str] = {}
    problems: list[str] = []
    published = any(l.public_addresses for l in ctx.config.listener)
    if ctx.live and published and ctx.config.domain:
        mx, problems = await _mx_addresses(ctx)
        for i, listener in enumerate(ctx.config.listener):
            hit = sorted(mx & set(listener.public_addresses))
            if hit:
                found[i] = f"the MX of the accepted domains points at its public address {', '.join(hit)}"
    for i, listener in enumerate(ctx.config.listener):
        if i in found:
            continue
        if listener.port == 25:
            found[i] = "it listens on port 25, where the Internet delivers mail"
        elif listener.name == "mx":
            found[i] = "it is named mx"
    return found, problems


async def scenario_2(ctx: Context) -> list[Finding]:
    found, problems = await internet_listeners(ctx)
    if not found:
        return [Finding(
            "scenarios.2", Level.SKIP,
            "cannot tell which listener the Internet delivers to: none is on port 25, named mx, "
            "or has public_addresses that an MX record points at", SCENARIO[2], tuple(problems),
            'set public_addresses = ["<the address the Internet sees>"] on the listener your MX '
            f"points at ({_where(ctx, 'listener', 0)})", _where(ctx, "listener", 0))]
    required = _recent(ctx, EventId.AUTHENTICATION_REQUIRED)
    findings = []
    for index, why in found.items():
        listener = ctx.config.listener[index]
        where = _where(ctx, "listener", index, "anonymous")
        if listener.anonymous:
            findings.append(Finding(
                "scenarios.2", Level.OK,
                f"listener {listener.name} takes mail from anonymous clients (the Internet's "
                f"listener: {why})", SCENARIO[2], tuple(problems), None, where))
            continue
        mine = [e for e in required if e.get("listener") == listener.name]
        clients = Counter(str(e.get("client")) for e in mine)
        evidence = [f"listener {listener.name} is the Internet's: {why}",
                    f"anonymous = false ({where})"]
        if mine:
            evidence.append(f"{_n(len(mine), 'session')} refused with 530 5.7.0 in {_window(ctx)} (event "
                            f"1713), from {len(clients)} client address{'es' if len(clients) != 1 else ''}: "
                            + ", ".join(c for c, _ in clients.most_common(SAMPLES)))
        else:
            evidence.append(f"no 530 refusals logged in {_window(ctx)} (is the server running "
                            "with this configuration?)")
        findings.append(Finding(
            "scenarios.2", Level.FAIL,
            f"anonymous access is off on listener {listener.name}, where the Internet delivers: "
            "servers cannot authenticate, so all incoming mail is refused with 530 5.7.0",
            SCENARIO[2], (*evidence, *problems),
            f"set anonymous = true on listener {listener.name} ({where}); keep relaying closed "
            "(no relay entries, and authenticated relay on a submission listener instead)",
            where))
    return findings


# --- scenario 4: mailbox addresses outside every accepted domain ---------------------------------


async def scenario_4(ctx: Context) -> list[Finding]:
    accepted = {d.name for d in ctx.config.domain}
    outside: dict[str, list[tuple[str, str]]] = defaultdict(list)     # domain -> (address, where)
    for m_index, mailbox in enumerate(ctx.config.mailbox):
        if _domain_of(mailbox.address) not in accepted:
            outside[_domain_of(mailbox.address)].append(
                (mailbox.address, _where(ctx, "mailbox", m_index, "address")))
        for a_index, alias in enumerate(mailbox.aliases):
            if _domain_of(alias) not in accepted:
                outside[_domain_of(alias)].append((alias, _where(ctx, "mailbox", m_index, "aliases", a_index)))
    # and the user database's mailboxes (relaywarden user add), and aliases it gives
    configured = {a.casefold() for m in ctx.config.mailbox for a in (m.address, *m.aliases)}
    users_file = f"{ctx.data_dir / 'users.json'}"
    for entry in ctx.directory:
        for address in entry.addresses:
            if address.casefold() not in configured and _domain_of(address) not in accepted:
                outside[_domain_of(address)].append((address, f"{users_file}, user {entry.address}"))
    if not outside:
        return [Finding("scenarios.4", Level.OK,
                        "every mailbox address is in an accepted domain", SCENARIO[4])]
    refused = _recent(ctx, EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED)
    findings = []
    for domain, addresses in sorted(outside.items()):
        mine = [e for e in refused if _domain_of(e.get("fields", {}).get("recipient")) == domain]
        listed = ", ".join(a for a, _ in addresses)
        where = addresses[0][1]
        evidence = [f"{a} ({w})" for a, w in addresses]
        if mine:
            evidence.append(f"{_n(len(mine), 'recipient')} in {domain} refused with 550 5.7.1 in "
                            f"{_window(ctx)} (event 1707)")
            evidence += _sample(mine, _refusal_line)
        level = Level.FAIL if mine else Level.WARN
        title = (f"mail to {listed} is refused: {domain} is not an accepted domain"
                 if mine else f"{listed} cannot receive mail: {domain} is not an accepted domain")
        owner = where.rpartition(", user ")[2]
        remove = (f"remove {listed} from the mailbox ({where})" if not where.startswith(users_file) else
                  "delete the user: " + command(ctx, "user", "delete", owner))
        findings.append(Finding(
            "scenarios.4", level, title, SCENARIO[4], tuple(evidence),
            f'add [[domain]] name = "{domain}" kind = "authoritative" to {ctx.loaded.file} if '
            f"{domain} is yours, or {remove}", where))
    return findings


# --- scenario 5: the destination requires authentication ----------------------------------------

_AUTH_REQUIRED = re.compile(r"^\s*530\b|\b5\.7\.3\b|authentication required|\b5\.7\.0\b.*auth", re.I)
_CREDENTIALS_REJECTED = re.compile(r"^\s*535\b|\b5\.7\.8\b", re.I)


def auth_refusal(reply: str | None) -> str | None:
    """"required" / "rejected" when a remote reply refuses for want of (good) authentication."""
    if not reply:
        return None
    if _CREDENTIALS_REJECTED.search(reply):
        return "rejected"
    if _AUTH_REQUIRED.search(reply):
        return "required"
    return None


async def scenario_5(ctx: Context) -> list[Finding]:
    if _no_log(ctx):
        return [Finding("scenarios.5", Level.SKIP, f"no event log in {ctx.log_dir}: no delivery "
                        "results to look at", SCENARIO[5])]
    events = _recent(ctx, EventId.DEFERRED, EventId.DELIVERY_FAILED, EventId.REMOTE_ERROR)
    by_route: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for e in events:
        f = e.get("fields", {})
        kind = auth_refusal(f.get("reply"))
        route = route_for(ctx.loaded, _domain_of(f.get("recipient"))) if kind else None
        if route is not None:
            by_route[route].append((e, kind))
    if not by_route:
        return [Finding("scenarios.5", Level.OK,
                        f"no delivery was refused for want of authentication in {_window(ctx)}",
                        SCENARIO[5], (f"{len(events)} delivery events looked at (7002, 7003, 7004)",))]
    routes = {r.name: (i, r) for i, r in enumerate(ctx.config.route)}
    findings = []
    for name, hits in sorted(by_route.items()):
        index, route = routes[name]
        where = _where(ctx, "route", index)
        messages = {(e.get("message_id"), e.get("fields", {}).get("recipient")) for e, _ in hits}
        hosts = sorted({str(e.get("fields", {}).get("host")) for e, _ in hits})
        evidence = [f"{_n(len(messages), 'recipient')} refused by {', '.join(hosts)} in {_window(ctx)}",
                    *_sample(_last_per_recipient(e for e, _ in hits), _delivery_line)]
        rejected = any(kind == "rejected" for _, kind in hits)
        if route.username is None:
            evidence.append(f"route {name} has no username / password_file ({where})")
            findings.append(Finding(
                "scenarios.5", Level.FAIL,
                f"the destination of route {name} requires authentication and the route has "
                "no credentials", SCENARIO[5], tuple(evidence),
                f'set username = "<login at {hosts[0]}>" and password_file = "<file holding its '
                f'password>" on [[route]] {name} ({where}); ask the destination\'s administrator '
                "for the account (5.7.3 can also mean the destination does not know the recipient)",
                where))
        elif rejected:
            pw_where = _where(ctx, "route", index, "password_file")
            findings.append(Finding(
                "scenarios.5", Level.FAIL,
                f"the destination of route {name} rejects the route's credentials "
                f"(username {route.username})", SCENARIO[5], tuple(evidence),
                f"put the current password of {route.username} in {route.password_file} "
                f"({pw_where}), or correct username ({_where(ctx, 'route', index, 'username')})",
                pw_where))
        else:
            tls_where = _where(ctx, "route", index, "tls")
            findings.append(Finding(
                "scenarios.5", Level.FAIL,
                f"the destination of route {name} requires authentication although the route "
                "has credentials: it did not offer AUTH", SCENARIO[5], tuple(evidence),
                f'servers offer AUTH only after STARTTLS: set tls = "required" on [[route]] {name} '
                f"({tls_where}) and check that {', '.join(route.hosts) or 'the MX hosts'} is the "
                "right destination", tls_where))
    return findings


def _last_per_recipient(events: Iterable[dict]) -> list[dict]:
    """One event per (message, recipient): the last (7004 and 7003 come in pairs)."""
    last: dict[tuple, dict] = {}
    for e in events:
        last[(e.get("message_id"), e.get("fields", {}).get("recipient"))] = e
    return list(last.values())


def _delivery_line(e: dict) -> str:
    f = e.get("fields", {})
    return (f"{e['time']} {e['id']} {e.get('message_id')} <{f.get('recipient')}> via {f.get('host')} "
            f"{f.get('command') or ''}: {f.get('reply')}")


# --- scenario 6: published address out of date, proxy without PROXY protocol ---------------------


def _in_networks(address: str, networks: Iterable[str]) -> str | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        if ip.version == net.version and ip in net:
            return n
    return None


def _proxy_findings(ctx: Context, index: int, listener: Listener, sessions: list[dict],
                    proxy_lines: list[dict]) -> list[Finding]:
    name = listener.name
    pp_where = _where(ctx, "listener", index, "proxy_protocol")
    findings = []
    senders = Counter(str(e.get("client")) for e in proxy_lines if e.get("listener") == name)
    for sender, count in senders.items():
        trusted = _in_networks(sender, listener.proxy_from)
        if listener.proxy_protocol and trusted:
            continue
        if listener.proxy_protocol:
            fix = (f"add {sender} to proxy_from of listener {name} "
                   f"({_where(ctx, 'listener', index, 'proxy_from')}): the proxy's address changed")
        else:
            fix = (f"set proxy_protocol = true and proxy_from = [\"{sender}\"] on listener {name} "
                   f"({pp_where})")
        findings.append(Finding(
            "scenarios.6.proxy", Level.FAIL,
            f"{sender} sends PROXY protocol headers to listener {name}, which does not take them "
            "from it: the mail behind that proxy is refused", SCENARIO[6],
            (f"{_n(count, 'session')} from {sender} began with a PROXY header answered 500 5.5.1 in "
             f"{_window(ctx)} (event 1105)",
             f"proxy_protocol = {str(listener.proxy_protocol).lower()} ({pp_where}); proxy_from = "
             f"{list(listener.proxy_from)}"),
            fix, pp_where))
    if listener.proxy_protocol:
        return findings + _dialled_findings(ctx, index, listener, sessions)
    mine = [e for e in sessions if e.get("listener") == name]
    clients = Counter(str(e.get("client")) for e in mine)
    if len(mine) >= MIN_SESSIONS_BEHIND_PROXY and len(clients) == 1:
        (client,) = clients
        front = _in_networks(client, listener.proxy_from) or _in_networks(client, listener.public_addresses)
        if front is not None:
            kind = "proxy_from" if _in_networks(client, listener.proxy_from) else "public_addresses"
            findings.append(Finding(
                "scenarios.6.proxy", Level.FAIL,
                f"listener {name} is behind a proxy without PROXY protocol: every client appears "
                f"as {client}", SCENARIO[6],
                (f"all {len(mine)} SMTP sessions on listener {name} in {_window(ctx)} came from "
                 f"{client} (event 1109)",
                 f"{client} is in {kind} of listener {name} ({_where(ctx, 'listener', index, kind)})",
                 f"proxy_protocol = false ({pp_where})"),
                f"set proxy_protocol = true on listener {name} ({pp_where}) with proxy_from "
                f"listing {client}, and turn on PROXY protocol (send-proxy) in the proxy; until "
                "then relay lists, connection lists and block lists see the proxy, not the client",
                pp_where))
    return findings


def _dialled_findings(ctx: Context, index: int, listener, sessions: list[dict]) -> list[Finding]:
    """Behind a proxy, the PROXY header says which address the client dialled: one that is not
    among the listener's public_addresses means the published address changed (or was never
    written down), and the MX and block list checks look at the wrong one."""
    dialled = Counter(str(e["fields"]["proxy_destination"]) for e in sessions
                      if e.get("listener") == listener.name and e.get("fields", {}).get("proxy_destination"))
    unknown = {a: n for a, n in dialled.items() if a not in listener.public_addresses}
    if not unknown:
        return []
    where = _where(ctx, "listener", index, "public_addresses")
    busiest = max(unknown, key=unknown.get)
    return [Finding(
        "scenarios.6.public-address", Level.WARN,
        f"clients reach listener {listener.name} through {', '.join(sorted(unknown))}, which is not "
        "among its public_addresses", SCENARIO[6],
        tuple(f"{_n(n, 'session')} in {_window(ctx)} dialled {a} (PROXY header, event 1109)"
              for a, n in sorted(unknown.items()))
        + (f"public_addresses = {list(listener.public_addresses)} ({where})",),
        f"if {busiest} is the address the Internet uses now, set public_addresses of listener "
        f"{listener.name} to it ({where}) and check that the MX records point there "
        "(relaywarden doctor --check dns.mx)", where)]


def _published_findings(ctx: Context, wrong: list[dict]) -> list[Finding]:
    """Event 1701: mail for a domain reached a listener that does not serve it."""
    listeners = ctx.config.listener
    index_of = {l.name: i for i, l in enumerate(listeners)}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in wrong:
        f = e.get("fields", {})
        domain = str(f.get("domain") or _domain_of(f.get("rcpt_to") or f.get("recipient")))
        groups[(str(e.get("listener")), domain)].append(e)
    findings = []
    for (name, domain), events in sorted(groups.items()):
        serving = [(i, l) for i, l in enumerate(listeners)
                   if l.name != name and l.anonymous and (l.accept_domains is None or domain in l.accept_domains)]
        published = [(i, l) for i, l in serving if l.public_addresses]
        index = index_of.get(name)
        where = _where(ctx, "listener", index) if index is not None else ctx.loaded.file
        clients = Counter(str(e.get("client")) for e in events)
        evidence = [f"{_n(len(events), 'recipient')} in {domain} reached listener {name} in {_window(ctx)} "
                    f"(event 1701) from {', '.join(c for c, _ in clients.most_common(SAMPLES))}"]
        if published:
            evidence += [f"listener {l.name} serves {domain} and is published at "
                         f"{', '.join(l.public_addresses)} ({_where(ctx, 'listener', i, 'public_addresses')})"
                         for i, l in published]
            target = ", ".join(f"{l.address}:{l.port} (listener {l.name})" for _, l in published)
            fix = (f"the firewall / NAT / proxy publishing {', '.join(published[0][1].public_addresses)} "
                   f"forwards to listener {name} instead of {target}: update the publishing rule "
                   "(and restart the firewall service that applies it); if the public address "
                   f"changed, set public_addresses of listener {published[0][1].name} "
                   f"({_where(ctx, 'listener', published[0][0], 'public_addresses')}) and the MX to the new one")
        elif serving:
            target = ", ".join(f"{l.address}:{l.port} (listener {l.name})" for _, l in serving)
            fix = (f"point the publishing rule or MX for {domain} at {target}, and set its "
                   "public_addresses so that doctor can check it")
        else:
            acc = _where(ctx, "listener", index, "accept_domains") if index is not None else where
            fix = f'add "{domain}" to accept_domains of listener {name} ({acc})'
        findings.append(Finding(
            "scenarios.6.published", Level.FAIL,
            f"mail for {domain} arrives at listener {name}, which does not serve it: the published "
            "address leads to the wrong listener", SCENARIO[6], tuple(evidence), fix, where))
    return findings


async def scenario_6(ctx: Context) -> list[Finding]:
    if _no_log(ctx):
        return [Finding("scenarios.6", Level.SKIP, f"no event log in {ctx.log_dir}: no recent "
                        "connections to compare with the configuration", SCENARIO[6])]
    events = _recent(ctx, EventId.SESSION_SUMMARY, EventId.PROTOCOL_ERROR, EventId.WRONG_LISTENER)
    sessions = [e for e in events if e["id"] == EventId.SESSION_SUMMARY
                and e.get("fields", {}).get("helo") not in (None, BATTERY_HELO)]
    proxy_lines = [e for e in events if e["id"] == EventId.PROTOCOL_ERROR
                   and str(e.get("fields", {}).get("detail", "")).upper() == "PROXY"]
    wrong = [e for e in events if e["id"] == EventId.WRONG_LISTENER]
    findings = []
    for index, listener in enumerate(ctx.config.listener):
        findings += _proxy_findings(ctx, index, listener, sessions, proxy_lines)
    findings += _published_findings(ctx, wrong)
    if not findings:
        per = Counter(str(e.get("listener")) for e in sessions)
        findings.append(Finding(
            "scenarios.6", Level.OK,
            "recent connections agree with the listeners' proxy and public address settings",
            SCENARIO[6],
            (f"{len(sessions)} SMTP sessions in {_window(ctx)}"
             + (": " + ", ".join(f"{n} on {name}" for name, n in sorted(per.items())) if per else ""),)))
    return findings


CHECKS = [
    ("scenarios.1", scenario_1),
    ("scenarios.2", scenario_2),
    ("scenarios.4", scenario_4),
    ("scenarios.5", scenario_5),
    ("scenarios.6", scenario_6),
]
