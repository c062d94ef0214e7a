"""Identifiers for sessions, relay decisions, queue entries and Maildir files.

They need to be unique (across the server's processes and restarts), not secret: no one is let in
by knowing one. So they come from a per-process pseudo-random generator seeded from the operating
system, re-seeded in every child after ``fork`` — no system call per id (``secrets`` reads
``/dev/urandom`` each time, which measured a fifth of a message's CPU on the accepting path).
"""

from __future__ import annotations

import os
import random

_random = random.Random(os.urandom(32))


def _reseed() -> None:
    _random.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def hex_id(nbytes: int) -> str:
    """``2 * nbytes`` lower-case hex digits."""
    return f"{_random.getrandbits(nbytes * 8):0{nbytes * 2}x}"
