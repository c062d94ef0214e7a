"""Doctor check ``queue-spam``: spam in the queue (KB 895853: "unsolicited commercial e-mail
appears in the mail queue").

Owns the reading of the queue for signs of spam, per source (the authenticated user, or the
client address for mail relayed without authentication), through ``QueueOps`` (its listing and
its qshape summaries, no SQL of its own).  ``queue_sources(ops, ctx)`` gives the facts per source
for the web console; the findings are:

* ``queue-spam.recipients``: messages with more than ``doctor.queue_recipients_per_message``
  recipients;
* ``queue-spam.domains``: one source's queued mail going to more than that many distinct external
  domains (domains that are not ours);
* ``queue-spam.foreign-sender``: relayed mail whose envelope sender is not in our domains;
* ``queue-spam.dominant``: one user or client address owning more than ``doctor.queue_share`` of
  a queue of at least ``DOMINANCE_MIN_MESSAGES`` messages.

Each is a warning; a source that shows two or more of them is a failure.  The fix is the bulk
clean-up with the source's filter: ``relaywarden queue hold --user ... --yes`` (or ``--client``),
review with ``queue list``, then ``queue delete``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..queue.model import QueuedMessage
from ..queue.ops import QueueFilter, QueueOps
from .accounts import command
from .model import SECTION_QUEUE, Context, Finding, Level

__all__ = ["CHECKS", "DOMINANCE_MIN_MESSAGES", "LIST_LIMIT", "QueueSource", "check_queue_spam",
           "queue_sources"]

ACTIVE_STATES = ("active", "deferred", "hold")
DOMINANCE_MIN_MESSAGES = 20     # below this a queue is too small for "one source dominates"
LIST_LIMIT = 50_000             # messages examined one by one (summaries cover the whole queue)
_SHOWN = 5


@dataclass
class QueueSource:
    """The queued mail of one source: an authenticated user, or a client address for mail
    that came without authentication."""

    kind: str                                           # "user" or "client"
    key: str
    messages: int = 0
    recipients: int = 0
    big: list[tuple[str, int, str]] = field(default_factory=list)   # id, recipients, sender
    domains: set[str] = field(default_factory=set)      # external recipient domains
    foreign: Counter[str] = field(default_factory=Counter)   # relayed mail: sender -> messages
    listeners: Counter[str] = field(default_factory=Counter)
    share: float = 0.0                                  # of the whole queue's messages

    @property
    def option(self) -> str:
        return "--user" if self.kind == "user" else "--client"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "messages": self.messages,
                "recipients": self.recipients, "share": round(self.share, 4),
                "big_messages": [{"id": i, "recipients": n, "sender": s} for i, n, s in self.big],
                "external_domains": len(self.domains), "foreign_senders": dict(self.foreign),
                "listeners": dict(self.listeners)}


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _add(source: QueueSource, message: QueuedMessage, ours: set[str], big_limit: int) -> None:
    source.messages += 1
    source.recipients += len(message.recipients)
    source.listeners[message.listener] += 1
    if len(message.recipients) > big_limit:
        source.big.append((message.id, len(message.recipients), message.sender))
    source.domains.update(d for d in (r.domain for r in message.recipients) if d not in ours)
    relayed = any(r.verdict == "relay" for r in message.recipients)
    if relayed and message.sender and _domain(message.sender) not in ours:
        source.foreign[message.sender] += 1


def queue_sources(ops: QueueOps, ctx: Context) -> tuple[dict[tuple[str, str], QueueSource], int, int]:
    """Per (kind, key) source, its queued mail; with the number of messages in the queue and
    how many of them were examined one by one (at most ``LIST_LIMIT``, the oldest)."""
    doctor = ctx.config.doctor
    ours = {d.name for d in ctx.config.domain}
    selection = QueueFilter(states=ACTIVE_STATES)
    sources: dict[tuple[str, str], QueueSource] = {}
    messages = ops.list(selection, limit=LIST_LIMIT)
    for message in messages:
        kind, key = ("user", message.auth_user) if message.auth_user else ("client", message.client_address)
        source = sources.setdefault((kind, key), QueueSource(kind, key))
        _add(source, message, ours, doctor.queue_recipients_per_message)
    by_user = ops.summary(selection, by="user")
    total = by_user.total.total
    for row in by_user.rows:
        if row.key:
            sources.setdefault(("user", row.key), QueueSource("user", row.key)).share = row.total / total
    for row in ops.summary(selection, by="client").rows:
        source = sources.get(("client", row.key))
        if source is not None:
            source.share = row.total / total
    return sources, total, len(messages)


def _signals(source: QueueSource, ctx: Context, total: int) -> dict[str, tuple[str, list[str]]]:
    """The spam signs of one source: check id -> (title, evidence)."""
    doctor = ctx.config.doctor
    limit = doctor.queue_recipients_per_message
    who = f"user {source.key}" if source.kind == "user" else f"client {source.key}"
    out: dict[str, tuple[str, list[str]]] = {}
    if source.big:
        lines = [f"{qid}: {n} recipients, from <{sender}>" for qid, n, sender in
                 sorted(source.big, key=lambda b: -b[1])[:_SHOWN]]
        out["queue-spam.recipients"] = (
            f"{len(source.big)} queued message(s) from {who} with more than {limit} recipients", lines)
    if len(source.domains) > limit:
        shown = sorted(source.domains)[:_SHOWN]
        out["queue-spam.domains"] = (
            f"queued mail from {who} goes to {len(source.domains)} external domains "
            f"(more than {limit})",
            [f"domains: {', '.join(shown)} and {len(source.domains) - len(shown)} more"])
    if source.foreign:
        count = sum(source.foreign.values())
        lines = [f"<{s}>: {n} message(s)" for s, n in source.foreign.most_common(_SHOWN)]
        out["queue-spam.foreign-sender"] = (
            f"{count} relayed message(s) from {who} with a sender outside our domains", lines)
    if total >= DOMINANCE_MIN_MESSAGES and source.share > doctor.queue_share:
        out["queue-spam.dominant"] = (
            f"{who} owns {source.share:.0%} of the queue (more than {doctor.queue_share:.0%})",
            [f"{round(source.share * total)} of {total} queued messages"])
    return out


def _where(ctx: Context, source: QueueSource) -> str | None:
    """The relay list that let an anonymous client relay, or the account's definition."""
    if source.kind == "user":
        entry = ctx.directory.login(source.key)
        return entry.source if entry and entry.source else None
    if not source.listeners:
        return None
    name = source.listeners.most_common(1)[0][0]
    for index, listener in enumerate(ctx.config.listener):
        if listener.name == name:
            return ctx.loaded.source.where("listener", index, "relay")
    return None


def _fix(ctx: Context, source: QueueSource, where: str | None) -> str:
    steps = [
        command(ctx, "queue", "summary", "--by", source.kind) + " to see who fills the queue",
        command(ctx, "queue", "hold", source.option, source.key, "--yes"),
        "review with " + command(ctx, "queue", "list", source.option, source.key),
        "delete the spam with " + command(ctx, "queue", "delete", source.option, source.key, "--yes"),
    ]
    if source.kind == "user":
        steps.append(f"if the account is compromised: {command(ctx, 'user', 'suspend-relay', source.key)} "
                     f"and {command(ctx, 'user', 'passwd', source.key)}")
    else:
        steps.append(f"if {source.key} should not relay, remove it from the relay list"
                     + (f" ({where})" if where else ""))
    return "; ".join(steps)


def _findings(ctx: Context, sources: dict[tuple[str, str], QueueSource], total: int) -> list[Finding]:
    findings = []
    for source in sorted(sources.values(), key=lambda s: (-s.messages, s.kind, s.key)):
        signals = _signals(source, ctx, total)
        if not signals:
            continue
        level = Level.FAIL if len(signals) >= 2 else Level.WARN
        where = _where(ctx, source)
        fix = _fix(ctx, source, where)
        also = sorted(signals)
        for check, (title, evidence) in signals.items():
            others = [c.removeprefix("queue-spam.") for c in also if c != check]
            if others:
                evidence = [*evidence, f"the same source also shows: {', '.join(others)}"]
            findings.append(Finding(check, level, title, SECTION_QUEUE, tuple(evidence), fix, where))
    return findings


def _ok(ops: QueueOps, ctx: Context, total: int) -> Finding:
    if not total:
        return Finding("queue-spam", Level.OK, "the queue is empty", SECTION_QUEUE)
    shape = ops.summary(QueueFilter(states=ACTIVE_STATES), by="domain", top=3)
    evidence = [f"{total} messages, {shape.total.total} recipients waiting",
                "largest destinations: " + ", ".join(f"{r.key} ({r.total})" for r in shape.rows)]
    return Finding("queue-spam", Level.OK, "nothing in the queue looks like spam", SECTION_QUEUE,
                   tuple(evidence))


def _examine(ctx: Context) -> list[Finding]:
    try:
        ops = QueueOps.open(ctx.data_dir)
    except FileNotFoundError:
        return [Finding("queue-spam", Level.SKIP, "no queue to examine", SECTION_QUEUE,
                        (f"{ctx.queue_path} does not exist",),
                        "run the doctor with the server's --data-dir")]
    with ops:
        sources, total, examined = queue_sources(ops, ctx)
        findings = _findings(ctx, sources, total)
        if examined < total:
            note = f"only the oldest {examined} of {total} messages were examined one by one"
            findings = [Finding(f.check, f.level, f.title, f.section, (*f.evidence, note), f.fix, f.where)
                        for f in findings]
        return findings or [_ok(ops, ctx, total)]


async def check_queue_spam(ctx: Context) -> list[Finding]:
    return await asyncio.to_thread(_examine, ctx)


CHECKS = [("queue-spam", check_queue_spam)]
