"""How long ``fdatasync`` takes on this machine, idle and with every core busy, as an ordinary
and as a SCHED_BATCH thread: a measurement aid for the queue writer, not a benchmark against a
peer.

The queue writer fsyncs the WAL after each group; under load its fsyncs took ten times longer
than on an idle machine (docs/benchmarks.md, fifth session). This shows where that comes from:
the disk answers as fast as ever, but each wake-up inside the call waits for a core, and a batch
thread (which may not preempt) waits longest. Each case writes 16 KiB in place into a 4 MiB file
in a temporary directory and fsyncs it, a bounded number of times; the busy cores are processes
that spin until the case ends.

    .venv/bin/python bench/fsync_latency.py                  # 300 fsyncs per case
    .venv/bin/python bench/fsync_latency.py --count 100 --dir /var/lib/relaywarden
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

SIZE = 4 << 20
BLOCK = 16384


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _case(path: str, count: int) -> list[float]:
    fd = os.open(path, os.O_WRONLY)
    try:
        times = []
        for i in range(count):
            os.pwrite(fd, b"x" * BLOCK, (i * BLOCK) % (SIZE - BLOCK))
            start = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - start) * 1000)
        return times
    finally:
        os.close(fd)


def _line(label: str, times: list[float]) -> str:
    ordered = sorted(times)
    return (f"{label:38s} fdatasync median {statistics.median(ordered):5.2f} ms, "
            f"p90 {ordered[int(len(ordered) * 0.9)]:5.2f}, mean {statistics.fmean(ordered):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=300, help="fsyncs per case (default 300)")
    ap.add_argument("--dir", help="directory for the file (default: a temporary one)")
    ap.add_argument("--spinners", type=int, default=os.cpu_count() or 2,
                    help="busy processes in the loaded cases (default: one per core)")
    args = ap.parse_args()
    count = max(1, min(args.count, 10_000))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="rw-fsync-") as root:
        path = os.path.join(root, "file")
        with open(path, "wb") as f:
            f.write(b"\0" * SIZE)
            f.flush()
            os.fsync(f.fileno())
        print(_line("idle, ordinary thread", _case(path, count)), flush=True)
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                    for _ in range(max(0, args.spinners))]
        for p in spinners:
            p.start()
        try:
            time.sleep(0.5)
            label = f"{len(spinners)} busy processes, ordinary thread"
            print(_line(label, _case(path, count)), flush=True)
            try:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            except (AttributeError, OSError) as exc:
                print(f"SCHED_BATCH refused here ({exc}); no batch case")
            else:
                label = f"{len(spinners)} busy processes, batch thread"
                print(_line(label, _case(path, count)), flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join(5)
                if p.is_alive():
                    p.kill()


if __name__ == "__main__":
    main()
