"""Unit tests for relaywarden.protocol.address: paths, mailboxes, relay tricks, ESMTP parameters, xtext, ORCPT."""

from __future__ import annotations

import time

import pytest

from relaywarden.protocol.address import (
    Address,
    AddressError,
    Path,
    parse_address,
    parse_mail_from,
    parse_orcpt,
    parse_rcpt_to,
    xtext_decode,
    xtext_encode,
)


def rcpt(arg: str, **kwargs: bool) -> Address:
    path = parse_rcpt_to(arg, **kwargs)
    assert path.address is not None
    return path.address


def mail(arg: str, **kwargs: bool) -> Address:
    path = parse_mail_from(arg, **kwargs)
    assert path.address is not None
    return path.address


def refused(call, arg: str, **kwargs: bool) -> AddressError:
    with pytest.raises(AddressError) as info:
        call(arg, **kwargs)
    return info.value


# ---------------------------------------------------------------- valid paths

VALID_RECIPIENTS = [
    ("<user@example.test>", "user", "example.test"),
    ("<User.Name@Example.TEST>", "User.Name", "example.test"),
    ("<first.last+tag@sub.example.test>", "first.last+tag", "sub.example.test"),
    ("<a@b>", "a", "b"),
    ("<x-y_z=1@mail-1.example.test>", "x-y_z=1", "mail-1.example.test"),
    ("<{weird}/#$&'*?^`|~@example.test>", "{weird}/#$&'*?^`|~", "example.test"),
    ("  <user@example.test>", "user", "example.test"),
    ("<user@example.test>   ", "user", "example.test"),
    ("<user@1example.test>", "user", "1example.test"),
    ("<user@example.test1>", "user", "example.test1"),
    ("<user@xn--bcher-kva.example>", "user", "xn--bcher-kva.example"),
    ("<user@XN--BCHER-KVA.example>", "user", "xn--bcher-kva.example"),
    ("<user@localhost>", "user", "localhost"),
]


@pytest.mark.parametrize(("arg", "local", "domain"), VALID_RECIPIENTS)
def test_valid_recipient(arg: str, local: str, domain: str) -> None:
    address = rcpt(arg)
    assert (address.local, address.domain) == (local, domain)
    assert address.routing is None
    assert address.source_route == ()


@pytest.mark.parametrize(("arg", "local", "domain"), VALID_RECIPIENTS)
def test_valid_sender(arg: str, local: str, domain: str) -> None:
    address = mail(arg)
    assert (address.local, address.domain) == (local, domain)


def test_null_reverse_path() -> None:
    path = parse_mail_from("<>")
    assert path.address is None and path.is_null and path.params == {}
    assert parse_mail_from(" <> SIZE=100").params == {"SIZE": "100"}


def test_path_keeps_raw_argument() -> None:
    path = parse_mail_from(" <a@b.test> BODY=8BITMIME")
    assert isinstance(path, Path)
    assert path.raw == " <a@b.test> BODY=8BITMIME"


@pytest.mark.parametrize("arg", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", " <PostMaster> NOTIFY=NEVER"])
def test_rcpt_postmaster_without_domain(arg: str) -> None:
    address = rcpt(arg)
    assert address.local == "postmaster" and address.domain == ""
    assert address.address == "postmaster"
    assert address.lookup_key() == "postmaster"


@pytest.mark.parametrize("arg", ["<Postmaster>", '<"postmaster">', "<postmaſter>", "<@a.test:postmaster>"])
def test_postmaster_without_domain_only_for_rcpt_and_exact(arg: str) -> None:
    assert refused(parse_mail_from, arg, smtputf8_offered=False).code in (501, 553)
    if arg != "<Postmaster>":
        assert refused(parse_rcpt_to, arg).code in (501, 553)


def test_postmaster_with_domain_is_ordinary() -> None:
    address = rcpt("<Postmaster@Example.TEST>")
    assert address.local == "Postmaster" and address.domain == "example.test"


# ---------------------------------------------------------------- case, lookup, canonical form

def test_domain_lowercased_local_case_preserved() -> None:
    address = rcpt("<John.Smith@EXAMPLE.Test>")
    assert address.local == "John.Smith"
    assert address.domain == "example.test"
    assert address.address == "John.Smith@example.test"
    assert address.lookup_key() == "john.smith@example.test"
    assert str(address) == "John.Smith@example.test"


def test_lookup_key_casefolds_unicode() -> None:
    address = rcpt("<Straße@example.test>", utf8_session=True)
    assert address.lookup_key() == "strasse@example.test"


def test_quoted_and_unquoted_same_lookup_key() -> None:
    quoted = rcpt('<"john"@example.test>')
    plain = rcpt("<john@example.test>")
    assert quoted.quoted and not plain.quoted
    assert quoted.lookup_key() == plain.lookup_key()
    assert quoted.address == '"john"@example.test'


@pytest.mark.parametrize(
    ("arg", "local", "canonical"),
    [
        ('<"john smith"@example.test>', "john smith", '"john smith"@example.test'),
        ('<"a\\"b"@example.test>', 'a"b', '"a\\"b"@example.test'),
        ('<"a\\\\b"@example.test>', "a\\b", '"a\\\\b"@example.test'),
        ('<"a\\bc"@example.test>', "abc", '"abc"@example.test'),
        ('<"a..b"@example.test>', "a..b", '"a..b"@example.test'),
        ('<".a"@example.test>', ".a", '".a"@example.test'),
        ('<"a>b"@example.test>', "a>b", '"a>b"@example.test'),
        ('<"(comment)"@example.test>', "(comment)", '"(comment)"@example.test'),
    ],
)
def test_quoted_local_parts(arg: str, local: str, canonical: str) -> None:
    address = rcpt(arg)
    assert address.local == local
    assert address.quoted is True
    assert address.routing is None
    assert address.address == canonical
    assert rcpt(f"<{address.address}>") == address


def test_quoted_local_with_space_and_params() -> None:
    path = parse_rcpt_to('<"a > b"@example.test> NOTIFY=SUCCESS,FAILURE')
    assert path.address is not None and path.address.local == "a > b"
    assert path.params == {"NOTIFY": "SUCCESS,FAILURE"}


# ---------------------------------------------------------------- relay tricks

def test_source_route_is_stripped_and_reported() -> None:
    address = rcpt("<@relay.example,@b.example:user@other.example>")
    assert address.local == "user"
    assert address.domain == "other.example"
    assert address.source_route == ("relay.example", "b.example")
    assert address.address == "user@other.example"


def test_single_hop_source_route_through_us() -> None:
    address = rcpt("<@OURS.test:victim@Elsewhere.example>")
    assert address.domain == "elsewhere.example"
    assert address.source_route == ("ours.test",)


@pytest.mark.parametrize(
    "arg",
    [
        "<@relay.example user@other.example>",
        "<@relay.example:>",
        "<@relay.example>",
        "<@:user@other.example>",
        "<@relay.example,:user@other.example>",
        "<@relay.example,b.example:user@other.example>",
        "<@relay.example.:user@other.example>",
        "<@[192.0.2.1]:user@other.example>",
        "<@relay..example:user@other.example>",
    ],
)
def test_malformed_source_routes_refused(arg: str) -> None:
    error = refused(parse_rcpt_to, arg)
    assert (error.code, error.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize(
    ("arg", "routing", "local", "quoted"),
    [
        ("<user%other.example@ours.test>", "percent-hack", "user%other.example", False),
        ("<user%other.example%third.example@ours.test>", "percent-hack", "user%other.example%third.example", False),
        ("<other.example!user@ours.test>", "bang-path", "other.example!user", False),
        ("<a!b!user@ours.test>", "bang-path", "a!b!user", False),
        ('<"user@other.example"@ours.test>', "quoted-at", "user@other.example", True),
        ('<"user%other.example"@ours.test>', "quoted-percent", "user%other.example", True),
        ('<"other.example!user"@ours.test>', "quoted-bang", "other.example!user", True),
        ('<"other::user"@ours.test>', "quoted-colon", "other::user", True),
        ('<"@relay.example:user@other.example"@ours.test>', "quoted-at", "@relay.example:user@other.example", True),
        ('<"user\\@other.example"@ours.test>', "quoted-at", "user@other.example", True),
    ],
)
def test_routing_syntax_is_reported(arg: str, routing: str, local: str, quoted: bool) -> None:
    address = rcpt(arg)
    assert address.routing == routing
    assert address.local == local
    assert address.quoted is quoted
    assert address.domain == "ours.test"
    assert rcpt(f"<{address.address}>") == address


@pytest.mark.parametrize(
    ("arg", "domain"),
    [
        ("<user@example.test.evil.test>", "example.test.evil.test"),
        ("<user@evilexample.test>", "evilexample.test"),
        ("<user@example-test.evil>", "example-test.evil"),
        ("<user@EXAMPLE.test.evil.TEST>", "example.test.evil.test"),
    ],
)
def test_look_alike_domains_parsed_faithfully(arg: str, domain: str) -> None:
    assert rcpt(arg).domain == domain


def test_homograph_domain_is_not_ours() -> None:
    address = rcpt("<user@ex\u0430mple.test>", utf8_session=True)  # Cyrillic a
    assert address.domain != "example.test"
    assert address.domain.startswith("xn--")
    assert address.domain.endswith(".test")
    assert address.domain_unicode == "ex\u0430mple.test"


def test_homograph_domain_needs_smtputf8() -> None:
    error = refused(parse_rcpt_to, "<user@ex\u0430mple.test>")
    assert (error.code, error.enhanced) == (553, "5.6.7")


def test_fullwidth_domain_normalises_to_the_real_destination() -> None:
    address = rcpt("<user@\uff45xample.test>", utf8_session=True)
    assert address.domain == "example.test"


def test_numeric_domain_must_be_a_literal() -> None:
    for arg in ("<user@127.0.0.1>", "<user@192.0.2.1>", "<user@example.123>"):
        error = refused(parse_rcpt_to, arg)
        assert (error.code, error.enhanced) == (501, "5.1.3")
        assert "literal" in error.reason


# ---------------------------------------------------------------- address literals

@pytest.mark.parametrize(
    ("arg", "domain"),
    [
        ("<user@[192.0.2.1]>", "[192.0.2.1]"),
        ("<user@[127.0.0.1]>", "[127.0.0.1]"),
        ("<user@[IPv6:2001:db8::1]>", "[ipv6:2001:db8::1]"),
        ("<user@[ipv6:2001:DB8:0:0:0:0:0:1]>", "[ipv6:2001:db8::1]"),
        ("<user@[IPV6:::1]>", "[ipv6:::1]"),
        ("<user@[IPv6:::ffff:192.0.2.1]>", "[192.0.2.1]"),
        ("<user@[IPv6:::FFFF:7f00:1]>", "[127.0.0.1]"),
    ],
)
def test_address_literals(arg: str, domain: str) -> None:
    address = rcpt(arg)
    assert address.literal is True
    assert address.domain == domain
    assert address.domain_unicode == domain
    assert rcpt(f"<{address.address}>") == address


@pytest.mark.parametrize(
    "arg",
    [
        "<user@[192.0.2.256]>",
        "<user@[192.0.2]>",
        "<user@[192.000.2.1]>",
        "<user@[ 192.0.2.1]>",
        "<user@[192.0.2.1]x>",
        "<user@[192.0.2.1>",
        "<user@192.0.2.1]>",
        "<user@[]>",
        "<user@[IPv6:2001:db8::g]>",
        "<user@[IPv6:192.0.2.1]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[IPv6:]>",
        "<user@[2001:db8::1]>",
        "<user@[[192.0.2.1]]>",
        "<user@[0x7f.0.0.1]>",
    ],
)
def test_invalid_literals_refused(arg: str) -> None:
    error = refused(parse_rcpt_to, arg)
    assert error.code == 501 and error.enhanced == "5.1.3"


@pytest.mark.parametrize("arg", ["<user@[x400:c=us;a=b]>", "<user@[tag:anything]>"])
def test_general_address_literals_refused(arg: str) -> None:
    error = refused(parse_rcpt_to, arg)
    assert (error.code, error.enhanced) == (553, "5.1.3")
    assert "general address literal" in error.reason


# ---------------------------------------------------------------- syntax errors

SYNTAX_ERRORS = [
    "user@example.test",
    " user@example.test",
    "<user@example.test",
    "user@example.test>",
    "",
    "   ",
    "<<user@example.test>>",
    "<user@@example.test>",
    "<user@other.example@ours.test>",
    "<@example.test>",
    "<user@>",
    "<user>",
    "<.user@example.test>",
    "<user.@example.test>",
    "<us..er@example.test>",
    "<user@example.test.>",
    "<user@.example.test>",
    "<user@example..test>",
    "<user@-example.test>",
    "<user@example-.test>",
    "<user@exa_mple.test>",
    "<user@exa mple.test>",
    "<us er@example.test>",
    "<user@example.test >",
    "< user@example.test>",
    "<user\x00@example.test>",
    "<user@example.test\x00>",
    "<us\ter@example.test>",
    "<user\r\n@example.test>",
    "<us\x7fer@example.test>",
    '<"unterminated@example.test>',
    '<"a"b@example.test>',
    '<a"b"@example.test>',
    '<"a".b@example.test>',
    '<""@example.test>',
    '<"a\x00"@example.test>',
    '<"a\tb"@example.test>',
    "<user(comment)@example.test>",
    "<user,x@example.test>",
    "<user;x@example.test>",
    "<user[x]@example.test>",
    "<user:x@example.test>",
    "<user\\@example.test>",
    "<user@example.test:25>",
    "<user@xample.test,other.test>",
    "<user@" + "a" * 64 + ".test>",
    "<" + "a" * 65 + "@example.test>",
    '<"' + "a" * 63 + '"@example.test>',
    "<user@example.test> <other@example.test>",
]


@pytest.mark.parametrize("arg", SYNTAX_ERRORS)
def test_sender_syntax_errors_use_5_1_7(arg: str) -> None:
    error = refused(parse_mail_from, arg)
    assert isinstance(error, ValueError)
    assert error.code == 501
    assert error.enhanced in ("5.1.7", "5.5.4"), error


@pytest.mark.parametrize("arg", SYNTAX_ERRORS)
def test_recipient_syntax_errors_use_5_1_3(arg: str) -> None:
    error = refused(parse_rcpt_to, arg)
    assert error.code == 501
    assert error.enhanced in ("5.1.3", "5.5.4"), error


def test_missing_brackets_is_an_address_syntax_error() -> None:
    assert refused(parse_mail_from, "user@example.test").enhanced == "5.1.7"
    assert refused(parse_rcpt_to, "user@example.test").enhanced == "5.1.3"
    assert "angle brackets" in refused(parse_rcpt_to, "user@example.test").reason


def test_specific_reasons() -> None:
    assert refused(parse_rcpt_to, "<user@example.test.>").reason == "domain must not end with a dot"
    assert refused(parse_rcpt_to, "<user@a@b.test>").reason == "address contains more than one @"
    assert refused(parse_rcpt_to, "<@example.test>").reason == "empty local part"
    assert refused(parse_rcpt_to, '<""@example.test>').reason == "empty local part"
    assert refused(parse_rcpt_to, "<user@>").reason == "empty domain"
    assert "NUL" in refused(parse_rcpt_to, "<us\x00er@example.test>").reason
    assert "control" in refused(parse_rcpt_to, "<us\x01er@example.test>").reason
    assert "spaces" in refused(parse_rcpt_to, "<us er@example.test>").reason
    assert "hyphen" in refused(parse_rcpt_to, "<user@-x.test>").reason


def test_null_recipient_refused() -> None:
    error = refused(parse_rcpt_to, "<>")
    assert (error.code, error.enhanced) == (501, "5.1.3")


def test_reason_never_echoes_input() -> None:
    evil = "<us\r\nRCPT TO:<x@evil.test>\x00er@example.test>"
    error = refused(parse_rcpt_to, evil)
    assert "\r" not in error.reason and "\n" not in error.reason and "evil" not in error.reason
    assert error.reply() == f"{error.code} {error.enhanced} {error.reason}"


# ---------------------------------------------------------------- lengths

def test_local_part_limit() -> None:
    assert rcpt("<" + "a" * 64 + "@example.test>").local == "a" * 64
    assert "64" in refused(parse_rcpt_to, "<" + "a" * 65 + "@example.test>").reason


def test_quoted_local_part_limit_counts_quotes() -> None:
    assert rcpt('<"' + "a" * 62 + '"@example.test>').quoted
    refused(parse_rcpt_to, '<"' + "a" * 63 + '"@example.test>')


def test_utf8_local_part_limit_counts_octets() -> None:
    assert rcpt("<" + "é" * 32 + "@example.test>", utf8_session=True).local == "é" * 32
    refused(parse_rcpt_to, "<" + "é" * 33 + "@example.test>", utf8_session=True)


def test_label_limit() -> None:
    assert rcpt("<u@" + "a" * 63 + ".test>").domain == "a" * 63 + ".test"
    assert "63" in refused(parse_rcpt_to, "<u@" + "a" * 64 + ".test>").reason


def test_domain_limit_and_path_limit() -> None:
    domain = "b" + "." + ".".join(["a" * 63] * 3) + ".test"  # 1+1+191+5 = 198 octets
    assert rcpt(f"<u@{domain}>").domain == domain
    long_domain = ".".join(["a" * 63] * 4) + ".b"  # 257 octets
    assert len(long_domain) == 257
    error = refused(parse_rcpt_to, f"<u@{long_domain}>")
    assert error.code == 501 and error.enhanced == "5.1.3"


def test_path_limit_256_octets() -> None:
    local = "a" * 64
    domain = ".".join(["b" * 63, "c" * 63, "d" * 55]) + ".test"  # 188 octets
    path = f"<{local}@{domain}>"
    assert len(path) == 255
    assert rcpt(path).domain == domain
    longer = f"<{local}@{domain[:-5]}dd.test>"
    assert len(longer) == 257
    error = refused(parse_rcpt_to, longer)
    assert (error.code, error.enhanced) == (501, "5.1.3")


def test_source_route_counts_towards_path_limit() -> None:
    hop = "@" + "r" * 60 + ".test"
    route = ",".join([hop] * 4)
    error = refused(parse_rcpt_to, f"<{route}:user@example.test>")
    assert "256" in error.reason


# ---------------------------------------------------------------- SMTPUTF8 and IDNA

def test_non_ascii_without_smtputf8_mail() -> None:
    error = refused(parse_mail_from, "<jösé@example.test>")
    assert (error.code, error.enhanced) == (553, "5.6.7")
    assert error.reason == "non-ASCII address requires SMTPUTF8"


def test_non_ascii_domain_without_smtputf8() -> None:
    error = refused(parse_mail_from, "<user@bücher.example>")
    assert (error.code, error.enhanced) == (553, "5.6.7")


def test_smtputf8_parameter_enables_utf8_on_mail() -> None:
    path = parse_mail_from("<jösé@bücher.example> SMTPUTF8 BODY=8BITMIME")
    assert path.address is not None
    assert path.address.local == "jösé"
    assert path.address.domain == "xn--bcher-kva.example"
    assert path.address.domain_unicode == "bücher.example"
    assert path.address.utf8 and path.address.needs_smtputf8
    assert path.params == {"SMTPUTF8": None, "BODY": "8BITMIME"}


def test_smtputf8_parameter_needs_the_extension_offered() -> None:
    error = refused(parse_mail_from, "<jösé@example.test> SMTPUTF8", smtputf8_offered=False)
    assert (error.code, error.enhanced) == (553, "5.6.7")


def test_smtputf8_with_a_value_does_not_enable_utf8() -> None:
    error = refused(parse_mail_from, "<jösé@example.test> SMTPUTF8=yes")
    assert error.enhanced == "5.6.7"


def test_rcpt_utf8_needs_session() -> None:
    assert refused(parse_rcpt_to, "<jösé@example.test>").enhanced == "5.6.7"
    assert refused(parse_rcpt_to, "<jösé@example.test>", smtputf8_offered=False, utf8_session=True).enhanced == "5.6.7"
    assert rcpt("<jösé@example.test>", utf8_session=True).local == "jösé"


def test_local_part_is_nfc_normalised() -> None:
    decomposed = "jo\u0308se\u0301"
    address = rcpt(f"<{decomposed}@example.test>", utf8_session=True)
    assert address.local == "j\u00f6s\u00e9"
    assert address.local != decomposed


def test_nfc_that_yields_forbidden_ascii_is_refused() -> None:
    # U+037E GREEK QUESTION MARK normalises to ";" which is not atext
    refused(parse_rcpt_to, "<a\u037eb@example.test>", utf8_session=True)
    assert rcpt('<"a\u037eb"@example.test>', utf8_session=True).local == "a;b"


@pytest.mark.parametrize(
    "local",
    ["a\u202eb", "a\u00a0b", "a\u2028b", "a\u0085b", "a\ufeffb", "a\ud800b", "a\u3000b", "a\U000e0001b"],
)
def test_invisible_or_control_unicode_refused(local: str) -> None:
    error = refused(parse_rcpt_to, f"<{local}@example.test>", utf8_session=True)
    assert error.code == 501 and error.enhanced == "5.1.3"
    refused(parse_rcpt_to, f'<"{local}"@example.test>', utf8_session=True)


def test_zero_width_joiners_allowed() -> None:
    assert rcpt("<\u0915\u094d\u200d\u0937@example.test>", utf8_session=True).utf8


@pytest.mark.parametrize(
    "domain",
    [
        "exa\u2488mple.test",     # circled digit-dot: STD3 disallowed
        "ex\u00a0ample.test",     # no-break space
        "\u0661\u0662a.test",     # bidi rule violation (Arabic digits with Latin)
        "a\u200db.test",          # ZWJ not allowed in this context
        "\U0001f4a9.test",        # emoji is not IDNA 2008
    ],
)
def test_idna_failures_refused(domain: str) -> None:
    error = refused(parse_rcpt_to, f"<user@{domain}>", utf8_session=True)
    assert error.enhanced == "5.1.3"
    assert error.code in (501, 553)
    sender_error = refused(parse_mail_from, f"<user@{domain}> SMTPUTF8")
    assert sender_error.enhanced == "5.1.7"


def test_idna_failure_code_is_553() -> None:
    error = refused(parse_rcpt_to, "<user@\U0001f4a9.test>", utf8_session=True)
    assert (error.code, error.enhanced) == (553, "5.1.3")
    assert refused(parse_mail_from, "<user@\U0001f4a9.test> SMTPUTF8").code == 553


@pytest.mark.parametrize("domain", ["example\u3002test", "example\uff0etest", "example.test\u3002"])
def test_unicode_dots_refused(domain: str) -> None:
    error = refused(parse_rcpt_to, f"<user@{domain}>", utf8_session=True)
    assert (error.code, error.enhanced) == (501, "5.1.3")


@pytest.mark.parametrize(
    "domain", ["xn--zz.example", "xn--a.example", "xn--ls8h.example", "xn--abc.example", "xn--99999999.example"]
)
def test_invalid_a_labels_refused(domain: str) -> None:
    error = refused(parse_rcpt_to, f"<user@{domain}>")
    assert (error.code, error.enhanced) == (553, "5.1.3")


@pytest.mark.parametrize("domain", ["xn--.example", "xn--abc-.example"])
def test_a_labels_ending_in_hyphen_refused(domain: str) -> None:
    error = refused(parse_rcpt_to, f"<user@{domain}>")
    assert (error.code, error.enhanced) == (501, "5.1.3")


def test_a_label_stays_a_label_and_decodes_for_display() -> None:
    address = rcpt("<user@xn--bcher-kva.example>")
    assert address.domain == "xn--bcher-kva.example"
    assert address.domain_unicode == "bücher.example"
    assert address.utf8 and not address.needs_smtputf8


def test_u_label_uppercase_is_mapped() -> None:
    address = rcpt("<user@BÜCHER.example>", utf8_session=True)
    assert address.domain == "xn--bcher-kva.example"


def test_sharp_s_is_not_transitional() -> None:
    address = rcpt("<user@straße.example>", utf8_session=True)
    assert address.domain == "xn--strae-oqa.example"


def test_parse_address_bare() -> None:
    address = parse_address("Admin@Bücher.Example", allow_utf8=True)
    assert address.address == "Admin@xn--bcher-kva.example"
    assert parse_address("a@b.test", allow_utf8=False).domain == "b.test"
    assert refused(parse_address, "a@bücher.example", allow_utf8=False).enhanced == "5.6.7"
    for text in ("<a@b.test>", "@r.test:a@b.test", "postmaster", "a@b.test ", ""):
        assert refused(parse_address, text, allow_utf8=True).code == 501


# ---------------------------------------------------------------- ESMTP parameters

@pytest.mark.parametrize(
    ("arg", "params"),
    [
        ("<a@b.test> SIZE=1000", {"SIZE": "1000"}),
        ("<a@b.test> size=1000 body=8BITMIME", {"SIZE": "1000", "BODY": "8BITMIME"}),
        ("<a@b.test>   SIZE=1000    BODY=7BIT  ", {"SIZE": "1000", "BODY": "7BIT"}),
        ("<a@b.test> SMTPUTF8", {"SMTPUTF8": None}),
        ("<a@b.test> RET=HDRS ENVID=QQ314159", {"RET": "HDRS", "ENVID": "QQ314159"}),
        ("<a@b.test> AUTH=<>", {"AUTH": "<>"}),
        ("<a@b.test> AUTH=user+40example.test", {"AUTH": "user+40example.test"}),
        ("<a@b.test> X-VENDOR-1=a;b,c", {"X-VENDOR-1": "a;b,c"}),
        ("<a@b.test> 8BITMIME-X", {"8BITMIME-X": None}),
        ("<> ENVID=abc", {"ENVID": "abc"}),
    ],
)
def test_mail_parameters(arg: str, params: dict[str, str | None]) -> None:
    path = parse_mail_from(arg)
    assert path.params == params
    assert list(path.params) == list(params)


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.test>SIZE=1000",
        "<a@b.test> SIZE=",
        "<a@b.test> =1000",
        "<a@b.test> SIZE=10=00",
        "<a@b.test> -SIZE=1",
        "<a@b.test> SI_ZE=1",
        "<a@b.test> SIZE=1 size=2",
        "<a@b.test> SMTPUTF8 smtputf8",
        "<a@b.test> SIZE=1\tBODY=7BIT",
        "<a@b.test> SIZE=1\x00",
        "<a@b.test> SIZE=\x7f",
        "<a@b.test> ENVID=é",
        "<a@b.test> X=a\x01",
        "<a@b.test> Ü=1",
        "<a@b.test> >",
    ],
)
def test_bad_parameters_use_5_5_4(arg: str) -> None:
    error = refused(parse_mail_from, arg)
    assert (error.code, error.enhanced) == (501, "5.5.4")
    error = refused(parse_rcpt_to, arg)
    assert (error.code, error.enhanced) == (501, "5.5.4")


def test_duplicate_parameter_reason() -> None:
    assert "duplicate" in refused(parse_rcpt_to, "<a@b.test> NOTIFY=NEVER notify=NEVER").reason


def test_utf8_parameter_values_only_with_smtputf8() -> None:
    path = parse_mail_from("<a@b.test> SMTPUTF8 ENVID=café")
    assert path.params["ENVID"] == "café"
    assert refused(parse_mail_from, "<a@b.test> ENVID=café").enhanced == "5.5.4"
    assert parse_rcpt_to("<a@b.test> ORCPT=utf-8;café@b.test", utf8_session=True).params["ORCPT"] == "utf-8;café@b.test"
    assert refused(parse_rcpt_to, "<a@b.test> ORCPT=utf-8;café@b.test").enhanced == "5.5.4"


def test_parameters_are_not_judged() -> None:
    path = parse_rcpt_to("<a@b.test> FROBNICATE=yes NOTIFY=NEVER")
    assert path.params == {"FROBNICATE": "yes", "NOTIFY": "NEVER"}


# ---------------------------------------------------------------- xtext and ORCPT

@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("", ""),
        ("user@example.test", "user@example.test"),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("a+20b", "a b"),
        ("+C3+A9", "é"),
        ("QQ314159", "QQ314159"),
    ],
)
def test_xtext_decode(encoded: str, decoded: str) -> None:
    assert xtext_decode(encoded) == decoded
    assert xtext_encode(decoded) == encoded


@pytest.mark.parametrize("bad", ["a+2b", "a+", "a+2", "a+G0", "a=b", "a b", "é", "a\x00", "+FF", "+C3"])
def test_xtext_decode_refuses_malformed(bad: str) -> None:
    error = refused(xtext_decode, bad)
    assert (error.code, error.enhanced) == (501, "5.5.4")


def test_xtext_encode_specials() -> None:
    assert xtext_encode("a+b=c d\x01") == "a+2Bb+3Dc+20d+01"
    assert xtext_encode("ü") == "+C3+BC"
    assert refused(xtext_encode, "\ud800").enhanced == "5.5.4"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("rfc822;user@example.test", ("rfc822", "user@example.test")),
        ("RFC822;user+2Btag@example.test", ("rfc822", "user+tag@example.test")),
        ("rfc822;+22john+20smith+22@example.test", ("rfc822", '"john smith"@example.test')),
        ("x400;/C+3DUS/", ("x400", "/C=US/")),
        ("utf-8;jos\\x{E9}@example.test", ("utf-8", "josé@example.test")),
        ("utf-8;josé@example.test", ("utf-8", "josé@example.test")),
        ("utf-8;a\\x{2B}b@example.test", ("utf-8", "a+b@example.test")),
    ],
)
def test_parse_orcpt(value: str, expected: tuple[str, str]) -> None:
    assert parse_orcpt(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "user@example.test",
        ";user@example.test",
        "rfc822;",
        "rfc 822;user@example.test",
        "rfc822;user+2bx@example.test",
        "rfc822;user+0D+0ABcc:+20x@example.test",
        "rfc822;user+00@example.test",
        "utf-8;a\\x{D800}b",
        "utf-8;a\\x{110000}b",
        "utf-8;a\\x{e9}b",
        "utf-8;a\\x{0E9}b",
        "utf-8;a\\xE9b",
        "utf-8;a\\x{0A}b",
        "utf-8;a+b",
        "utf-8;a\\",
    ],
)
def test_parse_orcpt_refuses_malformed(value: str) -> None:
    error = refused(parse_orcpt, value)
    assert (error.code, error.enhanced) == (501, "5.5.4")


# ---------------------------------------------------------------- linear time

ADVERSARIAL = [
    "<" + "a" * 100_000,
    "<" + '"' + "\\a" * 50_000,
    "<" + "@a," * 33_000,
    " " * 100_000 + "<a@b.test>",
    "<a@b.test> " + "A=B " * 25_000,
    "<a@b.test> " + "A " * 50_000,
    "<" + "a." * 50_000 + "@b.test>",
    "<" + "a" * 100_000 + "@" + "b." * 1000 + "test>",
]


@pytest.mark.parametrize("arg", ADVERSARIAL)
def test_adversarial_inputs_are_fast(arg: str) -> None:
    started = time.perf_counter()
    for call in (parse_mail_from, parse_rcpt_to):
        try:
            call(arg)
        except AddressError:
            pass
    try:
        parse_address(arg[1:], allow_utf8=True)
    except AddressError:
        pass
    for function in (xtext_decode, parse_orcpt):
        try:
            function(arg)
        except AddressError:
            pass
    assert time.perf_counter() - started < 2.0


def test_long_valid_parameter_list_parses() -> None:
    params = " ".join(f"X{index}=v" for index in range(20_000))
    started = time.perf_counter()
    path = parse_mail_from(f"<a@b.test> {params}")
    assert len(path.params) == 20_000
    assert time.perf_counter() - started < 2.0


def test_long_keyword_is_not_echoed_in_full() -> None:
    keyword = "K" * 5000
    error = refused(parse_mail_from, f"<a@b.test> {keyword}=1 {keyword}=2")
    assert "duplicate" in error.reason
    assert len(error.reason) < 100
