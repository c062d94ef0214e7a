"""A raw SMTP client over a real socket, for dialog tests: send exact bytes, read exact replies.

``Dialog.run(transcript)`` replays a transcript of lines:

    c: EHLO client.test          the client sends this line (CRLF added)
    c! DATA\\r\\nhello\\n.\\n       the client sends these exact bytes (Python escapes, nothing added)
    s: 250 2.1.5                 the server's (last) reply line must start with this
    s~ 5\\d\\d 5\\.7\\.1              ... or match this regular expression
    # a comment
"""

from __future__ import annotations

import re
import socket
import ssl


class Reply:
    def __init__(self, lines: list[str]):
        self.lines = lines
        self.code = int(lines[-1][:3])
        self.last = lines[-1]
        self.text = "\n".join(lines)

    def __repr__(self) -> str:
        return f"Reply({self.text!r})"


class SmtpConn:
    def __init__(self, port: int, host: str = "127.0.0.1", *, timeout: float = 10.0, ssl_context=None,
                 greeting: bool = True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname="mx.example.test")
        self.buf = b""
        self.greeting = self.reply() if greeting else None

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def cmd(self, line: str) -> Reply:
        self.send(line + "\r\n")
        return self.reply()

    def _line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def reply(self) -> Reply:
        lines = [self._line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self._line())
        return Reply(lines)

    def starttls(self, context: ssl.SSLContext) -> None:
        r = self.cmd("STARTTLS")
        assert r.code == 220, r
        assert not self.buf, f"bytes after 220: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.example.test")

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_dialog(conn: SmtpConn, transcript: str) -> list[Reply]:
    """Replay a transcript; raise AssertionError naming the line that differed."""
    replies = []
    for number, raw in enumerate(transcript.strip("\n").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tag, body = line[:2], line[2:].lstrip(" ")
        if tag == "c:":
            conn.send(body + "\r\n")
        elif tag == "c!":
            conn.send(body.encode("latin-1").decode("unicode_escape").encode("latin-1"))
        elif tag in ("s:", "s~"):
            r = conn.reply()
            replies.append(r)
            ok = r.last.startswith(body) if tag == "s:" else re.match(body, r.last)
            assert ok, f"dialog line {number}: expected {body!r}, got {r.text!r}"
        else:
            raise ValueError(f"dialog line {number}: unknown tag {tag!r}")
    return replies


def queued_id(reply: Reply) -> str:
    """The queue id from a "250 2.0.0 ... queued as ID" reply."""
    m = re.search(r"queued as ([0-9A-Za-z]+)", reply.last)
    assert m, f"not a queued reply: {reply.text!r}"
    return m.group(1)


def read_queued(data_dir, queue_id: str):
    """(QueuedMessage or None, data bytes or None) for a queue id, read from the server's queue file."""
    from pathlib import Path

    from relaywarden.queue.store import SqliteQueue

    with SqliteQueue(Path(data_dir) / "queue.sqlite") as q:
        return q.get(queue_id), q.message_data(queue_id)


# Dialog tests read back what the server acknowledged, so its queue runner must not deliver (and
# remove) the messages meanwhile, nor look up the MX of a relayed domain outside loopback.
NO_DELIVERY = "\n[delivery]\nenabled = false\n"


def queue_only_server(directory, config: str, *, cert_files=None, users: dict[str, str] | None = None):
    """Start a RelayServer on ``config`` with delivery off; the caller stops it."""
    from tests.support.server import RelayServer

    cert, key = cert_files if cert_files else (None, None)
    srv = RelayServer(config + NO_DELIVERY, directory, cert=cert, key=key)
    for address, password in (users or {}).items():
        r = srv.run_cli("user", "add", address, "--password-stdin", "--data-dir", str(srv.data_dir),
                        input=password + "\n")
        assert r.returncode == 0, r.stderr
    return srv.start()
