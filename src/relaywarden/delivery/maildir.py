"""Local delivery: one Maildir per mailbox under the data directory, written atomically.

This module owns putting a message into a local mailbox.  The layout is
``<root>/<domain>/<local part>/{tmp,new,cur}``, keyed by the mailbox's primary address (aliases are
resolved by the caller through ``Directory.find``).  Both path components are made safe: the
local part is case-folded, the domain lower-cased, and every character outside ``[a-z0-9_+=-]``
plus a leading dot is written as ``%XX`` (its UTF-8 bytes), so ``../x``, ``a/b``, ``.`` or a NUL
can never leave the mailbox directory and two different addresses never share one.

A delivery (the Maildir protocol, https://cr.yp.to/proto/maildir.html):

1. a unique name ``<sec>.M<usec>P<pid>R<random>Q<n>.<host>,S=<size>``;
2. ``tmp/<name>`` created with O_EXCL, mode 0600, holding ``Return-Path:`` and ``Delivered-To:``
   and the message exactly as queued (CRLF line ends, which Dovecot and Courier read), fsync'ed;
3. hard-linked into ``new/`` (renamed where the file system has no hard links), the ``tmp`` name
   removed, and ``new/`` fsync'ed, so the message is durable before success is reported.

Any number of threads or processes may deliver into one Maildir at once.  Failures raise
``MaildirError`` with the reply to record: ``452 4.3.1`` when the disk is full, ``452 4.2.2`` when
the mailbox's quota is exhausted, ``451 4.3.0`` for anything else; all are temporary and no partial
file is left behind.  The calls block: an asyncio caller runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import secrets
import socket
import time
from pathlib import Path

from .. import status
from ..status import Reply

__all__ = ["MaildirError", "deliver_local", "maildir_path", "safe_component"]

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_+=-.")
_MAX_COMPONENT = 200            # well under NAME_MAX (255)
_NAME_ATTEMPTS = 5              # unique-name collisions tolerated before giving up
_deliveries = itertools.count(1)


class MaildirError(Exception):
    """A local delivery failed; ``reply`` is what the delivery result and any NDR record."""

    def __init__(self, reply: Reply, path: Path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reply = reply
        self.path = path
        self.detail = detail

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent






def safe_component(text: str) -> str:
    """One path component for ``text``: never empty, '.', '..', or containing '/' or NUL."""
    out = []
    for index, char in enumerate(text):
        if char in _SAFE and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    name = "".join(out)
    if len(name) > _MAX_COMPONENT:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{name[:_MAX_COMPONENT - 17]}~{digest}"
    return name


def maildir_path(root: Path, mailbox: str) -> Path:
    """The Maildir of the mailbox whose primary address is ``mailbox``; always inside ``root``."""
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{mailbox!r} is not a mailbox address of the form local@domain")
    path = Path(root) / safe_component(domain.lower()) / safe_component(local.casefold())
    if Path(root) not in path.parents:   # a second guard; safe_component already ensures it
        raise ValueError(f"{mailbox!r} would be stored outside {root}")
    return path


def deliver_local(root: Path, mailbox: str, data: bytes, *, return_path: str,
                  delivered_to: str) -> Path:
    """Deliver ``data`` into the Maildir of ``mailbox``; returns the file's path in ``new/``."""
    maildir = maildir_path(root, mailbox)
    try:
        _ensure_maildir(Path(root), maildir)
        content = _trace_headers(return_path, delivered_to) + data
        return _write_new(maildir, content)
    except OSError as exc:
        raise MaildirError(_reply_for(exc), maildir, _strerror(exc)) from exc


def _trace_headers(return_path: str, delivered_to: str) -> bytes:
    sender = return_path.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    for label, value in (("Return-Path", sender), ("Delivered-To", delivered_to)):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"{label} value {value!r} contains a control character")
    text = f"Return-Path: <{sender}>\r\nDelivered-To: {delivered_to}\r\n"
    return text.encode("utf-8")


def _ensure_maildir(root: Path, maildir: Path) -> None:
    """Create the Maildir (and its parents) when missing, each new directory made durable."""
    if all((maildir / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return
    root.mkdir(parents=True, exist_ok=True)
    for directory in (maildir.parent, maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        _fsync_directory(directory.parent)


def _unique_name(size: int) -> str:
    now = time.time()
    seconds, micros = int(now), int((now % 1) * 1_000_000)
    host = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"
    return (f"{seconds}.M{micros}P{os.getpid()}R{secrets.token_hex(8)}Q{next(_deliveries)}"
            f".{host},S={size}")


def _write_new(maildir: Path, content: bytes) -> Path:
    for _ in range(_NAME_ATTEMPTS):
        name = _unique_name(len(content))
        tmp, new = maildir / "tmp" / name, maildir / "new" / name
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            try:
                _write_all(fd, content)
                os.fsync(fd)
            finally:
                os.close(fd)
            if not _publish(tmp, new):
                tmp.unlink(missing_ok=True)
                continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(new.parent)
        return new
    raise OSError(errno.EEXIST, f"no unique file name after {_NAME_ATTEMPTS} attempts")


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        view = view[written:]


def _publish(tmp: Path, new: Path) -> bool:
    """Move ``tmp`` to ``new`` without ever replacing a message; False on a name collision."""
    try:
        os.link(tmp, new)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if new.exists():
            return False
        os.rename(tmp, new)     # a file system without hard links; the name is unique
        return True
    try:
        tmp.unlink()
    except OSError:
        pass                    # delivered; a stale tmp file is cleaned up by Maildir readers
    return True


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reply_for(exc: OSError) -> Reply:
    if exc.errno == errno.ENOSPC:
        return status.storage_full()
    if exc.errno == errno.EDQUOT:
        return status.mailbox_full()
    return status.local_delivery_failed()


def _strerror(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"
