"""Doctor check ``accounts``: relay from a compromised account (KB 895853, second section).

Owns the per-account sending facts and the findings drawn from them.  ``account_activity(ctx)``
reads the event log (1708 AUTH_SUCCEEDED, 1711 AUTH_FAILED, 1721 RECIPIENT_ACCEPTED with verdict
``relay``, 3001 MESSAGE_QUEUED) and the queue, and returns per account what it relayed in the
recent window (``doctor.window_hours``) against its own history (``doctor.baseline_days`` before
the window, as a mean per window): recipients, distinct external domains, distinct client
addresses; and each successful login with the failed logins for that account just before it.
The web console shows the same ``Activity`` objects.

The findings:

* ``accounts.burst``: recent relaying above ``burst_factor`` x the account's baseline in any of
  the three measures, with at least ``min_recipients`` recipients.  A failure; a warning when the
  event log holds no history to compare with.
* ``accounts.guessed-password``: a login that succeeded after ``failed_logins`` or more failures
  for that account (from any addresses) within one window before it.  A failure; a warning when
  the failures and the success all came from one address the account already used (a client
  with a stale password, most likely).
* ``accounts.guest``: an account that can log in and relay whose name is guest-like (guest, test,
  admin, info, user, demo, scanner...).  A warning.

A mailbox without a password cannot authenticate (``users.verify_password`` refuses a missing
hash), so it cannot relay through AUTH whatever its relay right says: it is not flagged.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..directory import MailboxEntry, lookup_key
from ..events import EventId
from .model import SECTION_ACCOUNTS, Context, Finding, Level

__all__ = [
    "Activity",
    "Baseline",
    "CHECKS",
    "GUEST_NAME",
    "LoginRun",
    "Usage",
    "account_activity",
    "check_accounts",
    "command",
    "is_guest_name",
]

# Local parts that scanners guess first and that administrators create "for a quick test".
GUEST_NAME = re.compile(
    r"(guest|gast|test|tester|testing|admin|administrator|root|info|user|demo|scanner|scan|"
    r"temp|tmp|default|anonymous|noreply|no-reply)[-_.]?\d*", re.IGNORECASE)

ACTIVE_STATES = ("active", "deferred", "hold")
_EVENT_IDS = {int(EventId.SERVER_STARTED), int(EventId.AUTH_SUCCEEDED), int(EventId.AUTH_FAILED),
              int(EventId.RECIPIENT_ACCEPTED), int(EventId.MESSAGE_QUEUED)}
_SHOWN = 5          # evidence lines listing addresses or domains


def is_guest_name(address: str) -> bool:
    """Whether the local part of ``address`` is a guest-like name (guest, test1, admin...)."""
    return GUEST_NAME.fullmatch(address.rpartition("@")[0]) is not None


def command(ctx: Context, *args: str) -> str:
    """A ``relaywarden`` command line as the administrator types it, with ``--data-dir`` when
    the doctor looked at another data directory than the commands would by default, and
    ``--config`` for the user commands when it read a configuration file."""
    words = ["relaywarden", *args]
    if (args[:1] == ("user",) and args[1:2] != ("delete",) and not ctx.loaded.file.startswith("<")
            and Path(ctx.loaded.file).is_file()):
        words += ["--config", ctx.loaded.file]    # the user commands check the configuration's mailboxes
    default = Path(os.environ.get("RELAYWARDEN_DATA") or "relaywarden-data")
    if default.resolve() != Path(ctx.data_dir).resolve():
        words += ["--data-dir", str(ctx.data_dir)]
    return shlex.join(words)


# ------------------------------------------------------------------------------ the facts


@dataclass
class Usage:
    """What one account relayed in one period."""

    recipients: int = 0                               # relayed recipients (1721, verdict relay)
    domains: set[str] = field(default_factory=set)    # their distinct domains (all external)
    clients: set[str] = field(default_factory=set)    # addresses it logged in or relayed from
    messages: int = 0                                 # messages queued (3001)

    def as_dict(self) -> dict[str, Any]:
        return {"recipients": self.recipients, "domains": len(self.domains),
                "clients": sorted(self.clients), "messages": self.messages}


@dataclass(frozen=True)
class Baseline:
    """An account's history as a mean per window; ``windows`` is how many windows of history the
    event log covers (0: none, so there is nothing to compare with)."""

    windows: float = 0.0
    recipients: float = 0.0
    domains: float = 0.0
    clients: float = 0.0
    messages: float = 0.0
    known_clients: frozenset[str] = frozenset()       # every address seen in the history

    def as_dict(self) -> dict[str, Any]:
        return {"windows": round(self.windows, 2), "recipients": round(self.recipients, 2),
                "domains": round(self.domains, 2), "clients": round(self.clients, 2),
                "messages": round(self.messages, 2), "known_clients": sorted(self.known_clients)}


@dataclass(frozen=True)
class LoginRun:
    """A successful login and the failed logins for the same account shortly before it."""

    at: float
    client: str
    failures: int
    failure_clients: tuple[tuple[str, int], ...]      # (address, failures), most first
    first_failure_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"at": _iso(self.at), "client": self.client, "failures": self.failures,
                "failure_clients": [{"client": c, "failures": n} for c, n in self.failure_clients],
                "first_failure_at": _iso(self.first_failure_at)}


@dataclass
class Activity:
    """Everything the doctor knows about one account's recent sending and logins."""

    user: str
    entry: MailboxEntry | None = None                 # None: not (or no longer) a mailbox
    recent: Usage = field(default_factory=Usage)
    baseline: Baseline = field(default_factory=Baseline)
    logins: int = 0                                   # successful logins in the window
    failed_logins: int = 0                            # failed logins in the window
    login_runs: list[LoginRun] = field(default_factory=list)   # recent successes after failures
    queued_messages: int = 0                          # its messages in the queue now
    held_messages: int = 0

    def exceeded(self, factor: float) -> list[str]:
        """The measures (recipients, domains, clients) above ``factor`` x the baseline."""
        pairs = (("recipients", self.recent.recipients, self.baseline.recipients),
                 ("domains", len(self.recent.domains), self.baseline.domains),
                 ("clients", len(self.recent.clients), self.baseline.clients))
        return [name for name, now, usual in pairs if now > factor * usual]

    def as_dict(self) -> dict[str, Any]:
        return {"user": self.user, "mailbox": self.entry.address if self.entry else None,
                "relay_right": self.entry.relay if self.entry else None,
                "recent": self.recent.as_dict(), "baseline": self.baseline.as_dict(),
                "logins": self.logins, "failed_logins": self.failed_logins,
                "login_runs": [r.as_dict() for r in self.login_runs],
                "queued_messages": self.queued_messages, "held_messages": self.held_messages}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _time(record: dict) -> float | None:
    try:
        return datetime.fromisoformat(record["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class _Reading:
    """Events of one account, before they are summed up."""

    relays: list[tuple[float, str, str]] = field(default_factory=list)    # time, domain, client
    queued: list[float] = field(default_factory=list)
    auth: list[tuple[float, bool, str]] = field(default_factory=list)     # time, success, client


def _read_log(ctx: Context, since: float) -> tuple[dict[str, _Reading], float | None]:
    """Per account key, its relays, queued messages and logins since ``since``; and the time of
    the oldest record read (where the log's memory begins)."""
    readings: dict[str, _Reading] = {}
    oldest: float | None = None
    for record in ctx.events(_EVENT_IDS, since=since):
        moment = _time(record)
        if moment is None:
            continue
        oldest = moment if oldest is None else min(oldest, moment)
        user = record.get("user")
        if not isinstance(user, str) or not user:
            continue
        event, fields = record.get("id"), record.get("fields") or {}
        client = str(record.get("client") or "")
        reading = readings.setdefault(lookup_key(user), _Reading())
        if event == EventId.RECIPIENT_ACCEPTED and fields.get("verdict") == "relay":
            domain = str(fields.get("recipient") or "").rpartition("@")[2].lower()
            reading.relays.append((moment, domain, client))
        elif event == EventId.MESSAGE_QUEUED:
            reading.queued.append(moment)
        elif event in (EventId.AUTH_SUCCEEDED, EventId.AUTH_FAILED):
            reading.auth.append((moment, event == EventId.AUTH_SUCCEEDED, client))
    return readings, oldest


def _usage(reading: _Reading, start: float, end: float) -> Usage:
    usage = Usage()
    for moment, domain, client in reading.relays:
        if start <= moment < end:
            usage.recipients += 1
            usage.domains.add(domain)
            usage.clients.add(client)
    for moment, ok, client in reading.auth:
        if ok and start <= moment < end:
            usage.clients.add(client)
    usage.messages = sum(1 for moment in reading.queued if start <= moment < end)
    usage.clients.discard("")
    return usage


def _baseline(reading: _Reading, start: float, end: float, window: float) -> Baseline:
    """Means per window over [start, end), history cut into windows counted back from ``end``."""
    span = end - start
    if span < window:
        return Baseline()
    windows = span / window
    buckets: dict[int, Usage] = {}
    whole = _usage(reading, start, end)
    for moment, domain, client in reading.relays:
        if start <= moment < end:
            bucket = buckets.setdefault(int((end - moment) // window), Usage())
            bucket.domains.add(domain)
            bucket.clients.add(client)
    for moment, ok, client in reading.auth:
        if ok and start <= moment < end:
            buckets.setdefault(int((end - moment) // window), Usage()).clients.add(client)
    for bucket in buckets.values():
        bucket.clients.discard("")
    return Baseline(windows=windows, recipients=whole.recipients / windows,
                    domains=sum(len(b.domains) for b in buckets.values()) / windows,
                    clients=sum(len(b.clients) for b in buckets.values()) / windows,
                    messages=whole.messages / windows, known_clients=frozenset(whole.clients))


def _login_runs(reading: _Reading, start: float, end: float, lookback: float) -> list[LoginRun]:
    """Successful logins in [start, end) after at least one failure for the same account, the
    failures counted since the previous success and at most ``lookback`` seconds before."""
    runs: list[LoginRun] = []
    failures: list[tuple[float, str]] = []
    for moment, ok, client in sorted(reading.auth):
        if not ok:
            failures.append((moment, client))
            continue
        recent = [(t, c) for t, c in failures if t >= moment - lookback]
        if recent and start <= moment < end:
            by_client = Counter(c for _, c in recent).most_common()
            runs.append(LoginRun(moment, client, len(recent), tuple(by_client), recent[0][0]))
        failures = []
    return runs


def _queue_counts(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Messages per authenticated user in the queue, and of those the held ones."""
    from ..queue.ops import QueueFilter, QueueOps

    try:
        ops = QueueOps.open(data_dir)
    except FileNotFoundError:
        return {}, {}
    with ops:
        queued = ops.summary(QueueFilter(states=ACTIVE_STATES), by="user")
        held = ops.summary(QueueFilter(states=("hold",)), by="user")
    return ({lookup_key(r.key): r.total for r in queued.rows if r.key},
            {lookup_key(r.key): r.total for r in held.rows if r.key})


def account_activity(ctx: Context) -> dict[str, Activity]:
    """Every account that logged in, relayed or has mail in the queue, by its login address.

    Reads the event log and the queue (blocking: run it in a thread from async code).  Accounts
    seen only in failed logins for names that are not mailboxes are left out."""
    doctor = ctx.config.doctor
    window = doctor.window_hours * 3600.0
    window_start = ctx.now - window
    baseline_start = window_start - doctor.baseline_days * 86400.0
    readings, oldest = _read_log(ctx, min(baseline_start, window_start - window))
    history_start = baseline_start if oldest is None else max(baseline_start, oldest)
    queued, held = _queue_counts(ctx.data_dir)
    out: dict[str, Activity] = {}
    for key in sorted(set(readings) | set(queued)):
        reading = readings.get(key, _Reading())
        entry = ctx.directory.login(key)
        recent = _usage(reading, window_start, ctx.now + 1.0)
        if entry is None and not recent.recipients and key not in queued:
            continue
        activity = Activity(
            user=entry.address if entry else key, entry=entry, recent=recent,
            baseline=_baseline(reading, history_start, window_start, window),
            logins=sum(1 for t, ok, _ in reading.auth if ok and t >= window_start),
            failed_logins=sum(1 for t, ok, _ in reading.auth if not ok and t >= window_start),
            login_runs=_login_runs(reading, window_start, ctx.now + 1.0, window),
            queued_messages=queued.get(key, 0), held_messages=held.get(key, 0))
        out[activity.user] = activity
    return out


# ------------------------------------------------------------------------------ the findings


def _fix_compromised(ctx: Context, user: str) -> str:
    return "; ".join((
        command(ctx, "user", "suspend-relay", user),
        command(ctx, "user", "passwd", user),
        command(ctx, "queue", "hold", "--user", user, "--yes"),
        "then review its mail with " + command(ctx, "queue", "list", "--user", user)
        + " and delete the spam with " + command(ctx, "queue", "delete", "--user", user, "--yes"),
    ))


def _hours(ctx: Context) -> str:
    hours = ctx.config.doctor.window_hours
    return f"{hours:g} h"


def _burst_finding(ctx: Context, a: Activity) -> Finding | None:
    doctor = ctx.config.doctor
    if a.recent.recipients < doctor.min_recipients:
        return None
    over = a.exceeded(doctor.burst_factor)
    if not over:
        return None
    b, r = a.baseline, a.recent
    history = b.windows >= 1
    evidence = [
        f"last {_hours(ctx)}: {r.recipients} relayed recipients, {len(r.domains)} external domains, "
        f"{len(r.clients)} client addresses, {r.messages} messages",
        (f"usual per {_hours(ctx)} over the last {b.windows:.1f} windows: {b.recipients:.1f} recipients, "
         f"{b.domains:.1f} domains, {b.clients:.1f} client addresses" if history else
         "the event log holds no history before this window to compare with"),
    ]
    if history:
        evidence.append(f"above {doctor.burst_factor:g}x the usual: {', '.join(over)}")
    if r.domains:
        evidence.append("domains: " + ", ".join(sorted(r.domains)[:_SHOWN])
                        + (f" and {len(r.domains) - _SHOWN} more" if len(r.domains) > _SHOWN else ""))
    if r.clients:
        evidence.append("from: " + ", ".join(sorted(r.clients)[:_SHOWN]))
    if a.queued_messages:
        evidence.append(f"{a.queued_messages} of its messages are in the queue"
                        + (f" ({a.held_messages} held)" if a.held_messages else ""))
    return Finding("accounts.burst", Level.FAIL if history else Level.WARN,
                   f"account {a.user} relayed far more than usual: it may be compromised",
                   SECTION_ACCOUNTS, tuple(evidence), _fix_compromised(ctx, a.user),
                   a.entry.source if a.entry else None)


def _login_finding(ctx: Context, a: Activity) -> Finding | None:
    threshold = ctx.config.doctor.failed_logins
    runs = [run for run in a.login_runs if run.failures >= threshold]
    if not runs:
        return None
    evidence = []
    own_client_only = True
    for run in runs[:_SHOWN]:
        clients = ", ".join(f"{c} x{n}" for c, n in run.failure_clients[:_SHOWN])
        more = len(run.failure_clients) - _SHOWN
        evidence.append(f"{_iso(run.at)}: login from {run.client} after {run.failures} failed logins "
                        f"since {_iso(run.first_failure_at)} from {len(run.failure_clients)} "
                        f"address(es): {clients}" + (f" and {more} more" if more > 0 else ""))
        same = {c for c, _ in run.failure_clients} == {run.client}
        own_client_only &= same and run.client in a.baseline.known_clients
    level = Level.WARN if own_client_only else Level.FAIL
    if own_client_only:
        evidence.append("every failure came from the address that then logged in, which the account "
                        "used before: most likely a client with an old password")
    if a.recent.recipients:
        evidence.append(f"it relayed {a.recent.recipients} recipients in the last {_hours(ctx)}")
    return Finding("accounts.guessed-password", level,
                   f"account {a.user} logged in after {runs[0].failures} failed logins: "
                   "its password may have been guessed",
                   SECTION_ACCOUNTS, tuple(evidence), _fix_compromised(ctx, a.user),
                   a.entry.source if a.entry else None)


def _relay_listeners(ctx: Context) -> list[str]:
    return [l.name for l in ctx.config.listener if l.allow_authenticated and l.auth]


def _guest_findings(ctx: Context) -> list[Finding]:
    listeners = _relay_listeners(ctx)
    if not listeners:
        return []
    out = []
    for entry in ctx.directory:
        if not (entry.enabled and entry.password_hash and entry.relay and is_guest_name(entry.address)):
            continue
        fix = (f"{command(ctx, 'user', 'suspend-relay', entry.address)} if it has no reason to send "
               f"outside, or {command(ctx, 'user', 'disable', entry.address)} if nobody uses it; "
               f"else give it a strong password: {command(ctx, 'user', 'passwd', entry.address)}")
        out.append(Finding(
            "accounts.guest", Level.WARN,
            f"guest-like account {entry.address} can log in and relay",
            SECTION_ACCOUNTS,
            (f"{entry.address} has a password, is enabled and has the relay right "
             f"(defined at {entry.source})",
             f"listeners that let authenticated users relay: {', '.join(listeners)}",
             "names like guest, test, admin, info, user, demo or scanner are the first ones "
             "password guessers try"),
            fix, entry.source or None))
    return out


def _ok_finding(ctx: Context, activities: dict[str, Activity]) -> Finding:
    can_login = [e for e in ctx.directory if e.enabled and e.password_hash]
    no_password = [e for e in ctx.directory if not e.password_hash]
    senders = sorted((a for a in activities.values() if a.recent.recipients),
                     key=lambda a: -a.recent.recipients)
    evidence = [f"{len(can_login)} accounts can log in; {len(senders)} relayed in the last {_hours(ctx)}"]
    for a in senders[:3]:
        evidence.append(f"{a.user}: {a.recent.recipients} recipients, {len(a.recent.domains)} domains "
                        f"(usual {a.baseline.recipients:.1f} and {a.baseline.domains:.1f})")
    if no_password:
        evidence.append(f"{len(no_password)} mailboxes have no password: they cannot authenticate, "
                        "so they cannot relay")
    return Finding("accounts", Level.OK, "no account relays unusually, no guessed password, "
                   "no guest-like account with the relay right", SECTION_ACCOUNTS, tuple(evidence))


async def check_accounts(ctx: Context) -> list[Finding]:
    findings = _guest_findings(ctx)
    if not ctx.log_dir.exists():
        findings.append(Finding("accounts.activity", Level.SKIP,
                                "no event log: recent sending and logins cannot be checked",
                                SECTION_ACCOUNTS, (f"{ctx.log_dir} does not exist",),
                                "run the doctor with the server's --data-dir"))
        return findings
    activities = await asyncio.to_thread(account_activity, ctx)
    for activity in activities.values():
        for finding in (_burst_finding(ctx, activity), _login_finding(ctx, activity)):
            if finding is not None:
                findings.append(finding)
    if not findings:
        findings.append(_ok_finding(ctx, activities))
    return findings


CHECKS = [("accounts", check_accounts)]
