"""Strict RFC 5321 / RFC 6531 parsing of envelope addresses and ESMTP parameters.

Owns the syntax of what follows ``MAIL FROM:`` and ``RCPT TO:`` - the path, its
mailbox, source routes and the ESMTP parameters - plus RFC 3461 xtext and the
ORCPT value.  Every relay-tester trick is either refused here with an SMTP
reply code, or normalised and reported so that the relay decision is made on
the real destination:

* source routes (``<@a,@b:user@c>``) are stripped and reported in
  ``Address.source_route``; the address is ``user@c``;
* percent hack, bang paths and quoted local parts that carry ``@ % ! :`` are
  reported in ``Address.routing`` (the relay policy refuses them);
* domains are lower-cased and converted to IDNA 2008 A-labels; trailing dots,
  numeric top-level labels and general address literals are refused;
* address literals are parsed with :mod:`ipaddress` and normalised.

Pure code: no I/O, linear-time scanning (the regular expressions are unambiguous and see at
most 254 characters).  Any input
string either parses or raises :class:`AddressError`.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from dataclasses import dataclass, field

import idna

MAX_LOCAL_PART = 64
"""RFC 5321 4.5.3.1.1: octets in a local part."""
MAX_DOMAIN = 255
"""RFC 5321 4.5.3.1.2: octets in a domain."""
MAX_PATH = 256
"""RFC 5321 4.5.3.1.3: octets in a path, including the angle brackets."""
MAX_LABEL = 63
"""RFC 1035: octets in one DNS label."""

SENDER_SYNTAX = "5.1.7"
"""RFC 3463: bad sender's mailbox address syntax."""
RECIPIENT_SYNTAX = "5.1.3"
"""RFC 3463: bad destination mailbox address syntax."""
PARAMETER_SYNTAX = "5.5.4"
"""RFC 3463: invalid command arguments."""
NON_ASCII_ADDRESS = "5.6.7"
"""RFC 6531: non-ASCII address without SMTPUTF8."""

_LETTERS_DIGITS = frozenset(string.ascii_letters + string.digits)
_LDH = _LETTERS_DIGITS | {"-"}
_ATEXT = _LETTERS_DIGITS | frozenset("!#$%&'*+-/=?^_`{|}~")
_UPPER_HEX = frozenset("0123456789ABCDEF")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_IPV4_CHARS = frozenset("0123456789.")
_UNICODE_DOTS = frozenset("\u3002\uff0e\uff61")
_JOINERS = frozenset("\u200c\u200d")
_ASCII_DOT_ATOM = re.compile("[" + re.escape("".join(sorted(_ATEXT))) + ".]+")   # the checks before it place the dots
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Cn", "Zs", "Zl", "Zp", "Cf"})


class AddressError(ValueError):
    """A path, address or parameter that cannot be accepted.

    ``code`` is the basic SMTP reply code (501, 553...), ``enhanced`` the
    RFC 3463 code ("5.1.3", "5.1.7", "5.5.4", "5.6.7"), ``reason`` a short
    sentence that is safe to send to the client (it never echoes input).
    """

    code: int
    enhanced: str
    reason: str

    def __init__(self, code: int, enhanced: str, reason: str) -> None:
        super().__init__(f"{code} {enhanced} {reason}")
        self.code = code
        self.enhanced = enhanced
        self.reason = reason

    def reply(self) -> str:
        """The reply line, without CRLF: ``"501 5.1.3 reason"``."""
        return f"{self.code} {self.enhanced} {self.reason}"


def _syntax(enhanced: str, reason: str) -> AddressError:
    return AddressError(501, enhanced, reason)


def _param_error(reason: str) -> AddressError:
    return AddressError(501, PARAMETER_SYNTAX, reason)


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox, normalised for the relay decision.

    ``utf8`` is true when the address is internationalised in its display form
    (non-ASCII local part, or a domain whose ``domain_unicode`` has U-labels);
    ``needs_smtputf8`` says whether relaying it requires SMTPUTF8 downstream.
    """

    local: str
    domain: str
    domain_unicode: str
    quoted: bool = False
    literal: bool = False
    routing: str | None = None
    source_route: tuple[str, ...] = ()
    utf8: bool = False

    @property
    def address(self) -> str:
        """Canonical ``local@domain``; the local part is quoted when it was sent
        quoted or cannot be written as a dot-atom (minimal escaping)."""
        local = self.local
        if self.quoted or not _is_dot_atom(local):
            local = _quote(local)
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is non-ASCII (the domain can always be
        sent as A-labels)."""
        return not self.local.isascii()

    def lookup_key(self) -> str:
        """Case-folded ``local@domain`` for mailbox and alias look-up."""
        local = self.local.casefold()
        return f"{local}@{self.domain}" if self.domain else local

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class Path:
    """The argument of MAIL FROM / RCPT TO.

    ``address`` is None for the null reverse-path ``<>``.  ``params`` maps
    upper-cased ESMTP keywords to the value as sent (xtext not decoded), or
    None for a keyword without a value.  ``raw`` is the argument as given.
    """

    address: Address | None
    params: dict[str, str | None] = field(default_factory=dict, hash=False)
    raw: str = ""

    @property
    def is_null(self) -> bool:
        return self.address is None


# --------------------------------------------------------------------------
# characters


def _unicode_allowed(char: str) -> bool:
    """A non-ASCII character acceptable in an SMTPUTF8 local part or value:
    no controls, surrogates, unassigned code points, non-ASCII spaces or
    invisible format characters (bidi overrides), except ZWNJ/ZWJ."""
    if char in _JOINERS:
        return True
    return unicodedata.category(char) not in _REFUSED_CATEGORIES


def _is_atext(char: str) -> bool:
    if char.isascii():
        return char in _ATEXT
    return _unicode_allowed(char)


def _is_dot_atom(text: str) -> bool:
    if not text or text[0] == "." or text[-1] == "." or ".." in text:
        return False
    if text.isascii():
        return _ASCII_DOT_ATOM.fullmatch(text) is not None
    return all(char == "." or _is_atext(char) for char in text)


def _quotable(char: str) -> bool:
    """May appear (escaped or not) inside a quoted local part."""
    if char.isascii():
        return " " <= char <= "~"
    return _unicode_allowed(char)


def _quote(local: str) -> str:
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _char_problem(char: str) -> str:
    """A client-safe sentence for a refused character (never echoes it)."""
    category = unicodedata.category(char)
    if category.startswith("Z"):
        return "spaces are not allowed in an address"
    if char == "\x00":
        return "NUL is not allowed in an address"
    if category == "Cc":
        return "control characters are not allowed in an address"
    return "the address contains a character that is not allowed"


# --------------------------------------------------------------------------
# local part


def _scan_quoted(text: str, enhanced: str) -> tuple[str, int]:
    """Decode the quoted-string at the start of ``text``; return the content
    and the index just after the closing quote."""
    out: list[str] = []
    index = 1
    length = len(text)
    while index < length:
        char = text[index]
        if char == '"':
            return "".join(out), index + 1
        if char == "\\":
            if index + 1 >= length:
                break
            escaped = text[index + 1]
            if not (escaped.isascii() and " " <= escaped <= "~"):
                raise _syntax(enhanced, "invalid quoted pair in local part")
            out.append(escaped)
            index += 2
            continue
        if not _quotable(char):
            raise _syntax(enhanced, _char_problem(char))
        out.append(char)
        index += 1
    raise _syntax(enhanced, "unterminated quoted local part")


def _check_dot_atom(local: str, enhanced: str) -> None:
    if not local:
        raise _syntax(enhanced, "empty local part")
    if local[0] == "." or local[-1] == ".":
        raise _syntax(enhanced, "local part must not start or end with a dot")
    if ".." in local:
        raise _syntax(enhanced, "local part must not contain two dots in a row")
    for char in local:
        if char == '"':
            raise _syntax(enhanced, "misplaced quote in local part")
        if char != "." and not _is_atext(char):
            raise _syntax(enhanced, _char_problem(char))


def _routing_of(local: str, quoted: bool) -> str | None:
    if quoted:
        for char, name in (("@", "quoted-at"), ("%", "quoted-percent"),
                           ("!", "quoted-bang"), (":", "quoted-colon")):
            if char in local:
                return name
        return None
    if "%" in local:
        return "percent-hack"
    if "!" in local:
        return "bang-path"
    return None


def _split_local(text: str, enhanced: str) -> tuple[str, bool, str]:
    """Return (decoded NFC local part, quoted, domain text)."""
    if text.startswith('"'):
        local, end = _scan_quoted(text, enhanced)
        wire_local, rest = text[:end], text[end:]
        if not rest.startswith("@"):
            raise _syntax(enhanced, "quoted local part must be followed by @domain")
        quoted = True
    else:
        at = text.find("@")
        if at < 0:
            raise _syntax(enhanced, "address must have the form local-part@domain")
        wire_local, rest = text[:at], text[at:]
        local = wire_local
        quoted = False
    if _octets(wire_local) > MAX_LOCAL_PART:
        raise _syntax(enhanced, f"local part longer than {MAX_LOCAL_PART} octets")
    if not local.isascii():
        local = unicodedata.normalize("NFC", local)
    if quoted:
        if not local:
            raise _syntax(enhanced, "empty local part")
        for char in local:
            if not _quotable(char):
                raise _syntax(enhanced, _char_problem(char))
    else:
        _check_dot_atom(local, enhanced)
    canonical = _quote(local) if quoted else local
    if _octets(canonical) > MAX_LOCAL_PART:
        raise _syntax(enhanced, f"local part longer than {MAX_LOCAL_PART} octets")
    return local, quoted, rest[1:]


# --------------------------------------------------------------------------
# domain


def _idna_error(enhanced: str) -> AddressError:
    return AddressError(553, enhanced, "domain is not a valid internationalized domain name")


def _check_a_label(label: str, enhanced: str) -> str:
    """Validate an ``xn--`` label by decoding it; return its U-label."""
    try:
        unicode_label = idna.decode(label)
        round_trip = idna.encode(unicode_label).decode("ascii")
    except (UnicodeError, ValueError):
        raise _idna_error(enhanced) from None
    if round_trip != label:
        raise _idna_error(enhanced)
    return unicode_label


def _check_label_structure(labels: list[str], enhanced: str) -> None:
    for position, label in enumerate(labels):
        if label:
            continue
        if position == len(labels) - 1:
            raise _syntax(enhanced, "domain must not end with a dot")
        if position == 0:
            raise _syntax(enhanced, "domain must not start with a dot")
        raise _syntax(enhanced, "domain must not contain two dots in a row")


def _domain_char_problem(char: str) -> str:
    if char == "@":
        return "address contains more than one @"
    if unicodedata.category(char)[0] in "ZC":
        return _char_problem(char)
    return "domain may contain only letters, digits, hyphens and dots"


def _ascii_domain(text: str, enhanced: str) -> tuple[str, str]:
    """Validate an LDH domain; return (lower-case A-label form, U-label form)."""
    labels = text.split(".")
    _check_label_structure(labels, enhanced)
    unicode_labels: list[str] = []
    for label in labels:
        for char in label:
            if char not in _LDH:
                raise _syntax(enhanced, _domain_char_problem(char))
        if len(label) > MAX_LABEL:
            raise _syntax(enhanced, f"domain label longer than {MAX_LABEL} characters")
        if label[0] == "-" or label[-1] == "-":
            raise _syntax(enhanced, "domain label must not start or end with a hyphen")
        label = label.lower()
        unicode_labels.append(_check_a_label(label, enhanced) if label.startswith("xn--") else label)
    if labels[-1].isdigit():
        raise _syntax(enhanced, "an IP address must be written as an address literal, e.g. [192.0.2.1]")
    domain = text.lower()
    if len(domain) > MAX_DOMAIN:
        raise _syntax(enhanced, f"domain longer than {MAX_DOMAIN} octets")
    return domain, ".".join(unicode_labels)


def _unicode_domain(text: str, enhanced: str) -> tuple[str, str]:
    """Convert an RFC 6531 domain with U-labels to A-labels (IDNA 2008, UTS 46)."""
    if any(char in _UNICODE_DOTS for char in text):
        raise _syntax(enhanced, "domain labels must be separated by '.'")
    labels = text.split(".")
    _check_label_structure(labels, enhanced)
    for char in text:
        if char.isascii() and char not in _LDH and char != ".":
            raise _syntax(enhanced, _domain_char_problem(char))
    try:
        encoded = idna.encode(text, strict=True, uts46=True, std3_rules=True).decode("ascii")
    except (UnicodeError, ValueError):
        raise _idna_error(enhanced) from None
    if encoded.count(".") != len(labels) - 1:
        raise _idna_error(enhanced)
    return _ascii_domain(encoded, enhanced)


def _address_literal(text: str, enhanced: str) -> str:
    """Normalise ``[192.0.2.1]`` / ``[IPv6:...]``; refuse anything else."""
    if not text.endswith("]") or text.count("]") != 1 or text.count("[") != 1:
        raise _syntax(enhanced, "malformed address literal")
    inner = text[1:-1]
    tag, colon, value = inner.partition(":")
    if not colon:
        if not inner or not set(inner) <= _IPV4_CHARS:
            raise _syntax(enhanced, "invalid IPv4 address literal")
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise _syntax(enhanced, "invalid IPv4 address literal") from None
    if tag.lower() != "ipv6":
        if set(inner) <= _IPV6_CHARS:
            raise _syntax(enhanced, "an IPv6 address literal must be written [IPv6:address]")
        if tag and set(tag) <= _LDH and tag[-1] != "-" and tag[0] != "-":
            raise AddressError(553, enhanced, "general address literals are not accepted")
        raise _syntax(enhanced, "malformed address literal")
    if not value or not set(value) <= _IPV6_CHARS:
        raise _syntax(enhanced, "invalid IPv6 address literal")
    try:
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise _syntax(enhanced, "invalid IPv6 address literal") from None
    if address.ipv4_mapped is not None:
        return f"[{address.ipv4_mapped}]"
    return f"[ipv6:{address.compressed}]"


def _parse_domain(text: str, enhanced: str, *, allow_literal: bool) -> tuple[str, str, bool]:
    """Return (normalised domain, display domain, literal)."""
    if not text:
        raise _syntax(enhanced, "empty domain")
    if _octets(text) > MAX_DOMAIN:
        raise _syntax(enhanced, f"domain longer than {MAX_DOMAIN} octets")
    if text.startswith("["):
        if not allow_literal:
            raise _syntax(enhanced, "address literals are not allowed here")
        literal = _address_literal(text, enhanced)
        return literal, literal, True
    if text.isascii():
        domain, display = _ascii_domain(text, enhanced)
    else:
        domain, display = _unicode_domain(text, enhanced)
    return domain, display, False


# --------------------------------------------------------------------------
# mailboxes and paths


def _check_encoding(text: str, allow_utf8: bool, enhanced: str) -> None:
    if text.isascii():
        return
    if not allow_utf8:
        raise AddressError(553, NON_ASCII_ADDRESS, "non-ASCII address requires SMTPUTF8")
    if any("\ud800" <= char <= "\udfff" for char in text):
        raise _syntax(enhanced, "address is not valid UTF-8")


# The common mailbox, recognised in one step: an ASCII dot-atom local part without % or ! (no
# routing to report), and LDH labels of 1-63 characters none of which is an A-label (those are
# decoded and checked by the full parser). Anything else, including every input the full parser
# refuses, takes the full parser; a property test checks that both give the same Address.
_LDH_LABEL = r"(?![xX][nN]--)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE_MAILBOX = re.compile(
    r"([A-Za-z0-9#$&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9#$&'*+/=?^_`{|}~-]+)*)"
    rf"@((?:{_LDH_LABEL}\.)*{_LDH_LABEL})")


def _simple_mailbox(text: str) -> Address | None:
    """``text`` as an Address when it is the common, plain kind; None sends it to the parser."""
    if len(text) > MAX_PATH - 2:
        return None
    match = _SIMPLE_MAILBOX.fullmatch(text)
    if match is None:
        return None
    local, domain = match.groups()
    if len(local) > MAX_LOCAL_PART or domain.rpartition(".")[2].isdigit():
        return None
    domain = domain.lower()
    return Address(local=local, domain=domain, domain_unicode=domain)


def _parse_mailbox(text: str, enhanced: str, allow_utf8: bool) -> Address:
    simple = _simple_mailbox(text)
    if simple is not None:
        return simple
    _check_encoding(text, allow_utf8, enhanced)
    if _octets(text) > MAX_PATH - 2:
        raise _syntax(enhanced, f"address longer than {MAX_PATH - 2} octets")
    local, quoted, domain_text = _split_local(text, enhanced)
    domain, display, literal = _parse_domain(domain_text, enhanced, allow_literal=True)
    address = Address(
        local=local,
        domain=domain,
        domain_unicode=display,
        quoted=quoted,
        literal=literal,
        routing=_routing_of(local, quoted),
        utf8=not (local.isascii() and display.isascii()),
    )
    if _octets(address.address) > MAX_PATH - 2:
        raise _syntax(enhanced, f"address longer than {MAX_PATH - 2} octets")
    return address


def _parse_source_route(route: str, enhanced: str) -> tuple[str, ...]:
    hops: list[str] = []
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise _syntax(enhanced, "malformed source route")
        domain, _display, _literal = _parse_domain(hop[1:], enhanced, allow_literal=False)
        hops.append(domain)
    return tuple(hops)


def _parse_path_content(content: str, enhanced: str, allow_utf8: bool) -> Address:
    """Parse what is between ``<`` and ``>``: ``[A-d-l ":"] Mailbox``."""
    _check_encoding(content, allow_utf8, enhanced)
    if _octets(content) > MAX_PATH - 2:
        raise _syntax(enhanced, f"path longer than {MAX_PATH} octets")
    route: tuple[str, ...] = ()
    mailbox = content
    if content.startswith("@"):
        colon = content.find(":")
        if colon < 0:
            raise _syntax(enhanced, "empty local part")
        route = _parse_source_route(content[:colon], enhanced)
        mailbox = content[colon + 1:]
        if not mailbox:
            raise _syntax(enhanced, "source route without a mailbox")
    address = _parse_mailbox(mailbox, enhanced, allow_utf8)
    if not route:
        return address
    return Address(
        local=address.local,
        domain=address.domain,
        domain_unicode=address.domain_unicode,
        quoted=address.quoted,
        literal=address.literal,
        routing=address.routing,
        source_route=route,
        utf8=address.utf8,
    )


def _split_path(arg: str, enhanced: str) -> tuple[str, str]:
    """Split the command argument into the path content (between the angle
    brackets) and the parameter text after it."""
    if arg[:1] == "<":          # the common case, without quotes: the first > ends the path
        end = arg.find(">", 1, MAX_PATH + 1)
        if end > 0 and '"' not in arg[1:end] and "<" not in arg[1:end]:
            rest = arg[end + 1:]
            if rest and rest[0] != " ":
                raise _param_error("parameters must be separated from the address by a space")
            return arg[1:end], rest
    return _split_path_scan(arg, enhanced)


def _split_path_scan(arg: str, enhanced: str) -> tuple[str, str]:
    """``_split_path`` character by character: spaces before <, quoted > and every error."""
    start = 0
    length = len(arg)
    while start < length and arg[start] == " ":
        start += 1
    if start == length:
        raise _syntax(enhanced, "missing address: use <address>")
    if arg[start] != "<":
        raise _syntax(enhanced, "the address must be enclosed in angle brackets <>")
    index = start + 1
    in_quotes = False
    limit = min(length, start + MAX_PATH + 1)
    while index < limit:
        char = arg[index]
        if in_quotes:
            if char == "\\":
                index += 1
            elif char == '"':
                in_quotes = False
        elif char == '"':
            in_quotes = True
        elif char == "<":
            raise _syntax(enhanced, "unexpected < in address")
        elif char == ">":
            break
        index += 1
    else:
        if index >= start + MAX_PATH + 1:
            raise _syntax(enhanced, f"path longer than {MAX_PATH} octets")
        raise _syntax(enhanced, "missing closing > after the address")
    rest = arg[index + 1:]
    if rest and rest[0] != " ":
        raise _param_error("parameters must be separated from the address by a space")
    return arg[start + 1:index], rest


# --------------------------------------------------------------------------
# ESMTP parameters


def _named(keyword: str) -> str:
    """The keyword for a reply text: already validated LDH, shortened if long."""
    return keyword if len(keyword) <= 20 else keyword[:20] + "..."


def _check_keyword(keyword: str) -> None:
    if not keyword:
        raise _param_error("empty parameter keyword")
    if keyword[0] not in _LETTERS_DIGITS or not all(char in _LDH for char in keyword):
        raise _param_error("malformed parameter keyword")


def _tokenise_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        keyword, equals, value = token.partition("=")
        _check_keyword(keyword)
        keyword = keyword.upper()
        if equals and not value:
            raise _param_error(f"empty value for parameter {_named(keyword)}")
        if keyword in params:
            raise _param_error(f"duplicate parameter {_named(keyword)}")
        params[keyword] = value if equals else None
    return params


def _check_param_values(params: dict[str, str | None], utf8: bool) -> None:
    for keyword, value in params.items():
        if value is None:
            continue
        for char in value:
            if char.isascii():
                if not ("!" <= char <= "~") or char == "=":
                    raise _param_error(f"malformed value for parameter {_named(keyword)}")
            elif not utf8:
                raise _param_error(f"non-ASCII value for parameter {_named(keyword)} requires SMTPUTF8")
            elif not _unicode_allowed(char):
                raise _param_error(f"malformed value for parameter {_named(keyword)}")


def _smtputf8_requested(params: dict[str, str | None], offered: bool) -> bool:
    return offered and "SMTPUTF8" in params and params["SMTPUTF8"] is None


# --------------------------------------------------------------------------
# public entry points


def parse_mail_from(arg: str, *, smtputf8_offered: bool = True) -> Path:
    """Parse the text after ``MAIL FROM:``.

    Spaces before ``<`` are tolerated.  ``<>`` gives ``Path(address=None)``.
    Non-ASCII in the path needs SMTPUTF8 offered and the SMTPUTF8 parameter.
    Syntax errors are 501 5.1.7; parameter errors 501 5.5.4.
    """
    content, rest = _split_path(arg, SENDER_SYNTAX)
    params = _tokenise_params(rest)
    utf8 = _smtputf8_requested(params, smtputf8_offered)
    _check_param_values(params, utf8)
    if not content:
        return Path(address=None, params=params, raw=arg)
    return Path(address=_parse_path_content(content, SENDER_SYNTAX, utf8), params=params, raw=arg)


def parse_rcpt_to(arg: str, *, smtputf8_offered: bool = True, utf8_session: bool = False) -> Path:
    """Parse the text after ``RCPT TO:``.

    ``<>`` is refused; ``<Postmaster>`` (any case, no domain) gives an Address
    with local "postmaster" and domain "" (RFC 5321 4.5.1).  Non-ASCII needs
    ``utf8_session`` (MAIL carried SMTPUTF8).  Syntax errors are 501 5.1.3.
    """
    content, rest = _split_path(arg, RECIPIENT_SYNTAX)
    params = _tokenise_params(rest)
    utf8 = smtputf8_offered and utf8_session
    _check_param_values(params, utf8)
    if not content:
        raise _syntax(RECIPIENT_SYNTAX, "the null address <> is not a valid recipient")
    if content.isascii() and content.lower() == "postmaster":
        postmaster = Address(local="postmaster", domain="", domain_unicode="")
        return Path(address=postmaster, params=params, raw=arg)
    return Path(address=_parse_path_content(content, RECIPIENT_SYNTAX, utf8), params=params, raw=arg)


def parse_address(text: str, *, allow_utf8: bool) -> Address:
    """Parse a bare ``local@domain`` (no angle brackets, no source route).

    Used for configuration and headers; errors carry 5.1.3.
    """
    return _parse_mailbox(text, RECIPIENT_SYNTAX, allow_utf8)


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` with upper-case hex); the octets must
    be UTF-8.  Malformed xtext raises 501 5.5.4."""
    out = bytearray()
    index = 0
    length = len(value)
    while index < length:
        char = value[index]
        if char == "+":
            digits = value[index + 1:index + 3]
            if len(digits) != 2 or not set(digits) <= _UPPER_HEX:
                raise _param_error("malformed xtext: + must be followed by two upper-case hex digits")
            out.append(int(digits, 16))
            index += 3
        elif "!" <= char <= "~" and char != "=":
            out.append(ord(char))
            index += 1
        else:
            raise _param_error("malformed xtext")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _param_error("xtext does not decode to UTF-8") from None


def envid_decode(value: str) -> str:
    """Decode an ENVID parameter (RFC 3461 4.4): xtext whose decoded value is printable
    US-ASCII, space included. Control characters are refused (501 5.5.4): the value goes into
    the Original-Envelope-Id field of every DSN, where a CR LF would add fields of the sender's
    choosing."""
    decoded = xtext_decode(value)
    if any(not (" " <= char <= "~") for char in decoded):
        raise _param_error("ENVID must decode to printable US-ASCII characters (RFC 3461 4.4)")
    return decoded


def xtext_encode(value: str) -> str:
    """Encode text as RFC 3461 xtext (UTF-8 octets; ``+``, ``=``, SP,
    controls and non-ASCII octets as ``+XX``)."""
    try:
        octets = value.encode("utf-8")
    except UnicodeEncodeError:
        raise _param_error("text is not valid Unicode") from None
    return "".join(
        chr(octet) if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D) else f"+{octet:02X}"
        for octet in octets
    )


def _decode_utf8_addr(value: str) -> str:
    """Decode RFC 6533 utf-8-addr-xtext / utf-8-addr-unitext (``\\x{HEX}``)."""
    out: list[str] = []
    index = 0
    length = len(value)
    while index < length:
        char = value[index]
        if char == "\\":
            if value[index + 1:index + 3] != "x{":
                raise _param_error("malformed ORCPT escape")
            close = value.find("}", index + 3, index + 10)
            digits = value[index + 3:close] if close > 0 else ""
            if not 2 <= len(digits) <= 6 or not set(digits) <= _UPPER_HEX:
                raise _param_error("malformed ORCPT escape")
            if len(digits) > 2 and digits[0] == "0":
                raise _param_error("malformed ORCPT escape")
            point = int(digits, 16)
            if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
                raise _param_error("malformed ORCPT escape")
            out.append(chr(point))
            index = close + 1
        elif char.isascii():
            if not ("!" <= char <= "~") or char in "+=":
                raise _param_error("malformed ORCPT address")
            out.append(char)
            index += 1
        else:
            if not _unicode_allowed(char):
                raise _param_error("malformed ORCPT address")
            out.append(char)
            index += 1
    return "".join(out)


def parse_orcpt(value: str) -> tuple[str, str]:
    """Parse an ORCPT value ``addr-type;xtext`` (RFC 3461 4.2).

    Returns (lower-case address type, decoded address).  The ``utf-8`` type
    (RFC 6533) is decoded with ``\\x{HEX}`` escapes, every other type as
    xtext.  Malformed values, and addresses that decode to control
    characters (which would end up in a DSN header), raise 501 5.5.4.
    """
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon:
        raise _param_error("ORCPT must have the form type;address")
    if not addr_type or not all(char in _ATEXT for char in addr_type):
        raise _param_error("malformed ORCPT address type")
    addr_type = addr_type.lower()
    decoded = _decode_utf8_addr(encoded) if addr_type == "utf-8" else xtext_decode(encoded)
    if not decoded:
        raise _param_error("empty ORCPT address")
    if any(unicodedata.category(char) == "Cc" for char in decoded):
        raise _param_error("ORCPT address contains control characters")
    return addr_type, decoded
