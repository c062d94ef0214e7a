"""Building the NDRs relaywarden sends: RFC 3464 delivery status notifications.

This module owns ``build_ndr``: from a queued message, its original bytes and the recipients that
failed (or are delayed), it builds the complete RFC 5322 message sent to the envelope sender --
``multipart/report; report-type=delivery-status`` with a human part that names the real cause and
the fix (from ``relaywarden.dsn.causes``), the machine-readable ``message/delivery-status`` part,
and the original headers (RET=HDRS, the default) or the whole original message (RET=FULL).

It decides who gets a notice (never the null sender ``<>``; NOTIFY per RFC 3461, where an absent
NOTIFY means FAILURE,DELAY here) and does no I/O: the caller queues the result with the null
sender as its own envelope sender.

Originals with non-ASCII headers stay intact: an SMTPUTF8 original is returned as
``message/global-headers`` or ``message/global`` (RFC 6533); any other 8-bit header block is
carried quoted-printable in ``text/rfc822-headers`` so the report itself stays 7-bit.
"""

from __future__ import annotations

import re

import quopri
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, MIMEPart
from email.parser import BytesHeaderParser, BytesParser
from email.policy import Policy
from email.utils import format_datetime, make_msgid
from io import BytesIO
from typing import Literal

from relaywarden.dsn.causes import Cause, explain_status, status_for
from relaywarden.queue.model import DeliveryResult, QueuedMessage, QueuedRecipient

__all__ = [
    "DEFAULT_NOTIFY",
    "build_ndr",
    "cause_for",
    "diagnostic_code",
    "split_original",
    "wants_notice",
]

Action = Literal["failed", "delayed", "delivered", "relayed"]
SUCCESS_ACTIONS = ("delivered", "relayed")

# RFC 3461 4.1: without NOTIFY the MTA may send FAILURE or FAILURE,DELAY notices. We send both,
# like Postfix and Exchange: a sender whose mail is stuck for hours should hear about it.
DEFAULT_NOTIFY: tuple[str, ...] = ("FAILURE", "DELAY")

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Mail Relayed (no further delivery reports)",
}
_NOTIFY_FOR = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}
_WRAP = 72
_FOLD = 76


# --- who gets a notice ----------------------------------------------------------------------------

def wants_notice(recipient: QueuedRecipient, action: Action) -> bool:
    """Whether the sender asked (or, without NOTIFY, would want) this kind of notice."""
    notify = tuple(k.upper() for k in recipient.notify) or DEFAULT_NOTIFY
    if "NEVER" in notify:
        return False
    return _NOTIFY_FOR[action] in notify


# --- the facts of one recipient --------------------------------------------------------------------

def cause_for(recipient: QueuedRecipient, action: Action = "failed") -> Cause:
    """The cause of a recipient's last result (what the NDR and event 4001 say about it)."""
    result = recipient.last_result
    if result is None:
        cause = explain_status(None, None, "no delivery attempt was made", None)
    else:
        cause = explain_status(result.reply_code, result.enhanced_code, result.remote_text, result.command)
    return cause.with_status(_status(recipient, action))


def _status(recipient: QueuedRecipient, action: Action) -> str:
    result = recipient.last_result
    if action in SUCCESS_ACTIONS:
        enhanced = result.enhanced_code if result is not None else None
        return enhanced if enhanced and enhanced.startswith("2.") else "2.0.0"
    if result is None:
        return "5.0.0" if action == "failed" else "4.0.0"
    return status_for(
        result.reply_code, result.enhanced_code, result.remote_text, permanent=action == "failed"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def diagnostic_code(result: DeliveryResult) -> str | None:
    """The Diagnostic-Code value: ``smtp; 550 5.7.1 the remote text`` for an SMTP reply, or our
    own description as ``X-relaywarden; ...`` when no reply was received; None when unknown."""
    text = _one_line(result.remote_text or "")
    if result.reply_code is not None:
        parts = [str(result.reply_code)]
        if result.enhanced_code and not text.startswith(result.enhanced_code):
            parts.append(result.enhanced_code)
        if text:
            parts.append(text)
        return "smtp; " + " ".join(parts)
    if text:
        return "X-relaywarden; " + text
    return None


def _remote_mta(result: DeliveryResult | None) -> str | None:
    if result is None:
        return None
    if result.remote_host:
        return result.remote_host
    if result.remote_address:
        return f"[{result.remote_address}]"
    return None


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _addr_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"


def _original_recipient(orcpt: str | None) -> str | None:
    """ORCPT as given ("rfc822;a@b") to the Original-Recipient value ("rfc822; a@b")."""
    if not orcpt:
        return None
    kind, sep, addr = orcpt.partition(";")
    if not sep:
        return f"{_addr_type(orcpt)}; {orcpt.strip()}"
    return f"{kind.strip().lower()}; {addr.strip()}"


# --- the machine part ---------------------------------------------------------------------------

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")


def _fold(name: str, value: str) -> str:
    """One header field, folded at spaces so no line exceeds 76 characters where possible.
    Control characters (CR and LF above all) become a space: a value that came from a client or
    a remote server can never add a field or a recipient block to the report."""
    words = _CONTROLS.sub(" ", value).split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > _FOLD and line.strip() and not line.endswith(":"):
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}"
    lines.append(line)
    return "\r\n".join(lines)


def _status_fields(
    *,
    reporting_mta: str,
    message: QueuedMessage,
    arrival: float,
    reports: Sequence[tuple[QueuedRecipient, Action]],
    will_retry_until: float | None,
    ascii_only: bool,
) -> bytes:
    blocks: list[list[tuple[str, str]]] = []
    per_message = [("Reporting-MTA", f"dns; {reporting_mta}")]
    if message.dsn_envid:
        per_message.append(("Original-Envelope-Id", message.dsn_envid))
    per_message.append(("Arrival-Date", _date(arrival)))
    blocks.append(per_message)
    for recipient, action in reports:
        fields: list[tuple[str, str]] = []
        original = _original_recipient(recipient.orcpt)
        if original:
            fields.append(("Original-Recipient", original))
        fields.append(("Final-Recipient", f"{_addr_type(recipient.address)}; {recipient.address}"))
        fields.append(("Action", action))
        fields.append(("Status", _status(recipient, action)))
        result = recipient.last_result
        remote = _remote_mta(result)
        if remote:
            fields.append(("Remote-MTA", f"dns; {remote}"))
        diagnostic = diagnostic_code(result) if result is not None else None
        if diagnostic:
            fields.append(("Diagnostic-Code", diagnostic))
        if recipient.last_attempt_at is not None:
            fields.append(("Last-Attempt-Date", _date(recipient.last_attempt_at)))
        if action == "delayed" and will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(will_retry_until)))
        blocks.append(fields)
    text = "\r\n\r\n".join("\r\n".join(_fold(n, v) for n, v in block) for block in blocks) + "\r\n"
    if ascii_only:
        # message/delivery-status is 7-bit: a stray 8-bit character in a remote reply becomes "?".
        return text.encode("ascii", "replace")
    return text.encode("utf-8")


# --- the original message ---------------------------------------------------------------------

def split_original(original: bytes) -> tuple[bytes, bytes]:
    """The header block (with its final line end) and the body of a message."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        head, found, body = original.partition(sep)
        if found:
            return head + sep[: len(sep) // 2], body
    return original, b""


def _original_part(message: QueuedMessage, original: bytes, ret_full: bool) -> MIMEPart:
    part = MIMEPart(policy=email_policy.SMTP)
    headers, _ = split_original(original)
    if ret_full:
        eight_bit = not original.isascii()
        if message.smtputf8 and eight_bit:
            part["Content-Type"] = "message/global"
        else:
            part["Content-Type"] = "message/rfc822"
        cte = "binary" if message.body_type == "BINARYMIME" else ("8bit" if eight_bit else "7bit")
        part["Content-Transfer-Encoding"] = cte
        part["Content-Description"] = "Undelivered Message"
        part.set_payload(original.decode("ascii", "surrogateescape"))
        return part
    part["Content-Description"] = "Undelivered Message Headers"
    if headers.isascii():
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(headers.decode("ascii"))
    elif message.smtputf8:
        part["Content-Type"] = "message/global-headers"
        part["Content-Transfer-Encoding"] = "8bit"
        part.set_payload(headers.decode("ascii", "surrogateescape"))
    else:
        try:
            headers.decode("utf-8")
            charset = "utf-8"
        except UnicodeDecodeError:
            charset = "unknown-8bit"
        part["Content-Type"] = f"text/rfc822-headers; charset={charset}"
        part["Content-Transfer-Encoding"] = "quoted-printable"
        encoded = quopri.encodestring(headers.replace(b"\r\n", b"\n"))
        part.set_payload(encoded.decode("ascii").replace("\n", "\r\n"))
    return part


def _original_summary(original: bytes) -> tuple[str, str, str]:
    """Subject, Date and Message-ID of the original, for the human part."""
    headers, _ = split_original(original)
    try:
        parsed = BytesHeaderParser(policy=email_policy.default).parsebytes(headers)
        subject, date, message_id = (
            _one_line(str(parsed.get(name, "") or "")) for name in ("Subject", "Date", "Message-ID")
        )
    except Exception:  # a header block too broken to parse still gets its NDR
        return "", "", ""
    return subject, date, message_id


# --- the human part ---------------------------------------------------------------------------

def _para(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, _WRAP, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]


def _recipient_text(recipient: QueuedRecipient, action: Action) -> list[str]:
    if action in SUCCESS_ACTIONS:
        return _success_text(recipient, action)
    cause = cause_for(recipient, action)
    result = recipient.last_result
    verb = "Failed" if action == "failed" else "Delayed"
    lines = [f"<{recipient.address}>"]
    if recipient.orcpt:
        original = (_original_recipient(recipient.orcpt) or "").partition("; ")[2]
        if original and original.lower() != recipient.address.lower():
            lines.append(f"    (originally addressed to <{original}>)")
    lines.append(f"    {verb}: {cause.label} (status {_status(recipient, action)})")
    if result is not None:
        lines.extend(_reply_lines(result, cause))
    lines.extend(_para("What happened: " + cause.sentence, "    "))
    lines.extend(_para("What to do: " + cause.fix, "    "))
    return lines


def _success_text(recipient: QueuedRecipient, action: Action) -> list[str]:
    result = recipient.last_result
    lines = [f"<{recipient.address}>"]
    if action == "delivered":
        lines.append("    Delivered" + (" to the recipient's mailbox." if result and result.command == "LOCAL" else "."))
    else:
        lines += _para("Relayed: handed to the next mail server, which does not send delivery "
                       "reports; there will be no further report for this recipient.", "    ")
    if result is not None and result.remote_host and result.command != "LOCAL":
        where = f"{result.remote_host} [{result.remote_address}]" if result.remote_address else result.remote_host
        lines.append(f"    Remote host {where} said:")
        lines += _para(" ".join(str(x) for x in (result.reply_code, result.enhanced_code, result.remote_text) if x), "        ")
    return lines


def _reply_lines(result: DeliveryResult, cause: Cause) -> list[str]:
    """Who answered what: the remote host and its reply, or what our server saw."""
    remote = _remote_mta(result)
    where = remote or "our server"
    if remote and result.remote_address and result.remote_host:
        where = f"{result.remote_host} [{result.remote_address}]"
    said = (diagnostic_code(result) or "").removeprefix("smtp; ").removeprefix("X-relaywarden; ")
    if cause.key == "expired":
        head = f"Our server gave up (last host tried: {where}):" if remote else "Our server gave up:"
    elif (result.command or "").upper() == "LOCAL":
        head = "Local delivery answered:"
    elif result.reply_code is not None:
        after = f" in reply to {result.command}" if result.command else ""
        head = f"Remote host {where} said{after}:"
    elif remote:
        head = f"No SMTP reply from {where}:"
    else:
        head = "Our server reported:"
    return [f"    {head}", *_para(said or "(no details)", "        ")]


def _human_text(
    *,
    reporting_mta: str,
    message: QueuedMessage,
    original: bytes,
    reports: Sequence[tuple[QueuedRecipient, Action]],
    action: Action,
    arrival: float,
    will_retry_until: float | None,
    postmaster: str,
) -> str:
    failed = [r for r, a in reports if a == "failed"]
    delayed = [r for r, a in reports if a == "delayed"]
    succeeded = [r for r, a in reports if a in SUCCESS_ACTIONS]
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    if succeeded:
        lines += _para(f"Your message was {'delivered' if action == 'delivered' else 'relayed'} to "
                       f"{_count(succeeded)}, as you asked to be told (NOTIFY=SUCCESS).")
    if action == "failed":
        lines += _para(
            f"Your message could not be delivered to {_count(failed)}. It will not be "
            "retried: correct the problem described below before sending it again."
        )
    if delayed:
        until = f" until {_date(will_retry_until)}" if will_retry_until is not None else ""
        lead = "It has also not" if action == "failed" else "Your message has not"
        lines += ([""] if action == "failed" else []) + _para(
            f"{lead} been delivered yet to {_count(delayed)}. Our server is still trying and "
            f"will keep trying{until}; you do not need to send it again."
            + (" You will be told if it finally fails."
               if all(wants_notice(r, "failed") for r in delayed) else "")
        )
    subject, date, message_id = _original_summary(original)
    lines.append("")
    lines.append(f"Your message: {subject or '(no subject)'}")
    if date:
        lines.append(f"Sent: {date}")
    lines.append(f"Received by {reporting_mta}: {_date(arrival)}")
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines.append(f"Queue id: {message.id}")
    for recipient, rec_action in reports:
        lines.append("")
        lines.extend(_recipient_text(recipient, rec_action))
    lines.append("")
    lines += _para(
        "The machine-readable report (RFC 3464) and the original message "
        f"{'follow' if message.dsn_ret == 'FULL' and action not in SUCCESS_ACTIONS else 'headers follow'}. For help, write to "
        f"<{postmaster}> and include this report."
    )
    return "\r\n".join(lines) + "\r\n"


def _count(recipients: Sequence[QueuedRecipient]) -> str:
    if len(recipients) == 1:
        return f"<{recipients[0].address}>"
    return f"{len(recipients)} recipients"


# --- the whole report ---------------------------------------------------------------------------

def _select(
    failed: Iterable[QueuedRecipient], delayed: Iterable[QueuedRecipient], action: Action,
    succeeded: Iterable[QueuedRecipient] = (),
) -> list[tuple[QueuedRecipient, Action]]:
    chosen: list[tuple[QueuedRecipient, Action]] = []
    if action in SUCCESS_ACTIONS:
        return [(r, action) for r in succeeded if wants_notice(r, action)]
    if action == "failed":
        chosen += [(r, "failed") for r in failed if wants_notice(r, "failed")]
        if not chosen:
            return []
    chosen += [(r, "delayed") for r in delayed if wants_notice(r, "delayed")]
    return chosen


def _needs_utf8(message: QueuedMessage, reports: Sequence[tuple[QueuedRecipient, Action]]) -> bool:
    addresses = [message.sender] + [r.address for r, _ in reports] + [r.orcpt or "" for r, _ in reports]
    return not all(a.isascii() for a in addresses)


def build_ndr(
    *,
    reporting_mta: str,
    message: QueuedMessage,
    original: bytes,
    failed: Sequence[QueuedRecipient],
    delayed: Sequence[QueuedRecipient] = (),
    action: Action = "failed",
    arrival: float,
    now: float,
    postmaster: str,
    will_retry_until: float | None = None,
    succeeded: Sequence[QueuedRecipient] = (),
) -> bytes | None:
    """The complete NDR (CRLF line ends) for ``message``, or None when none is due.

    ``action="failed"``: the ``failed`` recipients are reported as failed, and any ``delayed``
    ones as still being retried in the same report. ``action="delayed"``: a delay warning for
    the ``delayed`` recipients (``failed`` must be empty), with ``Will-Retry-Until`` when
    ``will_retry_until`` is given. None when the sender is the null sender ``<>`` or when no
    recipient of the main kind asked for this notice (NOTIFY; absent NOTIFY = FAILURE,DELAY).
    ``action="delivered"`` / ``"relayed"``: a success report (NOTIFY=SUCCESS) for the
    ``succeeded`` recipients, delivered here or relayed to a next hop that does not offer DSN
    (RFC 3461 4.1); such a report returns only the headers, whatever RET says (RFC 3461 4.3).
    """
    if action not in SUBJECTS:
        raise ValueError(f"action must be one of {sorted(SUBJECTS)}, not {action!r}")
    if action == "delayed" and failed:
        raise ValueError("a delay warning reports no failed recipients; use action='failed'")
    if action in SUCCESS_ACTIONS and (failed or delayed):
        raise ValueError("a success report names only succeeded recipients")
    if not message.sender.strip("<> "):
        return None  # never an NDR to the null sender (RFC 5321 4.5.5, RFC 3464 2)
    reports = _select(failed, delayed, action, succeeded)
    if not reports:
        return None
    utf8 = _needs_utf8(message, reports)
    pol: Policy = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP

    report = EmailMessage(policy=pol)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{message.sender.strip('<>')}>"
    report["Subject"] = SUBJECTS[action]
    report["Date"] = _date(now)
    report["Message-ID"] = make_msgid(idstring=message.id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report["Content-Description"] = "Delivery status notification"

    text = _human_text(
        reporting_mta=reporting_mta, message=message, original=original, reports=reports,
        action=action, arrival=arrival, will_retry_until=will_retry_until, postmaster=postmaster,
    ).replace("\r\n", "\n")
    human = MIMEPart(policy=pol)
    # Quoted-printable keeps the report 7-bit even when a subject or address is not ASCII.
    human.set_content(text, disposition="inline", cte="7bit" if text.isascii() else "quoted-printable")
    human["Content-Description"] = "Notification"

    fields = _status_fields(
        reporting_mta=reporting_mta, message=message, arrival=arrival, reports=reports,
        will_retry_until=will_retry_until, ascii_only=not utf8,
    )
    machine = _machine_part(fields, utf8)
    ret_full = message.dsn_ret == "FULL" and action not in SUCCESS_ACTIONS
    report.set_payload([human, machine, _original_part(message, original, ret_full)])
    return _flatten(report, pol)


class _ByteExactGenerator(BytesGenerator):
    """Writes ``message/*`` payloads held as surrogate-escaped text back as the original bytes
    (the stdlib's BytesGenerator refuses 8-bit there)."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def _machine_part(fields: bytes, utf8: bool) -> EmailMessage | MIMEPart:
    """message/delivery-status parsed into its header blocks (as the stdlib generator wants it),
    or message/global-delivery-status (RFC 6533) kept as 8-bit text, which the stdlib does not
    know how to split."""
    if not utf8:
        return BytesParser(policy=email_policy.SMTP).parsebytes(
            b"Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"
            + fields
        )
    part = MIMEPart(policy=email_policy.SMTPUTF8)
    part["Content-Type"] = "message/global-delivery-status"
    part["Content-Description"] = "Delivery report"
    part["Content-Transfer-Encoding"] = "8bit"
    part.set_payload(fields.decode("ascii", "surrogateescape"))
    return part


def _flatten(report: EmailMessage, pol: Policy) -> bytes:
    out = BytesIO()
    # refold_source="none": the status fields and original headers are written as built.
    _ByteExactGenerator(out, policy=pol.clone(refold_source="none")).flatten(report)
    return out.getvalue()
