"""``relaywarden queue``: list, show, summary, hold, release, delete, retry and bounce queued mail.

Presentation only: the selection and every change are ``relaywarden.queue.ops``. Each command
prints rich tables, or with ``--json`` one JSON document (shapes in docs/schemas/). Commands
that change mail select by queue ids (or unique prefixes) and/or filters, refuse to touch the
whole queue without ``--all``, ask before changing more than ``CONFIRM_OVER`` messages unless
``--yes``, and show a progress bar over more than one batch.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..events import EventLog
from ..queue.ops import (
    AGE_BUCKETS,
    BATCH,
    MESSAGE_STATES,
    SUMMARY_BY,
    BulkResult,
    QueueFilter,
    QueueOps,
    message_dict,
    message_state,
    parse_duration,
)
from .main import config_option, data_dir_option, load

CONFIRM_OVER = 100


# ---------------------------------------------------------------------------------- options

_FILTER_OPTIONS = (
    click.option("--state", "states", multiple=True, type=click.Choice(MESSAGE_STATES),
                 help="Queue state: active (not tried yet), deferred, hold, done. Repeatable."),
    click.option("--sender", default=None, help="Envelope sender (<> or '' for the null sender)."),
    click.option("--recipient", default=None, help="A recipient address."),
    click.option("--domain", "recipient_domain", default=None, help="A recipient domain."),
    click.option("--user", "auth_user", default=None, help="The authenticated user who sent it."),
    click.option("--client", default=None, help="Client address or network (203.0.113.0/24)."),
    click.option("--listener", default=None, help="Listener that received it."),
    click.option("--older-than", default=None, help="Received at least this long ago (30m, 2h, 3d)."),
    click.option("--younger-than", default=None, help="Received less than this long ago."),
    click.option("--attempts", "min_attempts", type=click.IntRange(min=0), default=None,
                 help="A recipient tried at least this many times."),
    click.option("--reply", default=None,
                 help="Regular expression searched in a recipient's last delivery result "
                      "(\"code enhanced host text\"), e.g. '^4.. .*greylist'."),
)


def filter_options(f: Callable) -> Callable:
    for option in reversed(_FILTER_OPTIONS):
        f = option(f)
    return f


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (docs/schemas/).")(f)


def build_filter(ids: tuple[str, ...] = (), **options: Any) -> QueueFilter:
    """The QueueFilter for the command line's filter options (UsageError when one is bad)."""
    try:
        for name in ("older_than", "younger_than"):
            if options.get(name) is not None:
                options[name] = parse_duration(options[name])
        sender = options.get("sender")
        if sender is not None:
            options["sender"] = "" if sender.strip() in ("", "<>") else sender
        options["states"] = tuple(options.get("states") or ())
        return QueueFilter(ids=ids, **options)
    except re.error as exc:
        raise click.UsageError(f"--reply {options.get('reply')!r} is not a valid regular expression: {exc}") from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _has_criteria(options: dict[str, Any]) -> bool:
    return any(v not in (None, (), "") or (k == "sender" and v == "") for k, v in options.items())


def _open(data_dir: Path) -> QueueOps:
    try:
        return QueueOps.open(data_dir)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


def _resolve_ids(ops: QueueOps, ids: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(ops.resolve(i) for i in ids)
    except KeyError as exc:
        raise click.ClickException(exc.args[0]) from None


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _out() -> Console:
    """Rich on a terminal; into a pipe or file, tables wide enough that grep sees whole rows."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=200)
    return console


# ---------------------------------------------------------------------------------- group


@click.group("queue")
def queue_group() -> None:
    """Inspect and change queued mail (while the server runs or not)."""


@queue_group.command("list")
@click.argument("ids", nargs=-1)
@filter_options
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many messages.")
@json_option
@data_dir_option
def list_command(ids: tuple[str, ...], limit: int, as_json: bool, data_dir: Path, **options: Any) -> None:
    """List queued messages, oldest first."""
    with _open(data_dir) as ops:
        selection = build_filter(_resolve_ids(ops, ids), **options)
        messages = ops.list(selection, limit=limit + 1)
        now = ops.clock()
    more = len(messages) > limit
    messages = messages[:limit]
    if as_json:
        _emit_json({"count": len(messages), "truncated": more,
                    "messages": [message_dict(m, now) for m in messages]})
        return
    table = Table("queue id", "state", "age", "size", "sender", "user", "client", "recipients",
                  "last result", title=f"{len(messages)}{'+' if more else ''} queued messages")
    for m in messages:
        waiting = [r for r in m.recipients if r.state in ("pending", "deferred")]
        last = next((r.last_result for r in waiting if r.last_result), None)
        rcpts = ", ".join(r.address for r in m.recipients[:3]) + (
            f" (+{len(m.recipients) - 3})" if len(m.recipients) > 3 else "")
        last_text = " ".join(str(x) for x in (last.reply_code, last.enhanced_code, last.remote_text)
                             if x) if last else ""
        table.add_row(m.id, message_state(m), _age(now - m.received_at), str(m.size),
                      escape(m.sender or "<>"), escape(m.auth_user or "-"), m.client_address,
                      escape(rcpts), escape(last_text[:80]))
    _out().print(table)
    if more:
        click.echo(f"(more than {limit} match; use --limit or narrow the filters)", err=True)


@queue_group.command("show")
@click.argument("queue_id")
@click.option("--body", is_flag=True, help="Also print the message body.")
@json_option
@data_dir_option
def show_command(queue_id: str, body: bool, as_json: bool, data_dir: Path) -> None:
    """Show one message: envelope, each recipient's state and last result, headers."""
    with _open(data_dir) as ops:
        try:
            view = ops.show(queue_id, body=body)
        except KeyError as exc:
            raise click.ClickException(exc.args[0]) from None
    if as_json:
        _emit_json(view.as_dict())
        return
    data = view.as_dict()
    out = _out()
    out.print(f"[bold]message {data['id']}[/]  state {data['state']}")
    for key in ("sender", "received_at", "age_seconds", "size", "listener", "client_address",
                "client_port", "helo", "auth_user", "tls", "body_type", "smtputf8", "dsn_ret",
                "dsn_envid", "session_id", "next_attempt_at"):
        value = data[key]
        if key == "sender":
            value = f"<{value}>"
        out.print(f"  {key:<16} {escape(str(value if value is not None else '-'))}")
    table = Table("recipient", "state", "attempts", "next attempt", "decision", "last result")
    for r in data["recipients"]:
        res = r["last_result"]
        result = "-" if res is None else " ".join(
            str(x) for x in (res["remote_host"], res["command"], res["reply_code"],
                             res["enhanced_code"], res["remote_text"]) if x)
        table.add_row(escape(r["address"]), r["state"], str(r["attempts"]),
                      r["next_attempt_at"] or "-", r["decision_id"], escape(result))
    out.print(table)
    out.print("[bold]headers[/]")
    for h in data["headers"]:
        out.print(f"  {escape(h['name'])}: {escape(h['value'])}")
    if body:
        out.print("[bold]body[/]")
        click.echo(data["body"])


@queue_group.command("summary")
@filter_options
@click.option("--by", type=click.Choice(SUMMARY_BY), default="domain", show_default=True,
              help="Rows by recipient domain, authenticated user, client, sender or listener.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Only the largest rows.")
@click.option("--buckets", default=",".join(map(str, AGE_BUCKETS)), show_default=True,
              help="Age columns: upper limits in minutes.")
@json_option
@data_dir_option
def summary_command(by: str, top: int | None, buckets: str, as_json: bool, data_dir: Path,
                    **options: Any) -> None:
    """A qshape-style table: rows by domain (or --by), columns by age in minutes."""
    try:
        limits = tuple(int(b) for b in buckets.split(",") if b.strip())
    except ValueError:
        raise click.UsageError(f"--buckets {buckets}: comma-separated minutes, e.g. 5,10,20") from None
    with _open(data_dir) as ops:
        shape = ops.summary(build_filter(**options), by=by, buckets=limits, top=top)
    if as_json:
        _emit_json(shape.as_dict())
        return
    table = Table(by, "T", *shape.labels,
                  title=f"queue by {by} ({shape.unit}; columns: age in minutes)")
    for row in (shape.total, *shape.rows):
        table.add_row(escape(row.key or "-"), str(row.total), *(str(c) for c in row.counts),
                      style="bold" if row is shape.total else None)
    _out().print(table)
    if shape.omitted:
        click.echo(f"({shape.omitted} smaller rows not shown)", err=True)


# ---------------------------------------------------------------------------------- changes


def _bulk_command(name: str, help_text: str, *, with_config: bool = False) -> click.Command:
    @click.argument("ids", nargs=-1)
    @filter_options
    @click.option("--all", "everything", is_flag=True, help="Allow selecting the whole queue.")
    @click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    @json_option
    @data_dir_option
    def command(ids: tuple[str, ...], everything: bool, yes: bool, as_json: bool, data_dir: Path,
                config_path: Path | None = None, **options: Any) -> None:
        if not ids and not _has_criteria(options) and not everything:
            raise click.UsageError(f"queue {name} needs queue ids, filters, or --all for every message")
        with _open(data_dir) as ops:
            selected = ops.select(build_filter(_resolve_ids(ops, ids), **options))
            if len(selected) > CONFIRM_OVER and not yes:
                click.confirm(f"{name} {len(selected)} messages?", abort=True, err=True)
            result = _run(ops, name, selected, data_dir, config_path)
        if name != "bounce" and result.changed:
            _log_change(data_dir, name, result, ids, options)
        _report(result, as_json)

    command.__doc__ = help_text
    if with_config:
        command = config_option(command)
    return click.command(name, help=help_text)(command)


def _log_change(data_dir: Path, name: str, result: BulkResult, ids: tuple[str, ...], options: dict) -> None:
    """One QUEUE_CHANGED event per operator command: what was done, to how many, chosen how."""
    import getpass
    import os

    from ..events import EventId

    criteria = {k: v for k, v in options.items() if v not in (None, (), False, "")}
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    with EventLog(data_dir / "log") as log:
        log.emit(EventId.QUEUE_CHANGED, text=(
            f"queue {name} by {who}: {result.changed} of {result.selected} selected messages"
            + (f" (filters: {', '.join(f'{k}={v}' for k, v in criteria.items())})" if criteria else "")),
            operation=name, operator=who, changed=result.changed, selected=result.selected,
            ids=list(result.ids)[:1000], filters={k: str(v) for k, v in criteria.items()}, named_ids=list(ids)[:100])


def _run(ops: QueueOps, name: str, selected: list[str], data_dir: Path,
         config_path: Path | None) -> BulkResult:
    with _progress(len(selected), name) as advance:
        if name != "bounce":
            return getattr(ops, name)(selected, progress=advance)
        from ..directory import Directory
        from ..users import UserStore

        loaded = load(config_path if config_path is not None else _server_configuration(data_dir))
        directory = Directory.build(loaded, UserStore(data_dir).records())
        with EventLog(data_dir / "log") as log:
            return ops.bounce(selected, loaded=loaded, directory=directory,
                              hostname=loaded.config.server.hostname, emit=log.emit,
                              progress=advance)


def _server_configuration(data_dir: Path) -> Path | None:
    """Without --config: the configuration the server last ran with on this data directory
    (it notes it at start), so that NDRs carry its hostname and follow its routes."""
    from ..server.app import recorded_configuration

    recorded = recorded_configuration(data_dir)
    if recorded is None or recorded.startswith("<"):
        return None
    click.echo(f"using the server's configuration {recorded} (noted in {data_dir}/serve.config; "
               "--config to choose another)", err=True)
    return Path(recorded)


class _progress:
    """A rich progress bar on stderr when the work takes more than one batch."""

    def __init__(self, total: int, name: str) -> None:
        self.total, self.name = total, name
        self.bar: Progress | None = None

    def __enter__(self) -> Callable[[int], None]:
        if self.total <= BATCH:
            return lambda n: None
        self.bar = Progress(TextColumn(f"{self.name}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.bar.start()
        task = self.bar.add_task(self.name, total=self.total)
        return lambda n: self.bar.advance(task, n)  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _report(result: BulkResult, as_json: bool) -> None:
    if as_json:
        _emit_json(result.as_dict())
        return
    verb = {"hold": "held", "release": "released", "delete": "deleted", "retry": "made due now",
            "bounce": "returned to their senders"}[result.operation]
    line = f"{result.changed} of {result.selected} messages {verb}"
    if result.operation == "retry":
        line += f" ({result.recipients} recipients)"
    if result.operation == "bounce":
        sent = sum(1 for n in result.notices.values() if n)
        line += f" ({result.recipients} recipients, {sent} NDRs queued)"
    if result.skipped:
        line += (f"; {len(result.skipped)} left alone: being delivered at that moment, or changed or gone "
                 "meanwhile (hold them to stop further attempts; `queue show` tells)")
    click.echo(line)


for _name, _help in (
    ("hold", "Hold messages: the server does not deliver them until released."),
    ("release", "Release held messages: delivery resumes at the server's next poll."),
    ("delete", "Delete messages without notice to anyone."),
    ("retry", "Make every recipient still to deliver due now (held messages stay held)."),
):
    queue_group.add_command(_bulk_command(_name, _help))
queue_group.add_command(_bulk_command(
    "bounce", "Return messages to their senders with an NDR (5.0.0, returned by the "
              "administrator) and remove them. --config: the server's configuration, which "
              "decides how each NDR is routed (default: the one the server last ran with on this "
              "data directory).", with_config=True))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


if __name__ == "__main__":  # pragma: no cover
    queue_group(sys.argv[1:])
