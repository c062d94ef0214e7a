"""What a delivery status means: the one table from an SMTP reply to its real cause and fix.

This module owns ``explain_status(code, enhanced, text, command) -> Cause``: given the basic reply
code (None when no SMTP reply was received at all), the RFC 3463 enhanced code, the reply text and
the SMTP command it answered, it returns the cause in words a sender can act on and the fix.
The NDRs relaywarden sends use it, and so does ``relaywarden ndr explain`` for other MTAs'
bounces, so it depends on nothing but the standard library.

The table (``RULES``) is read top to bottom and the first rule whose every condition holds wins.
A reply that no rule names falls back to the RFC 3463 meaning of its class, subject and detail.

A remote ``550 5.7.1 Unable to relay`` is explained for what it is -- the destination refused to
relay for us -- and never as "you do not have permission" (Microsoft KB 262354).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "CAUSES",
    "RULES",
    "Cause",
    "Rule",
    "describe_enhanced",
    "explain_status",
    "status_for",
]


@dataclass(frozen=True, slots=True)
class Cause:
    """The real cause of a delivery status, for the sender and the administrator.

    ``key`` is stable (tests, events and docs refer to it), ``label`` is a short title,
    ``sentence`` says what happened, ``fix`` what to change, and ``status`` is the RFC 3463 code
    the reply carried or the one derived from its basic code ("5.0.0" for a bare 5xx).
    """

    key: str
    label: str
    sentence: str
    fix: str
    status: str = ""
    permanent: bool = True

    def with_status(self, status: str) -> Cause:
        return Cause(self.key, self.label, self.sentence, self.fix, status, status.startswith("5"))


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: the conditions (all must hold) and the cause they mean.

    ``codes``: basic reply codes, or "none" for no reply at all, or "4xx"/"5xx" classes.
    ``enhanced``: enhanced codes; "x.7.1" matches 4.7.1 and 5.7.1, "5.7.*" any detail.
    ``pattern``: a regular expression searched in the reply text (case-insensitive).
    ``commands``: SMTP commands the reply answered ("RCPT", "DATA", "CONNECT", ...).
    ``enhanced_only``: the rule only applies to replies that carry an enhanced code.
    """

    cause: Cause
    codes: frozenset[str] = field(default_factory=frozenset)
    enhanced: frozenset[str] = field(default_factory=frozenset)
    pattern: re.Pattern[str] | None = None
    commands: frozenset[str] = field(default_factory=frozenset)

    def matches(self, code: int | None, enhanced: str | None, text: str, command: str | None) -> bool:
        if self.codes and not _code_matches(self.codes, code):
            return False
        if self.enhanced and not _enhanced_matches(self.enhanced, enhanced):
            return False
        if self.pattern is not None and not self.pattern.search(text):
            return False
        if self.commands and (command or "").upper() not in self.commands:
            return False
        return True


def _code_matches(codes: frozenset[str], code: int | None) -> bool:
    if code is None:
        return "none" in codes
    return str(code) in codes or f"{str(code)[0]}xx" in codes


def _enhanced_matches(patterns: frozenset[str], enhanced: str | None) -> bool:
    if enhanced is None:
        return False
    klass, _, rest = enhanced.partition(".")
    subject, _, detail = rest.partition(".")
    for pattern in patterns:
        p_class, p_subject, p_detail = pattern.split(".")
        if p_class not in ("x", klass) or p_subject != subject:
            continue
        if p_detail in ("*", detail):
            return True
    return False


def _set(*items: str) -> frozenset[str]:
    return frozenset(items)


_HINTS: dict[str, str] = {}


def _re(pattern: str, hint: str) -> re.Pattern[str]:
    """A case-insensitive pattern for reply texts, with the words the docs show for it."""
    _HINTS[pattern] = hint
    return re.compile(pattern, re.IGNORECASE)


# --- the causes --------------------------------------------------------------------------------

UNKNOWN_USER = Cause(
    "unknown-user", "Unknown recipient",
    "The recipient's mail server says this mailbox does not exist: the address is misspelt, "
    "the person has left, or the mailbox was removed.",
    "Check the spelling of the address (the part before the @) and ask the recipient for their "
    "current address; resending to the same address will fail again.",
)
BAD_DOMAIN = Cause(
    "bad-domain", "Recipient domain does not exist",
    "The recipient's domain (the part after the @) does not exist or has no mail server that "
    "can be found: it is misspelt, expired, or its DNS is broken.",
    "Check the spelling of the domain; if it is right, the recipient's organisation must fix "
    "its DNS (MX or A records) before mail can reach it.",
)
NULL_MX = Cause(
    "null-mx", "Domain does not accept mail (null MX)",
    "The recipient's domain publishes a null MX record (RFC 7505): it states that it accepts no "
    "email at all.",
    "Use another address for this recipient; no mail server will deliver to this domain.",
)
BAD_ADDRESS = Cause(
    "bad-address", "Malformed recipient address",
    "The recipient's mail server could not parse the address as a valid mailbox.",
    "Correct the address: look for spaces, missing or extra @, or characters that do not belong "
    "in an email address.",
)
MAILBOX_DISABLED = Cause(
    "mailbox-disabled", "Mailbox disabled",
    "The recipient's mailbox exists but is disabled and accepts no messages.",
    "Contact the recipient by other means; their mail administrator must re-enable the "
    "mailbox.",
)
RETURNED_BY_ADMIN = Cause(
    "returned-by-admin", "Returned by the mail administrator",
    "The mail administrator of our server returned this message without delivering it (for "
    "example while cleaning up the queue after a flood); no receiving server was involved.",
    "If the message was legitimate, send it again; if you did not send it, your account or "
    "device may be sending mail without you: change its password and tell the administrator.",
)
MAILBOX_FULL = Cause(
    "mailbox-full", "Recipient's mailbox is full",
    "The recipient's mailbox is over its storage quota and cannot take more messages.",
    "Tell the recipient by other means to clear space in their mailbox, then resend; sending "
    "a smaller message may also get through.",
)
TOO_BIG = Cause(
    "too-big", "Message too big",
    "The message is larger than the receiving mail server accepts (attachments count, and "
    "they grow by about a third in transit).",
    "Send the attachments another way (a file share or a link) or split them over several "
    "smaller messages.",
)
UNROUTABLE = Cause(
    "unroutable", "No route to the recipient's domain",
    "No mail server could be found for the recipient's domain: it has no MX record and no "
    "address record, or the route for it leads nowhere.",
    "Check the domain for typos. If it is right, its administrators must publish an MX record; "
    "if only our server fails, check the route for this domain in our configuration and our "
    "DNS resolver.",
)
LOOP = Cause(
    "loop", "Mail loop",
    "The message went round in a loop between mail servers (too many Received headers) and "
    "was stopped.",
    "The administrators must find the two servers forwarding to each other: typically an MX "
    "record or a route pointing back at the server that sent it, or two mailboxes forwarding "
    "to each other. Resending will loop again until that is fixed.",
)
EXPIRED = Cause(
    "expired", "Delivery time expired",
    "The message could not be delivered within the maximum time it may stay in the queue: "
    "every attempt failed temporarily (the receiving server was down, unreachable or deferring).",
    "Look at the last error below for why each attempt failed. Resend later; if the "
    "destination is down for good, the recipient's administrators must fix it.",
)
RELAY_DENIED = Cause(
    "relay-denied", "Destination refused to relay for us",
    "The receiving mail server refused to relay this message for our server: it does not "
    "treat the recipient's domain as one it delivers for, and it does not recognise our "
    "server as a client allowed to relay through it. This is not about the sender's own rights.",
    "Usually one of three things: (1) the destination does not accept mail for this domain -- "
    "the domain's MX record or our route points at the wrong server, or the domain is not "
    "configured there; (2) our server's public address is not on the destination's relay list "
    "-- ask its administrator to add it; (3) the destination wants us to authenticate before "
    "relaying -- set username and password_file on the route.",
)
AUTH_REQUIRED = Cause(
    "auth-required", "Destination requires authentication",
    "The receiving mail server accepts this mail only from authenticated clients, and our "
    "server did not authenticate on this route.",
    "Set username and password_file on the route to this destination (KB 895853 scenario 5), "
    "with tls = \"required\" or \"opportunistic\" so the credentials travel encrypted.",
)
BAD_CREDENTIALS = Cause(
    "bad-credentials", "Destination refused our credentials",
    "The receiving mail server rejected the user name or password our server presented on "
    "this route.",
    "Check username and the password in password_file on the route; the password may have "
    "changed or the account may be locked at the destination.",
)
AUTH_NEEDS_TLS = Cause(
    "auth-needs-tls", "Authentication needs encryption",
    "The receiving mail server refused to accept our credentials over an unencrypted "
    "connection.",
    "Set tls = \"required\" (or \"opportunistic\") on the route so that STARTTLS comes before "
    "AUTH.",
)
AUTH_MECHANISM = Cause(
    "auth-mechanism", "Authentication mechanism refused",
    "The receiving mail server refused the authentication mechanism our server used as too "
    "weak or unsupported.",
    "Enable encryption (tls = \"required\") on the route; if it persists, ask the destination "
    "which mechanisms it accepts.",
)
TLS_CERTIFICATE = Cause(
    "tls-certificate", "TLS certificate could not be verified",
    "The route requires a verified TLS connection, and the receiving server's certificate could "
    "not be verified (expired, self-signed, or issued for another name).",
    "Ask the destination's administrator to fix the certificate; if it is signed by a private "
    "CA, set ca_file on the route. Lowering tls to \"opportunistic\" removes the protection.",
)
TLS_NOT_OFFERED = Cause(
    "tls-not-offered", "TLS required but not offered",
    "The route requires an encrypted connection, and the receiving mail server did not offer "
    "STARTTLS (or the TLS handshake failed), so nothing was sent.",
    "Ask the destination's administrator to enable STARTTLS; if unencrypted delivery to this "
    "destination is acceptable, set tls = \"opportunistic\" on the route.",
)
TLS_REQUIRED_BY_REMOTE = Cause(
    "tls-required-by-remote", "Destination requires TLS",
    "The receiving mail server accepts mail only over an encrypted connection, and our server "
    "did not start TLS on this route.",
    "Set tls = \"opportunistic\" or \"required\" on the route (it is \"none\" now, or the "
    "STARTTLS handshake failed).",
)
BLOCKLISTED = Cause(
    "blocklisted", "Our server is on a block list",
    "The receiving mail server refused the message because our server's address is listed on "
    "a DNS block list or has a poor reputation there; the message content was not the reason.",
    "The mail administrator must look up our public address on the block list named in the "
    "reply, remove the cause (an open relay, a compromised account, spam in the queue) and "
    "request delisting (relaywarden doctor checks the block lists).",
)
SENDER_AUTH = Cause(
    "sender-authentication", "Sender authentication (SPF/DKIM/DMARC) failed",
    "The receiving mail server refused the message because the sender's domain does not "
    "authorise our server to send for it (SPF), or the message failed DKIM or DMARC checks.",
    "The sender domain's administrator must add our server to its SPF record and sign with "
    "DKIM, or the mail must leave through the server the domain authorises.",
)
CONTENT_REJECTED = Cause(
    "content-rejected", "Refused as spam or by content policy",
    "The receiving mail server refused the message by its content or policy filter (spam, "
    "virus, attachment type, or a rule of the recipient's organisation); it did not refuse the "
    "address.",
    "Read the remote reply below for the rule that matched; remove the suspicious attachment "
    "or link and resend, or ask the recipient to have their administrator allow the sender.",
)
NOT_AUTHORISED = Cause(
    "delivery-not-authorised", "Refused by the destination's policy",
    "The receiving mail server refused this recipient by its own access policy (5.7.1) "
    "without saying which rule applied.",
    "Read the remote reply below; the recipient's mail administrator can tell which rule "
    "refused it (often: the recipient accepts mail only from certain senders).",
)
SENDER_REJECTED = Cause(
    "sender-rejected", "Sender address refused",
    "The receiving mail server refused the sender address of this message (MAIL FROM), not the "
    "recipient.",
    "Check that the sender address is valid and its domain resolves; the destination may "
    "require a sender domain that exists or is not ours to use.",
)
CONNECTION_FAILED = Cause(
    "connection-failed", "Could not talk to the receiving server",
    "Our server could not hold an SMTP conversation with the receiving mail server: the "
    "connection was refused, timed out, or was dropped, so no SMTP reply was received.",
    "Check that the host is up and that our server can reach its port 25 (firewalls and "
    "Internet providers often block outgoing port 25); for a smarthost route, check the host "
    "and port in the route.",
)
DNS_FAILURE = Cause(
    "dns-failure", "DNS look-up failed",
    "Our server could not resolve the mail servers of the recipient's domain: the DNS look-up "
    "failed or timed out.",
    "Check our resolver (the nameservers in the configuration) and the domain's DNS servers; "
    "a temporary DNS failure clears by itself.",
)
REMOTE_BUSY = Cause(
    "remote-busy", "Receiving server temporarily unavailable",
    "The receiving mail server is temporarily unable to take the message (busy, greylisting, "
    "or out of resources).",
    "Nothing to change: our server retries. If it lasts, ask the recipient's administrator.",
)
PROTOCOL_ERROR = Cause(
    "protocol-error", "SMTP protocol error",
    "The receiving mail server did not understand a command our server sent, or the two "
    "servers disagreed on the SMTP dialogue.",
    "The mail administrator should read the remote reply and the command below; it often "
    "points at an extension (PIPELINING, CHUNKING, SMTPUTF8) the two sides handle differently.",
)

# Some servers put the enhanced code at the end ("... (#5.7.1)"); relay-like wordings.
_RELAY = _re(
    r"unable to relay|relay(ing)? (access )?(is )?(denied|not (permitted|allowed)|prohibited|refused)"
    r"|not (permitted|allowed|authori[sz]ed) to relay|we do not relay|no relaying|rcpthosts"
    r"|relay not permitted|relay access",
    '"Unable to relay", "Relay access denied", "rcpthosts"',
)
_AUTH = _re(
    r"not authenticated|authentication (is )?required|must authenticate|authenticate first"
    r"|auth(entication)? needed|sender not authenticated|requires? auth",
    '"not authenticated", "authentication required"',
)
_TLS_REMOTE = _re(
    r"must issue a starttls|starttls (is )?required|must (use|issue|run) starttls|encryption required"
    r"|tls (is )?required|requires? (tls|encryption)|secure connection required",
    '"Must issue a STARTTLS command first", "TLS required"',
)
_TLS_NOT_OFFERED = _re(
    r"starttls.*not (offered|supported|available)|(not|no) (offer|support)\w* starttls"
    r"|tls (handshake )?failed|handshake",
    '"did not offer STARTTLS", "TLS handshake failed"',
)
_CERT = _re(
    r"certificate|verif(y|ication) failed|self[- ]signed|hostname mismatch",
    '"certificate verify failed", "self-signed"',
)
_BLOCKLIST = _re(
    r"spamhaus|spamcop|barracuda|sorbs|block ?list|black ?list|blocked using|\brbl\b|dnsbl"
    r"|listed (at|in|on|by)|reputation",
    'a block list name, "blocked using", "listed", "reputation"',
)
_SENDER_AUTH = _re(r"\bspf\b|\bdkim\b|\bdmarc\b|sender policy framework", '"SPF", "DKIM", "DMARC"')
_CONTENT = _re(
    r"spam|virus|malware|phish|content|attachment|message (rejected|refused|blocked)|policy|filter"
    r"|suspicious",
    '"spam", "virus", "content", "policy", "message rejected"',
)
_UNKNOWN_USER = _re(
    r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox (unavailable|not found)"
    r"|does not exist|doesn't exist|unknown recipient|recipient (address )?rejected|invalid recipient"
    r"|address rejected|not a valid mailbox|no mailbox",
    '"User unknown", "no such user", "does not exist"',
)
_MAILBOX_FULL = _re(
    r"quota|mailbox (is )?full|insufficient (disk )?space|out of storage", '"quota", "mailbox full"'
)
_TOO_BIG = _re(
    r"too (big|large)|size (limit|exceed)|exceeds? .*size|message size|maximum size",
    '"too big", "message size exceeds"',
)
_LOOP = _re(r"\bloop|too many hops|hop count", '"loop", "too many hops"')
_EXPIRED = _re(
    r"expired|too long in (the )?queue|delivery time|queue lifetime", '"expired", "too long in queue"'
)
_DNS = _re(
    r"\bdns\b|resolv|nxdomain|no address|name (or service )?not known|servfail|lookup",
    '"DNS", "NXDOMAIN", "SERVFAIL", "lookup"',
)
_NULL_MX = _re(r"null mx", '"null MX"')
_NO_MX = _re(r"no mx|no mail exchanger|unroutable|no route", '"no MX", "unroutable", "no route"')

_5XX = _set("5xx")
_NONE = _set("none")

RULES: tuple[Rule, ...] = (
    # The operator's `relaywarden queue bounce` (queue/ops.py: admin_bounce_result); "" also
    # matches the NDR read back by `ndr explain`, whose DSN part does not carry the command.
    Rule(RETURNED_BY_ADMIN, commands=_set("LOCAL", ""), pattern=_re(
        r"returned to the sender by the mail administrator", '"returned to the sender by the mail administrator"')),
    # Our own and remote conditions identified by their enhanced code.
    Rule(NULL_MX, enhanced=_set("x.1.10")),
    Rule(NULL_MX, codes=_NONE | _5XX, pattern=_NULL_MX),
    Rule(EXPIRED, enhanced=_set("x.4.7")),
    Rule(LOOP, enhanced=_set("x.4.6")),
    Rule(LOOP, codes=_5XX | _set("none"), pattern=_LOOP),
    # TLS: ours (route requires it) and theirs (they require it); before authentication,
    # because "530 5.7.0 Must issue a STARTTLS command first" also uses 530 5.7.0.
    Rule(TLS_CERTIFICATE, enhanced=_set("x.7.10", "x.7.0", "x.7.5", "x.7.4", "x.7.1"), pattern=_CERT),
    Rule(TLS_CERTIFICATE, codes=_NONE, pattern=_CERT),
    Rule(TLS_NOT_OFFERED, enhanced=_set("x.7.10", "x.7.4", "x.7.0"), pattern=_TLS_NOT_OFFERED),
    Rule(TLS_NOT_OFFERED, codes=_NONE, pattern=_TLS_NOT_OFFERED),
    Rule(AUTH_NEEDS_TLS, codes=_set("538")),
    Rule(AUTH_NEEDS_TLS, enhanced=_set("x.7.11")),
    Rule(TLS_REQUIRED_BY_REMOTE, codes=_set("530", "4xx", "5xx"), pattern=_TLS_REMOTE),
    Rule(TLS_NOT_OFFERED, enhanced=_set("x.7.10")),
    # Authentication toward the destination (KB 895853 scenario 5).
    Rule(BAD_CREDENTIALS, codes=_set("535")),
    Rule(BAD_CREDENTIALS, enhanced=_set("x.7.8")),
    Rule(AUTH_MECHANISM, codes=_set("534")),
    Rule(AUTH_MECHANISM, enhanced=_set("x.7.9")),
    Rule(AUTH_REQUIRED, codes=_set("530")),
    Rule(AUTH_REQUIRED, enhanced=_set("x.7.3", "x.7.57")),
    Rule(AUTH_REQUIRED, enhanced=_set("x.7.0", "x.7.1"), pattern=_AUTH),
    Rule(AUTH_REQUIRED, codes=_5XX, pattern=_AUTH),
    # Relay refused by the destination: the KB 262354 case, told as it is.
    Rule(RELAY_DENIED, codes=_5XX, pattern=_RELAY),
    Rule(RELAY_DENIED, enhanced=_set("x.7.1", "x.7.64"), pattern=_RELAY),
    # Other policy refusals.
    Rule(BLOCKLISTED, codes=_5XX | _set("4xx"), pattern=_BLOCKLIST),
    Rule(BLOCKLISTED, enhanced=_set("x.7.*"), pattern=_BLOCKLIST),
    # RFC 7372: X.7.20-X.7.27 are DKIM, SPF and DMARC results.
    Rule(SENDER_AUTH, enhanced=frozenset(f"x.7.{n}" for n in range(20, 28))),
    Rule(SENDER_AUTH, codes=_5XX | _set("4xx"), pattern=_SENDER_AUTH),
    Rule(CONTENT_REJECTED, enhanced=_set("x.7.*"), pattern=_CONTENT),
    Rule(CONTENT_REJECTED, enhanced=_set("x.6.0"), pattern=_CONTENT),
    Rule(CONTENT_REJECTED, codes=_5XX, pattern=_CONTENT, commands=_set("DATA", "BDAT")),
    Rule(SENDER_REJECTED, enhanced=_set("x.1.7", "x.1.8")),
    Rule(NOT_AUTHORISED, enhanced=_set("x.7.1")),
    # Addressing and mailbox.
    Rule(UNKNOWN_USER, enhanced=_set("x.1.1")),
    Rule(BAD_DOMAIN, enhanced=_set("x.1.2")),
    Rule(BAD_ADDRESS, enhanced=_set("x.1.3")),
    Rule(MAILBOX_DISABLED, enhanced=_set("x.2.1")),
    Rule(MAILBOX_FULL, enhanced=_set("x.2.2")),
    Rule(TOO_BIG, enhanced=_set("x.3.4", "x.2.3")),
    Rule(UNROUTABLE, enhanced=_set("x.4.4")),
    Rule(DNS_FAILURE, enhanced=_set("x.4.3")),
    # Microsoft 365 / Exchange Online say 5.4.1 "Recipient address rejected: Access denied" for an
    # unknown recipient (directory-based edge blocking), not for a connection problem.
    Rule(UNKNOWN_USER, enhanced=_set("x.4.1"), pattern=_re(r"recipient address rejected|access denied",
                                                          '"Recipient address rejected: Access denied" (Microsoft)')),
    Rule(CONNECTION_FAILED, enhanced=_set("x.4.1", "x.4.2")),
    # Replies without an enhanced code (older servers) recognised by their words.
    Rule(MAILBOX_FULL, codes=_set("4xx", "5xx"), pattern=_MAILBOX_FULL),
    Rule(TOO_BIG, codes=_5XX, pattern=_TOO_BIG),
    Rule(EXPIRED, codes=_5XX | _NONE, pattern=_EXPIRED),
    Rule(UNROUTABLE, codes=_5XX | _NONE, pattern=_NO_MX),
    Rule(UNKNOWN_USER, codes=_set("550", "551", "553", "554"), pattern=_UNKNOWN_USER,
         commands=_set("RCPT", "")),
    Rule(SENDER_REJECTED, codes=_5XX, commands=_set("MAIL")),
    # No SMTP reply at all.
    Rule(DNS_FAILURE, codes=_NONE, pattern=_DNS),
    Rule(CONNECTION_FAILED, codes=_NONE),
    Rule(REMOTE_BUSY, codes=_set("421", "450", "451", "452")),
    Rule(PROTOCOL_ERROR, codes=_set("500", "501", "502", "503", "504", "555")),
    Rule(PROTOCOL_ERROR, enhanced=_set("x.5.*")),
)


def _unique_causes(rules: Iterable[Rule]) -> tuple[Cause, ...]:
    seen: dict[str, Cause] = {}
    for rule in rules:
        seen.setdefault(rule.cause.key, rule.cause)
    return tuple(seen.values())


CAUSES: tuple[Cause, ...] = _unique_causes(RULES)


# --- RFC 3463 fallback ---------------------------------------------------------------------------

_CLASSES = {
    "2": "Success",
    "4": "Persistent transient failure: the message may be delivered if it is sent again later",
    "5": "Permanent failure: sending the message again unchanged will fail again",
}
_SUBJECTS = {
    "0": "other or undefined status",
    "1": "an addressing problem (the sender or recipient address)",
    "2": "a problem with the recipient's mailbox",
    "3": "a problem with the receiving mail system",
    "4": "a network or routing problem",
    "5": "a mail delivery protocol problem",
    "6": "a problem with the message content or media",
    "7": "a security or policy refusal",
}
_DETAILS = {
    "0.0": "other undefined status",
    "1.0": "other address status",
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.4": "destination mailbox address ambiguous",
    "1.5": "destination address valid",
    "1.6": "destination mailbox has moved, no forwarding address",
    "1.7": "bad sender's mailbox address syntax",
    "1.8": "bad sender's system address",
    "1.10": "recipient address has null MX",
    "2.0": "other or undefined mailbox status",
    "2.1": "mailbox disabled, not accepting messages",
    "2.2": "mailbox full",
    "2.3": "message length exceeds administrative limit",
    "2.4": "mailing list expansion problem",
    "3.0": "other or undefined mail system status",
    "3.1": "mail system full",
    "3.2": "system not accepting network messages",
    "3.3": "system not capable of selected features",
    "3.4": "message too big for system",
    "3.5": "system incorrectly configured",
    "4.0": "other or undefined network or routing status",
    "4.1": "no answer from host",
    "4.2": "bad connection",
    "4.3": "directory server failure",
    "4.4": "unable to route",
    "4.5": "mail system congestion",
    "4.6": "routing loop detected",
    "4.7": "delivery time expired",
    "5.0": "other or undefined protocol status",
    "5.1": "invalid command",
    "5.2": "syntax error",
    "5.3": "too many recipients",
    "5.4": "invalid command arguments",
    "5.5": "wrong protocol version",
    "6.0": "other or undefined media error",
    "6.1": "media not supported",
    "6.2": "conversion required and prohibited",
    "6.3": "conversion required but not supported",
    "6.4": "conversion with loss performed",
    "6.5": "conversion failed",
    "7.0": "other or undefined security status",
    "7.1": "delivery not authorized, message refused",
    "7.2": "mailing list expansion prohibited",
    "7.3": "security conversion required but not possible",
    "7.4": "security features not supported",
    "7.5": "cryptographic failure",
    "7.6": "cryptographic algorithm not supported",
    "7.7": "message integrity failure",
}
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# Leading "5.7.1 " or trailing "(#5.7.1)" in a reply text that came without a separate code.
_ENHANCED_IN_TEXT = re.compile(r"(?:^|[\s(#])([245]\.\d{1,3}\.\d{1,3})(?=[\s)]|$)")


def describe_enhanced(enhanced: str) -> str:
    """The RFC 3463 meaning of an enhanced code ("5.2.2" -> "Permanent failure: ... mailbox full")."""
    m = _ENHANCED.match(enhanced)
    if m is None:
        return f"{enhanced} is not an RFC 3463 status code"
    klass, subject, detail = m.groups()
    what = _DETAILS.get(f"{subject}.{detail}") or _SUBJECTS.get(subject, "an unknown kind of status")
    return f"{_CLASSES[klass]}; {what} ({enhanced})"


def status_for(
    code: int | None, enhanced: str | None, text: str = "", *, permanent: bool | None = None
) -> str:
    """The RFC 3463 status of a reply: its enhanced code when it is valid and agrees with the
    basic code, one found in the text ("... (#5.7.1)"), else derived from the basic code (5xx ->
    5.0.0, 4xx -> 4.0.0). With no reply at all, ``permanent`` picks 5.0.0 or 4.0.0."""
    klass = str(code)[0] if code is not None else None
    for candidate in (enhanced, _enhanced_from_text(text)):
        if candidate and _ENHANCED.match(candidate) and klass in (None, candidate[0]):
            return candidate
    if klass in ("4", "5", "2"):
        return f"{klass}.0.0"
    return "5.0.0" if permanent in (None, True) else "4.0.0"


def _enhanced_from_text(text: str) -> str | None:
    m = _ENHANCED_IN_TEXT.search(text[:200])
    return m.group(1) if m else None


def _fallback(status: str, code: int | None) -> Cause:
    meaning = describe_enhanced(status)
    if code is not None:
        sentence = f"The receiving mail server answered {code} {status}: {meaning}."
    else:
        sentence = f"Delivery failed with status {status}: {meaning}."
    fix = (
        "Read the remote reply below for details. "
        + ("Our server will keep retrying for a while." if status.startswith("4")
           else "Correct what the reply names before sending again.")
    )
    return Cause("rfc3463", _short_meaning(status), sentence, fix)


def _short_meaning(status: str) -> str:
    m = _ENHANCED.match(status)
    if m is None:
        return "Unknown status"
    _, subject, detail = m.groups()
    what = _DETAILS.get(f"{subject}.{detail}") or _SUBJECTS.get(subject, "unknown status")
    return what[0].upper() + what[1:]


def explain_status(
    code: int | None, enhanced: str | None, text: str = "", command: str | None = None
) -> Cause:
    """The real cause of a reply, with the sentence for the sender and the fix.

    ``code`` is the basic SMTP reply code or None when no reply was received; ``enhanced`` the
    RFC 3463 code or None (one at the start or end of ``text`` is used when present);
    ``command`` the SMTP command the reply answered. The returned cause carries the status.
    """
    text = " ".join((text or "").split())
    status = status_for(code, enhanced, text)
    effective = enhanced if enhanced and _ENHANCED.match(enhanced) else _enhanced_from_text(text)
    if effective is not None and code is not None and effective[0] != str(code)[0]:
        effective = None  # a code that disagrees with its basic code is not trusted
    for rule in RULES:
        if rule.matches(code, effective, text, command):
            return rule.cause.with_status(status)
    return _fallback(status, code).with_status(status)


def causes_markdown() -> str:
    """The cause table as Markdown, for docs/ndr.md (``python -m relaywarden.dsn.causes``)."""
    out = ["| Cause | Matched when (any line; the table order in causes.py decides) |", "|---|---|"]
    for cause in CAUSES:
        conditions = "<br>".join(_describe_rule(r) for r in RULES if r.cause.key == cause.key)
        out.append(f"| `{cause.key}` {cause.label} | {conditions} |")
    for cause in CAUSES:
        out += ["", f"### `{cause.key}`: {cause.label}", "", f"**Says:** {cause.sentence}", "",
                f"**Fix:** {cause.fix}"]
    return "\n".join(out) + "\n"


def _describe_rule(rule: Rule) -> str:
    parts = []
    if rule.codes:
        parts.append("reply " + "/".join(sorted("no reply" if c == "none" else c for c in rule.codes)))
    if rule.enhanced:
        parts.append("status " + "/".join(sorted(rule.enhanced)))
    if rule.pattern is not None:
        parts.append("text like " + _HINTS.get(rule.pattern.pattern, "the pattern in causes.py"))
    if rule.commands:
        parts.append("answering " + "/".join(sorted(c or "(unknown)" for c in rule.commands)))
    return ", ".join(parts)


if __name__ == "__main__":
    print(causes_markdown(), end="")
