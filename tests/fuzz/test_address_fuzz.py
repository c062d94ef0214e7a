"""Property tests for relaywarden.protocol.address: any input either parses or raises AddressError,
and whatever parses is normalised, within RFC limits, and stable when re-parsed from its canonical form."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaywarden.protocol.address import (
    MAX_LABEL,
    MAX_LOCAL_PART,
    MAX_PATH,
    Address,
    AddressError,
    parse_address,
    parse_mail_from,
    parse_orcpt,
    parse_rcpt_to,
    xtext_decode,
    xtext_encode,
)

FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

LOCAL_VALID = st.sampled_from(["a", "Z", "0", "user", "postmaster", "-", "+", "=", "_", "é", "ß", "x.y"])
LOCAL_TRICKS = st.sampled_from(
    [".", "..", '"', "\\", "@", "%", "!", " ", "\x00", "\t", "e\u0301", ":", ",", "<", ">", "[", "]",
     "\u037e", "\u202e", "\u200d", "\ud800", "\u00a0", "\x7f", "\u212a"]
)
DOMAIN_VALID = st.sampled_from(["a", "b", "example", "test", "mx-1", "xn--bcher-kva", "bücher", "E", "1"])
DOMAIN_TRICKS = st.sampled_from(
    ["-", ".", "..", "xn--", "[", "]", "192.0.2.1", ":", "IPv6:", "::1", "ffff", "\u0430", "\u3002", "@", " ",
     "\x00", "\uff45", "\u2488", "%", "a" * 63, "\U0001f4a9", "_", "[192.0.2.1]", "[IPv6:::ffff:127.0.0.1]"]
)
PARAM_VALID = st.sampled_from(
    ["SIZE=10", "BODY=8BITMIME", "SMTPUTF8", "ORCPT=rfc822;a+40b", "X-Y", "AUTH=<>", "NOTIFY=NEVER", "ENVID=é"]
)
LITERALS = st.sampled_from(
    ["[192.0.2.1]", "[IPv6:2001:DB8::1]", "[IPv6:::ffff:127.0.0.1]", "[ipv6:::1]", "[127.0.0.1]", "[1.2.3]",
     "[IPv6:fe80::1%eth0]", "[tag:x]", "[2001:db8::1]", "[IPv6:1.2.3.4]", "[192.0.2.1].test", "[]"]
)
PARAM_TRICKS = st.sampled_from(["=", "A=", "smtputf8", " ", "\t", "a=b=c", "-X", "\x00", "SIZE=1"])


def _mixed(valid: st.SearchStrategy[str], tricks: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly valid pieces with the occasional trick, so that many paths parse."""
    return st.one_of(valid, valid, valid, tricks)


LOCAL_PIECES = _mixed(LOCAL_VALID, LOCAL_TRICKS)
DOMAIN_PIECES = st.one_of(_mixed(DOMAIN_VALID, DOMAIN_TRICKS), st.just("."), st.just("."))
PARAM_PIECES = st.one_of(PARAM_VALID, PARAM_VALID, PARAM_VALID, PARAM_VALID, PARAM_TRICKS)


def _joined(pieces: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(pieces, min_size=1, max_size=max_size).map("".join)


@st.composite
def near_miss_paths(draw: st.DrawFn) -> str:
    """Paths assembled from the pieces relay testers use: routes, quotes, literals, IDN, params."""
    local = draw(_joined(LOCAL_PIECES, 6))
    if draw(st.booleans()):
        local = '"' + local + '"'
    domain = draw(st.one_of(_joined(DOMAIN_PIECES, 6), _joined(DOMAIN_PIECES, 6), LITERALS))
    route = ""
    if draw(st.integers(0, 3)) == 0:
        hops = draw(st.lists(_joined(DOMAIN_PIECES, 3), min_size=1, max_size=3))
        route = ",".join("@" + hop for hop in hops) + ":"
    params = draw(st.lists(PARAM_PIECES, max_size=3))
    spaces = " " * draw(st.integers(0, 2))
    return f"{spaces}<{route}{local}@{domain}> " + " ".join(params)


def _check_invariants(address: Address) -> None:
    assert address.domain == address.domain.lower()
    assert address.domain.isascii()
    assert not address.domain.endswith(".")
    assert "@" not in address.domain
    if not address.literal and address.domain:
        assert all(0 < len(label) <= MAX_LABEL for label in address.domain.split("."))
        assert not address.domain.split(".")[-1].isdigit()
    assert 0 < len(address.local.encode("utf-8")) <= MAX_LOCAL_PART
    assert len(address.address.encode("utf-8")) <= MAX_PATH - 2
    if not address.quoted:
        assert address.routing is not None or not (set(address.local) & set("%!@"))
    else:
        assert address.routing is not None or not (set(address.local) & set("%!@:"))
    assert address.utf8 == (not (address.local.isascii() and address.domain_unicode.isascii()))


def _same_after_reparse(address: Address, *, utf8: bool) -> None:
    canonical = f"<{address.address}>"
    expected = dataclasses.replace(address, source_route=())
    again = parse_rcpt_to(canonical, utf8_session=utf8).address
    assert again == expected
    sender = parse_mail_from(canonical + (" SMTPUTF8" if utf8 else "")).address if address.domain else expected
    assert sender == expected


def _try(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except AddressError as error:
        assert error.code in (501, 553)
        assert error.enhanced in ("5.1.3", "5.1.7", "5.5.4", "5.6.7")
        assert error.reason and "\n" not in error.reason and "\r" not in error.reason
        return None


@FUZZ
@given(st.text(max_size=300), st.booleans(), st.booleans())
def test_random_text_never_crashes(text: str, offered: bool, session: bool) -> None:
    for arg in (text, "<" + text, "<" + text + ">", " <" + text + "> SMTPUTF8"):
        path = _try(parse_mail_from, arg, smtputf8_offered=offered)
        if path is not None and path.address is not None:
            _check_invariants(path.address)
        path = _try(parse_rcpt_to, arg, smtputf8_offered=offered, utf8_session=session)
        if path is not None:
            assert path.address is not None
            _check_invariants(path.address)
    _try(parse_address, text, allow_utf8=offered)
    _try(xtext_decode, text)
    _try(parse_orcpt, text)
    _try(parse_orcpt, "rfc822;" + text)
    _try(parse_orcpt, "utf-8;" + text)


@settings(FUZZ, max_examples=1500)
@given(near_miss_paths(), st.booleans())
def test_near_miss_paths_parse_or_refuse_and_round_trip(arg: str, utf8: bool) -> None:
    path = _try(parse_rcpt_to, arg, utf8_session=utf8)
    if path is not None:
        assert path.address is not None
        _check_invariants(path.address)
        _same_after_reparse(path.address, utf8=utf8)
        assert all(key == key.upper() for key in path.params)
    sender = _try(parse_mail_from, arg)
    if sender is not None and sender.address is not None:
        _check_invariants(sender.address)
        _same_after_reparse(sender.address, utf8=True)


@FUZZ
@given(near_miss_paths())
def test_bare_mailbox_round_trip(arg: str) -> None:
    text = arg.strip().split(" ")[0][1:-1] if arg.strip().startswith("<") else arg
    address = _try(parse_address, text, allow_utf8=True)
    if address is not None:
        _check_invariants(address)
        assert parse_address(address.address, allow_utf8=True) == address


@FUZZ
@given(
    st.text(alphabet=st.sampled_from("aZ09.-_+%!#'{}|~"), min_size=1, max_size=20),
    st.lists(st.text(alphabet=st.sampled_from("abcxyz019-"), min_size=1, max_size=12), min_size=1, max_size=4),
)
def test_plain_addresses_keep_their_meaning(local: str, labels: list[str]) -> None:
    """A syntactically valid dot-atom@domain parses to exactly that (domain lower-cased), or is refused."""
    domain = ".".join(labels)
    address = _try(parse_address, f"{local}@{domain.upper()}", allow_utf8=False)
    if address is not None:
        assert address.local == local
        assert address.domain == domain
        assert address.routing == ("percent-hack" if "%" in local else "bang-path" if "!" in local else None)


@FUZZ
@given(st.text(max_size=100).filter(lambda text: not any("\ud800" <= char <= "\udfff" for char in text)))
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text


@FUZZ
@given(st.text(max_size=60))
def test_orcpt_never_yields_control_characters(text: str) -> None:
    encoded = _try(xtext_encode, text) or ""
    for value in ("rfc822;" + text, "rfc822;" + encoded, "utf-8;" + text):
        result = _try(parse_orcpt, value)
        if result is not None:
            assert not any(ord(char) < 32 or ord(char) == 127 for char in result[1])


# --- the fast path for plain mailboxes agrees with the full parser -------------------------------

from relaywarden.protocol import address as address_module  # noqa: E402

_LOCAL_TEXT = st.text(alphabet="abcXYZ019-+=_#~{}/'`", min_size=1, max_size=8)
_LABEL_TEXT = st.text(alphabet="abcXYZ019-", min_size=1, max_size=8)
SIMPLE_LOCAL = st.lists(st.one_of(
    _LOCAL_TEXT, _LOCAL_TEXT, _LOCAL_TEXT, _LOCAL_TEXT, st.just("."),
    st.sampled_from(["%", "!", '"', " ", "é", "\x00", "@", "a" * 30])), min_size=1, max_size=5).map("".join)
SIMPLE_LABEL = st.one_of(
    _LABEL_TEXT, _LABEL_TEXT, _LABEL_TEXT, _LABEL_TEXT,
    st.sampled_from(["xn--", "XN--", "xn--bcher-kva", "a" * 61, "b" * 62, "c" * 63, "d" * 64, "1", "00", "",
                     "-a", "a-", "é", "_", "[1.2.3.4]", "a b"]))
SIMPLE_DOMAIN = st.lists(SIMPLE_LABEL, min_size=1, max_size=5).map(".".join)
CLEAN_MAILBOXES = st.tuples(
    st.lists(_LOCAL_TEXT, min_size=1, max_size=3).map(".".join),
    st.lists(st.one_of(_LABEL_TEXT, _LABEL_TEXT, _LABEL_TEXT, st.sampled_from(["b" * 62, "c" * 63, "d" * 64])),
             min_size=1, max_size=4).map(".".join)).map("@".join)
SIMPLE_MAILBOXES = st.one_of(CLEAN_MAILBOXES, CLEAN_MAILBOXES, st.tuples(SIMPLE_LOCAL, SIMPLE_DOMAIN).map("@".join),
                             st.lists(st.sampled_from(["a", "@", ".", "b", "%"]), min_size=1, max_size=8).map("".join))


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(SIMPLE_MAILBOXES, st.booleans())
def test_plain_mailbox_fast_path_equals_the_full_parser(text: str, utf8: bool) -> None:
    fast = address_module._simple_mailbox(text)
    original = address_module._simple_mailbox
    address_module._simple_mailbox = lambda _text: None
    try:
        full = address_module._parse_mailbox(text, address_module.RECIPIENT_SYNTAX, utf8)
    except AddressError:
        full = None
    finally:
        address_module._simple_mailbox = original
    if fast is not None:        # whatever the fast path accepts, the full parser accepts alike
        assert full == fast, (text, full, fast)


@given(st.sampled_from(["user@example.test", "First.Last+tag@Mail.Example.ORG", "a@b", "x-1@a-1.b-2.c",
                        "o'brien@example.com", "~{x}@x" + ".y" * 3]))
def test_plain_mailbox_fast_path_takes_the_common_addresses(text: str) -> None:
    fast = address_module._simple_mailbox(text)
    assert fast is not None and fast.domain == text.split("@")[1].lower() and fast.routing is None


@given(st.sampled_from(["a%b@example.test", "a!b@example.test", "a@xn--bcher-kva.example", "a@XN--bcher-kva.example",
                        "a@1.2.3.4", "a@example.123", "a@-x.test", "a@x-.test", "a..b@x", ".a@x", "a.@x",
                        '"a"@x', "a@" + "b" * 64 + ".test", "a" * 65 + "@x", "a@[192.0.2.1]", "é@x.test",
                        "a@x..test", "a@x.test.", "a@@x"]))
def test_plain_mailbox_fast_path_leaves_the_rest_to_the_parser(text: str) -> None:
    assert address_module._simple_mailbox(text) is None


PATH_PIECES = st.one_of(
    st.sampled_from(["<", ">", '"', "\\", " ", "a", "@", "b.example", "SIZE=10", "=", "<>", '"a>b"', "x" * 120]),
    st.text(alphabet='ab@.<> "\\=', min_size=1, max_size=5))


def _outcome(split, arg: str):
    try:
        return split(arg, address_module.RECIPIENT_SYNTAX)
    except AddressError as exc:
        return exc.reply()


@FUZZ
@given(st.lists(PATH_PIECES, min_size=1, max_size=10).map("".join))
def test_path_split_fast_path_equals_the_scan(arg: str) -> None:
    assert _outcome(address_module._split_path, arg) == _outcome(address_module._split_path_scan, arg), arg
