"""A command line must end in CRLF and hold no other CR or LF; anything else is answered 501 5.5.4
and the session reads on with the next line (table-driven: line -> reply)."""

import pytest

from relaywarden.protocol import server as core

CRLF_ONLY = b"501 5.5.4 Syntax error: lines must end with CRLF, and CR or LF alone is not allowed\r\n"


def _after_ehlo() -> core.SmtpServer:
    s = core.SmtpServer(core.ServerOptions(hostname="mx.test"))
    s.greet()
    s.receive(b"EHLO c.test\r\n")
    s.take_output()
    return s


@pytest.mark.parametrize("line, reply", [
    (b"\n", CRLF_ONLY),                            # an empty line with a bare LF
    (b"NOOP\n", CRLF_ONLY),                        # bare LF
    (b"NOOP\r\r\n", CRLF_ONLY),                    # a CR before the CRLF
    (b"NO\rOP\r\n", CRLF_ONLY),                    # a bare CR inside
    (b"\rNOOP\r\n", CRLF_ONLY),                    # a bare CR first
    (b"NOOP\r\n", b"250 2.0.0 OK\r\n"),
    (b"noop\r\n", b"250 2.0.0 OK\r\n"),            # verbs in any case
    (b"\r\n", b"500 5.5.1 Command unrecognised\r\n"),
    (b"NO\x00OP\r\n", b"500 5.5.2 Command contains non-ASCII or NUL characters (SMTPUTF8 not in use)\r\n"),
])
def test_command_line_endings(line, reply):
    s = _after_ehlo()
    s.receive(line)
    assert s.take_output() == reply
    s.receive(b"NOOP\r\n")                         # the session reads on
    assert s.take_output() == b"250 2.0.0 OK\r\n"
