"""SASL response lines follow the same line rule as commands: CRLF only."""

from relaywarden.protocol import server as core


def _session() -> core.SmtpServer:
    s = core.SmtpServer(core.ServerOptions(hostname="mx.test", auth_mechanisms=("PLAIN", "LOGIN"),
                                           auth_plaintext=True))
    s.greet()
    s.receive(b"EHLO c.test\r\nAUTH LOGIN\r\n")
    s.take_output()
    return s


def test_a_sasl_line_ending_in_a_bare_lf_is_refused():
    s = _session()
    s.receive(b"dXNlcg==\n")
    assert s.take_output() == b"501 5.5.4 Syntax error: lines must end with CRLF, and CR or LF alone is not allowed\r\n"
    s.receive(b"NOOP\r\n")                       # back to commands, not inside the exchange
    assert s.take_output() == b"250 2.0.0 OK\r\n"


def test_a_crlf_sasl_line_goes_on():
    s = _session()
    s.receive(b"dXNlcg==\r\n")
    assert s.take_output() == b"334 UGFzc3dvcmQ6\r\n"
