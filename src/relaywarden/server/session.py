"""One SMTP connection: an ``asyncio.Protocol`` that drives the sans-I/O core.

It owns what needs the outside world: the transport and STARTTLS, the PROXY protocol header,
connection limits, timeouts (checked by the listener's sweeper), the relay decision calls, AUTH
verification off the event loop, and the queue commit before the reply to DATA/BDAT.  All SMTP
syntax and sequencing stays in ``relaywarden.protocol.server``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import TYPE_CHECKING

from .. import status
from ..events import EventId, session_summary_text
from ..policy.relay import SessionFacts, decide_connection, decide_mail, decide_recipient
from ..protocol import server as core
from ..protocol.proxy import MAX_HEADER_BYTES, ProxyError, parse_proxy_header
from ..dns import confirmed_name
from ..ids import hex_id
from ..queue.model import QueueFull
from ..users import verify_password
from . import receive
from .tls import describe

if TYPE_CHECKING:
    from .app import ListenerRuntime

UNKNOWN_CLIENT = "unknown"     # the client behind a proxy that did not say who it is
_MAX_BUFFERED = 256 * 1024     # input held in memory while the session waits, before reading pauses
# Commands are fed to the protocol core in pieces of this size, so that a client that pipelines
# without reading the replies is stopped (reading pauses) after about one piece's replies more
# than the transport's write buffer holds, instead of after everything it sent.
_COMMAND_SLICE = 4096

_REFUSAL_EVENTS = {
    "smuggling": EventId.SMUGGLING_REFUSED,
    "pipelining-before-starttls": EventId.PIPELINING_BEFORE_STARTTLS,
    "size": EventId.LIMIT_EXCEEDED,
    "line-length": EventId.LIMIT_EXCEEDED,
    "recipients": EventId.LIMIT_EXCEEDED,
    "too-many-errors": EventId.LIMIT_EXCEEDED,
}


class SmtpSession(asyncio.Protocol):
    def __init__(self, rt: ListenerRuntime):
        self.rt = rt
        self.server = rt.server
        self.id = hex_id(6)
        self.transport: asyncio.Transport | None = None
        self.core: core.SmtpServer | None = None
        self.peer = ("", 0)
        self.client = ("", 0)
        self.proxy: str | None = None
        self.proxy_destination: str | None = None
        self.rdns: str | None = None
        self.tls_info: str | None = None
        self.deadline = 0.0
        self.accepted = 0
        self.refused = 0
        self.last_refusal: str | None = None
        self._proxy_buf: bytearray | None = None
        self._early: bytearray | None = None      # input that arrived before the greeting
        self._reading_paused = False
        self._write_blocked = False     # the client does not read its replies (pause_writing)
        self._unfed: bytes = b""        # input not given to the core while it is blocked
        # Decrypted bytes that arrive after the handshake but before _starttls() resumes
        # (a fast client's first command can come with its Finished message): kept, not lost.
        self._tls_early: bytearray | None = None
        self._counted = False
        self._ended = False
        self._gone = False              # the client has closed the connection
        self._committing = False        # a message is with the queue; its answer is awaited
        self._facts: SessionFacts | None = None

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = self.client = (_clean(peer[0]), peer[1])
        self.tls_info = describe(transport.get_extra_info("ssl_object"))
        self.rt.sessions.add(self)
        self.rt.sessions_changed()
        self.deadline = time.monotonic() + self.rt.limits.command_timeout
        if self.rt.config.proxy_protocol and self.rt.is_proxy(self.peer[0]):
            self._proxy_buf = bytearray()
            return
        self._begin()

    def _begin(self) -> None:
        rt = self.rt
        limits = rt.limits
        self.core = core.SmtpServer(rt.options(tls_active=self.tls_info is not None))
        # Counted first, then compared (both counts include this connection): two workers
        # taking the last place at the same moment will mostly both refuse; only if each reads
        # the other's count before it lands can both accept (server/limits.py).
        rt.client_counted(self.client[0], +1)
        active, from_client = rt.active(), rt.from_client(self.client[0])
        if active > limits.max_connections or from_client > limits.max_connections_per_client:
            rt.client_counted(self.client[0], -1)
            self.server.emit(EventId.CONNECTION_LIMIT, self, text=(
                f"connection from {self.client[0]} refused: listener {rt.name} is at its connection "
                f"limit ({limits.max_connections} in all, {limits.max_connections_per_client} per client)"),
                active=active, from_client=from_client - 1)
            self.core.refuse_connection(status.too_many_connections())
            self._pump()
            return
        self._counted = True
        if rt.needs_rdns:
            # a relay or connection list names domains: learn the client's forward-confirmed
            # reverse DNS name before anything is decided (input before the greeting waits)
            self._early = bytearray()
            asyncio.ensure_future(self._lookup_then_greet())
            return
        self._greet()

    async def _lookup_then_greet(self) -> None:
        try:
            self.rdns = await asyncio.wait_for(confirmed_name(self.server.resolver, self.client[0]),
                                               self.server.config.dns.timeout * 2)
        except (asyncio.TimeoutError, OSError):
            self.rdns = None
        self._facts = None
        if self.transport is None or self.transport.is_closing():
            return
        early, self._early = self._early, None
        self._greet()
        if early and self.core is not None and not self.core.closed:
            self.core.receive(bytes(early))
            self._pump()

    def _greet(self) -> None:
        refusal = decide_connection(self.server.loaded, self.facts())
        if refusal is not None:
            self.server.emit(refusal.event, self, text=refusal.admin_text, decision=refusal.id)
            self.core.refuse_connection(refusal.reply)
            self._pump()
            return
        self.core.greet()
        self._pump()

    def facts(self) -> SessionFacts:
        """What the relay decision knows of the session. Kept while it holds: the client, its
        name and the proxy are settled before the greeting; TLS and the user are compared."""
        user = self.core.auth_user if self.core else None
        tls = self.tls_info is not None
        facts = self._facts
        if facts is None or facts.auth_user != user or facts.tls is not tls:
            facts = self._facts = SessionFacts(
                listener=self.rt.name,
                client_address=self.client[0],
                client_rdns=self.rdns,
                proxy_address=self.proxy,
                tls=tls,
                auth_user=user,
            )
        return facts

    def _touch(self) -> None:
        """The session's deadline: the data timeout while message data is read, else the
        command timeout, counted from now."""
        self.deadline = time.monotonic() + (
            self.rt.limits.data_timeout if self.core and self.core.state in (core.State.DATA, core.State.BDAT)
            else self.rt.limits.command_timeout)

    def data_received(self, data: bytes) -> None:
        if self._proxy_buf is not None:
            self._touch()
            self._proxy_header(data)
            return
        if self._tls_early is not None:
            self._touch()
            self._tls_early += data
            self._hold_input(len(self._tls_early))
            return
        if self.core is None:
            return
        if self._unfed:
            self._touch()
            self._unfed += data
            return
        self._feed(data)             # sets the deadline after reading, in the state it leaves

    def _feed(self, data: bytes) -> None:
        """Give input to the core, in slices while it reads commands: after each, a client whose
        replies pile up unread (the transport asked to pause writing) stops being read."""
        core_ = self.core
        assert core_ is not None
        start, end = 0, len(data)
        while start < end:
            if end - start <= _COMMAND_SLICE or core_.state in (core.State.DATA, core.State.BDAT):
                piece, start = (data[start:] if start else data), end
            else:
                piece, start = data[start:start + _COMMAND_SLICE], start + _COMMAND_SLICE
            core_.receive(piece)
            self._pump()
            if core_.closed:
                return
            if self._write_blocked and start < end:
                self._unfed = data[start:]
                self._pause_input()
                self._touch()
                return
        if core_.waiting:
            self._hold_input(core_.buffered)
        self._touch()            # "DATA" and the first data in one read: the data timeout now

    def pause_writing(self) -> None:
        self._write_blocked = True
        self._pause_input()

    def resume_writing(self) -> None:
        self._write_blocked = False
        unfed, self._unfed = self._unfed, b""
        if unfed and self.core is not None and not self.core.closed:
            self._feed(unfed)
        c = self.core
        if (not self._write_blocked and not self._unfed and c is not None and not c.waiting
                and self._early is None and self._tls_early is None):
            self._release_input()

    def _pause_input(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            self._reading_paused = True

    def _hold_input(self, buffered: int) -> None:
        """Stop reading while a client that must wait (for a commit, a password check, a DNS
        answer, the TLS handshake) keeps sending: its input stays in the kernel, not in memory."""
        if buffered > _MAX_BUFFERED:
            self._pause_input()

    def _release_input(self) -> None:
        if self._write_blocked or self._unfed:
            return          # resume_writing reads on once the client has taken its replies
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def _proxy_header(self, data: bytes) -> None:
        buf = self._proxy_buf
        assert buf is not None
        buf += data
        try:
            parsed = parse_proxy_header(bytes(buf))
        except ProxyError as exc:
            self._proxy_refused(f"bad PROXY header: {exc}")
            return
        if parsed is None:
            if len(buf) > MAX_HEADER_BYTES:
                self._proxy_refused("PROXY header too long")
            return
        header, used = parsed
        rest = bytes(buf[used:])
        self._proxy_buf = None
        self._facts = None
        self.proxy = self.peer[0]
        if header.destination is not None:
            self.proxy_destination = _clean(header.destination[0])   # the address the client dialled
        if header.command == "PROXY" and header.source is not None:
            self.client = (_clean(header.source[0]), header.source[1])
        else:
            # PROXY UNKNOWN, a v2 LOCAL (the proxy's own health check) or a family without
            # addresses: the client is not known, and must not inherit the proxy's own address
            # (a relay list that covers the proxy would let any such client relay).
            self.client = (UNKNOWN_CLIENT, 0)
        self._begin()
        if rest and self.core is not None and not self.core.closed:
            # A client must wait for the greeting; bytes sent before it are a protocol error.
            self.core.receive(rest)
            self._pump()

    def _proxy_refused(self, why: str) -> None:
        self.server.emit(EventId.PROXY_REFUSED, self, text=f"{why} from proxy {self.peer[0]}; connection closed")
        self._proxy_buf = None
        if self.transport:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.rt.sessions.discard(self)
        self.rt.sessions_changed()
        if self._counted:
            self.rt.client_counted(self.client[0], -1)
            self._counted = False
        self._gone = True
        if self.core is not None and self.core.waiting and self._committing:
            return              # the summary follows the queue's answer (_queued), with its message
        self._summary()

    def _summary(self) -> None:
        if self._ended or self.core is None:
            return
        self._ended = True
        user = self.core.auth_user
        text = session_summary_text(client=self.client[0], listener=self.rt.name, tls=self.tls_info,
                                    user=user, accepted=self.accepted, refused=self.refused,
                                    last_refusal=self.last_refusal, messages=self.core.messages)
        self.server.emit(EventId.SESSION_SUMMARY, self, text=text, accepted=self.accepted,
                         refused=self.refused, messages=self.core.messages,
                         last_refusal=self.last_refusal, helo=self.core.helo, worker=self.server.worker,
                         proxy=self.proxy, proxy_destination=self.proxy_destination)

    def expire(self) -> None:
        if self.core is not None and not self.core.closed and not self.core.waiting:
            self.server.emit(EventId.LIMIT_EXCEEDED, self, text=f"session from {self.client[0]} timed out; closed with 421 4.4.2", limit="timeout")
            self.core.timeout()
            self._pump()
        elif self.core is None and self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        if self.core is not None and not self.core.closed and not self.core.waiting:
            self.core.shutdown()
            self._pump()

    # --- the pump: core events -> actions -> core answers ---------------------------------------

    def _pump(self) -> None:
        c = self.core
        assert c is not None
        while True:
            ev = c.next_event()
            if ev is None:
                break
            kind = type(ev)
            if kind is core.RcptRequest:
                self._rcpt(ev)
            elif kind is core.MailRequest:
                self._mail(ev)
            elif kind is core.MessageReceived:
                self._message(ev)
            elif kind is core.AuthRequest:
                asyncio.ensure_future(self._auth(ev))
            elif kind is core.StartTlsRequest:
                self._flush()
                if self.transport:
                    self.transport.pause_reading()
                asyncio.ensure_future(self._starttls())
            elif kind is core.Refused:
                self._refused(ev)
            elif kind is core.Closed:
                self._flush()
                if self.transport:
                    self.transport.close()
        self._flush()
        if self._reading_paused and not c.waiting and self._early is None and self._tls_early is None:
            self._release_input()

    def _flush(self) -> None:
        out = self.core.take_output() if self.core else b""
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _refused(self, ev: core.Refused) -> None:
        self.refused += 1 if ev.command == "RCPT" else 0     # syntax, sequence, limit: a refused RCPT
        self.last_refusal = str(ev.reply)
        event = _REFUSAL_EVENTS.get(ev.kind)
        if ev.kind == "auth" and ev.reply.code == 538:
            event = EventId.AUTH_REFUSED_PLAINTEXT
        if event is None:
            event = EventId.PROTOCOL_ERROR
        self.server.emit(event, self, text=f"{ev.reply} ({ev.kind}{': ' + ev.detail if ev.detail else ''})",
                         kind=ev.kind, reply=str(ev.reply), detail=ev.detail)

    def _mail(self, ev: core.MailRequest) -> None:
        try:
            refusal = decide_mail(self.server.loaded, self.server.directory, self.facts(), ev.path.address)
        except Exception as exc:   # fail closed
            self.server.log_error("MAIL decision failed", exc)
            self.core.mail_result(status.policy_error())
            return
        if refusal is None:
            self.core.mail_result(None)
            return
        self.last_refusal = str(refusal.reply)
        self.server.emit(refusal.event, self, text=refusal.admin_text, decision=refusal.id,
                         reply=str(refusal.reply), **refusal.inputs)
        self.core.mail_result(refusal.reply)

    def _rcpt(self, ev: core.RcptRequest) -> None:
        env = self.core.envelope
        sender = env.sender.address.address if env and env.sender.address else ""
        try:
            d = decide_recipient(self.server.loaded, self.server.directory, self.facts(), sender, ev.path.address)
        except Exception as exc:   # fail closed
            self.server.log_error("RCPT decision failed", exc)
            self.core.rcpt_result(status.policy_error(), False)
            return
        if d.accepted:
            self.accepted += 1
        else:
            self.refused += 1
            self.last_refusal = str(d.reply)
        self.server.emit(d.event, self, text=d.admin_text, decision=d.id, reply=str(d.reply),
                         verdict=str(d.verdict.value), route=d.route,
                         rules=[f"{r.rule}: {r.detail} ({r.where})" for r in d.rules], fix=d.fix,
                         **d.inputs)
        self.core.rcpt_result(d.reply, d.accepted, d)

    async def _auth(self, ev: core.AuthRequest) -> None:
        creds = ev.credentials
        entry = self.server.directory.login(creds.username)
        ok = False
        try:
            ok = await asyncio.get_running_loop().run_in_executor(
                self.server.auth_pool, verify_password, entry.password_hash if entry else None, creds.password)
        except Exception as exc:
            self.server.log_error("password verification failed", exc)
            if self.core and not self.core.closed:
                self.core.auth_result(None, status.auth_temporary_failure())
                self._pump()
            return
        if self.core is None or self.core.closed:
            return
        authzid_ok = not creds.authzid or creds.authzid.casefold() == creds.username.casefold()
        if ok and entry is not None and entry.enabled and authzid_ok:
            self.server.emit(EventId.AUTH_SUCCEEDED, self, user=entry.address, text=(
                f"{self.client[0]} authenticated as {entry.address} with {ev.mechanism} on listener {self.rt.name}"),
                method=ev.mechanism)
            self.core.auth_result(entry.address)
        else:
            why = ("no such user" if entry is None else "mailbox disabled" if not entry.enabled
                   else "authorization identity differs from the login" if not authzid_ok else "wrong password")
            self.server.emit(EventId.AUTH_FAILED, self, user=creds.username[:200], text=(
                f"authentication as {creds.username[:200]!r} with {ev.mechanism} from {self.client[0]} failed: {why}"),
                method=ev.mechanism, reason=why)
            await asyncio.sleep(self.server.auth_failure_delay)
            if self.core is None or self.core.closed:
                return
            self.core.auth_result(None, status.auth_failed())
        self._pump()

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        self._tls_early = bytearray()
        try:
            new = await asyncio.wait_for(
                loop.start_tls(self.transport, self, self.rt.ssl_context, server_side=True),
                timeout=self.rt.limits.command_timeout)
        except Exception as exc:
            self._tls_early = None
            self.server.emit(EventId.TLS_HANDSHAKE_FAILED, self, text=f"TLS handshake with {self.client[0]} failed: {exc!r}")
            if self.transport:
                self.transport.abort()
            self.core.close("TLS handshake failed")
            return
        self.transport = new
        self.tls_info = describe(new.get_extra_info("ssl_object"))
        early, self._tls_early = bytes(self._tls_early or b""), None
        self.core.tls_started()
        if early:
            self.core.receive(early)
        self._pump()

    def _message(self, ev: core.MessageReceived) -> None:
        srv = self.server
        limits = self.rt.limits
        looped = receive.loop_check(ev.data, limits.max_received_headers)
        if looped is not None:
            self.server.emit(EventId.LIMIT_EXCEEDED, self, text=f"mail loop: {looped}", limit="received-headers")
            self.core.message_result(looped)
            return
        env = ev.envelope
        c = self.core
        header = receive.received_header(
            helo=c.helo or "unknown", client_address=self.client[0], client_rdns=self.rdns,
            hostname=srv.hostname,
            protocol=receive.protocol_name(esmtp=c.esmtp, tls=self.tls_info is not None,
                                           authenticated=c.auth_user is not None, utf8=env.smtputf8),
            session_id=f"{self.id}.{c.messages + 1}", tls=self.tls_info,
            recipient=env.recipients[0].info.recipient if len(env.recipients) == 1 else None,
            when=time.time())
        msg = receive.build_message(
            envelope=env, data=header + ev.data, listener=self.rt.name, client_address=self.client[0],
            client_port=self.client[1], helo=c.helo or "", auth_user=c.auth_user, tls=self.tls_info,
            session_id=self.id)
        self._committing = True
        try:
            srv.queue.submit_to(srv.loop, msg, lambda result, exc: self._queued(result, exc, msg),
                                with_ids=srv.runner is not None)
        except Exception as exc:
            self._queued(None, exc, msg)

    def _queued(self, result, exc: BaseException | None, msg) -> None:
        """The queue's answer: reply first (the client is owed it), then log and wake the runner.
        A message committed after its client went away is still queued, logged and delivered."""
        self._committing = False
        open_ = self.core is not None and not self.core.closed
        left = self._gone or not open_
        if exc is None:
            qid, recipient_ids = result if self.server.runner is not None else (result, None)
            if open_:
                self.core.message_result(status.queued(qid))
            if self.server.runner is not None:
                self.server.runner.offer(qid, recipient_ids, msg)   # delivery starts now, from memory
            elif self.server.doorbell is not None:
                self.server.doorbell.ring(qid)                       # the delivery process starts on it
            self.server.emit(EventId.MESSAGE_QUEUED, self, message_id=qid, text=(
                f"queued {qid} from <{msg.sender}> for {len(msg.recipients)} recipient(s), {len(msg.data)} octets"
                + ("; the client left before the 250" if left else "")),
                sender=msg.sender, recipients=[r.address for r in msg.recipients], size=len(msg.data))
        else:
            reply = status.storage_full() if isinstance(exc, QueueFull) else status.queue_error()
            self.last_refusal = str(reply)
            if open_:
                self.core.message_result(reply)
            self.server.emit(EventId.QUEUE_ERROR, self, text=f"message from <{msg.sender}> not queued: {exc}; answered {reply}",
                             reply=str(reply), error=str(exc))
        if self._gone:
            self._summary()          # postponed by connection_lost until this answer
        elif open_:
            self._pump()


def _clean(address: str) -> str:
    """Normalise an address (IPv4-mapped IPv6 becomes IPv4, zone ids dropped)."""
    if ":" not in address and address[:1].isdigit() and address.count(".") == 3:
        return address              # IPv4 as the kernel writes it: already canonical
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)
