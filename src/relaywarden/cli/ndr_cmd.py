"""``relaywarden ndr explain FILE|-``: read any bounce and say what went wrong and what to change.

Owns the command line over ``relaywarden.dsn.parse`` (what the bounce says: recipients, status
codes, remote replies) and ``relaywarden.dsn.causes`` (what that means and the fix, including the
KB 262354 case: a 5.7.1 that is really a relay denial). ``--json`` prints the same for machines.

Exit status: 0 when the message was read (whatever it turned out to be), 2 when the file cannot
be read.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from ..dsn.causes import Cause, describe_enhanced, explain_status
from ..dsn.parse import BounceReport, FailedRecipient, parse_bounce

__all__ = ["explain_recipient", "ndr", "report_dict"]

_KIND_WORDS = {
    "bounce": "a bounce (non-delivery report)",
    "abuse-report": "an abuse report, not a bounce",
    "auto-reply": "an automatic reply, not a bounce",
    "delivery-report": "a report of successful delivery, not a bounce",
    "not-a-bounce": "not a bounce that could be read",
    "unreadable": "unreadable",
}


_NO_CONTACT = re.compile(r"connect|timed? ?out|unreachable|not reachable|dns|lookup|host not found|resolv",
                         re.IGNORECASE)


def explain_recipient(rcpt: FailedRecipient) -> Cause:
    """The cause and fix for one failed recipient (causes.py's table).

    A bounce that quotes the remote reply without its basic code still reports a reply: it is
    matched as a reply of its class (5xx/4xx), not as "no reply at all", and when no named cause
    fits, the RFC 3463 meaning of its status is given without inventing a basic code.
    """
    enhanced = rcpt.status if rcpt.status_source != "class" else None
    if rcpt.reply_code is not None or not rcpt.remote_reply or _NO_CONTACT.search(rcpt.remote_reply):
        return explain_status(rcpt.reply_code, enhanced, rcpt.remote_reply, rcpt.command)
    as_reply = explain_status(int(rcpt.status[0]) * 100 + 50, enhanced, rcpt.remote_reply, rcpt.command)
    if as_reply.key != "rfc3463":
        return as_reply.with_status(rcpt.status)
    fix = ("Our server will keep retrying for a while." if rcpt.status.startswith("4")
           else "Read the remote reply below and correct what it names before sending again.")
    return Cause("rfc3463", describe_enhanced(rcpt.status).split("; ")[-1].split(" (")[0].capitalize(),
                 f"Delivery failed with status {rcpt.status}: {describe_enhanced(rcpt.status)}.", fix,
                 rcpt.status, rcpt.status.startswith("5"))


def report_dict(report: BounceReport) -> dict[str, object]:
    """The report with each recipient's cause, as ``--json`` prints it."""
    data = report.to_dict()
    recipients = data["recipients"]
    assert isinstance(recipients, list)
    for entry, rcpt in zip(recipients, report.recipients):
        cause = explain_recipient(rcpt)
        entry["cause"] = {"key": cause.key, "label": cause.label, "meaning": cause.sentence,
                          "fix": cause.fix, "permanent": cause.permanent}
    return data


def _read_input(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    return Path(source).read_bytes()


def _print_text(report: BounceReport, source: str) -> None:
    click.echo(f"{source}: {_KIND_WORDS.get(report.kind, report.kind)}"
               + (f" ({report.format} format)" if report.kind == "bounce" else ""))
    if report.subject:
        click.echo(f"  subject: {report.subject}")
    if report.reporting_mta:
        click.echo(f"  reported by: {report.reporting_mta}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    for rcpt in report.recipients:
        cause = explain_recipient(rcpt)
        click.echo("")
        click.echo(f"{rcpt.address}: {rcpt.action}, status {rcpt.status}"
                   + ("" if rcpt.status_source != "wording" else " (derived from the reply's wording)"))
        if rcpt.remote_reply:
            click.echo(f"  remote reply: {rcpt.remote_reply}")
        if rcpt.remote_mta:
            click.echo(f"  remote server: {rcpt.remote_mta}")
        if rcpt.command:
            click.echo(f"  in answer to: {rcpt.command}")
        click.echo(f"  cause: {cause.label}")
        click.echo(f"  what it means: {cause.sentence}")
        click.echo(f"  what to change: {cause.fix}")


@click.group()
def ndr() -> None:
    """Read non-delivery reports (bounces)."""


@ndr.command("explain")
@click.argument("source", metavar="FILE|-")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def explain(source: str, as_json: bool) -> None:
    """Explain a bounce: each failed recipient, its status and remote reply, the cause and the fix."""
    try:
        data = _read_input(source)
    except OSError as exc:
        click.echo(f"relaywarden ndr explain: cannot read {source}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    report = parse_bounce(data)
    if as_json:
        click.echo(json.dumps(report_dict(report), indent=2, ensure_ascii=False))
    else:
        _print_text(report, "standard input" if source == "-" else source)
