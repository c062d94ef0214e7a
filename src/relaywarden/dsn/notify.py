"""Turning an NDR into a queued message: who it goes to, how it is routed, and its 4001 events.

This module owns the part that the queue runner (NDRs at the end of delivery, delay notices) and
the operator's ``queue bounce`` share: build the RFC 3464 report with ``build_ndr``, address it
to the envelope sender with the null sender as its own reverse-path, decide whether it is
delivered to a local mailbox or relayed on the sender domain's route, and, once it is queued,
log one NDR_GENERATED (4001) event per reported recipient. Queuing it is the caller's business
(the runner awaits the queue's future, the operator tool writes it in the same transaction that
removes the original).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config.loader import LoadedConfig
from ..directory import Directory
from ..events import EventId
from ..policy.relay import route_for
from ..queue.model import MessageIn, QueuedMessage, QueuedRecipient, RecipientIn
from .build import Action, build_ndr, cause_for

__all__ = ["Notice", "build_notice", "log_notice"]

Emit = Callable[..., object]


@dataclass(frozen=True, slots=True)
class Notice:
    """An NDR or delay notice ready to be queued, and what it reports."""

    message: MessageIn
    original_id: str
    sent_to: str
    action: Action
    reported: tuple[QueuedRecipient, ...]


def build_notice(*, loaded: LoadedConfig, directory: Directory, hostname: str,
                 message: QueuedMessage, original: bytes,
                 failed: Sequence[QueuedRecipient], delayed: Sequence[QueuedRecipient] = (),
                 action: Action = "failed", now: float,
                 will_retry_until: float | None = None,
                 succeeded: Sequence[QueuedRecipient] = ()) -> Notice | None:
    """The notice for ``message`` as a message to queue, or None when none is due (null
    sender, or no reported recipient asked for this kind of notice)."""
    data = build_ndr(reporting_mta=hostname, message=message, original=original, failed=failed,
                     delayed=delayed, action=action, arrival=message.received_at, now=now,
                     postmaster=f"postmaster@{hostname}", will_retry_until=will_retry_until,
                     succeeded=succeeded)
    if data is None:
        return None
    to = message.sender
    entry = directory.find(to)
    domain = to.rpartition("@")[2].lower()
    verdict, route = ("local", entry.address) if entry else ("relay", route_for(loaded, domain))
    recipient = RecipientIn(address=to, original=f"<{to}>", orcpt=None, notify=("NEVER",),
                            verdict=verdict, route=route, decision_id=f"ndr-{message.id[:12]}")
    queued = MessageIn(
        sender="", recipients=(recipient,), data=data, received_at=now, listener="-",
        client_address="127.0.0.1", client_port=0, helo=hostname, auth_user=None, tls=None,
        body_type="8BITMIME", smtputf8=message.smtputf8, dsn_ret=None, dsn_envid=None,
        session_id=f"ndr-{message.id}")
    return Notice(queued, message.id, to, action, tuple(failed or delayed or succeeded))


def log_notice(emit: Emit, notice: Notice, notice_id: str) -> None:
    """One NDR_GENERATED event per reported recipient, naming the queued notice."""
    what = {"failed": "NDR", "delayed": "delay notice"}.get(notice.action, "success report")
    for r in notice.reported:
        res = r.last_result
        cause = cause_for(r, notice.action)
        code = " ".join(str(x) for x in ((res.reply_code, res.enhanced_code) if res else ()) if x)
        emit(EventId.NDR_GENERATED, message_id=notice.original_id, text=(
            f"{what} {notice_id} to <{notice.sent_to}> for <{r.address}>: "
            f"{code} {res.remote_text if res else ''} — {cause.label}. Fix: {cause.fix}"),
            recipient=r.address, status=cause.status, cause=cause.key, ndr=notice_id,
            action=notice.action, sent_to=notice.sent_to)
