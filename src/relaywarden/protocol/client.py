"""The client side of SMTP (RFC 5321 and its extensions) as a sans-I/O state machine.

Bytes from the next hop go in with ``receive()``; the commands to send come out of
``take_output()``; what the driver must act on comes out of ``next_event()``.  No asyncio, no
sockets: the asyncio driver (``relaywarden.delivery.smtp_client``) and the dialog tests feed the
same object.

One session: greeting -> EHLO (HELO when EHLO is refused with 5xx) -> STARTTLS when the TLS
policy asks for it -> EHLO again -> AUTH PLAIN/LOGIN when the route has credentials (only ever over
TLS) -> ready.  Then any number of transactions, each started with ``send_message()`` and ended by
a ``TransactionResult`` with one ``DeliveryResult`` per recipient, in the order given:

* MAIL, every RCPT and DATA go out in one write when the next hop offers PIPELINING (RFC 2920),
  one by one otherwise;
* SIZE, BODY=8BITMIME, SMTPUTF8 and the DSN parameters (RET, ENVID, NOTIFY, ORCPT) are sent only
  when the next hop offers the extension;
* a message that cannot be sent as it is fails before MAIL with a permanent result and no reply
  code: a non-ASCII address to a host without SMTPUTF8 (5.6.7), 8-bit data to a host without
  8BITMIME (5.6.3), a message larger than the announced SIZE (5.3.4);
* a 4xx/5xx to MAIL fails every recipient with that reply, to RCPT that recipient, to DATA or to
  the end of data every accepted recipient;
* the body is sent with CRLF line ends, dot-stuffed and terminated with ``CRLF . CRLF``.

Results name the command a reply answered: ``CONNECT`` (the greeting), ``EHLO``, ``HELO``,
``STARTTLS``, ``AUTH``, ``MAIL``, ``RCPT``, ``DATA``, ``END-OF-DATA``.  A failure of the session
itself (no reply, a malformed reply, a refused greeting, TLS or AUTH failure, 421) ends the
session and fails every recipient still open; ``reply_code`` is None when there was no usable
reply, and such failures are temporary.
"""

from __future__ import annotations

import base64
import functools
import re
from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto

from ..queue.model import DeliveryResult
from ..status import Reply
from .address import AddressError, parse_address, xtext_encode
from .sasl import client_plain

TLS_POLICIES = ("none", "opportunistic", "required")
SASL_PREFERENCE = ("PLAIN", "LOGIN")
MAX_AUTH_COMMAND = 500     # longer AUTH PLAIN lines send the response after a 334 instead

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: +|$)")
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")


class State(Enum):
    GREETING = auto()    # connected, waiting for 220
    EHLO = auto()        # EHLO or HELO sent
    STARTTLS = auto()    # STARTTLS sent
    TLS = auto()         # 220 to STARTTLS received; the driver does the handshake
    AUTH = auto()        # inside an AUTH exchange
    READY = auto()       # idle: a transaction may start
    BUSY = auto()        # a transaction, RSET or QUIT awaits replies
    CLOSED = auto()


# --- what goes in ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OutRcpt:
    """One recipient to deliver to, with its DSN parameters as the queue keeps them."""

    address: str
    notify: tuple[str, ...] = ()      # () = not given; ("NEVER",) or SUCCESS/FAILURE/DELAY
    orcpt: str | None = None          # "rfc822;user@example.org", decoded


@dataclass(frozen=True, slots=True)
class OutMessage:
    """One transaction: envelope, DSN envelope parameters and the message (CRLF, not stuffed)."""

    sender: str                       # "" for the null reverse-path <>
    recipients: tuple[OutRcpt, ...]
    data: bytes
    envid: str | None = None
    ret: str | None = None            # "FULL" | "HDRS"
    body: str | None = None           # "7BIT" | "8BITMIME"; None: decided from the data
    smtputf8: bool = False            # received with SMTPUTF8: ask for it when offered


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """One outbound session: our name, the route's TLS policy and credentials, the peer."""

    helo: str
    tls: str = "opportunistic"        # "none" | "opportunistic" | "required"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    remote_host: str | None = None    # the next hop's name, kept in every result
    remote_address: str | None = None  # the address actually connected to
    tls_active: bool = False          # implicit TLS: the connection is already encrypted
    max_reply_line: int = 4096
    max_reply_lines: int = 256

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"TLS policy must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")


# --- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SessionReady:
    """Greeting, EHLO, STARTTLS and AUTH are done; transactions may start."""
    extensions: dict[str, str]
    tls: bool
    authenticated: bool


@dataclass(frozen=True, slots=True)
class StartTlsNeeded:
    """The next hop said 220 to STARTTLS: handshake, then ``tls_started()`` or ``tls_failed()``."""
    verify: bool          # "required" policy: verify the certificate and the name


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """One result per recipient of the message, in the order given."""
    results: tuple[DeliveryResult, ...]
    session_failure: bool     # the session failed before MAIL was answered: try another host


@dataclass(frozen=True, slots=True)
class ResetDone:
    ok: bool
    reply: Reply | None


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event = SessionReady | StartTlsNeeded | TransactionResult | ResetDone | Closed


class ProtocolError(ValueError):
    """The next hop sent something that is not an SMTP reply.

    ``replies`` holds the complete replies that came before the bad line, in order.
    """

    def __init__(self, detail: str, replies: list[Reply] | None = None):
        super().__init__(detail)
        self.replies: list[Reply] = replies or []


# --- replies ----------------------------------------------------------------------------------------

class ReplyParser:
    """Splits the byte stream into complete replies (multi-line ones joined), bounded in size."""

    def __init__(self, max_line: int = 4096, max_lines: int = 256):
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = bytearray()
        self._lines: list[tuple[int, str]] = []

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > self.max_line:
                    raise ProtocolError(f"reply line longer than {self.max_line} octets", replies)
                return replies
            raw = bytes(self._buf[:end])
            del self._buf[: end + 2]
            try:
                reply = self._line(raw)
            except ProtocolError as exc:
                raise ProtocolError(str(exc), replies) from None
            if reply is not None:
                replies.append(reply)

    def take_unread(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def partial(self) -> bool:
        return bool(self._buf or self._lines)

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) > self.max_line:
            raise ProtocolError(f"reply line longer than {self.max_line} octets")
        if b"\n" in raw or b"\r" in raw or b"\x00" in raw:
            raise ProtocolError("bare CR, LF or NUL in a reply line")
        line = raw.decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            raise ProtocolError(f"malformed reply line {line[:80]!r}")
        code = int(line[:3])
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code {code} out of range")
        if self._lines and self._lines[0][0] != code:
            raise ProtocolError(f"multi-line reply changes its code from {self._lines[0][0]} to {code}")
        self._lines.append((code, line[4:]))
        if len(self._lines) > self.max_lines:
            raise ProtocolError(f"reply longer than {self.max_lines} lines")
        if len(line) > 3 and line[3] == "-":
            return None
        texts = [text for _, text in self._lines]
        self._lines = []
        return _make_reply(code, texts)


def _make_reply(code: int, texts: list[str]) -> Reply:
    """A Reply with the RFC 3463 code taken from the first line (and removed from every line)."""
    match = _ENHANCED.match(texts[0])
    enhanced = None
    if match and match.group(1) == str(code)[0]:
        enhanced = f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
        texts = [_ENHANCED.sub("", t, count=1) if _ENHANCED.match(t) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> their parameters ("" when none); the first line is the greeting."""
    ext: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):       # old "AUTH=LOGIN PLAIN" form
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
        if keyword:
            ext.setdefault(keyword.upper(), params.strip())
    return ext


# --- message preparation ------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)     # the same senders and recipients come again and again
def _wire_address(address: str) -> str:
    """The address as it goes in MAIL or RCPT; raises AddressError."""
    return parse_address(address, allow_utf8=True).address


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload: CRLF line ends, leading dots doubled, terminated with ``CRLF . CRLF``."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        body = data              # the usual case (the server refuses bare CR and LF): no rewrite
    else:
        body = _LINE_ENDS.sub(b"\r\n", data)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def encode_orcpt(orcpt: str) -> str:
    """ORCPT value for the wire: ``rfc822;`` + xtext, or RFC 6533 ``utf-8;`` with \\x{HEX}."""
    kind, sep, addr = orcpt.partition(";")
    if not sep:
        kind, addr = "rfc822", orcpt
    if kind.lower() == "utf-8":
        return "utf-8;" + "".join(
            c if c.isascii() and "!" <= c <= "~" and c not in "+=\\" else f"\\x{{{ord(c):02X}}}" for c in addr)
    return f"{kind};{xtext_encode(addr)}"


def needs_smtputf8(address: str) -> bool:
    local = address.rpartition("@")[0] if "@" in address else address
    return not local.isascii()


# --- the client ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Transaction:
    message: OutMessage
    wire: list[str | None]                   # recipient address to send, None = failed before
    results: list[DeliveryResult | None]
    accepted: list[int] = field(default_factory=list)
    mail_reply: Reply | None = None          # set when MAIL was refused
    mail_answered: bool = False
    next_rcpt: int = 0                       # without PIPELINING: the next RCPT to send


class SmtpClient:
    """One outbound SMTP session, client side."""

    def __init__(self, options: ClientOptions):
        self.opt = options
        self.state = State.GREETING
        self.tls = options.tls_active
        self.authenticated = False
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.transactions = 0
        # the server holds no transaction: the last one ended with the reply to its end of data,
        # or the session is fresh, or RSET was answered 250 (RFC 5321 4.1.4)
        self.clean = False
        self.failure: DeliveryResult | None = None     # why the session ended, when it failed
        self._parser = ReplyParser(options.max_reply_line, options.max_reply_lines)
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._expect: deque[tuple[str, int]] = deque()   # (command, recipient index) per awaited reply
        self._pending: OutMessage | None = None
        self.steps = 0                    # commands sent and replies read: the driver times each reply from the last step
        self._tx: _Transaction | None = None
        self._starttls_refused = False
        self._auth_mech: str | None = None
        self._auth_step = 0
        self._expect.append(("CONNECT", -1))

    # --- driver interface -------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self.state in (State.CLOSED, State.TLS):
            return
        error: ProtocolError | None = None
        try:
            replies = self._parser.feed(data)
        except ProtocolError as exc:
            replies, error = exc.replies, exc
        for reply in replies:
            if self.state is State.CLOSED:
                return
            self._dispatch(reply)
            if self.state is State.TLS:
                self._parser.take_unread()       # never read plaintext injected before the handshake
                return
        if error is not None:
            self._protocol_error(str(error))

    def take_output(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def awaiting(self) -> str | None:
        """The command whose reply is awaited, if any."""
        return self._expect[0][0] if self._expect else None

    def send_message(self, message: OutMessage) -> None:
        """Start a transaction now (ready) or as soon as the session is ready."""
        if self.state is State.CLOSED or self._pending is not None or self._tx is not None:
            raise RuntimeError(f"cannot start a transaction in state {self.state.name}")
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        self._pending = message
        if self.state is State.READY:
            self._start_pending()

    def reset(self) -> None:
        """RSET before reusing the session; answered with ``ResetDone``."""
        if self.state is not State.READY:
            raise RuntimeError(f"RSET needs an idle session, not {self.state.name}")
        self._send("RSET", "RSET")
        self.state = State.BUSY

    def quit(self) -> None:
        """Say QUIT when idle; otherwise just end the session."""
        if self.state is State.READY:
            self._send("QUIT", "QUIT")
            self.state = State.BUSY
        elif self.state is not State.CLOSED:
            self._close("closed by the client")

    def tls_started(self) -> None:
        """The handshake succeeded: RFC 3207 says forget the extensions and EHLO again."""
        if self.state is not State.TLS:
            raise RuntimeError("no STARTTLS handshake is pending")
        self.tls = True
        self.extensions = {}
        self.state = State.EHLO
        self._send(f"EHLO {self.opt.helo}", "EHLO")

    def tls_failed(self, reason: str) -> None:
        self._fail(None, "STARTTLS", f"TLS handshake with {self._peer()} failed: {reason}")

    def connection_lost(self, reason: str = "") -> None:
        if self.state is State.CLOSED:
            return
        if self.awaiting == "QUIT":
            self._close("closed after QUIT")
            return
        command = self.awaiting or "CONNECT"
        text = f"lost connection with {self._peer()} while waiting for the reply to {command}"
        if self.state is State.READY and self._tx is None:
            text = f"{self._peer()} closed the idle connection"
        self._fail(None, command, text + (f" ({reason})" if reason else ""))

    def timeout(self, seconds: float | None = None) -> None:
        if self.state is State.CLOSED:
            return
        command = self.awaiting or ("STARTTLS" if self.state is State.TLS else "CONNECT")
        after = f" after {seconds:g}s" if seconds is not None else ""
        self._fail(None, command, f"timeout{after} waiting for the reply of {self._peer()} to {command}")

    # --- replies ------------------------------------------------------------------------------

    def _dispatch(self, reply: Reply) -> None:
        self.steps += 1
        if not self._expect:
            if reply.code == 421:
                self._fail(reply, "CONNECT", None)
            else:
                self._protocol_error(f"unexpected reply {str(reply)[:80]!r} when no command was sent")
            return
        command, index = self._expect.popleft()
        if reply.code == 421 and command != "QUIT":
            self._fail(reply, command, None)       # the server is closing: nothing else will come
            return
        handler = getattr(self, "_on_" + command.lower().replace("-", "_"))
        handler(reply, index)

    def _on_connect(self, reply: Reply, index: int) -> None:
        if reply.code != 220:
            self._fail(reply, "CONNECT", None, permanent=reply.is_permanent)
            return
        self.state = State.EHLO
        self._send(f"EHLO {self.opt.helo}", "EHLO")

    def _on_ehlo(self, reply: Reply, index: int) -> None:
        if reply.is_positive:
            self.esmtp = True
            self.extensions = parse_extensions(reply)
            self._negotiate()
        elif reply.is_permanent and not self.tls:
            self._send(f"HELO {self.opt.helo}", "HELO")
        else:
            self._fail(reply, "EHLO", None, permanent=reply.is_permanent)

    def _on_helo(self, reply: Reply, index: int) -> None:
        if not reply.is_positive:
            self._fail(reply, "HELO", None, permanent=reply.is_permanent)
            return
        self.esmtp = False
        self.extensions = {}
        self._negotiate()

    def _negotiate(self) -> None:
        """After EHLO: STARTTLS, then AUTH, then ready — as the policy and the peer allow."""
        if not self.tls and self.opt.tls != "none" and not self._starttls_refused:
            if "STARTTLS" in self.extensions:
                self.state = State.STARTTLS
                self._send("STARTTLS", "STARTTLS")
                return
            if self.opt.tls == "required":
                self._fail(None, "STARTTLS", f"the route requires TLS but {self._peer()} does not offer STARTTLS")
                return
        if self.opt.username is not None and not self.authenticated:
            if not self.tls:
                self._fail(None, "AUTH", f"the route has credentials for {self._peer()}, but the connection is "
                                         "not encrypted; credentials are only sent after STARTTLS")
                return
            if "AUTH" in self.extensions:
                self._start_auth()
                return
        self._become_ready()

    def _on_starttls(self, reply: Reply, index: int) -> None:
        if reply.code == 220:
            self.state = State.TLS
            self._events.append(StartTlsNeeded(verify=self.opt.tls == "required"))
            return
        if self.opt.tls == "required":
            self._fail(reply, "STARTTLS", None)
            return
        self._starttls_refused = True          # opportunistic: go on in plaintext (RFC 3207 4.1)
        self._negotiate()

    def _start_auth(self) -> None:
        offered = self.extensions["AUTH"].upper().split()
        mech = next((m for m in SASL_PREFERENCE if m in offered), None)
        if mech is None:
            self._fail(None, "AUTH", f"{self._peer()} offers AUTH {' '.join(offered) or '(no mechanism)'}, "
                                     f"relaywarden can use {' or '.join(SASL_PREFERENCE)}")
            return
        self.state = State.AUTH
        self._auth_mech, self._auth_step = mech, 0
        line = "AUTH LOGIN"
        if mech == "PLAIN":
            line = f"AUTH PLAIN {self._plain_response()}"
            if len(line) > MAX_AUTH_COMMAND:
                line = "AUTH PLAIN"
            else:
                self._auth_step = 1
        self._send(line, "AUTH")

    def _plain_response(self) -> str:
        return client_plain(self.opt.username or "", self.opt.password or "")

    def _on_auth(self, reply: Reply, index: int) -> None:
        if reply.code == 235:
            self.authenticated = True
            self._become_ready()
            return
        if reply.code != 334:
            # A refused login is our configuration's fault: defer (keep the reply) rather than bounce.
            self._fail(reply, "AUTH", None)
            return
        step, self._auth_step = self._auth_step, self._auth_step + 1
        if self._auth_mech == "PLAIN" and step == 0:
            self._send(self._plain_response(), "AUTH")
        elif self._auth_mech == "LOGIN" and step < 2:
            secret = self.opt.username if step == 0 else self.opt.password
            self._send(base64.b64encode((secret or "").encode()).decode("ascii"), "AUTH")
        else:
            self._send("*", "AUTH")             # an unexpected challenge: cancel (RFC 4954 4)

    def _become_ready(self) -> None:
        self.state = State.READY
        self.clean = True
        self._events.append(SessionReady(dict(self.extensions), self.tls, self.authenticated))
        if self._pending is not None:
            self._start_pending()

    def _on_rset(self, reply: Reply, index: int) -> None:
        self.state = State.READY
        self.clean = reply.code == 250
        self._events.append(ResetDone(reply.code == 250, reply))

    def _on_quit(self, reply: Reply, index: int) -> None:
        self._close("QUIT")

    # --- transactions -------------------------------------------------------------------------

    def _start_pending(self) -> None:
        message, self._pending = self._pending, None
        assert message is not None
        self.state = State.BUSY
        self.clean = False
        self.transactions += 1
        tx = _Transaction(message, [None] * len(message.recipients), [None] * len(message.recipients))
        self._tx = tx
        mail = self._mail_command(tx)
        if mail is None:
            self._finish()
            return
        live = [i for i, w in enumerate(tx.wire) if w is not None]
        if not live:
            self._finish()
            return
        if "PIPELINING" in self.extensions:
            self._send(mail, "MAIL")
            for i in live:
                self._send(self._rcpt_command(tx, i), "RCPT", i)
            self._send("DATA", "DATA")
            tx.next_rcpt = len(tx.wire)
        else:
            self._send(mail, "MAIL")

    def _mail_command(self, tx: _Transaction) -> str | None:
        """The MAIL line, or None when the message cannot go to this host at all."""
        msg, ext = tx.message, self.extensions
        sender = msg.sender
        if sender:
            try:
                sender = _wire_address(sender)
            except AddressError as exc:
                self._fail_all(tx, "MAIL", "5.1.7", f"sender address <{msg.sender}> cannot be sent: {exc.reason}")
                return None
        utf8 = needs_smtputf8(sender)
        for i, rcpt in enumerate(msg.recipients):
            try:
                tx.wire[i] = _wire_address(rcpt.address)
            except AddressError as exc:
                tx.results[i] = self._own(True, "RCPT", "5.1.3", f"recipient address cannot be sent: {exc.reason}")
        if utf8 and "SMTPUTF8" not in ext:
            self._fail_all(tx, "MAIL", "5.6.7", f"the sender address <{sender}> needs SMTPUTF8, "
                                                f"which {self._peer()} does not offer")
            return None
        for i, addr in enumerate(tx.wire):
            if addr is not None and needs_smtputf8(addr) and "SMTPUTF8" not in ext:
                tx.wire[i] = None
                tx.results[i] = self._own(True, "RCPT", "5.6.7", f"the address <{addr}> needs SMTPUTF8, "
                                                                  f"which {self._peer()} does not offer")
        eight_bit = not msg.data.isascii()
        if eight_bit and "8BITMIME" not in ext:
            self._fail_all(tx, "MAIL", "5.6.3", f"the message has 8-bit data and {self._peer()} does not "
                                                "offer 8BITMIME; conversion is not supported")
            return None
        size = len(msg.data)
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < size:
            self._fail_all(tx, "MAIL", "5.3.4", f"the message ({size} octets) is larger than the "
                                                f"{int(limit)} octets {self._peer()} accepts")
            return None
        params: list[str] = []
        if "SIZE" in ext:
            params.append(f"SIZE={size}")
        if "8BITMIME" in ext and (eight_bit or msg.body == "8BITMIME"):
            params.append("BODY=8BITMIME")
        if "SMTPUTF8" in ext and (msg.smtputf8 or utf8 or any(w and needs_smtputf8(w) for w in tx.wire)):
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if msg.ret:
                params.append(f"RET={msg.ret.upper()}")
            if msg.envid:
                params.append(f"ENVID={xtext_encode(msg.envid)}")
        return " ".join([f"MAIL FROM:<{sender}>", *params])

    def _rcpt_command(self, tx: _Transaction, index: int) -> str:
        rcpt = tx.message.recipients[index]
        params: list[str] = []
        if "DSN" in self.extensions:
            if rcpt.notify:
                params.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
            if rcpt.orcpt:
                params.append("ORCPT=" + encode_orcpt(rcpt.orcpt))
        return " ".join([f"RCPT TO:<{tx.wire[index]}>", *params])

    def _next_rcpt_or_data(self, tx: _Transaction) -> None:
        """Without PIPELINING: send the next RCPT, or DATA once every recipient was tried."""
        while tx.next_rcpt < len(tx.wire) and tx.wire[tx.next_rcpt] is None:
            tx.next_rcpt += 1
        if tx.next_rcpt < len(tx.wire):
            index = tx.next_rcpt
            tx.next_rcpt += 1
            self._send(self._rcpt_command(tx, index), "RCPT", index)
        elif tx.accepted:
            self._send("DATA", "DATA")
        else:
            self._finish()

    def _on_mail(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            self._protocol_error(f"MAIL answered with {str(reply)[:80]!r}", "MAIL")
            return
        tx.mail_answered = True
        if not reply.is_positive:
            tx.mail_reply = reply
            for i, r in enumerate(tx.results):
                if r is None:
                    tx.results[i] = self._remote(reply, "MAIL")
            if "PIPELINING" not in self.extensions:
                self._finish()
            return
        if "PIPELINING" not in self.extensions:
            self._next_rcpt_or_data(tx)

    def _on_rcpt(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            self._protocol_error(f"RCPT answered with {str(reply)[:80]!r}", "RCPT")
            return
        if tx.mail_reply is None:
            if reply.is_positive:
                tx.accepted.append(index)
            else:
                tx.results[index] = self._remote(reply, "RCPT")
        if "PIPELINING" not in self.extensions:
            self._next_rcpt_or_data(tx)

    def _on_data(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.mail_reply is not None or not tx.accepted:
            if reply.code == 354:
                self._send(".", "EMPTY-DATA")      # RFC 2920 3.1: nobody to send to, end at once
            else:
                self._finish()
            return
        if reply.code != 354:
            if reply.code < 400:
                # Only 354 lets the data go (RFC 5321 4.3.2): a 2xx here is no delivery, the
                # message was never sent (a broken or out-of-step server); try again later.
                self._protocol_error(f"DATA answered with {str(reply)[:80]!r} instead of 354; "
                                     "the message was not sent", "DATA")
                return
            self._settle(self._remote(reply, "DATA"))
            self._finish()
            return
        self._out.append(dot_stuff(tx.message.data))
        self._expect.append(("END-OF-DATA", -1))
        self.steps += 1

    def _on_empty_data(self, reply: Reply, index: int) -> None:
        self.clean = True
        self._finish()

    def _on_end_of_data(self, reply: Reply, index: int) -> None:
        assert self._tx is not None
        if 300 <= reply.code < 400:
            self._protocol_error(f"the end of data answered with {str(reply)[:80]!r}", "END-OF-DATA")
            return
        self._settle(self._remote(reply, "END-OF-DATA"))
        self.clean = True
        self._finish()

    def _settle(self, result: DeliveryResult) -> None:
        """The reply to DATA or to the end of data applies to every accepted recipient."""
        assert self._tx is not None
        for i in self._tx.accepted:
            if self._tx.results[i] is None:
                self._tx.results[i] = result

    def _finish(self, session_failure: bool = False) -> None:
        tx, self._tx = self._tx, None
        assert tx is not None
        missing = self._own(False, "MAIL", None, "no reply was received for this recipient")
        results = tuple(r if r is not None else missing for r in tx.results)
        self._events.append(TransactionResult(results, session_failure))
        if self.state is State.BUSY:
            self.state = State.READY

    # --- results and failures -----------------------------------------------------------------

    def _peer(self) -> str:
        host = self.opt.remote_host or "the remote host"
        return f"{host}[{self.opt.remote_address}]" if self.opt.remote_address else host

    def _remote(self, reply: Reply, command: str) -> DeliveryResult:
        return DeliveryResult(reply.code, reply.enhanced, self.opt.remote_host, self.opt.remote_address,
                              _kept_text(reply), command, reply.is_permanent)

    def _own(self, permanent: bool, command: str, enhanced: str | None, text: str) -> DeliveryResult:
        return DeliveryResult(None, enhanced, self.opt.remote_host, self.opt.remote_address, text, command, permanent)

    def _fail_all(self, tx: _Transaction, command: str, enhanced: str, text: str) -> None:
        result = self._own(True, command, enhanced, text)
        tx.results = [r if r is not None else result for r in tx.results]

    def _protocol_error(self, detail: str, command: str | None = None) -> None:
        command = command or self.awaiting or "CONNECT"
        self._fail(None, command, f"protocol error talking to {self._peer()} after {command}: {detail}")

    def _fail(self, reply: Reply | None, command: str, text: str | None, *, permanent: bool = False) -> None:
        """The session cannot go on: every open recipient gets this result; the session ends."""
        if reply is not None:
            result = DeliveryResult(reply.code, reply.enhanced, self.opt.remote_host, self.opt.remote_address,
                                    _kept_text(reply), command, permanent)
        else:
            result = self._own(permanent, command, None, text or "session failed")
        self.failure = result
        if self._tx is None and self._pending is not None:
            message, self._pending = self._pending, None
            self._tx = _Transaction(message, [None] * len(message.recipients), [None] * len(message.recipients))
        if self._tx is not None:
            before_mail = not self._tx.mail_answered
            self._tx.results = [r if r is not None else result for r in self._tx.results]
            self._finish(session_failure=before_mail)
        self._close(result.remote_text if reply is None else f"{command}: {reply}")

    def _close(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._expect.clear()
        self._events.append(Closed(reason))

    def _send(self, line: str, command: str, index: int = -1) -> None:
        if "\r" in line or "\n" in line:
            raise ValueError("a command line must not contain CR or LF")
        self._out.append(line.encode("utf-8") + b"\r\n")
        self._expect.append((command, index))
        self.steps += 1


MAX_KEPT_REPLY = 800
"""Characters of a remote reply kept for the queue, the event log and the NDR: a reply may be
256 lines of 4 KiB, and an NDR's text lines must stay under 998 octets (RFC 5322 2.1.1)."""


def _kept_text(reply: Reply) -> str:
    text = " ".join(reply.text.split("\n"))
    if len(text) <= MAX_KEPT_REPLY:
        return text
    return f"{text[:MAX_KEPT_REPLY]}... ({len(text) - MAX_KEPT_REPLY} more characters)"
