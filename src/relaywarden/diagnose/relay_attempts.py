"""The open-relay battery as data: unauthenticated relay attempts against one server.

Owns the list of classic relay tricks (those of the well-known relay checkers and of SPEC.md,
"The relay decision", point 4), each as the exact text sent after ``MAIL FROM:`` and ``RCPT TO:``,
built from a domain the server accepts, an address of it and the server's own IP address.  An open
relay accepts at least one of them; a closed one answers every one with a 5xx at MAIL or RCPT (a
4xx counts as a failure too: relay testers treat "try again" as "maybe").

Pure data and a classifier: no sockets, no pytest, so that the test suite, ``doctor`` and a
``relaywarden relay-test HOST`` command can all run the same battery.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import idna

__all__ = [
    "ACCEPTED",
    "DEFERRED",
    "REFUSED",
    "RelayAttempt",
    "address_literal",
    "homograph",
    "outcome",
    "relay_attempts",
]

REFUSED = "refused"     # a 5xx at MAIL or RCPT: what a closed relay answers
DEFERRED = "deferred"   # a 4xx: relay testers count it as a failure
ACCEPTED = "accepted"   # RCPT answered 2xx: the server relays


@dataclass(frozen=True, slots=True)
class RelayAttempt:
    """One attempt: a short name, what follows ``MAIL FROM:`` and what follows ``RCPT TO:``."""

    name: str
    mail_from: str
    rcpt_to: str

    @property
    def commands(self) -> tuple[str, str]:
        """The two command lines, without CRLF."""
        return f"MAIL FROM:{self.mail_from}", f"RCPT TO:{self.rcpt_to}"


def address_literal(ip: str) -> str:
    """The RFC 5321 address literal of an IP address: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    parsed = ipaddress.ip_address(ip.strip("[]"))
    return f"[{parsed}]" if parsed.version == 4 else f"[IPv6:{parsed}]"


# Latin letters and the Cyrillic letters that look the same.
_LOOKALIKES = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "c": "\u0441", "p": "\u0440",
               "x": "\u0445", "y": "\u0443", "i": "\u0456"}


def homograph(domain: str) -> str:
    """A look-alike of ``domain``: its first replaceable letter swapped for a Cyrillic twin."""
    for index, char in enumerate(domain):
        if char in _LOOKALIKES:
            return domain[:index] + _LOOKALIKES[char] + domain[index + 1:]
    return "\u043e" + domain


def _a_label(domain: str) -> str:
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return ".".join(
            "xn--" + label.encode("punycode").decode("ascii") if not label.isascii() else label
            for label in domain.split("."))


def relay_attempts(local_domain: str, local_address: str, server_ip: str, *,
                   foreign_domain: str = "example.net", victim: str = "relaytest") -> list[RelayAttempt]:
    """The battery for a server that accepts ``local_domain`` and listens on ``server_ip``.

    ``local_address`` is an address the server delivers (used as a spoofed sender and as the
    target of homograph attempts); ``foreign_domain`` is any domain the server must not relay to.
    No attempt names a plain recipient of ``local_domain``: every one is a relay attempt, so
    every one must be refused even where ``local_domain`` is an internal- or external-relay domain.
    """
    L, F, v = local_domain, foreign_domain, victim
    S = address_literal(server_ip)
    local_part = local_address.rpartition("@")[0]
    look = homograph(L)
    stranger = f"<{v}@{F}>"
    out = [
        # --- the classic checker sequence: who sends, to a plain foreign recipient ---
        RelayAttempt("foreign sender, foreign recipient", stranger, f"<{v}@{F}>"),
        RelayAttempt("local sender spoofed", f"<{local_address}>", f"<{v}@{F}>"),
        RelayAttempt("unknown local-domain sender", f"<{v}@{L}>", f"<{v}@{F}>"),
        RelayAttempt("null sender", "<>", f"<{v}@{F}>"),
        RelayAttempt("sender at the server's address literal", f"<{v}@{S}>", f"<{v}@{F}>"),
        RelayAttempt("sender without domain", "<postmaster>", f"<{v}@{F}>"),
        RelayAttempt("AUTH= parameter claims a local user", f"<{local_address}> AUTH={local_address}",
                     f"<{v}@{F}>"),
        RelayAttempt("postmaster of the foreign domain", stranger, f"<postmaster@{F}>"),
        # --- percent hack ---
        RelayAttempt("percent hack via local domain", stranger, f"<{v}%{F}@{L}>"),
        RelayAttempt("percent hack via server literal", stranger, f"<{v}%{F}@{S}>"),
        RelayAttempt("double percent hack", stranger, f"<{v}%{F}%{L}@{L}>"),
        RelayAttempt("percent hack, local domain upper case", stranger, f"<{v}%{F}@{L.upper()}>"),
        RelayAttempt("percent hack, trailing dot", stranger, f"<{v}%{F}@{L}.>"),
        # --- quoted local parts ---
        RelayAttempt("quoted @ via local domain", stranger, f'<"{v}@{F}"@{L}>'),
        RelayAttempt("quoted @ via server literal", stranger, f'<"{v}@{F}"@{S}>'),
        RelayAttempt("quoted @, no domain", stranger, f'<"{v}@{F}">'),
        RelayAttempt("quoted percent via local domain", stranger, f'<"{v}%{F}"@{L}>'),
        RelayAttempt("quoted bang path via local domain", stranger, f'<"{F}!{v}"@{L}>'),
        RelayAttempt("quoted escaped @ via local domain", stranger, f'<"{v}\\@{F}"@{L}>'),
        RelayAttempt("quoted @, mixed-case local domain", stranger, f'<"{v}@{F}"@{L.title()}>'),
        # --- bang paths (UUCP) ---
        RelayAttempt("bang path via local domain", stranger, f"<{F}!{v}@{L}>"),
        RelayAttempt("bang path via server literal", stranger, f"<{F}!{v}@{S}>"),
        RelayAttempt("bare bang path", stranger, f"<{F}!{v}>"),
        # --- source routes ---
        RelayAttempt("source route through local domain", stranger, f"<@{L}:{v}@{F}>"),
        RelayAttempt("source route through server literal", stranger, f"<@{S}:{v}@{F}>"),
        RelayAttempt("two-hop source route", stranger, f"<@{L},@{S}:{v}@{F}>"),
        RelayAttempt("source route to a percent hack", stranger, f"<@{L}:{v}%{F}@{L}>"),
        # --- double @ ---
        RelayAttempt("double @, local domain last", stranger, f"<{v}@{F}@{L}>"),
        RelayAttempt("double @, server literal last", stranger, f"<{v}@{F}@{S}>"),
        RelayAttempt("double @, local domain first", stranger, f"<{v}@{L}@{F}>"),
        # --- IP literals ---
        RelayAttempt("recipient at the server's address literal", stranger, f"<{v}@{S}>"),
        RelayAttempt("recipient at 127.0.0.1", stranger, f"<{v}@[127.0.0.1]>"),
        RelayAttempt("recipient at ::1", stranger, f"<{v}@[IPv6:::1]>"),
        RelayAttempt("recipient at an untagged IPv6 literal", stranger, f"<{v}@[::1]>"),
        RelayAttempt("dotted-quad domain without brackets", stranger, f"<{v}@127.0.0.1>"),
        RelayAttempt("recipient at localhost", stranger, f"<{v}@localhost>"),
        # --- look-alike domains ---
        RelayAttempt("local domain as a prefix of a foreign one", stranger, f"<{v}@{L}.{F}>"),
        RelayAttempt("local domain as a suffix without a dot", stranger, f"<{v}@evil{L}>"),
        RelayAttempt("subdomain of the local domain", stranger, f"<{v}@relay.{L}>"),
        RelayAttempt("trailing dot on the foreign domain", stranger, f"<{v}@{F}.>"),
        RelayAttempt("upper-case foreign domain", stranger, f"<{v.upper()}@{F.upper()}>"),
        RelayAttempt("homograph of the local domain (U-label)", f"{stranger} SMTPUTF8",
                     f"<{local_part}@{look}>"),
        RelayAttempt("homograph of the local domain (A-label)", stranger, f"<{local_part}@{_a_label(look)}>"),
        RelayAttempt("ideographic full stop in the foreign domain", f"{stranger} SMTPUTF8",
                     f"<{v}@{F.replace('.', chr(0x3002))}>"),
        # --- spaces, brackets and parameters ---
        RelayAttempt("no angle brackets", stranger, f"{v}@{F}"),
        RelayAttempt("space after the colon", stranger, f" <{v}@{F}>"),
        RelayAttempt("doubled angle brackets", stranger, f"<<{v}@{F}>>"),
        RelayAttempt("space inside the address", stranger, f"<{v} @{F}>"),
        RelayAttempt("a local address after the foreign one", stranger, f"<{v}@{F}> <{local_address}>"),
        RelayAttempt("a comment after the domain", stranger, f"<{v}@{F}(comment)>"),
        RelayAttempt("DSN parameters on a foreign recipient", stranger,
                     f"<{v}@{F}> NOTIFY=NEVER ORCPT=rfc822;{local_address}"),
    ]
    return out


def outcome(mail_code: int, rcpt_code: int | None) -> str:
    """Classify one attempt by its replies: REFUSED, DEFERRED or ACCEPTED.

    ``rcpt_code`` is None when RCPT was not sent because MAIL was already refused.
    """
    codes = [mail_code] if rcpt_code is None else [mail_code, rcpt_code]
    if any(500 <= c <= 599 for c in codes):
        return REFUSED
    if any(400 <= c <= 499 for c in codes):
        return DEFERRED
    if rcpt_code is None:
        raise ValueError(f"MAIL answered {mail_code} but RCPT was not tried")
    return ACCEPTED
