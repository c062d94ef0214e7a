"""Run the open-relay battery against any SMTP server: ``relaywarden relay-test HOST[:PORT]``.

Each attempt is its own short session (EHLO, STARTTLS when offered, MAIL, RCPT, RSET/QUIT), so
that one refusal cannot colour the next; nothing is ever sent after RCPT (no DATA), so even an
open relay relays nothing.  The outcome of each attempt: refused (5xx), deferred (4xx — relay
testers count it as a failure) or accepted (the server would relay).

``implicit_tls`` speaks TLS from the first byte (a port 465 listener); ``proxy_header`` is sent
before anything else, for a listener behind a PROXY-protocol proxy (the doctor uses it to appear
as a stranger from the Internet instead of the loopback address it really connects from).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import asdict, dataclass

from .relay_attempts import ACCEPTED, DEFERRED, RelayAttempt, outcome, relay_attempts


@dataclass(frozen=True)
class AttemptOutcome:
    name: str
    mail_from: str
    rcpt_to: str
    mail_reply: str
    rcpt_reply: str | None
    outcome: str                 # refused / deferred / accepted / error

    def to_dict(self) -> dict:
        return asdict(self)


async def _read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    lines = []
    while True:
        raw = await asyncio.wait_for(reader.readline(), timeout)
        if not raw:
            raise ConnectionError("connection closed by the server")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
        if len(lines) > 200:
            raise ConnectionError("reply too long")
    code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
    return code, " / ".join(lines)


BATTERY_HELO = "relay-test.invalid"
"""The EHLO name of every attempt: the doctor leaves these sessions out of its traffic checks."""


def _no_verify() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE     # a relay test is about relaying, not certificates
    return ctx


def _offers_starttls(ehlo_reply: str) -> bool:
    return any(line[4:].strip().upper().split(" ")[0:1] == ["STARTTLS"] for line in ehlo_reply.split(" / "))


async def try_one(host: str, port: int, attempt: RelayAttempt, *, helo: str = BATTERY_HELO,
                  timeout: float = 10.0, starttls: bool = True, implicit_tls: bool = False,
                  proxy_header: bytes | None = None) -> AttemptOutcome:
    mail_from, rcpt_to = attempt.commands
    try:
        if proxy_header is not None:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        else:
            tls = _no_verify() if implicit_tls else None
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=tls), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        return AttemptOutcome(attempt.name, attempt.mail_from, attempt.rcpt_to, f"connect failed: {exc!r}", None, "error")
    try:
        if proxy_header is not None:
            writer.write(proxy_header)
            await writer.drain()
            if implicit_tls:
                await asyncio.wait_for(writer.start_tls(_no_verify()), timeout)

        async def cmd(line: str) -> tuple[int, str]:
            writer.write(line.encode("utf-8") + b"\r\n")
            await writer.drain()
            return await _read_reply(reader, timeout)

        await _read_reply(reader, timeout)
        code, text = await cmd(f"EHLO {helo}")
        if starttls and not implicit_tls and _offers_starttls(text):
            code, _ = await cmd("STARTTLS")
            if code == 220:
                await asyncio.wait_for(writer.start_tls(_no_verify()), timeout)
                await cmd(f"EHLO {helo}")
        mcode, mtext = await cmd(mail_from)
        rcode, rtext = (None, None)
        if mcode < 400:
            rcode, rtext = await cmd(rcpt_to)
        result = outcome(mcode, rcode)
        try:
            await cmd("RSET")
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        return AttemptOutcome(attempt.name, attempt.mail_from, attempt.rcpt_to, mtext, rtext, result)
    except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
        return AttemptOutcome(attempt.name, attempt.mail_from, attempt.rcpt_to, f"error: {exc!r}", None, "error")
    finally:
        writer.close()


async def run_battery(host: str, port: int, *, local_domain: str, local_address: str | None = None,
                      server_ip: str | None = None, timeout: float = 10.0, concurrency: int = 4,
                      starttls: bool = True, implicit_tls: bool = False,
                      proxy_header: bytes | None = None) -> list[AttemptOutcome]:
    """Every attempt of the battery against host:port, ``concurrency`` sessions at a time."""
    local_address = local_address or f"postmaster@{local_domain}"
    server_ip = server_ip or host
    attempts = relay_attempts(local_domain, local_address, server_ip)
    sem = asyncio.Semaphore(concurrency)

    async def one(a: RelayAttempt) -> AttemptOutcome:
        async with sem:
            return await try_one(host, port, a, timeout=timeout, starttls=starttls,
                                 implicit_tls=implicit_tls, proxy_header=proxy_header)

    return list(await asyncio.gather(*(one(a) for a in attempts)))


def relayed(results: list[AttemptOutcome]) -> list[AttemptOutcome]:
    return [r for r in results if r.outcome == ACCEPTED]


def deferred(results: list[AttemptOutcome]) -> list[AttemptOutcome]:
    return [r for r in results if r.outcome == DEFERRED]
