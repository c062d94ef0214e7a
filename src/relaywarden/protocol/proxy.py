"""HAProxy PROXY protocol v1 (text) and v2 (binary): parsing and building, sans-I/O.

A listener behind a load balancer, NAT or TCP proxy learns the real client address from a
PROXY header sent before the first SMTP byte. This module owns reading that header from a
byte buffer (auto-detecting v1 and v2, strictly, incrementally) and building one for test
clients and the outbound side. It never touches a socket: the server layer feeds it bytes,
and gives up after MAX_HEADER_BYTES.

Reference: haproxy's doc/proxy-protocol.txt.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_V1_LINE",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyError",
    "ProxyHeader",
    "build_v1",
    "build_v2",
    "crc32c",
    "parse_proxy_header",
]

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LINE: Final = 107
"""The longest v1 line, CRLF included (the spec's worst case for TCP6)."""
MAX_HEADER_BYTES: Final = 4096
"""The most bytes the driver should buffer before giving up: no accepted header is longer."""
_V2_FIXED: Final = 16
_MAX_V2_LENGTH: Final = MAX_HEADER_BYTES - _V2_FIXED

PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
"""Padding TLV: may repeat, and the parser drops it."""

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1

# v2 family/transport byte -> (family reported, address block length). Only stream
# transports: SMTP never arrives over UDP or a datagram socket.
_V2_FAMILIES: Final[dict[int, tuple[str, int]]] = {
    0x00: ("UNSPEC", 0),  # AF_UNSPEC: use the real connection endpoints
    0x11: ("TCP4", 12),  # AF_INET, STREAM: 4 + 4 + 2 + 2
    0x21: ("TCP6", 36),  # AF_INET6, STREAM: 16 + 16 + 2 + 2
    0x31: ("UNSPEC", 216),  # AF_UNIX, STREAM: 108 + 108; no (address, port) to report
}

_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_ADDRESS_CHARS: Final[dict[bytes, frozenset[int]]] = {
    b"TCP4": frozenset(b"0123456789."),
    b"TCP6": frozenset(b"0123456789abcdefABCDEF:."),
}
_V1_ADDRESS_MAX: Final[dict[bytes, int]] = {b"TCP4": 15, b"TCP6": 45}
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")

Endpoint = tuple[str, int]


class ProxyError(ValueError):
    """The bytes cannot be a PROXY header; the connection must be dropped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy told us about the client connection it forwards."""

    version: int
    """1 (text) or 2 (binary)."""
    command: str
    """"PROXY" (use source/destination) or "LOCAL" (proxy's own connection, e.g. health check)."""
    family: str
    """"TCP4", "TCP6" or "UNSPEC" (v1 UNKNOWN, v2 AF_UNSPEC, v2 AF_UNIX)."""
    source: Endpoint | None
    """The real client (address, port); None unless family is TCP4/TCP6."""
    destination: Endpoint | None
    """The address the client connected to (the listener's public address)."""
    tlvs: dict[int, bytes] = field(default_factory=dict)
    """v2 type-length-value extensions by type (PP2_TYPE_NOOP dropped); empty for v1."""


def parse_proxy_header(buf: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY header at the start of buf.

    Returns (header, bytes consumed) when a complete header is there, None when buf is a
    prefix of a possibly valid header (feed more bytes), and raises ProxyError as soon as buf
    cannot be one. Bytes after the header (the client's SMTP) are not consumed.
    """
    data = bytes(buf[:MAX_HEADER_BYTES])
    if not data:
        return None
    if data[:1] == V2_SIGNATURE[:1]:
        if not _prefix_matches(data, V2_SIGNATURE):
            raise ProxyError("bad PROXY v2 signature")
        return _parse_v2(data) if len(data) >= len(V2_SIGNATURE) else None
    if data[:1] == V1_PREFIX[:1]:
        if not _prefix_matches(data, V1_PREFIX):
            raise ProxyError("bad PROXY v1 signature")
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else None
    raise ProxyError("no PROXY header (client sent something else first)")


def _prefix_matches(data: bytes, signature: bytes) -> bool:
    n = min(len(data), len(signature))
    return data[:n] == signature[:n]


# --- v1 -------------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, MAX_V1_LINE)
    if end < 0:
        if len(data) >= MAX_V1_LINE:
            raise ProxyError(f"PROXY v1 line longer than {MAX_V1_LINE} bytes")
        _check_v1_partial(data[len(V1_PREFIX) :])
        return None
    return _parse_v1_line(data[len(V1_PREFIX) : end]), end + 2


def _parse_v1_line(rest: bytes) -> ProxyHeader:
    """Parse a complete v1 line after "PROXY " and before CRLF."""
    if b"\r" in rest or b"\n" in rest:
        raise ProxyError("PROXY v1 line must end in CRLF")
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "LOCAL", "UNSPEC", None, None, {})
    fields = rest.split(b" ")
    protocol = fields[0]
    if protocol not in _V1_ADDRESS_CHARS:
        raise ProxyError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise ProxyError("PROXY v1 line needs 4 single-space separated fields after the protocol")
    _, src, dst, sport, dport = fields
    family = protocol.decode("ascii")
    return ProxyHeader(
        version=1,
        command="PROXY",
        family=family,
        source=(_v1_address(protocol, src), _v1_port(sport)),
        destination=(_v1_address(protocol, dst), _v1_port(dport)),
        tlvs={},
    )


def _v1_address(protocol: bytes, text: bytes) -> str:
    allowed = _V1_ADDRESS_CHARS[protocol]
    if not text or len(text) > _V1_ADDRESS_MAX[protocol] or not set(text) <= allowed:
        raise ProxyError(f"bad {protocol.decode()} address in PROXY v1 line")
    try:
        if protocol == b"TCP4":
            return str(ipaddress.IPv4Address(text.decode("ascii")))
        return str(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyError(f"bad {protocol.decode()} address in PROXY v1 line") from None


def _v1_port(text: bytes) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise ProxyError("bad port in PROXY v1 line (0-65535, no leading zeros)")
    return int(text)


def _check_v1_partial(rest: bytes) -> None:
    """Raise ProxyError when no continuation of this unterminated v1 line can be valid."""
    if rest.endswith(b"\r"):
        _parse_v1_line(rest[:-1])  # only "\n" may follow, so the line is complete
        return
    if b"\r" in rest or b"\n" in rest:
        raise ProxyError("PROXY v1 line must end in CRLF")
    fields = rest.split(b" ")
    protocol = fields[0]
    if len(fields) == 1:
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
        return
    if protocol == b"UNKNOWN":
        return
    if protocol not in _V1_ADDRESS_CHARS:
        raise ProxyError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) > 5:
        raise ProxyError("PROXY v1 line has too many fields")
    complete, last = fields[1:-1], fields[-1]
    for position, text in enumerate(complete):  # src, dst, sport, dport in order
        if position < 2:
            _v1_address(protocol, text)
        else:
            _v1_port(text)
    if len(complete) < 2:
        _v1_address_prefix(protocol, last)
    else:
        _v1_port_prefix(last)


def _v1_address_prefix(protocol: bytes, text: bytes) -> None:
    if len(text) > _V1_ADDRESS_MAX[protocol] or not set(text) <= _V1_ADDRESS_CHARS[protocol]:
        raise ProxyError(f"bad {protocol.decode()} address in PROXY v1 line")


def _v1_port_prefix(text: bytes) -> None:
    if text and (not _PORT_RE.fullmatch(text) or int(text) > 65535):
        raise ProxyError("bad port in PROXY v1 line (0-65535, no leading zeros)")


# --- v2 -------------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse from the 12-byte signature on, checking each field as soon as it has arrived."""
    if len(data) < 13:
        return None
    command = _v2_command(data[12])
    if len(data) < 14:
        return None
    family, address_length = _v2_family(data[13], command)
    if len(data) < _V2_FIXED:
        return None
    length = int.from_bytes(data[14:16], "big")
    if length > _MAX_V2_LENGTH:
        raise ProxyError(f"PROXY v2 header length {length} over the {_MAX_V2_LENGTH} byte cap")
    if length < address_length:
        raise ProxyError(f"PROXY v2 length {length} too short for its address family")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if command == _CMD_LOCAL:
        # The proxy's own connection: the spec says to discard the whole block.
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, {}), total
    block = data[_V2_FIXED : _V2_FIXED + address_length]
    source, destination = _v2_addresses(family, block)
    tlvs = _v2_tlvs(data[:total], _V2_FIXED + address_length)
    return ProxyHeader(2, "PROXY", family, source, destination, tlvs), total


def _v2_command(ver_cmd: int) -> int:
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"unsupported PROXY v2 version nibble {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyError(f"unsupported PROXY v2 command nibble {command}")
    return command


def _v2_family(fam: int, command: int) -> tuple[str, int]:
    if command == _CMD_LOCAL:
        return "UNSPEC", 0
    try:
        return _V2_FAMILIES[fam]
    except KeyError:
        raise ProxyError(f"unsupported PROXY v2 family/transport 0x{fam:02x}") from None


def _v2_addresses(family: str, block: bytes) -> tuple[Endpoint | None, Endpoint | None]:
    if family == "TCP4":
        size: int = 4
        make = ipaddress.IPv4Address
    elif family == "TCP6":
        size = 16
        make = ipaddress.IPv6Address  # type: ignore[assignment]
    else:
        return None, None
    src = str(make(block[:size]))
    dst = str(make(block[size : 2 * size]))
    sport = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return (src, sport), (dst, dport)


def _v2_tlvs(header: bytes, offset: int) -> dict[int, bytes]:
    """Parse the TLVs from offset to the end of header, verifying a CRC32C TLV if present."""
    tlvs: dict[int, bytes] = {}
    crc_at = -1
    while offset < len(header):
        if len(header) - offset < 3:
            raise ProxyError("truncated PROXY v2 TLV")
        kind = header[offset]
        length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        start = offset + 3
        if start + length > len(header):
            raise ProxyError(f"PROXY v2 TLV 0x{kind:02x} runs past the header")
        if kind != PP2_TYPE_NOOP:
            if kind in tlvs:
                raise ProxyError(f"duplicate PROXY v2 TLV 0x{kind:02x}")
            tlvs[kind] = header[start : start + length]
            if kind == PP2_TYPE_CRC32C:
                crc_at = start
        offset = start + length
    if crc_at >= 0:
        _verify_crc32c(header, crc_at, tlvs[PP2_TYPE_CRC32C])
    return tlvs


def _verify_crc32c(header: bytes, at: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyError("PROXY v2 CRC32C TLV must be 4 bytes")
    zeroed = header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]
    if crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyError("PROXY v2 CRC32C checksum mismatch")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of the PP2_TYPE_CRC32C TLV."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- building -------------------------------------------------------------------------------


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoints(src: Endpoint | None, dst: Endpoint | None) -> tuple[_IP, int, _IP, int] | None:
    if src is None and dst is None:
        return None
    if src is None or dst is None:
        raise ValueError("source and destination must both be given or both be None")
    src_ip, dst_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if src_ip.version != dst_ip.version:
        raise ValueError("source and destination must be the same address family")
    for port in (src[1], dst[1]):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range 0-65535")
    return src_ip, src[1], dst_ip, dst[1]


def build_v1(src: Endpoint | None, dst: Endpoint | None) -> bytes:
    """A v1 line: "PROXY TCP4 src dst sport dport\\r\\n", or "PROXY UNKNOWN\\r\\n" for None, None."""
    endpoints = _endpoints(src, dst)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    src_ip, sport, dst_ip, dport = endpoints
    protocol = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {protocol} {src_ip} {dst_ip} {sport} {dport}\r\n".encode("ascii")


def build_v2(
    src: Endpoint | None,
    dst: Endpoint | None,
    *,
    local: bool = False,
    tlvs: dict[int, bytes] | None = None,
    checksum: bool = False,
) -> bytes:
    """A v2 header. local=True is the proxy's own connection (no addresses, no TLVs);
    src=dst=None with local=False is AF_UNSPEC. checksum=True appends a CRC32C TLV."""
    tlvs = dict(tlvs or {})
    endpoints = _endpoints(src, dst)
    if local:
        if endpoints is not None or tlvs or checksum:
            raise ValueError("a LOCAL header carries no addresses or TLVs")
        return V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])
    if endpoints is None:
        fam, block = 0x00, b""
    else:
        src_ip, sport, dst_ip, dport = endpoints
        fam = 0x11 if src_ip.version == 4 else 0x21
        block = src_ip.packed + dst_ip.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    if PP2_TYPE_CRC32C in tlvs:
        raise ValueError("use checksum=True instead of a hand-made CRC32C TLV")
    if checksum:
        tlvs[PP2_TYPE_CRC32C] = b"\x00\x00\x00\x00"  # last, patched below
    body = block + b"".join(_tlv_bytes(kind, value) for kind, value in tlvs.items())
    if len(body) > _MAX_V2_LENGTH:
        raise ValueError(f"PROXY v2 header over {MAX_HEADER_BYTES} bytes")
    header = V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
    if checksum:
        crc = crc32c(header).to_bytes(4, "big")
        header = header[:-4] + crc  # the CRC TLV was appended last
    return header


def _tlv_bytes(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 255:
        raise ValueError(f"TLV type {kind} out of range 0-255")
    return bytes([kind]) + len(value).to_bytes(2, "big") + value
