"""NDRs: causes for every failure kind, RFC 3464 structure read back by the stdlib parser and by
flufl.bounce, NOTIFY and null-sender rules, RET=FULL/HDRS, ENVID/ORCPT, UTF-8 originals."""

from __future__ import annotations

import dataclasses
import email
import quopri
import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from flufl.bounce import all_failures, scan_message

from relaywarden.dsn.build import build_ndr, cause_for, split_original, wants_notice
from relaywarden.dsn.causes import (
    CAUSES,
    RULES,
    causes_markdown,
    describe_enhanced,
    explain_status,
    status_for,
)
from relaywarden.queue.model import DeliveryResult, QueuedMessage, QueuedRecipient

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ndr.md"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
ORIGINAL = (
    b"Received: from pc.example.com ([198.51.100.7]) by relay.example.com\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <q3@example.com>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"\r\n"
    b"The figures are attached.\r\n"
)


def result(
    code: int | None,
    enhanced: str | None,
    text: str,
    command: str | None = "RCPT",
    host: str | None = "mx.example.org",
    address: str | None = "192.0.2.10",
) -> DeliveryResult:
    permanent = code is not None and code >= 500
    return DeliveryResult(code, enhanced, host, address, text, command, permanent)


def rcpt(
    address: str = "bob@example.org",
    res: DeliveryResult | None = None,
    *,
    rid: int = 1,
    state: str = "failed",
    **changes: object,
) -> QueuedRecipient:
    base = QueuedRecipient(
        id=rid, address=address, original=address, orcpt=None, notify=(), verdict="relay",
        route="default", decision_id="9f3a", state=state, attempts=1, next_attempt_at=None,
        last_attempt_at=ARRIVAL + 60.0,
        last_result=res if res is not None else result(550, "5.1.1", "No such user"),
    )
    return dataclasses.replace(base, **changes)


def queued(recipients: tuple[QueuedRecipient, ...], **changes: object) -> QueuedMessage:
    base = QueuedMessage(
        id="A1B2C3", sender="alice@example.com", recipients=recipients, received_at=ARRIVAL,
        listener="submission", client_address="198.51.100.7", client_port=50000, helo="pc",
        auth_user="alice", tls=None, body_type="7BIT", smtputf8=False, dsn_ret=None,
        dsn_envid=None, session_id="s1", size=len(ORIGINAL), hold=False,
    )
    return dataclasses.replace(base, **changes)


def ndr(
    failed: list[QueuedRecipient],
    delayed: list[QueuedRecipient] | None = None,
    *,
    action: str = "failed",
    original: bytes = ORIGINAL,
    will_retry_until: float | None = None,
    **message_changes: object,
) -> bytes | None:
    everyone = tuple(failed) + tuple(delayed or ())
    return build_ndr(
        reporting_mta="relay.example.com",
        message=queued(everyone, **message_changes),
        original=original,
        failed=failed,
        delayed=delayed or [],
        action=action,  # type: ignore[arg-type]
        arrival=ARRIVAL,
        now=NOW,
        postmaster="postmaster@example.com",
        will_retry_until=will_retry_until,
    )


def parts(raw: bytes) -> tuple[Message, Message, Message, Message]:
    msg = email.message_from_bytes(raw, policy=policy.default)
    human, status, original = msg.get_payload()
    return msg, human, status, original


def status_blocks(status: Message) -> list[Message]:
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return blocks


def words(text: str) -> str:
    return " ".join(text.split())


# --- every cause: (code, enhanced, text, command) -> cause key -----------------------------------

CASES = [
    (550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown", "RCPT", "unknown-user"),
    (550, None, "No such user here", "RCPT", "unknown-user"),
    (550, "5.1.2", "Host or domain name not found", "RCPT", "bad-domain"),
    (556, "5.1.10", "example.org does not accept mail (null MX)", "CONNECT", "null-mx"),
    (552, "5.2.2", "Mailbox full", "RCPT", "mailbox-full"),
    (452, None, "Over quota, try later", "RCPT", "mailbox-full"),
    (552, "5.3.4", "Message size exceeds fixed limit", "DATA", "too-big"),
    (550, "5.4.4", "Unrouteable address", "RCPT", "unroutable"),
    (554, "5.4.6", "Mail loop detected: too many Received headers (51)", "DATA", "loop"),
    (550, "5.4.7", "Delivery time expired after 5 days", None, "expired"),
    (451, "4.4.7", "Message delayed too long in the queue", None, "expired"),
    (550, "5.7.1", "Unable to relay", "RCPT", "relay-denied"),
    (554, "5.7.1", "<bob@example.org>: Relay access denied", "RCPT", "relay-denied"),
    (553, None, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "RCPT", "relay-denied"),
    (550, "5.7.1", "Message rejected as spam by content filter", "DATA", "content-rejected"),
    (554, "5.7.1", "Service unavailable; Client host [203.0.113.5] blocked using zen.spamhaus.org", "RCPT", "blocklisted"),
    (550, "5.7.23", "SPF validation failed", "RCPT", "sender-authentication"),
    (550, "5.7.1", "Recipient not authorized", "RCPT", "delivery-not-authorised"),
    (530, "5.7.0", "Authentication required", "MAIL", "auth-required"),
    (550, "5.7.3", "Requested action aborted; user not authenticated", "RCPT", "auth-required"),
    (530, None, "Client was not authenticated", "MAIL", "auth-required"),
    (535, "5.7.8", "Authentication credentials invalid", "AUTH", "bad-credentials"),
    (538, "5.7.11", "Encryption required for requested authentication mechanism", "AUTH", "auth-needs-tls"),
    (530, "5.7.0", "Must issue a STARTTLS command first", "MAIL", "tls-required-by-remote"),
    (None, "4.7.10", "TLS required by route default but mx.example.org did not offer STARTTLS", "EHLO", "tls-not-offered"),
    (None, "5.7.10", "TLS required by route default but mx.example.org did not offer STARTTLS", "EHLO", "tls-not-offered"),
    (None, "4.7.5", "certificate verify failed: self-signed certificate", "STARTTLS", "tls-certificate"),
    (None, None, "connect to mx.example.org[192.0.2.10]:25: Connection refused", "CONNECT", "connection-failed"),
    (None, "4.4.1", "connection timed out", "CONNECT", "connection-failed"),
    (None, None, "DNS lookup of example.org failed: SERVFAIL", "CONNECT", "dns-failure"),
    (550, "5.1.8", "Sender address rejected: Domain not found", "MAIL", "sender-rejected"),
    (421, None, "Too many concurrent connections, try later", "CONNECT", "remote-busy"),
    (500, "5.5.1", "Command unrecognised", "BDAT", "protocol-error"),
    (550, "5.9.9", "Something unusual", "RCPT", "rfc3463"),
    (554, None, "Transaction failed", "DATA", "rfc3463"),
]


@pytest.mark.parametrize(("code", "enhanced", "text", "command", "key"), CASES)
def test_explain_status_names_the_cause(code, enhanced, text, command, key) -> None:
    cause = explain_status(code, enhanced, text, command)
    assert cause.key == key
    assert cause.sentence and cause.fix and cause.label


@pytest.mark.parametrize(("code", "enhanced", "text", "command", "key"), CASES)
def test_ndr_round_trips_through_stdlib_and_flufl_bounce(code, enhanced, text, command, key) -> None:
    res = result(code, enhanced, text, command)
    failed = [rcpt("bob@example.org", res), rcpt("carol@example.org", res, rid=2)]
    raw = ndr(failed)
    assert raw is not None
    msg, human, status, _ = parts(raw)

    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    expected_status = status_for(code, enhanced, text, permanent=True)
    assert [b["Final-Recipient"] for b in per_recipient] == [
        "rfc822; bob@example.org", "rfc822; carol@example.org",
    ]
    for block in per_recipient:
        assert block["Action"] == "failed"
        assert block["Status"] == expected_status
        assert block["Remote-MTA"] == "dns; mx.example.org"
        if code is None:
            assert block["Diagnostic-Code"] == f"X-relaywarden; {text}"
        elif enhanced is None:
            assert block["Diagnostic-Code"] == f"smtp; {code} {text}"
        else:
            assert block["Diagnostic-Code"] == f"smtp; {code} {enhanced} {text}"

    # flufl.bounce reads the compat32 parse, as Mailman does.
    assert scan_message(email.message_from_bytes(raw)) == {b"bob@example.org", b"carol@example.org"}
    assert all_failures(email.message_from_bytes(raw))[0] == frozenset()

    body = words(human.get_content())
    cause = explain_status(code, enhanced, text, command)
    assert words(cause.sentence) in body and words(cause.fix) in body
    assert "do not have permission" not in body.lower()
    assert "mx.example.org [192.0.2.10]" in body


def test_status_derived_from_the_basic_code_when_no_enhanced_code() -> None:
    assert status_for(550, None, "Transaction failed") == "5.0.0"
    assert status_for(451, None, "later") == "4.0.0"
    assert status_for(553, None, "not in rcpthosts (#5.7.1)") == "5.7.1"
    assert status_for(550, "4.1.1", "disagrees") == "5.0.0"  # a mismatched code is not trusted
    assert status_for(None, None, "refused", permanent=False) == "4.0.0"
    assert describe_enhanced("5.2.2").endswith("mailbox full (5.2.2)")
    assert describe_enhanced("4.9.9").startswith("Persistent transient failure")


# --- the relay denial and scenario 5, in words ------------------------------------------------

def test_remote_unable_to_relay_says_the_destination_refused_to_relay_for_us() -> None:
    raw = ndr([rcpt(res=result(550, "5.7.1", "Unable to relay"))])
    assert raw is not None
    body = words(parts(raw)[1].get_content())
    assert "refused to relay this message for our server" in body
    assert "relay list" in body
    assert "set username and password_file on the route" in body
    assert "permission" not in body.lower()


def test_no_cause_ever_says_you_do_not_have_permission() -> None:
    for cause in CAUSES:
        text = f"{cause.label} {cause.sentence} {cause.fix}".lower()
        assert "do not have permission" not in text, cause.key
        assert "don't have permission" not in text, cause.key


@pytest.mark.parametrize("reply", [(530, "5.7.0", "Authentication required"), (550, "5.7.3", "not authenticated")])
def test_authentication_required_points_at_the_route_credentials(reply) -> None:
    cause = cause_for(rcpt(res=result(*reply)))
    assert cause.key == "auth-required"
    assert "username and password_file on the route" in cause.fix


def test_every_rule_uses_valid_conditions() -> None:
    for rule in RULES:
        for pattern in rule.enhanced:
            klass, subject, detail = pattern.split(".")
            assert klass in ("x", "4", "5") and subject.isdigit() and (detail == "*" or detail.isdigit())
        assert rule.codes or rule.enhanced or rule.pattern, rule.cause.key


# --- headers of the report --------------------------------------------------------------------

def test_report_headers() -> None:
    raw = ndr([rcpt()])
    assert raw is not None
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"].endswith("@relay.example.com>")
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["MIME-Version"] == "1.0"
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    per_message = status_blocks(parts(raw)[2])[0]
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    block = status_blocks(parts(raw)[2])[1]
    assert email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == ARRIVAL + 60
    assert block["Will-Retry-Until"] is None


def test_long_diagnostic_is_folded_and_comes_back_exactly() -> None:
    text = "Requested action not taken: " + " ".join(["mailbox unavailable"] * 12)
    raw = ndr([rcpt(res=result(550, "5.1.1", text))])
    assert raw is not None
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78
    assert status_blocks(parts(raw)[2])[1]["Diagnostic-Code"] == f"smtp; 550 5.1.1 {text}"


def test_connection_failure_names_the_host_and_has_no_smtp_diagnostic() -> None:
    res = result(None, None, "connect to mx.example.org[192.0.2.10]:25: Connection refused", "CONNECT")
    raw = ndr([rcpt(res=res)])
    assert raw is not None
    _, human, status, _ = parts(raw)
    block = status_blocks(status)[1]
    assert block["Status"] == "5.0.0"
    assert block["Diagnostic-Code"].startswith("X-relaywarden; connect to")
    assert "No SMTP reply from mx.example.org [192.0.2.10]" in human.get_content()


def test_expiry_says_our_server_gave_up_and_keeps_the_last_attempt() -> None:
    text = "Delivery time expired after 5 days; last attempt: mx.example.org: 451 4.3.0 try later"
    raw = ndr([rcpt(res=result(550, "5.4.7", text, "RCPT"))])
    assert raw is not None
    _, human, status, _ = parts(raw)
    block = status_blocks(status)[1]
    assert (block["Status"], block["Diagnostic-Code"]) == ("5.4.7", f"smtp; 550 5.4.7 {text}")
    body = human.get_content()
    assert "Our server gave up (last host tried: mx.example.org [192.0.2.10]):" in body
    assert "Remote host" not in body
    assert "Delivery time expired" in body


def test_delay_warning_promises_a_failure_notice_only_when_one_will_come() -> None:
    res = result(451, "4.3.0", "Try again later")
    default = ndr([], [rcpt(state="deferred", res=res)], action="delayed")
    delay_only = ndr([], [rcpt(state="deferred", res=res, notify=("DELAY",))], action="delayed")
    assert default is not None and delay_only is not None
    assert "You will be told if it finally fails" in parts(default)[1].get_content()
    assert "You will be told" not in parts(delay_only)[1].get_content()


def test_local_failure_without_remote_host_has_no_remote_mta() -> None:
    res = result(552, "5.2.2", "Mailbox full", "LOCAL", host=None, address=None)
    raw = ndr([rcpt(res=res)])
    assert raw is not None
    block = status_blocks(parts(raw)[2])[1]
    assert block["Remote-MTA"] is None
    assert block["Status"] == "5.2.2"
    assert "Local delivery answered:" in parts(raw)[1].get_content()


# --- who gets a notice ------------------------------------------------------------------------

@pytest.mark.parametrize("sender", ["", "<>"])
def test_never_an_ndr_to_the_null_sender(sender: str) -> None:
    assert ndr([rcpt()], sender=sender) is None


@pytest.mark.parametrize(
    ("notify", "failure", "delay"),
    [
        ((), True, True),  # absent NOTIFY: FAILURE,DELAY
        (("NEVER",), False, False),
        (("SUCCESS",), False, False),
        (("FAILURE",), True, False),
        (("DELAY",), False, True),
        (("SUCCESS", "FAILURE", "DELAY"), True, True),
    ],
)
def test_notify_is_honoured(notify, failure, delay) -> None:
    r = rcpt(notify=notify)
    assert wants_notice(r, "failed") is failure
    assert wants_notice(r, "delayed") is delay
    assert (ndr([r]) is not None) is failure
    d = rcpt(notify=notify, state="deferred", res=result(451, "4.3.0", "Try again later"))
    assert (ndr([], [d], action="delayed") is not None) is delay


def test_only_recipients_that_asked_are_reported() -> None:
    raw = ndr([rcpt("bob@example.org", notify=("NEVER",)), rcpt("carol@example.org", rid=2)])
    assert raw is not None
    assert scan_message(email.message_from_bytes(raw)) == {b"carol@example.org"}
    assert b"bob@example.org" not in raw.split(b"\r\n\r\n", 1)[1].split(b"Undelivered Message")[0]


def test_delay_warning() -> None:
    d = rcpt(state="deferred", res=result(451, "4.7.1", "Greylisted, try again in 5 minutes"))
    raw = ndr([], [d], action="delayed", will_retry_until=ARRIVAL + 5 * 86400)
    assert raw is not None
    msg, human, status, _ = parts(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(status)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400
    assert "you do not need to send it again" in words(human.get_content())
    assert all_failures(email.message_from_bytes(raw)) == (frozenset({b"bob@example.org"}), frozenset())
    with pytest.raises(ValueError):
        ndr([rcpt()], [d], action="delayed")


def test_failure_report_carries_delayed_recipients_too() -> None:
    d = rcpt("carol@example.org", rid=2, state="deferred", res=result(None, None, "Connection timed out", "CONNECT"))
    raw = ndr([rcpt()], [d])
    assert raw is not None
    blocks = status_blocks(parts(raw)[2])[1:]
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks] == [
        ("rfc822; bob@example.org", "failed", "5.1.1"),
        ("rfc822; carol@example.org", "delayed", "4.0.0"),
    ]
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    assert (temporary, permanent) == (frozenset({b"carol@example.org"}), frozenset({b"bob@example.org"}))


def test_recipient_never_tried_still_gets_a_report() -> None:
    raw = ndr([rcpt(last_result=None, last_attempt_at=None)])
    assert raw is not None
    block = status_blocks(parts(raw)[2])[1]
    assert block["Status"] == "5.0.0"
    assert block["Diagnostic-Code"] is None and block["Last-Attempt-Date"] is None


# --- RET, ENVID, ORCPT ----------------------------------------------------------------------------

def test_ret_hdrs_is_the_default_and_returns_headers_only() -> None:
    raw = ndr([rcpt()])
    assert raw is not None
    original = parts(raw)[3]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original.get_payload(decode=True) == split_original(ORIGINAL)[0]
    assert b"The figures are attached." not in raw


def test_ret_full_returns_the_whole_message_byte_for_byte() -> None:
    raw = ndr([rcpt()], dsn_ret="FULL")
    assert raw is not None
    original = parts(raw)[3]
    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "Quarterly report"
    assert ORIGINAL in raw


def test_envid_and_orcpt_round_trip() -> None:
    r = rcpt("bob@example.org", orcpt="rfc822;Bob.Original@Example.ORG")
    raw = ndr([r], dsn_envid="QQ314159")
    assert raw is not None
    per_message, block = status_blocks(parts(raw)[2])
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert block["Original-Recipient"] == "rfc822; Bob.Original@Example.ORG"
    assert block["Final-Recipient"] == "rfc822; bob@example.org"
    # flufl.bounce prefers Original-Recipient, which is what the sender wrote.
    assert scan_message(email.message_from_bytes(raw)) == {b"Bob.Original@Example.ORG"}
    assert "originally addressed to <Bob.Original@Example.ORG>" in parts(raw)[1].get_content()


def test_no_envid_no_orcpt_fields_when_not_given() -> None:
    raw = ndr([rcpt()])
    assert raw is not None
    per_message, block = status_blocks(parts(raw)[2])
    assert per_message["Original-Envelope-Id"] is None
    assert block["Original-Recipient"] is None


# --- non-ASCII originals --------------------------------------------------------------------------

UTF8_ORIGINAL = (
    "From: Zoë <zoe@example.com>\r\n"
    "To: Jürgen <juergen@example.org>\r\n"
    "Subject: Grüße aus Köln\r\n"
    "\r\n"
    "Schöne Grüße\r\n"
).encode()


def test_smtputf8_original_headers_go_as_message_global_headers() -> None:
    raw = ndr([rcpt()], original=UTF8_ORIGINAL, smtputf8=True, body_type="8BITMIME")
    assert raw is not None
    msg, human, status, original = parts(raw)
    assert original.get_content_type() == "message/global-headers"
    assert split_original(UTF8_ORIGINAL)[0] in raw
    assert "Your message: Grüße aus Köln" in human.get_content()
    assert scan_message(email.message_from_bytes(raw)) == {b"bob@example.org"}


def test_eight_bit_headers_without_smtputf8_keep_the_report_seven_bit() -> None:
    raw = ndr([rcpt()], original=UTF8_ORIGINAL, body_type="8BITMIME")
    assert raw is not None
    assert raw.isascii()
    original = parts(raw)[3]
    assert original.get_content_type() == "text/rfc822-headers"
    assert original["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = quopri.decodestring(original.get_payload().encode().replace(b"\r\n", b"\n"))
    assert decoded.replace(b"\n", b"\r\n") == split_original(UTF8_ORIGINAL)[0]
    assert scan_message(email.message_from_bytes(raw)) == {b"bob@example.org"}


def test_latin1_headers_are_carried_as_unknown_8bit() -> None:
    latin1 = b"From: alice@example.com\r\nSubject: Caf\xe9\r\n\r\nbody\r\n"
    raw = ndr([rcpt()], original=latin1)
    assert raw is not None and raw.isascii()
    assert parts(raw)[3].get_param("charset") == "unknown-8bit"


def test_ret_full_with_eight_bit_body_is_byte_exact() -> None:
    raw = ndr([rcpt()], original=UTF8_ORIGINAL, dsn_ret="FULL", body_type="8BITMIME")
    assert raw is not None
    assert UTF8_ORIGINAL in raw
    original = parts(raw)[3]
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "8bit"
    full_global = ndr([rcpt()], original=UTF8_ORIGINAL, dsn_ret="FULL", smtputf8=True)
    assert full_global is not None and parts(full_global)[3].get_content_type() == "message/global"


def test_utf8_addresses_use_global_delivery_status() -> None:
    r = rcpt("jürgen@example.org")
    raw = ndr([r], sender="zoë@example.com", original=UTF8_ORIGINAL, smtputf8=True)
    assert raw is not None
    msg, _, status, _ = parts(raw)
    assert msg["To"] == "zoë@example.com"
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    # The stdlib does not split message/global-delivery-status: read its blocks from the bytes.
    body = raw.split(b"Content-Type: message/global-delivery-status", 1)[1].split(b"\r\n--", 1)[0]
    blocks = [BytesHeaderParser(policy=policy.SMTPUTF8).parsebytes(b) for b in body.split(b"\r\n\r\n")[1:]]
    assert blocks[0]["Reporting-MTA"] == "dns; relay.example.com"
    assert blocks[1]["Final-Recipient"] == "utf-8; jürgen@example.org"
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"


def test_non_ascii_in_a_remote_reply_does_not_break_a_seven_bit_report() -> None:
    raw = ndr([rcpt(res=result(550, "5.1.1", "Empfänger unbekannt"))])
    assert raw is not None
    assert status_blocks(parts(raw)[2])[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf?nger unbekannt"
    assert scan_message(email.message_from_bytes(raw)) == {b"bob@example.org"}


def test_headers_only_original_without_body() -> None:
    head = b"From: a@example.com\r\nSubject: x\r\n"
    assert split_original(head) == (head, b"")
    assert split_original(b"A: b\n\nbody") == (b"A: b\n", b"body")
    assert ndr([rcpt()], original=head) is not None


# --- the docs -----------------------------------------------------------------------------------

def test_docs_list_every_cause_with_its_sentence_and_fix() -> None:
    docs = words(DOCS.read_text(encoding="utf-8"))
    for cause in CAUSES:
        assert f"`{cause.key}`" in docs, cause.key
        assert words(cause.sentence) in docs, cause.key
        assert words(cause.fix) in docs, cause.key
    assert re.search(r"Content-Type: multipart/report; report-type=\"?delivery-status", docs)
    # The cause section is generated: regenerate with `python -m relaywarden.dsn.causes`.
    assert causes_markdown() in DOCS.read_text(encoding="utf-8")


def _success(action: str, notify: tuple[str, ...], **message_changes: object) -> bytes | None:
    ok = rcpt(res=result(250, "2.0.0", "Ok: queued as 123", command="END-OF-DATA"), state="delivered", notify=notify)
    return build_ndr(reporting_mta="relay.example.com", message=queued((ok,), **message_changes), original=ORIGINAL,
                     failed=[], action=action, arrival=ARRIVAL, now=NOW,  # type: ignore[arg-type]
                     postmaster="postmaster@example.com", succeeded=[ok])


@pytest.mark.parametrize("action, subject", [("delivered", "Successful Mail Delivery Report"),
                                             ("relayed", "Mail Relayed (no further delivery reports)")])
def test_success_reports_only_when_asked_and_only_with_headers(action, subject) -> None:
    assert _success(action, ()) is None                       # no NOTIFY: no success report
    assert _success(action, ("FAILURE",)) is None
    raw = _success(action, ("SUCCESS",), dsn_ret="FULL")      # RET=FULL applies to failures only
    assert raw is not None
    msg, human, status, original = parts(raw)
    assert msg["Subject"] == subject
    block = status_blocks(status)[1]
    assert block["Action"] == action and block["Status"] == "2.0.0"
    assert original.get_content_type() == "text/rfc822-headers"
    assert "do not have permission" not in human.get_content()
    assert not scan_message(email.message_from_bytes(raw))    # a bounce parser sees no failure


def test_success_report_never_mixes_failures() -> None:
    with pytest.raises(ValueError):
        build_ndr(reporting_mta="r", message=queued(()), original=ORIGINAL, failed=[rcpt()], action="delivered",
                  arrival=ARRIVAL, now=NOW, postmaster="p@r", succeeded=[rcpt(state="delivered")])


def test_a_control_character_in_a_value_never_adds_a_field_to_the_report() -> None:
    from relaywarden.dsn.build import _fold

    folded = _fold("Original-Envelope-Id", "x\r\nFinal-Recipient: rfc822;ceo@v.example\r\nAction: delivered")
    assert "\r\nFinal-Recipient" not in folded and "\r\nAction" not in folded
    assert all(line.startswith((" ", "Original-Envelope-Id:")) for line in folded.split("\r\n"))
