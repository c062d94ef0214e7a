"""The typed configuration schema: every key, its meaning and its default, validated by pydantic.

The TOML file (see ``default.toml`` beside this module, written by ``relaywarden init``) maps onto
these models one to one.  Each field's description is the documentation of its key; errors name the
key and say how to fix it (the loader adds the file and line).

Exchange 2000/2003 terms (KB 895853) and their keys here:

* SMTP virtual server -> ``[[listener]]``
* Relay restrictions, "only the list below" / "all except the list below" -> ``listener.relay``
  with ``mode = "only" | "all-except"`` and ``entries``
* "Allow all computers which successfully authenticate to relay" -> ``listener.allow_authenticated``
* Access -> Authentication -> Anonymous access -> ``listener.anonymous``
* Connection control -> ``listener.connections``
* Recipient policy ("responsible for all mail delivery") -> ``[[domain]] kind = "authoritative"``;
  that box cleared plus an SMTP connector -> ``kind = "internal-relay"``; a connector for a domain
  that is not local -> ``kind = "external-relay"``
* SMTP connector / smarthost -> ``[[route]]``
* User with proxy addresses -> ``[[mailbox]]`` with ``aliases``
* ISA Server publishing rule, external IP -> ``listener.public_addresses`` and ``proxy_protocol``
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


def normalise_domain(value: str) -> str:
    """Lower-case, IDNA A-label form of a configured domain; raises ValueError with the fix."""
    import idna

    raw = value.strip()
    if raw != value or not raw:
        raise ValueError(f"domain {value!r} is empty or has surrounding spaces")
    if raw.endswith("."):
        raise ValueError(f"domain {value!r} ends with a dot: write it without the trailing dot")
    try:
        ascii_form = idna.encode(raw, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"domain {value!r} is not a valid domain name ({exc})") from None
    if not _DOMAIN_RE.match(ascii_form):
        raise ValueError(f"domain {value!r} is not a valid domain name")
    return ascii_form


def parse_network(value: str) -> IPNetwork:
    """An address or CIDR; says exactly what is wrong (prefix too long, host bits set, ...)."""
    text = value.strip()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        if "/" in text:
            addr, _, prefix = text.partition("/")
            try:
                ip = ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"{value!r}: {addr!r} is not an IPv4 or IPv6 address") from None
            limit = 32 if ip.version == 4 else 128
            raise ValueError(
                f"{value!r}: prefix length {prefix!r} is not valid for IPv{ip.version} (0 to {limit})"
            ) from None
        raise ValueError(f"{value!r} is neither an IP address nor a CIDR network") from None
    if "/" in text and net.network_address != ipaddress.ip_address(text.split("/")[0]):
        raise ValueError(
            f"{value!r} has host bits set: the network is {net.with_prefixlen}; write that instead"
        )
    return net


class Mode(StrEnum):
    ONLY = "only"
    ALL_EXCEPT = "all-except"


class TlsMode(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class DomainKind(StrEnum):
    AUTHORITATIVE = "authoritative"
    INTERNAL_RELAY = "internal-relay"
    EXTERNAL_RELAY = "external-relay"


class RouteKind(StrEnum):
    MX = "mx"
    SMARTHOST = "smarthost"


class RouteTls(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


# TOML has booleans, integers and floats of its own: a value of another type is a mistake to
# name, not to convert ("yes" or 1 for a boolean, "2525" or 2525.0 for a port). An integer is
# still a good float (300 seconds).
Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


def _check_access_entry(entry: str) -> str:
    text = entry.strip().lower()
    if not text:
        raise ValueError("an empty entry: remove it")
    if _looks_like_ip(text):
        return parse_network(text).with_prefixlen if "/" in text else str(ipaddress.ip_address(text))
    return normalise_domain(text.lstrip("."))


AccessEntry = Annotated[str, AfterValidator(_check_access_entry)]


class AccessList(_Model):
    """A list of clients: IP addresses, CIDR networks (IPv4 and IPv6) and reverse-DNS domains.

    ``mode = "only"``: only the clients on the list match.  ``mode = "all-except"``: every client
    matches except those on the list (Exchange's "all except the list below").
    A domain entry (``example.net``) matches a client whose forward-confirmed reverse DNS name is
    that domain or under it.
    """

    mode: Mode = Field(Mode.ONLY, description='"only" the entries, or "all-except" the entries.')
    entries: list[AccessEntry] = Field(default_factory=list, description="IP addresses, CIDRs and domains.")

    def networks(self) -> list[tuple[str, IPNetwork]]:
        return [(e, ipaddress.ip_network(e, strict=False)) for e in self.entries if _looks_like_ip(e)]

    def domains(self) -> list[str]:
        return [e for e in self.entries if not _looks_like_ip(e)]


def _looks_like_ip(text: str) -> bool:
    return ":" in text or bool(re.fullmatch(r"[0-9./]+", text))


class Limits(_Model):
    """Protocol limits of a listener.  Each is answered with its own reply and RFC 3463 code."""

    max_command_line: Int = Field(512, ge=512, le=65536, description="Longest command line in octets, CRLF included (RFC 5321: at least 512). Longer: 500 5.5.2.")
    max_data_line: Int = Field(1000, ge=1000, le=1_000_000, description="Longest line of message data in octets, CRLF included (RFC 5321: 1000). Longer: the message is refused with 552 5.3.4 at its end.")
    max_message_size: Int = Field(35 * 1024 * 1024, ge=1024, description="Largest message in octets, announced with SIZE. Larger: 552 5.3.4.")
    max_recipients: Int = Field(100, ge=1, le=100_000, description="Recipients per message. More: 452 4.5.3.")
    max_errors: Int = Field(10, ge=1, le=1000, description="Errors per session before the server says 421 4.7.0 and disconnects.")
    command_timeout: Float = Field(300.0, gt=0, description="Seconds to wait for a command (RFC 5321: 5 minutes).")
    data_timeout: Float = Field(600.0, gt=0, description="Seconds to wait for more message data (RFC 5321: 3-10 minutes).")
    max_connections: Int = Field(500, ge=1, description="Concurrent connections on this listener. More: 421 4.7.0.")
    max_connections_per_client: Int = Field(50, ge=1, description="Concurrent connections from one client address. More: 421 4.7.0.")
    max_received_headers: Int = Field(50, ge=5, le=500, description="Received headers after which a message is a mail loop (554 5.4.6).")


AuthMechanism = Literal["PLAIN", "LOGIN"]


class Listener(_Model):
    """An SMTP listener (Exchange: SMTP virtual server)."""

    name: str = Field(description="Short name used in events and replies, e.g. mx, submission, devices.")
    address: str = Field("127.0.0.1", description="IPv4 or IPv6 address to listen on (0.0.0.0 / :: for all).")
    port: Int = Field(25, ge=1, le=65535, description="TCP port.")
    tls: TlsMode = Field(TlsMode.STARTTLS, description='"none", "starttls" (offered after EHLO) or "implicit" (TLS from the first byte, port 465).')
    certificate: str | None = Field(None, description="PEM certificate chain. Unset: a self-signed certificate is generated into the data directory on first start.")
    key: str | None = Field(None, description="PEM private key for `certificate`.")
    require_tls: Bool = Field(False, description="Refuse MAIL until STARTTLS has been done (530 5.7.0).")
    anonymous: Bool = Field(True, description="Accept mail from clients that did not authenticate (Exchange: Anonymous access). Off: 530 5.7.0 (KB scenario 2 when this is the Internet's listener).")
    auth: list[AuthMechanism] = Field(default_factory=list, description='SASL mechanisms offered ("PLAIN", "LOGIN"); empty: no AUTH on this listener.')
    auth_plaintext: Bool = Field(False, description="Offer AUTH before TLS. Off: AUTH is offered and accepted only after STARTTLS or on implicit TLS.")
    allow_authenticated: Bool = Field(False, description="Clients that authenticate may relay to any domain, regardless of the relay list (Exchange: 'Allow all computers which successfully authenticate to relay'). Off on a listener users submit to is KB scenario 1.")
    relay: AccessList = Field(default_factory=AccessList, description="Who may relay without authenticating (Exchange: Relay restrictions). Default: nobody.")
    connections: AccessList = Field(default_factory=lambda: AccessList(mode=Mode.ALL_EXCEPT, entries=[]), description="Who may connect at all (Exchange: Connection control). Default: everybody.")
    accept_domains: list[str] | None = Field(None, description="Accepted domains this listener takes mail for from anonymous clients; unset: all of them. Mail for another accepted domain is refused with event 1701.")
    public_addresses: list[str] = Field(default_factory=list, description="The addresses the Internet sees for this listener (NAT, firewall or proxy in front). Used by doctor for MX and block list checks (KB scenario 6).")
    proxy_protocol: Bool = Field(False, description="Expect a PROXY protocol header (v1 or v2) from the addresses in proxy_from; the address it reports is the client everywhere after.")
    proxy_from: list[str] = Field(default_factory=list, description="Addresses / CIDRs of proxies allowed to send a PROXY header. Others are refused.")
    limits: Limits = Field(default_factory=Limits, description="Protocol limits.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", v):
            raise ValueError(f"listener name {v!r}: use 1-32 lower-case letters, digits, '-' or '_'")
        return v

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip("[]")))
        except ValueError:
            raise ValueError(f"{v!r} is not an IPv4 or IPv6 address (write 0.0.0.0 or :: for all addresses)") from None

    @field_validator("public_addresses")
    @classmethod
    def _check_public(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            try:
                out.append(str(ipaddress.ip_address(item)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
        return out

    @field_validator("proxy_from")
    @classmethod
    def _check_proxy_from(cls, v: list[str]) -> list[str]:
        return [parse_network(x).with_prefixlen for x in v]

    @field_validator("accept_domains")
    @classmethod
    def _check_accept_domains(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [normalise_domain(d) for d in v]

    @model_validator(mode="after")
    def _check_tls(self) -> Listener:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("set both certificate and key, or neither (a self-signed pair is generated)")
        if self.proxy_protocol and not self.proxy_from:
            raise ValueError("proxy_protocol is on but proxy_from is empty: list the proxies' addresses")
        if self.require_tls and self.tls == TlsMode.NONE:
            raise ValueError('require_tls needs tls = "starttls" or "implicit"')
        if self.auth and self.tls == TlsMode.NONE and not self.auth_plaintext:
            raise ValueError('auth is set but tls = "none": AUTH would never be offered; enable TLS or set auth_plaintext = true')
        return self


class Domain(_Model):
    """An accepted domain (Exchange: recipient policy / SMTP connector address space)."""

    name: str = Field(description="The domain, e.g. example.com (IDN allowed; stored in A-label form).")
    kind: DomainKind = Field(DomainKind.AUTHORITATIVE, description='"authoritative": every address is ours, unknown recipients refused (550 5.1.1). "internal-relay": deliver to a local mailbox when one exists, else forward (shared address space, KB 321721). "external-relay": accept for anyone, never deliver locally, forward on the route.')
    route: str | None = Field(None, description="Name of the [[route]] used to forward mail for this domain (internal-relay and external-relay). Unset: the route whose `domains` match, else the default route.")

    @field_validator("name")
    @classmethod
    def _check(cls, v: str) -> str:
        return normalise_domain(v)


class Mailbox(_Model):
    """A mailbox (Exchange: a user with proxy addresses).  Passwords live in the user database
    (``relaywarden user passwd``) or here as an argon2 ``password_hash``."""

    address: str = Field(description="Primary address, also the login name for SMTP AUTH.")
    aliases: list[str] = Field(default_factory=list, description="Other addresses delivered to this mailbox (proxy addresses).")
    password_hash: str | None = Field(None, description="argon2 hash (from `relaywarden user hash`); never a plaintext password.")
    relay: Bool = Field(True, description="May relay after authenticating (where the listener allows authenticated relay). False suspends the relay right (event 1710).")
    enabled: Bool = Field(True, description="A disabled mailbox receives nothing (550 5.2.1) and cannot authenticate.")

    @field_validator("address", "aliases")
    @classmethod
    def _check_addr(cls, v):
        items = [v] if isinstance(v, str) else v
        out = []
        for item in items:
            local, at, domain = item.rpartition("@")
            if not at or not local or not domain:
                raise ValueError(f"{item!r} is not an address of the form local@domain")
            out.append(f"{local}@{normalise_domain(domain.lower())}")
        return out[0] if isinstance(v, str) else out

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("$argon2"):
            raise ValueError("password_hash must be an argon2 hash ($argon2id$...), never a plaintext password; make one with `relaywarden user hash`")
        return v


class Route(_Model):
    """How mail leaves for a set of destination domains (Exchange: SMTP connector / smarthost)."""

    name: str = Field(description="Route name, referenced by domains and shown in events.")
    domains: list[str] = Field(default_factory=lambda: ["*"], description='Destination domains: exact ("example.org"), wildcard ("*.example.org") or "*" for the default route.')
    kind: RouteKind = Field(RouteKind.MX, description='"mx": look up the MX records of the destination; "smarthost": send to `hosts` in order.')
    hosts: list[str] = Field(default_factory=list, description='Smarthosts as "host" or "host:port" (port 25 by default).')
    port: Int = Field(25, ge=1, le=65535, description="Port of the MX hosts of a kind = \"mx\" route (25 on the Internet; another port for tests or a private network).")
    tls: RouteTls = Field(RouteTls.OPPORTUNISTIC, description='"none", "opportunistic" (STARTTLS when offered) or "required" (verified certificate, else defer).')
    ca_file: str | None = Field(None, description="CA bundle for verifying the next hop when tls = required (default: the system's).")
    username: str | None = Field(None, description="Login for destinations that require authentication (KB scenario 5: 530 / 5.7.3).")
    password_file: str | None = Field(None, description="File holding the password for `username` (kept out of this file).")

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, v: list[str]) -> list[str]:
        out = []
        for item in v:
            if item == "*":
                out.append(item)
            elif item.startswith("*."):
                out.append("*." + normalise_domain(item[2:]))
            else:
                out.append(normalise_domain(item))
        return out

    @model_validator(mode="after")
    def _check_kind(self) -> Route:
        if self.kind == RouteKind.SMARTHOST and not self.hosts:
            raise ValueError('kind = "smarthost" needs hosts = ["host:port", ...]')
        if (self.username is None) != (self.password_file is None):
            raise ValueError("set both username and password_file, or neither")
        return self


class Dns(_Model):
    """The resolver used for MX, reverse DNS and block list look-ups."""

    nameservers: list[str] = Field(default_factory=list, description="Nameserver addresses; empty: the system's (/etc/resolv.conf).")
    port: Int = Field(53, ge=1, le=65535, description="Nameserver port.")
    timeout: Float = Field(5.0, gt=0, description="Seconds per query.")


class Delivery(_Model):
    """How queued mail leaves: concurrency, retries, lifetime, delay notices."""

    enabled: Bool = Field(True, description="Deliver queued mail. Off: the server only accepts and queues (for maintenance).")
    max_concurrency: Int = Field(50, ge=1, le=10_000, description="Deliveries in progress at once, in all.")
    max_per_destination: Int = Field(10, ge=1, le=1000, description="Deliveries in progress at once to one next hop (route or domain).")
    min_backoff: Float = Field(300.0, gt=0, description="Seconds before the first retry after a temporary failure; doubled after each further failure.")
    max_backoff: Float = Field(14400.0, gt=0, description="Longest wait between two attempts (seconds).")
    max_lifetime: Float = Field(5 * 86400.0, gt=0, description="Seconds a message may stay in the queue; then its recipients fail with 5.4.7 and an NDR goes to the sender.")
    delay_warning: Float | None = Field(4 * 3600.0, description="Seconds after which a delay notice (DSN 'delayed') is sent once per recipient that asked for it; unset: never.")
    connect_timeout: Float = Field(30.0, gt=0, description="Seconds to wait for a TCP connection to a next hop.")
    command_timeout: Float = Field(300.0, gt=0, description="Seconds to wait for each reply of a next hop (RFC 5321 4.5.3.2 suggests 2-10 minutes).")
    poll_interval: Float = Field(1.0, gt=0, le=60, description="Seconds between looks at the queue for due mail (new mail is picked up at once).")
    helo_name: str | None = Field(None, description="Name sent in EHLO to next hops; unset: server.hostname.")
    mailbox_root: str | None = Field(None, description="Directory of the local Maildirs; unset: DATA_DIR/mail.")


class Doctor(_Model):
    """What `relaywarden doctor` checks against: block lists and the thresholds of its account and
    queue checks (KB 895853: open relay, compromised accounts, spam in the queue, block lists)."""

    dnsbl_zones: list[str] = Field(
        default_factory=lambda: ["zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org", "psbl.surriel.com"],
        description="DNS block lists the public addresses are looked up in (IPv4 and IPv6).")
    window_hours: Float = Field(24.0, gt=0, description="The recent period the account and queue checks look at, in hours.")
    baseline_days: Float = Field(14.0, gt=0, description="The history an account's recent sending is compared with, in days.")
    burst_factor: Float = Field(10.0, gt=1, description="An account sending more than this many times its own baseline (recipients, external domains, client addresses) is flagged.")
    min_recipients: Int = Field(200, ge=1, description="Recent recipients below which an account is never flagged as a burst (small senders vary a lot).")
    failed_logins: Int = Field(20, ge=1, description="Failed logins before a success that make the success suspect (password guessing).")
    queue_recipients_per_message: Int = Field(50, ge=1, description="A queued message with more recipients than this looks like spam.")
    queue_share: Float = Field(0.5, gt=0, le=1, description="One client address or user owning more than this share of the queue is flagged.")

    @field_validator("dnsbl_zones")
    @classmethod
    def _check_zones(cls, v: list[str]) -> list[str]:
        return [normalise_domain(z) for z in v]


class Server(_Model):
    """Server-wide settings."""

    hostname: str = Field("relaywarden.localdomain", description="Name in the greeting, EHLO reply, Received headers and NDRs (should match the reverse DNS of the public address).")
    allow_open_relay: Bool = Field(False, description="Start even if a listener lets unauthenticated clients relay to any domain. Never set this on a server reachable from the Internet; it is logged as a warning at every start.")
    workers: Int = Field(1, ge=1, le=64, description="Processes that accept mail, each with its own event loop, sharing the listeners (SO_REUSEPORT), the queue and the event log. With more than one, delivery runs in one more process of its own. Connection limits hold for the whole server: the workers share their counts.")
    auth_failure_delay: Float = Field(1.0, ge=0, le=30, description="Seconds to wait before answering a failed AUTH (slows password guessing).")
    event_log_max_bytes: Int = Field(50_000_000, ge=10_000, description="Rotate the event log at this size.")
    event_log_backups: Int = Field(10, ge=1, le=1000, description="Rotated event logs kept.")


class Config(_Model):
    """A whole relaywarden configuration."""

    server: Server = Field(default_factory=Server)
    listener: list[Listener] = Field(default_factory=list, description="The listeners ([[listener]] tables).")
    domain: list[Domain] = Field(default_factory=list, description="Accepted domains ([[domain]] tables).")
    mailbox: list[Mailbox] = Field(default_factory=list, description="Mailboxes ([[mailbox]] tables).")
    route: list[Route] = Field(default_factory=list, description="Routes ([[route]] tables).")
    dns: Dns = Field(default_factory=Dns)
    delivery: Delivery = Field(default_factory=Delivery)
    doctor: Doctor = Field(default_factory=Doctor)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Config:
        # The loader runs cross_problems itself (context "defer_cross_checks") to give each
        # problem its key and line; anyone else validating a Config gets the first one here.
        if not (info.context or {}).get("defer_cross_checks"):
            problems = cross_problems(self)
            if problems:
                raise ValueError(problems[0][1])
        return self

    def listener_named(self, name: str) -> Listener:
        for l in self.listener:
            if l.name == name:
                return l
        raise KeyError(name)


KeyPath = tuple


def cross_problems(config: Config) -> list[tuple[KeyPath, str]]:
    """What no single key shows: names used twice, listeners that would share a socket,
    references to what does not exist. Each problem with the key it is about and the fix."""
    problems: list[tuple[KeyPath, str]] = []
    if not config.listener:
        problems.append(((), "no [[listener]] is configured: add at least one"))
    for what, items in (("listener", config.listener), ("domain", config.domain), ("route", config.route)):
        first: dict[str, int] = {}
        for index, item in enumerate(items):
            if item.name in first:
                problems.append(((what, index, "name"),
                                 f"{what} name {item.name!r} is used twice (also {what}[{first[item.name]}]): "
                                 f"give each [[{what}]] its own name" if what != "domain" else
                                 f"domain {item.name!r} is listed twice (also domain[{first[item.name]}]): "
                                 "keep one [[domain]] table for it"))
            first.setdefault(item.name, index)
    for index, listener in enumerate(config.listener):
        for other_index, other in enumerate(config.listener[:index]):
            if other.port == listener.port and _same_socket(other.address, listener.address):
                problems.append((("listener", index, "port"),
                                 f"listener {listener.name} ({listener.address} port {listener.port}) would listen "
                                 f"on the socket of listener {other.name} ({other.address} port {other.port}, "
                                 f"listener[{other_index}]): give it another port or a different address"))
                break
    seen: dict[str, str] = {}
    for m_index, mailbox in enumerate(config.mailbox):
        for a_index, address in enumerate((mailbox.address, *mailbox.aliases)):
            key = address.casefold()
            if key in seen:
                where = ("mailbox", m_index, "address") if a_index == 0 else ("mailbox", m_index, "aliases", a_index - 1)
                problems.append((where, f"address {address} belongs to two mailboxes ({seen[key]} and "
                                        f"{mailbox.address}): an address belongs to one mailbox; remove it from one"))
            seen.setdefault(key, mailbox.address)
    route_names = {r.name for r in config.route}
    for index, domain in enumerate(config.domain):
        if domain.route is not None and domain.route not in route_names:
            problems.append((("domain", index, "route"),
                             f"domain {domain.name}: route {domain.route!r} does not exist: add a [[route]] "
                             f"named {domain.route!r} or use one of {sorted(route_names) or 'none (there is no [[route]])'}"))
    domains = {d.name for d in config.domain}
    for index, listener in enumerate(config.listener):
        for d_index, name in enumerate(listener.accept_domains or []):
            if name not in domains:
                problems.append((("listener", index, "accept_domains", d_index),
                                 f"listener {listener.name}: accept_domains lists {name}, which is not a [[domain]]: "
                                 f"add a [[domain]] named {name} or remove it from accept_domains"))
    return problems


def _same_socket(a: str, b: str) -> bool:
    """Whether two listen addresses on one port would take the same socket: equal, or one is the
    wildcard of the other's family (0.0.0.0 covers every IPv4 address, :: every IPv6 one)."""
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia == ib:
        return True
    if ia.version != ib.version:
        return False
    return ia.is_unspecified or ib.is_unspecified

