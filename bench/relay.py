"""End-to-end relay benchmark: relaywarden and a Debian Postfix configured alike relay one domain
to an ``smtp-sink`` on loopback, measured with Postfix's smtp-source in the same run.

Usage (from the repository root, as root because Postfix is started with its own config dir):

    .venv/bin/python bench/relay.py                            # 3000 messages per 20-session run
    .venv/bin/python bench/relay.py --repeat 3                 # every mode three times, medians
    .venv/bin/python bench/relay.py --py-spy /tmp/pyspy/bin/py-spy   # and profile relaywarden

Both servers accept mail for ``example.test`` and forward it to their own smtp-sink (one per
server, dumping every message into a file under /dev/shm, counted the same way for both):

- relaywarden: ``example.test`` is an external-relay domain whose route is a smarthost
  ``127.0.0.1:SINKPORT`` without TLS; the queue is SQLite (WAL), the 250 after
  DATA follows the commit and the fsync of the WAL, every delivery result is committed before the message is removed.
- Postfix (``bench/postfix.py``, mode ``relay``): ``example.test`` in ``relay_domains``, a
  transport map sends it to ``relay:[127.0.0.1]:SINKPORT``; cleanup fsyncs the queue file before
  the 250, qmgr removes it after the delivery.  Everything else is Postfix's default.

For every mode the tool measures the accepted rate (messages / wall time of smtp-source) and the
end-to-end rate (messages / time from the start of smtp-source until the sink holds every one of
them).  A run counts only when the sink got exactly the number sent (no loss, no duplicate) and
the server's queue is empty afterwards.  Peak memory is sampled from /proc every 50 ms.

Every process started here (both servers, both sinks, smtp-source, the profiler) is stopped at
the end, also on error, timeout or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accept import (  # noqa: E402  (the acceptance benchmark's measuring pieces)
    DOMAIN,
    RECIPIENT,
    SENDER,
    SMTP_SOURCE,
    Memory,
    MemorySampler,
    Mode,
    Profiler,
    Relaywarden,
    cpu_seconds,
    free_port,
    hwm_kib,
    machine,
    median,
    summarize_profile,
)
from postfix import PostfixInstance  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"

RELAYWARDEN_CONFIG = """\
[server]
hostname = "mx.example.test"
workers = {workers}

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port}
tls = "none"
anonymous = true

[[domain]]
name = "{domain}"
kind = "external-relay"
route = "sink"

[[route]]
name = "sink"
domains = ["{domain}"]
kind = "smarthost"
hosts = ["127.0.0.1:{sink_port}"]
tls = "none"

[delivery]
poll_interval = 0.2
max_per_destination = {per_destination}
"""


class Sink:
    """smtp-sink on one loopback port, every message dumped to a file in a tmpfs directory."""

    def __init__(self, name: str, port: int, backlog: int = 256):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix=f"relaywarden-bench-sink-{name}-", dir="/dev/shm"))
        self.dir.chmod(0o777)            # smtp-sink runs as nobody (it refuses root)
        self.backlog = backlog
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Sink:
        args = [SMTP_SINK] + (["-u", "nobody"] if os.geteuid() == 0 else [])
        args += ["-d", f"{self.dir}/%M.", f"127.0.0.1:{self.port}", str(self.backlog)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink did not listen on {self.port}") from None
                time.sleep(0.05)

    def count(self) -> int:
        """Messages received (one dump file each)."""
        with os.scandir(self.dir) as entries:
            return sum(1 for _ in entries)

    def clear(self) -> None:
        with os.scandir(self.dir) as entries:
            for e in entries:
                os.unlink(e.path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class RelayingRelaywarden(Relaywarden):
    """relaywarden serve relaying ``example.test`` to a sink (delivery on)."""

    def __init__(self, root: Path, port: int, sink_port: int, per_destination: int, workers: int = 1):
        super().__init__(root, port, workers)
        self.sink_port = sink_port
        self.per_destination = per_destination

    def start(self, timeout: float = 30.0) -> RelayingRelaywarden:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(RELAYWARDEN_CONFIG.format(port=self.port, domain=DOMAIN, sink_port=self.sink_port,
                                                         per_destination=self.per_destination,
                                                         workers=self.workers))
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaywarden", "serve", "--config", str(self.config),
                 "--data-dir", str(self.data_dir)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relaywarden exited with {self.proc.returncode}:\n{self.output.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relaywarden did not listen within {timeout}s") from None
                time.sleep(0.05)

    def queued(self) -> int:
        """Messages in queue.sqlite, read with a plain read-only connection (no writer thread here)."""
        path = self.data_dir / "queue.sqlite"
        if not path.exists():
            return 0
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM message").fetchone()[0])
        finally:
            conn.close()

    def settled(self) -> bool:
        return self.queued() == 0


@dataclass
class RelayResult:
    server: str
    mode: str
    messages: int
    accept_seconds: float
    e2e_seconds: float
    delivered: int
    cpu_seconds: float | None = None
    error: str | None = None

    @property
    def accept_rate(self) -> float:
        return self.messages / self.accept_seconds if self.accept_seconds > 0 and not self.error else 0.0

    @property
    def e2e_rate(self) -> float:
        return self.messages / self.e2e_seconds if self.e2e_seconds > 0 and not self.error else 0.0


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def relay_run(name: str, server, port: int, sink: Sink, mode: Mode, size: int, timeout: float,
              cpu_pid=None) -> RelayResult:
    """One smtp-source run: time to the last 250 and time until the sink holds every message."""
    if not wait_until(server.settled, 120, 0.2):
        return RelayResult(name, mode.name, mode.messages, 0, 0, 0, error="queue not empty before the run")
    sink.clear()
    cmd = [SMTP_SOURCE, *mode.args(size), "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    cpu0 = cpu_seconds(cpu_pid()) if cpu_pid else None
    start = time.monotonic()
    log = tempfile.TemporaryFile()              # not a pipe: a chatty smtp-source never blocks on it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    accept_s = e2e_s = 0.0
    error = None
    try:
        deadline = start + timeout
        ticks = 0
        while True:      # smtp-source's end is noticed within 5 ms; the sink is counted every 50 ms
            now = time.monotonic()  # while smtp-source runs and every 10 ms after it
            if not accept_s and proc.poll() is not None:
                accept_s = now - start
            if (accept_s or ticks % 10 == 0) and sink.count() >= mode.messages:
                e2e_s = time.monotonic() - start
                break
            if now > deadline:
                error = f"timed out after {timeout}s: sink has {sink.count()} of {mode.messages}"
                break
            ticks += 1
            time.sleep(0.01 if accept_s else 0.005)
        if not accept_s:
            proc.wait(max(1.0, deadline - time.monotonic()))
            accept_s = time.monotonic() - start
    except subprocess.TimeoutExpired:
        error = error or f"smtp-source still running after {timeout}s"
    finally:
        stop_process(proc)
    log.seek(0)
    output = log.read().decode(errors="replace").strip()
    log.close()
    cpu = cpu_seconds(cpu_pid()) - cpu0 if cpu_pid else None
    if proc.returncode not in (0, None) and error is None:
        error = f"smtp-source exited {proc.returncode}: {output[-500:]}"
    elif output and error is None:
        error = f"smtp-source: {output[-500:]}"
    e2e_s = max(e2e_s, accept_s) if e2e_s else e2e_s
    time.sleep(0.5)                                     # a duplicate would arrive now
    delivered = sink.count()
    if error is None and delivered != mode.messages:
        error = f"sink got {delivered} messages, {mode.messages} were sent"
    if error is None and not wait_until(server.settled, 60, 0.2):
        error = "queue not empty after every message reached the sink"
    return RelayResult(name, mode.name, mode.messages, accept_s, e2e_s, delivered, cpu, error)


# --- profile: where relaywarden's time goes while it relays -----------------------------------------

AREAS = (   # (label, substring of a frame: "function (path:line)"), innermost relaywarden frame decides
    ("queue runner (scan, grouping, results, delete)", "relaywarden/delivery/runner.py"),
    ("outbound SMTP: SessionPool / client driver", "relaywarden/delivery/smtp_client.py"),
    ("outbound SMTP: protocol core (client)", "relaywarden/protocol/client.py"),
    ("queue store (SQLite reads and writes)", "relaywarden/queue/"),
    ("inbound SMTP: server session", "relaywarden/server/"),
    ("inbound SMTP: protocol core (server)", "relaywarden/protocol/"),
    ("events (log records)", "relaywarden/events.py"),
    ("delivery status notices", "relaywarden/dsn/"),
    ("relay policy", "relaywarden/policy/"),
)

FUNCTIONS = (  # inclusive shares of the functions that make up the delivery path
    "run_once", "_deliver_message", "_deliver_group", "_deliver_remote", "deliver (",
    "_take_idle", "_fresh_attempt", "_transaction", "_release", "_finish_session", "_record",
    "_event_for", "_after_attempts", "due (", "get (", "message_data (", "delete (",
    "_update_recipient", "_insert", "_apply_group", "_commit_group", "_gather", "to_thread", "run (",
)


def delivery_breakdown(path: Path) -> str:
    """Samples by thread, by relaywarden area (innermost relaywarden frame) and key functions."""
    threads: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    funcs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        thread = frames[0]
        threads["queue writer" if "queue-writer" in thread else
                 "asyncio.to_thread workers" if "asyncio_" in thread or "ThreadPoolExecutor" in thread else
                 "event loop (main)" if "MainThread" in thread or "main" in thread.lower() else thread] += n
        area = "outside relaywarden (uvloop, sqlite3, stdlib, idle)"
        for f in reversed(frames[1:]):
            if "relaywarden/" in f:
                area = next((label for label, key in AREAS if key in f), "other relaywarden")
                break
        areas[area] += n
        joined = ";".join(frames[1:])
        for fn in FUNCTIONS:
            if fn in joined:
                funcs[fn] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "by thread:"]
    out += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common()]
    out.append("by area (innermost relaywarden frame):")
    out += [f"  {n / total:6.1%}  {a}" for a, n in areas.most_common()]
    out.append("inclusive, delivery path:")
    out += [f"  {n / total:6.1%}  {f.strip(' (')}" for f, n in funcs.most_common()]
    return "\n".join(out)


# --- report -----------------------------------------------------------------------------------------

def report(results: list[RelayResult], memory: dict[str, Memory], rw_hwm: int, info: dict) -> str:
    lines = [f"{info['date']}  nproc={info['nproc']}  {info['cpu']}  kernel {info['kernel']}  "
             f"Python {info['python']}  Postfix {info['postfix']}", ""]
    lines.append(f"{'mode':<42} {'accepted rw':>12} {'pf':>10} {'ratio':>6}   {'end-to-end rw':>13} "
                 f"{'pf':>10} {'ratio':>6}  rw CPU s/1000  range e2e rw | pf")
    by_mode: dict[str, dict[str, list[RelayResult]]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {}).setdefault(r.server, []).append(r)
    for mode, rs in by_mode.items():
        rw, pf = rs.get("relaywarden", []), rs.get("postfix", [])
        acc_rw = median([r.accept_rate for r in rw]) if rw else 0.0
        acc_pf = median([r.accept_rate for r in pf]) if pf else 0.0
        e2e_rw_all, e2e_pf_all = [r.e2e_rate for r in rw], [r.e2e_rate for r in pf]
        e2e_rw = median(e2e_rw_all) if rw else 0.0
        e2e_pf = median(e2e_pf_all) if pf else 0.0
        cpu = [1000 * r.cpu_seconds / r.messages for r in rw if r.cpu_seconds and not r.error]
        spread = (f"  {min(e2e_rw_all):.0f}-{max(e2e_rw_all):.0f} | {min(e2e_pf_all):.0f}-{max(e2e_pf_all):.0f}"
                  if len(rw) > 1 and pf else "")
        lines.append(f"{mode:<42} {acc_rw:>6.0f} msg/s {acc_pf:>6.0f} msg/s {ratio(acc_rw, acc_pf)}   "
                     f"{e2e_rw:>7.0f} msg/s {e2e_pf:>6.0f} msg/s {ratio(e2e_rw, e2e_pf)}  "
                     f"{median(cpu) if cpu else 0:>13.2f}{spread}")
    for r in results:
        if r.error:
            lines.append(f"  ! {r.server}, {r.mode}: {r.error}")
    lines.append("")
    for name, m in memory.items():
        extra = f", VmHWM {rw_hwm / 1024:.1f} MiB" if name == "relaywarden" and rw_hwm else ""
        lines.append(f"peak RSS {name:<12} {m.peak_kib / 1024:7.1f} MiB summed over {m.peak_processes} "
                     f"process(es) (PSS {m.peak_pss_kib / 1024:.1f} MiB){extra}")
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if a and b else "    - "


def cleanup(steps) -> None:
    """Run every stop step; one failure does not keep the rest running."""
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except Exception as exc:  # keep stopping the rest
            print(f"cleanup: {getattr(step, '__qualname__', step)} failed: {exc!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages per 20-session run (default 3000)")
    ap.add_argument("--single-messages", type=int, default=1000, help="messages per 1-session run (default 1000)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent smtp-source sessions (default 20)")
    ap.add_argument("--size", type=int, default=4096, help="message size in octets (smtp-source -l, default 4096)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per run, end to end (default 180)")
    ap.add_argument("--repeat", type=int, default=1, help="measure every mode this many times, report the median")
    ap.add_argument("--workers", type=int, default=1, help="relaywarden server.workers (default 1)")
    ap.add_argument("--per-destination", type=int, default=20,
                    help="relaywarden [delivery] max_per_destination (default 20, Postfix's "
                         "default_destination_concurrency_limit)")
    ap.add_argument("--modes", default="new,reuse",
                    help="new: a new connection per message; reuse: smtp-source -d; comma-separated (default both)")
    ap.add_argument("--py-spy", metavar="PATH", help="profile relaywarden with this py-spy binary during its runs")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not Path(tool).exists():
            print(f"{tool} not found: apt-get install postfix", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("run as root: Postfix is started with its own configuration directory", file=sys.stderr)
        return 2

    kinds = [k.strip() for k in args.modes.split(",") if k.strip()]
    modes = []
    for sessions, count in ((args.sessions, args.messages), (1, args.single_messages)):
        for kind in kinds:
            label = "new connection per message" if kind == "new" else "one connection (-d)"
            modes.append(Mode(f"{sessions} session{'s' if sessions > 1 else ''}, {label}", sessions,
                              kind == "reuse", count))
    warmup = Mode("warm-up", args.sessions, False, 200)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    root = Path(tempfile.mkdtemp(prefix="relaywarden-bench-relay-"))
    os.chmod(root, 0o755)
    rw_sink, pf_sink = Sink("rw", free_port()), Sink("pf", free_port())
    rw = RelayingRelaywarden(root / "relaywarden", free_port(), rw_sink.port, args.per_destination, args.workers)
    pf = PostfixInstance(root / "postfix", free_port(), domain=DOMAIN, queue_mode="relay", relay_port=pf_sink.port)
    sampler: MemorySampler | None = None
    profiler: Profiler | None = None
    results: list[RelayResult] = []
    info = machine()
    servers = (("relaywarden", rw, rw_sink), ("postfix", pf, pf_sink))
    try:
        rw_sink.start()
        pf_sink.start()
        rw.start()
        pf.start()
        print(f"relaywarden on 127.0.0.1:{rw.port} -> sink {rw_sink.port}, Postfix on 127.0.0.1:{pf.port} -> "
              f"sink {pf_sink.port}, in {root}", flush=True)
        for name, server, sink in servers:
            r = relay_run(name, server, server.port, sink, warmup, args.size, args.timeout)
            if r.error:
                raise RuntimeError(f"warm-up of {name} failed: {r.error}")
        sampler = MemorySampler({"relaywarden": rw.pids, "postfix": pf.pids})
        sampler.start()
        if args.py_spy:
            profiler = Profiler(args.py_spy, rw.proc.pid, root / "relaywarden.pyspy.txt")
        for mode in [m for _ in range(max(1, args.repeat)) for m in modes]:
            for name, server, sink in servers:
                cpu_pid = (lambda: rw.proc.pid) if name == "relaywarden" else None
                r = relay_run(name, server, server.port, sink, mode, args.size, args.timeout, cpu_pid)
                results.append(r)
                print(f"  {name:<12} {mode.name:<40} {r.delivered:>5}: accepted in {r.accept_seconds:6.2f} s "
                      f"= {r.accept_rate:5.0f} msg/s, at the sink in {r.e2e_seconds:6.2f} s = {r.e2e_rate:5.0f} msg/s"
                      + (f"  ! {r.error}" if r.error else ""), flush=True)
        if profiler is not None:
            profiler.stop()
        rw_hwm = hwm_kib(rw.proc.pid)
        sampler.stop()
        print()
        print(report(results, sampler.memory, rw_hwm, info))
        print(f"\ncommand: {' '.join([Path(sys.executable).name, 'bench/relay.py', *(argv if argv is not None else sys.argv[1:])])}")
        if profiler is not None and profiler.output.exists():
            print("\nrelaywarden profile (py-spy, all relay runs):")
            print(delivery_breakdown(profiler.output))
            print(summarize_profile(profiler.output, top=30))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": info, "per_destination": args.per_destination,
                "results": [asdict(r) | {"accept_rate": r.accept_rate, "e2e_rate": r.e2e_rate} for r in results],
                "memory": {k: asdict(v) for k, v in sampler.memory.items()}, "relaywarden_vmhwm_kib": rw_hwm,
            }, indent=2))
        return 1 if any(r.error for r in results) else 0
    finally:
        cleanup([profiler.stop if profiler else None, sampler.stop if sampler else None,
                 rw.stop, pf.stop, rw_sink.stop, pf_sink.stop])
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
