"""CPU per message of the queue alone: processes that each submit 4 KiB messages to one
``queue.sqlite`` from several threads, as the accepting workers do; a measurement aid for the
queue's schema and writer, not a benchmark against a peer.

Prints, for each variant, messages per second, the processes' CPU per message (user and system,
every thread: the writer's SQLite work, its fsyncs and the submitting threads) and the messages
per commit. Variants run alternately, so that a machine that changes speed affects them alike:

    .venv/bin/python bench/queue_cpu.py                          # the queue as it is
    .venv/bin/python bench/queue_cpu.py --variants current,old-indexes --rounds 3
    .venv/bin/python bench/queue_cpu.py --processes 1 --threads 20

``old-indexes`` adds the five indexes queues had before 2026-11-29 (``DROPPED_INDEXES``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from relaywarden.queue import store  # noqa: E402
from relaywarden.queue.model import MessageIn, RecipientIn  # noqa: E402

OLD_INDEXES = """
CREATE INDEX IF NOT EXISTS recipient_state ON recipient(state);
CREATE INDEX IF NOT EXISTS recipient_domain ON recipient(domain);
CREATE INDEX IF NOT EXISTS message_sender ON message(sender);
CREATE INDEX IF NOT EXISTS message_auth_user ON message(auth_user);
CREATE INDEX IF NOT EXISTS message_client_address ON message(client_address);
"""
VARIANTS = ("current", "old-indexes")


def _message(thread: int, n: int, body: bytes) -> MessageIn:
    return MessageIn(
        sender=f"sender{thread}@client.example.org",
        recipients=(RecipientIn(address="postmaster@example.test", original="<postmaster@example.test>",
                                orcpt=None, notify=(), verdict="local", route=None,
                                decision_id=f"{thread:x}{n:06x}"),),
        data=body, received_at=time.time(), listener="mx", client_address="127.0.0.1",
        client_port=40000 + thread, helo="client.example.org", auth_user=None, tls=None,
        body_type="7BIT", smtputf8=False, dsn_ret=None, dsn_envid=None, session_id=f"s{thread}")


def _worker(variant: str, path: str, messages: int, threads: int, results: multiprocessing.Queue) -> None:
    if variant == "old-indexes":
        store.DROPPED_INDEXES = ()          # keep them: the queue drops them at open otherwise
    queue = store.SqliteQueue(Path(path))
    line = b"x" * 76 + b"\r\n"
    body = b"Received: from client.example.org\r\nSubject: bench\r\n\r\n" + line * (4096 // len(line))

    def session(thread: int) -> None:
        for n in range(messages // threads):
            queue.submit(_message(thread, n, body)).result()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    running = [threading.Thread(target=session, args=(t,)) for t in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    transactions = queue.stats()["transactions"]
    queue.close()
    results.put((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                 time.perf_counter() - start, transactions))


def run(variant: str, processes: int, messages: int, threads: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="rw-queue-cpu-"))
    try:
        path = root / "queue.sqlite"
        store.SqliteQueue(path).close()
        if variant == "old-indexes":
            import sqlite3
            conn = sqlite3.connect(path)
            conn.executescript(OLD_INDEXES)
            conn.close()
        results: multiprocessing.Queue = multiprocessing.Queue()
        started = time.perf_counter()
        workers = [multiprocessing.Process(target=_worker, args=(variant, str(path), messages, threads, results))
                   for _ in range(processes)]
        for w in workers:
            w.start()
        outcomes = [results.get() for _ in workers]
        for w in workers:
            w.join()
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = processes * (messages // threads) * threads
    user = sum(o[0] for o in outcomes) / total * 1e6
    system = sum(o[1] for o in outcomes) / total * 1e6
    commits = sum(o[3] for o in outcomes)
    return (f"{variant:12s} {processes} process(es) x {threads} threads: {total / wall:6.0f} msg/s, "
            f"CPU per message user {user:4.0f} us + system {system:4.0f} us = {user + system:4.0f} us, "
            f"{total / commits:.1f} messages per commit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="current", help=f"comma separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--processes", type=int, default=2, help="submitting processes (default 2)")
    ap.add_argument("--threads", type=int, default=10, help="submitting threads per process (default 10)")
    ap.add_argument("--messages", type=int, default=4000, help="messages per process (default 4000)")
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times, alternately")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    for _ in range(args.rounds):
        for v in variants:
            print(run(v, args.processes, args.messages, args.threads), flush=True)


if __name__ == "__main__":
    main()
