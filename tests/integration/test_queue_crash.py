"""Crash test of the durable queue: every id a killed process was told about survives SIGKILL.

A child process submits messages from a few threads (like SMTP sessions, each waiting for its
reply) and prints each queue id the moment its future resolves, i.e. the moment the server
would answer 250. The parent kills it with SIGKILL mid-stream, reopens the database and
requires every printed id, with its body byte for byte.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relaywarden.queue.store import SqliteQueue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROUNDS = 4
THREADS = 4
MAX_PER_THREAD = 3000  # the child stops by itself if it is never killed
ROUND_DEADLINE = 30.0  # seconds to collect ids in one round

CHILD = r"""
import sys, threading, time
from pathlib import Path
from relaywarden.queue.model import MessageIn, RecipientIn
from relaywarden.queue.store import SqliteQueue
sys.path.insert(0, sys.argv[4])
from test_queue_crash import body_for

path, round_no, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
max_per_thread = int(sys.argv[5])
q = SqliteQueue(path)
out = threading.Lock()

def session(thread_no):
    for seq in range(max_per_thread):
        msg = MessageIn(
            sender=f"s{thread_no}@ours.example",
            recipients=(RecipientIn(f"r{seq}@far.example", f"r{seq}@far.example", None, (),
                                    "relay", "default", "ab"),),
            data=body_for(round_no, thread_no, seq),
            received_at=time.time(), listener="mx", client_address="127.0.0.1",
            client_port=25000 + thread_no, helo="crash.test", auth_user=None, tls=None,
            body_type="8BITMIME", smtputf8=False, dsn_ret=None, dsn_envid=None,
            session_id=f"{round_no}-{thread_no}",
        )
        queue_id = q.submit(msg).result(timeout=30)
        with out:
            sys.stdout.write(f"{queue_id} {round_no} {thread_no} {seq}\n")
            sys.stdout.flush()

workers = [threading.Thread(target=session, args=(n,)) for n in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
q.close()
"""


def body_for(round_no: int, thread_no: int, seq: int) -> bytes:
    """A body whose every byte depends on its position, 1-24 KiB (several database pages)."""
    head = f"Subject: crash {round_no}/{thread_no}/{seq}\r\n\r\n".encode()
    size = 1024 + ((round_no * 7919 + thread_no * 104729 + seq * 613) % (23 * 1024))
    pattern = bytes((round_no + thread_no * 31 + seq * 17 + i) % 251 for i in range(251))
    return head + (pattern * (size // 251 + 1))[:size] + b"\r\n"


def _read_lines(stream, sink: queue.Queue[str | None]) -> None:
    for line in stream:
        sink.put(line)
    sink.put(None)


def _run_and_kill(db: Path, round_no: int, kill_after: int) -> list[tuple[str, int, int, int]]:
    """Start the child, collect ``kill_after`` ids, SIGKILL it, and return every id it printed
    (also those still in the pipe when it died)."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(db),
            str(round_no),
            str(THREADS),
            str(Path(__file__).parent),
            str(MAX_PER_THREAD),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True)
    reader.start()
    printed: list[tuple[str, int, int, int]] = []
    deadline = time.monotonic() + ROUND_DEADLINE
    try:
        while len(printed) < kill_after:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"round {round_no}: only {len(printed)} ids in {ROUND_DEADLINE}s")
            line = lines.get(timeout=remaining)
            if line is None:
                pytest.fail(f"child ended early: {child.stderr.read() if child.stderr else ''}")
            queue_id, r, t, s = line.split()
            printed.append((queue_id, int(r), int(t), int(s)))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    reader.join(timeout=10)
    while True:  # ids printed before the kill landed count as well
        line = lines.get(timeout=5)
        if line is None:
            break
        queue_id, r, t, s = line.split()
        printed.append((queue_id, int(r), int(t), int(s)))
    assert child.returncode == -signal.SIGKILL
    if child.stderr:
        child.stderr.close()
    if child.stdout:
        child.stdout.close()
    return printed


def test_every_acknowledged_message_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    rng = random.Random(895853)
    acknowledged: list[tuple[str, int, int, int]] = []
    for round_no in range(ROUNDS):
        acknowledged += _run_and_kill(db, round_no, kill_after=rng.randint(20, 60))

        raw = sqlite3.connect(db)
        try:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            raw.close()
        with SqliteQueue(db) as reopened:
            for queue_id, r, t, s in acknowledged:
                stored = reopened.get(queue_id)
                assert stored is not None, f"round {r}: acknowledged {queue_id} was lost"
                assert stored.session_id == f"{r}-{t}"
                assert [rc.address for rc in stored.recipients] == [f"r{s}@far.example"]
                assert reopened.message_data(queue_id) == body_for(r, t, s)
            assert reopened.count() >= len(acknowledged)

    assert len({a[0] for a in acknowledged}) == len(acknowledged)
    assert len(acknowledged) >= ROUNDS * 20


BOOKKEEPING_CHILD = r"""
import sys, time
from pathlib import Path
from relaywarden.queue.model import DeliveryResult, MessageIn, RecipientIn
from relaywarden.queue.store import SqliteQueue

q = SqliteQueue(Path(sys.argv[1]))
for seq in range(5000):
    msg = MessageIn(sender="s@ours.example", recipients=(RecipientIn("r@far.example", "r@far.example", None, (),
                    "relay", "default", "ab"),), data=b"Subject: x\r\n\r\nx\r\n", received_at=time.time(),
                    listener="mx", client_address="127.0.0.1", client_port=1, helo="h", auth_user=None, tls=None,
                    body_type="7BIT", smtputf8=False, dsn_ret=None, dsn_envid=None, session_id="s")
    qid = q.submit(msg).result(timeout=30)                         # durable: committed, then the WAL fsynced
    print("queued", qid, flush=True)
    # the runner's bookkeeping (finish_later: committed, not fsynced), as after a delivery
    if seq % 2:
        q.finish_later(qid, delete=True).result(timeout=30)
        print("deleted", qid, flush=True)
    else:
        rid = q.recipients(qid)[0].id
        later = DeliveryResult(451, "4.3.0", "h", None, "later", "RCPT", False)
        q.finish_later(qid, results=[(rid, later, time.time() + 60)]).result(timeout=30)
        print("deferred", qid, flush=True)
"""


def test_bookkeeping_commits_survive_sigkill_and_durable_ones_stay_durable(tmp_path: Path) -> None:
    """The runner's non-fsynced bookkeeping (finish_later) is still committed to the WAL before
    its future resolves: a killed process keeps it. Mixed with durable commits, nothing is lost."""
    db = tmp_path / "queue.sqlite"
    child = subprocess.Popen([sys.executable, "-c", BOOKKEEPING_CHILD, str(db)], stdout=subprocess.PIPE, text=True)
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 30
    assert child.stdout is not None
    while len(seen) < 300 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        kind, qid = line.split()
        seen.append((kind, qid))
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    seen += [tuple(line.split()) for line in child.stdout.read().splitlines() if line.strip()]
    with SqliteQueue(db) as q:
        for kind, qid in seen:
            if kind == "deleted":
                assert q.get(qid) is None, qid
            elif kind == "deferred":
                assert q.get(qid).recipients[0].state == "deferred", qid
        queued = {qid for kind, qid in seen if kind == "queued"}
        gone = {qid for kind, qid in seen if kind == "deleted"}
        assert all(q.get(qid) is not None for qid in queued - gone)
