"""The queue runner: takes due mail from the queue, delivers it, records every result, and bounces.

For each due message it groups the pending recipients by next hop — local mailboxes (Maildir),
or a route and destination domain — and for each group tries the route's hosts in order (MX
preference, or the smarthost list), every address of a host in turn, until one host takes a
transaction.  Every result (reply code, enhanced code, remote host and address, remote text, the
command it answered) goes to the queue the moment it is known, so a restart never repeats a
delivery that was already confirmed.

Temporary failures are retried with a doubling backoff (``delivery.min_backoff`` up to
``delivery.max_backoff``) until ``delivery.max_lifetime``, then fail with 5.4.7.  When every
recipient of a message is final, the failed ones are reported to the sender in one NDR (RFC 3464,
never to ``<>``), which is queued like any other message, and the message leaves the queue.
A delay notice goes out once per recipient after ``delivery.delay_warning``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .. import status
from ..config.loader import LoadedConfig
from ..config.schema import Delivery
from ..directory import Directory
from ..dsn.notify import build_notice, log_notice
from ..events import EventId
from ..queue.model import DeliveryResult, MessageIn, QueuedMessage, QueuedRecipient, QueueError, QueueFull
from ..queue.store import SqliteQueue
from .maildir import MaildirError, deliver_local
from .mx import NextHopError
from .routes import RouteChoice, hops_for, resolve_route
from .smtp_client import OutRcpt, SessionPool, Timeouts

_QUEUE_ID = re.compile(r"[0-9a-f]{24}")     # what QueueIdGenerator makes

Emit = Callable[..., object]


@dataclass(frozen=True, slots=True)
class _Group:
    """Recipients that leave through one next hop."""

    kind: str                       # "local" or "remote"
    key: tuple                      # concurrency key: ("local",) or (route name, domain)
    domain: str
    route: RouteChoice | None
    recipients: tuple[QueuedRecipient, ...]


class QueueRunner:
    def __init__(self, *, loaded: LoadedConfig, queue: SqliteQueue, directory: Callable[[], Directory],
                 emit: Emit, resolver, data_dir: Path, hostname: str):
        self.loaded = loaded
        self.cfg: Delivery = loaded.config.delivery
        self.queue = queue
        self.directory = directory
        self.emit = emit
        self.resolver = resolver
        self.hostname = hostname
        self.helo = self.cfg.helo_name or hostname
        self.mail_root = Path(self.cfg.mailbox_root) if self.cfg.mailbox_root else Path(data_dir) / "mail"
        self.pool = SessionPool(max_idle_per_destination=self.cfg.max_per_destination,
                                max_idle=self.cfg.max_concurrency)
        self.timeouts = Timeouts(connect=self.cfg.connect_timeout, command=self.cfg.command_timeout,
                                 data=max(self.cfg.command_timeout, 600.0))
        self._total = asyncio.Semaphore(self.cfg.max_concurrency)
        self._per_dest: dict[tuple, asyncio.Semaphore] = {}
        self._dest_users: dict[tuple, int] = {}
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        # mail was left for a scan because the runner was full: a freed slot should look for it
        self._backlog = False
        self._routes: dict[str, RouteChoice] = {}       # destination domain -> its route
        # longer than any one delivery can take: every host of a route tried with its timeouts
        self.lease_seconds = 4 * (self.cfg.connect_timeout + 2 * self.cfg.command_timeout + 600.0)
        self._stopping = False
        self._main: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.queue.release_all_leases()        # a previous run that died left its leases behind
        self._main = asyncio.ensure_future(self._loop())

    def wake(self) -> None:
        """New mail is in the queue: look now rather than at the next poll."""
        self._wake.set()

    def offer_ids(self, queue_ids: list[str]) -> None:
        """Messages another process has just committed (its doorbell): start on them at once,
        loading each with its lease, without a scan of the queue. What cannot start now (a full
        runner, an id that does not look like one) is left to a scan."""
        scan = False
        for queue_id in queue_ids:
            if queue_id in self._in_flight:
                continue                        # a scan found it first: nothing more to look for
            if (self._stopping or not _QUEUE_ID.fullmatch(queue_id)
                    or len(self._in_flight) >= self.cfg.max_concurrency * 4):
                scan = self._backlog = True
                continue
            self._start(queue_id)
        if scan or not queue_ids:
            self.wake()

    def offer(self, queue_id: str, recipient_ids: list[int] | None, msg: MessageIn) -> None:
        """A message this process has just committed: start on it at once, from memory (no
        queue scan, no read back). When the runner is busy, the next poll finds it instead."""
        if (self._stopping or queue_id in self._in_flight or len(self._in_flight) >= self.cfg.max_concurrency * 4
                or recipient_ids is None or len(recipient_ids) != len(msg.recipients)):
            # busy, or the recipients' ids could not be read back: a scan finds the message
            self._backlog = True
            self.wake()
            return
        recipients = tuple(
            QueuedRecipient(id=rid, address=r.address, original=r.original, orcpt=r.orcpt, notify=r.notify,
                            verdict=r.verdict, route=r.route, decision_id=r.decision_id, state="pending",
                            attempts=0, next_attempt_at=msg.received_at, last_attempt_at=None, last_result=None)
            for rid, r in zip(recipient_ids, msg.recipients))
        message = QueuedMessage(
            id=queue_id, sender=msg.sender, recipients=recipients, received_at=msg.received_at,
            listener=msg.listener, client_address=msg.client_address, client_port=msg.client_port,
            helo=msg.helo, auth_user=msg.auth_user, tls=msg.tls, body_type=msg.body_type,
            smtputf8=msg.smtputf8, dsn_ret=msg.dsn_ret, dsn_envid=msg.dsn_envid, session_id=msg.session_id,
            size=len(msg.data), hold=False)
        self._start(queue_id, (message, msg.data))

    async def close(self, grace: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        await self.pool.close()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()          # before the scan: a wake during it means "look again"
            try:
                await self.run_once()
            except Exception as exc:   # keep running: the next poll tries again
                self.emit(EventId.QUEUE_ERROR, text=f"queue runner: {type(exc).__name__}: {exc}",
                          operation="scan", error=str(exc))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_interval)

    async def run_once(self) -> int:
        """Start deliveries for everything due now; returns how many messages were started."""
        room = self.cfg.max_concurrency * 4 - len(self._in_flight)
        if room <= 0:
            self._backlog = True
            return 0
        self._backlog = False
        due = await asyncio.to_thread(self.queue.due, time.time(), room + len(self._in_flight))
        started = 0
        for queue_id, recipients in due:
            if queue_id in self._in_flight or not recipients:
                continue
            if len(self._in_flight) >= self.cfg.max_concurrency * 4:
                self._backlog = True            # more is due than the runner takes at once
                break
            self._start(queue_id)
            started += 1
        if started >= room:
            self._backlog = True                # every slot taken: more may be due
        return started

    def _start(self, queue_id: str, preloaded: tuple[QueuedMessage, bytes] | None = None) -> None:
        self._in_flight.add(queue_id)
        task = asyncio.ensure_future(self._deliver_message(queue_id, preloaded))
        self._tasks.add(task)
        task.add_done_callback(self._done(queue_id))

    def _done(self, queue_id: str):
        def done(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            self._in_flight.discard(queue_id)
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                self.emit(EventId.QUEUE_ERROR, message_id=queue_id,
                          text=f"delivery of {queue_id} failed internally: {type(exc).__name__}: {exc}; it stays queued",
                          operation="deliver", error=str(exc))
            if not self._stopping and self._backlog:
                self._wake.set()   # a slot is free, and mail waits for one
        return done

    # --- one message -----------------------------------------------------------------------------

    async def _deliver_message(self, queue_id: str, preloaded: tuple[QueuedMessage, bytes] | None = None) -> None:
        now = time.time()
        # The lease: operators' delete and bounce leave the message alone while it is delivered.
        if preloaded is not None:
            if not await asyncio.wrap_future(self.queue.lease_later(queue_id, now + self.lease_seconds, now)):
                return                          # held, gone, or leased
        else:
            preloaded = await asyncio.wrap_future(
                self.queue.lease_and_load_later(queue_id, now + self.lease_seconds, now))
            if preloaded is None:
                return                          # held, gone, or leased
        removed = False
        try:
            removed = await self._deliver_leased(queue_id, preloaded)
        finally:
            if not removed:     # still queued (deferred, or an error): offered again later
                await asyncio.wrap_future(self.queue.release_later(queue_id))

    async def _deliver_leased(self, queue_id: str, loaded: tuple[QueuedMessage, bytes]) -> bool:
        """Deliver what is due of a leased message; True when the message left the queue."""
        message, data = loaded
        now = time.time()
        due = [r for r in message.recipients
               if r.state in ("pending", "deferred") and (r.next_attempt_at or 0) <= now]
        if not due:
            return
        if now - message.received_at >= self.cfg.max_lifetime and all(r.attempts for r in due):
            last = DeliveryResult(None, None, None, None, "never attempted", None, False)
            pairs = [(r, _expired(r.last_result or last, self.cfg.max_lifetime)) for r in due]
            successes: list[tuple[str, list[QueuedRecipient]]] = []
        else:
            outcomes = await asyncio.gather(*(self._deliver_group(message, data, g)
                                              for g in self._groups(message, due)))
            pairs = [p for o in outcomes for p in o[0]]
            successes = [(o[1], o[2]) for o in outcomes if o[1] is not None and o[2]]
        return await self._finish(message, data, pairs, successes)

    async def _finish(self, message: QueuedMessage, data: bytes,
                      pairs: list[tuple[QueuedRecipient, DeliveryResult]],
                      successes: list[tuple[str, list[QueuedRecipient]]]) -> bool:
        """Record what happened and what follows from it, in as few queue writes as it allows;
        True when the message left the queue.

        When every recipient of the message is now delivered, one write removes the message
        (the per-recipient results would be deleted with it); otherwise each result is recorded,
        and a message whose recipients are all final is reported (NDR) and removed.
        """
        now = time.time()
        outcome: dict[int, tuple[DeliveryResult, float | None]] = {}
        for r, result in pairs:
            next_at = None
            if not result.delivered and not result.permanent:
                next_at = self._next_attempt(message, r, now)
                if next_at is None:
                    result = _expired(result, self.cfg.max_lifetime)
            outcome[r.id] = (result, next_at)
            self._event_for(message, r, result, next_at)
        # Success notices (NOTIFY=SUCCESS) and a delay notice are queued in the same transaction
        # as the bookkeeping that says they went out: a crash in between cannot send one twice.
        notices = [n for n in (self._notice(message, data, [], [], action, now, succeeded=recipients)
                               for action, recipients in successes) if n is not None]
        after = [_after(r, outcome.get(r.id), now) for r in message.recipients]
        # Bookkeeping after delivery is not fsynced on its own (durable=False): a power loss may
        # undo it, and the message is then delivered again, never lost (like Postfix's unlink).
        if all(r.state == "delivered" for r in after):
            await self._finish_write(message, notices, delete=True)
            return True
        if all(r.state in ("delivered", "failed") for r in after):
            return await self._bounce_and_remove(message, data, after, outcome, now, notices)
        delayed: list[QueuedRecipient] = []
        if self.cfg.delay_warning is not None and now - message.received_at >= self.cfg.delay_warning:
            delayed = [r for r in after if r.state == "deferred" and not r.delay_warned]
            delay = self._notice(message, data, [], delayed, "delayed", now) if delayed else None
            if delay is not None:
                notices.append(delay)
        await self._finish_write(message, notices, attempted_at=now, delay_warned=[r.id for r in delayed],
                                 results=[(rid, result, next_at) for rid, (result, next_at) in outcome.items()])
        return False

    async def _finish_write(self, message: QueuedMessage, notices: list, *, delay_warned: list[int] = (),
                            **bookkeeping) -> None:
        """``finish_later`` with the notices; when they cannot be queued (a full disk), the
        bookkeeping goes in without them: a delivered recipient must never be delivered again
        for want of room for a notice. A delay notice not sent is not marked, and is tried again
        at the next attempt; a success notice not sent is logged as lost."""
        try:
            ids = await asyncio.wrap_future(self.queue.finish_later(
                message.id, notices=[n.message for n in notices], delay_warned=delay_warned, **bookkeeping))
        except (QueueFull, QueueError) as exc:
            if not notices:
                raise
            await asyncio.wrap_future(self.queue.finish_later(message.id, **bookkeeping))
            self.emit(EventId.QUEUE_ERROR, message_id=message.id, text=(
                f"{len(notices)} notice(s) for {message.id} could not be queued ({exc}); its delivery results "
                "are recorded without them (a delay notice is tried again at the next attempt)"),
                operation="notice", error=str(exc))
            return
        self._queued_notices(notices, ids)

    def _groups(self, message: QueuedMessage, due: list[QueuedRecipient]) -> list[_Group]:
        local: list[QueuedRecipient] = []
        remote: dict[tuple, list[QueuedRecipient]] = {}
        choices: dict[tuple, tuple[str, RouteChoice]] = {}
        for r in due:
            if r.verdict == "local":
                local.append(r)
                continue
            domain = r.domain
            choice = self._routes.get(domain)
            if choice is None:
                if len(self._routes) >= 4096:
                    self._routes.clear()        # many domains: keep the table small
                choice = self._routes[domain] = resolve_route(self.loaded, domain)
            if r.route and r.route != choice.name:
                # the route the decision chose at RCPT time wins (internal-relay's own route)
                named = next((x for x in self.loaded.config.route if x.name == r.route), None)
                if named is not None:
                    choice = RouteChoice(named)
            # a smarthost route takes every domain in one transaction; MX goes per domain
            key = (choice.name, domain if choice.kind.value == "mx" else "*")
            remote.setdefault(key, []).append(r)
            choices[key] = (domain, choice)
        groups = [_Group("local", ("local",), "", None, tuple(local))] if local else []
        for key, rcpts in remote.items():
            domain, choice = choices[key]
            groups.append(_Group("remote", key, domain, choice, tuple(rcpts)))
        return groups

    @contextlib.asynccontextmanager
    async def _destination_slot(self, key: tuple):
        """One of ``max_per_destination`` slots for this next hop; a destination nobody waits
        for any more is forgotten (a flood to random domains must not grow the table)."""
        sem = self._per_dest.get(key)
        if sem is None:
            sem = self._per_dest[key] = asyncio.Semaphore(self.cfg.max_per_destination)
        self._dest_users[key] = self._dest_users.get(key, 0) + 1
        try:
            async with sem:
                yield
        finally:
            self._dest_users[key] -= 1
            if not self._dest_users[key]:
                del self._dest_users[key], self._per_dest[key]

    async def _deliver_group(self, message: QueuedMessage, data: bytes, group: _Group
                             ) -> tuple[list[tuple[QueuedRecipient, DeliveryResult]], str | None, list[QueuedRecipient]]:
        """The results of one next hop, and the success reports (NOTIFY=SUCCESS) they call for."""
        async with self._total, self._destination_slot(group.key):
            if group.kind == "local":
                results = [await self._deliver_local(message, data, r) for r in group.recipients]
                success_action = "delivered"
            else:
                results, dsn_offered = await self._deliver_remote(message, data, group)
                # a next hop that offers DSN got NOTIFY passed on and reports for itself
                success_action = None if dsn_offered else "relayed"
        pairs = list(zip(group.recipients, results))
        wanted = [replace(r, last_result=res, state="delivered") for r, res in pairs
                  if res.delivered and "SUCCESS" in (n.upper() for n in r.notify)]
        return pairs, success_action, wanted

    async def _deliver_local(self, message: QueuedMessage, data: bytes, r: QueuedRecipient) -> DeliveryResult:
        entry = self.directory().find(r.route or r.address) or self.directory().find(r.address)
        if entry is None or not entry.enabled:
            reply = status.user_unknown(r.address) if entry is None else status.mailbox_disabled(r.address)
            return DeliveryResult(reply.code, reply.enhanced, self.hostname, None, reply.text, "LOCAL", True)
        try:
            await asyncio.to_thread(deliver_local, self.mail_root, entry.address, data,
                                    return_path=message.sender, delivered_to=r.address)
        except MaildirError as exc:
            return DeliveryResult(exc.reply.code, exc.reply.enhanced, self.hostname, None,
                                  f"{exc.reply.text}: {exc.detail}", "LOCAL", exc.permanent)
        return DeliveryResult(250, "2.0.0", self.hostname, None, f"delivered to maildir of {entry.address}", "LOCAL", False)

    async def _deliver_remote(self, message: QueuedMessage, data: bytes, group: _Group) -> tuple[list[DeliveryResult], bool]:
        """One result per recipient, and whether the host that took the transaction offered DSN."""
        choice = group.route
        assert choice is not None
        try:
            hops = await hops_for(choice, group.domain, self.resolver)
        except NextHopError as exc:
            result = DeliveryResult(exc.reply.code, exc.reply.enhanced, None, None,
                                    f"{exc.reply.text} ({exc.detail})", "DNS", exc.permanent)
            return [result] * len(group.recipients), False
        password = self._password(choice)
        rcpts = [OutRcpt(r.address, r.notify, r.orcpt) for r in group.recipients]
        last: list[DeliveryResult] | None = None
        mx_port = choice.route.port if choice.route is not None and choice.kind.value == "mx" else None
        for hop in hops:
            for address in hop.addresses or (None,):
                attempt = await self.pool.deliver(
                    hop.host, mx_port or hop.port, helo=self.helo, sender=message.sender, recipients=rcpts, data=data,
                    tls=choice.tls.value, ca_file=choice.ca_file, username=choice.username, password=password,
                    envid=message.dsn_envid, ret=message.dsn_ret,
                    body="8BITMIME" if message.body_type == "8BITMIME" else None,
                    smtputf8=message.smtputf8, timeouts=self.timeouts, connect_address=address)
                last = list(attempt.results)
                if not attempt.try_next_host:
                    return last, attempt.dsn_offered
        if last is None:
            reply = status.Reply(451, "4.4.4", f"no next hop with an address for {group.domain}")
            last = [DeliveryResult(reply.code, reply.enhanced, None, None, reply.text, "CONNECT", False)] * len(group.recipients)
        return last, False

    def _password(self, choice: RouteChoice) -> str | None:
        if not choice.password_file:
            return None
        try:
            return Path(choice.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.emit(EventId.CONFIG_WARNING, text=(
                f"route {choice.name}: cannot read password_file {choice.password_file}: {exc.strerror}; "
                "delivering without authentication"), route=choice.name)
            return None

    # --- results -----------------------------------------------------------------------------------

    def _next_attempt(self, message: QueuedMessage, r: QueuedRecipient, now: float) -> float | None:
        """When to retry after a temporary failure; None when the message is past its lifetime."""
        end = message.received_at + self.cfg.max_lifetime
        if now >= end:
            return None
        wait = min(self.cfg.max_backoff, self.cfg.min_backoff * (2 ** min(r.attempts, 20)))
        return min(now + wait, end)

    def _event_for(self, message: QueuedMessage, r: QueuedRecipient, result: DeliveryResult, next_at: float | None) -> None:
        where = result.remote_host or ("local mailbox" if r.verdict == "local" else "-")
        reply = " ".join(str(x) for x in (result.reply_code, result.enhanced_code, result.remote_text) if x)
        common = dict(message_id=message.id, recipient=r.address, host=result.remote_host,
                      address=result.remote_address, command=result.command, reply=reply, attempts=r.attempts + 1)
        if result.reply_code is not None and result.reply_code >= 400 and result.remote_host and result.command != "LOCAL":
            self.emit(EventId.REMOTE_ERROR, text=(
                f"{result.remote_host} answered {result.command} for <{r.address}> with {reply}"), **common)
        if result.delivered:
            self.emit(EventId.DELIVERED, text=f"delivered {message.id} to <{r.address}> via {where}: {reply}", **common)
        elif next_at is not None:
            self.emit(EventId.DEFERRED, text=(
                f"deferred {message.id} to <{r.address}> via {where}: {reply or 'no reply'}; next attempt at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(next_at))} UTC"), next_attempt=next_at, **common)
        else:
            self.emit(EventId.DELIVERY_FAILED, text=f"delivery of {message.id} to <{r.address}> failed: {reply}", **common)

    async def _bounce_and_remove(self, message: QueuedMessage, data: bytes, after: list[QueuedRecipient],
                                 outcome: dict[int, tuple[DeliveryResult, float | None]], now: float,
                                 successes: list = ()) -> bool:
        """Every recipient is final and some failed: the NDR is queued and the message removed in
        one transaction, so a failure in between can neither lose the NDR nor leave a message
        that nothing will ever pick up again."""
        failed = [r for r in after if r.state == "failed"]
        expected = [r.id for r in message.recipients if r.state in ("pending", "deferred")]
        notice = build_notice(loaded=self.loaded, directory=self.directory(), hostname=self.hostname,
                              message=message, original=data, failed=failed, action="failed", now=now)
        try:
            done = await asyncio.wrap_future(self.queue.replace_later(
                message.id, expected, notice.message if notice else None, [n.message for n in successes]))
        except Exception as exc:
            # Keep the message: the failed recipients are tried again later (and bounced then);
            # the success notices go with the results that say whom they are for.
            retry = now + self.cfg.min_backoff
            await self._finish_write(message, list(successes), attempted_at=now, results=[
                (rid, res, None) if res.delivered else (rid, replace(res, permanent=False), retry)
                for rid, (res, _) in outcome.items()])
            self.emit(EventId.QUEUE_ERROR, message_id=message.id, text=(
                f"the NDR for {message.id} could not be queued ({exc}); its failed recipients are kept and "
                f"retried at {time.strftime('%H:%M:%S', time.gmtime(retry))} UTC"), operation="bounce", error=str(exc))
            return False
        notice_id, success_ids = done
        self._queued_notices(list(successes), success_ids)      # owed either way: they got the mail
        if notice_id is None:
            self.emit(EventId.QUEUE_ERROR, message_id=message.id, text=(
                f"{message.id} changed in the queue while it was being delivered (an operator's hold, "
                "delete, retry or bounce?); its results were not recorded"), operation="finish", error="changed")
            return False
        if notice is not None:
            self._queued_notices([notice], [notice_id])
        return True

    def _notice(self, message: QueuedMessage, data: bytes, failed, delayed, action: str, now: float,
                *, succeeded=()):
        """The DSN this attempt owes the sender (None when none is owed: NOTIFY, a null sender)."""
        return build_notice(loaded=self.loaded, directory=self.directory(), hostname=self.hostname,
                            message=message, original=data, failed=failed, delayed=delayed,
                            action=action, now=now, succeeded=succeeded,
                            will_retry_until=message.received_at + self.cfg.max_lifetime if action == "delayed" else None)

    def _queued_notices(self, notices: list, ids: list[str]) -> None:
        for notice, notice_id in zip(notices, ids):
            log_notice(self.emit, notice, notice_id)
        if notices:
            self.wake()                         # deliver them now, not at the next poll


def _after(r: QueuedRecipient, outcome: tuple[DeliveryResult, float | None] | None, now: float) -> QueuedRecipient:
    """The recipient as the queue will hold it once ``outcome`` is recorded."""
    if outcome is None:
        return r
    result, next_at = outcome
    state = "delivered" if result.delivered else "deferred" if next_at is not None else "failed"
    return replace(r, state=state, last_result=result, attempts=r.attempts + 1, next_attempt_at=next_at,
                   last_attempt_at=now)


def _expired(last: DeliveryResult, lifetime: float) -> DeliveryResult:
    """The final 5.4.7 result that keeps what the last attempt said."""
    days = lifetime / 86400
    reply = status.expired(days)
    text = reply.text + (f"; last attempt: {_describe(last)}" if last.remote_text else "")
    return replace(last, reply_code=reply.code, enhanced_code=reply.enhanced, remote_text=text, permanent=True)


def _describe(result: DeliveryResult) -> str:
    host = f"{result.remote_host}: " if result.remote_host else ""
    code = " ".join(str(x) for x in (result.reply_code, result.enhanced_code) if x)
    return f"{host}{code} {result.remote_text}".strip()
