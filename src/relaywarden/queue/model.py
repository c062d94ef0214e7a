"""Queue records and the narrow queue interface (no I/O).

This module owns what goes into the queue (``MessageIn``, ``RecipientIn``), what comes out of it
(``QueuedMessage``, ``QueuedRecipient``), the outcome of one delivery attempt
(``DeliveryResult``), the two errors the SMTP server maps to replies (``QueueFull`` -> 452 4.3.1,
``QueueError`` -> 451 4.3.0) and the abstract ``QueueBackend`` that the SQLite store implements
today and a PostgreSQL store may implement later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Self

VERDICTS = ("local", "forward", "relay")
BODY_TYPES = ("7BIT", "8BITMIME", "BINARYMIME")
DSN_RETS = ("FULL", "HDRS")
NOTIFY_KEYWORDS = ("NEVER", "SUCCESS", "FAILURE", "DELAY")

PENDING = "pending"  # not tried yet
DEFERRED = "deferred"  # tried, temporary failure, will be retried at next_attempt_at
DELIVERED = "delivered"  # final: accepted by the next hop or the local mailbox
FAILED = "failed"  # final: permanent failure or retries exhausted; an NDR is due
RECIPIENT_STATES = (PENDING, DEFERRED, DELIVERED, FAILED)
ACTIVE_STATES = (PENDING, DEFERRED)


class QueueFull(Exception):
    """The disk or the database is full; the SMTP server answers 452 4.3.1."""


class QueueError(Exception):
    """Any other failure to queue or update a message; the SMTP server answers 451 4.3.0."""


@dataclass(frozen=True, slots=True)
class RecipientIn:
    """One accepted RCPT TO, with the relay decision that accepted it."""

    address: str  # the normalised recipient address
    original: str  # as the client wrote it
    orcpt: str | None  # DSN ORCPT "rfc822;..." as given (decoded)
    notify: tuple[str, ...]  # DSN NOTIFY: () when absent, ("NEVER",) or SUCCESS/FAILURE/DELAY
    verdict: str  # "local" | "forward" | "relay"
    route: str | None  # route name / next hop decided, None for local delivery
    decision_id: str  # id of the relay decision (hex)


@dataclass(frozen=True, slots=True)
class MessageIn:
    """A whole transaction as the SMTP server received it, ready to be queued."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[RecipientIn, ...]
    data: bytes  # CRLF line ends, Received header prepended, not dot-stuffed
    received_at: float  # unix time
    listener: str
    client_address: str  # the real client (after PROXY protocol)
    client_port: int
    helo: str
    auth_user: str | None
    tls: str | None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384", None when plaintext
    body_type: str  # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool
    dsn_ret: str | None  # "FULL" | "HDRS" | None
    dsn_envid: str | None
    session_id: str


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The whole outcome of one delivery attempt to one recipient, kept for the DSN.

    ``reply_code`` is None when there was no SMTP reply at all (connection refused, DNS
    failure, timeout); ``command`` is the SMTP command the reply answered ("RCPT", "DATA",
    "CONNECT", ...). A 2xx ``reply_code`` means delivered.
    """

    reply_code: int | None
    enhanced_code: str | None  # RFC 3463, e.g. "5.7.1"
    remote_host: str | None  # host name of the next hop, None for local delivery
    remote_address: str | None  # IP address actually connected to
    remote_text: str  # the remote reply text, or our own description of the failure
    command: str | None
    permanent: bool

    @property
    def delivered(self) -> bool:
        return self.reply_code is not None and 200 <= self.reply_code < 300


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One recipient of a queued message and where its delivery stands."""

    id: int
    address: str
    original: str
    orcpt: str | None
    notify: tuple[str, ...]
    verdict: str
    route: str | None
    decision_id: str
    state: str  # "pending" | "deferred" | "delivered" | "failed"
    attempts: int
    next_attempt_at: float | None  # None once the state is final
    last_attempt_at: float | None
    last_result: DeliveryResult | None  # None before the first attempt
    delay_warned: bool = False  # a delay DSN went out for this recipient

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A queued message without its body (read the body with ``message_data``)."""

    id: str
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    received_at: float
    listener: str
    client_address: str
    client_port: int
    helo: str
    auth_user: str | None
    tls: str | None
    body_type: str
    smtputf8: bool
    dsn_ret: str | None
    dsn_envid: str | None
    session_id: str
    size: int  # length of the body in bytes
    hold: bool  # held by the operator: not delivered until released

    def count_in(self, state: str) -> int:
        return sum(1 for r in self.recipients if r.state == state)

    @property
    def state(self) -> str:
        """Summary: "held", "active" (something left to deliver) or "done" (all final)."""
        if self.hold:
            return "held"
        if any(r.state in ACTIVE_STATES for r in self.recipients):
            return "active"
        return "done"

    @property
    def next_attempt_at(self) -> float | None:
        times = [r.next_attempt_at for r in self.recipients if r.next_attempt_at is not None]
        return min(times) if times else None


class QueueBackend(ABC):
    """The queue as the rest of relaywarden sees it.

    Writes (``submit``, ``record_attempt``, ``set_hold``, ``delete``) are durable when they
    return or when their future resolves. The boolean results of the operator writes say
    whether the message (or recipient) existed.
    """

    @abstractmethod
    def submit(self, msg: MessageIn) -> concurrent.futures.Future[str]:
        """Queue a message; the future resolves to its queue id once it is durable."""

    async def submit_async(self, msg: MessageIn) -> str:
        return await asyncio.wrap_future(self.submit(msg))

    @abstractmethod
    def get(self, queue_id: str) -> QueuedMessage | None: ...

    @abstractmethod
    def recipients(self, queue_id: str) -> list[QueuedRecipient]: ...

    @abstractmethod
    def message_data(self, queue_id: str) -> bytes | None: ...

    @abstractmethod
    def count(self) -> int: ...

    @abstractmethod
    def due(self, now: float, limit: int) -> list[tuple[str, list[QueuedRecipient]]]:
        """Up to ``limit`` messages, not held, with recipients pending or deferred whose
        ``next_attempt_at <= now``, earliest first, each with those recipients only."""

    @abstractmethod
    def record_attempt(
        self,
        queue_id: str,
        recipient_id: int,
        result: DeliveryResult,
        *,
        next_attempt_at: float | None,
    ) -> bool:
        """Store a delivery attempt: delivered (2xx), failed (permanent, or no next attempt)
        or deferred until ``next_attempt_at``. False when the recipient no longer exists."""

    @abstractmethod
    def set_hold(self, queue_id: str, hold: bool) -> bool: ...

    @abstractmethod
    def delete(self, queue_id: str) -> bool: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
