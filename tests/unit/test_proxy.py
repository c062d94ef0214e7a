"""PROXY protocol v1/v2: valid headers, every malformed form, incremental feeding."""

from __future__ import annotations

import pytest

from relaywarden.protocol.proxy import (
    MAX_HEADER_BYTES,
    MAX_V1_LINE,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    build_v1,
    build_v2,
    crc32c,
    parse_proxy_header,
)

SMTP = b"EHLO client.example\r\n"


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def ipv4_block(src: bytes = b"\xc0\x00\x02\x01", dst: bytes = b"\xcb\x00\x71\x05") -> bytes:
    return src + dst + (40000).to_bytes(2, "big") + (25).to_bytes(2, "big")


def assert_fed_bytewise(header: bytes) -> None:
    """Every strict prefix needs more bytes; the whole header parses; SMTP after it is left."""
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) is None, f"early answer at {n} bytes"
    result = parse_proxy_header(header + SMTP)
    assert result is not None
    assert result[1] == len(header)


# --- v1 valid ---------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25\r\n"
    header, used = parse_proxy_header(line + SMTP)  # type: ignore[misc]
    assert used == len(line)
    assert header == ProxyHeader(1, "PROXY", "TCP4", ("1.2.3.4", 1111), ("5.6.7.8", 25), {})


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.1 65535 0\r\n"
    header, _ = parse_proxy_header(line)  # type: ignore[misc]
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination is not None and header.destination[1] == 0
    assert header.destination[0].startswith("::ffff:")


@pytest.mark.parametrize(
    "line",
    [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::1 1 2\r\n", b"PROXY UNKNOWN whatever \x01\r\n"],
)
def test_v1_unknown_is_local(line: bytes) -> None:
    header, used = parse_proxy_header(line + SMTP)  # type: ignore[misc]
    assert used == len(line)
    assert header == ProxyHeader(1, "LOCAL", "UNSPEC", None, None, {})


def test_v1_longest_line_is_accepted() -> None:
    addr = b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"  # the spec's worst case
    line = b"PROXY TCP6 " + addr + b" " + addr + b" 65535 65535\r\n"
    assert len(line) == 104
    pad = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LINE - 16) + b"\r\n"
    assert len(pad) == MAX_V1_LINE
    assert parse_proxy_header(line) is not None
    assert parse_proxy_header(pad) == (ProxyHeader(1, "LOCAL", "UNSPEC", None, None, {}), MAX_V1_LINE)


# --- v1 malformed -----------------------------------------------------------------------------

V1_MALFORMED = [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25\n",  # bare LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25\rX\r\n",  # CR not followed by LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25 \r\n",  # trailing space
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1111 25\r\n",  # double space
    b"PROXY  TCP4 1.2.3.4 5.6.7.8 1111 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111\r\n",  # missing port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25 26\r\n",  # extra field
    b"PROXY TCP4\r\n",
    b"PROXY \r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1111 25\r\n",  # lower-case protocol
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1111 25\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1111 25\r\n",  # octet out of range
    b"PROXY TCP4 1.2.3 5.6.7.8 1111 25\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1111 25\r\n",  # leading zero octet
    b"PROXY TCP4 ::1 5.6.7.8 1111 25\r\n",  # v6 under TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1111 25\r\n",  # v4 under TCP6
    b"PROXY TCP6 fe80::1%eth0 ::1 1111 25\r\n",  # scope id
    b"PROXY TCP6 ::g ::1 1111 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 25\r\n",  # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01111 25\r\n",  # leading zero port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 00 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 25\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 999999\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\xb9 25\r\n",  # non-ASCII digit
    b"PROXY UNKNOWN a\rb\r\n",
    b"PROXY UNKNOWN " + b"x" * MAX_V1_LINE + b"\r\n",  # over 107 bytes
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25" + b"0" * 100,  # no CRLF within 107 bytes
    b"PROXY-TCP4 1.2.3.4 5.6.7.8 1111 25\r\n",
    b"proxy TCP4 1.2.3.4 5.6.7.8 1111 25\r\n",
    b"EHLO client.example\r\n",  # no PROXY header at all
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
]


@pytest.mark.parametrize("data", V1_MALFORMED)
def test_v1_malformed_raises(data: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_proxy_header(data)
    assert caught.value.reason


@pytest.mark.parametrize("data", V1_MALFORMED)
def test_v1_malformed_never_parses_when_fed_bytewise(data: bytes) -> None:
    """Fed byte by byte, a bad header is rejected at some point, never accepted."""
    with pytest.raises(ProxyError):
        for n in range(1, len(data) + 1):
            assert parse_proxy_header(data[:n]) is None


def test_v1_rejected_early_not_at_the_cap() -> None:
    with pytest.raises(ProxyError):
        parse_proxy_header(b"PROXY TCP4 1.2.3.4x")
    with pytest.raises(ProxyError):
        parse_proxy_header(b"PROXY TCP9")
    with pytest.raises(ProxyError):
        parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 070")
    with pytest.raises(ProxyError):
        parse_proxy_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ")


# --- v2 valid ---------------------------------------------------------------------------------


def test_v2_tcp4_with_tlvs() -> None:
    raw = v2(0x21, 0x11, ipv4_block() + b"\x02\x00\x04mail" + b"\x04\x00\x02\x00\x00")
    header, used = parse_proxy_header(raw + SMTP)  # type: ignore[misc]
    assert used == len(raw)
    assert header == ProxyHeader(
        2, "PROXY", "TCP4", ("192.0.2.1", 40000), ("203.0.113.5", 25), {0x02: b"mail"}
    )


def test_v2_tcp6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    raw = v2(0x21, 0x21, src + dst + b"\x01\x00\x00\x19")
    header, used = parse_proxy_header(raw)  # type: ignore[misc]
    assert used == 52
    assert header.source == ("2001:db8::1", 256)
    assert header.destination == ("2001:db8::2", 25)
    assert header.tlvs == {}


def test_v2_local_ignores_address_block() -> None:
    raw = v2(0x20, 0x11, ipv4_block() + b"junk that is not a TLV")
    header, used = parse_proxy_header(raw + SMTP)  # type: ignore[misc]
    assert used == len(raw)
    assert header == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, {})
    # LOCAL with an odd family byte is still fine: the whole block is discarded
    assert parse_proxy_header(v2(0x20, 0xFF, b""))[0].command == "LOCAL"  # type: ignore[index]


def test_v2_unspec_and_unix_report_no_addresses() -> None:
    unspec, _ = parse_proxy_header(v2(0x21, 0x00, b"\x01\x00\x02h2"))  # type: ignore[misc]
    assert (unspec.command, unspec.family, unspec.source, unspec.tlvs) == ("PROXY", "UNSPEC", None, {1: b"h2"})
    unix, used = parse_proxy_header(v2(0x21, 0x31, b"/var/run/a".ljust(216, b"\0")))  # type: ignore[misc]
    assert (unix.family, unix.source, unix.destination, used) == ("UNSPEC", None, None, 16 + 216)


def test_v2_checksum_verified() -> None:
    raw = build_v2(("192.0.2.1", 1), ("192.0.2.2", 25), tlvs={0x01: b"smtp"}, checksum=True)
    header, _ = parse_proxy_header(raw)  # type: ignore[misc]
    assert set(header.tlvs) == {0x01, PP2_TYPE_CRC32C}
    corrupt = raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]  # flip a bit of the source address
    with pytest.raises(ProxyError, match="CRC32C"):
        parse_proxy_header(corrupt)
    short_crc = v2(0x21, 0x11, ipv4_block() + b"\x03\x00\x02\x00\x00")
    with pytest.raises(ProxyError, match="4 bytes"):
        parse_proxy_header(short_crc)


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_v2_noop_padding_may_repeat_and_is_dropped() -> None:
    raw = v2(0x21, 0x11, ipv4_block() + b"\x04\x00\x00" + b"\x04\x00\x01\x00" + b"\x01\x00\x01a")
    assert parse_proxy_header(raw)[0].tlvs == {0x01: b"a"}  # type: ignore[index]


# --- v2 malformed -----------------------------------------------------------------------------

V2_MALFORMED = [
    b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + ipv4_block(),  # signature
    b"\r\r",
    v2(0x11, 0x11, ipv4_block()),  # version nibble 1
    v2(0x31, 0x11, ipv4_block()),  # version nibble 3
    v2(0x22, 0x11, ipv4_block()),  # command nibble 2
    v2(0x2F, 0x11, ipv4_block()),
    v2(0x21, 0x12, ipv4_block()),  # UDP over IPv4
    v2(0x21, 0x22, ipv4_block() * 3),  # UDP over IPv6
    v2(0x21, 0x32, b"\0" * 216),  # AF_UNIX datagram
    v2(0x21, 0x41, ipv4_block()),  # unknown family
    v2(0x21, 0x10, ipv4_block()),  # AF_INET, transport UNSPEC
    v2(0x21, 0x11, ipv4_block()[:11]),  # too short for IPv4
    v2(0x21, 0x21, ipv4_block()),  # too short for IPv6
    v2(0x21, 0x31, b"\0" * 215),  # too short for UNIX
    v2(0x21, 0x11, b"", length=MAX_HEADER_BYTES),  # over the cap
    v2(0x20, 0x00, b"", length=0xFFFF),  # LOCAL is capped too
    v2(0x21, 0x11, ipv4_block() + b"\x01"),  # truncated TLV header
    v2(0x21, 0x11, ipv4_block() + b"\x01\x00"),
    v2(0x21, 0x11, ipv4_block() + b"\x01\x00\x05abc"),  # TLV runs past the end
    v2(0x21, 0x11, ipv4_block() + b"\x01\x00\x01a\x01\x00\x01b"),  # duplicate TLV
]


@pytest.mark.parametrize("data", V2_MALFORMED)
def test_v2_malformed_raises(data: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_proxy_header(data)
    assert caught.value.reason


def test_v2_bad_fields_rejected_as_soon_as_they_arrive() -> None:
    with pytest.raises(ProxyError, match="version"):
        parse_proxy_header(V2_SIGNATURE + b"\x11")
    with pytest.raises(ProxyError, match="family"):
        parse_proxy_header(V2_SIGNATURE + b"\x21\x12")
    with pytest.raises(ProxyError, match="cap"):
        parse_proxy_header(V2_SIGNATURE + b"\x21\x11\xff\xff")
    with pytest.raises(ProxyError, match="too short"):
        parse_proxy_header(V2_SIGNATURE + b"\x21\x21\x00\x0c")


# --- incremental feeding, trailing bytes ----------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        build_v1(("1.2.3.4", 1111), ("5.6.7.8", 25)),
        build_v1(("2001:db8::1", 0), ("2001:db8::2", 65535)),
        build_v1(None, None),
        b"PROXY UNKNOWN some thing\r\n",
        build_v2(("192.0.2.1", 40000), ("203.0.113.5", 25), tlvs={0x01: b"h2", 0x20: b"\x05" * 9}),
        build_v2(("2001:db8::1", 1), ("2001:db8::2", 2), checksum=True),
        build_v2(None, None, local=True),
        build_v2(None, None),
        v2(0x21, 0x31, b"\0" * 216),
    ],
)
def test_bytewise_feeding_waits_until_complete(header: bytes) -> None:
    assert_fed_bytewise(header)


def test_empty_buffer_needs_more() -> None:
    assert parse_proxy_header(b"") is None


def test_accepts_bytearray_and_memoryview() -> None:
    raw = build_v1(("1.2.3.4", 1), ("5.6.7.8", 2)) + SMTP
    assert parse_proxy_header(bytearray(raw)) == parse_proxy_header(memoryview(raw)) == parse_proxy_header(raw)


def test_nothing_pending_reaches_the_cap() -> None:
    """A driver buffering MAX_HEADER_BYTES always gets an answer."""
    biggest = v2(0x21, 0x00, b"\x01" + (MAX_HEADER_BYTES - 19).to_bytes(2, "big") + b"x" * (MAX_HEADER_BYTES - 19))
    assert len(biggest) == MAX_HEADER_BYTES
    assert parse_proxy_header(biggest[:-1]) is None
    assert parse_proxy_header(biggest + SMTP)[1] == MAX_HEADER_BYTES  # type: ignore[index]


# --- builders ---------------------------------------------------------------------------------


def test_build_v1_forms() -> None:
    assert build_v1(("1.2.3.4", 1111), ("5.6.7.8", 25)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 25\r\n"
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_build_v2_local_bytes() -> None:
    assert build_v2(None, None, local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_v1(("1.2.3.4", 1), ("::1", 2)),
        lambda: build_v1(("1.2.3.4", 1), None),
        lambda: build_v1(("1.2.3.4", 65536), ("1.2.3.5", 2)),
        lambda: build_v1(("not-an-ip", 1), ("1.2.3.5", 2)),
        lambda: build_v2(("1.2.3.4", 1), ("1.2.3.5", 2), local=True),
        lambda: build_v2(None, None, local=True, tlvs={1: b"x"}),
        lambda: build_v2(("1.2.3.4", 1), ("1.2.3.5", 2), tlvs={256: b""}),
        lambda: build_v2(("1.2.3.4", 1), ("1.2.3.5", 2), tlvs={PP2_TYPE_CRC32C: b"abcd"}),
        lambda: build_v2(("1.2.3.4", 1), ("1.2.3.5", 2), tlvs={1: b"x" * MAX_HEADER_BYTES}),
    ],
)
def test_builders_refuse_nonsense(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        call()


def test_proxy_error_is_value_error_with_reason() -> None:
    err = ProxyError("bad port")
    assert isinstance(err, ValueError)
    assert err.reason == "bad port" == str(err)
    assert PP2_TYPE_NOOP == 0x04
