"""``relaywarden events``: query and follow the event log (DATA_DIR/log/events.jsonl).

Owns the operator's event query: ``EventQuery`` (ids or names, time range, client address or
network, user, sender, recipient, listener, session, queue id, decision id, severity) over the
records that ``relaywarden.events`` writes, ``query_events`` over the log and its rotated
backups, and ``follow_events``, which keeps reading what the server appends and survives
rotation. The click command is the thin presentation: a rich line per event, or ``--json``
one record per line (JSON Lines, docs/schemas/event.json).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import click
from rich.console import Console
from rich.markup import escape

from ..events import LOG_FILE_NAME, EventId, read_events
from ..queue.ops import parse_duration
from .main import data_dir_option

__all__ = ["EventQuery", "events_command", "follow_events", "parse_when", "query_events"]

_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}
_SEVERITY_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive = UTC) or a duration back from now ("2h", "30m")."""
    now = now or datetime.now(UTC)
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: use an ISO 8601 time (2024-05-01T02:14) or a duration "
                         "back from now (2h, 30m)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _lower(value: Any) -> str | None:
    return value.strip("<>").lower() if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Which event records an operator wants; every criterion given must hold."""

    ids: frozenset[int] | None = None
    since: datetime | None = None
    until: datetime | None = None
    client: str | None = None         # an address or a network
    user: str | None = None
    sender: str | None = None         # fields.sender or fields.mail_from
    recipient: str | None = None      # fields.recipient, rcpt_to, or one of fields.recipients
    listener: str | None = None
    session: str | None = None
    message_id: str | None = None     # the queue id
    decision: str | None = None
    min_severity: str | None = None

    def __post_init__(self) -> None:
        if self.client is not None:
            ipaddress.ip_network(self.client.strip("[]"), strict=False)
        if self.min_severity is not None and self.min_severity not in _SEVERITY_RANK:
            raise ValueError(f"severity {self.min_severity!r}: use info, warning or error")

    def base_filters(self) -> dict[str, Any]:
        """The exact-match filters ``relaywarden.events.read_events`` applies itself."""
        out: dict[str, Any] = {}
        for key in ("listener", "session", "message_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.decision is not None:
            out["decision"] = self.decision
        return out

    def matches(self, record: Mapping[str, Any]) -> bool:
        """The criteria read_events cannot express: networks, case, several field names."""
        fields = record.get("fields") if isinstance(record.get("fields"), Mapping) else {}
        if self.ids is not None and record.get("id") not in self.ids:
            return False
        if self.min_severity is not None and \
                _SEVERITY_RANK.get(record.get("severity"), 0) < _SEVERITY_RANK[self.min_severity]:
            return False
        if self.user is not None and _lower(record.get("user")) != self.user.lower():
            return False
        if self.client is not None and not _client_matches(self.client, record.get("client")):
            return False
        if self.sender is not None:
            wanted = self.sender.strip("<>").lower()
            if wanted not in {_lower(fields.get("sender")), _lower(fields.get("mail_from"))}:
                return False
        if self.recipient is not None:
            wanted = self.recipient.strip("<>").lower()
            found = {_lower(fields.get("recipient")), _lower(fields.get("rcpt_to"))}
            listed = fields.get("recipients")
            if isinstance(listed, list):
                found.update(_lower(x) for x in listed)
            if wanted not in found:
                return False
        return True


def _client_matches(wanted: str, actual: Any) -> bool:
    if not isinstance(actual, str):
        return False
    try:
        return ipaddress.ip_address(actual.strip("[]")) in ipaddress.ip_network(
            wanted.strip("[]"), strict=False)
    except ValueError:
        return False


def query_events(directory: Path, query: EventQuery) -> Iterator[dict]:
    """Matching records of the log and its backups, oldest first."""
    for record in read_events(directory, since=query.since, until=query.until,
                              **query.base_filters()):
        if query.matches(record):
            yield record


def _full_match(query: EventQuery, record: Mapping[str, Any]) -> bool:
    from ..events import record_matches
    return record_matches(record, since=query.since, until=query.until,
                          **query.base_filters()) and query.matches(record)


class _Tail:
    """Reads whole lines appended to the current log file, across rotation."""

    def __init__(self, path: Path, from_start: bool) -> None:
        self.path = path
        self.handle: BinaryIO | None = None
        self.inode: int | None = None
        self.partial = b""
        self._open(at_end=not from_start)

    def _open(self, at_end: bool) -> None:
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - kept open while following
        except FileNotFoundError:
            self.handle = self.inode = None
            return
        self.handle = handle
        self.inode = os.fstat(handle.fileno()).st_ino
        if at_end:
            handle.seek(0, os.SEEK_END)

    def lines(self) -> Iterator[bytes]:
        if self.handle is None:
            self._open(at_end=False)
            if self.handle is None:
                return
        yield from self._drain()
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return
        if current.st_ino != self.inode or current.st_size < self.handle.tell():
            self.handle.close()
            self.partial = b""
            self._open(at_end=False)      # rotated: the new file is read from its start
            yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        assert self.handle is not None
        chunk = self.handle.read()
        if not chunk:
            return
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        yield from complete

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def follow_events(directory: Path, query: EventQuery, *, history: bool = False,
                  poll: float = 0.25, stop: Callable[[], bool] = lambda: False) -> Iterator[dict]:
    """Matching records as the server appends them; with ``history`` the log so far first.
    Ends when ``stop()`` says so (checked at every poll)."""
    directory = Path(directory)
    if history:
        yield from query_events(directory, query)
    tail = _Tail(directory / LOG_FILE_NAME, from_start=False)
    try:
        while not stop():
            for raw in tail.lines():
                try:
                    record = json.loads(raw.decode("utf-8", errors="replace"))
                except ValueError:
                    continue
                if isinstance(record, dict) and _full_match(query, record):
                    yield record
            time.sleep(poll)
    finally:
        tail.close()


def _event_ids(values: tuple[str, ...]) -> frozenset[int] | None:
    if not values:
        return None
    out = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if part.isdigit():
                out.add(int(part))
            elif part.upper() in EventId.__members__:
                out.add(int(EventId[part.upper()]))
            elif part:
                raise click.BadParameter(f"{part}: an event number (1709) or name (RELAY_DENIED)",
                                         param_hint="--id")
    return frozenset(out)


def _line(console: Console, record: Mapping[str, Any]) -> None:
    severity = str(record.get("severity", "info"))
    style = _SEVERITY_STYLE.get(severity, "")
    who = " ".join(f"{k}={record[k]}" for k in ("listener", "client", "user", "message_id")
                   if record.get(k))
    head = f"{record.get('time', '?')} {record.get('id', '?')} {record.get('name', '?')}"
    console.print(f"[{style}]{escape(head)}[/]" if style else escape(head),
                  escape(who), "-", escape(str(record.get("text", ""))))


@click.command("events")
@click.option("--id", "ids", multiple=True, help="Event ids or names, repeatable or comma-separated.")
@click.option("--since", default=None, help="From this time (ISO 8601, UTC) or this long ago (2h).")
@click.option("--until", default=None, help="Before this time, or this long ago.")
@click.option("--client", default=None, help="Client address or network.")
@click.option("--user", default=None, help="Authenticated user.")
@click.option("--sender", default=None, help="Envelope sender (MAIL FROM).")
@click.option("--recipient", default=None, help="Recipient address.")
@click.option("--listener", default=None)
@click.option("--session", default=None, help="SMTP session id.")
@click.option("--message-id", default=None, help="Queue id.")
@click.option("--decision", default=None, help="Relay decision id (as in [decision 8f3a2c]).")
@click.option("--severity", type=click.Choice(list(_SEVERITY_RANK)), default=None,
              help="At least this severity.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after this many events.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are logged.")
@click.option("--for", "follow_for", default=None, help="With --follow: stop after this long (10m).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line (docs/schemas/event.json).")
@data_dir_option
def events_command(ids: tuple[str, ...], since: str | None, until: str | None, client: str | None,
                   user: str | None, sender: str | None, recipient: str | None,
                   listener: str | None, session: str | None, message_id: str | None,
                   decision: str | None, severity: str | None, limit: int | None, follow: bool,
                   follow_for: str | None, as_json: bool, data_dir: Path) -> None:
    """Query the event log; --follow it as the server writes."""
    try:
        query = EventQuery(
            ids=_event_ids(ids), since=parse_when(since) if since else None,
            until=parse_when(until) if until else None, client=client, user=user, sender=sender,
            recipient=recipient, listener=listener, session=session, message_id=message_id,
            decision=decision, min_severity=severity)
        deadline = time.monotonic() + parse_duration(follow_for) if follow_for else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    directory = Path(data_dir) / "log"
    if follow:
        records = follow_events(directory, query, history=since is not None,
                                stop=lambda: deadline is not None and time.monotonic() >= deadline)
    else:
        records = query_events(directory, query)
    console = Console(highlight=False, soft_wrap=True)
    shown = 0
    try:
        for record in records:
            if as_json:
                click.echo(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
            else:
                _line(console, record)
            if follow:
                sys.stdout.flush()
            shown += 1
            if limit is not None and shown >= limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()
