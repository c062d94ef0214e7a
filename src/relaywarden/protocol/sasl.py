"""Server-side SASL for SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN, sans-I/O.

This module owns one AUTH exchange: which challenges to send, decoding the client's base64
lines strictly, and turning them into Credentials. It does not check a password, count
failures or decide 535 5.7.8; the server's authentication layer does that with the
Credentials returned here. The client side helper builds a PLAIN initial response.

A driver does:

    exchange = new_exchange(mechanism)            # SaslError 504 5.5.4 if unknown
    result = exchange.start(initial_response)     # None when AUTH had no initial response
    while isinstance(result, str):
        send f"334 {result}"; read a line
        result = exchange.step(line)              # SaslCancelled on "*"
    check result (Credentials)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_LINE",
    "MECHANISMS",
    "Credentials",
    "SaslCancelled",
    "SaslError",
    "SaslExchange",
    "client_plain",
    "new_exchange",
]

MECHANISMS: Final = ("PLAIN", "LOGIN")
MAX_LINE: Final = 12288
"""Longest base64 line accepted from a client (RFC 4954 permits 12288 octets)."""

CANCEL: Final = "*"
EMPTY_INITIAL_RESPONSE: Final = "="
LOGIN_USERNAME_CHALLENGE: Final = "VXNlcm5hbWU6"  # base64 "Username:"
LOGIN_PASSWORD_CHALLENGE: Final = "UGFzc3dvcmQ6"  # base64 "Password:"


class SaslError(ValueError):
    """The exchange failed on the client's side; reply `code enhanced reason` and end AUTH."""

    def __init__(self, code: int, enhanced: str, reason: str) -> None:
        super().__init__(f"{code} {enhanced} {reason}")
        self.code = code
        self.enhanced = enhanced
        self.reason = reason


class SaslCancelled(Exception):
    """The client sent "*": reply 501 5.0.0 and end AUTH (RFC 4954 section 4)."""

    code: Final = 501
    enhanced: Final = "5.0.0"
    reason: Final = "Authentication cancelled"

    def __init__(self) -> None:
        super().__init__(f"{self.code} {self.enhanced} {self.reason}")


@dataclass(frozen=True)
class Credentials:
    """What the client claims; the password never appears in repr or logs."""

    authzid: str
    """Identity to act as ("" = same as username); only PLAIN can set it."""
    username: str
    password: str = field(repr=False)


def _malformed(reason: str) -> SaslError:
    return SaslError(501, "5.5.2", reason)


def _decode(line: str) -> bytes:
    if len(line) > MAX_LINE:
        raise SaslError(500, "5.5.6", "Authentication Exchange line is too long")
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except (binascii.Error, ValueError):
        raise _malformed("Cannot Base64-decode Client responses") from None


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not valid UTF-8") from None


def _finish_plain(responses: list[bytes]) -> Credentials:
    """RFC 4616: [authzid] NUL authcid NUL passwd."""
    parts = responses[0].split(b"\x00")
    if len(parts) != 3:
        raise _malformed("PLAIN message must be authzid NUL authcid NUL passwd")
    authzid, username, password = (_utf8(part, "PLAIN message") for part in parts)
    if not username or not password:
        raise _malformed("PLAIN message needs a username and a password")
    return Credentials(authzid, username, password)


def _finish_login(responses: list[bytes]) -> Credentials:
    username, password = _utf8(responses[0], "username"), _utf8(responses[1], "password")
    if not username or not password:
        raise _malformed("LOGIN needs a username and a password")
    if "\x00" in username or "\x00" in password:
        raise _malformed("LOGIN username and password must not contain NUL")
    return Credentials("", username, password)


@dataclass(frozen=True)
class _Mechanism:
    challenges: tuple[str, ...]
    """The challenge sent before each client response, in order."""
    finish: Callable[[list[bytes]], Credentials]


# The whole state machine: a mechanism is the list of challenges it sends, one per response
# it needs, and the function that turns the responses into Credentials.
_MECHANISMS: Final[dict[str, _Mechanism]] = {
    "PLAIN": _Mechanism(("",), _finish_plain),
    "LOGIN": _Mechanism((LOGIN_USERNAME_CHALLENGE, LOGIN_PASSWORD_CHALLENGE), _finish_login),
}


class SaslExchange:
    """One AUTH exchange: start() once, then step() with each client line until Credentials."""

    def __init__(self, mechanism: str) -> None:
        name = mechanism.upper() if mechanism.isascii() else ""  # "plaın".upper() == "PLAIN"
        if name not in _MECHANISMS:
            raise SaslError(504, "5.5.4", "Unrecognized authentication type")
        self.mechanism = name
        self._spec = _MECHANISMS[name]
        self._responses: list[bytes] = []
        self._started = False
        self._done = False

    def start(self, initial_response: str | None) -> str | Credentials:
        """Begin with the AUTH command's initial response ("=" is an empty one, None is none).
        Returns the challenge for "334 " (base64 text, "" for an empty challenge) or Credentials."""
        if self._started:
            raise RuntimeError("SASL exchange already started")
        self._started = True
        if initial_response is None:
            return self._spec.challenges[0]
        if initial_response == EMPTY_INITIAL_RESPONSE:
            return self._accept("")
        return self._accept(initial_response)

    def step(self, client_line: str) -> str | Credentials:
        """Feed the client's base64 line (without CRLF); "*" cancels with SaslCancelled."""
        if not self._started or self._done:
            raise RuntimeError("SASL exchange is not waiting for a client response")
        if client_line == CANCEL:
            self._done = True
            raise SaslCancelled()
        return self._accept(client_line)

    def _accept(self, line: str) -> str | Credentials:
        try:
            self._responses.append(_decode(line))
            if len(self._responses) < len(self._spec.challenges):
                return self._spec.challenges[len(self._responses)]
            self._done = True
            return self._spec.finish(self._responses)
        except SaslError:
            self._done = True  # a failed exchange is over; the client starts a new AUTH
            raise


def new_exchange(mechanism: str) -> SaslExchange:
    """An exchange for mechanism (case-insensitive); SaslError 504 5.5.4 when not offered."""
    return SaslExchange(mechanism)


def client_plain(username: str, password: str, authzid: str = "") -> str:
    """The base64 PLAIN initial response a client sends in "AUTH PLAIN <response>"."""
    if any("\x00" in part for part in (username, password, authzid)):
        raise ValueError("PLAIN credentials must not contain NUL")
    message = f"{authzid}\x00{username}\x00{password}".encode()
    return base64.b64encode(message).decode("ascii")
