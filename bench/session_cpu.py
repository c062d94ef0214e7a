"""CPU of the accepting path per message, without sockets: a profiling aid, not a benchmark.

Drives real ``SmtpSession`` objects of a started relaywarden ``Server`` (its queue commits for
real, WAL + fsync) through a fake transport, with the dialog smtp-source speaks (EHLO, MAIL, RCPT,
DATA with 4 KiB, QUIT), 20 sessions at a time, and prints the event loop thread's CPU per message
(``time.thread_time``; the queue writer thread is not counted). What it leaves out — the kernel's
TCP work and uvloop's own — is what ``bench/accept.py`` measures against Postfix. Use it to see
whether a change to the Python on the hot path helps: run it before and after (the minimum of
several rounds is the least noisy figure), or with ``--profile`` for cProfile's table.

    .venv/bin/python bench/session_cpu.py                 # new connection per message
    .venv/bin/python bench/session_cpu.py --reuse         # 20 sessions, many messages each
    .venv/bin/python bench/session_cpu.py --profile cumulative
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from relaywarden.config.loader import parse_text  # noqa: E402
from relaywarden.server.app import Server  # noqa: E402
from relaywarden.server.session import SmtpSession  # noqa: E402

CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port}
tls = "none"

[[domain]]
name = "example.test"

[[mailbox]]
address = "postmaster@example.test"

[delivery]
enabled = false
"""

BODY = (b"From: <bench@client.example.org>\r\nTo: <postmaster@example.test>\r\n"
        b"Date: Sun, 29 Nov 2026 13:00:00 +0000\r\nMessage-Id: <x@client.example.org>\r\nSubject: test\r\n\r\n"
        + b"".join(b"Line %02d of the message body, some filler text to make it 4 KiB long.\r\n" % i
                   for i in range(56)) + b".\r\n")
DIALOG = [b"MAIL FROM:<bench@client.example.org>\r\n", b"RCPT TO:<postmaster@example.test>\r\n", b"DATA\r\n"]


class FakeTransport:
    """Enough of an asyncio transport for SmtpSession; remembers the last reply awaited."""

    def __init__(self) -> None:
        self.closed = False
        self.waiter: asyncio.Future | None = None

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def session(rt, messages: int) -> None:
    loop = asyncio.get_running_loop()
    s, t = SmtpSession(rt), FakeTransport()
    s.connection_made(t)
    s.data_received(b"EHLO client.example.org\r\n")
    for _ in range(messages):
        for line in DIALOG:
            s.data_received(line)
        t.waiter = loop.create_future()
        s.data_received(BODY)
        if s.core.waiting:
            await t.waiter                  # the 250 comes after the commit
    s.data_received(b"QUIT\r\n")
    s.connection_lost(None)


async def main(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="relaywarden-session-cpu-"))
    with socket.socket() as probe:           # the listener is started, though nothing connects
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(parse_text(CONFIG.format(port=port), "session_cpu.toml"), data_dir)
    await server.start()
    rt = server.listeners[0]
    for _ in range(50):
        await session(rt, 1)               # warm up
    rounds = []
    profile = cProfile.Profile() if args.profile else None
    for _ in range(1 if profile else args.rounds):
        start = time.thread_time()
        if profile:
            profile.enable()
        if args.reuse:
            await asyncio.gather(*(session(rt, args.messages // 20) for _ in range(20)))
        else:
            for _ in range(args.messages // 20):
                await asyncio.gather(*(session(rt, 1) for _ in range(20)))
        if profile:
            profile.disable()
        rounds.append((time.thread_time() - start) / args.messages * 1e6)
    await server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)
    mode = "20 sessions, many messages each" if args.reuse else "20 sessions, new connection per message"
    print(f"{mode}: event loop thread CPU per message: min {min(rounds):.0f} us "
          f"(rounds: {' '.join(f'{r:.0f}' for r in rounds)}){' under cProfile' if profile else ''}")
    if profile:
        pstats.Stats(profile).sort_stats(args.profile).print_stats(40)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="messages per round (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds; the minimum is printed first (default 5)")
    ap.add_argument("--reuse", action="store_true", help="many messages per session instead of one")
    ap.add_argument("--profile", choices=("tottime", "cumulative"), help="one round under cProfile")
    args = ap.parse_args()
    try:
        import uvloop
        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
