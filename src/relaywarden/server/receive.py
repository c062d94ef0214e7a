"""Turning a received message into a queue record: the Received header, the loop check, MessageIn.

Pure functions over what the session knows; the listener calls them between the end of DATA/BDAT
and the queue commit.
"""

from __future__ import annotations

import email.utils
import time

from .. import status
from ..queue.model import MessageIn, RecipientIn
from ..status import Reply


def received_header(*, helo: str, client_address: str, client_rdns: str | None, hostname: str,
                    protocol: str, session_id: str, tls: str | None, recipient: str | None,
                    when: float) -> bytes:
    """A Received header (RFC 5321 4.4, protocol names of RFC 3848)."""
    if ":" in client_address:
        literal = f"[IPv6:{client_address}]"
    elif client_address[:1].isdigit():
        literal = f"[{client_address}]"
    else:
        literal = client_address       # "unknown": a proxy did not say who the client is
    origin = f"{client_rdns} {literal}" if client_rdns else literal
    lines = [f"Received: from {helo} ({origin})",
             f"\tby {hostname} (relaywarden) with {protocol} id {session_id}"]
    if tls:
        version, _, cipher = tls.partition(" ")
        lines.append(f"\t(using {version} with cipher {cipher})")
    if recipient:
        lines.append(f"\tfor <{recipient}>")
    lines[-1] += f"; {date_text(when)}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_date: tuple[int, str] = (-1, "")


def date_text(when: float) -> str:
    """RFC 5322 date-time in UTC of the second ``when`` falls in; the last second's text is
    kept (every message of a busy second has the same)."""
    global _date
    second = int(when)
    cached = _date
    if cached[0] != second:
        cached = _date = (second, email.utils.formatdate(second, localtime=False))
    return cached[1]


def protocol_name(*, esmtp: bool, tls: bool, authenticated: bool, utf8: bool) -> str:
    if not esmtp:
        return "SMTP"
    name = "UTF8SMTP" if utf8 else "ESMTP"
    return name + ("S" if tls else "") + ("A" if authenticated else "")


def count_received(data: bytes, limit: int) -> int:
    """Received headers in the header section, counting up to ``limit + 1``."""
    end = data.find(b"\r\n\r\n")
    header = data if end < 0 else data[: end + 2]
    count, start = 0, 0
    if header[:9].lower() == b"received:":
        count = 1
    lowered = header.lower()
    while count <= limit:
        idx = lowered.find(b"\r\nreceived:", start)
        if idx < 0:
            break
        count += 1
        start = idx + 2
    return count


def loop_check(data: bytes, limit: int) -> Reply | None:
    hops = count_received(data, limit)
    return status.mail_loop(hops) if hops > limit else None


def build_message(*, envelope, data: bytes, listener: str, client_address: str, client_port: int,
                  helo: str, auth_user: str | None, tls: str | None, session_id: str,
                  received_at: float | None = None) -> MessageIn:
    recipients = []
    seen: set[tuple[str, str, str | None]] = set()
    for rcpt in envelope.recipients:
        decision = rcpt.info
        # The same recipient twice (RCPT repeated, or an address and its alias reaching one
        # mailbox) is delivered once, with the first RCPT's DSN parameters; each RCPT still got
        # its own 250. A mailbox of ours is one whatever the case of the address; an address we
        # relay or forward is the same only written the same: its local part is the destination's
        # to interpret, case included (RFC 5321 2.4), and its domain is lower-cased already.
        key = (str(decision.verdict.value), decision.recipient if decision.mailbox is None else "",
               decision.mailbox.casefold() if decision.mailbox else decision.route)
        if key in seen:
            continue
        seen.add(key)
        recipients.append(RecipientIn(
            address=decision.recipient,
            original=rcpt.path.raw,
            orcpt=rcpt.orcpt,
            notify=rcpt.notify,
            verdict=str(decision.verdict.value),
            # the next hop: the route's name, or for local delivery the mailbox's primary address
            route=decision.route if decision.route is not None else decision.mailbox,
            decision_id=decision.id,
        ))
    sender = envelope.sender.address.address if envelope.sender.address is not None else ""
    return MessageIn(
        sender=sender,
        recipients=tuple(recipients),
        data=data,
        received_at=received_at if received_at is not None else time.time(),
        listener=listener,
        client_address=client_address,
        client_port=client_port,
        helo=helo,
        auth_user=auth_user,
        tls=tls,
        body_type="8BITMIME" if envelope.body == "8BITMIME" else "7BIT",
        smtputf8=envelope.smtputf8,
        dsn_ret=envelope.ret,
        dsn_envid=envelope.envid,
        session_id=session_id,
    )
