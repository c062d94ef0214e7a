"""The relay decision: one pure function per RCPT (and per connection and MAIL) returning a value.

This module owns *whether* a recipient is accepted — for local delivery, for forwarding on a route,
as authorised relay — or refused, and *why*: the reply (from ``relaywarden.status``), the event id,
every rule that shaped the outcome with the configuration file and line that made it, and for a
refusal the smallest configuration change that would allow it, or why it must not be allowed.

Nothing here does I/O, reads a clock or keeps state between calls: relay state never lives on the
connection (Haraka's leaked ``relaying`` flag made an open relay).  The decision inputs are kept in
``Decision.inputs`` so a logged decision can be replayed under another configuration.  Any error
inside a decision fails closed with ``451 4.3.0``.

Order (SPEC.md, "The relay decision"): connection list; TLS required; anonymous access off and not
authenticated (530 5.7.0, KB 895853 scenario 2); the recipient domain is accepted (authoritative:
the mailbox must exist and be enabled; internal-relay: local mailbox or forward; external-relay:
forward); otherwise relay, allowed by the listener's relay list (by its mode) or by authentication
with ``allow_authenticated`` on and the user's relay right intact, else 550 5.7.1 (events 1709,
1710; 1707 when the address belongs to a mailbox in a domain that is not accepted, scenario 4).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from .. import status
from ..config.loader import LoadedConfig
from ..config.schema import AccessList, Domain, DomainKind, Listener, Mode, normalise_domain
from ..directory import Directory, MailboxEntry
from ..events import EventId
from ..ids import hex_id
from ..status import Reply

__all__ = [
    "Decision",
    "RuleHit",
    "SessionFacts",
    "Verdict",
    "access_list_match",
    "decide_connection",
    "decide_mail",
    "decide_recipient",
    "new_decision_id",
    "refuse_address",
    "relay_list_allows",
    "route_for",
]

_DECISION_ID = re.compile(r"[0-9a-f]{6,12}")

# The event of a decision that failed closed on an internal error.
_POLICY_ERROR_EVENT = EventId.POLICY_ERROR


class RecipientAddress(Protocol):
    """What the decision reads from a parsed address (``relaywarden.protocol.address.Address``)."""

    local: str
    domain: str
    literal: bool
    routing: str | None
    source_route: Any

    @property
    def address(self) -> str: ...


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What the session knows about the client when a decision is asked for."""

    listener: str
    client_address: str              # the real client (after PROXY protocol)
    client_rdns: str | None = None   # forward-confirmed reverse DNS name, None when unknown
    proxy_address: str | None = None  # the proxy that sent a PROXY header, if any
    tls: bool = False
    auth_user: str | None = None     # authenticated login (a mailbox primary address)


class Verdict(StrEnum):
    LOCAL = "local"
    FORWARD = "forward"
    RELAY = "relay"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class RuleHit:
    """One rule that shaped a decision: its name, what it found, and the file:line that made it."""

    rule: str
    detail: str
    where: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The immutable outcome of one decision, with everything needed to explain and replay it."""

    id: str
    verdict: Verdict
    reply: Reply
    event: EventId
    recipient: str
    mailbox: str | None
    route: str | None
    rules: tuple[RuleHit, ...]
    fix: str | None
    admin_text: str
    inputs: dict = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.verdict is not Verdict.REFUSE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``explain --json`` and the event log."""
        return {
            "id": self.id,
            "verdict": self.verdict.value,
            "accepted": self.accepted,
            "reply": {"code": self.reply.code, "enhanced": self.reply.enhanced,
                      "text": self.reply.text, "line": str(self.reply)},
            "event": {"id": int(self.event), "name": self.event.name},
            "recipient": self.recipient,
            "mailbox": self.mailbox,
            "route": self.route,
            "rules": [{"rule": r.rule, "detail": r.detail, "where": r.where} for r in self.rules],
            "fix": self.fix,
            "admin_text": self.admin_text,
            "inputs": dict(self.inputs),
        }


def new_decision_id() -> str:
    """A fresh decision id: 8 lower-case hex digits the sender can quote."""
    return hex_id(4)


# ---------------------------------------------------------------------------------------------
# Public decisions
# ---------------------------------------------------------------------------------------------


def decide_connection(loaded: LoadedConfig, facts: SessionFacts, *,
                      decision_id: str | None = None) -> Decision | None:
    """The connection list of the listener: None when the client may connect, else 554 5.7.1."""
    did = _checked_id(decision_id)
    trace = None
    try:
        trace = _Trace.start(loaded, facts, did, sender=None, recipient="")
        return _connection_refusal(trace)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything
        return _fail_closed(loaded, facts, did, None, "", exc, trace)


def decide_mail(loaded: LoadedConfig, directory: Directory, facts: SessionFacts,
                sender: Any | None, *, decision_id: str | None = None) -> Decision | None:
    """MAIL FROM: None when allowed, else the refusal (530 5.7.0 for TLS or authentication)."""
    did = _checked_id(decision_id)
    sender_text = _sender_text(sender)
    trace = None
    try:
        trace = _Trace.start(loaded, facts, did, sender=sender_text, recipient="")
        return _mail_refusal(trace)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything
        return _fail_closed(loaded, facts, did, sender_text, "", exc, trace)


def decide_recipient(loaded: LoadedConfig, directory: Directory, facts: SessionFacts,
                     sender: Any | None, recipient: RecipientAddress, *,
                     decision_id: str | None = None) -> Decision:
    """Decide one RCPT TO.  Runs the connection and MAIL checks too, so it stands alone."""
    did = _checked_id(decision_id)
    sender_text = _sender_text(sender)
    trace = None
    recipient_text = ""
    try:
        recipient_text = _recipient_text(recipient)
        trace = _Trace.start(loaded, facts, did, sender=sender_text, recipient=recipient_text)
        refusal = _connection_refusal(trace) or _mail_refusal(trace)
        if refusal is not None:
            return refusal
        return _decide_rcpt(trace, directory, recipient)
    except Exception as exc:  # noqa: BLE001 - fail closed on anything
        return _fail_closed(loaded, facts, did, sender_text, recipient_text, exc, trace)


def refuse_address(loaded: LoadedConfig, facts: SessionFacts, sender: Any | None, raw: str,
                   code: int, enhanced: str, reason: str, *,
                   decision_id: str | None = None) -> Decision:
    """The decision for a recipient the strict RFC 5321 parser refused (``AddressError``)."""
    did = _checked_id(decision_id)
    reply = status.bad_address(code, enhanced, reason).tagged(did)
    inputs = _inputs(facts, _sender_text(sender), raw)
    admin = (f"refused RCPT TO:<{raw}> from {facts.client_address} on listener {facts.listener} "
             f"with {reply.code} {reply.enhanced}: the address is not valid RFC 5321 syntax "
             f"or uses a routing form ({reason}); no configuration change should allow it.")
    return Decision(
        id=did, verdict=Verdict.REFUSE, reply=reply, event=EventId.ADDRESS_REFUSED,
        recipient=raw, mailbox=None, route=None,
        rules=(RuleHit("address-syntax", reason, "RFC 5321 4.1.2"),),
        fix=f"must not be allowed: {reason}; the sender must use the plain address of the real "
            "destination",
        admin_text=admin, inputs=inputs,
    )


def route_for(loaded: LoadedConfig, domain: str) -> str | None:
    """The route for ``domain``: the domain's own ``route``, else the best matching route."""
    name, _ = _route_with_where(loaded, domain)
    return name


def relay_list_allows(listener: Listener, facts: SessionFacts, *,
                      loaded: LoadedConfig | None = None) -> tuple[bool, RuleHit]:
    """Whether the listener's relay list lets this client relay without authenticating.

    ``mode = "only"``: allowed when an entry matches; ``"all-except"``: allowed unless one does.
    With ``loaded`` the rule hit names the file and line of the entry (or of the list).
    """
    where = _listener_where_fn(loaded, listener)
    relay = listener.relay
    match = access_list_match(relay, facts.client_address, facts.client_rdns)
    client = facts.client_address
    if match is not None:
        index, entry = match
        entry_where = where("relay", "entries", index)
        if relay.mode is Mode.ONLY:
            return True, RuleHit("relay-list", f"{client} matches relay entry {entry} of "
                                 f"listener {listener.name} (mode only)", entry_where)
        return False, RuleHit("relay-list", f"{client} matches relay entry {entry} of listener "
                              f"{listener.name}, which mode all-except excludes", entry_where)
    if relay.mode is Mode.ONLY:
        count = len(relay.entries)
        listed = f"{count} entr{'y' if count == 1 else 'ies'}" if count else "no entries"
        return False, RuleHit("relay-list", f"{client} is not on the relay list of listener "
                              f"{listener.name} (mode only, {listed})",
                              where("relay", "entries"))
    return True, RuleHit("relay-list", f"{client} is not excluded by the relay list of listener "
                         f"{listener.name} (mode all-except: every other client may relay)",
                         where("relay", "mode"))


def access_list_match(access: AccessList, client: str,
                      rdns: str | None) -> tuple[int, str] | None:
    """The first entry (index, entry) matching the client address or its reverse DNS name."""
    ip = _client_ip(client)
    name = _rdns_name(rdns)
    for index, entry in enumerate(access.entries):
        if _entry_is_ip(entry):
            if ip is not None and _ip_in(ip, _network(entry)):
                return index, entry
        elif name is not None and (name == entry or name.endswith("." + entry)):
            return index, entry
    return None


# ---------------------------------------------------------------------------------------------
# The trace: rules gathered while deciding, and the constructors of the outcome
# ---------------------------------------------------------------------------------------------


@dataclass
class _Trace:
    loaded: LoadedConfig
    facts: SessionFacts
    listener: Listener
    index: int
    decision_id: str
    recipient: str
    inputs: dict
    rules: list[RuleHit] = field(default_factory=list)

    @classmethod
    def start(cls, loaded: LoadedConfig, facts: SessionFacts, decision_id: str, *,
              sender: str | None, recipient: str) -> _Trace:
        index = _listener_index(loaded, facts.listener)
        return cls(loaded, facts, loaded.config.listener[index], index, decision_id, recipient,
                   _inputs(facts, sender, recipient))

    def where(self, *path: str | int) -> str:
        return self.loaded.source.where(*path)

    def at_listener(self, *path: str | int) -> str:
        return self.loaded.source.where("listener", self.index, *path)

    def hit(self, rule: str, detail: str, where: str) -> None:
        self.rules.append(RuleHit(rule, detail, where))

    def accept(self, verdict: Verdict, event: EventId, summary: str, *,
               mailbox: str | None = None, route: str | None = None) -> Decision:
        reply = status.recipient_ok()
        last = self.rules[-1].where if self.rules else self.loaded.file
        admin = (f"accepted {self._who()} for {verdict.value}"
                 f"{f' to mailbox {mailbox}' if mailbox else ''}"
                 f"{f' on route {route}' if route else ''}: {summary} ({last}).")
        return Decision(self.decision_id, verdict, reply, event, self.recipient, mailbox, route,
                        tuple(self.rules), None, admin, self.inputs)

    def refuse(self, reply: Reply, event: EventId, cause: str, fix: str) -> Decision:
        tagged = reply.tagged(self.decision_id)
        admin = (f"refused {self._who()} with {reply.code} {reply.enhanced}: {cause}. "
                 f"Fix: {fix}.")
        return Decision(self.decision_id, Verdict.REFUSE, tagged, event, self.recipient, None,
                        None, tuple(self.rules), fix, admin, self.inputs)

    def _who(self) -> str:
        what = f"<{self.recipient}>" if self.recipient else "the session"
        user = f" (authenticated as {self.facts.auth_user})" if self.facts.auth_user else ""
        return (f"{what} from {self.facts.client_address}{user} on listener "
                f"{self.listener.name}")


# ---------------------------------------------------------------------------------------------
# Connection and MAIL
# ---------------------------------------------------------------------------------------------


def _connection_refusal(trace: _Trace) -> Decision | None:
    listener, facts = trace.listener, trace.facts
    access = listener.connections
    match = access_list_match(access, facts.client_address, facts.client_rdns)
    allowed = (match is not None) == (access.mode is Mode.ONLY)
    if allowed:
        return None
    name = listener.name
    if match is not None:
        index, entry = match
        where = trace.at_listener("connections", "entries", index)
        trace.hit("connection-list", f"{facts.client_address} matches entry {entry}, which "
                  f"mode all-except refuses", where)
        fix = f"remove {entry} from listener {name} connections.entries ({where})"
    else:
        where = trace.at_listener("connections", "entries")
        trace.hit("connection-list", f"{facts.client_address} is not on the connection list of "
                  f"listener {name} (mode only)", where)
        fix = f"add {facts.client_address} to listener {name} connections.entries ({where})"
    return trace.refuse(status.connection_refused(), EventId.CONNECTION_REFUSED,
                        f"the connection list of listener {name} does not grant "
                        f"{facts.client_address}", fix)


def _mail_refusal(trace: _Trace) -> Decision | None:
    listener, facts = trace.listener, trace.facts
    name = listener.name
    if listener.require_tls and not facts.tls:
        where = trace.at_listener("require_tls")
        trace.hit("require-tls", f"listener {name} requires STARTTLS before MAIL and the "
                  "session is not encrypted", where)
        return trace.refuse(status.tls_required(), EventId.TLS_REQUIRED,
                            f"listener {name} requires TLS and the client sent MAIL without "
                            "STARTTLS", "configure the client to use STARTTLS; or, if it cannot, "
                            f"set require_tls = false on listener {name} ({where})")
    if not listener.anonymous and facts.auth_user is None:
        where = trace.at_listener("anonymous")
        trace.hit("anonymous", f"listener {name} has anonymous = false and the client did not "
                  "authenticate", where)
        fix = (f"if this is the listener the Internet delivers to (the MX of your domains points "
               f"here), set anonymous = true on listener {name} ({where}) (KB 895853 "
               "scenario 2); otherwise configure the client to authenticate")
        return trace.refuse(status.authentication_required(), EventId.AUTHENTICATION_REQUIRED,
                            f"anonymous access is off on listener {name} and the client did "
                            "not authenticate", fix)
    return None


# ---------------------------------------------------------------------------------------------
# RCPT
# ---------------------------------------------------------------------------------------------


def _decide_rcpt(trace: _Trace, directory: Directory, rcpt: RecipientAddress) -> Decision:
    if rcpt.source_route:
        trace.hit("source-route", f"source route {_source_route_text(rcpt.source_route)} "
                  "ignored (RFC 5321 appendix C); deciding on the final address", "RFC 5321 C")
    if not rcpt.domain:
        return _postmaster(trace, directory, rcpt)
    found = None if rcpt.literal else _accepted_domain(trace.loaded, rcpt.domain)
    if found is None:
        return _not_accepted(trace, directory, rcpt)
    index, domain = found
    domain_where = trace.where("domain", index, "kind")
    trace.hit("accepted-domain", f"{domain.name} is an accepted domain of kind "
              f"{domain.kind.value}", domain_where)
    if rcpt.routing is not None:
        return _routing_form(trace, rcpt)
    refusal = _wrong_listener(trace, domain)
    if refusal is not None:
        return refusal
    if domain.kind is DomainKind.AUTHORITATIVE:
        return _authoritative(trace, directory, rcpt)
    if domain.kind is DomainKind.INTERNAL_RELAY:
        return _internal_relay(trace, directory, rcpt, index)
    return _forward(trace, rcpt.domain, index, f"{domain.name} is an external-relay domain")


def _postmaster(trace: _Trace, directory: Directory, rcpt: RecipientAddress) -> Decision:
    if rcpt.local.casefold() != "postmaster":
        trace.hit("address-syntax", f"<{rcpt.local}> has no domain", "RFC 5321 4.1.1.3")
        return trace.refuse(status.routing_refused("an address without a domain is accepted only "
                                                   "for <Postmaster>"), EventId.ADDRESS_REFUSED,
                            "a recipient without a domain other than <Postmaster>",
                            "must not be allowed: the sender must give a full address")
    config = trace.loaded.config
    for index, domain in enumerate(config.domain):
        if domain.kind is DomainKind.AUTHORITATIVE:
            address = f"postmaster@{domain.name}"
            trace.hit("postmaster", f"<Postmaster> is delivered as {address}, the first "
                      "authoritative domain's postmaster", trace.where("domain", index))
            return _local_mailbox(trace, directory, address)
    where = trace.where("domain")
    trace.hit("postmaster", "<Postmaster> needs an authoritative domain and there is none", where)
    return trace.refuse(status.user_unknown("Postmaster"), EventId.RECIPIENT_UNKNOWN,
                        "no authoritative domain is configured to deliver <Postmaster> to",
                        'add a [[domain]] with kind = "authoritative" and a [[mailbox]] '
                        "postmaster@ that domain (RFC 5321 requires a postmaster)")


def _routing_form(trace: _Trace, rcpt: RecipientAddress) -> Decision:
    form = rcpt.routing
    trace.hit("routing-form", f"<{trace.recipient}> uses the {form} routing form; it is never "
              "interpreted or forwarded", "RFC 5321 3.6.1")
    return trace.refuse(status.routing_refused(f"{form} addressing is not accepted; send to the "
                                               "real destination address"),
                        EventId.ADDRESS_REFUSED,
                        f"the recipient uses the {form} routing form to reach another "
                        "destination through this server",
                        "must not be allowed: interpreting routing forms would make this "
                        "server an open relay")


def _wrong_listener(trace: _Trace, domain: Domain) -> Decision | None:
    listener = trace.listener
    if listener.accept_domains is None or domain.name in listener.accept_domains:
        return None
    where = trace.at_listener("accept_domains")
    if trace.facts.auth_user is not None:
        trace.hit("accept-domains", f"{domain.name} is not in accept_domains of listener "
                  f"{listener.name}, which binds anonymous clients only; the client "
                  "authenticated", where)
        return None
    serving = [l.name for l in trace.loaded.config.listener
               if l.accept_domains is None or domain.name in l.accept_domains]
    serving = [n for n in serving if n != listener.name]
    trace.hit("accept-domains", f"{domain.name} is not in accept_domains of listener "
              f"{listener.name}", where)
    elsewhere = (f"point the MX record or published address of {domain.name} at listener "
                 f"{', '.join(serving)}" if serving else
                 f"no listener serves {domain.name} to anonymous clients")
    fix = (f"{elsewhere} (KB 895853 scenarios 3 and 6); or, if mail for {domain.name} should "
           f"arrive here, add it to accept_domains of listener {listener.name} ({where})")
    return trace.refuse(status.domain_not_served(domain.name, listener.name),
                        EventId.WRONG_LISTENER,
                        f"{domain.name} is accepted, but not by listener {listener.name}", fix)


def _authoritative(trace: _Trace, directory: Directory, rcpt: RecipientAddress) -> Decision:
    return _local_mailbox(trace, directory, _lookup_address(rcpt))


def _local_mailbox(trace: _Trace, directory: Directory, address: str) -> Decision:
    entry = directory.find(address)
    if entry is None:
        domain = address.rpartition("@")[2]
        trace.hit("mailbox", f"no mailbox has the address {address}", trace.where("mailbox"))
        fix = (f"if {address} should exist, add a [[mailbox]] with address = \"{address}\" or "
               f"add it to the aliases of an existing mailbox; if {domain} is shared with "
               'another mail system, make it kind = "internal-relay"')
        return trace.refuse(status.user_unknown(trace.recipient or address),
                            EventId.RECIPIENT_UNKNOWN,
                            f"{domain} is authoritative and no mailbox has the address {address}",
                            fix)
    if not entry.enabled:
        where = entry.source or trace.where("mailbox")
        trace.hit("mailbox", f"{address} belongs to mailbox {entry.address}, which is disabled",
                  where)
        return trace.refuse(status.mailbox_disabled(trace.recipient or address),
                            EventId.RECIPIENT_UNKNOWN, f"mailbox {entry.address} is disabled",
                            f"set enabled = true on mailbox {entry.address} ({where}) or "
                            f"`relaywarden user enable {entry.address}`")
    role = "the primary address" if _same(address, entry.address) else "an alias"
    trace.hit("mailbox", f"{address} is {role} of mailbox {entry.address}",
              entry.source or trace.where("mailbox"))
    return trace.accept(Verdict.LOCAL, EventId.RECIPIENT_ACCEPTED,
                        f"delivered to local mailbox {entry.address}", mailbox=entry.address)


def _internal_relay(trace: _Trace, directory: Directory, rcpt: RecipientAddress,
                    index: int) -> Decision:
    address = _lookup_address(rcpt)
    entry = directory.find(address)
    if entry is not None:
        return _local_mailbox(trace, directory, address)
    trace.hit("mailbox", f"no local mailbox has the address {address}; the domain is shared, "
              "so it is forwarded", trace.where("mailbox"))
    return _forward(trace, rcpt.domain, index,
                    f"{rcpt.domain} is an internal-relay domain and {address} is not local")


def _forward(trace: _Trace, domain: str, index: int, summary: str) -> Decision:
    route, where = _route_with_where(trace.loaded, domain)
    if route is None:
        trace.hit("route", f"no route matches {domain}", trace.where("route"))
        return trace.refuse(status.policy_error(), _POLICY_ERROR_EVENT,
                            f"{summary}, but no route leads to {domain}",
                            f"set route on [[domain]] {domain} ({trace.where('domain', index)}) "
                            'or add a [[route]] with domains = ["*"]')
    trace.hit("route", f"{domain} leaves on route {route}", where)
    return trace.accept(Verdict.FORWARD, EventId.RECIPIENT_ACCEPTED,
                        f"{summary}; forwarded on route {route}", route=route)


def _not_accepted(trace: _Trace, directory: Directory, rcpt: RecipientAddress) -> Decision:
    domain = rcpt.domain
    if rcpt.literal:
        trace.hit("accepted-domain", f"{domain} is an address literal; literals are never "
                  "accepted domains", "RFC 5321 4.1.3")
        reason = f"{domain} is an address literal, which this server does not accept mail for"
    else:
        trace.hit("accepted-domain", f"{domain} is not an accepted domain", trace.where("domain"))
        reason = f"{domain} is not a domain this server accepts mail for"
    owner = None if rcpt.literal else directory.find(_lookup_address(rcpt))
    if owner is not None:
        return _scenario_4(trace, rcpt, owner, reason)
    allowed, hit = relay_list_allows(trace.listener, trace.facts, loaded=trace.loaded)
    trace.rules.append(hit)
    if allowed:
        return _relay(trace, domain, hit.detail)
    if trace.facts.auth_user is not None:
        return _authenticated_relay(trace, directory, domain, reason)
    return _relay_denied(trace, domain, reason)


def _scenario_4(trace: _Trace, rcpt: RecipientAddress, owner: MailboxEntry,
                reason: str) -> Decision:
    domain = rcpt.domain
    where = owner.source or trace.where("mailbox")
    trace.hit("mailbox-domain", f"{_plain(rcpt)} belongs to mailbox {owner.address}, but {domain} "
              "is not an accepted domain (KB 895853 scenario 4)", where)
    fix = (f'add [[domain]] name = "{domain}" (kind = "authoritative") so that mail to '
           f"{_plain(rcpt)} is delivered to mailbox {owner.address}; or remove the address from "
           f"that mailbox ({where}) if {domain} is no longer yours")
    return trace.refuse(status.relay_denied(reason), EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED,
                        f"{_plain(rcpt)} is an address of mailbox {owner.address} but {domain} "
                        "is not an accepted domain", fix)


def _relay(trace: _Trace, domain: str, summary: str) -> Decision:
    route, where = _route_with_where(trace.loaded, domain)
    if route is None:
        trace.hit("route", f"no route matches {domain}", trace.where("route"))
        return trace.refuse(status.policy_error(), _POLICY_ERROR_EVENT,
                            f"relay allowed ({summary}), but no route leads to {domain}",
                            'add a [[route]] with domains = ["*"] (the default route)')
    trace.hit("route", f"{domain} leaves on route {route}", where)
    return trace.accept(Verdict.RELAY, EventId.RECIPIENT_ACCEPTED,
                        f"relay allowed: {summary}", route=route)


def _authenticated_relay(trace: _Trace, directory: Directory, domain: str,
                         reason: str) -> Decision:
    listener, user = trace.listener, trace.facts.auth_user
    if not listener.allow_authenticated:
        where = trace.at_listener("allow_authenticated")
        trace.hit("allow-authenticated", f"listener {listener.name} does not let authenticated "
                  "users relay (allow_authenticated = false)", where)
        others = [l.name for l in trace.loaded.config.listener
                  if l.allow_authenticated and l.name != listener.name]
        also = (f"; or have the client submit through listener {', '.join(others)}, which "
                "allows authenticated relay") if others else ""
        fix = (f"set allow_authenticated = true on listener {listener.name} ({where}) "
               f"(KB 895853 scenario 1){also}")
        return trace.refuse(status.relay_denied(f"{reason}, and this service does not relay "
                                                "for authenticated users"),
                            EventId.RELAY_DENIED_AUTHENTICATED,
                            f"{user} authenticated, but authenticated relay is off on listener "
                            f"{listener.name}", fix)
    trace.hit("allow-authenticated", f"listener {listener.name} lets authenticated users relay",
              trace.at_listener("allow_authenticated"))
    entry = directory.login(user)
    if entry is None or not entry.enabled or not entry.relay:
        return _relay_right_refused(trace, user, entry, reason)
    trace.hit("mailbox-relay", f"{entry.address} may relay (relay = true, enabled)",
              entry.source or trace.where("mailbox"))
    return _relay(trace, domain, f"{user} authenticated and listener {listener.name} allows "
                  "authenticated relay")


def _relay_right_refused(trace: _Trace, user: str, entry: MailboxEntry | None,
                         reason: str) -> Decision:
    if entry is None:
        where = trace.where("mailbox")
        trace.hit("mailbox-relay", f"no mailbox has the login {user}", where)
        cause, fix = (f"{user} authenticated but has no mailbox",
                      f'add a [[mailbox]] with address = "{user}" ({where})')
    elif not entry.enabled:
        where = entry.source or trace.where("mailbox")
        trace.hit("mailbox-relay", f"mailbox {entry.address} is disabled", where)
        cause, fix = (f"mailbox {entry.address} is disabled",
                      f"set enabled = true on mailbox {entry.address} ({where}) or "
                      f"`relaywarden user enable {entry.address}`")
    else:
        where = entry.source or trace.where("mailbox")
        trace.hit("mailbox-relay", f"the relay right of {entry.address} is suspended "
                  "(relay = false)", where)
        cause = f"the relay right of {entry.address} is suspended"
        fix = (f"once you have checked the account is not compromised, restore it: "
               f"`relaywarden user enable-relay {entry.address}` or set relay = true on mailbox "
               f"{entry.address} ({where})")
    return trace.refuse(status.relay_denied(f"{reason}, and relaying is suspended for this "
                                            "account"),
                        EventId.RELAY_DENIED_AUTHENTICATED, cause, fix)


def _relay_denied(trace: _Trace, domain: str, reason: str) -> Decision:
    listener, client = trace.listener, trace.facts.client_address
    relay = listener.relay
    auth_listeners = [l.name for l in trace.loaded.config.listener if l.allow_authenticated]
    auth_hint = (f"have it authenticate on listener {', '.join(auth_listeners)}"
                 if auth_listeners else "")
    if relay.mode is Mode.ALL_EXCEPT:
        hit_where = trace.rules[-1].where
        fix = (f"must not be allowed: {client} is excluded from relaying on listener "
               f"{listener.name}; remove its entry from relay.entries ({hit_where}) only if it "
               "is one of your own machines")
    else:
        where = trace.at_listener("relay", "entries")
        add = f"add {client} to listener {listener.name} relay.entries ({where})"
        ways = " or ".join(x for x in (auth_hint, add) if x)
        if _is_public(client):
            fix = ("must not be allowed: adding this client to the relay list would let it "
                   f"relay to any domain; if it is your own application, {ways}")
        else:
            fix = f"if {client} is one of your own applications or devices, {ways}"
        if _resembles_accepted(trace.loaded, domain):
            fix += f'; if {domain} should be yours, add [[domain]] name = "{domain}"'
    cause = (f"{reason}, and {client} is neither on the relay list of listener "
             f"{listener.name} nor authenticated")
    return trace.refuse(status.relay_denied(f"{reason}; authenticate to relay"),
                        EventId.RELAY_DENIED, cause, fix)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _fail_closed(loaded: LoadedConfig, facts: SessionFacts, did: str, sender: str | None,
                 recipient: str, exc: Exception, trace: _Trace | None) -> Decision:
    rules = tuple(trace.rules) if trace is not None else ()
    error = f"{type(exc).__name__}: {exc}"
    admin = (f"refused <{recipient}> from {facts.client_address} on listener {facts.listener} "
             f"with 451 4.3.0: the relay decision failed ({error}) and failed closed. Fix: "
             f"check the configuration ({loaded.file}) and the user database, then retry.")
    return Decision(
        id=did, verdict=Verdict.REFUSE, reply=status.policy_error().tagged(did),
        event=_POLICY_ERROR_EVENT, recipient=recipient, mailbox=None, route=None,
        rules=(*rules, RuleHit("fail-closed", error, loaded.file)),
        fix=f"an internal error, not a policy: {error}; check the configuration and the user "
            "database",
        admin_text=admin, inputs=_inputs(facts, sender, recipient),
    )


def _checked_id(decision_id: str | None) -> str:
    if decision_id is None:
        return new_decision_id()
    if not _DECISION_ID.fullmatch(decision_id):
        raise ValueError(f"decision id {decision_id!r}: use 6-12 lower-case hex digits")
    return decision_id


def _inputs(facts: SessionFacts, sender: str | None, recipient: str) -> dict:
    return {
        "listener": facts.listener,
        "client": facts.client_address,
        "rdns": facts.client_rdns,
        "proxy": facts.proxy_address,
        "tls": facts.tls,
        "user": facts.auth_user,
        "sender": sender,
        "recipient": recipient,
    }


def _sender_text(sender: Any | None) -> str | None:
    if sender is None:
        return None
    if isinstance(sender, str):
        return sender
    return str(getattr(sender, "address", sender))


def _recipient_text(rcpt: RecipientAddress) -> str:
    if not rcpt.domain:
        return rcpt.local
    return _plain(rcpt)


def _plain(rcpt: RecipientAddress) -> str:
    """local@domain with the normalised (A-label, lower-case) domain."""
    address = getattr(rcpt, "address", None)
    if isinstance(address, str) and address.rpartition("@")[2] == rcpt.domain:
        return address
    return f"{rcpt.local}@{rcpt.domain}"


def _lookup_address(rcpt: RecipientAddress) -> str:
    """The unquoted local@domain the directory is searched with (``"alice"`` is ``alice``)."""
    return f"{rcpt.local}@{rcpt.domain}"


def _same(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _source_route_text(route: Any) -> str:
    if isinstance(route, (list, tuple)):
        return ",".join(f"@{r}" if not str(r).startswith("@") else str(r) for r in route)
    return str(route)


def _listener_index(loaded: LoadedConfig, name: str) -> int:
    for index, listener in enumerate(loaded.config.listener):
        if listener.name == name:
            return index
    raise KeyError(f"no listener named {name!r}")


def _listener_where_fn(loaded: LoadedConfig | None, listener: Listener):
    if loaded is None:
        return lambda *path: ""
    index = _listener_index(loaded, listener.name)
    return lambda *path: loaded.source.where("listener", index, *path)


def _accepted_domain(loaded: LoadedConfig, domain: str) -> tuple[int, Domain] | None:
    for index, candidate in enumerate(loaded.config.domain):
        if candidate.name == domain:
            return index, candidate
    return None


def _route_with_where(loaded: LoadedConfig, domain: str) -> tuple[str | None, str]:
    config = loaded.config
    for index, candidate in enumerate(config.domain):
        if candidate.name == domain and candidate.route is not None:
            return candidate.route, loaded.source.where("domain", index, "route")
    best: tuple[tuple[int, int], str, str] | None = None
    for r_index, route in enumerate(config.route):
        for p_index, pattern in enumerate(route.domains):
            rank = _pattern_rank(pattern, domain)
            if rank is None:
                continue
            if best is None or rank > best[0]:
                best = (rank, route.name,
                        loaded.source.where("route", r_index, "domains", p_index))
    if best is None:
        return None, loaded.file
    return best[1], best[2]


def _pattern_rank(pattern: str, domain: str) -> tuple[int, int] | None:
    """Exact (3) beats ``*.x`` wildcard (2, longer suffix first) beats ``*`` (1)."""
    if pattern == domain:
        return (3, len(pattern))
    if pattern.startswith("*.") and domain.endswith(pattern[1:]):
        return (2, len(pattern))
    if pattern == "*":
        return (1, 0)
    return None


def _entry_is_ip(entry: str) -> bool:
    return ":" in entry or bool(re.fullmatch(r"[0-9./]+", entry))


@functools.lru_cache(maxsize=4096)
def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(entry, strict=False)


@functools.lru_cache(maxsize=4096)
def _client_ip(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = client.strip().strip("[]").split("%", 1)[0]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ip_in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
           net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    if ip.version == net.version:
        return ip in net
    if ip.version == 4:  # an IPv4 client against an IPv4-mapped IPv6 entry (::ffff:a.b.c.d)
        return ipaddress.IPv6Address(f"::ffff:{ip}") in net
    return False


def _rdns_name(rdns: str | None) -> str | None:
    if not rdns:
        return None
    try:
        return normalise_domain(rdns.strip().rstrip(".").lower())
    except ValueError:
        return None


_INTERNAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "::1/128", "fc00::/7", "fe80::/10",
))


def _is_public(client: str) -> bool:
    """Not an internal address (RFC 1918, CGNAT, loopback, link-local, ULA): a stranger."""
    ip = _client_ip(client)
    return ip is None or not any(_ip_in(ip, net) for net in _INTERNAL_NETWORKS)


def _resembles_accepted(loaded: LoadedConfig, domain: str) -> bool:
    """A domain that shares its last two labels with an accepted domain (a subdomain, a typo)."""
    tail = ".".join(domain.split(".")[-2:])
    return any(d.name.endswith(tail) or domain.endswith("." + d.name) for d in loaded.config.domain)
