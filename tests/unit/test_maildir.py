"""Local Maildir delivery (relaywarden.delivery.maildir): layout, headers, atomicity, fsync,
path traversal, full disks, and many writers at once."""

from __future__ import annotations

import errno
import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relaywarden.delivery.maildir import MaildirError, deliver_local, maildir_path, safe_component

MESSAGE = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nbody line\r\n"


def _deliver(root: Path, mailbox: str = "alice@example.com", data: bytes = MESSAGE) -> Path:
    return deliver_local(root, mailbox, data, return_path="sender@example.org",
                         delivered_to=mailbox)


def test_layout_headers_and_content(tmp_path):
    path = _deliver(tmp_path)
    box = tmp_path / "example.com" / "alice"
    assert path.parent == box / "new"
    assert {p.name for p in box.iterdir()} == {"tmp", "new", "cur"}
    assert list((box / "tmp").iterdir()) == []
    assert path.read_bytes() == (b"Return-Path: <sender@example.org>\r\n"
                                 b"Delivered-To: alice@example.com\r\n" + MESSAGE)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.name.endswith(f",S={path.stat().st_size}")
    assert ":" not in path.name and "/" not in path.name


def test_null_sender_and_bracketed_return_path(tmp_path):
    a = deliver_local(tmp_path, "bob@example.com", MESSAGE, return_path="",
                      delivered_to="bob@example.com")
    b = deliver_local(tmp_path, "bob@example.com", MESSAGE, return_path="<x@example.org>",
                      delivered_to="alias@example.com")
    assert a.read_bytes().startswith(b"Return-Path: <>\r\nDelivered-To: bob@example.com\r\n")
    assert b.read_bytes().startswith(b"Return-Path: <x@example.org>\r\nDelivered-To: alias@example.com\r\n")


def test_header_injection_refused(tmp_path):
    with pytest.raises(ValueError, match="control character"):
        deliver_local(tmp_path, "bob@example.com", MESSAGE, return_path="x@y\r\nBcc: evil@z",
                      delivered_to="bob@example.com")


def test_one_maildir_per_mailbox_whatever_the_case(tmp_path):
    a = _deliver(tmp_path, "Alice@Example.COM")
    b = _deliver(tmp_path, "alice@example.com")
    assert a.parent == b.parent
    assert len(list(a.parent.iterdir())) == 2


@pytest.mark.parametrize("local", [
    "../x", "..", ".", "a/b", "../../etc/passwd", "/abs", "a\x00b", ".hidden", "x/../../y", "\\..\\x",
])
def test_local_part_never_escapes(tmp_path, local):
    root = tmp_path / "mail"
    path = deliver_local(root, f"{local}@example.com", MESSAGE, return_path="",
                         delivered_to="user@example.com")
    resolved = path.resolve()
    assert resolved.is_relative_to((root / "example.com").resolve())
    # exactly root/<domain>/<one component>/new/<file>
    assert len(resolved.relative_to(root.resolve()).parts) == 4
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("domain", ["..", "../evil", "a/b", "[127.0.0.1]"])
def test_domain_never_escapes(tmp_path, domain):
    root = tmp_path / "mail"
    path = _deliver(root, f"user@{domain}")
    rel = path.resolve().relative_to(root.resolve())
    assert len(rel.parts) == 4 and rel.parts[0] not in ("..", ".")


def test_safe_names_are_distinct_and_bounded():
    names = ["a/b", "a%2Fb", "a_b", "A/B", "..", "%2E.", ".a", "a.", "ü", "u"]
    encoded = [safe_component(n) for n in names]
    assert len(set(encoded)) == len(names)
    assert all("/" not in e and e not in (".", "..") for e in encoded)
    long = safe_component("x" * 300) , safe_component("x" * 299 + "y")
    assert all(len(e) <= 200 for e in long) and long[0] != long[1]


def test_address_without_at_is_refused(tmp_path):
    with pytest.raises(ValueError):
        maildir_path(tmp_path, "no-at-sign")
    with pytest.raises(ValueError):
        maildir_path(tmp_path, "@example.com")


def test_fsync_file_before_publish_then_directory(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def link(src, dst, *a, **kw):
        events.append("link")
        assert not Path(dst).exists()
        real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    _deliver(tmp_path)                       # first delivery also creates the Maildir
    first = list(events)
    assert first.index("fsync-file") < first.index("link") < len(first) - 1
    assert first[-1] == "fsync-dir"
    assert first.count("fsync-dir") >= 6     # root, domain, mailbox dir and its tmp/new/cur made durable
    events.clear()
    _deliver(tmp_path)                       # Maildir exists: file, link, new/
    assert events == ["fsync-file", "link", "fsync-dir"]


def test_failure_before_publish_leaves_nothing(tmp_path, monkeypatch):
    _deliver(tmp_path)                      # create the Maildir
    box = tmp_path / "example.com" / "alice"

    def broken_link(src, dst, *a, **kw):
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(os, "link", broken_link)
    with pytest.raises(MaildirError) as info:
        _deliver(tmp_path)
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.3.0")
    assert not info.value.permanent
    assert len(list((box / "new").iterdir())) == 1
    assert list((box / "tmp").iterdir()) == []


def test_no_hard_links_falls_back_to_rename(tmp_path, monkeypatch):
    def no_links(src, dst, *a, **kw):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = _deliver(tmp_path)
    assert path.exists() and list((path.parent.parent / "tmp").iterdir()) == []


@pytest.mark.parametrize("err, code, enhanced", [
    (errno.ENOSPC, 452, "4.3.1"),
    (errno.EDQUOT, 452, "4.2.2"),
    (errno.EACCES, 451, "4.3.0"),
    (errno.EIO, 451, "4.3.0"),
])
def test_write_errors_map_to_replies(tmp_path, monkeypatch, err, code, enhanced):
    _deliver(tmp_path)
    box = tmp_path / "example.com" / "alice"
    real_write = os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data[:10]))     # a partial write, then the disk is full
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(MaildirError) as info:
        _deliver(tmp_path)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)
    assert info.value.reply.is_transient
    assert list((box / "tmp").iterdir()) == []
    assert len(list((box / "new").iterdir())) == 1


def test_enospc_while_creating_the_maildir(tmp_path, monkeypatch):
    def full_mkdir(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", full_mkdir)
    with pytest.raises(MaildirError) as info:
        _deliver(tmp_path / "new-root")
    assert str(info.value.reply).startswith("452 4.3.1")


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    data = MESSAGE * 50
    path = _deliver(tmp_path, data=data)
    assert path.read_bytes().endswith(data)


def test_concurrent_threads(tmp_path):
    def one(i: int) -> Path:
        return _deliver(tmp_path, f"user{i % 3}@example.com", MESSAGE + f"n={i}\r\n".encode())

    with ThreadPoolExecutor(max_workers=16) as pool:
        paths = list(pool.map(one, range(300)))
    assert len(set(paths)) == 300
    bodies = {p.read_bytes().rsplit(b"n=", 1)[1] for p in paths}
    assert len(bodies) == 300
    for i in range(3):
        box = tmp_path / "example.com" / f"user{i}"
        assert len(list((box / "new").iterdir())) == 100
        assert list((box / "tmp").iterdir()) == []


def _process_worker(root: str, count: int) -> list[str]:
    return [str(_deliver(Path(root), "shared@example.com", MESSAGE)) for _ in range(count)]


def test_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_process_worker, [(str(tmp_path), 40)] * 4)
    names = [Path(p).name for batch in results for p in batch]
    assert len(names) == len(set(names)) == 160
    new = tmp_path / "example.com" / "shared" / "new"
    assert len(list(new.iterdir())) == 160
    assert all(p.read_bytes().endswith(MESSAGE) for p in new.iterdir())


def test_module_counter_differs_between_deliveries(tmp_path):
    a, b = _deliver(tmp_path), _deliver(tmp_path)
    qa = a.name.split("Q", 1)[1].split(".", 1)[0]
    qb = b.name.split("Q", 1)[1].split(".", 1)[0]
    assert int(qb) > int(qa)
