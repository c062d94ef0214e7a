"""The server side of SMTP (RFC 5321 and its extensions) as a sans-I/O state machine.

Bytes go in with ``receive()``; replies come out of ``take_output()``; whatever needs the outside
world comes out of ``next_event()`` as an event.  Events that need an answer (``MailRequest``,
``RcptRequest``, ``AuthRequest``, ``MessageReceived``, ``StartTlsRequest``) pause the machine until
the driver answers with the matching method; meanwhile further input stays buffered, which is what
PIPELINING needs.  No asyncio, no sockets: the same object is driven by the asyncio listener, by the
dialog tests without a socket, and by the fuzzer.

What it defends, each with its own reply from ``relaywarden.status``:

* DATA ends only at ``CRLF . CRLF``.  A bare LF or bare CR anywhere in the data refuses the whole
  message at that real end (SMTP smuggling, CVE-2023-51764 family), so nothing smuggled is ever
  read as a command or becomes a second message.  BDAT chunks are checked the same way.
* Bytes pipelined after STARTTLS are discarded, never read after the handshake (CVE-2011-0411).
* Command line length, message size (SIZE and actual), recipients per message, errors per session,
  NUL bytes and non-ASCII in commands without SMTPUTF8.

The table ``ALLOWED`` says which commands each state accepts; everything else is "bad sequence".
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto

from .. import status
from ..status import Reply
from . import sasl
from .address import AddressError, Path, envid_decode, parse_mail_from, parse_orcpt, parse_rcpt_to


class State(Enum):
    CONNECTED = auto()   # greeting sent, no EHLO/HELO yet
    READY = auto()       # EHLO/HELO done, no transaction
    MAIL = auto()        # MAIL accepted, no recipient yet
    RCPT = auto()        # at least one recipient accepted
    DATA = auto()        # reading message data after 354
    BDAT = auto()        # reading the octets of a BDAT chunk
    AUTH = auto()        # inside a SASL exchange
    WAITING = auto()     # an event awaits the driver's answer
    TLS = auto()         # STARTTLS accepted; the driver is doing the handshake
    CLOSED = auto()


# Which commands each state accepts.  Anything else there is answered 503 5.5.1.
ALLOWED: dict[State, frozenset[str]] = {
    State.CONNECTED: frozenset({"EHLO", "HELO", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
    State.READY: frozenset({"EHLO", "HELO", "MAIL", "NOOP", "RSET", "QUIT", "HELP", "VRFY", "STARTTLS", "AUTH"}),
    State.MAIL: frozenset({"EHLO", "HELO", "RCPT", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
    State.RCPT: frozenset({"EHLO", "HELO", "RCPT", "DATA", "BDAT", "NOOP", "RSET", "QUIT", "HELP", "VRFY"}),
}
KNOWN = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
                   "HELP", "STARTTLS", "AUTH", "EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"})
# Known but deliberately not offered (EXPN would disclose lists; the rest are obsolete): 502 5.5.1.
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML"})

MAX_SASL_LINE = 12288
_HELO_NAME = re.compile(r"^(\[[0-9A-Za-z:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]{0,253}))$")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What one listener offers and enforces (built by the driver from the configuration)."""

    hostname: str = "localhost"
    max_command_line: int = 512
    max_data_line: int = 1000
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 10
    starttls: bool = False          # offer STARTTLS (a certificate is available, TLS not yet active)
    require_tls: bool = False       # MAIL and AUTH only after TLS
    auth_mechanisms: tuple[str, ...] = ()
    auth_plaintext: bool = False    # offer AUTH before TLS
    tls_active: bool = False        # implicit TLS listener


# --- events ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Helo:
    name: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class MailRequest:
    """Answer with ``mail_result(reply_or_None)``: None accepts."""
    path: Path


@dataclass(frozen=True, slots=True)
class RcptRequest:
    """Answer with ``rcpt_result(reply, accepted, info)``."""
    path: Path
    notify: tuple[str, ...]
    orcpt: str | None


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Answer with ``auth_result(user_or_None, reply_if_failed)``."""
    mechanism: str
    credentials: sasl.Credentials


@dataclass(frozen=True, slots=True)
class StartTlsRequest:
    """Do the TLS handshake, then call ``tls_started()`` (or ``close()`` on failure)."""
    discarded: int   # plaintext octets pipelined after STARTTLS and thrown away


@dataclass(slots=True)
class Recipient:
    path: Path
    notify: tuple[str, ...]
    orcpt: str | None
    info: object = None      # the driver's decision record


@dataclass(slots=True)
class Envelope:
    sender: Path
    recipients: list[Recipient] = field(default_factory=list)
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    declared_size: int | None = None


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """Answer with ``message_result(reply)`` once the message is durable (or refused)."""
    envelope: Envelope
    data: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """A reply the machine gave on its own that the driver may want to log (no answer needed)."""
    reply: Reply
    kind: str        # "smuggling", "size", "line-length", "recipients", "syntax", "sequence",
                     # "too-many-errors", "pipelining-before-starttls", "non-ascii", "auth"
    detail: str = ""
    command: str = ""  # the command it answered, when a command line was read ("RCPT", ...)


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event = Helo | MailRequest | RcptRequest | AuthRequest | StartTlsRequest | MessageReceived | Refused | Closed


class SmtpServer:
    """One SMTP session, server side."""

    def __init__(self, options: ServerOptions):
        self.opt = options
        self._state = State.CONNECTED
        self.tls = options.tls_active
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.envelope: Envelope | None = None
        self.errors = 0
        self.messages = 0
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._pending: type | None = None        # event class awaiting an answer
        self._resume = State.READY
        self._discard_line = False
        self._sasl: sasl.SaslExchange | None = None
        self._data = bytearray()
        self._data_scan = 0
        self._data_oversize = False
        self._data_stuffed = 0        # transparency dots in _data so far (RFC 5321 4.5.2)
        self._stuff_scan = 0          # where to count them from next
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_failed: Reply | None = None
        self._bdat_open = False                  # a BDAT chunk was taken in this transaction
        self._bdat_skip: tuple[Reply, State] | None = None   # refused BDAT: reply and state to go back to
        self._chunks = bytearray()
        self._verb = ""                          # the command being answered (for Refused)

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        # CLOSED is final: a reply that reached the error limit must not be undone by the
        # state change that follows it.
        if self._state is not State.CLOSED:
            self._state = value

    # --- driver interface -------------------------------------------------------------------

    def greet(self) -> None:
        self._reply(status.greeting(self.opt.hostname))

    def refuse_connection(self, reply: Reply) -> None:
        self._reply(reply)
        self._close("refused at connect")

    def receive(self, data: bytes) -> None:
        if self._state is State.CLOSED:
            return
        if self._state is State.TLS:
            return                      # plaintext after STARTTLS: never read
        self._in += data
        self._process()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_output(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Input octets received but not yet processed (the driver pauses reading past a limit)."""
        return len(self._in)

    @property
    def waiting(self) -> bool:
        return self._pending is not None

    def timeout(self) -> None:
        if self._state is not State.CLOSED:
            self._reply(status.timeout(self.opt.hostname))
            self._close("timeout")

    def shutdown(self) -> None:
        if self._state is not State.CLOSED:
            self._reply(status.shutting_down(self.opt.hostname))
            self._close("shutdown")

    def mail_result(self, refusal: Reply | None) -> None:
        self._answered(MailRequest)
        if refusal is not None:
            self._error(refusal)
            self.envelope = None
            self.state = State.READY
        else:
            self._reply(status.sender_ok())
            self.state = State.MAIL
        self._process()

    def rcpt_result(self, reply: Reply, accepted: bool, info: object = None) -> None:
        self._answered(RcptRequest)
        req = self._pending_rcpt
        self._pending_rcpt = None
        if accepted and reply.is_positive:
            assert self.envelope is not None
            self.envelope.recipients.append(Recipient(req.path, req.notify, req.orcpt, info))
            self._reply(reply)
            self.state = State.RCPT
        else:
            self._error(reply)
            self.state = State.RCPT if self.envelope and self.envelope.recipients else State.MAIL
        self._process()

    def auth_result(self, user: str | None, failure: Reply | None = None) -> None:
        self._answered(AuthRequest)
        if user is not None:
            self.auth_user = user
            self._reply(status.auth_succeeded())
        else:
            self._error(failure or status.auth_failed(), kind="auth")
        self.state = State.READY
        self._process()

    def message_result(self, reply: Reply) -> None:
        self._answered(MessageReceived)
        if reply.is_positive:
            self.messages += 1
            self._reply(reply)
        else:
            self._error(reply)
        self.envelope = None
        self.state = State.READY
        self._process()

    def tls_started(self) -> None:
        """The handshake succeeded: RFC 3207 says forget everything learnt before it."""
        self._answered(StartTlsRequest)
        self.tls = True
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self.envelope = None
        self.state = State.CONNECTED
        self._in.clear()
        self._process()

    def close(self, reason: str = "closed by driver") -> None:
        self._close(reason)

    # --- internals ---------------------------------------------------------------------------

    _pending_rcpt: RcptRequest | None = None

    def _answered(self, kind: type) -> None:
        if self._pending is not kind:
            raise RuntimeError(f"no {kind.__name__} is waiting for an answer")
        self._pending = None
        self.state = self._resume

    def _wait(self, event: Event, resume: State) -> None:
        self._pending = type(event)
        self._resume = resume
        self.state = State.WAITING
        self._events.append(event)

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.encode())

    def _error(self, reply: Reply, kind: str | None = None, detail: str = "", *, counted: bool = True) -> None:
        self._reply(reply)
        if kind:
            self._events.append(Refused(reply, kind, detail, self._verb))
        if not counted:
            return
        self.errors += 1
        if self.errors >= self.opt.max_errors and self._state is not State.CLOSED:
            self._reply(status.too_many_errors())
            self._events.append(Refused(status.too_many_errors(), "too-many-errors"))
            self._close("too many errors")

    def _close(self, reason: str) -> None:
        if self._state is not State.CLOSED:
            self.state = State.CLOSED
            self._in.clear()
            self._events.append(Closed(reason))

    def _process(self) -> None:
        while self._state is not State.CLOSED and self._pending is None:
            if self._state is State.DATA:
                if not self._read_data():
                    return
            elif self._state is State.BDAT:
                if not self._read_chunk():
                    return
            elif self._state is State.TLS:
                return
            else:
                self._verb = ""             # until a command line is read, no command is answered
                line = self._read_line()
                if line is None:
                    return
                if self._state is State.AUTH:
                    self._auth_line(line)
                else:
                    self._command(line)

    def _read_line(self) -> bytes | None:
        """The next complete line, or None when there is none yet.  Over-long lines are answered
        and skipped here, and reading goes on with whatever was pipelined after them."""
        limit = MAX_SASL_LINE if self._state is State.AUTH else self.opt.max_command_line
        while self._state is not State.CLOSED:
            idx = self._in.find(b"\n")
            if idx < 0:
                if len(self._in) > limit:
                    if not self._discard_line:
                        self._discard_line = True
                        self._line_error(bytes(self._in[:5]), status.line_too_long(limit), "line-length")
                    self._in.clear()
                return None
            raw = bytes(self._in[: idx + 1])
            del self._in[: idx + 1]
            if self._discard_line:
                self._discard_line = False
                continue
            if len(raw) > limit:
                self._line_error(raw, status.line_too_long(limit), "line-length")
                continue
            return raw
        return None

    def _line_error(self, raw: bytes, reply: Reply, kind: str, detail: str = "") -> None:
        """A command line refused before it could be read as a command. When it was a BDAT,
        the size of the chunk that follows is not known: RFC 3030 leaves no way to find the
        next command, and its octets must never be read as commands, so the session ends.
        In an AUTH exchange the line was the client's response: the exchange ends (RFC 4954
        4: 500 5.5.6), so that the client's next line is read as a command again."""
        if self._state is State.AUTH:
            self._sasl = None
            self.state = State.READY
            self._error(status.auth_line_too_long(), "auth", "response too long")
            return
        self._error(reply, kind, detail)
        if _BDAT_LINE.match(raw) and self._state is not State.CLOSED:
            self._close("unreadable BDAT command")

    def _command(self, raw: bytes) -> None:
        # raw ends with its LF: the one CR must be right before it (a CR or LF alone is refused)
        if len(raw) < 2 or raw.find(b"\r") != len(raw) - 2:
            self._line_error(raw, status.syntax_error("lines must end with CRLF, and CR or LF alone is not allowed"),
                             "syntax")
            return
        if b"\x00" in raw:
            self._line_error(raw, status.non_ascii_command(), "non-ascii", "NUL")
            return
        try:
            text = raw[:-2].decode("utf-8")
        except UnicodeDecodeError:
            self._line_error(raw, status.non_ascii_command(), "non-ascii", "invalid UTF-8")
            return
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        self._verb = verb if verb in KNOWN else ""
        if not text.isascii() and not self._utf8_allowed(verb, arg):
            self._line_error(raw, status.non_ascii_command(), "non-ascii")
            return
        if verb not in KNOWN:
            self._error(status.unrecognised_command(), "syntax", verb[:20])
            return
        if verb in NOT_IMPLEMENTED:
            self._cmd_unimplemented(verb, arg)      # 502 in every state, never "bad sequence"
            return
        allowed = ALLOWED.get(self._state, frozenset())
        if verb not in allowed:
            if verb == "BDAT":
                self._refuse_bdat(arg, self._sequence_reply(verb))
                return
            self._error(self._sequence_reply(verb), "sequence", verb)
            return
        _HANDLERS[verb](self, verb, arg)

    def _utf8_allowed(self, verb: str, arg: str) -> bool:
        if verb in ("MAIL", "RCPT"):
            return True     # the path parser decides: a UTF-8 address without SMTPUTF8 is 553 5.6.7
        if verb == "VRFY":
            return bool(self.envelope and self.envelope.smtputf8)
        return False

    def _sequence_reply(self, verb: str) -> Reply:
        if verb in ("MAIL", "STARTTLS", "AUTH") and self._state is State.CONNECTED:
            return status.bad_sequence("send EHLO or HELO first")
        if verb in ("MAIL", "AUTH", "STARTTLS"):
            return status.bad_sequence("a mail transaction is in progress")
        if verb == "RCPT":
            return status.bad_sequence("need MAIL before RCPT")
        if verb in ("DATA", "BDAT"):
            return status.bad_sequence("need RCPT before " + verb)
        return status.bad_sequence(f"{verb} not allowed now")

    # --- commands ----------------------------------------------------------------------------

    def _cmd_unimplemented(self, verb: str, arg: str) -> None:
        self._error(status.not_implemented(verb), "syntax", verb)

    def _cmd_ehlo(self, verb: str, arg: str) -> None:
        self._helo(arg.strip(), esmtp=True)

    def _cmd_helo(self, verb: str, arg: str) -> None:
        self._helo(arg.strip(), esmtp=False)

    def _helo(self, name: str, esmtp: bool) -> None:
        if not name or " " in name or not _HELO_NAME.match(name):
            self._error(status.syntax_error(f"{'EHLO' if esmtp else 'HELO'} needs a domain name or address literal"), "syntax")
            return
        self.helo, self.esmtp, self.envelope = name, esmtp, None
        self._reset_chunks()
        self.state = State.READY
        self._events.append(Helo(name, esmtp))
        if not esmtp:
            self._reply(status.helo(self.opt.hostname))
            return
        self._reply(status.ehlo(self.opt.hostname, name, self.extensions()))

    def extensions(self) -> list[str]:
        ext = ["PIPELINING", f"SIZE {self.opt.max_message_size}", "8BITMIME", "SMTPUTF8",
               "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.opt.starttls and not self.tls:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(self.opt.auth_mechanisms))
        return ext

    def _auth_offered(self) -> bool:
        return bool(self.opt.auth_mechanisms) and (self.tls or self.opt.auth_plaintext) and self.auth_user is None

    def _cmd_noop(self, verb: str, arg: str) -> None:
        self._reply(status.noop_ok())

    def _cmd_rset(self, verb: str, arg: str) -> None:
        if arg.strip():
            self._error(status.syntax_error("RSET takes no argument"), "syntax")
            return
        self.envelope = None
        self._reset_chunks()
        if self._state is not State.CONNECTED:
            self.state = State.READY
        self._reply(status.reset_ok())

    def _cmd_quit(self, verb: str, arg: str) -> None:
        self._reply(status.closing(self.opt.hostname))
        self._close("quit")

    def _cmd_help(self, verb: str, arg: str) -> None:
        self._reply(status.help_text())

    def _cmd_vrfy(self, verb: str, arg: str) -> None:
        if not arg.strip():
            self._error(status.syntax_error("VRFY needs an argument"), "syntax")
            return
        self._reply(status.vrfy_cannot())

    def _cmd_starttls(self, verb: str, arg: str) -> None:
        if self.tls:
            self._error(status.tls_already_active(), "sequence")
            return
        if not self.opt.starttls:
            self._error(status.tls_not_available(), "sequence")
            return
        if arg.strip():
            self._error(status.syntax_error("STARTTLS takes no argument"), "syntax")
            return
        self._reply(status.ready_for_tls())
        discarded = len(self._in)
        self._in.clear()
        if discarded:
            self._events.append(Refused(status.pipelining_before_starttls(), "pipelining-before-starttls", f"{discarded} octets"))
        self._pending = StartTlsRequest
        self._resume = State.TLS
        self.state = State.TLS
        self._events.append(StartTlsRequest(discarded))

    def _cmd_auth(self, verb: str, arg: str) -> None:
        if not self.opt.auth_mechanisms:
            self._error(status.auth_not_available(), "auth")
            return
        if self.auth_user is not None:
            self._error(status.auth_already(), "auth")
            return
        if not self.tls and not self.opt.auth_plaintext:
            self._error(status.auth_plaintext_refused(), "auth", "AUTH before TLS")
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(status.syntax_error("AUTH mechanism [initial-response]"), "syntax")
            return
        mech = parts[0].upper()
        if mech not in self.opt.auth_mechanisms:
            self._error(status.auth_mechanism_unknown(), "auth", mech)
            return
        try:
            self._sasl = sasl.new_exchange(mech)
            outcome = self._sasl.start(parts[1] if len(parts) == 2 else None)
        except sasl.SaslError as exc:
            self._sasl = None
            self._error(Reply(exc.code, exc.enhanced, exc.reason), "auth")
            return
        self._sasl_outcome(outcome)

    def _auth_line(self, raw: bytes) -> None:
        assert self._sasl is not None
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2]:
            self._sasl = None
            self.state = State.READY
            self._error(status.syntax_error("lines must end with CRLF, and CR or LF alone is not allowed"), "syntax")
            return
        line = raw.rstrip(b"\r\n").decode("ascii", "replace")
        try:
            outcome = self._sasl.step(line)
        except sasl.SaslCancelled:
            self._sasl = None
            self.state = State.READY
            self._error(status.auth_cancelled(), "auth", "cancelled")
            return
        except sasl.SaslError as exc:
            self._sasl = None
            self.state = State.READY
            self._error(Reply(exc.code, exc.enhanced, exc.reason), "auth")
            return
        self._sasl_outcome(outcome)

    def _sasl_outcome(self, outcome: str | sasl.Credentials) -> None:
        if isinstance(outcome, str):
            self.state = State.AUTH
            self._reply(status.auth_challenge(outcome))
            return
        mech = self._sasl.mechanism if self._sasl else "?"
        self._sasl = None
        self._wait(AuthRequest(mech, outcome), State.READY)

    def _cmd_mail(self, verb: str, arg: str) -> None:
        if self.opt.require_tls and not self.tls:
            self._error(status.tls_required(), "sequence")
            return
        if not arg[:5].upper() == "FROM:":
            self._error(status.syntax_error("MAIL FROM:<address> [parameters]"), "syntax")
            return
        try:
            path = parse_mail_from(arg[5:], smtputf8_offered=True)
        except AddressError as exc:
            self._error(status.bad_address(exc.code, exc.enhanced, exc.reason), "syntax", arg[5:80])
            return
        env = Envelope(sender=path)
        problem = self._mail_params(path.params, env)
        if problem is not None:
            self._error(problem, "syntax")
            return
        if not self.esmtp and path.params:
            self._error(status.syntax_error("parameters need EHLO"), "syntax")
            return
        self.envelope = env
        self._reset_chunks()
        self._wait(MailRequest(path), State.READY)

    def _mail_params(self, params: dict[str, str | None], env: Envelope) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return status.syntax_error("SIZE=number")
                env.declared_size = int(value)
                if env.declared_size > self.opt.max_message_size:
                    return status.message_too_big(self.opt.max_message_size)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return status.parameter_not_implemented(f"BODY={value}")
                env.body = value.upper()
            elif key == "SMTPUTF8":
                if value is not None:
                    return status.syntax_error("SMTPUTF8 takes no value")
                env.smtputf8 = True
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return status.syntax_error("RET=FULL or RET=HDRS")
                env.ret = value.upper()
            elif key == "ENVID":
                try:
                    if value is None or len(value) > 100:
                        raise AddressError(501, "5.5.4", "ENVID must be xtext of at most 100 characters")
                    env.envid = envid_decode(value)
                except AddressError as exc:
                    return status.bad_address(exc.code, exc.enhanced, exc.reason)
            elif key == "AUTH":
                continue    # RFC 4954 AUTH=<mailbox>: accepted, not trusted
            else:
                return status.parameter_not_implemented(key)
        if env.sender.address is not None and env.sender.address.utf8 and not env.smtputf8:
            return status.utf8_required()
        return None

    def _cmd_rcpt(self, verb: str, arg: str) -> None:
        assert self.envelope is not None
        if not arg[:3].upper() == "TO:":
            self._error(status.syntax_error("RCPT TO:<address> [parameters]"), "syntax")
            return
        if len(self.envelope.recipients) >= self.opt.max_recipients:
            # not an error of the client's: RFC 5321 4.5.3.1.10 has it send the rest in another
            # transaction, and the recipients accepted so far go on to DATA
            self._error(status.too_many_recipients(self.opt.max_recipients), "recipients", counted=False)
            return
        try:
            path = parse_rcpt_to(arg[3:], smtputf8_offered=True, utf8_session=self.envelope.smtputf8)
        except AddressError as exc:
            self._error(status.bad_address(exc.code, exc.enhanced, exc.reason), "syntax", arg[3:80])
            return
        notify: tuple[str, ...] = ()
        orcpt: str | None = None
        for key, value in path.params.items():
            if key == "NOTIFY":
                items = tuple(v.upper() for v in (value or "").split(","))
                if not value or any(i not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for i in items) \
                        or ("NEVER" in items and len(items) > 1) or len(set(items)) != len(items):
                    self._error(status.syntax_error("NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY"), "syntax")
                    return
                notify = items
            elif key == "ORCPT":
                try:
                    kind, addr = parse_orcpt(value or "")
                except AddressError as exc:
                    self._error(status.bad_address(exc.code, exc.enhanced, exc.reason), "syntax")
                    return
                orcpt = f"{kind};{addr}"
            else:
                self._error(status.parameter_not_implemented(key), "syntax")
                return
        req = RcptRequest(path, notify, orcpt)
        self._pending_rcpt = req
        self._wait(req, State.RCPT)

    def _cmd_data(self, verb: str, arg: str) -> None:
        if arg.strip():
            self._error(status.syntax_error("DATA takes no argument"), "syntax")
            return
        if self._bdat_open:
            self._error(status.bad_sequence("DATA cannot follow BDAT"), "sequence")
            return
        self._reply(status.start_data())
        self.state = State.DATA
        self._data = bytearray(b"\r\n")     # a virtual CRLF so ".\r\n" first ends an empty message
        self._data_scan = 0
        self._data_oversize = False
        self._data_stuffed = 0
        self._stuff_scan = 0

    def _read_data(self) -> bool:
        """Move input into the message; True when the end was found and handled."""
        if self._in:
            self._data += self._in
            self._in.clear()
        end = self._data.find(b"\r\n.\r\n", self._data_scan)
        if end < 0:
            # The size limit is on the message, not on its transparency dots (RFC 1870): they
            # are counted as they arrive (a CRLF ".." found from 3 octets before the new input
            # on, so one split across reads is counted once) and left out.
            self._data_stuffed += self._data.count(b"\r\n..", self._stuff_scan)
            self._stuff_scan = max(0, len(self._data) - 3)
            limit = self.opt.max_message_size + 2
            if len(self._data) - self._data_stuffed > limit:
                self._data_oversize = True
                tail = bytes(self._data[-4:])
                self._data = bytearray(b"\r\n" + tail)   # keep just enough to find the end
                self._data_stuffed = self._stuff_scan = 0
            self._data_scan = max(0, len(self._data) - 4)
            return False
        body = bytes(self._data[2 : end + 2])
        self._in[:0] = self._data[end + 5 :]   # whatever was pipelined after the end
        self._data = bytearray()
        self._end_message(body, dot_stuffed=True, oversize=self._data_oversize)
        return True

    def _cmd_bdat(self, verb: str, arg: str) -> None:
        if self._bdat_size(arg):
            self._bdat_open = True
            self.state = State.BDAT

    def _refuse_bdat(self, arg: str, reply: Reply) -> None:
        """BDAT out of sequence: read its chunk to the end (never as commands), then refuse it."""
        if self._bdat_size(arg):
            self._bdat_skip = (reply, self._state)
            self.state = State.BDAT

    def _bdat_size(self, arg: str) -> bool:
        parts = arg.split()
        if not parts or len(parts) > 2 or not parts[0].isdigit() or len(parts[0]) > 12 \
                or (len(parts) == 2 and parts[1].upper() != "LAST"):
            self._error(status.syntax_error("BDAT size [LAST]"), "syntax")
            # The chunk size is unknown: RFC 3030 leaves no way to resynchronise; close.
            self._close("unparsable BDAT")
            return False
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        return True

    def _reset_chunks(self) -> None:
        self._chunks = bytearray()
        self._bdat_failed = None
        self._bdat_open = False

    def _read_chunk(self) -> bool:
        if self._bdat_skip is not None:
            take = min(self._bdat_left, len(self._in))
            del self._in[:take]
            self._bdat_left -= take
            if self._bdat_left:
                return False
            (reply, self.state), self._bdat_skip = self._bdat_skip, None
            self._error(reply, "sequence", "BDAT")
            return True
        take = min(self._bdat_left, len(self._in))
        if take:
            if self._bdat_failed is None and len(self._chunks) + take <= self.opt.max_message_size:
                self._chunks += self._in[:take]
            elif self._bdat_failed is None:
                self._bdat_failed = status.message_too_big(self.opt.max_message_size)
                self._chunks.clear()
            del self._in[:take]
            self._bdat_left -= take
        if self._bdat_left:
            return False
        self.state = State.RCPT
        if not self._bdat_last:
            if self._bdat_failed is not None:
                self._error(self._bdat_failed, "size")
            else:
                self._reply(status.chunk_ok(len(self._chunks)))
            return True
        body = bytes(self._chunks)
        self._chunks = bytearray()
        failed, self._bdat_failed = self._bdat_failed, None
        if failed is not None:
            self._error(failed, "size")
            self.envelope = None
            self.state = State.READY
            return True
        self._end_message(body, dot_stuffed=False, oversize=False)
        return True

    def _end_message(self, body: bytes, *, dot_stuffed: bool, oversize: bool) -> None:
        """Check the whole message, then hand it to the driver (or refuse it). The limits apply
        to the message without its transparency dots (RFC 5321 4.5.3.1.6, RFC 1870), which
        removing leaves every CR and LF where it was for the checks on line ends."""
        if dot_stuffed:
            if body.startswith(b".."):
                body = body[1:]
            body = body.replace(b"\r\n..", b"\r\n.")
        refusal = self._check_body(body, oversize)
        if refusal is not None:
            reply, kind = refusal
            self._error(reply, kind)
            self.envelope = None
            self.state = State.READY
            return
        assert self.envelope is not None
        self._wait(MessageReceived(self.envelope, body), State.READY)

    def _check_body(self, body: bytes, oversize: bool) -> tuple[Reply, str] | None:
        if oversize or len(body) > self.opt.max_message_size:
            return status.message_too_big(self.opt.max_message_size), "size"
        if b"\x00" in body:
            return status.nul_in_data(), "smuggling"
        crlf = body.count(b"\r\n")
        if body.count(b"\n") != crlf:
            return status.bare_line_ending("LF"), "smuggling"
        if body.count(b"\r") != crlf:
            return status.bare_line_ending("CR"), "smuggling"
        if body and not body.endswith(b"\r\n"):
            return status.bare_line_ending("end of data without CRLF"), "smuggling"
        if len(body) > self.opt.max_data_line and _has_line_longer_than(body, self.opt.max_data_line - 2):
            return status.data_line_too_long(self.opt.max_data_line), "line-length"
        return None


# The method that answers each implemented command ("MAIL" -> SmtpServer._cmd_mail).
_HANDLERS = {verb: getattr(SmtpServer, "_cmd_" + verb.lower(), SmtpServer._cmd_unimplemented)
             for verb in KNOWN - NOT_IMPLEMENTED}

# A command line that is a BDAT as far as can be told: the verb, then anything but a letter or
# digit (a space, the end of the line, a NUL, a byte that is not ASCII...).
_BDAT_LINE = re.compile(rb"[ \t]*BDAT(?![A-Za-z0-9])", re.IGNORECASE)


def _has_line_longer_than(body: bytes, limit: int) -> bool:
    """True when a line of ``body`` (whose lines all end in CRLF) is longer than ``limit``
    octets, CRLF not counted. It looks at a window of ``limit + 2`` octets from a line start:
    a line that fits ends in it, and the window's last LF is where the next one starts, so
    each step skips about ``limit`` octets however short the lines are."""
    pos, end = 0, len(body)
    while pos < end:
        last_lf = body.rfind(b"\n", pos, pos + limit + 2)
        if last_lf < 0:
            return True
        pos = last_lf + 1
    return False
