"""The embedded durable queue: SQLite in WAL mode, one group-committing writer that fsyncs the
WAL after each commit.

This module owns the queue database file: its schema, the queue ids, the single writer thread
that gathers every waiting write into one transaction (one fsync for many messages), and the
read side, which uses its own connections and is safe while another process (an operator tool,
a second server instance) reads or writes the same file.

The operator side (``relaywarden queue``) selects messages with a ``MessageFilter`` (state,
sender, recipient, recipient domain, authenticated user, client address or network, listener,
age, attempts, last reply) and changes them in batches, each batch one write of the same writer.

A submission's future resolves only after the COMMIT of the transaction that holds it and the
fsync of the WAL that makes the commit durable (``_sync_wal``: SQLite commits with synchronous =
NORMAL, and the writer fsyncs the WAL itself, after SQLite has released its write lock). Each
write in a group runs inside its own SAVEPOINT, so one bad message fails alone; when sqlite
rolls the whole transaction back (as it may on a full disk) the writes that fitted are redone
and the rest of the group fails; a failed COMMIT fails the whole group. SQLITE_FULL (disk or
``max_pages`` reached) becomes ``QueueFull``, anything else ``QueueError``; what was committed
before is never touched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import ipaddress
import json
import os
import queue as stdlib_queue
import re
import sys
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaywarden.ids import hex_id
from relaywarden.queue.model import (
    DEFERRED,
    DELIVERED,
    FAILED,
    DeliveryResult,
    MessageIn,
    QueueBackend,
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    QueueFull,
)

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id             TEXT PRIMARY KEY,
    sender         TEXT NOT NULL,
    received_at    REAL NOT NULL,
    listener       TEXT NOT NULL,
    client_address TEXT NOT NULL,
    client_port    INTEGER NOT NULL CHECK (client_port BETWEEN 0 AND 65535),
    helo           TEXT NOT NULL,
    auth_user      TEXT,
    tls            TEXT,
    body_type      TEXT NOT NULL CHECK (body_type IN ('7BIT', '8BITMIME', 'BINARYMIME')),
    smtputf8       INTEGER NOT NULL CHECK (smtputf8 IN (0, 1)),
    dsn_ret        TEXT CHECK (dsn_ret IN ('FULL', 'HDRS')),
    dsn_envid      TEXT,
    session_id     TEXT NOT NULL,
    hold           INTEGER NOT NULL DEFAULT 0 CHECK (hold IN (0, 1)),
    lease_until    REAL,                  -- a delivery is in progress until then (the runner's lease)
    size           INTEGER NOT NULL,
    data           BLOB NOT NULL          -- last, so listing never reads the body's pages
);
CREATE TABLE IF NOT EXISTS recipient (
    id              INTEGER PRIMARY KEY,
    message_id      TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,
    address         TEXT NOT NULL,
    domain          TEXT NOT NULL,
    original        TEXT NOT NULL,
    orcpt           TEXT,
    notify          TEXT NOT NULL,        -- comma separated, '' when NOTIFY was absent
    verdict         TEXT NOT NULL CHECK (verdict IN ('local', 'forward', 'relay')),
    route           TEXT,
    decision_id     TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'deferred', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,                 -- NULL once the state is final
    last_attempt_at REAL,
    reply_code      INTEGER,
    enhanced_code   TEXT,
    remote_host     TEXT,
    remote_address  TEXT,
    remote_text     TEXT,
    remote_command  TEXT,
    permanent       INTEGER,
    delay_warned    INTEGER NOT NULL DEFAULT 0,   -- a delay DSN was sent for this recipient
    UNIQUE (message_id, position)
);
CREATE INDEX IF NOT EXISTS recipient_next_attempt ON recipient(next_attempt_at)
    WHERE state IN ('pending', 'deferred');
"""

WAL_CHECKPOINT_PAGES = 4000

# Indexes that queues made before 2026-11-29 have and that go at open. Each cost every new message
# a B-tree insert and a page in the WAL at every commit (together about a fifth of the queue's CPU
# per message: bench/queue_cpu.py --variants current,old-indexes, 199-227 -> 155-190 us with two
# processes) for little use: the operator's selections compare sender and user COLLATE NOCASE
# (these indexes are BINARY) and list messages in id order, recipients are found through
# (message_id, position), and the runner's scan (DUE_SQL) and the summary by domain (shape) read
# recipient_next_attempt, named with INDEXED BY. Only `queue ... --client ADDRESS` lost an index:
# it reads the messages in order, as it does for a network.
DROPPED_INDEXES = ("recipient_state", "recipient_domain", "message_sender", "message_auth_user",
                   "message_client_address")

# New messages in one statement: a row inserted into this view becomes a message row and its
# recipient rows (its recipients as a JSON array of [position, address, domain, original, orcpt,
# notify, verdict, route, decision_id]). One statement is one transaction that the writer thread
# runs without taking the GIL back in the middle: with several statements the write lock, shared
# by every process of the server, was held while the thread waited for the busy event loop.
# Needs SQLite's JSON functions (built in since 3.38); without them the writer uses statements.
INCOMING_SCHEMA = """
CREATE VIEW IF NOT EXISTS incoming_v1 AS
    SELECT id, sender, received_at, listener, client_address, client_port, helo, auth_user, tls,
           body_type, smtputf8, dsn_ret, dsn_envid, session_id, size, data, NULL AS recipients
    FROM message WHERE 0;
CREATE TRIGGER IF NOT EXISTS incoming_v1_insert INSTEAD OF INSERT ON incoming_v1
BEGIN
    INSERT INTO message (id, sender, received_at, listener, client_address, client_port, helo,
                         auth_user, tls, body_type, smtputf8, dsn_ret, dsn_envid, session_id, size, data)
    VALUES (NEW.id, NEW.sender, NEW.received_at, NEW.listener, NEW.client_address, NEW.client_port,
            NEW.helo, NEW.auth_user, NEW.tls, NEW.body_type, NEW.smtputf8, NEW.dsn_ret, NEW.dsn_envid,
            NEW.session_id, NEW.size, NEW.data);
    INSERT INTO recipient (message_id, position, address, domain, original, orcpt, notify, verdict,
                           route, decision_id, next_attempt_at)
    SELECT NEW.id, json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
           json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
           json_extract(value, '$[6]'), json_extract(value, '$[7]'), json_extract(value, '$[8]'),
           NEW.received_at
    FROM json_each(NEW.recipients) ORDER BY key;
END;
"""
_INSERT_INCOMING = ("INSERT INTO incoming_v1 (id, sender, received_at, listener, client_address, client_port,"
                    " helo, auth_user, tls, body_type, smtputf8, dsn_ret, dsn_envid, session_id, size, data,"
                    " recipients) VALUES ")

_MESSAGE_COLUMNS = (
    "id, sender, received_at, listener, client_address, client_port, helo, auth_user, tls,"
    " body_type, smtputf8, dsn_ret, dsn_envid, session_id, hold, size"
)
_RECIPIENT_COLUMNS = (
    "id, address, original, orcpt, notify, verdict, route, decision_id, state, attempts,"
    " next_attempt_at, last_attempt_at, reply_code, enhanced_code, remote_host, remote_address,"
    " remote_text, remote_command, permanent, delay_warned"
)


class QueueIdGenerator:
    """Queue ids: 14 hex digits of microseconds (strictly increasing within a process), then
    10 hex digits of randomness, so ids sort by arrival and are unique across processes and
    restarts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def __call__(self) -> str:
        with self._lock:
            stamp = max(time.time_ns() // 1000, self._last + 1)
            self._last = stamp
        return f"{stamp:014x}{hex_id(5)}"


@dataclass(slots=True)
class _Write:
    """One unit of work for the writer thread: ``apply`` runs inside the group's transaction."""

    apply: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    is_message: bool = False
    # False for bookkeeping that a power loss may undo without losing mail (a delivery result,
    # the removal of a delivered message: at worst the message is delivered again). A group of
    # such writes is written to the WAL and not fsynced; it survives a crash of the process, and
    # the next durable commit's fsync takes it along.
    durable: bool = True
    # A new message: (queue id, message, whether the recipients' ids are wanted). The writer
    # inserts all the new messages of a group in a few multi-row statements instead of calling
    # ``apply`` for each: every statement costs the writer thread the GIL back from the event
    # loop, which measured several milliseconds per group under load. ``apply`` does the same
    # for one message, and is what runs when a group has to be applied write by write.
    insert: tuple[str, MessageIn, bool] | None = None


class LoopCompletion:
    """The outcome of one write, handed to a callback on an asyncio event loop: what the SMTP
    server waits on before its 250. Cheaper than a ``concurrent.futures.Future`` wrapped for
    the loop (a Condition per write, two futures, a cross-thread call per write): the writer
    thread reports every completion of a group to each loop with one ``call_soon_threadsafe``.
    ``callback(result, exc)`` runs in the loop's thread; exactly one of the two is None."""

    __slots__ = ("loop", "callback", "result", "exc", "state")

    def __init__(self, loop: Any, callback: Callable[[Any, BaseException | None], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.result: Any = None
        self.exc: BaseException | None = None
        self.state = 0                  # 0 pending, 1 running, 2 done, 3 reported

    # the part of the Future protocol that the writer uses
    def set_running_or_notify_cancel(self) -> bool:
        self.state = 1
        return True

    def running(self) -> bool:
        return self.state == 1

    def done(self) -> bool:
        return self.state >= 2

    def set_result(self, result: Any) -> None:
        self.result, self.state = result, 2

    def set_exception(self, exc: BaseException) -> None:
        self.exc, self.state = exc, 2


def batch_scheduling() -> bool:
    """Ask Linux to schedule the calling thread as SCHED_BATCH; False where it cannot (another
    system, or a sandbox that forbids it: the thread then runs as before).

    The writer thread wakes many times a second (its fsync done, the write lock free, the GIL
    handed back). As an ordinary thread each wake-up preempts whatever runs on that core, most
    often the event loop of the same process, which then waits for the GIL the writer holds: two
    context switches, and the loop's work cut in two. A batch thread is not allowed to preempt on
    wake-up; it runs when a core is free or at the next tick, a fraction of a millisecond later,
    and meanwhile more messages join its next group. Two workers, smtp-source, a new connection
    per message, alternated: about 9 % less CPU per message and 4 to 6 % more messages a second;
    context switches 6.4 -> 4.1 per message (docs/benchmarks.md, fifth session)."""
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False        # a policy the administrator chose (real-time, idle): kept
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


# fdatasync where the system has it (Linux), else fsync
_HAVE_FDATASYNC = hasattr(os, "fdatasync")


def _run_completions(completions: list[LoopCompletion]) -> None:
    for completion in completions:
        try:
            completion.callback(completion.result, completion.exc)
        except Exception:                       # one session's failure is not the others'
            completion.loop.call_exception_handler({
                "message": "queue completion callback failed", "exception": sys.exc_info()[1]})


def _report(writes: Sequence[_Write]) -> None:
    """Hand the finished LoopCompletions among ``writes`` to their loops, one call per loop.
    Never raises: the writer thread goes on whatever a loop does."""
    by_loop: dict[Any, list[LoopCompletion]] = {}
    for write in writes:
        done = write.future
        if type(done) is LoopCompletion and done.state == 2:
            by_loop.setdefault(done.loop, []).append(done)
    for loop, completions in by_loop.items():
        try:
            loop.call_soon_threadsafe(_run_completions, completions)
        except RuntimeError:        # the loop is closed: nobody is waiting any more
            pass
        except Exception as exc:    # noqa: BLE001 - not a loop at all: say so, report the others
            print(f"relaywarden: cannot report {len(completions)} queue write(s) to {loop!r}: {exc!r}",
                  file=sys.stderr, flush=True)
        for completion in completions:
            completion.state = 3


_STOP = object()


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def _translate(exc: BaseException) -> Exception:
    """The error a caller of the queue sees for a failure inside the writer."""
    if isinstance(exc, (QueueFull, QueueError)):
        return exc
    if _is_full(exc):
        full = QueueFull(f"queue storage is full: {exc}")
        full.__cause__ = exc
        return full
    error = QueueError(f"queue write failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class SqliteQueue(QueueBackend):
    """The queue in one SQLite file, written by one group-committing thread."""

    def __init__(
        self,
        path: Path,
        *,
        group_max: int = 512,
        group_wait: float = 0.0,
        busy_timeout: float = 10.0,
        max_pages: int | None = None,
    ) -> None:
        if group_max < 1:
            raise ValueError("group_max must be at least 1")
        self.path = Path(path)
        self.group_max = group_max
        self.group_wait = max(0.0, group_wait)
        self.busy_timeout = busy_timeout
        self._new_id = QueueIdGenerator()
        self._inbox: stdlib_queue.SimpleQueue[_Write | object] = stdlib_queue.SimpleQueue()
        # writes taken from the inbox while a group waited for the write lock that could not
        # join it: the writer takes them before the inbox, in their order
        self._held: collections.deque[_Write | object] = collections.deque()
        self._state_lock = threading.Lock()
        self._closed = False
        self._stats = {"transactions": 0, "messages": 0, "failed": 0}
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._incoming = False           # new messages go in through the incoming_v1 view
        self._writer_conn = self._open_writer(max_pages)
        try:
            # The WAL the writer fsyncs after each durable commit, named from the file SQLite
            # has open (a queue path that is a symbolic link names another directory's WAL).
            # It lives as long as the writer's connection: SQLite deletes it only when the last
            # connection to the database closes; otherwise it is truncated or written over,
            # never replaced.
            database = self._writer_conn.execute("PRAGMA database_list").fetchone()[2]
            self._wal_fd = os.open(f"{database}-wal", os.O_RDONLY)
        except (OSError, sqlite3.Error) as exc:
            self._writer_conn.close()
            raise QueueError(f"{self.path}: cannot open the WAL to fsync it: {exc}") from exc
        # set when an fsync of the WAL failed: durable writes are refused until a checkpoint
        # has copied the WAL into the database and emptied it (``_wal_trusted``)
        self._wal_failed = False
        self._writer = threading.Thread(
            target=self._writer_loop, name=f"queue-writer:{self.path.name}", daemon=True
        )
        try:
            self._writer.start()
        except BaseException:
            self._writer_conn.close()
            os.close(self._wal_fd)
            raise

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN / COMMIT ourselves
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            _register_functions(conn)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        return conn

    def _open_writer(self, max_pages: int | None) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")
            # NORMAL: a commit writes the WAL and does not fsync it; the writer does, after
            # SQLite has released the write lock (``_sync_wal``), before any durable write is
            # reported done. The fsync no longer holds the lock that every process of the
            # server shares, so another worker commits meanwhile.
            conn.execute("PRAGMA synchronous = NORMAL")
            if conn.execute("PRAGMA synchronous").fetchone()[0] != 1:
                raise QueueError(f"{self.path}: cannot set synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # Checkpoint when the WAL holds 4000 pages (16 MiB with 4 KiB pages), not SQLite's
            # 1000: the pages every commit rewrites (the tables' last leaves, the indexes) are
            # copied to the database once per checkpoint, not four times. Two workers, smtp-source
            # alternated with 1000: 3-4 % more messages a second for 4-5 % less CPU; 10000 gave
            # nothing more.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            if max_pages is not None:
                conn.execute(f"PRAGMA max_page_count = {int(max_pages)}")
            conn.executescript("BEGIN IMMEDIATE;" + SCHEMA
                               + "".join(f"DROP INDEX IF EXISTS {name};" for name in DROPPED_INDEXES))
            columns = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
            if "lease_until" not in columns:      # a queue made before leases existed
                conn.execute("ALTER TABLE message ADD COLUMN lease_until REAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise QueueError(
                    f"{self.path}: queue schema version {version}, this relaywarden knows "
                    f"{SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
            try:
                conn.execute("SELECT json_valid('[]')")
                conn.executescript("BEGIN IMMEDIATE;" + INCOMING_SCHEMA + "COMMIT;")
                self._incoming = True
            except sqlite3.OperationalError:       # an SQLite without JSON: statements per table
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._incoming = False
            # The writer waits for another process's write lock itself (begin_immediate), in
            # steps of a fraction of a millisecond: SQLite's own busy handler sleeps 1, 2, 5,
            # 10 ms ..., which halves the throughput of two processes sharing the queue.
            conn.execute("PRAGMA busy_timeout = 0")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise _translate(exc) from exc
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise QueueError("queue is closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._state_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot of the queue."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    # ------------------------------------------------------------------ the writer

    def _enqueue(self, write: _Write) -> concurrent.futures.Future[Any]:
        with self._state_lock:
            if self._closed:
                write.future.set_exception(QueueError("queue is closed"))
                _report([write])
                return write.future
            self._inbox.put(write)
        return write.future

    def _wait(self, write: _Write) -> Any:
        return self._enqueue(write).result()

    def _gather(self, first: _Write) -> tuple[list[_Write], bool]:
        """The group: ``first`` and whatever arrives within ``group_wait``, up to ``group_max``.
        The flag says the stop sentinel was seen."""
        group = [first]
        deadline = time.monotonic() + self.group_wait
        while len(group) < self.group_max:
            if self._held:
                item = self._held.popleft()
            else:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        item = self._inbox.get(timeout=remaining)
                    else:
                        item = self._inbox.get_nowait()
                except stdlib_queue.Empty:
                    break
            if item is _STOP:
                return group, True
            assert isinstance(item, _Write)
            group.append(item)
        return group, False

    def _writer_loop(self) -> None:
        batch_scheduling()
        conn = self._writer_conn
        stopping = False
        while not stopping:
            item = self._held.popleft() if self._held else self._inbox.get()
            if item is _STOP:
                break
            assert isinstance(item, _Write)
            group, stopping = self._gather(item)
            try:
                self._commit_group(conn, group)
            except BaseException as exc:  # the writer must survive anything
                self._fail(group, exc)
        try:
            conn.close()
        finally:
            os.close(self._wal_fd)

    def _commit_group(self, conn: sqlite3.Connection, group: list[_Write]) -> None:
        live = [w for w in group if w.future.set_running_or_notify_cancel()]
        if not live:
            return
        if self._wal_failed and any(w.durable for w in live) and not self._wal_trusted(conn):
            refused = [w for w in live if w.durable]
            self._fail(refused, QueueError(
                "queue write refused: an earlier fsync of the queue's WAL failed, and until a "
                "checkpoint has copied the WAL into the database no write can be made durable "
                "(is the disk failing?)"))
            live = [w for w in live if not w.durable]
            if not live:
                return
        before = len(live)
        try:
            done, failed = _apply_group(conn, live, self.busy_timeout, self._incoming,
                                        lambda room: self._joiners(min(room, self.group_max - len(live))))
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            self._fail(live, exc)
            return
        finally:
            group.extend(live[before:])     # writes that joined while it waited: the group's too
        if any(w.durable for w, _ in done):
            try:
                self._sync_wal()
            except (QueueError, QueueFull) as exc:
                # committed, not durable: the durable writes fail (their clients send again: a
                # possible duplicate, never a loss); the others need no fsync and are done
                failed = failed + [(w, exc) for w, _ in done if w.durable]
                done = [(w, result) for w, result in done if not w.durable]
        with self._state_lock:
            self._stats["transactions"] += 1
            self._stats["messages"] += sum(1 for w, _ in done if w.is_message)
            self._stats["failed"] += len(failed)
        for write, result in done:
            write.future.set_result(result)
        for write, exc in failed:
            write.future.set_exception(_translate(exc))
        _report(live)

    def _sync_wal(self) -> None:
        """Make the commit just made durable: fsync the WAL (its data and the flush of the
        disk's cache; ``fdatasync``, as SQLite's own sync of the WAL on Linux).

        The same guarantee as synchronous = FULL, where SQLite fsyncs the WAL before it releases
        the write lock: the commit's frames were written before the lock was released, so this
        fsync covers them, and every frame before them (another process's commit included:
        recovery after a power loss reads the WAL's frames in order, and finds all of them
        intact up to this commit). A checkpoint that copies the frames into the database
        fsyncs the WAL before and the database after, and the WAL header when the WAL is
        written over from its start (SQLite's documentation of synchronous = NORMAL in WAL
        mode), so a WAL reused after a checkpoint loses nothing either. Flushing the WAL to make
        a NORMAL commit durable is what SQLite's developers advise (sqlite.org forum,
        "Switching pragma synchronous to upgrade durability"). Other connections may read the
        commit before this fsync ends: the delivery process may then deliver a message whose
        client has not had its 250 yet, as with any MTA that crashes between delivery and
        acknowledgement — at worst twice, never lost.

        If the fsync fails, the group's durable writes fail (451 4.3.0, or 452 4.3.1 when the
        disk is full) although they are committed: the client sends again and the message may
        be queued twice, never lost. Linux may then have dropped the pages it could not write,
        so a later fsync's success proves nothing for them nor for any commit after them
        (recovery stops at the first bad frame): durable writes are refused from then on, until
        a checkpoint has copied the WAL into the database and emptied it (``_wal_trusted``), as
        SQLite with synchronous = FULL would never have published them. The other processes'
        writers learn of the error at their own next fsync (Linux reports a writeback error to
        every descriptor of the file open at the time) and refuse alike."""
        try:
            if _HAVE_FDATASYNC:
                os.fdatasync(self._wal_fd)
            else:
                os.fsync(self._wal_fd)
        except OSError as exc:
            self._wal_failed = True
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QueueFull(f"queue storage is full: fsync of the WAL failed: {exc}") from exc
            raise QueueError(f"queue write failed: fsync of the WAL failed: {exc}") from exc

    def _wal_trusted(self, conn: sqlite3.Connection) -> bool:
        """After a failed fsync of the WAL: try a checkpoint that copies the whole WAL into the
        database, fsyncs the database and truncates the WAL, so that later commits start a new
        WAL that no lost frame precedes. True (and the failure forgotten) once one succeeds; it
        cannot while another connection reads an older snapshot, and is tried again at the next
        durable group."""
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error:
            return False
        if busy:
            return False
        self._wal_failed = False
        return True

    def _joiners(self, room: int) -> list[_Write]:
        """New messages that arrived while the group waited for another process's write lock,
        up to ``room``: they join the group instead of waiting for its commit and then for the
        lock again. Anything else taken from the inbox is held, in order, for the next group."""
        joined: list[_Write] = []
        while len(joined) < room and not self._held:
            try:
                item = self._inbox.get_nowait()
            except stdlib_queue.Empty:
                break
            if (item is _STOP or not isinstance(item, _Write) or item.insert is None
                    or not item.insert[1].recipients or not item.durable):
                self._held.append(item)
                break
            if item.future.set_running_or_notify_cancel():
                joined.append(item)
        return joined

    def _fail(self, group: list[_Write], exc: BaseException) -> None:
        with self._state_lock:
            self._stats["failed"] += len(group)
        for write in group:
            if not write.future.done():
                if write.future.running() or write.future.set_running_or_notify_cancel():
                    write.future.set_exception(_translate(exc))
        _report(group)

    # ------------------------------------------------------------------ writes

    def submit(self, msg: MessageIn) -> concurrent.futures.Future[str]:
        """Queue a message; the future gives its queue id once it is durable. It can be cancelled
        until the writer takes it: at its group's start, or at once when it arrives while a group
        waits for another process's write lock (it joins that group)."""
        return self._enqueue(self._message_write(msg, False))

    def submit_with_ids(self, msg: MessageIn) -> concurrent.futures.Future[tuple[str, list[int]]]:
        """Like submit; the future also gives the recipients' ids (in the message's order), so
        that the queue runner can start on the message at once, without reading it back."""
        return self._enqueue(self._message_write(msg, True))

    def submit_to(self, loop: Any, msg: MessageIn, callback: Callable[[Any, BaseException | None], None],
                  *, with_ids: bool = False) -> None:
        """Queue a message and call ``callback(result, exc)`` on ``loop`` once it is durable (or
        has failed): ``result`` is what ``submit`` (or, ``with_ids``, ``submit_with_ids``) gives.
        What the SMTP server uses: no Future per message (see LoopCompletion)."""
        self._enqueue(self._message_write(msg, with_ids, LoopCompletion(loop, callback)))

    def _message_write(self, msg: MessageIn, with_ids: bool, completion: LoopCompletion | None = None) -> _Write:
        queue_id = self._new_id()

        def apply(conn: sqlite3.Connection) -> Any:
            _insert(conn, queue_id, msg)
            if not with_ids:
                return queue_id
            rows = conn.execute("SELECT id FROM recipient WHERE message_id = ? ORDER BY position", (queue_id,))
            return queue_id, [row[0] for row in rows]
        if completion is None:
            return _Write(apply, is_message=True, insert=(queue_id, msg, with_ids))
        return _Write(apply, completion, is_message=True, insert=(queue_id, msg, with_ids))  # type: ignore[arg-type]

    def record_attempt(
        self,
        queue_id: str,
        recipient_id: int,
        result: DeliveryResult,
        *,
        next_attempt_at: float | None,
        attempted_at: float | None = None,
    ) -> bool:
        when = time.time() if attempted_at is None else attempted_at
        return bool(self._wait(_Write(
            lambda conn: _update_recipient(conn, queue_id, recipient_id, result, next_attempt_at, when))))

    def finish_later(self, queue_id: str, *, notices: Sequence[MessageIn] = (), delete: bool = False,
                     results: Sequence[tuple[int, DeliveryResult, float | None]] = (),
                     attempted_at: float | None = None, delay_warned: Sequence[int] = ()
                     ) -> concurrent.futures.Future[list[str]]:
        """The queue runner's bookkeeping after an attempt, in one transaction: queue ``notices``
        (success or delay DSNs), then delete the message, or record each ``(recipient id,
        result, next attempt)`` and remember the recipients a delay notice went out for. The
        future gives the notices' queue ids.

        One transaction, so a crash can never leave a notice queued without the bookkeeping that
        says it went out (it would go out again at the next attempt). Not fsynced on its own
        (``_Write.durable``): a power loss may undo all of it, and the next attempt then
        delivers and reports again, as it would after a crash during the delivery."""
        ids = [self._new_id() for _ in notices]
        when = time.time() if attempted_at is None else attempted_at
        warned_sql = "UPDATE recipient SET delay_warned = 1 WHERE message_id = ? AND id = ?"

        def apply(conn: sqlite3.Connection) -> list[str]:
            for notice_id, notice in zip(ids, notices):
                _insert(conn, notice_id, notice)
            if delete:
                conn.execute("DELETE FROM message WHERE id = ?", (queue_id,))
                return ids
            for recipient_id, result, next_attempt_at in results:
                _update_recipient(conn, queue_id, recipient_id, result, next_attempt_at, when)
            for recipient_id in delay_warned:
                conn.execute(warned_sql, (queue_id, recipient_id))
            return ids
        return self._enqueue(_Write(apply, durable=False))

    def set_hold(self, queue_id: str, hold: bool) -> bool:
        sql = "UPDATE message SET hold = ? WHERE id = ?"
        return bool(self._wait(_Write(lambda c: c.execute(sql, (int(hold), queue_id)).rowcount)))

    def delete(self, queue_id: str) -> bool:
        sql = "DELETE FROM message WHERE id = ?"
        return bool(self._wait(_Write(lambda c: c.execute(sql, (queue_id,)).rowcount)))

    def lease_later(self, queue_id: str, until: float, now: float) -> concurrent.futures.Future[bool]:
        """Take the delivery lease of a message that is not held and not leased (or whose lease
        ran out); the future says whether it was taken. Operators' delete and bounce leave a
        leased message alone, and ``due`` does not offer it, until the lease is released."""
        sql = ("UPDATE message SET lease_until = ? WHERE id = ? AND hold = 0"
               " AND (lease_until IS NULL OR lease_until <= ?)")
        return self._enqueue(_Write(lambda c: c.execute(sql, (until, queue_id, now)).rowcount == 1,
                                    durable=False))

    def lease_and_load_later(self, queue_id: str, until: float, now: float
                             ) -> concurrent.futures.Future[tuple[QueuedMessage, bytes] | None]:
        """``lease_later`` and, in the same write, the message and its data: None when the
        lease was not taken. One trip to the writer instead of a lease and then a read."""
        sql = ("UPDATE message SET lease_until = ? WHERE id = ? AND hold = 0"
               " AND (lease_until IS NULL OR lease_until <= ?)")

        def apply(c: sqlite3.Connection) -> tuple[QueuedMessage, bytes] | None:
            if c.execute(sql, (until, queue_id, now)).rowcount != 1:
                return None
            row = c.execute(f"SELECT {_MESSAGE_COLUMNS}, data FROM message WHERE id = ?", (queue_id,)).fetchone()
            recipients = _select_recipients(c, "message_id = ?", (queue_id,))
            return _message_from_row(row[:-1], tuple(recipients)), bytes(row[-1])
        return self._enqueue(_Write(apply, durable=False))

    def release_later(self, queue_id: str) -> concurrent.futures.Future[int]:
        sql = "UPDATE message SET lease_until = NULL WHERE id = ?"
        return self._enqueue(_Write(lambda c: c.execute(sql, (queue_id,)).rowcount, durable=False))

    def release_all_leases(self) -> int:
        """At the runner's start: leases of a previous run that died are void."""
        sql = "UPDATE message SET lease_until = NULL WHERE lease_until IS NOT NULL"
        return int(self._wait(_Write(lambda c: c.execute(sql).rowcount)))

    def hold_many(self, queue_ids: Sequence[str], hold: bool) -> int:
        """Hold (or release) these messages in one write; returns how many changed state."""
        ids = list(queue_ids)
        sql = "UPDATE message SET hold = ? WHERE id = ? AND hold != ?"
        return int(self._wait(_Write(
            lambda c: sum(c.execute(sql, (int(hold), qid, int(hold))).rowcount for qid in ids))))

    def delete_many(self, queue_ids: Sequence[str]) -> list[str]:
        """Delete these messages (and their recipients) in one write; returns the ids deleted.
        A message being delivered right now (leased) is left alone, as is one already gone."""
        ids = list(queue_ids)
        sql = "DELETE FROM message WHERE id = ? AND (lease_until IS NULL OR lease_until <= ?)"
        return list(self._wait(_Write(lambda c: [qid for qid in ids if c.execute(sql, (qid, time.time())).rowcount])))

    def retry_many(self, queue_ids: Sequence[str], now: float) -> tuple[int, int]:
        """Make every pending or deferred recipient of these messages due at ``now`` (the
        runner picks them up at its next poll), in one write; returns how many messages and
        how many recipients were changed."""
        ids = list(queue_ids)
        sql = ("UPDATE recipient SET next_attempt_at = ? WHERE message_id = ?"
               " AND state IN ('pending', 'deferred')")

        def apply(conn: sqlite3.Connection) -> tuple[int, int]:
            counts = [conn.execute(sql, (now, qid)).rowcount for qid in ids]
            return sum(1 for n in counts if n), sum(counts)
        return self._wait(_Write(apply))

    def replace_many(self, replacements: Sequence[tuple[str, tuple[int, ...], MessageIn | None]]
                     ) -> list[str | None]:
        """For each (queue id, recipient ids still to deliver, notice): when the message still
        exists with exactly those recipients pending or deferred, queue the notice (if any) and
        delete the message, atomically. One write for the whole batch.

        Returns, per item, the notice's queue id ("" when there was no notice), or None when the
        message is gone or changed since it was read (nothing was done to it)."""
        items = [(qid, tuple(sorted(rids)), notice, self._new_id() if notice else "")
                 for qid, rids, notice in replacements]
        return list(self._wait(_Write(lambda c: [_replace(c, *item) for item in items])))

    def replace_later(self, queue_id: str, expected: Sequence[int], notice: MessageIn | None,
                      also: Sequence[MessageIn] = ()) -> concurrent.futures.Future[str | None]:
        """One ``replace_many`` item without waiting: queue ``notice`` (if any) and the notices
        ``also`` (success DSNs of the same attempt) and delete the message in one transaction,
        when exactly ``expected`` recipients are still to deliver. The future gives the notice's
        queue id ("" without one; None when the message had changed and was left alone) and the
        queue ids of ``also``, which are queued either way."""
        item = (queue_id, tuple(sorted(expected)), notice, self._new_id() if notice else "")
        extra = [(self._new_id(), n) for n in also]

        def apply(c: sqlite3.Connection) -> tuple[str | None, list[str]]:
            done = _replace(c, *item, leased_ok=True)        # the runner holds the lease
            # the success notices are owed even when the message changed meanwhile: those
            # recipients did get the mail
            for notice_id, extra_notice in extra:
                _insert(c, notice_id, extra_notice)
            return done, [notice_id for notice_id, _ in extra]
        return self._enqueue(_Write(apply))

    def set_max_pages(self, pages: int) -> int:
        """Change the size limit in database pages (the "disk" of a test); returns the limit
        sqlite applied, which is never below the current size."""
        sql = f"PRAGMA max_page_count = {int(pages)}"
        return int(self._wait(_Write(lambda c: c.execute(sql).fetchone()[0])))

    def close(self) -> None:
        """Finish every write already submitted, stop the writer, close all connections."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(_STOP)
        self._writer.join()
        with self._state_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    def stats(self) -> dict[str, int]:
        """Committed transactions, messages committed, writes failed (since this instance
        opened)."""
        with self._state_lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ reads

    def get(self, queue_id: str) -> QueuedMessage | None:
        with self._reading() as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            recipients = _select_recipients(conn, "message_id = ?", (queue_id,))
        return _message_from_row(row, tuple(recipients))

    def recipients(self, queue_id: str) -> list[QueuedRecipient]:
        with self._reading() as conn:
            return _select_recipients(conn, "message_id = ?", (queue_id,))

    def message_data(self, queue_id: str) -> bytes | None:
        with self._reading() as conn:
            row = conn.execute("SELECT data FROM message WHERE id = ?", (queue_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def count(self) -> int:
        with self._reading() as conn:
            return int(conn.execute("SELECT count(*) FROM message").fetchone()[0])

    def due(self, now: float, limit: int) -> list[tuple[str, list[QueuedRecipient]]]:
        with self._reading() as conn:
            ids = [
                row[0]
                for row in conn.execute(DUE_SQL, (now, now, limit))
            ]
            return [
                (
                    queue_id,
                    _select_recipients(
                        conn,
                        "message_id = ? AND state IN ('pending', 'deferred')"
                        " AND next_attempt_at <= ?",
                        (queue_id, now),
                    ),
                )
                for queue_id in ids
            ]


    def find_ids(self, selection: MessageFilter, now: float | None = None,
                 limit: int | None = None) -> list[str]:
        """The ids of the messages that pass ``selection``, oldest first."""
        where, params = selection.sql(time.time() if now is None else now)
        sql = f"SELECT m.id FROM message m WHERE {where} ORDER BY m.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._reading() as conn:
            return [row[0] for row in conn.execute(sql, params)]

    def find(self, selection: MessageFilter, now: float | None = None,
             limit: int | None = None) -> list[QueuedMessage]:
        """The messages that pass ``selection`` with all their recipients, oldest first."""
        where, params = selection.sql(time.time() if now is None else now)
        sql = f"SELECT {_M_COLUMNS} FROM message m WHERE {where} ORDER BY m.id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._reading() as conn:
            rows = conn.execute(sql, params).fetchall()
            by_message: dict[str, list[QueuedRecipient]] = {row[0]: [] for row in rows}
            ids = list(by_message)
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                        f"SELECT message_id, {_RECIPIENT_COLUMNS} FROM recipient"
                        f" WHERE message_id IN ({marks}) ORDER BY message_id, position", chunk):
                    by_message[row[0]].append(_recipient_from_row(row[1:]))
        return [_message_from_row(row, tuple(by_message[row[0]])) for row in rows]

    def shape(self, selection: MessageFilter, by: str, now: float | None = None
              ) -> list[tuple[str, float]]:
        """(key, received_at) pairs for a qshape-style summary of the messages that pass
        ``selection``: ``by="domain"`` gives one pair per recipient still to deliver (pending or
        deferred) keyed by its domain; "user", "client", "sender", "listener" one pair per
        message keyed by that envelope fact ("" for none)."""
        where, params = selection.sql(time.time() if now is None else now)
        sql = shape_sql(by, where)
        with self._reading() as conn:
            return [(row[0], row[1]) for row in conn.execute(sql, params)]

    def resolve_id(self, text: str) -> list[str]:
        """The ids of queued messages equal to ``text`` or starting with it (at most two, enough
        to tell a unique prefix from an ambiguous one)."""
        prefix = text.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,24}", prefix):
            return []
        with self._reading() as conn:
            rows = conn.execute("SELECT id FROM message WHERE id >= ? AND id < ? ORDER BY id LIMIT 2",
                                (prefix, prefix + "g")).fetchall()
        exact = [r[0] for r in rows if r[0] == prefix]
        return exact or [r[0] for r in rows]


# The runner's scan: messages with recipients due, first due first. INDEXED BY: without
# statistics the planner prefers scanning every recipient in message order (to group without
# sorting); the partial index reads only the recipients due.
DUE_SQL = ("SELECT r.message_id, min(r.next_attempt_at) AS first_due"
           " FROM recipient r INDEXED BY recipient_next_attempt JOIN message m ON m.id = r.message_id"
           " WHERE r.state IN ('pending', 'deferred') AND r.next_attempt_at <= ?"
           "   AND m.hold = 0 AND (m.lease_until IS NULL OR m.lease_until <= ?)"
           " GROUP BY r.message_id ORDER BY first_due, r.message_id LIMIT ?")


def shape_sql(by: str, where: str) -> str:
    """The query behind ``SqliteQueue.shape`` for a WHERE clause over ``message m``."""
    if by == "domain":
        # INDEXED BY, as in DUE_SQL: only the recipients still to deliver are read
        return (f"SELECT r.domain, m.received_at FROM message m JOIN recipient r"
                f" INDEXED BY recipient_next_attempt"
                f" ON r.message_id = m.id WHERE r.state IN ('pending', 'deferred') AND {where}")
    if by in _SHAPE_COLUMNS:
        return f"SELECT coalesce({_SHAPE_COLUMNS[by]}, ''), m.received_at FROM message m WHERE {where}"
    raise ValueError(f"summary by {by!r}: use one of domain, {', '.join(_SHAPE_COLUMNS)}")


# ---------------------------------------------------------------------- operator selection

MESSAGE_STATES = ("active", "deferred", "hold", "done")

_STATE_SQL = (
    "CASE WHEN m.hold = 1 THEN 'hold'"
    " WHEN EXISTS (SELECT 1 FROM recipient s WHERE s.message_id = m.id AND s.state = 'deferred')"
    " THEN 'deferred'"
    " WHEN EXISTS (SELECT 1 FROM recipient s WHERE s.message_id = m.id AND s.state = 'pending')"
    " THEN 'active' ELSE 'done' END"
)

_SHAPE_COLUMNS = {"user": "m.auth_user", "client": "m.client_address", "sender": "m.sender",
                  "listener": "m.listener"}

_M_COLUMNS = ", ".join(f"m.{c.strip()}" for c in _MESSAGE_COLUMNS.split(","))


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Which queued messages an operator means. Every set criterion must hold; empty selects all.

    Message criteria: ``ids`` (queue ids), ``states`` (a message is "hold" when held, else
    "deferred" when a recipient was tried and failed temporarily, else "active" when a recipient
    waits for its first attempt, else "done"), ``sender`` ("" for the null sender),
    ``auth_user``, ``client`` (an address or a network such as 203.0.113.0/24), ``listener``,
    ``older_than`` / ``younger_than`` (seconds since it was received). Recipient criteria, met
    when one recipient meets them all: ``recipient`` (address), ``recipient_domain``,
    ``min_attempts``, ``reply`` (a regular expression searched in the last delivery result:
    "code enhanced-code host text"). Addresses, domains and users compare case-insensitively.
    """

    ids: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    sender: str | None = None
    recipient: str | None = None
    recipient_domain: str | None = None
    auth_user: str | None = None
    client: str | None = None
    listener: str | None = None
    older_than: float | None = None
    younger_than: float | None = None
    min_attempts: int | None = None
    reply: str | None = None

    def __post_init__(self) -> None:
        for state in self.states:
            if state not in MESSAGE_STATES:
                raise ValueError(f"state {state!r}: use one of {', '.join(MESSAGE_STATES)}")
        if self.client is not None:
            _network(self.client)  # raises ValueError for a bad address or network
        if self.reply is not None:
            re.compile(self.reply)

    def sql(self, now: float) -> tuple[str, list[Any]]:
        """The WHERE clause over ``message m`` and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.ids:
            clauses.append(f"m.id IN ({','.join('?' * len(self.ids))})")
            params.extend(self.ids)
        if self.states:
            clauses.append(f"({_STATE_SQL}) IN ({','.join('?' * len(self.states))})")
            params.extend(self.states)
        for column, value in (("m.sender", self.sender), ("m.auth_user", self.auth_user),
                              ("m.listener", self.listener)):
            if value is not None:
                clauses.append(f"{column} = ? COLLATE NOCASE")
                params.append(value.strip("<>") if column == "m.sender" else value)
        if self.client is not None:
            if "/" in self.client:
                clauses.append("rw_in_network(?, m.client_address)")
            else:
                clauses.append("m.client_address = ?")
            params.append(str(_network(self.client)) if "/" in self.client
                          else str(ipaddress.ip_address(self.client.strip("[]"))))
        if self.older_than is not None:
            clauses.append("m.received_at <= ?")
            params.append(now - self.older_than)
        if self.younger_than is not None:
            clauses.append("m.received_at > ?")
            params.append(now - self.younger_than)
        rcpt, rparams = self._recipient_sql()
        if rcpt:
            clauses.append(f"EXISTS (SELECT 1 FROM recipient r WHERE r.message_id = m.id AND {rcpt})")
            params.extend(rparams)
        return (" AND ".join(clauses) or "1"), params

    def _recipient_sql(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.recipient is not None:
            clauses.append("r.address = ? COLLATE NOCASE")
            params.append(self.recipient.strip("<>"))
        if self.recipient_domain is not None:
            clauses.append("r.domain = ?")
            params.append(self.recipient_domain.strip().rstrip(".").lower())
        if self.min_attempts is not None:
            clauses.append("r.attempts >= ?")
            params.append(self.min_attempts)
        if self.reply is not None:
            clauses.append(
                "r.last_attempt_at IS NOT NULL AND rw_search(?, trim(coalesce(r.reply_code, '')"
                " || ' ' || coalesce(r.enhanced_code, '') || ' ' || coalesce(r.remote_host, '')"
                " || ' ' || coalesce(r.remote_text, '')))")
            params.append(self.reply)
        return " AND ".join(clauses), params


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip("[]"), strict=False)


def _in_network(network: str, address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.strip("[]")) in ipaddress.ip_network(network)
    except ValueError:
        return False


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _search(pattern: str, text: str | None) -> bool:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        if len(_PATTERNS) > 64:
            _PATTERNS.clear()
        compiled = _PATTERNS[pattern] = re.compile(pattern)
    return compiled.search(text or "") is not None


def _register_functions(conn: sqlite3.Connection) -> None:
    conn.create_function("rw_in_network", 2, _in_network, deterministic=True)
    conn.create_function("rw_search", 2, _search, deterministic=True)


def _replace(conn: sqlite3.Connection, queue_id: str, expected: tuple[int, ...],
             notice: MessageIn | None, notice_id: str, *, leased_ok: bool = False) -> str | None:
    if not leased_ok and conn.execute("SELECT 1 FROM message WHERE id = ? AND lease_until > ?",
                                      (queue_id, time.time())).fetchone():
        return None                         # being delivered right now: not the operator's to replace
    rows = conn.execute("SELECT id FROM recipient WHERE message_id = ? AND state IN"
                        " ('pending', 'deferred') ORDER BY id", (queue_id,)).fetchall()
    if not rows or tuple(r[0] for r in rows) != expected:
        return None
    if notice is not None:
        _insert(conn, notice_id, notice)
    conn.execute("DELETE FROM message WHERE id = ?", (queue_id,))
    return notice_id


# ---------------------------------------------------------------------- SQL helpers


def begin_immediate(conn: sqlite3.Connection, timeout: float) -> None:
    """BEGIN IMMEDIATE, waiting up to ``timeout`` seconds for another process's write lock in
    short steps (0.1 ms growing to 2 ms) instead of SQLite's coarse busy-handler sleeps."""
    _busy_retry(lambda: conn.execute("BEGIN IMMEDIATE"), timeout)


def _busy_retry(statement: Callable[[], Any], timeout: float,
                on_busy: Callable[[], None] | None = None) -> Any:
    """Run ``statement`` again while another process holds the write lock (SQLITE_BUSY), for up
    to ``timeout`` seconds, in short steps (0.1 ms growing to 2 ms); ``on_busy`` runs after
    each step, before the next try."""
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", None)
            if (busy is not None and busy & 0xFF != sqlite3.SQLITE_BUSY) or (
                    busy is None and "locked" not in str(exc)):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 1.5, 0.002)
        if on_busy is not None:
            on_busy()


def _apply_group(
    conn: sqlite3.Connection, live: list[_Write], busy_timeout: float = 10.0, incoming: bool = False,
    joiners: Callable[[int], list[_Write]] | None = None,
) -> tuple[list[tuple[_Write, Any]], list[tuple[_Write, BaseException]]]:
    """Apply a group in one transaction and COMMIT; when a write fails, apply the group again
    with each write in its own SAVEPOINT, so that only the failing write fails.

    Returns the writes applied (with their results) and the writes that failed alone. When
    sqlite rolls back the whole transaction on an error (it may on SQLITE_FULL, IOERR, NOMEM),
    the writes that had fitted are applied again in a new transaction and the failing write
    and the rest of the group fail with that error: one retry at most per group.
    """
    # The commonest case: only new messages, and few enough for one statement into the view.
    if incoming and len(live) <= _INCOMING_ROWS and all(
            w.insert is not None and w.insert[1].recipients for w in live):
        # the statement's values, made once per write however often the lock is tried
        values = [value for w in live for value in _incoming_row(w.insert[0], w.insert[1])]

        def grow() -> None:
            # waiting for another process's write lock: new messages join the group (``live``
            # grows in place: the caller reports every write in it)
            if joiners is not None and len(live) < _INCOMING_ROWS:
                joined = joiners(_INCOMING_ROWS - len(live))
                live.extend(joined)
                values.extend(value for w in joined for value in _incoming_row(w.insert[0], w.insert[1]))

        try:
            _busy_retry(lambda: conn.execute(_incoming_sql(len(live)), values), busy_timeout, grow)
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # something in the group is wrong: the statements below tell which write it is
        else:
            # Committed: from here on nothing may fail the writes (a client told 451 would send
            # again what is queued). Ids that cannot be read are None: the runner scans instead.
            wanted = [w.insert[0] for w in live if w.insert[2]]
            try:
                ids: dict[str, list[int] | None] = dict(_recipient_ids(conn, wanted))
            except sqlite3.Error:
                ids = dict.fromkeys(wanted)
            return [(w, (w.insert[0], ids[w.insert[0]]) if w.insert[2] else w.insert[0]) for w in live], []
    # Then: every write applies, and no SAVEPOINT is spent on any of them.
    begin_immediate(conn, busy_timeout)
    try:
        inserted = _insert_many(conn, [w for w in live if w.insert is not None and w.insert[1].recipients])
        applied = [(write, inserted[id(write)] if id(write) in inserted else write.apply(conn)) for write in live]
    except Exception as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if len(live) == 1:
            return [], [(live[0], exc)]
        # One write failed: do it again write by write, to tell which ones fit.
    else:
        conn.execute("COMMIT")
        return applied, []
    done: list[tuple[_Write, Any]] = []
    failed: list[tuple[_Write, BaseException]] = []
    begin_immediate(conn, busy_timeout)
    for index, write in enumerate(live):
        conn.execute("SAVEPOINT item")
        try:
            result = write.apply(conn)
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO item")
                conn.execute("RELEASE item")
                failed.append((write, exc))
                continue
            failed.extend((w, exc) for w in live[index:])
            begin_immediate(conn, busy_timeout)
            done = [(w, w.apply(conn)) for w, _ in done]
            break
        conn.execute("RELEASE item")
        done.append((write, result))
    conn.execute("COMMIT")
    return done, failed


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


_INSERT_MESSAGE = ("INSERT INTO message (id, sender, received_at, listener, client_address, client_port,"
                   " helo, auth_user, tls, body_type, smtputf8, dsn_ret, dsn_envid, session_id, size, data)"
                   " VALUES ")
_INSERT_RECIPIENT = ("INSERT INTO recipient (message_id, position, address, domain, original, orcpt, notify,"
                     " verdict, route, decision_id, next_attempt_at) VALUES ")
_ROWS_PER_STATEMENT = 60          # 16 columns x 60 rows stays under SQLite's 999 host parameters
_INCOMING_ROWS = 999 // 17        # the view has 17 columns: 58 rows


@functools.lru_cache(maxsize=_INCOMING_ROWS)
def _incoming_sql(rows: int) -> str:
    """The statement that puts ``rows`` new messages into the incoming_v1 view."""
    return _INSERT_INCOMING + ", ".join(["(" + ", ".join("?" * 17) + ")"] * rows)


def _insert_many(conn: sqlite3.Connection, writes: list[_Write]) -> dict[int, Any]:
    """Insert the new messages of a group in multi-row statements; the result of each write
    (by ``id(write)``) as its ``apply`` would give it."""
    if not writes:
        return {}
    messages: list[tuple] = []
    recipients: list[tuple] = []
    for write in writes:
        queue_id, msg, _ = write.insert
        messages.append(_message_row(queue_id, msg))
        recipients.extend(_recipient_rows(queue_id, msg))
    for sql, rows, width in ((_INSERT_MESSAGE, messages, 16), (_INSERT_RECIPIENT, recipients, 11)):
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start:start + _ROWS_PER_STATEMENT]
            conn.execute(sql + ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk)),
                         [value for row in chunk for value in row])
    ids = _recipient_ids(conn, [w.insert[0] for w in writes if w.insert[2]])
    return {id(w): (w.insert[0], ids[w.insert[0]]) if w.insert[2] else w.insert[0] for w in writes}


def _recipient_ids(conn: sqlite3.Connection, queue_ids: list[str]) -> dict[str, list[int]]:
    """The recipients' ids of these messages, each message's in its order."""
    ids: dict[str, list[int]] = {queue_id: [] for queue_id in queue_ids}
    for start in range(0, len(queue_ids), 500):
        part = queue_ids[start:start + 500]
        for message_id, rid in conn.execute(
                f"SELECT message_id, id FROM recipient WHERE message_id IN ({', '.join('?' * len(part))})"
                " ORDER BY message_id, position", part):
            ids[message_id].append(rid)
    return ids


def _incoming_row(queue_id: str, msg: MessageIn) -> tuple:
    """A row for the ``incoming_v1`` view: the message's columns, then its recipients as JSON."""
    recipients = [[position, rcpt.address, _domain(rcpt.address), rcpt.original, rcpt.orcpt,
                   ",".join(rcpt.notify), rcpt.verdict, rcpt.route, rcpt.decision_id]
                  for position, rcpt in enumerate(msg.recipients)]
    return (*_message_row(queue_id, msg), json.dumps(recipients, ensure_ascii=False))


def _insert(conn: sqlite3.Connection, queue_id: str, msg: MessageIn) -> str:
    if not msg.recipients:
        raise QueueError("a message needs at least one recipient")
    conn.execute(_INSERT_MESSAGE + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _message_row(queue_id, msg))
    conn.executemany(_INSERT_RECIPIENT + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _recipient_rows(queue_id, msg))
    return queue_id


def _message_row(queue_id: str, msg: MessageIn) -> tuple:
    return (queue_id, msg.sender, msg.received_at, msg.listener, msg.client_address, msg.client_port,
            msg.helo, msg.auth_user, msg.tls, msg.body_type, int(msg.smtputf8), msg.dsn_ret,
            msg.dsn_envid, msg.session_id, len(msg.data), sqlite3.Binary(msg.data))


def _recipient_rows(queue_id: str, msg: MessageIn) -> list[tuple]:
    return [(queue_id, position, rcpt.address, _domain(rcpt.address), rcpt.original, rcpt.orcpt,
             ",".join(rcpt.notify), rcpt.verdict, rcpt.route, rcpt.decision_id, msg.received_at)
            for position, rcpt in enumerate(msg.recipients)]


def _update_recipient(
    conn: sqlite3.Connection,
    queue_id: str,
    recipient_id: int,
    result: DeliveryResult,
    next_attempt_at: float | None,
    attempted_at: float,
) -> int:
    if result.delivered:
        state, next_at = DELIVERED, None
    elif result.permanent or next_attempt_at is None:
        state, next_at = FAILED, None
    else:
        state, next_at = DEFERRED, next_attempt_at
    cursor = conn.execute(
        "UPDATE recipient SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
        " last_attempt_at = ?, reply_code = ?, enhanced_code = ?, remote_host = ?,"
        " remote_address = ?, remote_text = ?, remote_command = ?, permanent = ?"
        " WHERE id = ? AND message_id = ?",
        (
            state,
            next_at,
            attempted_at,
            result.reply_code,
            result.enhanced_code,
            result.remote_host,
            result.remote_address,
            result.remote_text,
            result.command,
            int(result.permanent),
            recipient_id,
            queue_id,
        ),
    )
    return cursor.rowcount


def _select_recipients(
    conn: sqlite3.Connection, where: str, params: tuple[Any, ...]
) -> list[QueuedRecipient]:
    rows = conn.execute(
        f"SELECT {_RECIPIENT_COLUMNS} FROM recipient WHERE {where} ORDER BY message_id, position",
        params,
    )
    return [_recipient_from_row(row) for row in rows]


def _recipient_from_row(row: tuple[Any, ...]) -> QueuedRecipient:
    (rid, address, original, orcpt, notify, verdict, route, decision_id, state, attempts,
     next_at, last_at, code, enhanced, host, addr, text, command, permanent,
     delay_warned) = row  # fmt: skip
    result = None
    if last_at is not None:
        result = DeliveryResult(
            reply_code=code,
            enhanced_code=enhanced,
            remote_host=host,
            remote_address=addr,
            remote_text=text or "",
            command=command,
            permanent=bool(permanent),
        )
    return QueuedRecipient(
        id=rid,
        address=address,
        original=original,
        orcpt=orcpt,
        notify=tuple(notify.split(",")) if notify else (),
        verdict=verdict,
        route=route,
        decision_id=decision_id,
        state=state,
        attempts=attempts,
        next_attempt_at=next_at,
        last_attempt_at=last_at,
        last_result=result,
        delay_warned=bool(delay_warned),
    )


def _message_from_row(
    row: tuple[Any, ...], recipients: tuple[QueuedRecipient, ...]
) -> QueuedMessage:
    (qid, sender, received_at, listener, client_address, client_port, helo, auth_user, tls,
     body_type, smtputf8, dsn_ret, dsn_envid, session_id, hold, size) = row  # fmt: skip
    return QueuedMessage(
        id=qid,
        sender=sender,
        recipients=recipients,
        received_at=received_at,
        listener=listener,
        client_address=client_address,
        client_port=client_port,
        helo=helo,
        auth_user=auth_user,
        tls=tls,
        body_type=body_type,
        smtputf8=bool(smtputf8),
        dsn_ret=dsn_ret,
        dsn_envid=dsn_envid,
        session_id=session_id,
        size=size,
        hold=bool(hold),
    )
