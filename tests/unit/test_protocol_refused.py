"""Refused events name the command they answered: the session summary counts refused RCPTs by it."""

from relaywarden.protocol import server as core


def _refusals(*lines: bytes) -> list[core.Refused]:
    s = core.SmtpServer(core.ServerOptions(hostname="mx.test", max_command_line=128))
    s.greet()
    out = []
    for line in lines:
        s.receive(line)
        while (ev := s.next_event()) is not None:
            if isinstance(ev, core.RcptRequest):
                s.rcpt_result(core.status.Reply(250, "2.1.5", "OK"), True)
            elif isinstance(ev, core.MailRequest):
                s.mail_result(None)
            elif isinstance(ev, core.Refused):
                out.append(ev)
    return out


def test_a_refused_rcpt_is_tagged_rcpt_whatever_the_reason():
    refused = _refusals(b"EHLO c.test\r\n", b"RCPT TO:<a@b.test>\r\n", b"MAIL FROM:<x@y.test>\r\n",
                        b"RCPT TO:<no bracket@b.test\r\n", b"RCPT TO:<a@b.test> NOTIFY=SOMETIMES\r\n")
    assert [(r.kind, r.command) for r in refused] == [("sequence", "RCPT"), ("syntax", "RCPT"), ("syntax", "RCPT")]


def test_an_over_long_line_is_not_blamed_on_the_command_before_it():
    refused = _refusals(b"EHLO c.test\r\n", b"MAIL FROM:<x@y.test>\r\n", b"RCPT TO:<a@b.test>\r\n",
                        b"X" * 300 + b"\r\n",                  # a whole over-long line
                        b"RCPT TO:<c@d.test>\r\n", b"Y" * 300)  # and one still arriving
    assert [(r.kind, r.command) for r in refused] == [("line-length", ""), ("line-length", "")]


def test_an_unknown_verb_has_no_command():
    refused = _refusals(b"EHLO c.test\r\n", b"FROB x\r\n")
    assert [(r.kind, r.command) for r in refused] == [("syntax", "")]
