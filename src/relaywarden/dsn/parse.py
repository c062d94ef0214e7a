"""Reading bounces: any NDR, ours or another mail system's, into failed recipients and codes.

This module owns ``parse_bounce(data) -> BounceReport``. It reads, in this order:

1. RFC 3464 ``message/delivery-status`` parts (ours, Postfix, Sendmail, Exchange 2007 and later,
   Microsoft 365, Gmail and most modern MTAs): one recipient per Final-Recipient block, its Status,
   Diagnostic-Code, Remote-MTA and Action.
2. Abuse feedback reports (RFC 5965 ARF, ``message/feedback-report``) and auto-replies (RFC 3834
   ``Auto-Submitted: auto-replied``, vacation notices): these are not bounces and have no failed
   recipient; the report says what they are.
3. The text of non-standard bounces (Exim, qmail, Exchange 2003, Domino, old Sendmail, Yahoo,
   Gmail's older notices, DragonFly DMA, Amazon SES JSON notifications, ...): the recipients named
   on their own line or after "delivering your mail to", each with the SMTP reply that follows it
   ("550 5.1.1", "#5.1.1", "said: 550 ...", "(reason: ...)"), the remote host and the command.

When a reply carries no RFC 3463 code, the status is derived from the basic code and the wording
("550 ... mailbox full" -> 5.2.2) and marked so (``status_source``). Nothing here does I/O, and
``parse_bounce`` never raises on any input: what it cannot read it reports as kind "unreadable".
"""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header

__all__ = [
    "BounceReport",
    "FailedRecipient",
    "parse_bounce",
]

MAX_INPUT = 4 * 1024 * 1024  # bytes read from one message; bounces are small
MAX_NOTICE = 64 * 1024  # characters of human-readable notice searched for recipients
MAX_RECIPIENTS = 500


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient a bounce reports, with what the remote side said.

    ``status`` is an RFC 3463 code. ``status_source`` says where it came from: "status-field"
    (the DSN's Status), "reply" (an enhanced code in the remote reply), "wording" (derived from
    the basic code and the words of the reply) or "class" (only the class was known: x.0.0).
    ``reply_code`` is the basic SMTP code when one was found; ``command`` the SMTP command the
    reply answered (RCPT, DATA, MAIL, CONNECT) when the bounce says so.
    """

    address: str
    status: str
    status_source: str
    action: str = "failed"
    reply_code: int | None = None
    remote_reply: str = ""
    remote_mta: str = ""
    command: str | None = None
    original_recipient: str = ""


@dataclass(frozen=True, slots=True)
class BounceReport:
    """What a message says about delivery.

    ``kind``: "bounce" (at least one failed or delayed recipient), "abuse-report" (an ARF
    feedback report or a provider's complaint), "auto-reply" (a vacation or other RFC 3834
    answer), "delivery-report" (a notification of success), "not-a-bounce"
    (nothing in it reports a delivery) or "unreadable" (the parser gave up; ``notes`` says why).
    ``format`` names the layout that was read ("rfc3464", "exim", "qmail", ...).
    """

    kind: str
    format: str
    recipients: tuple[FailedRecipient, ...] = ()
    reporting_mta: str = ""
    subject: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "format": self.format,
            "reporting_mta": self.reporting_mta,
            "subject": self.subject,
            "notes": list(self.notes),
            "recipients": [
                {
                    "address": r.address,
                    "status": r.status,
                    "status_source": r.status_source,
                    "action": r.action,
                    "reply_code": r.reply_code,
                    "remote_reply": r.remote_reply,
                    "remote_mta": r.remote_mta,
                    "command": r.command,
                    "original_recipient": r.original_recipient,
                }
                for r in self.recipients
            ],
        }


def parse_bounce(data: bytes | str) -> BounceReport:
    """Read one message (bytes or text, any line endings) and report what it says.

    Never raises: an input that breaks the reader is reported as kind "unreadable".
    """
    try:
        return read_bounce(data)
    except Exception as exc:  # the last guard of "never crash"; the fuzz tests call read_bounce
        return BounceReport("unreadable", "none", notes=(f"the reader failed: {type(exc).__name__}: {exc}",))


def read_bounce(data: bytes | str) -> BounceReport:
    """``parse_bounce`` without the last guard (the fuzz tests call this one)."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape")
    raw = raw[:MAX_INPUT].replace(b"\r\n", b"\n")
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    subject = _header_text(msg.get("Subject", ""))
    if _is_feedback_report(msg):
        return BounceReport("abuse-report", "arf", subject=subject,
                            notes=("an abuse feedback report (RFC 5965 ARF): someone marked a message as "
                                   "spam or abuse; it reports no failed delivery",))
    ses = _amazon_ses_json(msg)
    if ses is not None:
        return _with_subject(ses, subject)
    dsn = _read_delivery_status(msg)
    if dsn is not None and (dsn.recipients or dsn.kind == "delivery-report"):
        return _with_subject(dsn, subject)
    forwarded = _forwarded_delivery_status(msg)
    if forwarded is not None:
        return _with_subject(forwarded, subject)
    notice = _notice_text(msg)
    if _is_auto_reply(msg, subject, notice):
        return BounceReport("auto-reply", "rfc3834", subject=subject,
                            notes=("an automatic reply (vacation or out-of-office, RFC 3834); "
                                   "the message was delivered",))
    text = _read_text_bounce(msg, notice)
    if text.recipients:
        return _with_subject(text, subject)
    if dsn is not None:
        return _with_subject(dsn, subject)
    return BounceReport("not-a-bounce", "none", subject=subject,
                        notes=("no failed recipient found: neither a delivery-status part nor a "
                               "recognised bounce text",))


def _with_subject(report: BounceReport, subject: str) -> BounceReport:
    return BounceReport(report.kind, report.format, report.recipients, report.reporting_mta, subject,
                        report.notes)


# --- MIME helpers ------------------------------------------------------------------------------

def _header_text(value: object) -> str:
    text = str(value or "")
    try:
        text = str(make_header(decode_header(text)))
    except Exception:
        pass
    return " ".join(text.split())


def _content_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return "text/plain"


def _walk(msg: email.message.Message) -> Iterator[email.message.Message]:
    """Every part, depth first, bounded, not entering returned messages (message/rfc822)."""
    stack = [msg]
    seen = 0
    while stack and seen < 200:
        part = stack.pop()
        seen += 1
        yield part
        ctype = _content_type(part)
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/global", "message/rfc822-headers"):
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and ctype.startswith("multipart/"):
            stack.extend(p for p in reversed(payload) if isinstance(p, email.message.Message))


def _decoded_text(part: email.message.Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        return "\n\n".join(
            "\n".join(f"{k}: {v}" for k, v in p.items()) for p in payload if isinstance(p, email.message.Message)
        )
    try:
        body = part.get_payload(decode=True)
    except Exception:
        body = None
    if not isinstance(body, bytes):
        return str(payload or "")
    charset = part.get_content_charset() or "utf-8"
    for cs in (charset, "utf-8", "latin-1"):
        try:
            return body.decode(cs)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("latin-1")


_TAG = re.compile(r"<[^>]{0,2000}>")
_BR = re.compile(r"<\s*(br|/p|/div|/tr|/li|p|div|tr|li)\b[^>]{0,500}>", re.IGNORECASE)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&amp;": "&", "&nbsp;": " ", "&quot;": '"', "&#64;": "@"}


def _html_to_text(html: str) -> str:
    html = re.sub(r"(?is)<(style|script)\b.*?</\1\s*>", " ", html[:MAX_NOTICE * 2])
    text = _TAG.sub("", _BR.sub("\n", html))
    for entity, char in _ENTITIES.items():
        text = text.replace(entity, char)
    return text


# --- abuse reports and auto-replies --------------------------------------------------------------

def _is_feedback_report(msg: email.message.Message) -> bool:
    if (msg.get_param("report-type", "", header="content-type") or "").lower() == "feedback-report":
        return True
    if any(_content_type(p) == "message/feedback-report" for p in _walk(msg)):
        return True
    # Microsoft's JMRP complaints: the reported message, marked with the complainer's address.
    for part in msg.walk():
        if part.get("X-HmXmrOriginalRecipient"):
            return True
    return False


_AUTO_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|vacation|abwesen|absence|"
    r"away from)", re.IGNORECASE)


def _is_auto_reply(msg: email.message.Message, subject: str, notice: str) -> bool:
    if _looks_like_failure(subject) or _from_mail_system(msg) or _looks_like_failure(notice[:2000]):
        return False
    auto = _header_text(msg.get("Auto-Submitted", "")).lower()
    if auto.startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond"):
        return True
    return bool(_AUTO_SUBJECT.match(subject)) and not _looks_like_failure(subject)


def _looks_like_failure(text: str) -> bool:
    return bool(re.search(r"undeliver|failure|failed|returned|delivery status|bounce|not (be )?delivered"
                          r"|could not deliver|unable to deliver|rejected", text, re.IGNORECASE))


def _from_mail_system(msg: email.message.Message) -> bool:
    sender = _header_text(msg.get("From", "")).lower()
    return bool(re.search(r"mailer-daemon|postmaster|mail delivery|mail administrator|mailer daemon", sender))


# --- RFC 3464 ------------------------------------------------------------------------------------

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")


def _field_blocks(text: str) -> list[dict[str, str]]:
    """Header-like field groups separated by blank lines (continuation lines folded in)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines()[:5000]:
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[:1] in (" ", "\t") and last is not None:
            current[last] += " " + line.strip()
            continue
        m = _FIELD.match(line)
        if m is None:
            last = None
            continue
        last = m.group(1).lower()
        if last not in current:
            current[last] = m.group(2).strip()
        else:
            last = None
    if current:
        blocks.append(current)
    return blocks


def _forwarded_delivery_status(msg: email.message.Message) -> BounceReport | None:
    """A DSN returned or forwarded inside another message (message/rfc822), read one level deep."""
    for part in _walk(msg):
        if _content_type(part) != "message/rfc822":
            continue
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, email.message.Message) and _content_type(inner) == "multipart/report":
            report = _read_delivery_status(inner)
            if report is not None and report.recipients:
                return BounceReport(report.kind, report.format, report.recipients, report.reporting_mta,
                                    notes=("the delivery-status report was found inside an enclosed message",))
    return None


def _delivery_status_texts(msg: email.message.Message) -> list[str]:
    texts = []
    for part in _walk(msg):
        if _content_type(part) in ("message/delivery-status", "message/global-delivery-status"):
            texts.append(_decoded_text(part))
    return texts


def _read_delivery_status(msg: email.message.Message) -> BounceReport | None:
    texts = _delivery_status_texts(msg)
    if not texts:
        # A DSN whose MIME structure broke on the way (a missing Content-Type, a forwarded
        # copy): its per-recipient fields are still there as lines of text.
        body = _decoded_text(msg) if not msg.is_multipart() else ""
        if re.search(r"(?im)^[> \t]*Final-Recipient:", body) and re.search(r"(?im)^[> \t]*Status:", body):
            texts = [re.sub(r"(?m)^> ?", "", body)]
    if not texts:
        return None
    reporting = ""
    recipients: list[FailedRecipient] = []
    succeeded = 0
    for text in texts:
        for block in _field_blocks(text):
            if "reporting-mta" in block and not reporting:
                reporting = _strip_type(block["reporting-mta"])
            if block.get("action", "").strip().lower() in _DSN_ACTIONS_SUCCESS:
                succeeded += 1
            rcpt = _recipient_from_block(block)
            if rcpt is not None and len(recipients) < MAX_RECIPIENTS:
                recipients.append(rcpt)
    recipients = _dedupe(recipients)
    if not recipients and succeeded:
        return BounceReport("delivery-report", "rfc3464", (), reporting,
                            notes=("a delivery status notification of success (delivered, relayed, expanded "
                                   "or deliverable): nothing failed",))
    kind = "bounce" if recipients else "not-a-bounce"
    notes = () if recipients else ("a delivery-status part with no failed or delayed recipient",)
    return BounceReport(kind, "rfc3464", tuple(recipients), reporting, notes=notes)


_DSN_ACTIONS_REPORTED = ("failed", "delayed", "expired", "")
_DSN_ACTIONS_SUCCESS = ("delivered", "relayed", "expanded", "deliverable")


def _strip_type(value: str) -> str:
    """'rfc822; a@b' -> 'a@b', 'dns; mx.example' -> 'mx.example'."""
    _, sep, rest = value.partition(";")
    return (rest if sep else value).strip()


def _recipient_from_block(block: dict[str, str]) -> FailedRecipient | None:
    final = block.get("final-recipient") or block.get("original-recipient") or block.get("x-actual-recipient")
    if not final:
        return None
    address = _clean_address(_strip_type(final))
    if not address:
        return None
    action = block.get("action", "").strip().lower().split(" ")[0]
    if action not in _DSN_ACTIONS_REPORTED:
        return None
    diagnostic = _strip_type(block.get("diagnostic-code", "")) if ";" in block.get("diagnostic-code", "") \
        else block.get("diagnostic-code", "")
    diagnostic = " ".join(diagnostic.split())
    status_field = _first_enhanced(block.get("status", ""))
    code = _basic_code(diagnostic)
    from_reply = _enhanced_in_reply(diagnostic, code)
    if from_reply and (not status_field or from_reply[0] == status_field[0]):
        # The remote server's own enhanced code is more precise than the reporting MTA's summary.
        status, source = from_reply, "reply"
    elif status_field:
        status, source = status_field, "status-field"
    else:
        status, source = _status_of_reply(code, diagnostic, action == "delayed")
        if status_field and status.endswith(".0.0"):
            status, source = status_field, "status-field"
    if action == "expired" and not status_field and not from_reply:
        status, source = "5.4.7", "wording"
    if action in ("", "expired"):
        action = "delayed" if status.startswith("4") else "failed"
    return FailedRecipient(
        address=address,
        status=status,
        status_source=source,
        action=action,
        reply_code=code,
        remote_reply=diagnostic,
        remote_mta=_strip_type(block.get("remote-mta", "")),
        command=_command_in(diagnostic),
        original_recipient=_clean_address(_strip_type(block.get("original-recipient", ""))),
    )


# --- status codes in reply texts -----------------------------------------------------------------

_ENH = r"([245])\.(\d{1,3})\.(\d{1,3})"
_ENHANCED_RE = re.compile(r"(?<![\w.])#?" + _ENH + r"(?![\d.]\d)")
_BASIC_RE = re.compile(r"(?<![\w.#/-])([245][0-5]\d)(?=[ \t,-]|$)", re.MULTILINE)


def _first_enhanced(text: str) -> str | None:
    m = _ENHANCED_RE.search(text)
    return ".".join(m.groups()) if m else None


_CODE_THEN_ENHANCED = re.compile(r"(?<![\w.#:/-])([245])[0-5]\d[ \t-]+['\"(#]?" + _ENH + r"(?![\d.]\d)")


def _enhanced_in_reply(text: str, code: int | None) -> str | None:
    """The enhanced code of a reply: the one right after the first basic code ("550 5.2.2"),
    else the first one whose class agrees with the basic code."""
    m = _CODE_THEN_ENHANCED.search(text[:2000])
    if m is not None:
        # The pair the server sent ("554 4.4.7 Message expired"): its enhanced code is the status
        # even when its class disagrees with the basic code's.
        return ".".join(m.groups()[1:])
    for m in _ENHANCED_RE.finditer(text[:2000]):
        status = ".".join(m.groups())
        if code is None or status[0] == str(code)[0]:
            return status
    return None


def _basic_code(text: str) -> int | None:
    m = _BASIC_RE.search(text[:2000])
    return int(m.group(1)) if m else None


_WORDING: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), status)
    for p, status in (
        (r"mailbox (is )?full|over (the )?quota|quota exceeded|exceeded (the )?(storage|quota)"
         r"|insufficient (disk )?space|mailbox size limit|is over quota|disk quota", "x.2.2"),
        (r"user unknown|unknown user|no such (user|mailbox|recipient|address)|recipient (name )?is not"
         r" recognized|unknown (local[- ]part|recipient|address)|mailbox (unavailable|not found|"
         r"does not exist)|does not exist|invalid (recipient|mailbox|address)|address rejected"
         r"|not a valid (mailbox|recipient|user)|user not found|no mailbox|recipient rejected"
         r"|addressee unknown|account (does not exist|not found|is unavailable)"
         r"|couldn't find any host named|unrouteable address|not listed in", "x.1.1"),
        (r"host (or domain name )?not found|domain (not found|does not exist)|unknown host|no such domain"
         r"|host unknown|name server|dns lookup failure|nxdomain|unrouteable mail domain", "x.1.2"),
        (r"mailbox (is )?(disabled|inactive|suspended)|account (is )?(disabled|suspended|inactive)"
         r"|user (account )?(is )?(disabled|suspended)", "x.2.1"),
        (r"message (is )?too (big|large)|message size exceeds|exceeds (the )?(maximum )?(message )?size"
         r"|size limit", "x.3.4"),
        (r"mail loop|too many hops|routing loop|loop detected", "x.4.6"),
        (r"could not deliver for the last \d+ seconds|retry timeout exceeded|message expired"
         r"|too long in (the )?queue", "x.4.7"),
        (r"relay(ing)? (access )?(denied|not permitted|prohibited)|unable to relay|not permitted to relay",
         "x.7.1"),
    )
)


def _status_from_wording(text: str, klass: str) -> str | None:
    for pattern, status in _WORDING:
        if pattern.search(text):
            return klass + status[1:]
    return None


_RETRIED = re.compile(
    r"retry timeout exceeded|retry time not reached|will be retried|warning message only|has been delayed"
    r"|not yet been delivered|delivery (is )?delayed|have been failing for a long time", re.IGNORECASE)
_TEMPORARY = re.compile(
    r"temporar|try(ing)? again|will (be )?retr|not yet been delivered|delayed|deferred|will keep trying"
    r"|still trying|warning:", re.IGNORECASE)


def _status_of_reply(code: int | None, text: str, temporary_hint: bool = False) -> tuple[str, str]:
    """The RFC 3463 status of a reply text and where it came from."""
    enhanced = _enhanced_in_reply(text, code)
    if enhanced is not None:
        return enhanced, "reply"
    if code is not None:
        klass = str(code)[0]
    else:
        klass = "4" if temporary_hint else "5"
    worded = _status_from_wording(text, klass)
    if worded is not None:
        return worded, "wording"
    return f"{klass}.0.0", "class"


_COMMAND = re.compile(
    r"(?:after|in reply to|response to|during|to)\s+(?:the\s+)?(RCPT TO|MAIL FROM|RCPT|MAIL|DATA|"
    r"end of (?:data|message)|HELO|EHLO|CONNECT|initial connection|greeting)", re.IGNORECASE)


def _command_in(text: str) -> str | None:
    m = _COMMAND.search(text)
    if m is None:
        return None
    word = m.group(1).upper()
    if word.startswith("RCPT"):
        return "RCPT"
    if word.startswith("MAIL"):
        return "MAIL"
    if word.startswith("END OF") or word == "DATA":
        return "DATA"
    if word in ("HELO", "EHLO"):
        return "EHLO"
    return "CONNECT"


# --- addresses -----------------------------------------------------------------------------------

_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\.?"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.)+[A-Za-z][A-Za-z0-9-]{0,62}|\[[0-9A-Fa-f.:IPv]{3,60}\]"
_ADDRESS = r"(?<![A-Za-z0-9!#$%&'*+/=?^_`{|}~.-])(?:" + _LOCAL + r'|"[^"\r\n]{1,64}")@(?:' + _DOMAIN + r")"
_ADDRESS_RE = re.compile(_ADDRESS)


def _clean_address(value: str) -> str:
    value = value.strip().strip("<>").strip()
    m = _ADDRESS_RE.search(value)
    if m is not None:
        return m.group(0).lower()
    # A DSN field may name a host without a dot ("kijitora@mailhub0"): take it as it is.
    local = re.fullmatch(r"[^\s@<>\"]{1,64}@[A-Za-z0-9-]{1,63}", value)
    return local.group(0).lower() if local else ""


def _dedupe(recipients: Iterable[FailedRecipient]) -> list[FailedRecipient]:
    seen: dict[str, FailedRecipient] = {}
    for r in recipients:
        previous = seen.get(r.address)
        if previous is None or (previous.status.endswith(".0.0") and not r.status.endswith(".0.0")):
            seen[r.address] = r
    return list(seen.values())


# --- Amazon SES notifications (JSON) -----------------------------------------------------------

def _amazon_ses_json(msg: email.message.Message) -> BounceReport | None:
    for part in _walk(msg):
        if _content_type(part) not in ("text/plain", "application/json"):
            continue
        body = _decoded_text(part).strip()
        start = body.find("{")
        if start < 0 or "notificationType" not in body and "eventType" not in body:
            continue
        data = _json_object(body[start:body.rfind("}") + 1])
        if data is None:
            continue
        if isinstance(data, dict) and isinstance(data.get("Message"), str):
            try:
                data = json.loads(data["Message"])
            except ValueError:
                continue
        if isinstance(data, dict):
            return _ses_report(data)
    return None


def _json_object(text: str) -> object:
    """JSON as it arrives by mail: long lines may have been folded ("!" + newline + space)."""
    for candidate in (text, re.sub(r"!?\n ", "", text)):
        try:
            return json.loads(candidate)
        except (ValueError, RecursionError):
            continue
    return None


def _ses_report(data: dict[str, object]) -> BounceReport:
    kind = str(data.get("notificationType") or data.get("eventType") or "")
    if kind == "Complaint":
        return BounceReport("abuse-report", "amazon-ses", notes=("an Amazon SES complaint notification: a "
                                                                 "recipient marked the message as spam",))
    if kind == "Delivery":
        return BounceReport("delivery-report", "amazon-ses", notes=("an Amazon SES delivery notification",))
    bounce = data.get("bounce") if isinstance(data.get("bounce"), dict) else {}
    assert isinstance(bounce, dict)
    temporary = str(bounce.get("bounceType", "")).lower() == "transient"
    reporting = str(bounce.get("reportingMTA", "")).removeprefix("dns;").strip()
    recipients = []
    for item in bounce.get("bouncedRecipients") or []:
        if not isinstance(item, dict):
            continue
        address = _clean_address(str(item.get("emailAddress", "")))
        if not address:
            continue
        diagnostic = _strip_type(str(item.get("diagnosticCode", "")))
        code = _basic_code(diagnostic)
        status = _first_enhanced(str(item.get("status", "")))
        if status:
            source = "status-field"
        else:
            status, source = _status_of_reply(code, diagnostic, temporary)
        recipients.append(FailedRecipient(address, status, source, "delayed" if temporary else "failed", code,
                                          diagnostic, reporting, _command_in(diagnostic)))
    kind_out = "bounce" if recipients else "not-a-bounce"
    return BounceReport(kind_out, "amazon-ses", tuple(recipients), reporting)


# --- non-standard bounces: the human-readable notice ---------------------------------------------

_RETURNED_MARKER = re.compile(
    r"^[ \t>]*(?:[-=_*]{2,}.*)?(?:this is a copy of|copy of the (original )?message|original message"
    r"|below this line is a copy|returned message|undelivered message|message headers follow"
    r"|headers of the original|original message (headers )?follows|unsent message below"
    r"|the (first .* lines|text) of the (original |returned )?message|included is a copy"
    r"|your message reads|the original message was:|rfc822 message|message text follows"
    r"|this is the original message|returned mail follows|below is a copy)", re.IGNORECASE)
_HEADER_START = re.compile(r"^(Return-Path|Received|DKIM-Signature|Message-I[dD]|X-Received|"
                           r"Authentication-Results|ARC-Seal):", re.IGNORECASE)


def _notice_text(msg: email.message.Message) -> str:
    """The human-readable part of a bounce, without the returned message."""
    plain: list[str] = []
    html: list[str] = []
    for part in _walk(msg):
        ctype = _content_type(part)
        if part.is_multipart():
            continue
        if ctype in ("text/plain", "text/enriched") or ctype.startswith("multipart/") or (
                part is msg and not ctype.startswith("text/html")):
            plain.append(_decoded_text(part))
        elif ctype == "text/html":
            html.append(_html_to_text(_decoded_text(part)))
        elif ctype.startswith("message/") and "delivery-status" in ctype:
            plain.append(_decoded_text(part))
    text = "\n".join(plain) if plain and any(p.strip() for p in plain) else "\n".join(html)
    return _cut_returned(_unquote(text[:MAX_NOTICE * 4]))[:MAX_NOTICE]


def _unquote(text: str) -> str:
    """A bounce forwarded as a quotation ("> " on every line) read as the bounce itself."""
    lines = text.split("\n")
    quoted = [line for line in lines if line.startswith(">")]
    if len(quoted) < 5 or len(quoted) * 2 < len([line for line in lines if line.strip()]):
        return text
    return "\n".join(line[2:] if line.startswith("> ") else line[1:] if line.startswith(">") else line
                     for line in lines)


def _cut_returned(text: str) -> str:
    lines = text.replace("\r", "").split("\n")
    out: list[str] = []
    previous_blank = True
    for line in lines:
        if _RETURNED_MARKER.match(line) and out:
            break
        if previous_blank and _HEADER_START.match(line) and len(out) > 2:
            break
        out.append(line)
        previous_blank = not line.strip()
    return "\n".join(out)


_LEAD_ADDRESS = re.compile(
    r"^[ \t>*-]*(?:[245]\d\d[ \t-]+(?:[245]\.\d{1,3}\.\d{1,3}[ \t]+)?)?(?:(?:RCPT TO|Recipient address|Original-Recipient|Final-Recipient|Failed recipient|"
    r"Recipient|Address|To|Mailbox|Empf[a-z]+nger|Destinataire|rfc822)[ \t]*:?[ \t]*)?"
    r"(?:\"[^\"\n]{0,80}\"[ \t]*|[^<>@\n:]{0,40})?"
    r"<?(" + _ADDRESS + r")>?(?P<rest>.*)$", re.IGNORECASE)
_PHRASE_ADDRESS = re.compile(
    r"(?:delivering your (?:mail|message) to|could not be delivered to|delivery to|deliver(?:ed)? to|"
    r"failed to deliver to|undeliverable to|not be delivered to|address(?:es)? failed:|recipients?:|errors?:"
    r"|failed:|address:|"
    r"unable to deliver (?:your |the )?(?:message |mail )?to|RCPT TO:|rejected your message to|for(?: the)? recipient|user)"
    r"[ \t:]*<?(" + _ADDRESS + r")>?", re.IGNORECASE)


# "User mailbox exceeds allowed size: kijitora@example.co.jp" -- a sentence, a colon, the address.
_TRAILING_ADDRESS = re.compile(r"^\s*[A-Za-z][^:@<>\n]{0,80}\s[^:@<>\n]{0,80}:\s*<?(" + _ADDRESS + r")>?\s*\.?\s*$")


@dataclass(slots=True)
class _Block:
    address: str
    lines: list[str]


def _excluded_addresses(msg: email.message.Message) -> set[str]:
    """Addresses a bounce mentions that are not failed recipients: its own sender and receiver."""
    excluded: set[str] = set()
    for name in ("To", "From", "Return-Path", "Reply-To", "Sender"):
        for m in _ADDRESS_RE.finditer(_header_text(msg.get(name, ""))):
            excluded.add(m.group(0).lower())
    return excluded


def _recipient_blocks(notice: str, excluded: set[str]) -> list[_Block]:
    blocks: list[_Block] = []
    current: _Block | None = None
    previous = ""
    for line in notice.split("\n")[:3000]:
        address = None if _SENDER_INTRO.search(previous) else _line_recipient(line, excluded)
        if line.strip():
            previous = line
        if address is not None:
            if current is not None and current.address == address:
                current.lines.append(line)
                continue
            current = _Block(address, [line])
            blocks.append(current)
        elif current is not None:
            current.lines.append(line)
        if len(blocks) > MAX_RECIPIENTS:
            break
    return blocks


# "A message sent by" / "from" on the line before: the next address is the sender's.
_SENDER_INTRO = re.compile(r"(sent by|\bfrom|sender( address)?)\s*:?\s*$", re.IGNORECASE)
_NOT_RECIPIENT_LEAD = re.compile(r"^\s*(from|sender|reply-to|return-path|envelope-from|by|cc|message-id)\b",
                                 re.IGNORECASE)


def _line_recipient(line: str, excluded: set[str]) -> str | None:
    if len(line) > 1000 or "@" not in line or _NOT_RECIPIENT_LEAD.match(line):
        return None
    m = _LEAD_ADDRESS.match(line)
    if m is not None:
        address = m.group(1).lower().rstrip(".")
        alone = m.group("rest").strip() in ("", ":") and not line[: m.start(1)].strip(" \t<>")
        if (alone or address not in excluded) and _address_leads(line, m):
            return address
    e = _TRAILING_ADDRESS.match(line)
    if e is not None and e.group(1).lower() not in excluded:
        return e.group(1).lower()
    p = _PHRASE_ADDRESS.search(line)
    if p is not None:
        address = p.group(1).lower().rstrip(".")
        if address not in excluded:
            return address
    return None


def _address_leads(line: str, m: re.Match[str]) -> bool:
    """The address is the subject of the line: at its start, or after a recipient label."""
    before = line[: m.start(1)]
    label = re.sub(r"^[245]\d\d([245]\.\d{1,3}\.\d{1,3})?", "", re.sub(r"[\s<>\"*>-]", "", before))
    rest = m.group("rest").strip()
    if rest.startswith("@"):
        return False
    if not label:
        return True
    return bool(re.match(r"(?i)(rcptto|recipientaddress|original-recipient|final-recipient|failedrecipient|"
                         r"recipient|address|mailbox|empf\w*nger|destinataire|rfc822)[:;]?", label))


_REMOTE_HOST = re.compile(
    r"(?:host|server|mx|by)\s+\[?([A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z]{2,}|\d{1,3}(?:\.\d{1,3}){3})\]?", re.IGNORECASE)
_REPLY_LINE = re.compile(
    r"(?:^|said:|says:|said|reason:|error:|returned:|replied:|response:|\]:|\):|:|;|\s(?=#))\s*\[?"
    r"(#?[245]\d\d[ \t,-].*|#?[245]\.\d{1,3}\.\d{1,3}.*)", re.IGNORECASE)


def _block_reply(lines: list[str]) -> tuple[int | None, str]:
    """The basic code and the reply text found in a recipient's block."""
    joined = [line.strip() for line in lines]
    for i, line in enumerate(joined):
        m = _REPLY_LINE.search(line)
        if m is None:
            continue
        reply = m.group(1)
        code = _basic_code(reply)
        if code is None and not _ENHANCED_RE.match(reply):
            continue
        if code is not None and code < 300 or code is None and reply.lstrip("#").startswith("2"):
            continue  # a positive reply in a transcript ("250 2.1.5 Ok") is not the failure
        more = [x for x in joined[i + 1:i + 4] if x and not _LEAD_ADDRESS.match(x)]
        text = " ".join([reply, *more]) if not reply.rstrip().endswith(".") or more and more[0][:3].isdigit() \
            else reply
        return code, " ".join(text.split())[:1000]
    text = " ".join(" ".join(x for x in joined[1:] if x).split())
    return None, text[:1000]


def _read_text_bounce(msg: email.message.Message, notice: str) -> BounceReport:
    excluded = _excluded_addresses(msg)
    blocks = _recipient_blocks(notice, excluded)
    if not blocks:
        failed = _header_text(msg.get("X-Failed-Recipients", ""))
        blocks = [_Block(m.group(0).lower(), []) for m in _ADDRESS_RE.finditer(failed)]
    if not blocks and (_from_mail_system(msg) or _looks_like_failure(_header_text(msg.get("Subject", "")))):
        blocks = [_Block(address, []) for address in _returned_recipients(msg)]
    notice_temporary = bool(_TEMPORARY.search(notice[:3000])) and not re.search(
        r"permanent|fatal|given up|giving up|could not be delivered", notice[:3000], re.IGNORECASE)
    recipients = []
    for block in blocks:
        code, reply = _block_reply(block.lines)
        if code is None and not _ENHANCED_RE.search(reply):
            code2, reply2 = _block_reply(notice.split("\n"))
            if code2 is not None:
                code, reply = code2, reply2
            elif not block.lines:
                reply = " ".join(notice.split())[:1000]
        block_text = "\n".join(block.lines) or notice
        temporary = bool(_RETRIED.search(block_text)) or notice_temporary
        status, source = _status_of_reply(code, reply or block_text, temporary)
        host = _REMOTE_HOST.search(" ".join(block.lines))
        recipients.append(FailedRecipient(
            address=block.address, status=status, status_source=source,
            action="delayed" if status.startswith("4") else "failed", reply_code=code, remote_reply=reply,
            remote_mta=host.group(1) if host else "", command=_command_in(" ".join(block.lines))))
    recipients = _dedupe(recipients)
    reporting = _reporting_mta(msg)
    return BounceReport("bounce" if recipients else "not-a-bounce", _format_name(msg, notice),
                        tuple(recipients), reporting)


def _returned_recipients(msg: email.message.Message) -> list[str]:
    """The To and Cc of the returned message: the last resort of a bounce that names no recipient."""
    for part in msg.walk():
        if _content_type(part) not in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers"):
            continue
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, email.message.Message):
            headers = inner
        else:
            headers = email.message_from_string(str(payload or "")[:MAX_NOTICE], policy=email.policy.compat32)
        found = [m.group(0).lower() for name in ("To", "Cc")
                 for m in _ADDRESS_RE.finditer(_header_text(headers.get(name, "")))]
        if found:
            return found[:MAX_RECIPIENTS]
    return []


def _reporting_mta(msg: email.message.Message) -> str:
    received = _header_text(msg.get("Received", ""))
    m = re.search(r"\bby\s+([A-Za-z0-9.-]+)", str(received))
    return m.group(1) if m else ""


_FORMATS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(p, re.IGNORECASE))
    for name, p in (
        ("exim", r"This message was created automatically by mail delivery software|X-Failed-Recipients"),
        ("qmail", r"qmail-send program|I'm afraid I wasn't able to deliver"),
        ("exchange2003", r"did not reach the following recipient|MSEXCH:"),
        ("postfix", r"This is the mail system at host|Postfix program"),
        ("sendmail", r"The following addresses had permanent fatal errors|Transcript of session follows"),
        ("gmail", r"Delivery to the following recipient failed"),
        ("domino", r"Lotus Domino|Your message was not delivered to"),
        ("dragonfly", r"DragonFly Mail Agent"),
        ("yahoo", r"Sorry, we were unable to deliver your message to the following address"),
    )
)


def _format_name(msg: email.message.Message, notice: str) -> str:
    haystack = notice[:4000] + "\n" + "\n".join(f"{k}: {v}" for k, v in msg.items())
    for name, pattern in _FORMATS:
        if pattern.search(haystack):
            return name
    return "text"
