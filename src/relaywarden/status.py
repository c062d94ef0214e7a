"""The one table of SMTP replies and their RFC 3463 enhanced status codes.

Every reply the server sends is built here by a named constructor (``relay_denied()`` gives
``550 5.7.1 ...``), so a basic code and its enhanced code can never disagree and ``grep`` finds
every use.  The protocol core, the relay decision and the delivery side all take their replies
from this module.

The texts are written for the sender: they name the cause in words the sender can act on and never
leak configuration (file names, rule numbers, relay lists); those go to the event log.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, RFC 3463 enhanced code (or None), and text lines."""

    code: int
    enhanced: str | None
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None:
            klass = self.enhanced.split(".", 1)[0]
            if klass != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} disagrees with {self.code}")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self, enhanced: bool = True) -> list[str]:
        """The reply as text lines without CRLF ("250-a", "250 b")."""
        parts = self.text.split("\n")
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            body = f"{self.enhanced} {part}" if enhanced and self.enhanced else part
            out.append(f"{self.code}{sep}{body}")
        return out

    def encode(self, enhanced: bool = True) -> bytes:
        return _encoded(self, enhanced)

    def __str__(self) -> str:
        return " ".join(x for x in (str(self.code), self.enhanced, self.text.replace("\n", " / ")) if x)

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def tagged(self, decision_id: str) -> Reply:
        """The reply with a decision id the sender can quote ("... [decision 8f3a2c]")."""
        return Reply(self.code, self.enhanced, f"{self.text} [decision {decision_id}]")


@functools.lru_cache(maxsize=512)      # most replies are the same few, again and again
def _encoded(reply: Reply, enhanced: bool) -> bytes:
    return ("\r\n".join(reply.lines(enhanced)) + "\r\n").encode("utf-8")


# The replies sent again and again with the same text are made once: a Reply is immutable.
_shared = functools.lru_cache(maxsize=64)


# --- greeting, session ------------------------------------------------------------------------

@_shared
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP relaywarden")


@_shared
def closing(hostname: str) -> Reply:
    return Reply(221, "2.0.0", f"{hostname} closing connection")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} service shutting down, try again later")


def ehlo(hostname: str, client: str, extensions: list[str]) -> Reply:
    return Reply(250, None, "\n".join([f"{hostname} greets {client}", *extensions]))


@_shared
def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)


@_shared
def ok(text: str = "OK") -> Reply:
    return Reply(250, "2.0.0", text)


@_shared
def sender_ok() -> Reply:
    return Reply(250, "2.1.0", "Sender OK")


@_shared
def recipient_ok(text: str = "Recipient OK") -> Reply:
    return Reply(250, "2.1.5", text)


@_shared
def reset_ok() -> Reply:
    return Reply(250, "2.0.0", "Reset OK")


@_shared
def noop_ok() -> Reply:
    return Reply(250, "2.0.0", "OK")


def vrfy_cannot() -> Reply:
    return Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")


def help_text() -> Reply:
    return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH\nSee RFC 5321")


@_shared
def start_data() -> Reply:
    return Reply(354, None, "End data with <CR><LF>.<CR><LF>")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Message accepted for delivery, queued as {queue_id}")


def chunk_ok(octets: int) -> Reply:
    return Reply(250, "2.0.0", f"{octets} octets received")


def ready_for_tls() -> Reply:
    return Reply(220, "2.0.0", "Ready to start TLS")


def auth_succeeded() -> Reply:
    return Reply(235, "2.7.0", "Authentication successful")


def auth_challenge(challenge: str) -> Reply:
    return Reply(334, None, challenge)


# --- syntax and sequence errors (5.5.x) -------------------------------------------------------

def unrecognised_command() -> Reply:
    return Reply(500, "5.5.1", "Command unrecognised")


def auth_line_too_long() -> Reply:
    return Reply(500, "5.5.6", "Authentication exchange line is too long; AUTH ended")


def line_too_long(limit: int) -> Reply:
    return Reply(500, "5.5.2", f"Line too long (the limit is {limit} octets)")


def syntax_error(what: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax error: {what}")


def bad_sequence(what: str) -> Reply:
    return Reply(503, "5.5.1", f"Bad sequence of commands: {what}")


def not_implemented(what: str) -> Reply:
    return Reply(502, "5.5.1", f"{what} not implemented")


def parameter_not_implemented(param: str) -> Reply:
    return Reply(555, "5.5.4", f"{param} parameter not recognised or not implemented")


def bad_address(code: int, enhanced: str, reason: str) -> Reply:
    return Reply(code, enhanced, reason)


def non_ascii_command() -> Reply:
    return Reply(500, "5.5.2", "Command contains non-ASCII or NUL characters (SMTPUTF8 not in use)")


def too_many_errors() -> Reply:
    return Reply(421, "4.7.0", "Too many errors, closing connection")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} timeout exceeded, closing connection")


def pipelining_before_starttls() -> Reply:
    return Reply(554, "5.5.1", "Commands sent before the TLS handshake completed are not accepted")


def tls_not_available() -> Reply:
    return Reply(454, "4.7.0", "TLS not available")


def tls_already_active() -> Reply:
    return Reply(503, "5.5.1", "TLS already active")


def tls_required() -> Reply:
    return Reply(530, "5.7.0", "Must issue a STARTTLS command first")


# --- size, limits, resources -----------------------------------------------------------------

def message_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message size exceeds the limit of {limit} octets")


def data_line_too_long(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message refused: a line is longer than {limit} octets (RFC 5321 4.5.3.1.6)")


def too_many_recipients(limit: int) -> Reply:
    return Reply(452, "4.5.3", f"Too many recipients (at most {limit} per message)")


def too_many_connections() -> Reply:
    return Reply(421, "4.7.0", "Too many connections, try again later")


def storage_full() -> Reply:
    return Reply(452, "4.3.1", "Insufficient system storage, try again later")


def queue_error() -> Reply:
    return Reply(451, "4.3.0", "Local error in processing, try again later")


def data_no_recipients() -> Reply:
    return Reply(554, "5.5.1", "No valid recipients")


# --- message content -------------------------------------------------------------------------

def bare_line_ending(which: str) -> Reply:
    return Reply(
        550, "5.6.11",
        f"Message refused: bare {which} in message data; lines must end with CRLF (RFC 5321 2.3.8)",
    )


def nul_in_data() -> Reply:
    return Reply(550, "5.6.0", "Message refused: NUL characters in message data (RFC 5322 2.3)")


def non_ascii_without_8bitmime() -> Reply:
    return Reply(554, "5.6.1", "Message contains 8-bit data but BODY=8BITMIME was not declared")


def mail_loop(hops: int) -> Reply:
    return Reply(554, "5.4.6", f"Mail loop detected: too many Received headers ({hops})")


def utf8_required() -> Reply:
    return Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")


# --- access, authentication, relay (5.7.x) ----------------------------------------------------

def connection_refused() -> Reply:
    return Reply(554, "5.7.1", "Access denied: connections from your address are not accepted here")


def authentication_required() -> Reply:
    return Reply(530, "5.7.0", "Authentication required")


def auth_failed() -> Reply:
    return Reply(535, "5.7.8", "Authentication credentials invalid")


def auth_plaintext_refused() -> Reply:
    return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")


def auth_mechanism_unknown() -> Reply:
    return Reply(504, "5.5.4", "Unrecognised authentication mechanism")


def auth_cancelled() -> Reply:
    return Reply(501, "5.0.0", "Authentication cancelled")


def auth_already() -> Reply:
    return Reply(503, "5.5.1", "Already authenticated")


def auth_not_available() -> Reply:
    return Reply(503, "5.5.1", "AUTH not available on this listener")


def auth_temporary_failure() -> Reply:
    return Reply(454, "4.7.0", "Temporary authentication failure")


def relay_denied(reason: str) -> Reply:
    return Reply(550, "5.7.1", f"Relay access denied: {reason}")


def routing_refused(reason: str) -> Reply:
    return Reply(550, "5.7.1", f"Address refused: {reason}")


def user_unknown(address: str) -> Reply:
    return Reply(550, "5.1.1", f"<{address}>: no such mailbox here")


def mailbox_disabled(address: str) -> Reply:
    return Reply(550, "5.2.1", f"<{address}>: mailbox disabled, not accepting messages")


def policy_error() -> Reply:
    return Reply(451, "4.3.0", "Temporary local problem deciding on this recipient, try again later")


def domain_not_served(domain: str, listener: str) -> Reply:
    return Reply(550, "5.7.1", f"Relay access denied: {domain} is not served at this address")


# --- delivery side (used by delivery and NDRs) ------------------------------------------------

def expired(days: float) -> Reply:
    return Reply(550, "5.4.7", f"Delivery time expired after {days:g} days")


def null_mx(domain: str) -> Reply:
    return Reply(556, "5.1.10", f"{domain} does not accept mail (null MX)")


# --- next hops and local delivery (the queue runner's own results) ---------------------------

def domain_not_found(domain: str) -> Reply:
    return Reply(550, "5.1.2", f"{domain}: domain does not exist (NXDOMAIN)")


def no_mail_host(domain: str) -> Reply:
    return Reply(550, "5.4.4", f"{domain} has no MX and no address records: it cannot receive mail")


def dns_failure(name: str) -> Reply:
    return Reply(451, "4.4.3", f"DNS look-up of {name} failed, will try again later")


def no_usable_mx(domain: str) -> Reply:
    return Reply(451, "4.4.4", f"no MX host of {domain} has an address, will try again later")


def bad_literal(text: str) -> Reply:
    return Reply(550, "5.1.2", f"{text} is not a valid address literal")


def misconfigured(route: str) -> Reply:
    return Reply(451, "4.3.5", f"route {route} is not usable as configured, will try again later")


def smarthost_dns_failure(route: str) -> Reply:
    return Reply(451, "4.4.3", f"DNS look-up of the smarthosts of route {route} failed, "
                 "will try again later")


def no_smarthost_address(route: str) -> Reply:
    return Reply(451, "4.4.4", f"no smarthost of route {route} has an address, will try again later")


def mailbox_full() -> Reply:
    return Reply(452, "4.2.2", "Mailbox full (quota exceeded), try again later")


def local_delivery_failed() -> Reply:
    return queue_error().with_text("Local mailbox delivery failed, will try again later")
