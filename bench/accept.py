"""Acceptance benchmark: messages per second accepted (250 after DATA, durably queued) by
relaywarden and by a Debian Postfix configured alike, measured with Postfix's smtp-source in
the same run on loopback.

Usage (from the repository root, as root because Postfix is started with its own config dir):

    .venv/bin/python bench/accept.py                      # 5000 messages per 20-session run
    .venv/bin/python bench/accept.py --messages 2000 --single-messages 500 --postfix-queue hold
    .venv/bin/python bench/accept.py --py-spy /tmp/pyspy/bin/py-spy   # and profile relaywarden

Both servers accept mail for one domain only (``example.test``): relaywarden as an authoritative
domain with the mailbox ``postmaster@example.test`` and delivery off (``[delivery] enabled =
false``), Postfix as a relay domain whose transport is deferred (or held, ``--postfix-queue
hold``), so every message stays queued. relaywarden answers
250 after its SQLite commit and the fsync of the WAL; Postfix after cleanup's fsync. Each run is
checked: the number of messages in the server's queue must grow by exactly the count sent.

Everything lives in a temporary directory on loopback ports picked here; every process started
is stopped at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postfix import PostfixInstance, process_tree  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
DOMAIN = "example.test"
RECIPIENT = f"postmaster@{DOMAIN}"
SENDER = "bench@client.example.org"

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
kind = "authoritative"

[[mailbox]]
address = "{recipient}"

[[route]]
name = "default"
domains = ["*"]
kind = "mx"

# accept and queue only, like the Postfix instance whose transport is deferred or held
[delivery]
enabled = false
"""


@dataclass(frozen=True)
class Mode:
    name: str
    sessions: int
    reuse: bool        # smtp-source -d: one connection per session, many messages on it
    messages: int

    def args(self, size: int) -> list[str]:
        return (["-d"] if self.reuse else []) + ["-s", str(self.sessions), "-l", str(size),
                                                  "-m", str(self.messages)]


@dataclass
class Result:
    server: str
    mode: str
    messages: int
    accepted: int
    seconds: float
    cpu_seconds: float | None = None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 and not self.error else 0.0


@dataclass
class Memory:
    """Peaks of the summed VmRSS and Pss of a server's processes, sampled every 50 ms."""
    peak_kib: int = 0
    peak_pss_kib: int = 0
    peak_processes: int = 0
    samples: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes that map them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its descendants that are running
    (``server.workers`` > 1: the accepting and delivering processes under the supervisor)."""
    stats: dict[int, tuple[int, float]] = {}   # pid -> (parent, seconds)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo.extend(child for child, (parent, _) in stats.items() if parent == current)
    return total


class MemorySampler(threading.Thread):
    """Peak memory of each server, sampled from /proc every ``interval`` seconds, both servers
    each time. Reading a process's smaps_rollup walks its mappings: one sample of Postfix's
    60-100 processes takes 11-18 ms of CPU, which at the 50 ms used before took a fifth to a third
    of one of the machine's two cores from whichever server was being measured."""

    def __init__(self, sources: dict[str, callable], interval: float = 0.5):
        super().__init__(daemon=True)
        self.sources = sources
        self.interval = interval
        self.memory = {name: Memory() for name in sources}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            for name, pids in self.sources.items():
                ps = pids()
                total = sum(rss_kib(p) for p in ps)
                m = self.memory[name]
                m.samples += 1
                m.peak_pss_kib = max(m.peak_pss_kib, sum(pss_kib(p) for p in ps))
                if total > m.peak_kib:
                    m.peak_kib, m.peak_processes = total, len(ps)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Relaywarden:
    """relaywarden serve in a child process on one plain-text listener."""

    def __init__(self, root: Path, port: int, workers: int = 1, launcher: list[str] | None = None):
        self.root = root
        self.port = port
        self.workers = workers
        self.launcher = launcher or [sys.executable, "-m", "relaywarden"]   # what runs `serve`
        self.data_dir = root / "data"
        self.config = root / "relaywarden.toml"
        self.output = root / "relaywarden.out"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Relaywarden:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(RELAYWARDEN_CONFIG.format(port=self.port, domain=DOMAIN, recipient=RECIPIENT,
                                                                workers=self.workers))
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.launcher, "serve", "--config", str(self.config),
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

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return process_tree(self.proc.pid)

    def queued(self) -> int:
        from relaywarden.queue.store import SqliteQueue
        with SqliteQueue(self.data_dir / "queue.sqlite") as q:
            return q.count()

    def settled(self) -> bool:
        return True

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None


class Profiler:
    """py-spy recording the relaywarden process (all threads) in raw collapsed-stack format."""

    def __init__(self, py_spy: str, pid: int, output: Path, rate: int = 250):
        self.output = output
        self.proc = subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--threads", "--subprocesses", "--format", "raw",
             "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def summarize_profile(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] += n
        own[frames[-1]] += n
        for f in set(frames[1:]):
            inclusive[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples"]
    out.append("by thread:")
    out += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common(8)]
    out.append("self time:")
    out += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out.append("inclusive:")
    out += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def smtp_source(port: int, mode: Mode, size: int, timeout: float) -> tuple[float, str | None]:
    cmd = [SMTP_SOURCE, *mode.args(size), "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.monotonic() - start, f"timed out after {timeout}s"
    elapsed = time.monotonic() - start
    if r.returncode != 0:
        return elapsed, f"smtp-source exited {r.returncode}: {(r.stdout + r.stderr)[-500:]}"
    problems = (r.stdout + r.stderr).strip()
    return elapsed, (f"smtp-source: {problems[-500:]}" if problems else None)


def wait_settled(server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.settled() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)


def measure(name: str, server, port: int, mode: Mode, size: int, timeout: float, cpu_pid=None) -> Result:
    wait_settled(server)
    before = server.queued()
    cpu0 = cpu_seconds(cpu_pid()) if cpu_pid else None
    seconds, error = smtp_source(port, mode, size, timeout)
    cpu = cpu_seconds(cpu_pid()) - cpu0 if cpu_pid else None
    wait_settled(server)  # Postfix: count once qmgr has stopped renaming files between queues
    accepted = server.queued() - before
    if accepted != mode.messages and error is None:
        error = f"queue grew by {accepted}, {mode.messages} were sent"
    return Result(name, mode.name, mode.messages, accepted, seconds, cpu, error)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    pf = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": f"{platform.python_version()} ({os.path.realpath(sys.executable)})", "postfix": pf.stdout.strip()}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def report(results: list[Result], memory: dict[str, Memory], rw_hwm: int, info: dict) -> str:
    """The table: median msg/s per mode and server over the repeats (with the range when repeated)."""
    lines = [f"{info['date']}  nproc={info['nproc']}  {info['cpu']}  kernel {info['kernel']}  "
             f"Python {info['python']}  Postfix {info['postfix']}", ""]
    lines.append(f"{'mode':<44} {'relaywarden':>12} {'postfix':>10} {'ratio':>7}  rw CPU s/1000 msg  range rw | pf")
    by_mode: dict[str, dict[str, list[Result]]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {}).setdefault(r.server, []).append(r)
    for mode, rs in by_mode.items():
        rw = [r.rate for r in rs.get("relaywarden", [])]
        pf = [r.rate for r in rs.get("postfix", [])]
        rw_rate, pf_rate = (median(rw) if rw else 0.0), (median(pf) if pf else 0.0)
        ratio = f"{rw_rate / pf_rate:6.2f}x" if rw_rate and pf_rate else "    -"
        cpu = [1000 * r.cpu_seconds / r.accepted for r in rs.get("relaywarden", []) if r.cpu_seconds and r.accepted]
        spread = (f"  {min(rw):.0f}-{max(rw):.0f} | {min(pf):.0f}-{max(pf):.0f}" if len(rw) > 1 and pf else "")
        lines.append(f"{mode:<44} {rw_rate:>8.0f} msg/s {pf_rate:>6.0f} msg/s {ratio}  "
                     f"{median(cpu) if cpu else 0:>17.2f}{spread}")
    for r in results:
        if r.error:
            lines.append(f"  ! {r.server}, {r.mode}: {r.error}")
    lines.append("")
    for name, m in memory.items():
        extra = f", VmHWM {rw_hwm / 1024:.1f} MiB" if name == "relaywarden" and rw_hwm else ""
        lines.append(f"peak RSS {name:<12} {m.peak_kib / 1024:7.1f} MiB summed over {m.peak_processes} "
                     f"process(es) (PSS {m.peak_pss_kib / 1024:.1f} MiB){extra}")
    return "\n".join(lines)


def cleanup(profiler: Profiler | None, sampler: MemorySampler | None, rw: Relaywarden, pf: PostfixInstance) -> None:
    """Stop everything this run started; one failure does not keep the others running."""
    for step in (profiler.stop if profiler else None, sampler.stop if sampler else None, rw.stop, pf.stop):
        if step is None:
            continue
        try:
            code = step()
        except Exception as exc:  # keep stopping the rest
            print(f"cleanup: {step.__qualname__} failed: {exc!r}", file=sys.stderr)
            continue
        if step == rw.stop and code not in (0, None):
            print(f"relaywarden exited {code}; output in {rw.output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000, help="messages per 20-session run (default 5000)")
    ap.add_argument("--single-messages", type=int, default=1000, help="messages per 1-session run (default 1000)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    ap.add_argument("--size", type=int, default=4096, help="message size in octets (smtp-source -l, default 4096)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per smtp-source run (default 300)")
    ap.add_argument("--repeat", type=int, default=1, help="measure every mode this many times, report the median")
    ap.add_argument("--workers", type=int, default=1, help="relaywarden server.workers (default 1)")
    ap.add_argument("--postfix-queue", choices=("defer", "hold"), default="defer",
                    help="defer: Postfix's ordinary path to the deferred queue; hold: straight to the hold queue")
    ap.add_argument("--py-spy", metavar="PATH", help="profile relaywarden with this py-spy binary during its runs")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)

    if not Path(SMTP_SOURCE).exists():
        print(f"{SMTP_SOURCE} not found: apt-get install postfix", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("run as root: Postfix is started with its own configuration directory", file=sys.stderr)
        return 2

    modes = [
        Mode(f"{args.sessions} sessions, new connection per message", args.sessions, False, args.messages),
        Mode(f"{args.sessions} sessions, one connection each (-d)", args.sessions, True, args.messages),
        Mode("1 session, new connection per message", 1, False, args.single_messages),
        Mode("1 session, one connection (-d)", 1, True, args.single_messages),
    ]
    warmup = Mode("warm-up", args.sessions, False, 200)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)

    root = Path(tempfile.mkdtemp(prefix="relaywarden-bench-"))
    os.chmod(root, 0o755)
    rw = Relaywarden(root / "relaywarden", free_port(), args.workers)
    pf = PostfixInstance(root / "postfix", free_port(), domain=DOMAIN, queue_mode=args.postfix_queue)
    sampler: MemorySampler | None = None
    profiler: Profiler | None = None
    results: list[Result] = []
    info = machine()
    try:
        rw.start()
        pf.start()
        print(f"relaywarden on 127.0.0.1:{rw.port}, Postfix ({args.postfix_queue}) on 127.0.0.1:{pf.port}, in {root}",
              flush=True)
        for name, server, port in (("relaywarden", rw, rw.port), ("postfix", pf, pf.port)):
            r = measure(name, server, port, warmup, args.size, args.timeout)
            if r.error:
                raise RuntimeError(f"warm-up of {name} failed: {r.error}")
        sampler = MemorySampler({"relaywarden": rw.pids, "postfix": pf.pids})
        sampler.start()
        if args.py_spy:
            profiler = Profiler(args.py_spy, rw.proc.pid, root / "relaywarden.pyspy.txt")
        for mode in [m for _ in range(max(1, args.repeat)) for m in modes]:
            for name, server, port in (("relaywarden", rw, rw.port), ("postfix", pf, pf.port)):
                cpu_pid = (lambda: rw.proc.pid) if name == "relaywarden" else None
                r = measure(name, server, port, mode, args.size, args.timeout, cpu_pid)
                results.append(r)
                print(f"  {name:<12} {mode.name:<44} {r.accepted:>6} in {r.seconds:7.2f} s = {r.rate:7.0f} msg/s"
                      + (f"  ! {r.error}" if r.error else ""), flush=True)
        if profiler is not None:
            profiler.stop()
        rw_hwm = hwm_kib(rw.proc.pid)
        sampler.stop()
        print()
        text = report(results, sampler.memory, rw_hwm, info)
        print(text)
        print(f"\ncommand: {' '.join([Path(sys.executable).name, 'bench/accept.py', *(argv if argv is not None else sys.argv[1:])])}")
        if profiler is not None and profiler.output.exists():
            print("\nrelaywarden profile (py-spy, all runs):")
            print(summarize_profile(profiler.output))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": info, "postfix_queue": args.postfix_queue,
                "results": [asdict(r) | {"rate": r.rate} for r in results],
                "memory": {k: asdict(v) for k, v in sampler.memory.items()}, "relaywarden_vmhwm_kib": rw_hwm,
            }, indent=2))
        return 1 if any(r.error for r in results) else 0
    finally:
        cleanup(profiler, sampler, rw, pf)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
