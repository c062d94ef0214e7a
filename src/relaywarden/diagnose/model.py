"""What a doctor check returns and what it is given.

A check is an async function ``check(ctx: Context) -> list[Finding]``.  Each finding says ok /
warn / fail, which part of KB 895853 it belongs to, the evidence, and the exact fix (the
configuration key with its file and line, or the command).  The CLI prints them; the web console
will show the same objects.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path

from ..config.loader import LoadedConfig
from ..directory import Directory


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"       # could not run here (no data, no network, not configured)


# The parts of KB 895853 a finding can belong to.
SECTION_OPEN_RELAY = "open relay"
SECTION_ACCOUNTS = "relay from a compromised account"
SECTION_QUEUE = "spam in the queue"
SECTION_BLOCKLISTS = "block lists"
SECTION_DNS = "DNS: reverse DNS and the HELO name"
SCENARIO = {
    1: "scenario 1: authenticated users cannot relay",
    2: "scenario 2: anonymous access off on the Internet's listener",
    3: "scenario 3: MX points at the wrong server",
    4: "scenario 4: address outside every accepted domain",
    5: "scenario 5: destination requires authentication",
    6: "scenario 6: published address out of date / behind a proxy",
}


@dataclass(frozen=True)
class Finding:
    check: str                      # stable id, e.g. "open-relay.config", "dnsbl.listed"
    level: Level
    title: str                      # one line
    section: str                    # the KB section or scenario (constants above)
    evidence: tuple[str, ...] = ()  # what was seen
    fix: str | None = None          # the exact change: key (file:line) or command
    where: str | None = None        # file:line of the configuration involved

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.value
        d["evidence"] = list(self.evidence)
        return d


@dataclass
class Context:
    """Everything a check may read.  Live checks are skipped unless ``live``."""

    loaded: LoadedConfig
    data_dir: Path
    directory: Directory
    resolver: object                    # dns.asyncresolver.Resolver
    live: bool = True                   # run checks that talk to the listeners / DNS
    now: float = field(default_factory=time.time)
    timeout: float = 10.0

    @property
    def config(self):
        return self.loaded.config

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.sqlite"

    def events(self, ids=None, *, since: float | None = None) -> Iterator[dict]:
        from datetime import UTC, datetime

        from ..events import read_events

        if not self.log_dir.exists():
            return iter(())
        start = datetime.fromtimestamp(since, UTC) if since is not None else None
        return read_events(self.log_dir, ids=ids, since=start)


Check = Callable[[Context], Awaitable[list[Finding]]]


def worst(findings: list[Finding]) -> Level:
    levels = {f.level for f in findings}
    if Level.FAIL in levels:
        return Level.FAIL
    if Level.WARN in levels:
        return Level.WARN
    return Level.OK


def exit_code(findings: list[Finding]) -> int:
    """0 all ok, 1 warnings, 2 failures (the doctor's documented exit codes)."""
    return {Level.OK: 0, Level.WARN: 1, Level.FAIL: 2}[worst(findings)]
