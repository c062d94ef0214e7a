"""The event catalog and the event log.

This module owns every event id relaywarden can log, what each one means to an administrator
(severity, title, cause and fix), and the writer and reader of the event log file
(``events.jsonl``, one JSON record per line, rotated by size).

Event id ranges (an id is never renumbered; new events take the next free number in their range):

* 1000-1099  server, listeners and configuration
* 1100-1199  connections and SMTP sessions: connection list, limits, TLS, PROXY protocol,
  protocol errors, the per-session summary line
* 1700-1799  receiving mail: authentication and the relay decision for each recipient.
  The ids that Microsoft KB 895853 names (1701, 1707, 1708, 1709, 1710) keep their numbers
  for the conditions the KB ties them to.
* 3000-3099  the queue
* 4000-4099  NDRs (delivery status notifications); 4001 as in the KB
* 7000-7099  outbound delivery; 7004 as in the KB

``python -m relaywarden.events`` prints the catalog as Markdown (``docs/events.md``).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

LOG_FILE_NAME = "events.jsonl"
LOCK_FILE_NAME = "events.lock"

ID_RANGES: tuple[tuple[int, int, str], ...] = (
    (1000, 1099, "Server, listeners and configuration"),
    (1100, 1199, "Connections and SMTP sessions"),
    (1700, 1799, "Receiving mail: authentication and the relay decision"),
    (3000, 3099, "The queue"),
    (4000, 4099, "NDRs (delivery status notifications)"),
    (7000, 7099, "Outbound delivery"),
)

# Keys of a record besides "fields"; read_events filters on these at the top level.
TOP_LEVEL_KEYS = ("listener", "client", "user", "session", "message_id")


class Severity(StrEnum):
    """How much attention an event needs; WARNING and ERROR reach the disk at once."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventId(IntEnum):
    """Stable event numbers. Never renumber: administrators grep and alert on them."""

    # 1000-1099 server, listeners and configuration
    SERVER_STARTED = 1001
    SERVER_STOPPED = 1002
    OPEN_RELAY_ALLOWED = 1003
    LISTENER_STARTED = 1004
    CONFIG_WARNING = 1005
    # 1100-1199 connections and sessions
    CONNECTION_REFUSED = 1101
    CONNECTION_LIMIT = 1102
    TLS_HANDSHAKE_FAILED = 1103
    PROXY_REFUSED = 1104
    PROTOCOL_ERROR = 1105
    SMUGGLING_REFUSED = 1106
    PIPELINING_BEFORE_STARTTLS = 1107
    LIMIT_EXCEEDED = 1108
    SESSION_SUMMARY = 1109
    # 1700-1799 authentication and the relay decision (KB 895853 numbers kept)
    WRONG_LISTENER = 1701
    RECIPIENT_DOMAIN_NOT_ACCEPTED = 1707
    AUTH_SUCCEEDED = 1708
    RELAY_DENIED = 1709
    RELAY_DENIED_AUTHENTICATED = 1710
    AUTH_FAILED = 1711
    AUTH_REFUSED_PLAINTEXT = 1712
    AUTHENTICATION_REQUIRED = 1713
    RECIPIENT_UNKNOWN = 1720
    RECIPIENT_ACCEPTED = 1721
    ADDRESS_REFUSED = 1722
    POLICY_ERROR = 1723
    TLS_REQUIRED = 1724
    # 3000-3099 queue
    MESSAGE_QUEUED = 3001
    QUEUE_ERROR = 3002
    QUEUE_CHANGED = 3003
    # 4000-4099 NDRs
    NDR_GENERATED = 4001
    # 7000-7099 delivery
    DELIVERED = 7001
    DEFERRED = 7002
    DELIVERY_FAILED = 7003
    REMOTE_ERROR = 7004


@dataclass(frozen=True)
class EventDef:
    """One catalog entry: what the event means and what to do about it.

    ``fields`` names the structured fields an emitter sets in the record's ``fields`` object
    (besides the top-level listener, client, user, session and message_id).
    """

    id: EventId
    severity: Severity
    title: str
    explanation: str
    fields: tuple[str, ...] = ()


_I, _W, _E = Severity.INFO, Severity.WARNING, Severity.ERROR

_DEFINITIONS: tuple[EventDef, ...] = (
    EventDef(
        EventId.SERVER_STARTED, _I, "Server started",
        "The relaywarden server started with the configuration named in the record. "
        "No action is needed; the record marks where a run begins when you read the log.",
        ("version", "config_file", "listeners", "pid"),
    ),
    EventDef(
        EventId.SERVER_STOPPED, _I, "Server stopped",
        "The server stopped and closed its listeners; the reason says whether an administrator "
        "asked for it or a fatal error caused it. If the stop was not planned, read the events "
        "just before this one for the error, fix it and start the server again.",
        ("reason", "uptime_seconds"),
    ),
    EventDef(
        EventId.OPEN_RELAY_ALLOWED, _W, "Open relay allowed by configuration",
        "The configuration lets a listener relay mail from anonymous clients to any domain, "
        "and it says so explicitly with allow_open_relay = true. An open relay is found by "
        "spammers within hours, fills the queue with their mail and puts the server's addresses "
        "on block lists. Unless this listener is reachable only from machines you trust, remove "
        "allow_open_relay and restrict the relay list of the listener named in the record to "
        "the addresses that must relay. This warning is logged at every start on purpose.",
        ("config_file", "line", "rule"),
    ),
    EventDef(
        EventId.LISTENER_STARTED, _I, "Listener started",
        "A listener is accepting connections on the address and port in the record, with the "
        "TLS mode, anonymous access and PROXY protocol settings shown. Compare the public "
        "address with what DNS publishes in the MX records of your accepted domains; if they "
        "differ, mail from the Internet reaches another listener or none (KB 895853 scenarios "
        "3 and 6).",
        ("address", "port", "tls_mode", "anonymous", "public_address", "proxy_protocol"),
    ),
    EventDef(
        EventId.CONFIG_WARNING, _W, "Configuration warning",
        "A setting in the configuration is accepted but probably not what you want, for "
        "example a route without credentials for a destination that requires authentication, "
        "a certificate that expires soon or a relay list entry that covers a whole network. "
        "The record names the file, the line and the suggested fix; change the setting and "
        "reload the server.",
        ("config_file", "line", "setting", "problem", "fix"),
    ),
    EventDef(
        EventId.CONNECTION_REFUSED, _I, "Connection refused by the connection list",
        "A client connected from an address that the listener's connection list does not "
        "grant, so the server answered 554 and closed the connection. If the client is "
        "legitimate, add its address or network to the connection list of the listener named "
        "in the record; otherwise no action is needed.",
        ("rule", "config_file", "line"),
    ),
    EventDef(
        EventId.CONNECTION_LIMIT, _W, "Connection limit reached",
        "A new connection was turned away with 421 because the listener already has its "
        "maximum number of connections, or the client already has its maximum number of "
        "connections to it. Many of these from one client usually mean a misbehaving sender "
        "or an attack; many from different clients mean the limit is too low for the load. "
        "Raise max_connections or max_connections_per_client on the listener if the traffic "
        "is legitimate.",
        ("scope", "limit", "current"),
    ),
    EventDef(
        EventId.TLS_HANDSHAKE_FAILED, _W, "TLS handshake failed",
        "A client started TLS (with STARTTLS or on an implicit-TLS port) and the handshake "
        "failed, so no mail was exchanged on that connection. The error in the record says "
        "why: an expired or wrong certificate on the listener, a client that offers only "
        "protocol versions or ciphers the listener does not allow, or a scanner that is not "
        "an SMTP client at all. Renew or correct the certificate if it is the cause; if an "
        "old but legitimate device is refused, give it a listener with a compatible TLS "
        "setting on an internal address rather than weakening the public one.",
        ("tls_mode", "phase", "error"),
    ),
    EventDef(
        EventId.PROXY_REFUSED, _W, "PROXY protocol header refused",
        "The listener expects a PROXY protocol header and the connection either came from an "
        "address that is not one of the listener's trusted proxies or sent a header that is "
        "missing or malformed, so the connection was closed. If a new load balancer or "
        "firewall sits in front of the listener, add its address to the listener's trusted "
        "proxies; if nothing sits in front of it, turn the PROXY protocol off for the listener.",
        ("peer", "reason"),
    ),
    EventDef(
        EventId.PROTOCOL_ERROR, _I, "SMTP protocol error",
        "The client sent a command that is unknown, out of sequence or has bad syntax, and "
        "the server answered with the error in the record. An occasional error is normal on "
        "the Internet. Repeated errors from one of your own applications or devices mean it "
        "does not speak SMTP correctly; check its SMTP settings against the reply shown.",
        ("command", "reply"),
    ),
    EventDef(
        EventId.SMUGGLING_REFUSED, _W, "Message refused: bare LF or bare CR in DATA",
        "The message data contained a line ending that is not CR LF (a bare LF or a bare CR). "
        "Such line endings are used for SMTP smuggling, where a second, forged message is "
        "hidden inside the first, so the server refused the message. A legitimate sender that "
        "triggers this must be fixed to send CR LF line endings as RFC 5321 requires.",
        ("sequence", "reply"),
    ),
    EventDef(
        EventId.PIPELINING_BEFORE_STARTTLS, _W, "Commands pipelined after STARTTLS refused",
        "The client sent more commands in the same packet as STARTTLS. Anything sent before "
        "the TLS handshake is unprotected and could have been injected by an attacker, so the "
        "server refused it with 554 5.5.1 and ended the session. A correct client waits for the 220 reply "
        "before the handshake; if one of your own clients does this, update it.",
        ("reply",),
    ),
    EventDef(
        EventId.LIMIT_EXCEEDED, _W, "Session limit exceeded",
        "The client went over one of the listener's limits: line length, message size, number "
        "of recipients, number of errors in a session, or a timeout, as named in the record. "
        "The server answered with the reply shown and, for errors and timeouts, closed the "
        "connection. If a legitimate sender needs more, raise that limit on the listener; "
        "many of these from one client usually mean abuse.",
        ("limit", "value", "maximum", "reply"),
    ),
    EventDef(
        EventId.SESSION_SUMMARY, _I, "Session summary",
        "One line per SMTP session when it ends: client, listener, TLS version, authenticated "
        "user, accepted and total recipients, messages queued and the last refusal the client "
        "received. This is the line to grep first when someone asks why their mail was "
        "refused; the session id leads to every other event of the same session.",
        ("tls", "accepted", "refused", "messages", "last_refusal", "duration_seconds"),
    ),
    EventDef(
        EventId.WRONG_LISTENER, _W, "Mail arrived at a listener that does not serve the domain",
        "A client delivered mail for a domain to a listener that does not accept mail for it. "
        "This is what happens when an MX record, or the address a firewall or NAT publishes, "
        "points at the wrong listener (KB 895853 scenarios 3 and 6). Check that the MX records "
        "of the domain resolve to the public address of the listener that serves the domain, "
        "and that the firewall or proxy forwards to that listener; relaywarden doctor checks "
        "both.",
        ("domain", "rcpt_to", "serving_listeners"),
    ),
    EventDef(
        EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED, _W,
        "Mailbox address in a domain that is not accepted",
        "The recipient address belongs to a mailbox (as its primary address or an alias), but "
        "its domain is not one of the server's accepted domains, so the mail was treated as "
        "relay and refused (KB 895853 scenario 4). Add the domain named in the record as an "
        "accepted domain, or remove the address from the mailbox if the domain is no longer "
        "yours.",
        ("rcpt_to", "mailbox", "domain"),
    ),
    EventDef(
        EventId.AUTH_SUCCEEDED, _I, "SMTP authentication succeeded",
        "The client authenticated as the user in the record with the method shown. Every mail "
        "relayed for an authenticated user can be traced back to one of these events. If an "
        "account relays mail you did not expect, its AUTH_SUCCEEDED events show from which "
        "addresses it logged in; suspend its relay right and reset its password if it is "
        "compromised.",
        ("method",),
    ),
    EventDef(
        EventId.RELAY_DENIED, _W, "Relay denied: client not on the relay list and not authenticated",
        "The recipient's domain is not one this server accepts mail for, so delivering it "
        "would be relaying, and the client is neither allowed by the listener's relay list nor "
        "authenticated. The server answered 550 5.7.1. If the client is one of your "
        "applications or devices, add its address to the relay list of the listener it uses, "
        "or have it authenticate on the submission listener. If the recipient's domain should "
        "be yours, add it as an accepted domain. A stranger trying to relay needs no action.",
        ("mail_from", "rcpt_to", "domain", "relay_list_mode", "reply"),
    ),
    EventDef(
        EventId.RELAY_DENIED_AUTHENTICATED, _W, "Relay denied to an authenticated user",
        "The client authenticated, but relay was still refused with 550 5.7.1: either the "
        "listener does not let authenticated users relay (allow_authenticated is off, KB "
        "895853 scenario 1) or the user's relay right is suspended. The reason in the record "
        "says which. Turn allow_authenticated on for the listener, or restore the user's relay "
        "right once you have checked that the account is not compromised.",
        ("mail_from", "rcpt_to", "domain", "reason", "reply"),
    ),
    EventDef(
        EventId.AUTH_FAILED, _W, "SMTP authentication failed",
        "A client tried to authenticate with a user name and a wrong password, an unknown user "
        "or a disabled mailbox, and the server answered 535 5.7.8. A few failures are typos. "
        "Many failures from one address are password guessing: block that address with the "
        "connection list. Many failures for one user from many addresses mean the account is "
        "targeted; make sure its password is strong.",
        ("method", "reason"),
    ),
    EventDef(
        EventId.AUTH_REFUSED_PLAINTEXT, _W, "Authentication refused without TLS",
        "A client tried to authenticate before starting TLS, which would send the password "
        "in clear text, so the server refused with 538 5.7.11. Configure the client to use "
        "STARTTLS, or implicit TLS on port 465. Allow plaintext authentication on the listener "
        "only when the network between client and server is trusted.",
        ("method",),
    ),
    EventDef(
        EventId.AUTHENTICATION_REQUIRED, _W, "Authentication required: anonymous access is off",
        "The listener does not allow anonymous clients and this client did not authenticate, "
        "so the server answered 530 5.7.0. On a listener that receives mail from the Internet "
        "this refuses all incoming mail (KB 895853 scenario 2): turn anonymous access on for "
        "that listener. On a submission listener it is expected; configure the client to "
        "authenticate.",
        ("command", "reply"),
    ),
    EventDef(
        EventId.RECIPIENT_UNKNOWN, _I, "Recipient unknown",
        "The recipient's domain is an authoritative accepted domain, but no enabled mailbox "
        "has this address, so the server answered 550 5.1.1. If the address should exist, "
        "create the mailbox or add the address as an alias of one. If the domain is shared "
        "with another mail system, make it an internal-relay domain so that unknown addresses "
        "are forwarded there.",
        ("rcpt_to", "domain"),
    ),
    EventDef(
        EventId.RECIPIENT_ACCEPTED, _I, "Recipient accepted",
        "The server accepted a recipient for local delivery, for forwarding or as relay. The "
        "record keeps the inputs of the decision (listener, client and PROXY-reported "
        "address, TLS, user, sender, recipient) and the rule that allowed it with its file and "
        "line, so the decision can be replayed under a changed configuration. No action is "
        "needed; an unexpected relay decision points at the rule to tighten.",
        ("proxy_client", "tls", "mail_from", "rcpt_to", "decision", "rule", "config_file",
         "line"),
    ),
    EventDef(
        EventId.ADDRESS_REFUSED, _W, "Address refused: bad syntax or routing trick",
        "A MAIL FROM or RCPT TO address was refused because it is not a valid RFC 5321 address "
        "or uses a routing trick that could make the server relay: a percent hack "
        "(user%other@ours), a bang path, a source route (@ours:user@other), a quoted local part "
        "containing @, or an address literal. Spammers probe for these; no action is needed. "
        "If one of your own applications sends such addresses, correct its configuration.",
        ("command", "address", "reason", "reply"),
    ),
    EventDef(
        EventId.POLICY_ERROR, _E, "Relay decision failed closed",
        "The relay decision for a recipient raised an internal error, so the recipient was "
        "refused with 451 4.3.0 (fail closed: an error never accepts). The sender retries. "
        "The record names the error; it usually means configuration or user data the decision "
        "could not handle, such as a damaged user database. Run relaywarden check-config and "
        "relaywarden explain with the same inputs, and report the error if they pass.",
        ("error", "sender", "recipient"),
    ),
    EventDef(
        EventId.TLS_REQUIRED, _I, "TLS required before MAIL",
        "A client sent MAIL without STARTTLS on a listener with require_tls = true and was "
        "answered 530 5.7.0. Clients that support STARTTLS retry with it; one that does not "
        "cannot use this listener. If an old device must send here, give it a listener "
        "without require_tls and with a relay list entry for its address only.",
        ("reply",),
    ),
    EventDef(
        EventId.MESSAGE_QUEUED, _I, "Message queued",
        "A message was written to the queue and the client received 250: from now on the "
        "server is responsible for delivering it or returning an NDR. The top-level "
        "message_id is the queue id; the Message-ID header, if any, is in the fields.",
        ("mail_from", "recipients", "size", "header_message_id"),
    ),
    EventDef(
        EventId.QUEUE_ERROR, _E, "Queue error",
        "The server could not write or read the queue, so the message in the record was "
        "refused with a temporary error or its delivery is stuck. The error names the cause, "
        "usually a full disk or wrong permissions on the queue directory. Free disk space or "
        "correct the permissions; senders retry temporary errors by themselves.",
        ("operation", "path", "error"),
    ),
    EventDef(
        EventId.QUEUE_CHANGED, _W, "Queue changed by an operator",
        "An administrator held, released, retried or deleted queued messages with relaywarden "
        "queue. The record says who, which operation, how many messages and how they were "
        "chosen (filters or ids), so that a deleted flood or a released hold can be traced "
        "later. No action is needed; if nobody meant to do this, check who has access to the "
        "data directory.",
        ("operation", "operator", "changed", "selected", "ids", "filters"),
    ),
    EventDef(
        EventId.NDR_GENERATED, _W, "NDR generated",
        "The server gave up on a recipient and sent a delivery status notification (NDR) to "
        "the envelope sender, with the status and the cause in the record. Many NDRs to "
        "senders outside your domains, with 5.0.0 or 5.7.1, mean the server is relaying spam "
        "(an open relay or a compromised account): run relaywarden doctor. For a single NDR, "
        "the status and remote reply say what to fix.",
        ("recipient", "status", "cause", "sent_to", "remote_host"),
    ),
    EventDef(
        EventId.DELIVERED, _I, "Delivered",
        "The message was delivered to the recipient: handed to the remote host that answered "
        "with the reply shown, or stored in a local mailbox. No action is needed.",
        ("recipient", "route", "remote_host", "reply", "tls", "attempt"),
    ),
    EventDef(
        EventId.DEFERRED, _W, "Delivery deferred",
        "Delivery to the recipient failed with a temporary error and will be tried again at "
        "the time in the record. Occasional deferrals (greylisting, a busy remote host) need "
        "no action. If deferrals to one destination persist, check the route's host, DNS "
        "and network access to port 25 of the remote host shown.",
        ("recipient", "route", "remote_host", "status", "reply", "attempt", "next_attempt"),
    ),
    EventDef(
        EventId.DELIVERY_FAILED, _E, "Delivery failed",
        "Delivery to the recipient failed permanently, or the message stayed in the queue "
        "longer than allowed, and the server returns it to the sender with an NDR. The status "
        "and remote reply say why. A 5.7.3 or 530 reply from the remote host means it requires "
        "authentication (KB 895853 scenario 5): give the route credentials.",
        ("recipient", "route", "remote_host", "status", "reply"),
    ),
    EventDef(
        EventId.REMOTE_ERROR, _W, "Remote host answered with an error",
        "During delivery, the remote host answered an SMTP command with the error in the "
        "record. The command and the reply show who refused what: a refused MAIL FROM usually "
        "means the sender's domain or this server's address is blocked; a refused RCPT TO "
        "means an unknown recipient or a relay the remote host will not do for us; 530 or "
        "5.7.3 means the remote host requires authentication. Many of these together with "
        "NDRs for unknown senders mean the server is relaying spam.",
        ("remote_host", "command", "reply"),
    ),
)

CATALOG: Mapping[EventId, EventDef] = MappingProxyType({d.id: d for d in _DEFINITIONS})


# ---------------------------------------------------------------------------------------------
# Writing the event log
# ---------------------------------------------------------------------------------------------

_MAX_NESTING = 8


def _utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not break logging
        return f"<unprintable {type(value).__name__}>"


_PLAIN = frozenset({str, int, bool, type(None)})


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Return ``value`` as plain JSON types; anything else becomes its str()."""
    if type(value) in _PLAIN or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _safe_str(value)
    if depth >= _MAX_NESTING:
        return _safe_str(value)
    if isinstance(value, Mapping):
        return {_safe_str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    return _safe_str(value)


_second_text: tuple[int, str] = (-1, "")


def now_text() -> str:
    """``format_time`` of the present moment, cheaply: the text of the current second is kept."""
    global _second_text
    now = time.time()
    second = int(now)
    cached = _second_text
    if cached[0] != second:
        cached = _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((now - second) * 1000):03d}Z"


# What every record of an event starts with (id, name, severity) and whether it is flushed at once.
_HEADS: dict[EventId, tuple[int, str, str, bool]] = {
    d.id: (int(d.id), d.id.name, d.severity.value, d.severity is not Severity.INFO) for d in _DEFINITIONS}


def _record(event: EventId, moment: str, text: str, listener: Any, client: Any, user: Any,
            session: Any, message_id: Any, fields: Mapping[str, Any]) -> dict:
    """The record ``EventLog.emit`` writes: top-level keys whose value is None are left out;
    anything not a JSON type becomes one (``_jsonable``)."""
    number, name, severity, _ = _HEADS[event]
    record: dict[str, Any] = {"time": moment, "id": number, "name": name, "severity": severity}
    # the five top-level keys, in this order, when set (almost always strings: no walk)
    if listener is not None:
        record["listener"] = listener if type(listener) is str else _jsonable(listener)
    if client is not None:
        record["client"] = client if type(client) is str else _jsonable(client)
    if user is not None:
        record["user"] = user if type(user) is str else _jsonable(user)
    if session is not None:
        record["session"] = session if type(session) is str else _jsonable(session)
    if message_id is not None:
        record["message_id"] = message_id if type(message_id) is str else _jsonable(message_id)
    record["text"] = text if type(text) is str else _safe_str(text)
    record["fields"] = _plain_fields(fields)
    return record


def _plain_fields(fields: Mapping[str, Any]) -> dict:
    """``fields`` as JSON types; the common case (strings, numbers, lists of strings) is copied
    without walking each value."""
    out = {}
    for key, value in fields.items():
        kind = type(value)
        if kind in _PLAIN or (kind is list and all(type(v) is str for v in value)):
            out[key if type(key) is str else _safe_str(key)] = value
        else:
            out[key if type(key) is str else _safe_str(key)] = _jsonable(value, 1)
    return out


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class EventLog:
    """Appends event records as JSON lines to ``directory/events.jsonl``, rotated by size.

    Records are buffered in memory and written by ``flush()``: at once for WARNING and ERROR
    events, when the buffer grows past 64 KiB, when an emit finds the last flush older than
    ``flush_interval`` seconds, at ``maybe_flush()`` (call it from a timer so an idle server
    still writes within ``flush_interval``) and at ``close()``. All methods are thread-safe.
    Emitting after ``close()`` reopens the file, so no late event is lost.
    """

    _BUFFER_LIMIT = 64 * 1024
    _KEEP_ON_ERROR = 10_000       # records kept in memory while the log cannot be written

    def __init__(self, directory: Path, *, max_bytes: int = 50_000_000, backups: int = 10,
                 echo: Callable[[dict], None] | None = None, flush_interval: float = 0.5,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if backups < 0:
            raise ValueError("backups must be zero or more")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOG_FILE_NAME
        self.max_bytes = max_bytes
        self.backups = backups
        self.flush_interval = flush_interval
        self._echo = echo
        self._clock = clock
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._file: Any = None  # io.FileIO while open
        self._size = 0
        self._last_flush = time.monotonic()
        self._last_error_report = -1e9
        self.dropped = 0              # records lost because the log could not be written

    # -- public API --------------------------------------------------------------------------

    def emit(self, event: EventId, /, *, text: str, listener: str | None = None,
             client: str | None = None, user: str | None = None, session: str | None = None,
             message_id: str | None = None, **fields: Any) -> dict:
        """Log one event and return its record (exactly what was written, as JSON types)."""
        if type(event) is not EventId:
            event = EventId(event)
        moment = now_text() if self._clock is _utc_now else format_time(self._clock())
        record = _record(event, moment, text, listener, client, user, session, message_id, fields)
        data = (_encode(record) + "\n").encode("utf-8", errors="backslashreplace")
        urgent = _HEADS[event][3]
        with self._lock:
            self._append_locked(data)
            if (urgent or self._buffered >= self._BUFFER_LIMIT
                    or time.monotonic() - self._last_flush >= self.flush_interval):
                self._flush_locked()
        if self._echo is not None:
            self._echo(record)
        return record

    def flush(self) -> None:
        """Write every buffered record to the file now."""
        with self._lock:
            self._flush_locked()

    def maybe_flush(self) -> bool:
        """Flush when the last flush is older than ``flush_interval``; True when it wrote."""
        with self._lock:
            if not self._buffer or time.monotonic() - self._last_flush < self.flush_interval:
                return False
            self._flush_locked()
            return True

    def close(self) -> None:
        """Flush and close the file. Safe to call twice."""
        with self._lock:
            self._flush_locked()
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals (call with the lock held) -------------------------------------------------

    def _open_locked(self) -> None:
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open on purpose
        self._size = self._file.seek(0, os.SEEK_END)
        if self._size and not self._ends_with_newline():
            # A crash tore the last line; start ours on a fresh line so it stays readable.
            self._write_all(b"\n")
            self._size += 1

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as reader:
            reader.seek(-1, os.SEEK_END)
            return reader.read(1) == b"\n"

    def _append_locked(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)

    def _flush_locked(self) -> None:
        """Write the buffer, rotating first when a record would take the file past max_bytes.

        Several processes (the server's workers, the operator's commands) may append to the same
        log: each flush holds an exclusive lock on ``events.lock``, reopens the file when another
        process has rotated it, and measures the file's size afresh; each record goes out whole
        in one ``write`` to a file opened for appending.
        """
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        records, self._buffer = self._buffer, []
        self._buffered = 0
        written = 0
        try:
            with open(self.directory / LOCK_FILE_NAME, "ab") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._reopen_if_rotated()
                piece: list[bytes] = []
                piece_size = 0
                for data in records:
                    if self._size + piece_size > 0 and self._size + piece_size + len(data) > self.max_bytes:
                        self._write_piece(piece)
                        written += len(piece)
                        piece, piece_size = [], 0
                        self._rotate_locked()
                    piece.append(data)
                    piece_size += len(data)
                self._write_piece(piece)
                written += len(piece)
        except OSError as exc:
            # A full disk or a broken log directory must never stop the mail: keep what was not
            # written (bounded), say so on stderr once a minute, and try again at the next flush.
            self._keep_unwritten(records[written:], exc)

    def _keep_unwritten(self, records: list[bytes], exc: OSError) -> None:
        if self._file is not None:      # reopened at the next flush, which ends a torn line first
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        kept = records[-self._KEEP_ON_ERROR:]
        self.dropped += len(records) - len(kept)
        self._buffer = kept + self._buffer
        self._buffered = sum(len(r) for r in self._buffer)
        now = time.monotonic()
        if now - self._last_error_report >= 60.0:
            self._last_error_report = now
            print(f"relaywarden: cannot write the event log in {self.directory}: {exc}; "
                  f"{len(self._buffer)} records kept in memory, {self.dropped} dropped so far",
                  file=sys.stderr, flush=True)

    def _write_piece(self, piece: list[bytes]) -> None:
        if piece:
            chunk = b"".join(piece)
            self._write_all(chunk)
            self._size += len(chunk)

    def _reopen_if_rotated(self) -> None:
        """Point at the current events.jsonl (another process may have rotated it) and learn its size."""
        if self._file is not None:
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(self._file.fileno()).st_ino:
                self._file.close()
                self._file = None
        if self._file is None:
            self._open_locked()
        else:
            self._size = os.fstat(self._file.fileno()).st_size

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            written = self._file.write(view)
            view = view[written:]

    def _rotate_locked(self) -> None:
        self._file.close()
        self._file = None
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self._backup_path(self.backups).unlink(missing_ok=True)
            for number in range(self.backups - 1, 0, -1):
                older = self._backup_path(number)
                if older.exists():
                    older.replace(self._backup_path(number + 1))
            self.path.replace(self._backup_path(1))
        self._open_locked()

    def _backup_path(self, number: int) -> Path:
        return self.directory / f"{LOG_FILE_NAME}.{number}"


# ---------------------------------------------------------------------------------------------
# Reading the event log
# ---------------------------------------------------------------------------------------------


def log_files(directory: Path) -> list[Path]:
    """The event log files in reading order: oldest backup first, the current file last."""
    directory = Path(directory)
    numbered: list[tuple[int, Path]] = []
    for candidate in directory.glob(f"{LOG_FILE_NAME}.*"):
        suffix = candidate.name[len(LOG_FILE_NAME) + 1:]
        if suffix.isdigit():
            numbered.append((int(suffix), candidate))
    files = [path for _, path in sorted(numbered, reverse=True)]
    current = directory / LOG_FILE_NAME
    if current.exists():
        files.append(current)
    return files


def _records_in(path: Path) -> Iterator[dict]:
    try:
        reader = open(path, "rb")  # noqa: SIM115 - closed below; the file may vanish first
    except FileNotFoundError:  # rotated away between listing and opening
        return
    with reader:
        for raw in reader:
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except ValueError:  # a torn line from a crash, or garbage
                continue
            if isinstance(record, dict):
                yield record


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _record_time(record: Mapping[str, Any]) -> datetime | None:
    try:
        return _as_utc(datetime.fromisoformat(record["time"]))
    except (KeyError, TypeError, ValueError):
        return None


def _value_matches(actual: Any, wanted: Any) -> bool:
    if actual == wanted:
        return True
    # Filters typed on a command line arrive as strings: "25" matches the number 25.
    return isinstance(wanted, str) and actual is not None and not isinstance(actual, str) \
        and json.dumps(actual) == wanted


def record_matches(record: Mapping[str, Any], *, ids: Collection[int] | None = None,
                   since: datetime | None = None, until: datetime | None = None,
                   **field_filters: Any) -> bool:
    """Whether one record passes the filters of ``read_events``."""
    if ids is not None and record.get("id") not in ids:
        return False
    if since is not None or until is not None:
        moment = _record_time(record)
        if moment is None:
            return False
        if since is not None and moment < _as_utc(since):
            return False
        if until is not None and moment >= _as_utc(until):
            return False
    fields = record.get("fields")
    if not isinstance(fields, Mapping):
        fields = {}
    for key, wanted in field_filters.items():
        actual = record.get(key) if key in TOP_LEVEL_KEYS else fields.get(key)
        if not _value_matches(actual, wanted):
            return False
    return True


def read_events(directory: Path, *, ids: Collection[int] | None = None,
                since: datetime | None = None, until: datetime | None = None,
                **field_filters: Any) -> Iterator[dict]:
    """Yield the records of the event log, oldest first, that pass every filter.

    ``since`` is inclusive and ``until`` exclusive (naive datetimes are taken as UTC).
    A filter named listener, client, user, session or message_id compares that top-level key;
    any other name compares the field of that name. Unreadable (torn) lines are skipped.
    """
    id_set = None if ids is None else {int(i) for i in ids}
    for path in log_files(directory):
        for record in _records_in(path):
            if record_matches(record, ids=id_set, since=since, until=until, **field_filters):
                yield record


# ---------------------------------------------------------------------------------------------
# The session summary line
# ---------------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')


def _summary_value(value: object) -> str:
    if value is None or value == "":
        return "-"
    text = _safe_str(value)
    if _NEEDS_QUOTES.search(text):
        return f'"{_escape(text)}"'
    return text


def session_summary_text(*, client: str | None, listener: str | None, tls: str | None,
                         user: str | None, accepted: int, refused: int,
                         last_refusal: str | None, messages: int) -> str:
    """The one line per session an administrator greps first (Haraka style).

    ``client=203.0.113.9 listener=mx tls=TLSv1.3 user=- rcpts=3/5 msgs=1 lr="550 5.7.1 ..."``
    where rcpts is accepted/total. Missing values are ``-``; lr is left out when nothing was
    refused. Values with spaces, quotes or control characters are quoted and escaped.
    """
    parts = [
        f"client={_summary_value(client)}",
        f"listener={_summary_value(listener)}",
        f"tls={_summary_value(tls)}",
        f"user={_summary_value(user)}",
        f"rcpts={accepted}/{accepted + refused}",
        f"msgs={messages}",
    ]
    if last_refusal:
        parts.append(f'lr="{_escape(last_refusal)}"')
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# The documentation page
# ---------------------------------------------------------------------------------------------


def _range_title(event: EventId) -> str:
    for low, high, title in ID_RANGES:
        if low <= event <= high:
            return title
    raise ValueError(f"event {event.name} ({int(event)}) is outside every documented id range")


def render_catalog_markdown() -> str:
    """The docs page: the id ranges, one table of all events, then a section per event."""
    lines = [
        "# Event catalog",
        "",
        "<!-- Generated by `python -m relaywarden.events > docs/events.md`; do not edit. -->",
        "",
        "relaywarden writes one JSON record per line to `events.jsonl` in its event log "
        "directory (rotated by size to `events.jsonl.1`, `.2`, ...). Each record has `time` "
        "(ISO 8601, UTC, milliseconds), `id`, `name`, `severity`, `text` (the cause in words) "
        "and `fields`, and when known `listener`, `client`, `user`, `session` and "
        "`message_id`. Ids are stable; the ones Microsoft KB 895853 names (1701, 1707, 1708, "
        "1709, 1710, 4001, 7004) keep their numbers for the conditions the KB ties them to.",
        "",
        "| Ids | Area |",
        "|---|---|",
    ]
    lines += [f"| {low}-{high} | {title} |" for low, high, title in ID_RANGES]
    lines += ["", "## All events", "", "| Id | Name | Severity | Title |", "|---|---|---|---|"]
    ordered = sorted(CATALOG.values(), key=lambda d: d.id)
    for definition in ordered:
        lines.append(f"| [{int(definition.id)}](#event-{int(definition.id)}) | "
                     f"`{definition.id.name}` | {definition.severity.value} | "
                     f"{definition.title} |")
    current_range = ""
    for definition in ordered:
        area = _range_title(definition.id)
        if area != current_range:
            lines += ["", f"## {area}"]
            current_range = area
        lines += [
            "",
            f'<a id="event-{int(definition.id)}"></a>',
            f"### {int(definition.id)} {definition.id.name}: {definition.title}",
            "",
            f"Severity: **{definition.severity.value}**",
            "",
            definition.explanation,
        ]
        if definition.fields:
            names = ", ".join(f"`{name}`" for name in definition.fields)
            lines += ["", f"Fields: {names}"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_catalog_markdown())
