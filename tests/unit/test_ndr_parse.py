"""The bounce reader and ``relaywarden ndr explain``: our own NDRs read back, the common
non-standard layouts (Exim, qmail, Postfix, Sendmail, Exchange 2003, Gmail, Amazon SES), abuse
reports and auto-replies told apart from bounces, the KB 262354 case, and fuzzing: no input
makes the reader raise."""

from __future__ import annotations

import dataclasses
import json

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaywarden.cli.main import main
from relaywarden.dsn.build import build_ndr
from relaywarden.dsn.parse import parse_bounce, read_bounce
from relaywarden.queue.model import DeliveryResult, QueuedMessage, QueuedRecipient

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: Report\r\n"
    b"Message-ID: <q3@example.com>\r\n\r\nThe figures.\r\n"
)


def _rcpt(address: str, res: DeliveryResult, rid: int) -> QueuedRecipient:
    return QueuedRecipient(
        id=rid, address=address, original=address, orcpt=None, notify=(), verdict="relay",
        route="default", decision_id="9f3a", state="failed", attempts=1, next_attempt_at=None,
        last_attempt_at=1_700_000_060.0, last_result=res,
    )


def _our_ndr(*recipients: QueuedRecipient) -> bytes:
    message = QueuedMessage(
        id="A1B2C3", sender="alice@example.com", recipients=recipients, received_at=1_700_000_000.0,
        listener="submission", client_address="198.51.100.7", client_port=50000, helo="pc",
        auth_user="alice", tls=None, body_type="7BIT", smtputf8=False, dsn_ret=None,
        dsn_envid=None, session_id="s1", size=len(ORIGINAL), hold=False,
    )
    raw = build_ndr(reporting_mta="relay.example.com", message=message, original=ORIGINAL,
                    failed=list(recipients), arrival=1_700_000_000.0, now=1_700_003_600.0,
                    postmaster="postmaster@example.com")
    assert raw is not None
    return raw


def test_our_own_ndr_reads_back_with_every_field() -> None:
    unknown = _rcpt("bob@example.org", DeliveryResult(550, "5.1.1", "mx.example.org", "192.0.2.10",
                                                      "No such user", "RCPT", True), 1)
    full = _rcpt("carol@example.net", DeliveryResult(552, "5.2.2", "mx.example.net", "192.0.2.11",
                                                     "Mailbox full", "RCPT", True), 2)
    report = parse_bounce(_our_ndr(unknown, full))
    assert report.kind == "bounce" and report.format == "rfc3464"
    assert report.reporting_mta == "relay.example.com"
    got = {r.address: r for r in report.recipients}
    assert set(got) == {"bob@example.org", "carol@example.net"}
    assert got["bob@example.org"].status == "5.1.1"
    assert got["bob@example.org"].reply_code == 550
    assert "No such user" in got["bob@example.org"].remote_reply
    assert got["bob@example.org"].remote_mta == "mx.example.org"
    assert got["carol@example.net"].status == "5.2.2"


DSN_TEMPLATE = """From: MAILER-DAEMON@mx.example.net
To: alice@example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain

I'm sorry.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Final-Recipient: rfc822; bob@example.org
Action: {action}
Status: {status}
Diagnostic-Code: smtp; {diagnostic}

--b1--
"""


def test_remote_enhanced_code_wins_over_the_reporting_mtas_status() -> None:
    raw = DSN_TEMPLATE.format(action="failed", status="5.1.1",
                              diagnostic="550 5.7.1 IP address blacklisted by recipient")
    (rcpt,) = parse_bounce(raw).recipients
    assert (rcpt.status, rcpt.status_source, rcpt.reply_code) == ("5.7.1", "reply", 550)


def test_status_field_used_when_the_reply_has_no_enhanced_code() -> None:
    raw = DSN_TEMPLATE.format(action="failed", status="5.2.2", diagnostic="552 Over quota")
    (rcpt,) = parse_bounce(raw).recipients
    assert (rcpt.status, rcpt.status_source) == ("5.2.2", "status-field")


def test_delayed_is_reported_and_success_is_not_a_bounce() -> None:
    (rcpt,) = parse_bounce(DSN_TEMPLATE.format(action="delayed", status="4.4.7", diagnostic="")).recipients
    assert (rcpt.action, rcpt.status) == ("delayed", "4.4.7")
    report = parse_bounce(DSN_TEMPLATE.format(action="delivered", status="2.0.0", diagnostic="250 ok"))
    assert report.kind == "delivery-report" and report.recipients == ()


EXIM = """From: Mail Delivery System <Mailer-Daemon@relay.example.com>
To: alice@example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: bob@example.org, carol@example.org

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  bob@example.org
    SMTP error from remote mail server after RCPT TO:<bob@example.org>:
    host mx.example.org [192.0.2.153]: 550 5.1.1 <bob@example.org>... User Unknown
  carol@example.org
    SMTP error from remote mail server after RCPT TO:<carol@example.org>:
    host mx.example.org [192.0.2.153]: 552 Mailbox is full

------ This is a copy of the message, including all the headers. ------

Return-path: <alice@example.com>
To: someone-else@example.net
"""


def test_exim_recipients_codes_hosts_and_commands() -> None:
    report = parse_bounce(EXIM)
    assert report.kind == "bounce" and report.format == "exim"
    got = {r.address: r for r in report.recipients}
    assert set(got) == {"bob@example.org", "carol@example.org"}  # not the returned message's To
    bob, carol = got["bob@example.org"], got["carol@example.org"]
    assert (bob.status, bob.reply_code, bob.command, bob.remote_mta) == ("5.1.1", 550, "RCPT", "mx.example.org")
    assert "User Unknown" in bob.remote_reply
    # No enhanced code in the reply: derived from the basic code and the words, and said so.
    assert (carol.status, carol.status_source, carol.reply_code) == ("5.2.2", "wording", 552)


QMAIL = """From: MAILER-DAEMON@mail.example.com
To: alice@example.com
Subject: failure notice

Hi. This is the qmail-send program at mail.example.com.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<userunknown@example.jp>:
192.0.2.153 does not like recipient.
Remote host said: 550 5.1.1 <userunknown@example.jp>... User Unknown
Giving up on 192.0.2.153.

--- Below this line is a copy of the message.

To: decoy@example.net
"""


def test_qmail_does_not_take_a_substring_of_an_address() -> None:
    report = parse_bounce(QMAIL)
    assert [(r.address, r.status) for r in report.recipients] == [("userunknown@example.jp", "5.1.1")]
    assert report.format == "qmail"


EXCHANGE_2003_RELAY = """From: postmaster@gw.example.net
To: alice@example.com
Subject: Undeliverable: Budget
Content-Type: text/plain

Your message

  To:      bob@partner.example
  Subject: Budget

did not reach the following recipient(s):

bob@partner.example on Thu, 29 Apr 2010 00:00:00 -0000
    You do not have permission to send to this recipient.
    <gw.example.net #5.7.1 smtp;550 5.7.1 Unable to relay for bob@partner.example>
"""


def test_exchange_2003_no_permission_is_explained_as_relay_denial(tmp_path) -> None:
    report = parse_bounce(EXCHANGE_2003_RELAY)
    (rcpt,) = report.recipients
    assert (rcpt.address, rcpt.status, rcpt.reply_code) == ("bob@partner.example", "5.7.1", 550)
    path = tmp_path / "ndr.eml"
    path.write_text(EXCHANGE_2003_RELAY)
    result = CliRunner().invoke(main, ["ndr", "explain", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    cause = data["recipients"][0]["cause"]
    assert cause["key"] == "relay-denied"  # KB 262354: not "you do not have permission"
    assert "relay" in cause["fix"]
    text = CliRunner().invoke(main, ["ndr", "explain", str(path)])
    assert "Destination refused to relay for us" in text.output
    assert "bob@partner.example: failed, status 5.7.1" in text.output


def test_cli_reads_standard_input_and_reports_unreadable_files(tmp_path) -> None:
    result = CliRunner().invoke(main, ["ndr", "explain", "--json", "-"], input=EXIM)
    assert result.exit_code == 0
    assert {r["address"] for r in json.loads(result.output)["recipients"]} == {
        "bob@example.org", "carol@example.org"}
    missing = CliRunner().invoke(main, ["ndr", "explain", str(tmp_path / "nope.eml")])
    assert missing.exit_code == 2


SENDMAIL_FORWARDED = """From: alice@example.com
To: helpdesk@example.com
Subject: Fwd: Returned mail: see transcript for details

Begin forwarded message:

> From: Mail Delivery Subsystem <MAILER-DAEMON>
> Subject: Returned mail: see transcript for details
>
>    ----- The following addresses had permanent fatal errors -----
> <kijitora@example.com>
>     (reason: 550 5.1.1 <kijitora@example.com>... User unknown)
>
>    ----- Transcript of session follows -----
> ... while talking to mx.example.com.:
> >>> DATA
> <<< 550 5.1.1 <kijitora@example.com>... User unknown
"""


def test_a_bounce_forwarded_as_a_quotation_is_read() -> None:
    report = parse_bounce(SENDMAIL_FORWARDED)
    assert [(r.address, r.status) for r in report.recipients] == [("kijitora@example.com", "5.1.1")]


ARF = """From: feedback@mail.example.net
To: abuse@example.com
Subject: Email Feedback Report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="x"

--x
Content-Type: text/plain

This is an email abuse report for bob@example.org.

--x
Content-Type: message/feedback-report

Feedback-Type: abuse
Original-Rcpt-To: bob@example.org

--x--
"""


def test_abuse_reports_and_auto_replies_are_not_bounces() -> None:
    arf = parse_bounce(ARF)
    assert (arf.kind, arf.recipients) == ("abuse-report", ())
    vacation = parse_bounce("From: bob@example.org\nTo: alice@example.com\nSubject: Out of Office: Budget\n"
                            "Auto-Submitted: auto-replied\n\nI am away until Monday.\n"
                            "bob@example.org\n")
    assert (vacation.kind, vacation.recipients) == ("auto-reply", ())
    # A bounce also says auto-replied; it stays a bounce.
    assert parse_bounce(EXIM.replace("Subject:", "Auto-Submitted: auto-replied\nSubject:")).kind == "bounce"


SES = """From: no-reply@sns.amazonaws.com
To: alice@example.com
Subject: AWS Notification Message
Content-Type: text/plain; charset=UTF-8

{"notificationType":"Bounce","bounce":{"bounceType":"Permanent","bouncedRecipients":[{"emailAddress":"bob@example.org","action":"failed","status":"5.1.1","diagnosticCode":"smtp; 550 5.1.1 user unk!
 nown"}],"reportingMTA":"dsn; a27-23.smtp-out.us-west-2.amazonses.com"}}
"""


def test_amazon_ses_json_with_folded_lines() -> None:
    report = parse_bounce(SES)
    assert report.format == "amazon-ses"
    (rcpt,) = report.recipients
    assert (rcpt.address, rcpt.status, rcpt.reply_code) == ("bob@example.org", "5.1.1", 550)
    assert rcpt.remote_reply == "550 5.1.1 user unknown"


def test_a_message_that_is_no_bounce_says_so() -> None:
    report = parse_bounce("From: bob@example.org\nTo: alice@example.com\nSubject: lunch?\n\nAt noon.\n")
    assert report.kind == "not-a-bounce" and report.recipients == ()
    assert report.notes


def test_the_recipient_dataclass_is_what_json_prints() -> None:
    (rcpt,) = parse_bounce(QMAIL).recipients
    as_dict = parse_bounce(QMAIL).to_dict()["recipients"][0]  # type: ignore[index]
    assert as_dict == {f.name: getattr(rcpt, f.name) for f in dataclasses.fields(rcpt)}


# --- fuzzing: never crash ---------------------------------------------------------------------

_PIECES = [EXIM, QMAIL, EXCHANGE_2003_RELAY, ARF, SES, SENDMAIL_FORWARDED,
           DSN_TEMPLATE.format(action="failed", status="5.1.1", diagnostic="550 5.1.1 x")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    report = read_bounce(data)
    assert report.kind in {"bounce", "abuse-report", "auto-reply", "delivery-report", "not-a-bounce"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PIECES), st.integers(0, 5000), st.integers(0, 400), st.text(max_size=200))
def test_fuzz_mangled_bounces_never_raise(base: str, at: int, cut: int, junk: str) -> None:
    at = min(at, len(base))
    mangled = base[:at] + junk + base[at + cut:]
    report = read_bounce(mangled.encode("utf-8", "surrogatepass"))
    for rcpt in report.recipients:
        assert "@" in rcpt.address and rcpt.status[0] in "245"


def test_huge_and_deeply_nested_inputs_are_bounded() -> None:
    nested = "Content-Type: multipart/mixed; boundary=a\n\n" + "".join(
        f"--a\nContent-Type: multipart/mixed; boundary=a{i}\n\n" for i in range(300))
    assert parse_bounce(nested).kind in {"not-a-bounce", "unreadable"}
    long_line = "From: x@example.com\n\n" + "<" * 200_000 + "a@b.example" + ">" * 10
    assert parse_bounce(long_line).kind in {"bounce", "not-a-bounce"}


def test_eight_bit_headers_do_not_break_the_reader() -> None:
    # compat32 hands back Header objects for raw 8-bit header bytes (found by mutating the corpus).
    raw = (b"From: MAILER-DAEMON@relay.example.com\nTo: alice@example.com\nSubject: Mail delivery failed\n"
           b"X-Failed-Recipients: bob@example.org \xff\xfe\nAuto-Submitted: auto-replied \xe9\n"
           b"Received: by relay.example.com \xe9\n\nA message that you sent could not be delivered.\n")
    report = read_bounce(raw)
    assert [r.address for r in report.recipients] == ["bob@example.org"]
