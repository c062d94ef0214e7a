"""``relaywarden relay-test HOST[:PORT] --local-domain D``: the open-relay battery against any server.

Exit 2 when any attempt relayed, 1 when some were only deferred (4xx) or failed to run, 0 when
every attempt was refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..diagnose.relay_attempts import ACCEPTED, REFUSED
from ..diagnose.relay_test import run_battery


def parse_target(target: str) -> tuple[str, int]:
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 25
    if target.count(":") == 1:
        host, _, port = target.partition(":")
        return host, int(port)
    return target, 25


@click.command("relay-test")
@click.argument("target")
@click.option("--local-domain", required=True, help="A domain the server accepts mail for (the battery builds its tricks from it).")
@click.option("--local-address", default=None, help="An address of that domain (default postmaster@DOMAIN).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per reply.")
@click.option("--no-starttls", is_flag=True, help="Do not use STARTTLS even when offered.")
@click.option("--implicit-tls", is_flag=True, help="Speak TLS from the first byte (a port 465 listener).")
@click.option("--json", "as_json", is_flag=True, help="Print each attempt as JSON.")
def relay_test_command(target: str, local_domain: str, local_address: str | None, timeout: float,
                       no_starttls: bool, implicit_tls: bool, as_json: bool) -> None:
    """Try some 50 unauthenticated relay tricks against TARGET (never sends DATA)."""
    try:
        host, port = parse_target(target)
    except ValueError:
        raise click.BadParameter(f"{target!r}: use HOST, HOST:PORT or [IPv6]:PORT") from None
    try:
        ipaddress.ip_address(host)
        server_ip = host
    except ValueError:
        try:
            server_ip = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as exc:
            raise click.ClickException(f"cannot resolve {host}: {exc}") from None
    results = asyncio.run(run_battery(server_ip, port, local_domain=local_domain, local_address=local_address,
                                      server_ip=server_ip, timeout=timeout, starttls=not no_starttls,
                                      implicit_tls=implicit_tls))
    open_ = [r for r in results if r.outcome == ACCEPTED]
    other = [r for r in results if r.outcome not in (ACCEPTED, REFUSED)]
    code = 2 if open_ else 1 if other else 0
    if as_json:
        click.echo(json.dumps({"target": f"{host}:{port}", "attempts": [r.to_dict() for r in results],
                               "relayed": len(open_), "exit_code": code}, indent=2))
        sys.exit(code)
    table = Table("attempt", "MAIL FROM", "RCPT TO", "reply", "outcome", show_lines=False)
    style = {"accepted": "bold red", "refused": "green", "deferred": "yellow", "error": "yellow"}
    for r in results:
        reply = r.rcpt_reply or r.mail_reply
        table.add_row(escape(r.name), escape(r.mail_from), escape(r.rcpt_to), escape(reply[:90]),
                      f"[{style[r.outcome]}]{r.outcome}[/]")
    console = Console(highlight=False)
    console.print(table)
    if open_:
        console.print(f"[bold red]OPEN RELAY: {len(open_)} of {len(results)} attempts were accepted[/]")
    else:
        console.print(f"{len(results)} attempts, none relayed" + (f"; {len(other)} deferred or failed" if other else ""))
    sys.exit(code)
