"""Property tests for the PROXY protocol parser: only ProxyError escapes, builds round-trip,
prefixes of valid headers always ask for more bytes."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaywarden.protocol.proxy import (
    MAX_HEADER_BYTES,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    build_v1,
    build_v2,
    parse_proxy_header,
)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))


@st.composite
def endpoint_pairs(draw: st.DrawFn) -> tuple[str, tuple[str, int], tuple[str, int]]:
    family, addresses = draw(st.sampled_from([("TCP4", ipv4), ("TCP6", ipv6)]))
    return family, (draw(addresses), draw(ports)), (draw(addresses), draw(ports))


tlv_maps = st.dictionaries(
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_NOOP)),
    st.binary(max_size=64),
    max_size=6,
)


def parse_or_reject(data: bytes) -> tuple[ProxyHeader, int] | None:
    try:
        return parse_proxy_header(data)
    except ProxyError:
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_proxy_error(data: bytes) -> None:
    result = parse_or_reject(data)
    if result is not None:
        assert 0 < result[1] <= len(data)


@FUZZ
@given(st.sampled_from([V1_PREFIX, V2_SIGNATURE, V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x21\x11"]), st.binary(max_size=300))
def test_signature_then_garbage_only_raises_proxy_error(prefix: bytes, tail: bytes) -> None:
    result = parse_or_reject(prefix + tail)
    if result is not None:
        header, used = result
        assert used <= len(prefix + tail)
        assert header.version in (1, 2)


@FUZZ
@given(st.text(alphabet="PROXY TCP46UNKW0123456789abcdef:.\r\n ", max_size=120))
def test_v1_like_text_only_raises_proxy_error(text: str) -> None:
    data = b"PROXY " + text.encode()
    result = parse_or_reject(data)
    if result is not None:
        header, used = result
        assert data[used - 2 : used] == b"\r\n"
        assert used <= 107


@FUZZ
@given(endpoint_pairs())
def test_v1_round_trip(pair: tuple[str, tuple[str, int], tuple[str, int]]) -> None:
    family, src, dst = pair
    expected = ProxyHeader(1, "PROXY", family, src, dst, {})
    raw = build_v1(src, dst)
    assert parse_proxy_header(raw + b"QUIT\r\n") == (expected, len(raw))


@FUZZ
@given(endpoint_pairs() | st.just(("UNSPEC", None, None)), tlv_maps)
def test_v2_round_trip(pair: tuple[str, tuple[str, int] | None, tuple[str, int] | None], tlvs: dict[int, bytes]) -> None:
    family, src, dst = pair
    expected = ProxyHeader(2, "PROXY", family, src, dst, tlvs)
    raw = build_v2(src, dst, tlvs=tlvs)
    assert parse_proxy_header(raw + b"EHLO x\r\n") == (expected, len(raw))


@FUZZ
@given(endpoint_pairs(), tlv_maps)
def test_v2_round_trip_with_checksum(pair: tuple[str, tuple[str, int], tuple[str, int]], tlvs: dict[int, bytes]) -> None:
    family, src, dst = pair
    raw = build_v2(src, dst, tlvs=tlvs, checksum=True)
    header, used = parse_proxy_header(raw)  # type: ignore[misc]
    assert used == len(raw)
    assert (header.family, header.source, header.destination) == (family, src, dst)
    assert {k: v for k, v in header.tlvs.items() if k != PP2_TYPE_CRC32C} == tlvs


@FUZZ
@given(endpoint_pairs(), st.integers(0, 2000), st.integers(0, 7))
def test_v2_checksum_catches_any_single_bit_flip(pair: tuple[str, tuple[str, int], tuple[str, int]], where: int, bit: int) -> None:
    _, src, dst = pair
    raw = bytearray(build_v2(src, dst, checksum=True))
    index = 16 + where % (len(raw) - 16)  # past the fixed part, which has its own checks
    raw[index] ^= 1 << bit
    try:
        result = parse_proxy_header(bytes(raw))
    except ProxyError:
        return
    # Only a flip of the CRC TLV's own type byte escapes: the header then carries no checksum.
    assert result is not None
    assert PP2_TYPE_CRC32C not in result[0].tlvs
    assert index == len(raw) - 7


@FUZZ
@given(
    st.one_of(
        endpoint_pairs().map(lambda p: build_v1(p[1], p[2])),
        endpoint_pairs().map(lambda p: build_v2(p[1], p[2])),
        st.tuples(endpoint_pairs(), tlv_maps).map(lambda a: build_v2(a[0][1], a[0][2], tlvs=a[1])),
        st.just(build_v2(None, None, local=True)),
        st.just(build_v1(None, None)),
    ),
    st.binary(max_size=40),
)
def test_prefixes_of_valid_headers_need_more_and_trailing_bytes_stay(raw: bytes, trailing: bytes) -> None:
    for n in range(len(raw)):
        assert parse_proxy_header(raw[:n]) is None
    result = parse_proxy_header(raw + trailing)
    assert result is not None and result[1] == len(raw)


@FUZZ
@given(st.sampled_from([V1_PREFIX, V2_SIGNATURE]), st.binary(max_size=40), st.binary(min_size=1, max_size=1))
def test_a_full_buffer_always_gets_an_answer(prefix: bytes, head: bytes, fill: bytes) -> None:
    """The driver may stop buffering at MAX_HEADER_BYTES: by then the parser has decided."""
    buf = (prefix + head).ljust(MAX_HEADER_BYTES, fill)
    assert parse_or_reject(buf) is not None or _rejects(buf)


def _rejects(buf: bytes) -> bool:
    try:
        parse_proxy_header(buf)
    except ProxyError:
        return True
    return False


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    _, src, dst = draw(endpoint_pairs())
    raw = bytearray(draw(st.sampled_from([build_v1, build_v2]))(src, dst))
    for _ in range(draw(st.integers(1, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.sampled_from(b" .:0159afAF\r\n\x00\xff"))
    return bytes(raw) + draw(st.binary(max_size=8))


@FUZZ
@given(mutated_headers())
def test_incremental_answers_agree_with_the_final_one(data: bytes) -> None:
    """Fed byte by byte, the parser never rejects a prefix of something it later accepts,
    and never accepts a prefix of something it later rejects."""
    final: tuple[ProxyHeader, int] | None | str
    try:
        final = parse_proxy_header(data)
    except ProxyError:
        final = "rejected"
    for n in range(len(data)):
        try:
            early = parse_proxy_header(data[:n])
        except ProxyError:
            assert final == "rejected", f"rejected at {n} bytes, accepted at {len(data)}"
            return
        if early is not None:
            assert early == final
            return
