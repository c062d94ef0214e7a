"""How long a message waits for its commit, and how the queue writer spends a group: a
measurement aid for the queue, not a benchmark against a peer.

Runs relaywarden (`bench/accept.py`'s configuration: one listener, delivery off) under a small
instrumentation that times, in every accepting process, each write from the moment a session
hands it to the queue until the session's event loop runs its completion (what the client
waits for between the end of DATA and the 250), and each group the writer thread commits (wall time and the thread's CPU
time). Postfix's `smtp-source` sends the mail. Per process it prints the median, 90th and 99th
percentile waits, the number of groups, their mean size, and a group's median wall and CPU time;
the difference between those two is time the writer thread spent not running: the fsync, the
other processes' turn at the write lock, and waiting for the GIL.

    .venv/bin/python bench/queue_latency.py                    # 20 sessions, new connection each
    .venv/bin/python bench/queue_latency.py --reuse --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def instrumented_serve(argv: list[str]) -> None:
    """In the server process: wrap the queue's enqueue and group commit, report at the end."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from relaywarden.cli.main import main as cli
    from relaywarden.queue import store
    from relaywarden.server import app

    waits: list[float] = []
    groups: list[tuple[int, float, float]] = []
    enqueue, commit_group, serve = store.SqliteQueue._enqueue, store.SqliteQueue._commit_group, app._serve

    def timed_enqueue(self, write):
        start = time.perf_counter()
        done = write.future
        if isinstance(done, store.LoopCompletion):
            # the SMTP server's writes (submit_to): timed when their callback runs on the loop
            callback = done.callback

            def timed(result, exc):
                waits.append(time.perf_counter() - start)
                callback(result, exc)
            done.callback = timed
            return enqueue(self, write)
        future = enqueue(self, write)
        future.add_done_callback(lambda _f: waits.append(time.perf_counter() - start))
        return future

    def timed_group(self, conn, group):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return commit_group(self, conn, group)
        finally:
            groups.append((len(group), time.perf_counter() - wall, time.thread_time() - cpu))

    def reporting_serve(*args, **kwargs):
        try:
            return serve(*args, **kwargs)
        finally:
            if waits:
                print("queue-latency " + json.dumps({"pid": os.getpid(), "waits": waits, "groups": groups}),
                      file=sys.stderr, flush=True)

    store.SqliteQueue._enqueue = timed_enqueue
    store.SqliteQueue._commit_group = timed_group
    app._serve = reporting_serve
    sys.argv = ["relaywarden", *argv]
    cli()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d: many messages per connection")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from accept import RECIPIENT, SENDER, SMTP_SOURCE, Relaywarden, free_port

    root = Path(tempfile.mkdtemp(prefix="relaywarden-queue-latency-"))
    server = Relaywarden(root, free_port(), args.workers,
                         launcher=[sys.executable, str(Path(__file__).resolve()), "--serve"]).start()
    try:
        started = time.perf_counter()
        subprocess.run([SMTP_SOURCE, *(["-d"] if args.reuse else []), "-s", str(args.sessions), "-l", "4096",
                        "-m", str(args.messages), "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{server.port}"],
                       check=True, timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        server.stop()
    print(f"{args.messages} messages, {args.sessions} sessions{' (-d)' if args.reuse else ''}, "
          f"{args.workers} worker(s): {elapsed:.2f} s, {args.messages / elapsed:.0f} msg/s")
    for line in server.output.read_text().splitlines():
        match = re.match(r"queue-latency (\{.*\})$", line)
        if not match:
            continue
        report = json.loads(match.group(1))
        waits, groups = report["waits"], report["groups"]
        print(f"  pid {report['pid']}: {len(waits)} writes, wait for the commit median "
              f"{_percentile(waits, .5) * 1e3:.2f} ms, p90 {_percentile(waits, .9) * 1e3:.2f}, "
              f"p99 {_percentile(waits, .99) * 1e3:.2f}; {len(groups)} groups of "
              f"{sum(g[0] for g in groups) / max(1, len(groups)):.1f} on average, a group's wall median "
              f"{_percentile([g[1] for g in groups], .5) * 1e3:.2f} ms, its thread's CPU median "
              f"{_percentile([g[2] for g in groups], .5) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        instrumented_serve(sys.argv[2:])
    else:
        sys.exit(main())
