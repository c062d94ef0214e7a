"""Outbound SMTP over asyncio: the thin driver of ``relaywarden.protocol.client``.

This module owns the socket side of one delivery attempt to one next hop: connecting (with a
timeout), the STARTTLS handshake under the route's TLS policy, reading and writing with timeouts,
and turning every way a connection can fail into a ``DeliveryResult`` (``reply_code`` None,
temporary, ``command`` naming the step: CONNECT, STARTTLS, ...).  It also owns ``SessionPool``,
the connection cache that reuses a session for further messages to the same destination
(RSET between messages, QUIT when idle too long or when the pool closes).

TLS policies: ``none`` never starts TLS; ``opportunistic`` starts it when offered, without
checking the certificate, and falls back to one plaintext connection when the handshake fails;
``required`` insists on STARTTLS and verifies the certificate chain (against ``ca_file`` or the
system store) and the name (``server_name``, default the host).  Credentials are only ever sent
after STARTTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..protocol.client import (
    ClientOptions,
    Closed,
    Event,
    OutMessage,
    OutRcpt,
    ResetDone,
    SmtpClient,
    StartTlsNeeded,
    TransactionResult,
)
from ..queue.model import DeliveryResult

__all__ = ["AttemptResult", "OutRcpt", "SessionPool", "Timeouts", "deliver"]

READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed per step (Postfix's smtp_*_timeout, shorter)."""

    connect: float = 30.0
    command: float = 300.0      # waiting for any reply, and for the TLS handshake
    data: float = 600.0         # writing the message and waiting for the reply to its end
    quit: float = 10.0


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt to one next hop did to each recipient (same order as given)."""

    results: tuple[DeliveryResult, ...]
    remote_host: str
    remote_address: str | None
    tls: str | None                 # "TLSv1.3 TLS_AES_256_GCM_SHA384" when encrypted
    dsn_offered: bool               # False: the queue owes "relayed" DSNs for NOTIFY=SUCCESS
    reused: bool                    # the session came from the pool
    session_failure: bool           # no transaction happened: another host of the route may work

    @property
    def all_delivered(self) -> bool:
        return all(r.delivered for r in self.results)

    @property
    def try_next_host(self) -> bool:
        return self.session_failure and not any(r.delivered or r.permanent for r in self.results)


@dataclass(frozen=True, slots=True)
class _Destination:
    host: str
    port: int
    helo: str
    tls: str
    ca_file: str | None
    server_name: str | None
    username: str | None
    password: str | None
    connect_address: str | None
    timeouts: Timeouts

    @property
    def key(self) -> tuple[str, int, str, str | None]:
        return (self.host.lower(), self.port, self.tls, self.username)


class _Session:
    """One connection and its protocol state."""

    def __init__(self, dest: _Destination, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 client: SmtpClient, address: str | None):
        self.dest = dest
        self.reader = reader
        self.writer = writer
        self.client = client
        self.address = address
        self.tls: str | None = None
        self.messages = 0
        self._deadline = 0.0              # when the reply now awaited is late
        self._deadline_step = -1          # client.steps when that deadline was set

    async def run_until(self, wanted: Callable[[Event], bool], timeout: float) -> Event | None:
        """Drive the client until an event ``wanted`` (returned) or the session closes (Closed)."""
        client = self.client
        while True:
            if not await self._flush(timeout):
                continue
            event = client.next_event()
            while event is not None:
                if isinstance(event, StartTlsNeeded):
                    await self._starttls(event)
                    break                        # send the EHLO that follows the handshake
                if wanted(event) or isinstance(event, Closed):
                    return event
                event = client.next_event()
            if event is not None:
                continue
            if client.closed:
                return None
            if client.awaiting is None and client.state.name != "TLS":
                return None
            await self._read(timeout)

    def alive(self) -> bool:
        """Not closed by either side, as far as this end knows, and nothing arrived unasked
        while it was idle (a reply nobody waits for would answer the next command)."""
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and not getattr(self.reader, "_buffer", b""))

    async def _flush(self, timeout: float) -> bool:
        out = self.client.take_output()
        if not out:
            return True
        try:
            self.writer.write(out)
            # Wait only when the write did not all go out at once; over TLS always (asyncio's
            # TLS transport does not count what the socket underneath still holds).
            if self.tls is not None or self.writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeout):
                    await self.writer.drain()
        except (TimeoutError, asyncio.TimeoutError):
            self.client.timeout(timeout)
            return False
        except (OSError, ConnectionError) as exc:
            self.client.connection_lost(str(exc) or type(exc).__name__)
            return False
        return True

    async def _read(self, timeout: float) -> None:
        """Read more of the awaited reply. The timeout is for the whole reply (RFC 5321
        4.5.3.2), not for each read: a server that drips one octet at a time still times out."""
        wait = self.dest.timeouts.data if self.client.awaiting == "END-OF-DATA" else timeout
        loop = asyncio.get_running_loop()
        if self.client.steps != self._deadline_step:      # a command went out or a reply came
            self._deadline_step = self.client.steps
            self._deadline = loop.time() + wait
        try:
            async with asyncio.timeout_at(self._deadline):
                data = await self.reader.read(READ_SIZE)
        except (TimeoutError, asyncio.TimeoutError):
            self.client.timeout(wait)
            return
        except (OSError, ConnectionError) as exc:
            self.client.connection_lost(str(exc) or type(exc).__name__)
            return
        if data:
            self.client.receive(data)
        else:
            self.client.connection_lost()

    async def _starttls(self, event: StartTlsNeeded) -> None:
        dest = self.dest
        try:
            context = _tls_context(event.verify, dest.ca_file)
            await self.writer.start_tls(context, server_hostname=dest.server_name or dest.host,
                                        ssl_handshake_timeout=dest.timeouts.command)
        except ssl.SSLCertVerificationError as exc:
            self.client.tls_failed(f"certificate verification failed: {exc.verify_message or exc}")
            return
        except (TimeoutError, asyncio.TimeoutError):
            self.client.tls_failed(f"handshake timed out after {dest.timeouts.command:g}s")
            return
        except (ssl.SSLError, OSError, ConnectionError, ValueError) as exc:
            self.client.tls_failed(str(exc) or type(exc).__name__)
            return
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self.tls = f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()
        self.client.tls_started()

    async def quit(self) -> None:
        if self.client.ready:
            self.client.quit()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError, OSError):
                await asyncio.wait_for(self.run_until(lambda e: False, self.dest.timeouts.quit),
                                       self.dest.timeouts.quit)
        self.client.quit()
        await self.abort()

    async def abort(self) -> None:
        self.writer.close()
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError, OSError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)


@functools.lru_cache(maxsize=32)
def _tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context(cafile=ca_file)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _failed_everywhere(dest: _Destination, message: OutMessage, result: DeliveryResult) -> AttemptResult:
    return AttemptResult(tuple(result for _ in message.recipients), dest.host, result.remote_address,
                         None, False, False, True)


def _os_error_text(exc: BaseException) -> str:
    """"Connection refused" rather than asyncio's "Connect call failed (...)"."""
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return str(exc) or type(exc).__name__


async def _connect(dest: _Destination, policy: str) -> _Session | DeliveryResult:
    target = dest.connect_address or dest.host
    where = f"{dest.host}[{dest.connect_address}]:{dest.port}" if dest.connect_address else f"{dest.host}:{dest.port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target, dest.port), dest.timeouts.connect)
    except (TimeoutError, asyncio.TimeoutError):
        return DeliveryResult(None, None, dest.host, dest.connect_address,
                              f"connection to {where} timed out after {dest.timeouts.connect:g}s", "CONNECT", False)
    except (OSError, UnicodeError) as exc:
        return DeliveryResult(None, None, dest.host, dest.connect_address,
                              f"connection to {where} failed: {_os_error_text(exc)}", "CONNECT", False)
    peer = writer.get_extra_info("peername")
    address = peer[0] if peer else dest.connect_address
    options = ClientOptions(helo=dest.helo, tls=policy, username=dest.username, password=dest.password,
                            remote_host=dest.host, remote_address=address)
    return _Session(dest, reader, writer, SmtpClient(options), address)


async def _transaction(session: _Session, message: OutMessage, reused: bool) -> AttemptResult:
    session.client.send_message(message)
    event = await session.run_until(lambda e: isinstance(e, TransactionResult), session.dest.timeouts.command)
    if not isinstance(event, TransactionResult):      # cannot happen: a failure ends the transaction
        failure = session.client.failure or DeliveryResult(
            None, None, session.dest.host, session.address, "session ended without a result", "MAIL", False)
        return _failed_everywhere(session.dest, message, failure)
    session.messages += 1
    return AttemptResult(event.results, session.dest.host, session.address, session.tls,
                         "DSN" in session.client.extensions, reused, event.session_failure)


async def _attempt(dest: _Destination, message: OutMessage, policy: str) -> tuple[AttemptResult, _Session | None]:
    session = await _connect(dest, policy)
    if isinstance(session, DeliveryResult):
        return _failed_everywhere(dest, message, session), None
    return await _transaction(session, message, reused=False), session


def _handshake_failed(result: AttemptResult, session: _Session | None) -> bool:
    return (session is not None and result.session_failure and not session.client.tls
            and any(r.command == "STARTTLS" and r.reply_code is None for r in result.results))


async def _fresh_attempt(dest: _Destination, message: OutMessage) -> tuple[AttemptResult, _Session | None]:
    """Connect, deliver; with opportunistic TLS, retry once in plaintext after a failed handshake."""
    result, session = await _attempt(dest, message, dest.tls)
    if dest.tls == "opportunistic" and _handshake_failed(result, session):
        assert session is not None
        await session.abort()
        result, session = await _attempt(dest, message, "none")
    return result, session


async def _finish_session(session: _Session | None) -> None:
    if session is None:
        return
    if session.client.closed:
        await session.abort()
    else:
        await session.quit()


def _destination(host: str, port: int, *, helo: str, tls: str, ca_file: str | None, server_name: str | None,
                 username: str | None, password: str | None, connect_address: str | None,
                 timeouts: Timeouts | None, timeout: float | None) -> _Destination:
    if tls not in ("none", "opportunistic", "required"):
        raise ValueError(f"TLS policy must be none, opportunistic or required, not {tls!r}")
    if (username is None) != (password is None):
        raise ValueError("credentials need both a username and a password")
    t = timeouts or Timeouts()
    if timeout is not None:
        t = replace(t, connect=min(t.connect, timeout), command=timeout, data=timeout)
    return _Destination(host, port, helo, tls, str(ca_file) if ca_file else None, server_name,
                        username, password, connect_address, t)


def _message(sender: str, recipients: list[OutRcpt], data: bytes, envid: str | None, ret: str | None,
             body: str | None, smtputf8: bool) -> OutMessage:
    return OutMessage(sender, tuple(recipients), data, envid=envid, ret=ret, body=body, smtputf8=smtputf8)


async def deliver(host: str, port: int = 25, *, helo: str, sender: str, recipients: list[OutRcpt], data: bytes,
                  tls: str = "opportunistic", ca_file: str | None = None, server_name: str | None = None,
                  username: str | None = None, password: str | None = None, envid: str | None = None,
                  ret: str | None = None, body: str | None = None, smtputf8: bool = False,
                  timeout: float | None = None, timeouts: Timeouts | None = None,
                  connect_address: str | None = None) -> AttemptResult:
    """One attempt on a connection of its own (QUIT at the end).  Never raises for network trouble."""
    dest = _destination(host, port, helo=helo, tls=tls, ca_file=ca_file, server_name=server_name,
                        username=username, password=password, connect_address=connect_address,
                        timeouts=timeouts, timeout=timeout)
    message = _message(sender, recipients, data, envid, ret, body, smtputf8)
    result, session = await _fresh_attempt(dest, message)
    await _finish_session(session)
    return result


class SessionPool:
    """Reuses sessions per destination (host, port, TLS policy, user).

    After a message a session that is still healthy waits idle for the next message to the same
    destination. It is taken again without RSET when its last transaction ended with the reply to
    its end of data, with RSET otherwise; a session the peer closed meanwhile is replaced by a new
    one, which costs the message nothing. At most ``max_idle_per_destination`` sessions wait per
    destination and ``max_idle`` in all (mail to many domains must not keep as many connections
    open); idle sessions are closed with QUIT after ``idle_timeout`` seconds, after
    ``max_messages`` messages, and by ``close()``.
    """

    def __init__(self, *, idle_timeout: float = 5.0, max_idle_per_destination: int = 4, max_messages: int = 100,
                 max_idle: int = 100):
        self.idle_timeout = idle_timeout
        self.max_idle_per_destination = max_idle_per_destination
        self.max_idle = max_idle
        self.max_messages = max_messages
        self._idle: dict[tuple[str, int, str, str | None], list[_Session]] = {}
        self._timers: dict[_Session, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def idle_count(self, host: str | None = None, port: int | None = None) -> int:
        return sum(len(sessions) for key, sessions in self._idle.items()
                   if (host is None or key[0] == host.lower()) and (port is None or key[1] == port))

    async def deliver(self, host: str, port: int = 25, *, helo: str, sender: str, recipients: list[OutRcpt],
                      data: bytes, tls: str = "opportunistic", ca_file: str | None = None,
                      server_name: str | None = None, username: str | None = None, password: str | None = None,
                      envid: str | None = None, ret: str | None = None, body: str | None = None,
                      smtputf8: bool = False, timeout: float | None = None, timeouts: Timeouts | None = None,
                      connect_address: str | None = None) -> AttemptResult:
        """Like ``deliver()``, on a pooled session when one is idle for this destination."""
        if self._closed:
            raise RuntimeError("the session pool is closed")
        dest = _destination(host, port, helo=helo, tls=tls, ca_file=ca_file, server_name=server_name,
                            username=username, password=password, connect_address=connect_address,
                            timeouts=timeouts, timeout=timeout)
        message = _message(sender, recipients, data, envid, ret, body, smtputf8)
        session = await self._take_idle(dest)
        if session is not None:
            result = await _transaction(session, message, reused=True)
            if result.session_failure and all(r.command == "MAIL" or (r.reply_code is None and r.permanent)
                                              for r in result.results):
                # The idle session had died (or said 421) before the server took anything:
                # the message goes again at once on a new connection, no harm done.
                await _finish_session(session)
                result, session = await _fresh_attempt(dest, message)
        else:
            result, session = await _fresh_attempt(dest, message)
        await self._release(dest, session)
        return result

    async def _take_idle(self, dest: _Destination) -> _Session | None:
        sessions = self._idle.get(dest.key, [])
        while sessions:
            session = sessions.pop()
            if not sessions:
                del self._idle[dest.key]            # no table entry per destination ever seen
            timer = self._timers.pop(session, None)
            if timer is not None:
                timer.cancel()
            if not session.alive():
                # Closed, or a reply came that nobody asked for: it would answer the next
                # command (RSET included), and every reply after it would be one off.
                await _finish_session(session)
                continue
            if session.client.ready and session.client.clean:
                # The last transaction ended with the reply to its end of data: the server
                # waits for MAIL, so no RSET round trip (a session that died meanwhile is
                # found by the MAIL, and the message then goes on a new connection).
                return session
            if session.client.ready:
                session.client.reset()
                event = await session.run_until(lambda e: isinstance(e, ResetDone), dest.timeouts.command)
                if isinstance(event, ResetDone) and event.ok and session.client.ready:
                    return session
            await _finish_session(session)
        return None

    async def _release(self, dest: _Destination, session: _Session | None) -> None:
        if session is None:
            return
        sessions = self._idle.get(dest.key, [])
        if (self._closed or not session.client.ready or session.messages >= self.max_messages
                or len(sessions) >= self.max_idle_per_destination or len(self._timers) >= self.max_idle):
            await _finish_session(session)
            return
        self._idle.setdefault(dest.key, sessions).append(session)
        loop = asyncio.get_running_loop()
        self._timers[session] = loop.call_later(self.idle_timeout, self._expire, dest.key, session)

    def _expire(self, key: tuple[str, int, str, str | None], session: _Session) -> None:
        """QUIT a session that stayed idle for ``idle_timeout`` seconds."""
        self._timers.pop(session, None)
        sessions = self._idle.get(key, [])
        if session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._idle[key]
            task = asyncio.get_running_loop().create_task(_finish_session(session))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """QUIT every idle session (and wait for those already saying QUIT)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        idle = [s for sessions in self._idle.values() for s in sessions]
        self._idle.clear()
        await asyncio.gather(*(_finish_session(s) for s in idle), *self._closing, return_exceptions=True)

    async def __aenter__(self) -> SessionPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
