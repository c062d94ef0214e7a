"""The outbound SMTP client against real peers on loopback.

Postfix's ``smtp-sink`` plays the next hop that accepts, defers, refuses, hangs up or drops the
connection (it records each transaction, parameters included, with ``-d``); relaywarden's own
server plays the smarthost that wants STARTTLS with a trustme certificate and AUTH.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import trustme

from relaywarden.delivery.smtp_client import AttemptResult, OutRcpt, SessionPool, deliver
from tests.support.server import free_port

pytestmark = pytest.mark.integration

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
needs_sink = pytest.mark.skipif(not os.access(SMTP_SINK, os.X_OK), reason="postfix smtp-sink not installed")

BODY = b"Subject: test\r\n\r\n.a line that starts with a dot\r\nhello\r\n"


def _listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (read from /proc: a probe would be a session)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


class Sink:
    """One smtp-sink process; ``transactions()`` reads what it recorded."""

    def __init__(self, *options: str, port: int | None = None):
        self.port = port or free_port()
        # pytest's tmp_path is private to root; the sink runs as nobody and writes its dumps here
        self.dump = Path(tempfile.mkdtemp(prefix="relaywarden-sink-"))
        self.dump.chmod(0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.counters = self.dump.with_suffix(".counters")
        with open(self.counters, "wb") as out:
            self.proc = subprocess.Popen(
                [SMTP_SINK, *user, "-c", "-d", f"{self.dump}/%H%M%S.", *options, f"127.0.0.1:{self.port}", "16"],
                stdout=out, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not _listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"smtp-sink did not start: {self.proc.stderr.read().decode()}")
            time.sleep(0.02)

    def transactions(self) -> list[dict[str, list[str] | str]]:
        out = []
        for f in sorted(self.dump.iterdir()):
            head, _, body = f.read_bytes().partition(b"\n\tby smtp-sink")
            fields: dict[str, list[str] | str] = {"mail": "", "rcpt": []}
            for line in head.decode().splitlines():
                if line.startswith("X-Mail-Args: "):
                    fields["mail"] = line[13:]
                elif line.startswith("X-Rcpt-Args: "):
                    fields["rcpt"].append(line[13:])
            fields["body"] = body.partition(b"\n")[2].partition(b"\n")[2].decode(errors="replace")
            out.append(fields)
        return out

    def sessions(self) -> int:
        """Sessions that ended so far (from the sink's -c counters: "sess=N quit=N mesg=N")."""
        counts = re.findall(rb"sess=(\d+)", self.counters.read_bytes())
        return int(counts[-1]) if counts else 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dump, ignore_errors=True)
        self.counters.unlink(missing_ok=True)


@pytest.fixture
def sink():
    sinks: list[Sink] = []

    def start(*options: str, port: int | None = None) -> Sink:
        s = Sink(*options, port=port)
        sinks.append(s)
        return s

    yield start
    for s in sinks:
        s.cleanup()


def send(port: int, *rcpts: str | OutRcpt, data: bytes = BODY, **kw) -> AttemptResult:
    kw.setdefault("tls", "none")
    kw.setdefault("timeout", 10)
    recipients = [r if isinstance(r, OutRcpt) else OutRcpt(r) for r in rcpts]
    return asyncio.run(deliver("127.0.0.1", port, helo="relay.example.test", sender=kw.pop("sender", "a@example.test"),
                               recipients=recipients, data=data, **kw))


def codes(result: AttemptResult) -> list[tuple]:
    return [(r.reply_code, r.enhanced_code, r.command, r.permanent) for r in result.results]


# --- against smtp-sink ------------------------------------------------------------------------------

@needs_sink
def test_delivers_with_dsn_parameters_and_dot_stuffing(sink):
    s = sink()
    r = send(s.port, OutRcpt("b@example.org", ("SUCCESS", "FAILURE"), "rfc822;B+1@example.org"),
             "c@example.org", envid="queue-id 7", ret="HDRS")
    assert r.all_delivered and r.dsn_offered and not r.reused
    assert codes(r) == [(250, "2.0.0", "END-OF-DATA", False)] * 2
    assert (r.results[0].remote_host, r.results[0].remote_address) == ("127.0.0.1", "127.0.0.1")
    [t] = s.transactions()
    assert t["mail"] == "<a@example.test> RET=HDRS ENVID=queue-id+207"
    assert t["rcpt"] == ["<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2B1@example.org", "<c@example.org>"]
    assert ".a line that starts with a dot\nhello\n" in t["body"]


@needs_sink
def test_no_dsn_parameters_when_not_offered_and_no_pipelining(sink):
    s = sink("-N", "-p")
    r = send(s.port, OutRcpt("b@example.org", ("NEVER",), "rfc822;b@example.org"), envid="x", ret="FULL")
    assert r.all_delivered and not r.dsn_offered
    [t] = s.transactions()
    assert (t["mail"], t["rcpt"]) == ("<a@example.test>", ["<b@example.org>"])


@needs_sink
def test_8bit_data_to_a_host_without_8bitmime_is_not_sent(sink):
    s = sink("-8")
    r = send(s.port, "b@example.org", data="Subject: café\r\n\r\n".encode())
    assert codes(r) == [(None, "5.6.3", "MAIL", True)]
    s2 = sink()
    r = send(s2.port, "b@example.org", data="Subject: café\r\n\r\n".encode())
    assert r.all_delivered and s2.transactions()[0]["mail"] == "<a@example.test> BODY=8BITMIME"
    assert s.transactions() == []


@needs_sink
def test_rcpt_soft_and_hard_refusals_are_per_recipient(sink):
    soft = send(sink("-r", "RCPT").port, "b@example.org", "c@example.org")
    assert codes(soft) == [(450, "4.3.0", "RCPT", False)] * 2
    assert soft.results[0].remote_text == "Error: command failed"
    hard = send(sink("-f", "RCPT").port, "b@example.org")
    assert codes(hard) == [(500, "5.3.0", "RCPT", True)]


@needs_sink
def test_mail_refused_fails_every_recipient_permanently(sink):
    r = send(sink("-f", "MAIL").port, "b@example.org", "c@example.org")
    assert codes(r) == [(500, "5.3.0", "MAIL", True)] * 2
    assert not r.try_next_host


@needs_sink
@pytest.mark.parametrize("option, command, expected", [
    ("-r", "DATA", (450, "4.3.0", "DATA", False)),
    ("-f", ".", (500, "5.3.0", "END-OF-DATA", True)),
])
def test_data_replies_apply_to_every_accepted_recipient(sink, option, command, expected):
    s = sink(option, command)
    r = send(s.port, "b@example.org", "c@example.org")
    assert codes(r) == [expected] * 2


@needs_sink
def test_421_at_mail_is_a_temporary_session_failure(sink):
    r = send(sink("-Q", "MAIL").port, "b@example.org")
    assert [(x.reply_code, x.command, x.permanent) for x in r.results] == [(421, "MAIL", False)]
    assert r.results[0].enhanced_code.startswith("4.")
    assert r.try_next_host


@needs_sink
def test_hang_up_after_end_of_data_is_temporary_for_all(sink):
    r = send(sink("-q", ".").port, "b@example.org", "c@example.org")
    assert codes(r) == [(None, None, "END-OF-DATA", False)] * 2
    assert "lost connection" in r.results[0].remote_text
    assert not r.try_next_host


@needs_sink
def test_session_pool_reuses_one_connection(sink):
    s = sink()

    async def run() -> list[AttemptResult]:
        results = []
        async with SessionPool(idle_timeout=5) as pool:
            for i in range(3):
                results.append(await pool.deliver("127.0.0.1", s.port, helo="relay.example.test",
                                                  sender="a@example.test", recipients=[OutRcpt(f"r{i}@example.org")],
                                                  data=BODY, tls="none", timeout=5))
            assert pool.idle_count() == 1
            assert s.sessions() == 0             # still open
        return results

    results = asyncio.run(run())
    assert [r.reused for r in results] == [False, True, True]
    assert all(r.all_delivered for r in results)
    for _ in range(50):                      # QUIT at close ended the one session
        if s.sessions():
            break
        time.sleep(0.05)
    assert s.sessions() == 1
    assert sorted(t["rcpt"] for t in s.transactions()) == [[f"<r{i}@example.org>"] for i in range(3)]


@needs_sink
def test_pool_replaces_a_session_the_peer_closed(sink):
    s = sink()

    async def run() -> tuple[AttemptResult, AttemptResult, Sink]:
        async with SessionPool(idle_timeout=30) as pool:
            kw = dict(helo="relay.example.test", sender="a@example.test", data=BODY, tls="none", timeout=5)
            first = await pool.deliver("127.0.0.1", s.port, recipients=[OutRcpt("b@example.org")], **kw)
            assert pool.idle_count() == 1
            s.stop()                                        # the idle session dies with the sink
            again = sink(port=s.port)                       # a new sink at the same destination
            second = await pool.deliver("127.0.0.1", s.port, recipients=[OutRcpt("c@example.org")], **kw)
            return first, second, again

    first, second, again = asyncio.run(run())
    assert first.all_delivered and second.all_delivered and not second.reused
    assert again.transactions()[0]["rcpt"] == ["<c@example.org>"]


def test_pool_idle_session_is_quit_after_idle_timeout():
    async def run() -> list[bytes]:
        seen: list[bytes] = []

        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 peer ESMTP\r\n")
            for _ in range(20):
                line = await reader.readline()
                if not line:
                    break
                seen.append(line.split()[0].upper())
                verb = seen[-1]
                reply = {b"EHLO": b"250-peer\r\n250 PIPELINING\r\n", b"DATA": b"354 go\r\n", b"QUIT": b"221 bye\r\n"}
                if verb == b"DATA":
                    writer.write(reply[verb])
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 2.0.0 ok\r\n")
                else:
                    writer.write(reply.get(verb, b"250 ok\r\n"))
                if verb == b"QUIT":
                    break
            writer.close()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with SessionPool(idle_timeout=0.3) as pool:
            r = await pool.deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                                   recipients=[OutRcpt("b@example.org")], data=BODY, tls="none", timeout=5)
            assert r.all_delivered and pool.idle_count() == 1
            for _ in range(40):
                if b"QUIT" in seen:
                    break
                await asyncio.sleep(0.05)
            assert pool.idle_count() == 0
        server.close()
        await server.wait_closed()
        return seen

    assert asyncio.run(run()) == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


async def _scripted_peer(seen: list[list[bytes]], answer, late: bytes = b"") -> tuple[asyncio.base_events.Server, int]:
    """A peer that records each connection's verbs; ``answer(verb, connection, count)`` gives the
    reply (None: hang up) — ``count`` is how often that verb came on that connection. ``late``
    is sent 50 ms after each reply to the end of data, unasked."""
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        verbs: list[bytes] = []
        seen.append(verbs)
        writer.write(b"220 peer ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line.split()[0].upper()
            verbs.append(verb)
            reply = answer(verb, len(seen) - 1, verbs.count(verb))
            if reply is None:
                break
            writer.write(reply)
            if verb == b"DATA" and reply.startswith(b"354"):
                while (await reader.readline()) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 ok\r\n")
                if late:
                    await asyncio.sleep(0.05)
                    writer.write(late)
            if verb == b"QUIT":
                break
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _ordinary(verb: bytes, connection: int, count: int) -> bytes:
    return {b"EHLO": b"250-peer\r\n250 PIPELINING\r\n", b"DATA": b"354 go\r\n",
            b"QUIT": b"221 bye\r\n"}.get(verb, b"250 ok\r\n")


def _pool_run(answer, recipients: list[str], *, late: bytes = b"", pause: float = 0.0
              ) -> tuple[list[AttemptResult], list[list[bytes]]]:
    async def run() -> tuple[list[AttemptResult], list[list[bytes]]]:
        seen: list[list[bytes]] = []
        server, port = await _scripted_peer(seen, answer, late)
        results = []
        async with SessionPool(idle_timeout=5) as pool:
            for rcpt in recipients:
                results.append(await pool.deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                                                  recipients=[OutRcpt(rcpt)], data=BODY, tls="none", timeout=5))
                await asyncio.sleep(pause)
        server.close()
        await server.wait_closed()
        return results, seen

    return asyncio.run(run())


def test_pool_reuses_a_session_without_rset_after_a_completed_transaction():
    results, seen = _pool_run(_ordinary, ["b@example.org", "c@example.org", "d@example.org"])
    assert all(r.all_delivered for r in results) and [r.reused for r in results] == [False, True, True]
    assert seen == [[b"EHLO"] + [b"MAIL", b"RCPT", b"DATA"] * 3 + [b"QUIT"]]


def test_pool_says_rset_before_reusing_a_session_whose_transaction_did_not_end():
    def refuse_first_rcpt(verb: bytes, connection: int, count: int) -> bytes:
        if verb == b"RCPT" and count == 1:
            return b"450 4.2.1 try later\r\n"
        if verb == b"DATA" and count == 1:
            return b"554 5.5.1 no valid recipients\r\n"   # the server still holds the MAIL
        return _ordinary(verb, connection, count)

    results, seen = _pool_run(refuse_first_rcpt, ["b@example.org", "c@example.org"])
    assert results[0].results[0].reply_code == 450 and results[1].all_delivered and results[1].reused
    assert seen == [[b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]]


def test_pool_sends_again_on_a_new_connection_when_the_reused_one_refuses_mail_with_421():
    def busy_on_reuse(verb: bytes, connection: int, count: int) -> bytes | None:
        if verb == b"MAIL" and connection == 0 and count == 2:
            return b"421 4.3.2 shutting down\r\n"
        return _ordinary(verb, connection, count)

    results, seen = _pool_run(busy_on_reuse, ["b@example.org", "c@example.org"])
    assert all(r.all_delivered for r in results)
    assert [r.reused for r in results] == [False, False]
    assert seen[0][:5] == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"MAIL"]
    assert seen[1] == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


def test_pool_sends_again_when_the_reused_session_was_dropped_silently():
    def drop_on_reuse(verb: bytes, connection: int, count: int) -> bytes | None:
        if verb == b"MAIL" and connection == 0 and count == 2:
            return None                                   # hang up without a word
        return _ordinary(verb, connection, count)

    results, seen = _pool_run(drop_on_reuse, ["b@example.org", "c@example.org"])
    assert all(r.all_delivered for r in results) and len(seen) == 2
    assert seen[1] == [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]


def test_the_fresh_resend_also_covers_a_message_with_a_recipient_refused_here():
    """A recipient this side refuses (UTF-8 to a host without SMTPUTF8) does not keep the rest of
    the message from going again on a new connection when the reused one died at MAIL."""
    def drop_on_reuse(verb: bytes, connection: int, count: int) -> bytes | None:
        if verb == b"MAIL" and connection == 0 and count == 2:
            return None
        return _ordinary(verb, connection, count)

    async def run() -> tuple[AttemptResult, list[list[bytes]]]:
        seen: list[list[bytes]] = []
        server, port = await _scripted_peer(seen, drop_on_reuse)
        kw = dict(helo="relay.example.test", sender="a@example.test", data=BODY, tls="none", timeout=5)
        async with SessionPool(idle_timeout=5) as pool:
            await pool.deliver("127.0.0.1", port, recipients=[OutRcpt("b@example.org")], **kw)
            second = await pool.deliver("127.0.0.1", port, recipients=[OutRcpt("jürgen@example.org"),
                                                                        OutRcpt("c@example.org")], **kw)
        server.close()
        await server.wait_closed()
        return second, seen

    second, seen = asyncio.run(run())
    assert [(r.reply_code, r.enhanced_code, r.delivered) for r in second.results] == [
        (None, "5.6.7", False), (250, "2.0.0", True)]
    assert len(seen) == 2 and seen[1][:4] == [b"EHLO", b"MAIL", b"RCPT", b"DATA"]


def test_pool_keeps_at_most_max_idle_sessions_in_all():
    """Mail to many destinations must not keep a connection open to each: past ``max_idle``
    idle sessions in all, a session says QUIT after its message instead of waiting."""
    async def run() -> tuple[list[AttemptResult], list[list[list[bytes]]], int, int]:
        seen: list[list[list[bytes]]] = [[], [], []]
        peers = [await _scripted_peer(seen[n], _ordinary) for n in range(3)]
        async with SessionPool(idle_timeout=30, max_idle=2) as pool:
            results = [await pool.deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                                          recipients=[OutRcpt("b@example.org")], data=BODY, tls="none", timeout=5)
                       for _, port in peers]
            idle, tables = pool.idle_count(), len(pool._idle)
            again = await pool.deliver("127.0.0.1", peers[0][1], helo="relay.example.test", sender="a@example.test",
                                       recipients=[OutRcpt("c@example.org")], data=BODY, tls="none", timeout=5)
            results.append(again)
            tables_after = sum(1 for sessions in pool._idle.values() if sessions)   # no empty entries
        for server, _ in peers:
            server.close()
            await server.wait_closed()
        return results, seen, idle, tables * 10 + tables_after

    results, seen, idle, tables = asyncio.run(run())
    assert all(r.all_delivered for r in results) and results[-1].reused
    assert idle == 2 and tables == 22                # two destinations hold an idle session each
    assert seen[2] == [[b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]]     # the third did not stay


# --- connection trouble -----------------------------------------------------------------------------

def test_connection_refused_is_a_temporary_connect_failure():
    port = free_port()                       # nothing listens there
    r = send(port, "b@example.org", "c@example.org")
    assert codes(r) == [(None, None, "CONNECT", False)] * 2
    assert "refused" in r.results[0].remote_text.lower() and r.try_next_host


def test_silent_peer_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        r = send(listener.getsockname()[1], "b@example.org", timeout=0.5)
    assert codes(r) == [(None, None, "CONNECT", False)]
    assert "timeout" in r.results[0].remote_text


def test_peer_dropping_the_connection_mid_data():
    async def run() -> tuple[AttemptResult, int]:
        received = 0

        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            writer.write(b"220 peer ESMTP\r\n")
            for _ in range(10):
                line = await reader.readline()
                if line.upper().startswith(b"EHLO"):
                    writer.write(b"250-peer\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif line.upper().startswith(b"DATA"):
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    received = len(await reader.read(100))       # part of the message, then hang up
                    writer.transport.abort()
                    return
                elif line:
                    writer.write(b"250 ok\r\n")
                else:
                    return

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 20000
        r = await deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                          recipients=[OutRcpt("b@example.org"), OutRcpt("c@example.org")], data=big,
                          tls="none", timeout=5)
        server.close()
        await server.wait_closed()
        return r, received

    r, received = asyncio.run(run())
    assert received > 0
    assert [(x.reply_code, x.permanent) for x in r.results] == [(None, False)] * 2
    assert {x.command for x in r.results} == {"END-OF-DATA"}
    assert not r.try_next_host


# --- against relaywarden: STARTTLS and AUTH --------------------------------------------------------------

@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def other_ca_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_required_tls_with_ca_file_and_auth_relays(default_server, ca_file):
    r = send(default_server.ports["submission"], OutRcpt("bob@example.net", ("FAILURE",), "rfc822;bob@example.net"),
             sender="alice@example.test", tls="required", ca_file=ca_file,
             username="alice@example.test", password="correct horse", envid="E-1", ret="HDRS")
    assert r.tls is not None and r.tls.startswith("TLSv1.")
    assert r.dsn_offered
    [res] = r.results
    assert (res.reply_code, res.enhanced_code, res.command) == (250, "2.0.0", "END-OF-DATA")
    assert "queued as" in res.remote_text
    event = default_server.wait_for_event(lambda e: e.get("id") == 1708)
    assert "alice@example.test" in str(event)


def test_required_tls_with_the_wrong_ca_is_a_temporary_failure(default_server, other_ca_file):
    r = send(default_server.ports["mx"], "alice@example.test", tls="required", ca_file=other_ca_file)
    assert codes(r) == [(None, None, "STARTTLS", False)]
    assert "certificate verif" in r.results[0].remote_text and r.try_next_host


def test_required_tls_checks_the_name(default_server, ca_file):
    r = send(default_server.ports["mx"], "alice@example.test", tls="required", ca_file=ca_file,
             server_name="wrong.example.test")
    assert codes(r) == [(None, None, "STARTTLS", False)]
    assert "wrong.example.test" in r.results[0].remote_text or "mismatch" in r.results[0].remote_text


def test_opportunistic_tls_does_not_verify(default_server, other_ca_file):
    r = send(default_server.ports["mx"], "alice@example.test", tls="opportunistic", ca_file=other_ca_file)
    assert r.all_delivered and r.tls is not None


def test_without_credentials_the_smarthost_refuses_at_mail(default_server, ca_file):
    r = send(default_server.ports["submission"], "bob@example.net", "carol@example.net",
             tls="required", ca_file=ca_file)
    assert [(x.reply_code, x.command, x.permanent) for x in r.results] == [(530, "MAIL", True)] * 2
    assert all(x.enhanced_code and x.enhanced_code.startswith("5.7.") for x in r.results)


def test_wrong_password_defers(default_server, ca_file):
    r = send(default_server.ports["submission"], "bob@example.net", tls="required", ca_file=ca_file,
             username="alice@example.test", password="wrong")
    assert codes(r) == [(535, "5.7.8", "AUTH", False)]


def test_credentials_are_not_sent_when_tls_is_off(default_server):
    r = send(default_server.ports["submission"], "bob@example.net", tls="none",
             username="alice@example.test", password="correct horse")
    assert codes(r) == [(None, None, "AUTH", False)]


def test_relay_refused_by_relaywarden_is_permanent_per_recipient(default_server):
    r = send(default_server.ports["mx"], "alice@example.test", "victim@example.net", "nobody@example.test",
             tls="opportunistic")
    assert [(x.reply_code, x.enhanced_code, x.command) for x in r.results] == [
        (250, "2.0.0", "END-OF-DATA"), (550, "5.7.1", "RCPT"), (550, "5.1.1", "RCPT")]
    assert "Relay access denied" in r.results[1].remote_text


def test_pool_reuses_a_tls_session(default_server, ca_file):
    async def run() -> list[AttemptResult]:
        async with SessionPool() as pool:
            return [await pool.deliver("127.0.0.1", default_server.ports["submission"], helo="relay.example.test",
                                       sender="alice@example.test", recipients=[OutRcpt(f"r{i}@example.net")],
                                       data=BODY, tls="required", ca_file=ca_file, username="alice@example.test",
                                       password="correct horse", timeout=10) for i in range(3)]

    results = asyncio.run(run())
    assert [r.reused for r in results] == [False, True, True]
    assert all(r.all_delivered and r.tls for r in results)


def test_opportunistic_tls_falls_back_to_plaintext_after_a_failed_handshake():
    async def run() -> tuple[AttemptResult, list[list[bytes]]]:
        sessions: list[list[bytes]] = []

        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen: list[bytes] = []
            sessions.append(seen)
            writer.write(b"220 peer ESMTP\r\n")
            for _ in range(20):
                line = await reader.readline()
                if not line:
                    break
                verb = line.split()[0].upper()
                seen.append(verb)
                if verb == b"EHLO":
                    writer.write(b"250-peer\r\n250 STARTTLS\r\n")
                elif verb == b"STARTTLS":
                    writer.write(b"220 go ahead\r\nthis is not a TLS server hello\r\n")
                    await writer.drain()
                    await reader.read(4096)
                    break
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
            writer.close()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r = await deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                          recipients=[OutRcpt("b@example.org")], data=BODY, tls="opportunistic", timeout=5)
        server.close()
        await server.wait_closed()
        return r, sessions

    r, sessions = asyncio.run(run())
    assert r.all_delivered and r.tls is None
    assert sessions == [[b"EHLO", b"STARTTLS"], [b"EHLO", b"MAIL", b"RCPT", b"DATA", b"QUIT"]]



def test_a_reply_dripping_one_octet_at_a_time_still_times_out():
    # the timeout is for the whole reply (RFC 5321 4.5.3.2), not for each read
    async def run() -> tuple[AttemptResult, float]:
        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for octet in b"220-peer ESMTP\r\n220-slowly\r\n220-slowly\r\n220 done\r\n":
                writer.write(bytes([octet]))
                await asyncio.sleep(0.1)                  # 5 s for the whole greeting
            await reader.read()
            writer.close()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        start = time.monotonic()
        result = await deliver("127.0.0.1", port, helo="relay.example.test", sender="a@example.test",
                               recipients=[OutRcpt("b@example.org")], data=BODY, tls="none", timeout=1.0)
        elapsed = time.monotonic() - start
        server.close()
        return result, elapsed

    result, elapsed = asyncio.run(run())
    assert codes(result) == [(None, None, "CONNECT", False)]
    assert "timeout" in result.results[0].remote_text
    assert elapsed < 3.0, elapsed


def test_a_reply_that_arrives_unasked_while_the_session_is_idle_retires_the_session():
    # a second reply after the end of data would answer the next MAIL: the session is not reused
    results, seen = _pool_run(_ordinary, ["b@example.org", "c@example.org"], late=b"250 2.0.0 extra\r\n",
                              pause=0.3)
    assert all(r.all_delivered for r in results) and [r.reused for r in results] == [False, False]
    assert [v[:4] for v in seen] == [[b"EHLO", b"MAIL", b"RCPT", b"DATA"]] * 2   # a new connection each
