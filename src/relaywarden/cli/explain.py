"""``relaywarden explain``: the relay decision for a hypothetical session, without a running server.

Owns the command line of the decision trace: it loads the configuration (the embedded default when
no ``--config``), builds the mailbox directory, runs the connection, MAIL and RCPT decisions of
``relaywarden.policy.relay`` and prints each verdict, reply, event id, every rule with its file and
line, and the fix — with rich, or as JSON with ``--json``.

Exit status: 0 when every recipient is accepted, 1 when any is refused, 2 on a usage or
configuration error.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path as FsPath
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape

from ..config.loader import ConfigError, LoadedConfig, load_config, load_default
from ..directory import Directory
from ..users import UserError, UserStore
from ..policy.relay import (
    Decision,
    SessionFacts,
    decide_connection,
    decide_mail,
    decide_recipient,
    refuse_address,
)
from ..protocol.address import AddressError, Path, parse_mail_from, parse_rcpt_to

__all__ = ["explain_command"]

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

_STYLE = {"local": "green", "forward": "green", "relay": "yellow", "refuse": "bold red"}


@click.command("explain")
@click.option("--listener", required=True, help="Listener name the session arrives on (mx, submission, ...).")
@click.option("--client", required=True, help="Client IP address (the real client, after PROXY protocol).")
@click.option("--rdns", default=None, help="Forward-confirmed reverse DNS name of the client.")
@click.option("--user", default=None, help="Authenticated login (a mailbox primary address).")
@click.option("--tls", is_flag=True, help="The session is encrypted (STARTTLS or implicit TLS).")
@click.option("--from", "sender", required=True, help="MAIL FROM address; <> or an empty string for the null sender.")
@click.option("--to", "recipients", required=True, multiple=True, help="RCPT TO address; repeat for more recipients.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Configuration file (default: the embedded default configuration).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=FsPath), envvar="RELAYWARDEN_DATA",
              default=FsPath("relaywarden-data"), show_default=True,
              help="Data directory whose user database (users.json) overlays the configuration's mailboxes.")
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
def explain_command(listener: str, client: str, rdns: str | None, user: str | None, tls: bool,
                    sender: str, recipients: tuple[str, ...], config_path: str | None,
                    data_dir: FsPath, as_json: bool) -> None:
    """Explain the relay decision for a session: verdict, reply, event, rules with file:line, fix.

    Example: relaywarden explain --listener mx --client 203.0.113.9 --from a@x.org --to b@y.org
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    loaded = _load(config_path, err)
    _check_session(loaded, listener, client, err)
    try:
        directory = Directory.build(loaded, UserStore(data_dir).records())
    except UserError as exc:
        err.print(f"relaywarden: {exc}")
        sys.exit(2)
    warnings = []
    if user is not None and directory.login(user) is None:
        warnings.append(f"no mailbox in {loaded.file} has the login {user}; "
                        f"nor in the user database of {data_dir}; "
                        "the decision treats it as an unknown authenticated user")
    sender_text = _parse_sender(sender, err)
    facts = SessionFacts(listener=listener, client_address=client, client_rdns=rdns, tls=tls,
                         auth_user=user)
    decisions, stage = _decide(loaded, directory, facts, sender_text, recipients)
    refused = any(not d.accepted for d in decisions)
    if as_json:
        click.echo(json.dumps({
            "config": loaded.file,
            "stage": stage,
            "accepted": not refused,
            "warnings": warnings,
            "decisions": [d.as_dict() for d in decisions],
        }, indent=2, ensure_ascii=False))
    else:
        out = Console(highlight=False, soft_wrap=True)
        for warning in warnings:
            err.print(f"[yellow]warning:[/] {escape(warning)}")
        _print_session(out, loaded, facts, sender_text)
        for decision in decisions:
            _print_decision(out, decision, stage)
        if stage != "rcpt":
            verdict = "refused at MAIL FROM" if stage == "mail" else "connection refused"
        else:
            verdict = "some recipients refused" if refused else "all recipients accepted"
        out.print(f"[bold]{verdict}[/]")
    sys.exit(EXIT_REFUSED if refused else EXIT_ACCEPTED)


def _load(config_path: str | None, err: Console) -> LoadedConfig:
    try:
        return load_config(config_path) if config_path else load_default()
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"[red]error:[/] {escape(problem)}")
        sys.exit(EXIT_USAGE)


def _check_session(loaded: LoadedConfig, listener: str, client: str, err: Console) -> None:
    names = [l.name for l in loaded.config.listener]
    if listener not in names:
        _usage(err, f"--listener {listener}: no such listener in {loaded.file} "
                    f"(listeners: {', '.join(names)})")
    try:
        ipaddress.ip_address(client.strip("[]"))
    except ValueError:
        _usage(err, f"--client {client}: not an IPv4 or IPv6 address")


def _usage(err: Console, message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    sys.exit(EXIT_USAGE)


def _parse_sender(sender: str, err: Console) -> str | None:
    text = sender.strip()
    if text in ("", "<>"):
        return None
    try:
        path = parse_mail_from(_bracketed(text))
    except AddressError as exc:
        _usage(err, f"--from {sender}: {exc.reason} ({exc.code} {exc.enhanced})")
    return path.address.address if path.address is not None else None


def _bracketed(text: str) -> str:
    return text if text.startswith("<") else f"<{text}>"


def _decide(loaded: LoadedConfig, directory: Directory, facts: SessionFacts,
            sender: str | None, recipients: tuple[str, ...]) -> tuple[list[Decision], str]:
    refusal = decide_connection(loaded, facts)
    if refusal is not None:
        return [refusal], "connection"
    refusal = decide_mail(loaded, directory, facts, sender)
    if refusal is not None:
        return [refusal], "mail"
    decisions = []
    for raw in recipients:
        try:
            path: Path = parse_rcpt_to(_bracketed(raw.strip()), utf8_session=True)
        except AddressError as exc:
            decisions.append(refuse_address(loaded, facts, sender, raw, exc.code, exc.enhanced,
                                            exc.reason))
            continue
        decisions.append(decide_recipient(loaded, directory, facts, sender, path.address))
    return decisions, "rcpt"


def _print_session(out: Console, loaded: LoadedConfig, facts: SessionFacts,
                   sender: str | None) -> None:
    parts = [f"listener {facts.listener}", f"client {facts.client_address}"]
    if facts.client_rdns:
        parts.append(f"rdns {facts.client_rdns}")
    parts.append("TLS" if facts.tls else "no TLS")
    parts.append(f"user {facts.auth_user}" if facts.auth_user else "not authenticated")
    out.print(f"[bold]config[/] {escape(loaded.file)}")
    out.print(f"[bold]session[/] {escape(', '.join(parts))}; MAIL FROM:<{escape(sender or '')}>")
    out.print()


def _print_decision(out: Console, decision: Decision, stage: str) -> None:
    title = {"connection": "connection", "mail": "MAIL FROM"}.get(
        stage, f"RCPT TO:<{decision.recipient}>")
    style = _STYLE[decision.verdict.value]
    out.print(f"[bold]{escape(title)}[/]  [{style}]{decision.verdict.value.upper()}[/]"
              f"{_target(decision)}")
    out.print(f"  reply     {escape(str(decision.reply))}")
    out.print(f"  event     {int(decision.event)} {decision.event.name}")
    out.print(f"  decision  {decision.id}")
    out.print("  rules")
    for number, hit in enumerate(decision.rules, start=1):
        out.print(f"    {number}. {escape(hit.rule)}: {escape(hit.detail)}  "
                  f"[dim]({escape(hit.where)})[/]")
    if decision.fix:
        out.print(f"  fix       {escape(decision.fix)}")
    out.print()


def _target(decision: Decision) -> str:
    if decision.mailbox:
        return f" to mailbox {escape(decision.mailbox)}"
    if decision.route:
        return f" on route {escape(decision.route)}"
    return ""
