"""Start relaywarden as a real child process on free loopback ports, for tests that speak SMTP to it.

A configuration is TOML text with ``{port:NAME}`` placeholders (one per listener) that are replaced
by free ports; ``{data}`` by the data directory; ``{cert}``/``{key}`` by a trustme certificate
when the fixture provides one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import relaywarden

SRC = Path(relaywarden.__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_CONFIG = """
[server]
hostname = "mx.example.test"
auth_failure_delay = 0.0

[[listener]]
name = "mx"
address = "127.0.0.1"
port = {port:mx}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
anonymous = true

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "starttls"
certificate = "{cert}"
key = "{key}"
require_tls = true
anonymous = false
auth = ["PLAIN", "LOGIN"]
allow_authenticated = true

[[domain]]
name = "example.test"
kind = "authoritative"

[[mailbox]]
address = "postmaster@example.test"

[[mailbox]]
address = "alice@example.test"
aliases = ["a.lice@example.test"]

[[route]]
name = "default"
domains = ["*"]
kind = "mx"
"""


# Dialog tests look at what was queued: delivery (and its DNS look-ups) stays off.
NO_DELIVERY = "\n[delivery]\nenabled = false\n"
QUEUE_ONLY_CONFIG = DEFAULT_CONFIG + NO_DELIVERY


class RelayServer:
    """One relaywarden process.  ``ports[name]`` is each listener's port."""

    def __init__(self, config: str, data_dir: Path, *, cert: Path | None = None, key: Path | None = None,
                 env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports: dict[str, int] = {}

        def port(m: re.Match) -> str:
            return str(self.ports.setdefault(m.group(1), free_port()))

        text = re.sub(r"\{port:([a-z0-9_-]+)\}", port, config)
        text = text.replace("{data}", str(self.data_dir))
        if cert is not None:
            text = text.replace("{cert}", str(cert)).replace("{key}", str(key))
        else:
            text = re.sub(r'^(certificate|key) = "\{(cert|key)\}"\n', "", text, flags=re.M)
        self.config_path = self.data_dir.parent / f"{self.data_dir.name}.toml"
        self.config_path.write_text(text)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.output_path = self.data_dir.parent / f"{self.data_dir.name}.out"

    def start(self, timeout: float = 20.0) -> RelayServer:
        out = open(self.output_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relaywarden", "serve", "--config", str(self.config_path),
             "--data-dir", str(self.data_dir)],
            stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relaywarden exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"relaywarden did not listen within {timeout}s:\n{self.output()}")
            for p in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=0.5).close()
                    pending.discard(p)
                except OSError:
                    time.sleep(0.05)
        return self

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def run_cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relaywarden", *args], input=input, text=True,
                              capture_output=True, env=self.env, timeout=60)

    def events(self) -> list[dict]:
        from relaywarden.events import read_events
        return list(read_events(self.data_dir / "log"))

    def wait_for_event(self, predicate, timeout: float = 5.0) -> dict:
        """Events are flushed within about a second (warnings at once); poll for one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events():
                if predicate(e):
                    return e
            time.sleep(0.1)
        raise AssertionError("no matching event within timeout")
