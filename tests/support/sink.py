"""Postfix's smtp-sink as an independent SMTP peer on loopback.

    with SmtpSink(tmp_path, "-r", "RCPT") as sink:     # answer RCPT with a 4xx
        ... deliver to 127.0.0.1:sink.port ...
        sink.messages()                                 # the dumped messages (bytes)

As root it runs as ``nobody`` (smtp-sink refuses root); each message is dumped to a file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


def available() -> bool:
    return Path(SMTP_SINK).exists()


class SmtpSink:
    def __init__(self, directory: Path, *options: str, port: int | None = None, backlog: int = 100):
        from tests.support.server import free_port

        # smtp-sink runs as nobody, which cannot enter pytest's 0700 temporary directories:
        # the dumps go to a directory of their own under the system temporary directory.
        self.dir = Path(tempfile.mkdtemp(prefix="relaywarden-sink-"))
        self.dir.chmod(0o777)
        self.port = port or free_port()
        self.options = list(options)
        self.backlog = backlog
        self.proc: subprocess.Popen | None = None

    def start(self) -> SmtpSink:
        args = [SMTP_SINK]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += ["-d", f"{self.dir}/%M.", *self.options, f"127.0.0.1:{self.port}", str(self.backlog)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not listen")

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages()
            if len(msgs) >= count:
                return msgs
            time.sleep(0.1)
        raise AssertionError(f"smtp-sink got {len(self.messages())} messages, expected {count}")

    def stop(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
