"""Unit tests of the durable queue: round trip, group commit, full disk, errors, close, sharing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from relaywarden.queue.model import (
    DeliveryResult,
    MessageIn,
    QueueError,
    QueueFull,
    RecipientIn,
)
from relaywarden.queue.store import (
    DUE_SQL, WAL_CHECKPOINT_PAGES, MessageFilter, QueueIdGenerator, SqliteQueue, _Write, batch_scheduling,
    shape_sql,
)
from relaywarden.queue.store import _register_functions as store_functions


def recipient(address: str = "bob@example.org", **changes: object) -> RecipientIn:
    base = RecipientIn(
        address=address,
        original=address.upper(),
        orcpt=None,
        notify=(),
        verdict="relay",
        route="smarthost",
        decision_id="9f3a",
    )
    return dataclasses.replace(base, **changes)


def message(body: bytes = b"Subject: hi\r\n\r\nhello\r\n", **changes: object) -> MessageIn:
    base = MessageIn(
        sender="alice@ours.example",
        recipients=(recipient(),),
        data=body,
        received_at=1_700_000_000.25,
        listener="submission",
        client_address="192.0.2.10",
        client_port=40123,
        helo="client.example",
        auth_user="alice",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
        body_type="8BITMIME",
        smtputf8=False,
        dsn_ret=None,
        dsn_envid=None,
        session_id="s-0001",
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def q(db: Path):
    queue = SqliteQueue(db)
    yield queue
    queue.close()


def test_round_trip_of_every_field(q: SqliteQueue) -> None:
    body = b"Received: from x\r\nSubject: \xc3\xa9t\xc3\xa9\r\n\r\n\x00\x01binary\xff\r\n.\r\n"
    rcpts = (
        recipient(
            "jos\u00e9@b\u00fccher.example",
            original="<Jos\u00e9@B\u00fccher.example>",
            orcpt="utf-8;jos\u00e9@b\u00fccher.example",
            notify=("SUCCESS", "FAILURE", "DELAY"),
            verdict="forward",
            route="partner",
            decision_id="00ff",
        ),
        recipient("local@ours.example", notify=("NEVER",), verdict="local", route=None),
        recipient("x@third.example", orcpt="rfc822;x@third.example"),
    )
    msg = message(
        body,
        sender="",
        recipients=rcpts,
        received_at=1_712_345_678.5,
        listener="mx",
        client_address="2001:db8::7",
        client_port=65535,
        helo="[2001:db8::7]",
        auth_user=None,
        tls=None,
        body_type="BINARYMIME",
        smtputf8=True,
        dsn_ret="HDRS",
        dsn_envid="env-42+2B",
        session_id="sess-\u00e9",
    )
    queue_id = q.submit(msg).result(timeout=10)

    got = q.get(queue_id)
    assert got is not None
    assert got.id == queue_id
    for f in dataclasses.fields(MessageIn):
        if f.name not in ("data", "recipients"):
            assert getattr(got, f.name) == getattr(msg, f.name), f.name
    assert got.size == len(body)
    assert got.hold is False
    assert got.state == "active"
    assert q.message_data(queue_id) == body

    assert got.recipients == tuple(q.recipients(queue_id))
    assert len(got.recipients) == len(rcpts)
    for stored, given in zip(got.recipients, rcpts):
        for f in dataclasses.fields(RecipientIn):
            assert getattr(stored, f.name) == getattr(given, f.name), f.name
        assert stored.state == "pending"
        assert stored.attempts == 0
        assert stored.next_attempt_at == msg.received_at
        assert stored.last_attempt_at is None
        assert stored.last_result is None
    assert got.recipients[0].domain == "b\u00fccher.example"


def test_unknown_id_reads_as_absent(q: SqliteQueue) -> None:
    assert q.get("0" * 24) is None
    assert q.recipients("0" * 24) == []
    assert q.message_data("0" * 24) is None
    assert q.count() == 0


def test_queue_ids_are_sortable_and_unique(q: SqliteQueue) -> None:
    new_id = QueueIdGenerator()
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)
    # another generator (another process, a restart) gives later and different ids
    later = QueueIdGenerator()()
    assert later > ids[0] and later not in ids

    first = q.submit(message()).result(timeout=10)
    second = q.submit(message()).result(timeout=10)
    assert re.fullmatch(r"[0-9a-f]{24}", first)
    assert first < second


def test_schema_and_database_settings(q: SqliteQueue, db: Path) -> None:
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        types = {
            row[1]: row[2] for row in raw.execute("PRAGMA table_info(message)")
        }
    finally:
        raw.close()
    # only what a query reads: each index costs every new message a B-tree insert
    assert {n for n in names if not n.startswith("sqlite_autoindex")} == {"recipient_next_attempt"}
    assert types["data"] == "BLOB"
    # the writer checkpoints less often than SQLite's default of 1000 pages
    assert q._writer_conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES == 4000


def _wal_syncs(monkeypatch, q: SqliteQueue, *, gate: threading.Event | None = None,
               error: OSError | None = None) -> list[bool]:
    """Record each fdatasync of the queue's WAL (True when the file synced is the WAL); with
    ``gate``, each waits for it; with ``error``, each fails with it."""
    real = os.fdatasync
    calls: list[bool] = []

    def fdatasync(fd: int) -> None:
        calls.append(os.fstat(fd).st_ino == os.stat(f"{q.path}-wal").st_ino)
        if gate is not None:
            assert gate.wait(10)
        if error is not None:
            raise error
        real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return calls


def test_sqlite_commits_without_fsync_and_the_writer_fsyncs_the_wal_before_the_answer(
        q: SqliteQueue, monkeypatch) -> None:
    assert q._writer_conn.execute("PRAGMA synchronous").fetchone()[0] == 1      # NORMAL
    gate = threading.Event()
    syncs = _wal_syncs(monkeypatch, q, gate=gate)
    future = q.submit(message())
    deadline = time.monotonic() + 10
    while not syncs and time.monotonic() < deadline:
        time.sleep(0.005)
    assert syncs == [True]                        # the WAL, once the commit is made ...
    time.sleep(0.05)
    assert not future.done()                      # ... and no answer before the fsync returns
    committed = sqlite3.connect(q.path)
    try:                                          # the commit itself is made (visible) already
        assert committed.execute("SELECT count(*) FROM message").fetchone()[0] == 1
    finally:
        committed.close()
    gate.set()
    assert q.get(future.result(timeout=10)) is not None
    assert syncs == [True]


def test_bookkeeping_that_may_be_lost_is_not_fsynced(q: SqliteQueue, monkeypatch) -> None:
    queue_id = q.submit(message()).result(timeout=10)
    syncs = _wal_syncs(monkeypatch, q)
    q.finish_later(queue_id, delete=True).result(timeout=10)
    assert syncs == []
    assert q.get(queue_id) is None
    q.submit(message()).result(timeout=10)
    assert syncs == [True]


@pytest.mark.parametrize("code, error", [(errno.EIO, QueueError), (errno.ENOSPC, QueueFull)])
def test_a_failed_fsync_fails_the_group_and_the_writer_goes_on(
        q: SqliteQueue, monkeypatch, code: int, error: type) -> None:
    syncs = _wal_syncs(monkeypatch, q, error=OSError(code, os.strerror(code)))
    with pytest.raises(error, match="fsync of the WAL failed"):
        q.submit(message()).result(timeout=10)
    assert syncs == [True]
    monkeypatch.undo()
    queue_id = q.submit(message(sender="second@ours.example")).result(timeout=10)
    assert q.get(queue_id).sender == "second@ours.example"
    # the failed group was committed all the same: the client, told 451/452, sends again and
    # the message may be queued twice, never lost
    raw = sqlite3.connect(q.path)
    try:
        senders = [row[0] for row in raw.execute("SELECT sender FROM message ORDER BY rowid")]
    finally:
        raw.close()
    assert senders == ["alice@ours.example", "second@ours.example"]


def _one_group(q: SqliteQueue, submit_all):
    """Run ``submit_all()`` while the writer is held inside another (non-durable) write, so that
    what it submits is taken as one group when the writer is let go; returns its result."""
    inside, gate = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        inside.set()
        gate.wait(10)
    blocker = q._enqueue(_Write(block, durable=False))
    assert inside.wait(10)
    try:
        return submit_all()
    finally:
        gate.set()
        blocker.result(timeout=10)


def test_a_group_of_a_message_and_bookkeeping_is_fsynced(q: SqliteQueue, monkeypatch) -> None:
    old = q.submit(message(sender="old@ours.example")).result(timeout=10)
    syncs = _wal_syncs(monkeypatch, q)
    before = q.stats()["transactions"]
    new, deleted = _one_group(q, lambda: (q.submit(message()), q.finish_later(old, delete=True)))
    assert q.get(new.result(timeout=10)) is not None and deleted.result(timeout=10) == []
    assert q.stats()["transactions"] - before == 2         # the blocker's group, then theirs
    assert syncs == [True]                                 # once, for the group with a message


def test_a_failed_fsync_fails_only_the_writes_that_needed_it(q: SqliteQueue, monkeypatch) -> None:
    old = q.submit(message(sender="old@ours.example")).result(timeout=10)
    syncs = _wal_syncs(monkeypatch, q, error=OSError(errno.EIO, os.strerror(errno.EIO)))
    new, deleted = _one_group(q, lambda: (q.submit(message()), q.finish_later(old, delete=True)))
    with pytest.raises(QueueError, match="fsync of the WAL failed"):
        new.result(timeout=10)
    assert deleted.result(timeout=10) == []        # bookkeeping needs no fsync: done, and said so
    assert q.get(old) is None
    assert syncs == [True]


def test_after_a_failed_fsync_durable_writes_wait_for_a_checkpoint_that_empties_the_wal(
        q: SqliteQueue, monkeypatch) -> None:
    _wal_syncs(monkeypatch, q, error=OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(QueueError, match="fsync of the WAL failed"):
        q.submit(message(sender="first@ours.example")).result(timeout=10)
    monkeypatch.undo()                             # the disk works again ...
    reader = sqlite3.connect(q.path, isolation_level=None)
    try:
        reader.execute("BEGIN")                    # ... but a reader holds an old snapshot, so
        reader.execute("SELECT count(*) FROM message").fetchone()   # no checkpoint can finish
        with pytest.raises(QueueError, match="earlier fsync of the queue's WAL failed"):
            q.submit(message(sender="refused@ours.example")).result(timeout=10)
        reader.execute("COMMIT")
    finally:
        reader.close()
    queue_id = q.submit(message(sender="third@ours.example")).result(timeout=10)   # checkpointed
    assert q.get(queue_id) is not None
    raw = sqlite3.connect(q.path)
    try:     # the refused message was never written; the first one, committed, stays
        senders = [row[0] for row in raw.execute("SELECT sender FROM message ORDER BY rowid")]
    finally:
        raw.close()
    assert senders == ["first@ours.example", "third@ours.example"]


def test_the_wal_fsynced_is_the_one_sqlite_writes_when_the_queue_path_is_a_link(
        tmp_path: Path, monkeypatch) -> None:
    real = tmp_path / "disk" / "queue.sqlite"
    real.parent.mkdir()
    link = tmp_path / "queue.sqlite"
    link.symlink_to(real)
    (tmp_path / "queue.sqlite-wal").write_bytes(b"")       # a stale file beside the link
    q = SqliteQueue(link)
    try:
        assert os.fstat(q._wal_fd).st_ino == os.stat(f"{real}-wal").st_ino
        q.submit(message()).result(timeout=10)
    finally:
        q.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_the_writer_thread_is_scheduled_as_batch_and_the_callers_are_not(tmp_path: Path) -> None:
    caller = os.sched_getscheduler(0)
    if caller != os.SCHED_OTHER:
        pytest.skip("the tests run under another scheduling policy, which the writer keeps")
    q = SqliteQueue(tmp_path / "queue.sqlite")
    try:
        q.submit(message()).result(timeout=10)       # the writer has started and written
        policy = os.sched_getscheduler(q._writer.native_id)
        if policy == os.SCHED_OTHER:
            pytest.skip("this system or sandbox refuses SCHED_BATCH (the writer runs as before)")
        assert policy == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == caller     # only the writer thread
    finally:
        q.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_policy_the_administrator_chose_is_kept(monkeypatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(os, "sched_getscheduler", lambda pid: os.SCHED_IDLE)
    monkeypatch.setattr(os, "sched_setscheduler", lambda *args: calls.append(args))
    assert batch_scheduling() is False and calls == []


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_writer_that_may_not_be_batch_writes_all_the_same(tmp_path: Path, monkeypatch) -> None:
    def refused(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "sched_setscheduler", refused)
    q = SqliteQueue(tmp_path / "queue.sqlite")
    try:
        queue_id = q.submit(message()).result(timeout=10)
        assert q.get(queue_id) is not None
        assert os.sched_getscheduler(q._writer.native_id) == os.sched_getscheduler(0)   # as it was
    finally:
        q.close()


def test_indexes_of_older_queues_are_dropped_at_open(tmp_path: Path) -> None:
    db = tmp_path / "queue.sqlite"
    SqliteQueue(db).close()
    raw = sqlite3.connect(db)
    raw.executescript("CREATE INDEX recipient_state ON recipient(state);"
                      "CREATE INDEX message_sender ON message(sender);"
                      "CREATE INDEX message_client_address ON message(client_address);")
    raw.close()
    reopened = SqliteQueue(db)
    try:
        reopened.submit(message(b"after\r\n")).result(timeout=10)
    finally:
        reopened.close()
    raw = sqlite3.connect(db)
    try:
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    finally:
        raw.close()
    assert not names & {"recipient_state", "message_sender", "message_client_address"}


def test_due_reads_only_recipients_due_through_the_partial_index(q: SqliteQueue, db: Path) -> None:
    # the runner's scan must not read every recipient of a large queue
    raw = sqlite3.connect(db)
    try:
        plan = [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + DUE_SQL, (1.0, 1.0, 10))]
    finally:
        raw.close()
    # "SEARCH r USING INDEX ..." (SQLite >= 3.36) or "SEARCH TABLE recipient AS r USING INDEX ..."
    assert plan[0].startswith("SEARCH") and "USING INDEX recipient_next_attempt (next_attempt_at<?)" in plan[0], plan


@pytest.mark.parametrize("selection", [
    {}, {"states": ("deferred",)}, {"sender": "a@b.example"}, {"recipient_domain": "example.org"},
    {"client": "192.0.2.0/24"}, {"auth_user": "alice"}, {"older_than": 10.0}, {"reply": "5.7.1"},
])
def test_summary_by_domain_reads_only_recipients_to_deliver(q: SqliteQueue, db: Path, selection: dict) -> None:
    from relaywarden.queue.store import MessageFilter
    q.submit(message()).result(timeout=10)
    where, params = MessageFilter(**selection).sql(time.time())
    q.shape(MessageFilter(**selection), "domain")        # INDEXED BY must find a plan for every selection
    raw = sqlite3.connect(db)
    store_functions(raw)
    try:
        plan = [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + shape_sql("domain", where), params)]
    finally:
        raw.close()
    assert any("USING INDEX recipient_next_attempt" in step for step in plan), plan


def test_group_commit_groups_concurrent_submissions(q: SqliteQueue) -> None:
    threads, per_thread = 8, 63  # 504 messages
    start = threading.Barrier(threads)
    results: list[list[str]] = [[] for _ in range(threads)]

    def session(n: int) -> None:
        start.wait(timeout=10)
        futures = [q.submit(message(f"msg {n}-{i}\r\n".encode())) for i in range(per_thread)]
        results[n] = [f.result(timeout=30) for f in futures]

    workers = [threading.Thread(target=session, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    all_ids = [i for ids in results for i in ids]
    assert len(all_ids) == threads * per_thread
    assert len(set(all_ids)) == len(all_ids)
    assert q.count() == len(all_ids)
    stats = q.stats()
    assert stats["messages"] == len(all_ids)
    assert stats["transactions"] <= len(all_ids) // 4, stats
    assert q.message_data(results[3][7]) == b"msg 3-7\r\n"


@pytest.mark.parametrize("count", [20, 150])
def test_a_group_of_new_messages_is_inserted_whole_with_every_field_and_recipient_id(db: Path, count: int) -> None:
    """The writer inserts a group's new messages in one statement into the incoming_v1 view
    (20: one statement's worth) or in multi-row statements per table (150); each message reads
    back exactly as submitted, and the ids that submit_with_ids gives are its recipients' ids in
    the message's order."""
    with SqliteQueue(db, group_wait=0.3) as queue:
        assert queue._incoming, "this SQLite has JSON functions: the view is used"
        msgs = [message(f"body {n}\r\n".encode(), client_port=n, helo=f"hélo-{n}", tls=None if n % 2 else "TLSv1.3 x",
                        recipients=tuple(recipient(f"r{n}-{k}@exämple.org", notify=("SUCCESS", "DELAY")[: k % 3],
                                                   orcpt=f"rfc822;o{k}@x.org" if k else None, route=None if k % 2 else "r")
                                         for k in range(1 + n % 4)))
                for n in range(count)]
        futures = [queue.submit_with_ids(m) if n % 2 else queue.submit(m) for n, m in enumerate(msgs)]
        results = [f.result(timeout=30) for f in futures]
        assert queue.stats()["transactions"] <= 3, "the messages were not grouped"
        for n, (m, result) in enumerate(zip(msgs, results)):
            qid, ids = result if n % 2 else (result, None)
            stored = queue.get(qid)
            assert queue.message_data(qid) == m.data and stored.client_port == n
            assert [r.address for r in stored.recipients] == [r.address for r in m.recipients]
            assert [r.notify for r in stored.recipients] == [r.notify for r in m.recipients]
            assert [(r.orcpt, r.route, r.original, r.verdict, r.decision_id) for r in stored.recipients] == [
                (r.orcpt, r.route, r.original, r.verdict, r.decision_id) for r in m.recipients]
            assert (stored.helo, stored.tls, stored.sender, stored.received_at) == (m.helo, m.tls, m.sender, m.received_at)
            assert all(r.next_attempt_at == m.received_at and r.state == "pending" for r in stored.recipients)
            if ids is not None:
                assert ids == [r.id for r in stored.recipients]


def test_group_commit_groups_sessions_that_wait_for_their_reply(db: Path) -> None:
    """Like SMTP sessions: each thread waits for its 250 before sending the next message."""
    with SqliteQueue(db, group_wait=0.02) as queue:
        threads, per_thread = 8, 25

        def session() -> None:
            for _ in range(per_thread):
                queue.submit(message()).result(timeout=30)

        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(session) for _ in range(threads)]:
                f.result(timeout=60)
        stats = queue.stats()
        assert queue.count() == threads * per_thread
        assert stats["messages"] == threads * per_thread
        assert stats["transactions"] <= threads * per_thread // 2, stats


def test_group_max_bounds_a_transaction(db: Path) -> None:
    with SqliteQueue(db, group_max=10, group_wait=0.2) as queue:
        futures = [queue.submit(message()) for _ in range(30)]
        ids = [f.result(timeout=30) for f in futures]
        assert len(set(ids)) == 30
        assert queue.stats()["transactions"] >= 3


def _fill_until_full(queue: SqliteQueue, body_size: int = 4000) -> tuple[list[str], Exception]:
    ids: list[str] = []
    for n in range(500):
        body = f"{n:05d}".encode() + b"x" * body_size
        try:
            ids.append(queue.submit(message(body)).result(timeout=10))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return ids, exc
    raise AssertionError("max_pages never filled up")


def test_full_database_raises_queue_full_and_keeps_what_was_committed(db: Path) -> None:
    with SqliteQueue(db, max_pages=80) as queue:
        ids, error = _fill_until_full(queue)
        assert isinstance(error, QueueFull)
        assert len(ids) > 5
        assert queue.count() == len(ids)
        for n, queue_id in enumerate(ids):
            assert queue.message_data(queue_id) == f"{n:05d}".encode() + b"x" * 4000
        # the writer survived; a message that fits still fails while the limit holds...
        with pytest.raises(QueueFull):
            queue.submit(message(b"y" * 4000)).result(timeout=10)
        # ...and succeeds once there is room again
        assert queue.set_max_pages(100_000) >= 100_000
        after = queue.submit(message(b"after\r\n")).result(timeout=10)
        assert queue.message_data(after) == b"after\r\n"
        assert queue.count() == len(ids) + 1


def test_deleting_frees_room_after_queue_full(db: Path) -> None:
    with SqliteQueue(db, max_pages=80) as queue:
        ids, error = _fill_until_full(queue)
        assert isinstance(error, QueueFull)
        assert all(queue.delete(i) for i in ids[:3])
        queue_id = queue.submit(message(b"z" * 4000)).result(timeout=10)
        assert queue.message_data(queue_id) == b"z" * 4000


def test_queue_full_in_the_middle_of_a_group_fails_only_what_does_not_fit(db: Path) -> None:
    with SqliteQueue(db, max_pages=60, group_wait=0.2) as queue:
        futures = [queue.submit(message(f"{n:03d}".encode() * 1500)) for n in range(100)]
        outcomes: list[str | Exception] = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=30))
            except Exception as exc:  # noqa: BLE001
                outcomes.append(exc)
        stored = [(n, o) for n, o in enumerate(outcomes) if isinstance(o, str)]
        failed = [o for o in outcomes if not isinstance(o, str)]
        assert stored and failed
        assert all(isinstance(e, QueueFull) for e in failed)
        assert queue.count() == len(stored)
        for n, queue_id in stored:
            assert queue.message_data(queue_id) == f"{n:03d}".encode() * 1500


def test_other_failures_raise_queue_error_alone_and_the_writer_survives(db: Path) -> None:
    with SqliteQueue(db, group_wait=0.2) as queue:
        good1 = queue.submit(message(b"one"))
        bad_verdict = queue.submit(message(recipients=(recipient(verdict="open-relay"),)))
        bad_body_type = queue.submit(message(body_type="9BIT"))
        no_recipient = queue.submit(message(recipients=()))
        good2 = queue.submit(message(b"two"))
        for bad in (bad_verdict, bad_body_type, no_recipient):
            with pytest.raises(QueueError) as caught:
                bad.result(timeout=10)
            assert not isinstance(caught.value, QueueFull)
        assert "CHECK constraint" in str(bad_verdict.exception())
        assert queue.message_data(good1.result(timeout=10)) == b"one"
        assert queue.message_data(good2.result(timeout=10)) == b"two"
        assert queue.count() == 2
        assert queue.stats()["failed"] == 3
        later = queue.submit(message(b"three")).result(timeout=10)
        assert queue.message_data(later) == b"three"


def test_close_flushes_pending_submissions(db: Path) -> None:
    queue = SqliteQueue(db, group_max=16)
    futures = [queue.submit(message(f"{n}".encode())) for n in range(200)]
    queue.close()
    assert all(f.done() for f in futures)
    ids = [f.result() for f in futures]
    with pytest.raises(QueueError):
        queue.submit(message()).result(timeout=1)
    queue.close()  # idempotent

    with SqliteQueue(db) as reopened:
        assert reopened.count() == 200
        assert reopened.message_data(ids[123]) == b"123"


def test_a_second_instance_sees_committed_messages_and_updates(db: Path) -> None:
    with SqliteQueue(db) as server, SqliteQueue(db) as operator:
        queue_id = server.submit(message(b"shared")).result(timeout=10)
        assert operator.count() == 1
        assert operator.message_data(queue_id) == b"shared"
        assert operator.set_hold(queue_id, True)
        held = server.get(queue_id)
        assert held is not None and held.hold and held.state == "held"
        # both write at once: sqlite serialises the two writers, nothing is lost
        futures = [w.submit(message()) for _ in range(50) for w in (server, operator)]
        assert len({f.result(timeout=30) for f in futures}) == 100
        assert server.count() == operator.count() == 101


@contextlib.contextmanager
def lock_held_by_another_process(db: Path):
    """Another connection holds the queue's write lock (BEGIN IMMEDIATE) until the block ends."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.execute("COMMIT")
        other.close()


def test_writes_wait_for_a_lock_held_by_another_process(db: Path) -> None:
    with SqliteQueue(db, busy_timeout=10.0) as queue:
        with lock_held_by_another_process(db):
            first = queue.submit(message(b"first"))
            time.sleep(0.2)  # the writer now waits for the lock with `first` in hand
            assert not first.done()
        queue_id = first.result(timeout=10)
        assert queue.message_data(queue_id) == b"first"
        assert queue.count() == 1


def test_a_submission_cancelled_before_the_writer_takes_it_is_never_written(db: Path) -> None:
    with SqliteQueue(db) as queue:
        def submit_and_cancel() -> None:            # while the writer sits in another write
            cancelled = queue.submit(message(b"cancelled"))
            assert cancelled.cancel()               # still in the inbox: cancelled for good
        _one_group(queue, submit_and_cancel)
        assert queue.submit(message(b"next")).result(timeout=10)
        assert [queue.message_data(m.id) for m in queue.find(MessageFilter())] == [b"next"]


def test_messages_that_arrive_while_a_group_waits_for_the_lock_join_it(db: Path) -> None:
    with SqliteQueue(db, busy_timeout=10.0) as queue:
        with lock_held_by_another_process(db):
            first = queue.submit(message(b"first"))
            time.sleep(0.2)  # the writer now waits for the lock with `first` in hand
            later = [queue.submit(message(b"later %d" % i)) for i in range(5)]
            time.sleep(0.1)  # ... and takes these into its group while it waits
            before = queue.stats()
            assert not first.done() and not any(f.done() for f in later)
        ids = [f.result(timeout=10) for f in [first, *later]]
        after = queue.stats()
        # one transaction for all six (without joining: two, `first` and then the rest)
        assert after["transactions"] - before["transactions"] == 1
        assert after["messages"] - before["messages"] == 6
        assert [queue.message_data(i) for i in ids] == [b"first"] + [b"later %d" % i for i in range(5)]


def test_a_write_that_cannot_join_a_waiting_group_is_done_after_it(db: Path) -> None:
    with SqliteQueue(db, busy_timeout=10.0) as queue:
        queue_id = queue.submit(message(b"to hold")).result(timeout=10)
        held: list[int] = []
        with lock_held_by_another_process(db):
            first = queue.submit(message(b"first"))
            time.sleep(0.2)  # the writer waits for the lock with `first` in hand
            worker = threading.Thread(target=lambda: held.append(queue.hold_many([queue_id], True)))
            worker.start()   # not a new message: the writer takes it out of the inbox and keeps it
            time.sleep(0.1)
            after = queue.submit(message(b"after"))
            time.sleep(0.1)
        worker.join(timeout=10)
        assert held == [1] and queue.get(queue_id).hold
        assert queue.message_data(first.result(timeout=10)) == b"first"
        assert queue.message_data(after.result(timeout=10)) == b"after"


def test_busy_timeout_expiry_is_a_queue_error(db: Path) -> None:
    with SqliteQueue(db, busy_timeout=0.2) as queue:
        with lock_held_by_another_process(db):
            with pytest.raises(QueueError):
                queue.submit(message()).result(timeout=10)
        assert queue.submit(message()).result(timeout=10)


def test_submit_async(q: SqliteQueue) -> None:
    async def two() -> list[str]:
        pair = await asyncio.gather(q.submit_async(message(b"a")), q.submit_async(message(b"b")))
        return list(pair)

    first, second = asyncio.run(two())
    assert q.message_data(first) == b"a"
    assert q.message_data(second) == b"b"


def test_record_attempt_deferred_delivered_failed(q: SqliteQueue) -> None:
    msg = message(
        recipients=(recipient("a@x.example"), recipient("b@y.example"), recipient("c@z.example")),
        received_at=1000.0,
    )
    queue_id = q.submit(msg).result(timeout=10)
    a, b, c = q.recipients(queue_id)

    busy = DeliveryResult(451, "4.7.1", "mx.x.example", "198.51.100.1", "try later", "RCPT", False)
    assert q.record_attempt(queue_id, a.id, busy, next_attempt_at=1300.0, attempted_at=1001.0)
    ok = DeliveryResult(250, "2.0.0", "mx.y.example", "198.51.100.2", "queued as X", "DATA", False)
    assert q.record_attempt(queue_id, b.id, ok, next_attempt_at=None, attempted_at=1002.0)
    denied = DeliveryResult(
        550, "5.7.1", "mx.z.example", "198.51.100.3", "relay denied", "RCPT", True
    )
    assert q.record_attempt(queue_id, c.id, denied, next_attempt_at=1300.0, attempted_at=1003.0)

    a, b, c = q.recipients(queue_id)
    assert (a.state, a.attempts, a.next_attempt_at) == ("deferred", 1, 1300.0)
    assert a.last_attempt_at == 1001.0
    assert a.last_result == busy
    assert (b.state, b.next_attempt_at, b.last_result) == ("delivered", None, ok)
    assert (c.state, c.next_attempt_at, c.last_result) == ("failed", None, denied)

    # a temporary failure with no next attempt (retries exhausted) is final
    expired = DeliveryResult(None, "4.4.7", None, None, "connection timed out", "CONNECT", False)
    assert q.record_attempt(queue_id, a.id, expired, next_attempt_at=None, attempted_at=1400.0)
    a = q.recipients(queue_id)[0]
    assert (a.state, a.attempts, a.last_result) == ("failed", 2, expired)
    got = q.get(queue_id)
    assert got is not None and got.state == "done" and got.count_in("failed") == 2

    assert not q.record_attempt(queue_id, 999_999, ok, next_attempt_at=None)
    assert not q.record_attempt("0" * 24, a.id, ok, next_attempt_at=None)


def test_due_honours_time_hold_and_limit(q: SqliteQueue) -> None:
    early = q.submit(message(received_at=100.0)).result(timeout=10)
    late = q.submit(message(received_at=200.0)).result(timeout=10)
    two = q.submit(
        message(recipients=(recipient("a@x.example"), recipient("b@x.example")), received_at=150.0)
    ).result(timeout=10)

    assert q.due(50.0, 10) == []
    assert [i for i, _ in q.due(1000.0, 10)] == [early, two, late]
    assert [i for i, _ in q.due(1000.0, 2)] == [early, two]
    assert [i for i, _ in q.due(160.0, 10)] == [early, two]

    a, b = q.recipients(two)
    busy = DeliveryResult(421, "4.3.2", "mx", "192.0.2.1", "shutting down", "CONNECT", False)
    q.record_attempt(two, a.id, busy, next_attempt_at=500.0)
    due = dict(q.due(300.0, 10))
    assert [r.address for r in due[two]] == ["b@x.example"]
    due = dict(q.due(600.0, 10))
    assert [r.address for r in due[two]] == ["a@x.example", "b@x.example"]

    assert q.set_hold(early, True)
    assert early not in dict(q.due(1000.0, 10))
    assert q.set_hold(early, False)
    assert early in dict(q.due(1000.0, 10))
    assert not q.set_hold("0" * 24, True)


def test_delete_removes_message_and_recipients(q: SqliteQueue, db: Path) -> None:
    msg = message(recipients=(recipient(), recipient("c@d.example")))
    queue_id = q.submit(msg).result(timeout=10)
    assert q.delete(queue_id)
    assert q.get(queue_id) is None
    assert q.recipients(queue_id) == []
    assert q.message_data(queue_id) is None
    assert not q.delete(queue_id)
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("SELECT count(*) FROM recipient").fetchone()[0] == 0
    finally:
        raw.close()


def test_reads_from_many_threads(q: SqliteQueue) -> None:
    ids = [q.submit(message(f"{n}".encode())).result(timeout=10) for n in range(20)]

    def read(n: int) -> bytes | None:
        return q.message_data(ids[n])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(read, range(20))) == [f"{n}".encode() for n in range(20)]


def test_without_the_incoming_view_new_messages_go_in_statement_by_statement(db: Path, monkeypatch) -> None:
    """An SQLite without JSON functions cannot make the incoming_v1 view: the writer says so
    and inserts with a statement per table; nothing else changes."""
    from relaywarden.queue import store

    monkeypatch.setattr(store, "INCOMING_SCHEMA", "CREATE VIEW broken AS SELECT json_nothing(FROM;")
    with SqliteQueue(db, group_wait=0.2) as queue:
        assert not queue._incoming
        futures = [queue.submit_with_ids(message(f"m{n}".encode())) for n in range(10)]
        for f in futures:
            qid, ids = f.result(timeout=10)
            assert queue.message_data(qid).startswith(b"m") and ids == [r.id for r in queue.recipients(qid)]
        assert queue.count() == 10


def test_a_committed_group_succeeds_even_when_its_recipient_ids_cannot_be_read(db: Path, monkeypatch) -> None:
    """After the commit nothing may fail the writes (the client would be told 451 and send the
    message again): ids that cannot be read come back as None."""
    from relaywarden.queue import store

    def broken(conn, queue_ids):
        raise sqlite3.OperationalError("disk I/O error")
    with SqliteQueue(db) as queue:
        monkeypatch.setattr(store, "_recipient_ids", broken)
        qid, ids = queue.submit_with_ids(message(b"kept")).result(timeout=10)
        assert ids is None and queue.message_data(qid) == b"kept"


# --- submit_to: completions reported to an event loop, one call per group ------------------------


def test_submit_to_reports_each_message_on_the_loop_thread_one_call_per_group(db: Path) -> None:
    async def main() -> tuple[list, int, set]:
        loop = asyncio.get_running_loop()
        calls = 0
        threads: set[int] = set()
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)
        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        results: list = [None] * 40
        finished = asyncio.Event()

        def done(n: int, result, exc) -> None:
            threads.add(threading.get_ident())
            results[n] = (result, exc)
            if all(r is not None for r in results):
                finished.set()
        # group_wait gathers the 40 writes into few groups
        with SqliteQueue(db, group_wait=0.05) as queue:
            for n in range(40):
                queue.submit_to(loop, message(f"m{n}".encode()), lambda r, e, n=n: done(n, r, e),
                                with_ids=n % 2 == 1)
            await asyncio.wait_for(finished.wait(), 30)
            transactions = queue.stats()["transactions"]
        assert calls == transactions < 40
        return results, calls, threads

    results, calls, threads = asyncio.run(main())
    assert threads == {threading.get_ident()}           # asyncio.run's loop runs in this thread
    assert all(exc is None for _, exc in results)
    ids = [r if n % 2 == 0 else r[0] for n, (r, _) in enumerate(results)]
    assert len(set(ids)) == 40
    for n, (result, _) in enumerate(results):
        if n % 2 == 1:
            queue_id, recipient_ids = result
            assert len(recipient_ids) == 1 and isinstance(recipient_ids[0], int)


def test_submit_to_reports_failures_and_a_closed_queue(db: Path) -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        outcomes: list = []
        got = asyncio.Event()

        def done(result, exc) -> None:
            outcomes.append((result, exc))
            got.set()
        with SqliteQueue(db, max_pages=60) as queue:
            for _ in range(200):                      # until the database is full
                got.clear()
                queue.submit_to(loop, message(b"x" * 4000), done)
                await asyncio.wait_for(got.wait(), 10)
                if outcomes[-1][1] is not None:
                    break
        got.clear()
        queue.submit_to(loop, message(), done)        # closed now
        await asyncio.wait_for(got.wait(), 10)
        return outcomes

    outcomes = asyncio.run(main())
    assert all(exc is None and isinstance(result, str) for result, exc in outcomes[:-2])
    assert outcomes[-2][0] is None and isinstance(outcomes[-2][1], QueueFull)
    assert outcomes[-1][0] is None and isinstance(outcomes[-1][1], QueueError)


def test_submit_to_a_failing_callback_does_not_stop_the_others(db: Path) -> None:
    async def main() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        seen: list = []
        finished = asyncio.Event()

        def done(n: int, result, exc) -> None:
            seen.append(n)
            if len(seen) == 6:
                finished.set()
            if n == 0:
                raise RuntimeError("a session's own bug")
        with SqliteQueue(db, group_wait=0.05) as queue:
            for n in range(6):
                queue.submit_to(loop, message(), lambda r, e, n=n: done(n, r, e))
            await asyncio.wait_for(finished.wait(), 30)
        return seen, errors

    seen, errors = asyncio.run(main())
    assert sorted(seen) == list(range(6))
    assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)


def test_submit_to_a_broken_loop_does_not_keep_the_others_waiting(db: Path, capsys) -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []
        finished = asyncio.Event()

        def done(result, exc) -> None:
            seen.append((result, exc))
            if len(seen) == 4:
                finished.set()
        with SqliteQueue(db, group_wait=0.05) as queue:
            queue.submit_to(None, message(), done)          # a server started without its loop
            for _ in range(4):
                queue.submit_to(loop, message(), done)
            await asyncio.wait_for(finished.wait(), 30)
            queue.submit(message()).result(timeout=10)       # and the writer goes on
        return seen

    seen = asyncio.run(main())
    assert all(exc is None for _, exc in seen)
    assert "cannot report 1 queue write(s)" in capsys.readouterr().err
