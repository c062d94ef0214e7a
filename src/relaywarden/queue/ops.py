"""The operator's service layer over the queue: select, list, show, summarise, and change mail.

This module owns what ``relaywarden queue`` (and later the web console) does to queued mail:
the selection (``QueueFilter``: state, sender, recipient, recipient domain, authenticated user,
client address or network, listener, age, attempts, last reply), the listing, one message shown
whole, the qshape-style summary (rows by destination domain, user, client or sender, columns by
age), and the bulk operations hold, release, delete, retry and bounce. Bulk operations go
through the queue's single writer in batches of ``BATCH`` messages, one transaction each, and
report progress after every batch.

It works on the queue file whether the server runs or not: the server's queue runner polls the
queue, so a held, released, retried (due now) or deleted message is seen at its next poll. A
bounce replaces the message by its NDR in one transaction, so a crash never leaves one without
the other. Every result has an ``as_dict()`` whose shape is documented in docs/schemas/.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from ..config.loader import LoadedConfig
from ..directory import Directory
from ..dsn.build import split_original
from ..dsn.notify import Notice, build_notice, log_notice
from ..events import format_time
from .model import ACTIVE_STATES, DeliveryResult, QueuedMessage, QueuedRecipient
from .store import MESSAGE_STATES, MessageFilter, SqliteQueue

__all__ = [
    "AGE_BUCKETS",
    "BATCH",
    "BulkResult",
    "MessageView",
    "QueueFilter",
    "QueueOps",
    "QueueShape",
    "ShapeRow",
    "SUMMARY_BY",
    "MESSAGE_STATES",
    "admin_bounce_result",
    "message_dict",
    "parse_duration",
    "queue_path",
]

QueueFilter = MessageFilter

QUEUE_FILE = "queue.sqlite"
BATCH = 500
# qshape's columns: messages younger than 5, 10, 20, ... 1280 minutes, and older.
AGE_BUCKETS: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
SUMMARY_BY = ("domain", "user", "client", "sender", "listener")

Progress = Callable[[int], None]
Emit = Callable[..., object]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "15m", "2h", "3d" or "1w"."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use a number with s, m, h, d or w (2h, 30m)")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _UNIT[unit]


def queue_path(data_dir: Path) -> Path:
    return Path(data_dir) / QUEUE_FILE


def admin_bounce_result(hostname: str) -> DeliveryResult:
    """The final result recorded for a recipient the operator returned to its sender."""
    return DeliveryResult(
        reply_code=550, enhanced_code="5.0.0", remote_host=None, remote_address=None,
        remote_text=(f"Returned to the sender by the mail administrator of {hostname} "
                     "without being delivered"),
        command="LOCAL", permanent=True)


# ---------------------------------------------------------------------------------- results


def _time(ts: float | None) -> str | None:
    return None if ts is None else format_time(datetime.fromtimestamp(ts, UTC))


def _result_dict(result: DeliveryResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {"reply_code": result.reply_code, "enhanced_code": result.enhanced_code,
            "remote_host": result.remote_host, "remote_address": result.remote_address,
            "remote_text": result.remote_text, "command": result.command,
            "permanent": result.permanent}


def _recipient_dict(r: QueuedRecipient) -> dict[str, Any]:
    return {"id": r.id, "address": r.address, "original": r.original, "orcpt": r.orcpt,
            "notify": list(r.notify), "verdict": r.verdict, "route": r.route,
            "decision_id": r.decision_id, "state": r.state, "attempts": r.attempts,
            "next_attempt_at": _time(r.next_attempt_at),
            "last_attempt_at": _time(r.last_attempt_at), "delay_warned": r.delay_warned,
            "last_result": _result_dict(r.last_result)}


def message_state(message: QueuedMessage) -> str:
    """hold, deferred, active or done: the same states the filter selects on."""
    if message.hold:
        return "hold"
    states = {r.state for r in message.recipients}
    if "deferred" in states:
        return "deferred"
    return "active" if "pending" in states else "done"


def message_dict(message: QueuedMessage, now: float) -> dict[str, Any]:
    """A queued message (envelope and recipients, no body) as JSON types."""
    return {
        "id": message.id, "state": message_state(message), "hold": message.hold,
        "sender": message.sender, "received_at": _time(message.received_at),
        "age_seconds": round(max(0.0, now - message.received_at), 3),
        "size": message.size, "listener": message.listener,
        "client_address": message.client_address, "client_port": message.client_port,
        "helo": message.helo, "auth_user": message.auth_user, "tls": message.tls,
        "body_type": message.body_type, "smtputf8": message.smtputf8,
        "dsn_ret": message.dsn_ret, "dsn_envid": message.dsn_envid,
        "session_id": message.session_id, "next_attempt_at": _time(message.next_attempt_at),
        "recipients": [_recipient_dict(r) for r in message.recipients],
    }


@dataclass(frozen=True, slots=True)
class MessageView:
    """One message shown whole: envelope, recipients with their last results, headers, and
    the body when asked for."""

    message: QueuedMessage
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    now: float

    def as_dict(self) -> dict[str, Any]:
        out = message_dict(self.message, self.now)
        out["headers"] = [{"name": n, "value": v} for n, v in self.headers]
        if self.body is not None:
            out["body"] = self.body.decode("utf-8", errors="replace")
        return out


@dataclass(frozen=True, slots=True)
class ShapeRow:
    key: str
    total: int
    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class QueueShape:
    """A qshape-style table: one row per key, one column per age bucket (minutes)."""

    by: str
    unit: str                       # "recipients" (by domain) or "messages"
    buckets: tuple[int, ...]        # upper limits in minutes; a last column holds the older
    total: ShapeRow
    rows: tuple[ShapeRow, ...]
    omitted: int                    # rows left out by ``top``

    @property
    def labels(self) -> list[str]:
        return [str(b) for b in self.buckets] + [f"{self.buckets[-1]}+" if self.buckets else "all"]

    def as_dict(self) -> dict[str, Any]:
        def row(r: ShapeRow) -> dict[str, Any]:
            return {"key": r.key, "total": r.total, "counts": list(r.counts)}
        return {"by": self.by, "unit": self.unit, "buckets_minutes": list(self.buckets),
                "labels": self.labels, "total": row(self.total),
                "rows": [row(r) for r in self.rows], "omitted": self.omitted}


@dataclass(slots=True)
class BulkResult:
    """What a bulk operation did: how many messages it selected and changed, which ones, and
    for a bounce the NDR queued for each message (None when the sender gets none)."""

    operation: str
    selected: int = 0
    changed: int = 0
    recipients: int = 0             # recipients made due now (retry) or returned (bounce)
    ids: list[str] = field(default_factory=list)
    # not done: being delivered at that moment (delete, bounce), or gone or changed meanwhile
    skipped: list[str] = field(default_factory=list)
    notices: dict[str, str | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "selected": self.selected, "changed": self.changed,
                "recipients": self.recipients, "ids": list(self.ids),
                "skipped": list(self.skipped), "notices": dict(self.notices)}


# ---------------------------------------------------------------------------------- service


class QueueOps:
    """The operator's view of one queue. Thread-safe as the queue is; close the queue yourself
    (or use ``QueueOps.open`` as a context manager)."""

    def __init__(self, queue: SqliteQueue, *, clock: Callable[[], float] = time.time,
                 batch: int = BATCH) -> None:
        self.queue = queue
        self.clock = clock
        self.batch = max(1, batch)

    @classmethod
    def open(cls, data_dir: Path, *, create: bool = False) -> QueueOps:
        """Open DATA_DIR/queue.sqlite; FileNotFoundError when there is none (unless create)."""
        path = queue_path(data_dir)
        if not create and not path.exists():
            raise FileNotFoundError(f"no queue at {path} (is --data-dir the server's data directory?)")
        return cls(SqliteQueue(path))

    def close(self) -> None:
        self.queue.close()

    def __enter__(self) -> QueueOps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def select(self, selection: QueueFilter) -> list[str]:
        """The ids of the messages that pass the filter, oldest first."""
        return self.queue.find_ids(selection, self.clock())

    def list(self, selection: QueueFilter, limit: int | None = None) -> list[QueuedMessage]:
        return self.queue.find(selection, self.clock(), limit)

    def count(self, selection: QueueFilter) -> int:
        return len(self.select(selection))

    def resolve(self, text: str) -> str:
        """A queue id from the id or a unique prefix of it; KeyError explains otherwise."""
        found = self.queue.resolve_id(text)
        if not found:
            raise KeyError(f"no queued message {text}")
        if len(found) > 1:
            raise KeyError(f"{text} is the start of more than one queue id; give more of it")
        return found[0]

    def show(self, queue_id: str, *, body: bool = False) -> MessageView:
        """The message ``queue_id`` (or a unique prefix of it) whole."""
        qid = self.resolve(queue_id)
        message = self.queue.get(qid)
        data = self.queue.message_data(qid)
        if message is None or data is None:
            raise KeyError(f"no queued message {queue_id}")
        header_bytes, body_bytes = split_original(data)
        parsed = BytesHeaderParser(policy=compat32).parsebytes(header_bytes)
        headers = tuple((name, str(value)) for name, value in parsed.items())
        return MessageView(message, headers, body_bytes if body else None, self.clock())

    def summary(self, selection: QueueFilter, by: str = "domain",
                buckets: Sequence[int] = AGE_BUCKETS, top: int | None = None) -> QueueShape:
        """Counts per ``by`` key and age bucket, the largest rows first (qshape)."""
        if by not in SUMMARY_BY:
            raise ValueError(f"summary by {by!r}: use one of {', '.join(SUMMARY_BY)}")
        limits = tuple(sorted(int(b) for b in buckets))
        now = self.clock()
        counts: dict[str, list[int]] = {}
        for key, received_at in self.queue.shape(selection, by, now):
            column = _bucket(limits, (now - received_at) / 60.0)
            counts.setdefault(key, [0] * (len(limits) + 1))[column] += 1
        rows = sorted((ShapeRow(k, sum(c), tuple(c)) for k, c in counts.items()),
                      key=lambda r: (-r.total, r.key))
        total_counts = tuple(sum(r.counts[i] for r in rows) for i in range(len(limits) + 1))
        total = ShapeRow("TOTAL", sum(total_counts), total_counts)
        shown = rows if top is None else rows[:top]
        return QueueShape(by, "recipients" if by == "domain" else "messages", limits, total,
                          tuple(shown), len(rows) - len(shown))

    # -- changing ------------------------------------------------------------------------------

    def hold(self, ids: Sequence[str], progress: Progress | None = None) -> BulkResult:
        return self._simple("hold", ids, lambda chunk: self.queue.hold_many(chunk, True), progress)

    def release(self, ids: Sequence[str], progress: Progress | None = None) -> BulkResult:
        return self._simple("release", ids, lambda chunk: self.queue.hold_many(chunk, False), progress)

    def delete(self, ids: Sequence[str], progress: Progress | None = None) -> BulkResult:
        """Delete messages; ``ids`` of the result are those deleted, ``skipped`` those being
        delivered at that moment (or already gone): try them again, or hold them first."""
        result = BulkResult("delete", selected=len(ids))
        for chunk in _chunks(ids, self.batch):
            deleted = set(self.queue.delete_many(chunk))
            result.changed += len(deleted)
            result.ids.extend(qid for qid in chunk if qid in deleted)
            result.skipped.extend(qid for qid in chunk if qid not in deleted)
            if progress:
                progress(len(chunk))
        return result

    def retry(self, ids: Sequence[str], progress: Progress | None = None) -> BulkResult:
        """Make every recipient still to deliver due now; held messages stay held."""
        result = BulkResult("retry", selected=len(ids))
        for chunk in _chunks(ids, self.batch):
            messages, recipients = self.queue.retry_many(chunk, self.clock())
            result.changed += messages
            result.recipients += recipients
            result.ids.extend(chunk)
            if progress:
                progress(len(chunk))
        return result

    def bounce(self, ids: Sequence[str], *, loaded: LoadedConfig, directory: Directory,
               hostname: str, emit: Emit | None = None,
               progress: Progress | None = None) -> BulkResult:
        """Return each message to its sender: every recipient still to deliver fails with
        ``admin_bounce_result``, one NDR reports all failed recipients (RFC 3464, none to the
        null sender or when NOTIFY declines it), and the NDR replaces the message in the queue
        in one transaction. ``emit`` logs NDR_GENERATED (4001) for each reported recipient."""
        result = BulkResult("bounce", selected=len(ids))
        final = admin_bounce_result(hostname)
        for chunk in _chunks(ids, self.batch):
            now = self.clock()
            planned: list[tuple[str, tuple[int, ...], Notice | None, int]] = []
            for message in self.queue.find(QueueFilter(ids=tuple(chunk)), now):
                active = [r for r in message.recipients if r.state in ACTIVE_STATES]
                if not active:
                    continue
                notice = self._notice(message, active, final, loaded, directory, hostname, now)
                planned.append((message.id, tuple(r.id for r in active), notice, len(active)))
            outcomes = self.queue.replace_many(
                [(qid, rids, n.message if n else None) for qid, rids, n, _ in planned])
            done = set()
            for (qid, _, notice, count), outcome in zip(planned, outcomes, strict=True):
                if outcome is None:
                    continue
                done.add(qid)
                result.changed += 1
                result.recipients += count
                result.notices[qid] = outcome or None
                if notice is not None and emit is not None:
                    log_notice(emit, notice, outcome)
            result.ids.extend(qid for qid in chunk if qid in done)
            result.skipped.extend(qid for qid in chunk if qid not in done)
            if progress:
                progress(len(chunk))
        return result

    def _notice(self, message: QueuedMessage, active: list[QueuedRecipient],
                final: DeliveryResult, loaded: LoadedConfig, directory: Directory,
                hostname: str, now: float) -> Notice | None:
        returned = {r.id for r in active}
        recipients = tuple(
            replace(r, state="failed", next_attempt_at=None, last_attempt_at=now,
                    last_result=final) if r.id in returned else r
            for r in message.recipients)
        message = replace(message, recipients=recipients)
        failed = [r for r in recipients if r.state == "failed"]
        data = self.queue.message_data(message.id) or b""
        return build_notice(loaded=loaded, directory=directory, hostname=hostname,
                            message=message, original=data, failed=failed, now=now)

    def _simple(self, operation: str, ids: Sequence[str], apply: Callable[[list[str]], int],
                progress: Progress | None) -> BulkResult:
        result = BulkResult(operation, selected=len(ids))
        for chunk in _chunks(ids, self.batch):
            result.changed += apply(chunk)
            result.ids.extend(chunk)
            if progress:
                progress(len(chunk))
        return result


def _chunks(ids: Iterable[str], size: int) -> Iterable[list[str]]:
    chunk: list[str] = []
    for qid in ids:
        chunk.append(qid)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _bucket(limits: tuple[int, ...], minutes: float) -> int:
    for index, limit in enumerate(limits):
        if minutes < limit:
            return index
    return len(limits)

