"""Property tests of the sans-I/O SMTP server core (``relaywarden.protocol.server``), no sockets.

A fake driver answers every request the way a permissive server would (every sender and recipient
accepted, every message "queued", AUTH with the password "secret" succeeds, TLS "starts" at once)
so that the fuzzer reaches every state.  For any input the core must: raise nothing; produce
output bounded by its input; make progress (the driver loop ends, nothing is left waiting); write
only well-formed SMTP replies; never hand over a message containing a bare LF or bare CR (so never
answer 250 to one); and give the same replies however the bytes of a session are split.
"""

from __future__ import annotations

import base64
import re


from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relaywarden import status
from relaywarden.protocol import server as core

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPTIONS = core.ServerOptions(
    hostname="mx.example.test", max_message_size=4096, max_recipients=5, max_errors=10,
    starttls=True, auth_mechanisms=("PLAIN", "LOGIN"), auth_plaintext=True)
# STARTTLS changes what is read after it by design (pipelined plaintext is discarded), so the
# split-invariance properties run without it.
NO_TLS = core.ServerOptions(
    hostname="mx.example.test", max_message_size=4096, max_recipients=5, max_errors=10,
    starttls=False, auth_mechanisms=("PLAIN", "LOGIN"), auth_plaintext=True)

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][^\r\n]*")
EVIL = "evil@attacker.example.net"


class FakeDriver:
    """Drives one SmtpServer and answers every request at once; records what it handed over."""

    def __init__(self, options: core.ServerOptions = OPTIONS):
        self.core = core.SmtpServer(options)
        self.output = bytearray()
        self.events: list[object] = []
        self.messages: list[bytes] = []
        self.hung_up = False
        self.core.greet()
        self._collect()

    def feed(self, data: bytes) -> None:
        if self.hung_up:
            return                      # like the real driver: the connection is closed
        self.core.receive(data)
        self._answer_all(budget=4 * data.count(b"\n") + 4 * len(data) // 64 + 64)

    def _answer_all(self, budget: int) -> None:
        for _ in range(budget):
            event = self.core.next_event()
            if event is None:
                self._collect()
                return
            self.events.append(event)
            self._answer(event)
        raise AssertionError(f"no progress: more than {budget} events from one input")

    def _answer(self, event: object) -> None:
        c = self.core
        if isinstance(event, core.MailRequest):
            c.mail_result(None)
        elif isinstance(event, core.RcptRequest):
            c.rcpt_result(status.recipient_ok(), True)
        elif isinstance(event, core.AuthRequest):
            ok = event.credentials.password == "secret"
            c.auth_result("alice@example.test" if ok else None)
        elif isinstance(event, core.MessageReceived):
            self.messages.append(event.data)
            c.message_result(status.queued(f"q{len(self.messages)}"))
        elif isinstance(event, core.StartTlsRequest):
            c.tls_started()
        elif isinstance(event, core.Closed):
            self.hung_up = True

    def _collect(self) -> None:
        self.output += self.core.take_output()


def run(chunks: list[bytes], options: core.ServerOptions = OPTIONS) -> FakeDriver:
    driver = FakeDriver(options)
    for chunk in chunks:
        driver.feed(chunk)
    assert not driver.core.waiting, "a request was left unanswered"
    return driver


def replies(output: bytes) -> list[list[bytes]]:
    """Split output into replies (lists of lines), checking every line is a valid reply line."""
    assert output.endswith(b"\r\n"), output[-80:]
    lines = output[:-2].split(b"\r\n")
    out: list[list[bytes]] = []
    current: list[bytes] = []
    for line in lines:
        assert REPLY_LINE.fullmatch(line), f"not an SMTP reply line: {line!r}"
        assert not current or line[:3] == current[0][:3], f"code changes inside a reply: {current + [line]!r}"
        current.append(line)
        if line[3:4] == b" ":
            out.append(current)
            current = []
    assert not current, f"unfinished multi-line reply: {current!r}"
    return out


def check_invariants(driver: FakeDriver, data: bytes) -> None:
    replies(bytes(driver.output))
    lines = data.count(b"\n") + 2
    assert len(driver.output) <= 1024 + 512 * lines, "output out of proportion to the input"
    for message in driver.messages:
        crlf = message.count(b"\r\n")
        assert message.count(b"\n") == crlf and message.count(b"\r") == crlf, message[:200]
        assert len(message) <= OPTIONS.max_message_size


# --- strategies ------------------------------------------------------------------------------

domains = st.sampled_from(["example.test", "example.net", "[127.0.0.1]", "[IPv6:::1]", "xn--e1afmkfd.test",
                           "EXAMPLE.TEST", "example.test.", "a..b", "", "-x.test", "пример.тест"])
locals_ = st.sampled_from(["alice", "a.lice", '"a b"', '"x@y"', "u%v", "h!u", "", ".x", "ä", "a" * 70])
addresses = st.builds(lambda l, d: f"{l}@{d}" if d else l, locals_, domains)
params = st.sampled_from(["", " SIZE=100", " SIZE=999999999", " BODY=8BITMIME", " BODY=BINARYMIME",
                          " SMTPUTF8", " RET=HDRS", " ENVID=x+2Bx", " AUTH=<>", " NOTIFY=NEVER",
                          " NOTIFY=SUCCESS,FAILURE", " ORCPT=rfc822;a@b.c", " FOO=bar", " SIZE"])


def _line(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass") + b"\r\n"


simple_commands = st.sampled_from([
    b"EHLO client.example.org\r\n", b"HELO client.example.org\r\n", b"EHLO\r\n", b"EHLO [127.0.0.1]\r\n",
    b"RSET\r\n", b"NOOP\r\n", b"HELP\r\n", b"VRFY alice\r\n", b"VRFY\r\n", b"EXPN list\r\n",
    b"DATA\r\n", b"RSET x\r\n", b"TURN\r\n", b"STARTTLS\r\n", b"AUTH LOGIN\r\n", b"AUTH CRAM-MD5\r\n",
    b"\r\n", b" \r\n", b"mail from:<a@b.c>\r\n", b"NOOP\n", b"NOOP\r", b"NOOP\x00\r\n", b"\xff\xfe\r\n",
    b"QUIT\r\n", b"*\r\n", b"=\r\n",
])
mail_commands = st.builds(lambda a, p: _line(f"MAIL FROM:<{a}>{p}"), addresses | st.just(""), params)
rcpt_commands = st.builds(lambda a, p: _line(f"RCPT TO:<{a}>{p}"), addresses | st.just("Postmaster"), params)
auth_lines = st.one_of(
    st.builds(lambda u, p: b"AUTH PLAIN " + base64.b64encode(f"\0{u}\0{p}".encode()) + b"\r\n",
              st.sampled_from(["alice@example.test", "", "x" * 300]), st.sampled_from(["secret", "wrong", ""])),
    st.builds(lambda raw: b"AUTH PLAIN " + base64.b64encode(raw) + b"\r\n", st.binary(max_size=80)),
    st.builds(lambda raw: base64.b64encode(raw) + b"\r\n", st.binary(max_size=40)),
    st.just(b"AUTH PLAIN =\r\n"), st.just(b"AUTH PLAIN !!!\r\n"),
)
huge_lines = st.builds(lambda prefix, n: prefix + b"x" * n + b"\r\n",
                       st.sampled_from([b"", b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b"EHLO ", b"AUTH PLAIN "]),
                       st.integers(400, 20_000))
bdat_chunks = st.builds(
    lambda size, last, body: f"BDAT {size}{' LAST' if last else ''}\r\n".encode() + body,
    st.one_of(st.integers(0, 5000), st.just(10**13), st.just(-1)), st.booleans(),
    st.binary(max_size=300))
bdat_junk = st.sampled_from([b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 1 2\r\n", b"BDAT 3 LASTX\r\n",
                             b"BDAT 999999999999999\r\n", b"BDAT 0 LAST\r\n"])
body_bytes = st.binary(max_size=600) | st.lists(
    st.sampled_from([b"line\r\n", b"..dot\r\n", b".\r\n", b"\n", b"\r", b"\r\n", b"x" * 1200 + b"\r\n",
                     b"\x00", b"\xff", b".\n", b"\r\n.\n"]), max_size=20).map(b"".join)
data_blocks = st.builds(lambda body: b"DATA\r\n" + body + b"\r\n.\r\n", body_bytes)
OPEN_TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
# whole transactions, so that random message bodies reach the end-of-data checks
transactions = st.one_of(
    st.builds(lambda body: OPEN_TRANSACTION + b"DATA\r\n" + body + b"\r\n.\r\n", body_bytes),
    st.builds(lambda body, last: OPEN_TRANSACTION + f"BDAT {len(body)}{' LAST' if last else ''}\r\n".encode()
              + body, body_bytes, st.booleans()))

commands = st.one_of(simple_commands, mail_commands, rcpt_commands, auth_lines, huge_lines,
                     bdat_chunks, bdat_junk, data_blocks, transactions, st.binary(max_size=200))
streams = st.builds(lambda hello, rest: hello + b"".join(rest),
                    st.sampled_from([b"EHLO client.example.org\r\n", b"HELO client.example.org\r\n", b""]),
                    st.lists(commands, max_size=25))


@st.composite
def split_points(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    pieces, start = [], 0
    for cut in cuts + [len(data)]:
        pieces.append(data[start:cut])
        start = cut
    return pieces


# valid sessions: what a well-behaved client sends, with no STARTTLS
valid_transaction = st.builds(
    lambda mail, rcpts, body, use_bdat: (
        _line(f"MAIL FROM:<{mail}>") + b"".join(_line(f"RCPT TO:<{r}>") for r in rcpts)
        + (f"BDAT {len(body)} LAST\r\n".encode() + body if use_bdat else b"DATA\r\n" + body + b".\r\n")),
    st.sampled_from(["sender@example.org", "", "bounce@example.net"]),
    st.lists(st.sampled_from(["alice@example.test", "bob@example.net", "Postmaster"]), min_size=1, max_size=3),
    st.lists(st.sampled_from([b"Subject: x\r\n", b"\r\n", b"hello\r\n", b"..dots\r\n", b"a" * 200 + b"\r\n"]),
             max_size=8).map(b"".join),
    st.booleans())
valid_extras = st.sampled_from([b"NOOP\r\n", b"RSET\r\n", b"VRFY alice\r\n", b"HELP\r\n",
                                b"EHLO again.example.org\r\n"])
valid_auth = st.sampled_from([b"", b"AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0secret") + b"\r\n",
                              b"AUTH LOGIN\r\n" + base64.b64encode(b"alice@example.test") + b"\r\n"
                              + base64.b64encode(b"secret") + b"\r\n"])
valid_sessions = st.builds(
    lambda auth, steps: b"EHLO client.example.org\r\n" + auth + b"".join(steps) + b"QUIT\r\n",
    valid_auth, st.lists(valid_transaction | valid_extras, max_size=6))


# --- properties ------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data):
    driver = run([data])
    check_invariants(driver, data)


@FUZZ
@given(streams)
def test_random_command_mixes(data):
    driver = run([data])
    check_invariants(driver, data)


@FUZZ
@given(st.data())
def test_random_command_mixes_in_random_pieces(draw):
    data = draw.draw(streams)
    pieces = draw.draw(split_points(data))
    driver = run(pieces)
    check_invariants(driver, data)


@FUZZ
@given(st.data())
def test_replies_do_not_depend_on_how_a_valid_session_is_split(draw):
    data = draw.draw(valid_sessions)
    whole = run([data], NO_TLS)
    split = run(draw.draw(split_points(data)), NO_TLS)
    bytewise = run([data[i:i + 1] for i in range(len(data))], NO_TLS)
    assert split.output == whole.output
    assert bytewise.output == whole.output
    assert split.messages == whole.messages == bytewise.messages
    assert whole.core.closed
    # a valid session has no error reply at all, and every transaction was queued
    assert not [r for r in replies(bytes(whole.output)) if r[-1][:1] in (b"4", b"5")]
    assert len(whole.messages) == data.count(b"MAIL FROM:")


@FUZZ
@given(st.data())
def test_replies_do_not_depend_on_how_any_stream_is_split(draw):
    data = draw.draw(streams)
    whole = run([data], NO_TLS)
    split = run(draw.draw(split_points(data)), NO_TLS)
    assert split.output == whole.output
    assert split.messages == whole.messages


ENDINGS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r", b"\r.\n",
           b"\r\n\n.\r\n", b"\n\r.\r\n", b"\r\n.\r\r\n"]


@FUZZ
@given(st.lists(st.sampled_from([b"line\r\n", b"Subject: s\r\n", b"\r\n", b"..x\r\n", b"x"]), max_size=10).map(b"".join),
       st.sampled_from(ENDINGS), st.booleans(), st.data())
def test_smuggled_end_of_data_never_becomes_a_command(body, ending, bdat, draw):
    smuggled = (f"MAIL FROM:<{EVIL}>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nspoofed\r\n.\r\n").encode()
    prefix = b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
    content = body + ending + smuggled
    if bdat:
        session = prefix + f"BDAT {len(content)} LAST\r\n".encode() + content + b"NOOP\r\n"
    else:
        assume((b"\r\n" + content).count(b"\r\n.\r\n") == 1)   # only the real end
        session = prefix + b"DATA\r\n" + content + b"NOOP\r\n"
    driver = run(draw.draw(split_points(session)))
    got = replies(bytes(driver.output))
    # greeting, EHLO, MAIL, RCPT, (354), the refusal, NOOP - nothing else
    codes = [r[-1][:3] for r in got]
    assert codes == [b"220", b"250", b"250", b"250"] + ([] if bdat else [b"354"]) + [b"550", b"250"], got
    assert got[-2][-1].startswith(b"550 5.6.11")
    assert driver.messages == []
    assert not [e for e in driver.events if isinstance(e, core.MailRequest) and e.path.address
                and e.path.address.address == EVIL]


@FUZZ
@given(st.integers(0, 70), st.sampled_from([0, 2, 3, 50, 99]), st.booleans())
def test_bdat_sizes_consume_exactly_the_declared_octets(full_lines, tail, last):
    content = (b"a" * 98 + b"\r\n") * full_lines + (b"b" * (tail - 2) + b"\r\n" if tail else b"")
    size = len(content)
    session = (b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
               + f"BDAT {size}{' LAST' if last else ''}\r\n".encode() + content + b"NOOP\r\n")
    driver = run([session])
    got = replies(bytes(driver.output))
    assert got[-1][-1] == b"250 2.0.0 OK", "the NOOP after the chunk is read as a command"
    chunk_reply = got[-2][-1]
    if size > OPTIONS.max_message_size:
        assert chunk_reply.startswith(b"552 5.3.4")
        assert driver.messages == []
    elif last:
        assert chunk_reply.startswith(b"250 2.0.0 Message accepted")
        assert driver.messages == [content]
    else:
        assert chunk_reply == f"250 2.0.0 {size} octets received".encode()


@FUZZ
@given(st.integers(1, 30_000), st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"", b"AUTH PLAIN "]),
       st.integers(1, 8))
def test_huge_lines_are_refused_once_and_the_next_command_is_read(length, prefix, pieces):
    line = prefix + b"x" * length + b"\r\n"
    data = b"EHLO c.example.org\r\n" + line + b"NOOP\r\n"
    step = max(1, len(data) // pieces)
    driver = run([data[i:i + step] for i in range(0, len(data), step)])
    got = replies(bytes(driver.output))
    assert got[-1][-1] == b"250 2.0.0 OK"
    if len(line) > OPTIONS.max_command_line:
        assert len(got) == 4 and got[2][-1].startswith(b"500 5.5.2"), got


# --- found by the fuzzer ---------------------------------------------------------------------


def _refuse_mail_twice() -> core.SmtpServer:
    server = core.SmtpServer(core.ServerOptions(max_errors=2))
    server.greet()
    server.receive(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
    for _ in range(2):
        event = server.next_event()
        while event is not None and not isinstance(event, core.MailRequest):
            event = server.next_event()
        assert isinstance(event, core.MailRequest)
        server.mail_result(status.authentication_required())
        if not server.closed:
            server.receive(b"MAIL FROM:<a@example.org>\r\n")
    return server


def test_error_limit_reached_by_a_driver_refusal_closes_the_session():
    server = _refuse_mail_twice()
    out = server.take_output()
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert server.closed
    server.receive(b"NOOP\r\n")
    assert server.take_output() == b""


def test_error_limit_reached_by_a_driver_refusal_emits_closed():
    """What the real driver relies on until the core closes itself: the Closed event is there."""
    server = _refuse_mail_twice()
    events = []
    while (event := server.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, core.Closed) for e in events)
