"""``relaywarden why ID``: the whole relay decision behind a ``[decision 8f3a2c]`` in a reply.

Owns reading a decision back from the event log: ``find_decision`` finds the records that carry
the decision id (``fields.decision``), and ``explain_decision`` turns one into what an
administrator needs: when and where it happened, its inputs, the reply, every rule with the
configuration file and line that made it, the smallest change that would have allowed it, and
what that change would risk (``RISKS``, by event id, or that it must not be allowed at all).
The click command prints it with rich, or as JSON (docs/schemas/why.json).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ..events import EventId, read_events
from .main import data_dir_option

__all__ = ["RISKS", "explain_decision", "find_decision", "parse_decision_id", "why_command"]

_ID_IN_TEXT = re.compile(r"(?:decision\s+)?\[?\s*(?:decision\s+)?([0-9a-f]{6,12})\s*\]?", re.I)
_RULE = re.compile(r"^(?P<rule>[^:]+): (?P<detail>.*) \((?P<where>[^()]*)\)$", re.S)
_FIX_IN_TEXT = re.compile(r"\bFix: (?P<fix>.*?)\.?\s*$", re.S)

NOT_ALLOWED = "must not be allowed"

# What the smallest change that would have allowed a refusal risks, by the refusal's event.
RISKS: Mapping[int, str] = {
    EventId.RELAY_DENIED: (
        "A relay list entry lets every program on that address relay to any domain without a "
        "password. If the machine is compromised, shared or sits behind NAT or a proxy, spam "
        "leaves through this server and its addresses land on block lists. Prefer "
        "authentication on the submission listener; if an entry is needed, make it the single "
        "address, never a network or a public range."),
    EventId.RELAY_DENIED_AUTHENTICATED: (
        "Authenticated relay lets anyone holding a password for an account on that listener "
        "send to any domain: one stolen password is enough to flood the queue. Restoring a "
        "suspended relay right on a compromised account reopens the flood; reset its password "
        "and check its AUTH_SUCCEEDED (1708) events and its queued mail first."),
    EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED: (
        "Accepting the domain makes this server responsible for all of its mail: mail for it no "
        "longer leaves by its MX, and with kind authoritative unknown addresses are refused. "
        "Only add a domain you actually own."),
    EventId.WRONG_LISTENER: (
        "Serving the domain on another listener too means mail for it is accepted there with "
        "that listener's access rules; fixing the MX record or the firewall rule instead keeps "
        "each listener's exposure as designed."),
    EventId.RECIPIENT_UNKNOWN: (
        "A new mailbox or alias starts receiving whatever is sent to it, including spam to "
        "guessed addresses. Making the domain internal-relay instead forwards every unknown "
        "address to the other server, which must then refuse them itself (or send backscatter)."),
    EventId.AUTHENTICATION_REQUIRED: (
        "With anonymous access on, anyone can connect and deliver mail for your accepted "
        "domains without a password. That is right for the listener the Internet delivers to "
        "(relay stays closed by its relay list) and wrong for a submission listener."),
    EventId.TLS_REQUIRED: (
        "Without require_tls, a client may send mail and passwords in clear text that anyone "
        "on the network path can read or change."),
    EventId.CONNECTION_REFUSED: (
        "The client may then talk SMTP to the listener and reach every decision after the "
        "connection list; granting a network rather than one address opens it to every host in it."),
    EventId.ADDRESS_REFUSED: (
        "Accepting routing tricks (percent hack, source routes, bang paths) is how relays were "
        "opened by accident; relaywarden never allows them."),
    EventId.POLICY_ERROR: (
        "Nothing to allow: an internal error refused the recipient temporarily (fail closed); "
        "fix the cause and the sender's retry goes through."),
}


def parse_decision_id(text: str) -> str:
    """The hex decision id from "8f3a2c", "[decision 8f3a2c]" or a pasted reply line."""
    match = re.search(r"decision\s+([0-9a-f]{6,12})", text, re.I) or _ID_IN_TEXT.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} holds no decision id (6-12 hex digits, as in [decision 8f3a2c])")
    return match.group(1).lower()


def find_decision(log_dir: Path, decision_id: str) -> list[dict]:
    """Every event record (oldest first) whose fields.decision is ``decision_id``."""
    return list(read_events(Path(log_dir), decision=decision_id))


def _rules(fields: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    for text in fields.get("rules") or ():
        match = _RULE.match(str(text))
        if match:
            out.append(match.groupdict())
        else:
            out.append({"rule": str(text), "detail": "", "where": ""})
    return out


def explain_decision(record: Mapping[str, Any]) -> dict[str, Any]:
    """The whole decision of one event record, as JSON types (docs/schemas/why.json)."""
    fields = record.get("fields") if isinstance(record.get("fields"), Mapping) else {}
    event_id = record.get("id")
    accepted = event_id == EventId.RECIPIENT_ACCEPTED
    fix = fields.get("fix")
    if not fix and not accepted:
        found = _FIX_IN_TEXT.search(str(record.get("text", "")))
        fix = found.group("fix") if found else None
    rules = _rules(fields)
    must_not = bool(fix) and str(fix).startswith(NOT_ALLOWED)
    if accepted:
        risk = None
    elif must_not:
        risk = ("Allowing it would open the server to relaying it must not do: " + str(fix)
                .removeprefix(NOT_ALLOWED).lstrip(": ").rstrip("."))
    else:
        risk = RISKS.get(event_id) if isinstance(event_id, int) else None
    try:
        name = EventId(event_id).name
    except (ValueError, TypeError):
        name = str(record.get("name", "?"))
    inputs = {key: fields.get(key) for key in ("sender", "recipient", "tls", "proxy", "rdns")
              if key in fields}
    return {
        "decision": fields.get("decision"),
        "time": record.get("time"),
        "event": {"id": event_id, "name": name},
        "severity": record.get("severity"),
        "accepted": accepted,
        "verdict": fields.get("verdict") or ("refuse" if not accepted else None),
        "reply": fields.get("reply"),
        "listener": record.get("listener"),
        "client": record.get("client"),
        "user": record.get("user"),
        "session": record.get("session"),
        "inputs": inputs,
        "rules": rules,
        "where": next((r["where"] for r in reversed(rules) if r["where"]), None),
        "fix": fix,
        "must_not_allow": must_not,
        "risk": risk,
        "text": record.get("text"),
    }


def _print(console: Console, d: Mapping[str, Any]) -> None:
    outcome = "[green]accepted[/]" if d["accepted"] else "[bold red]refused[/]"
    console.print(f"[bold]decision {escape(str(d['decision']))}[/]: {outcome} "
                  f"({d['event']['id']} {d['event']['name']}) at {d['time']}")
    where = ", ".join(f"{k} {d[k]}" for k in ("listener", "client", "user", "session") if d.get(k))
    console.print(f"  session   {escape(where)}")
    for key, value in d["inputs"].items():
        console.print(f"  {key:<9} {escape(str(value if value is not None else '-'))}")
    if d["reply"]:
        console.print(f"  reply     {escape(str(d['reply']))}")
    console.print("[bold]rules[/]")
    if not d["rules"]:
        console.print("  (this refusal recorded no rule trace; the reason is below)")
    for number, rule in enumerate(d["rules"], start=1):
        console.print(f"  {number}. {escape(rule['rule'])}: {escape(rule['detail'])}"
                      + (f"  [dim]({escape(rule['where'])})[/]" if rule["where"] else ""))
    if d["where"]:
        console.print(f"[bold]configuration[/] {escape(d['where'])}")
    console.print(f"[bold]why[/] {escape(str(d['text']))}")
    if d["accepted"]:
        return
    if d["must_not_allow"]:
        console.print(f"[bold]change[/] none: {escape(str(d['fix']))}")
    else:
        console.print(f"[bold]smallest change that would have allowed it[/] {escape(str(d['fix'] or '-'))}")
    if d["risk"]:
        console.print(f"[bold]what that change risks[/] {escape(d['risk'])}")


@click.command("why")
@click.argument("decision")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (docs/schemas/why.json).")
@data_dir_option
def why_command(decision: str, as_json: bool, data_dir: Path) -> None:
    """Explain the decision behind "[decision ID]" in an SMTP reply or a bounce.

    Example: relaywarden why 8f3a2c
    """
    try:
        decision_id = parse_decision_id(decision)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    records = find_decision(Path(data_dir) / "log", decision_id)
    if not records:
        click.echo(f"relaywarden: no decision {decision_id} in the event log of {data_dir} "
                   "(it may be older than the oldest rotated log, or from another server)", err=True)
        sys.exit(1)
    explained = [explain_decision(r) for r in records]
    if as_json:
        click.echo(json.dumps(explained[-1], indent=2, ensure_ascii=False))
        return
    console = Console(highlight=False, soft_wrap=True)
    for d in explained:
        _print(console, d)
