"""Sans-I/O dialogs of the outbound SMTP client: feed the next hop's replies, check the commands."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaywarden.protocol.client import (
    ClientOptions,
    Closed,
    OutMessage,
    OutRcpt,
    ProtocolError,
    ReplyParser,
    ResetDone,
    SessionReady,
    SmtpClient,
    StartTlsNeeded,
    State,
    TransactionResult,
    dot_stuff,
    encode_orcpt,
    parse_extensions,
)

FULL_EXT = ["PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]


def ehlo_reply(*extensions: str) -> bytes:
    lines = ["mx.example.org greets relay.example.test", *extensions]
    return b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode() for i, line in enumerate(lines))


def events(client: SmtpClient) -> list:
    out = []
    while (e := client.next_event()) is not None:
        out.append(e)
    return out


def sent(client: SmtpClient) -> list[str]:
    return client.take_output().decode().split("\r\n")[:-1]


def msg(*rcpts: str | OutRcpt, sender: str = "alice@example.test", data: bytes = b"Subject: t\r\n\r\nhi\r\n",
        **kw) -> OutMessage:
    recipients = tuple(r if isinstance(r, OutRcpt) else OutRcpt(r) for r in rcpts)
    return OutMessage(sender, recipients, data, **kw)


def opts(**kw) -> ClientOptions:
    base = dict(helo="relay.example.test", tls="none", remote_host="mx.example.org", remote_address="192.0.2.25")
    base.update(kw)
    return ClientOptions(**base)


def ready_client(*extensions: str, **kw) -> SmtpClient:
    c = SmtpClient(opts(**kw))
    c.receive(b"220 mx.example.org ESMTP\r\n")
    assert sent(c) == ["EHLO relay.example.test"]
    c.receive(ehlo_reply(*extensions))
    assert c.ready
    evs = events(c)
    assert isinstance(evs[-1], SessionReady)
    return c


def result_of(client: SmtpClient) -> TransactionResult:
    evs = [e for e in events(client) if isinstance(e, TransactionResult)]
    assert len(evs) == 1, evs
    return evs[0]


# --- replies ---------------------------------------------------------------------------------------

def test_multiline_reply_with_enhanced_codes():
    p = ReplyParser()
    [r] = p.feed(b"550-5.7.1 Relay access denied\r\n550-5.7.1 see the policy\r\n550 5.7.1 bye\r\n")
    assert (r.code, r.enhanced) == (550, "5.7.1")
    assert r.text == "Relay access denied\nsee the policy\nbye"


def test_enhanced_code_of_another_class_is_kept_as_text():
    [r] = ReplyParser().feed(b"250 5.1.1 odd\r\n")
    assert (r.code, r.enhanced, r.text) == (250, None, "5.1.1 odd")


def test_enhanced_code_is_normalised():
    [r] = ReplyParser().feed(b"451 4.03.000 try later\r\n")
    assert r.enhanced == "4.3.0" and r.text == "try later"


REPLY_STREAM = (b"220 mx ESMTP\r\n" + ehlo_reply(*FULL_EXT)
                + b"550-5.1.1 <bob@example.org>: no such\r\n550 5.1.1 user here\r\n354 go\r\n250 2.0.0 queued as X\r\n")


@pytest.mark.parametrize("cut", range(1, len(REPLY_STREAM)))
def test_replies_split_at_every_byte(cut):
    whole = ReplyParser().feed(REPLY_STREAM)
    p = ReplyParser()
    split = p.feed(REPLY_STREAM[:cut]) + p.feed(REPLY_STREAM[cut:])
    assert split == whole
    assert [r.code for r in whole] == [220, 250, 550, 354, 250]


def test_bytewise_feed_gives_the_same_replies():
    p = ReplyParser()
    got = []
    for i in range(len(REPLY_STREAM)):
        got += p.feed(REPLY_STREAM[i:i + 1])
    assert got == ReplyParser().feed(REPLY_STREAM)


@pytest.mark.parametrize("bad", [
    b"25\r\n", b"abc hello\r\n", b"2500 x\r\n", b"250_x\r\n", b"199 too low\r\n", b"600 too high\r\n",
    b"250-a\r\n251 b\r\n", b"250 a\rb\r\n", b"250 a\x00\r\n",
])
def test_malformed_replies_raise(bad):
    with pytest.raises(ProtocolError):
        ReplyParser().feed(bad)


def test_overlong_line_and_reply_are_bounded():
    with pytest.raises(ProtocolError):
        ReplyParser(max_line=100).feed(b"250 " + b"x" * 200)          # no CRLF needed to refuse
    with pytest.raises(ProtocolError):
        ReplyParser(max_lines=5).feed(b"250-x\r\n" * 10)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_fails_otherwise(data):
    try:
        for r in ReplyParser(max_line=128, max_lines=8).feed(data):
            assert 200 <= r.code <= 599
    except ProtocolError:
        pass


def test_extensions_parsed():
    ext = parse_extensions(ReplyParser().feed(ehlo_reply("pipelining", "SIZE 52428800", "AUTH=LOGIN PLAIN"))[0])
    assert ext == {"PIPELINING": "", "SIZE": "52428800", "AUTH": "LOGIN PLAIN"}


def test_dot_stuffing_and_termination():
    assert dot_stuff(b".hidden\r\nline\r\n.\r\n..x\r\n") == b"..hidden\r\nline\r\n..\r\n...x\r\n.\r\n"
    assert dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"
    assert dot_stuff(b"bare\nLF\rCR\r\n") == b"bare\r\nLF\r\nCR\r\n.\r\n"
    assert dot_stuff(b"") == b".\r\n"


def test_orcpt_encoding():
    assert encode_orcpt("rfc822;a+b=c@example.org") == "rfc822;a+2Bb+3Dc@example.org"
    assert encode_orcpt("utf-8;jörg+x@example.org") == "utf-8;j\\x{F6}rg\\x{2B}x@example.org"
    assert encode_orcpt("plain@example.org") == "rfc822;plain@example.org"


# --- sessions --------------------------------------------------------------------------------------

def test_pipelined_transaction_in_one_write():
    c = ready_client(*FULL_EXT)
    c.send_message(msg("bob@example.org", "carol@example.org", "dave@example.org"))
    assert sent(c) == [
        "MAIL FROM:<alice@example.test> SIZE=18",
        "RCPT TO:<bob@example.org>", "RCPT TO:<carol@example.org>", "RCPT TO:<dave@example.org>", "DATA"]
    c.receive(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n450 4.2.1 busy\r\n354 go\r\n")
    assert sent(c) == ["Subject: t", "", "hi", "."]
    assert events(c) == []
    c.receive(b"250 2.0.0 queued as 1234\r\n")
    r = result_of(c).results
    assert [(x.reply_code, x.enhanced_code, x.command, x.permanent) for x in r] == [
        (250, "2.0.0", "END-OF-DATA", False), (550, "5.1.1", "RCPT", True),
        (450, "4.2.1", "RCPT", False)]
    assert r[0].remote_text == "queued as 1234"
    assert (r[0].remote_host, r[0].remote_address) == ("mx.example.org", "192.0.2.25")
    assert c.ready


def test_without_pipelining_one_command_at_a_time():
    c = ready_client("8BITMIME")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    assert sent(c) == ["MAIL FROM:<alice@example.test>"]
    c.receive(b"250 ok\r\n")
    assert sent(c) == ["RCPT TO:<bob@example.org>"]
    c.receive(b"550 5.1.1 unknown\r\n")
    assert sent(c) == ["RCPT TO:<carol@example.org>"]
    c.receive(b"250 ok\r\n")
    assert sent(c) == ["DATA"]
    c.receive(b"354 go\r\n")
    assert sent(c)[-1] == "."
    c.receive(b"250 ok\r\n")
    r = result_of(c).results
    assert [x.reply_code for x in r] == [550, 250]


def test_no_data_when_every_recipient_is_refused_without_pipelining():
    c = ready_client()
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n")
    sent(c)
    c.receive(b"550 5.7.1 Relay access denied\r\n")
    assert sent(c) == []
    [r] = result_of(c).results
    assert (r.reply_code, r.enhanced_code, r.permanent, r.command) == (550, "5.7.1", True, "RCPT")
    assert r.remote_text == "Relay access denied"
    assert c.ready


def test_pipelined_all_refused_and_data_accepted_anyway_sends_a_lone_dot():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n550 5.1.1 no\r\n354 go on\r\n")
    assert sent(c) == ["."]
    assert events(c) == []
    c.receive(b"554 5.5.1 no valid recipients\r\n")
    [r] = result_of(c).results
    assert r.reply_code == 550 and r.command == "RCPT"


def test_mail_5xx_fails_every_recipient_with_that_reply():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    sent(c)
    c.receive(b"530 5.7.0 Authentication required\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
              b"503 5.5.1 need MAIL\r\n")
    assert sent(c) == []
    results = result_of(c)
    assert not results.session_failure
    for r in results.results:
        assert (r.reply_code, r.enhanced_code, r.command, r.permanent) == (530, "5.7.0", "MAIL", True)
        assert r.remote_text == "Authentication required"


def test_mail_5xx_without_pipelining_stops_there():
    c = ready_client()
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"553 5.1.8 sender domain does not exist\r\n")
    assert sent(c) == []
    [r] = result_of(c).results
    assert (r.reply_code, r.command, r.permanent) == (553, "MAIL", True)


def test_data_refused_fails_the_accepted_recipients():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n451 4.3.0 local problem\r\n")
    r = result_of(c).results
    assert [(x.reply_code, x.command) for x in r] == [(451, "DATA"), (550, "RCPT")]


def test_end_of_data_5xx_applies_to_all_accepted():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    sent(c)
    c.receive(b"554-5.7.1 spam\r\n554 5.7.1 refused\r\n")
    r = result_of(c).results
    for x in r:
        assert (x.reply_code, x.enhanced_code, x.command, x.permanent) == (554, "5.7.1", "END-OF-DATA", True)
    assert r[0].remote_text == "spam refused"


def test_body_is_dot_stuffed_on_the_wire():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", data=b".first\r\nmid\r\n.\r\n"))
    sent(c)
    c.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert c.take_output() == b"..first\r\nmid\r\n..\r\n.\r\n"


# --- extensions ---------------------------------------------------------------------------------------

DSN_RCPT = OutRcpt("bob@example.org", ("SUCCESS", "FAILURE"), "rfc822;Bob+x@example.org")


def test_dsn_parameters_only_when_offered():
    c = ready_client("PIPELINING", "DSN")
    c.send_message(msg(DSN_RCPT, envid="id 1+2", ret="hdrs"))
    assert sent(c)[:2] == ["MAIL FROM:<alice@example.test> RET=HDRS ENVID=id+201+2B2",
                           "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx@example.org"]
    c = ready_client("PIPELINING")
    c.send_message(msg(DSN_RCPT, envid="id", ret="FULL"))
    assert sent(c)[:2] == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@example.org>"]


def test_smtputf8_sent_when_offered_and_needed():
    c = ready_client("PIPELINING", "SMTPUTF8", "8BITMIME")
    c.send_message(msg("jörg@example.org"))
    assert sent(c)[:2] == ["MAIL FROM:<alice@example.test> SMTPUTF8", "RCPT TO:<jörg@example.org>"]


def test_smtputf8_requested_by_the_message_is_passed_on():
    c = ready_client("SMTPUTF8")
    c.send_message(msg("bob@example.org", smtputf8=True))
    assert sent(c) == ["MAIL FROM:<alice@example.test> SMTPUTF8"]
    c = ready_client()
    c.send_message(msg("bob@example.org", smtputf8=True))
    assert sent(c) == ["MAIL FROM:<alice@example.test>"]


def test_utf8_recipient_refused_without_smtputf8_others_go():
    c = ready_client("PIPELINING")
    c.send_message(msg("jörg@example.org", "bob@example.org"))
    assert sent(c) == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@example.org>", "DATA"]
    c.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    sent(c)
    c.receive(b"250 ok\r\n")
    first, second = result_of(c).results
    assert (first.reply_code, first.enhanced_code, first.permanent) == (None, "5.6.7", True)
    assert "SMTPUTF8" in first.remote_text and first.remote_host == "mx.example.org"
    assert second.delivered


def test_utf8_sender_refused_without_smtputf8_fails_all_and_sends_nothing():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org", sender="jörg@example.test"))
    assert sent(c) == []
    results = result_of(c).results
    assert all((r.reply_code, r.enhanced_code, r.permanent, r.command) == (None, "5.6.7", True, "MAIL")
               for r in results)
    assert c.ready


def test_idn_domain_is_sent_as_a_labels_without_smtputf8():
    c = ready_client()
    c.send_message(msg("bob@bücher.example"))
    c.receive(b"250 ok\r\n")
    assert sent(c)[-1] == "RCPT TO:<bob@xn--bcher-kva.example>"


def test_8bit_body_declared_when_offered():
    c = ready_client("8BITMIME")
    c.send_message(msg("bob@example.org", data="Subject: café\r\n\r\n".encode()))
    assert sent(c) == ["MAIL FROM:<alice@example.test> BODY=8BITMIME"]
    c = ready_client("8BITMIME")
    c.send_message(msg("bob@example.org", body="8BITMIME"))
    assert sent(c) == ["MAIL FROM:<alice@example.test> BODY=8BITMIME"]
    c = ready_client("8BITMIME")
    c.send_message(msg("bob@example.org"))
    assert sent(c) == ["MAIL FROM:<alice@example.test>"]


def test_8bit_body_to_a_host_without_8bitmime_fails_permanently():
    c = ready_client()
    c.send_message(msg("bob@example.org", data="Subject: café\r\n\r\n".encode()))
    assert sent(c) == []
    [r] = result_of(c).results
    assert (r.reply_code, r.enhanced_code, r.permanent) == (None, "5.6.3", True)
    c = ready_client()
    c.send_message(msg("bob@example.org", body="8BITMIME"))    # declared, but only 7-bit octets
    assert sent(c) == ["MAIL FROM:<alice@example.test>"]


def test_size_limit_announced_by_the_peer():
    c = ready_client("SIZE 10")
    c.send_message(msg("bob@example.org"))
    assert sent(c) == []
    [r] = result_of(c).results
    assert (r.enhanced_code, r.permanent) == ("5.3.4", True)
    c = ready_client("SIZE 0")               # 0: no limit announced
    c.send_message(msg("bob@example.org"))
    assert sent(c) == ["MAIL FROM:<alice@example.test> SIZE=18"]


def test_null_sender():
    c = ready_client()
    c.send_message(msg("bob@example.org", sender=""))
    assert sent(c) == ["MAIL FROM:<>"]


def test_unsendable_recipient_address_is_refused_not_injected():
    c = ready_client()
    c.send_message(msg("bob@example.org>\r\nRCPT TO:<x@evil.example", "carol@example.org"))
    assert sent(c) == ["MAIL FROM:<alice@example.test>"]
    c.receive(b"250 ok\r\n")
    assert sent(c) == ["RCPT TO:<carol@example.org>"]


# --- greeting, EHLO, STARTTLS, AUTH ------------------------------------------------------------------

def test_helo_fallback_when_ehlo_refused():
    c = SmtpClient(opts())
    c.send_message(msg("bob@example.org", data="Subject: café\r\n\r\n".encode()))
    c.receive(b"220 old ESMTP\r\n")
    assert sent(c) == ["EHLO relay.example.test"]
    c.receive(b"502 command not implemented\r\n")
    assert sent(c) == ["HELO relay.example.test"]
    c.receive(b"250 old\r\n")
    assert not c.esmtp
    [r] = result_of(c).results                  # 8-bit data to a plain SMTP host
    assert r.enhanced_code == "5.6.3"


def test_greeting_refused_is_a_session_failure():
    c = SmtpClient(opts())
    c.send_message(msg("bob@example.org"))
    c.receive(b"554 5.7.1 go away\r\n")
    res = result_of(c)
    assert res.session_failure
    [r] = res.results
    assert (r.reply_code, r.enhanced_code, r.command, r.permanent) == (554, "5.7.1", "CONNECT", True)
    assert c.closed and c.failure == r


def test_421_at_any_point_ends_the_session_temporarily():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n")
    first, second = result_of(c).results
    assert (first.reply_code, first.permanent) == (550, True)
    assert (second.reply_code, second.enhanced_code, second.command, second.permanent) == (421, "4.3.2", "RCPT", False)
    assert c.closed


def test_malformed_reply_is_a_protocol_error_result():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"250 ok\r\nHTTP/1.1 400 Bad Request\r\n")
    res = result_of(c)
    [r] = res.results
    assert r.reply_code is None and not r.permanent and r.command == "RCPT"
    assert "protocol error" in r.remote_text
    assert c.closed


def test_unsolicited_reply_is_a_protocol_error():
    c = ready_client()
    c.receive(b"250 surprise\r\n")
    assert c.closed and "protocol error" in c.failure.remote_text


def test_connection_lost_mid_data_is_temporary_for_every_accepted_recipient():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org", "carol@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    sent(c)
    c.connection_lost()
    res = result_of(c)
    assert not res.session_failure
    for r in res.results:
        assert (r.reply_code, r.permanent, r.command) == (None, False, "END-OF-DATA")
        assert "lost connection" in r.remote_text
    assert isinstance(events(c), list) and c.closed


def test_timeout_names_the_command():
    c = SmtpClient(opts())
    c.send_message(msg("bob@example.org"))
    c.timeout(30)
    [r] = result_of(c).results
    assert r.command == "CONNECT" and "timeout after 30s" in r.remote_text and not r.permanent


def test_starttls_opportunistic_then_ehlo_again():
    c = SmtpClient(opts(tls="opportunistic"))
    c.receive(b"220 mx\r\n")
    sent(c)
    c.receive(ehlo_reply("STARTTLS", "PIPELINING"))
    assert sent(c) == ["STARTTLS"]
    c.receive(b"220 2.0.0 go ahead\r\n250 injected after 220\r\n")
    [e] = events(c)
    assert e == StartTlsNeeded(verify=False)
    c.receive(b"250 plaintext during the handshake is never read\r\n")
    c.tls_started()
    assert sent(c) == ["EHLO relay.example.test"]
    c.receive(ehlo_reply("PIPELINING"))
    [ready] = events(c)
    assert isinstance(ready, SessionReady) and ready.tls and "STARTTLS" not in ready.extensions


def test_starttls_refused_opportunistic_goes_on_in_plaintext():
    c = SmtpClient(opts(tls="opportunistic"))
    c.receive(b"220 mx\r\n" + ehlo_reply("STARTTLS"))
    assert sent(c) == ["EHLO relay.example.test", "STARTTLS"]
    c.receive(b"454 4.7.0 TLS not available\r\n")
    assert c.ready and not c.tls


@pytest.mark.parametrize("offer, reply", [((), None), (("STARTTLS",), b"454 4.7.0 TLS not available\r\n")])
def test_starttls_required_fails_temporarily(offer, reply):
    c = SmtpClient(opts(tls="required"))
    c.send_message(msg("bob@example.org"))
    c.receive(b"220 mx\r\n" + ehlo_reply(*offer))
    if reply:
        c.receive(reply)
    assert "MAIL FROM:<alice@example.test>" not in sent(c)
    res = result_of(c)
    [r] = res.results
    assert res.session_failure and r.command == "STARTTLS" and not r.permanent
    assert r.reply_code == (454 if reply else None)


def test_required_tls_asks_for_verification_and_handshake_failure_is_temporary():
    c = SmtpClient(opts(tls="required"))
    c.send_message(msg("bob@example.org"))
    c.receive(b"220 mx\r\n" + ehlo_reply("STARTTLS"))
    c.receive(b"220 ready\r\n")
    assert events(c) == [StartTlsNeeded(verify=True)]
    c.tls_failed("certificate verify failed")
    [r] = result_of(c).results
    assert (r.reply_code, r.command, r.permanent) == (None, "STARTTLS", False)
    assert "certificate verify failed" in r.remote_text


def test_no_ehlo_to_helo_fallback_after_tls():
    c = SmtpClient(opts(tls="opportunistic"))
    c.receive(b"220 mx\r\n" + ehlo_reply("STARTTLS") + b"220 go\r\n")
    c.tls_started()
    sent(c)
    c.receive(b"500 what\r\n")
    assert c.closed and c.failure.command == "EHLO"


def test_auth_plain_only_after_starttls():
    c = SmtpClient(opts(tls="opportunistic", username="relay@example.test", password="s3cret"))
    c.receive(b"220 mx\r\n" + ehlo_reply("STARTTLS", "AUTH PLAIN LOGIN"))
    assert sent(c) == ["EHLO relay.example.test", "STARTTLS"]      # no AUTH in plaintext
    c.receive(b"220 go\r\n")
    c.tls_started()
    c.receive(ehlo_reply("AUTH LOGIN PLAIN"))
    [line] = sent(c)[1:]
    assert line.startswith("AUTH PLAIN ")
    assert base64.b64decode(line.split()[2]) == b"\x00relay@example.test\x00s3cret"
    c.receive(b"235 2.7.0 ok\r\n")
    assert c.ready and c.authenticated


def test_credentials_never_sent_without_tls():
    c = SmtpClient(opts(tls="opportunistic", username="u", password="p"))
    c.send_message(msg("bob@example.org"))
    c.receive(b"220 mx\r\n" + ehlo_reply("AUTH PLAIN"))      # no STARTTLS offered
    out = sent(c)
    assert out == ["EHLO relay.example.test"]
    [r] = result_of(c).results
    assert r.command == "AUTH" and r.reply_code is None and not r.permanent and "STARTTLS" in r.remote_text


def test_auth_login_exchange_and_failure_defers():
    c = SmtpClient(opts(tls="none", username="u@example.test", password="pw", tls_active=True))
    c.send_message(msg("bob@example.org"))
    c.receive(b"220 mx\r\n" + ehlo_reply("AUTH LOGIN"))
    assert sent(c)[-1] == "AUTH LOGIN"
    c.receive(b"334 VXNlcm5hbWU6\r\n")
    assert sent(c) == [base64.b64encode(b"u@example.test").decode()]
    c.receive(b"334 UGFzc3dvcmQ6\r\n")
    assert sent(c) == [base64.b64encode(b"pw").decode()]
    c.receive(b"535 5.7.8 Authentication credentials invalid\r\n")
    [r] = result_of(c).results
    assert (r.reply_code, r.enhanced_code, r.command, r.permanent) == (535, "5.7.8", "AUTH", False)


def test_auth_mechanism_we_cannot_use():
    c = SmtpClient(opts(tls_active=True, username="u", password="p"))
    c.receive(b"220 mx\r\n" + ehlo_reply("AUTH CRAM-MD5"))
    assert c.closed and "CRAM-MD5" in c.failure.remote_text


def test_no_auth_offered_goes_on_without_it():
    c = SmtpClient(opts(tls_active=True, username="u", password="p"))
    c.receive(b"220 mx\r\n" + ehlo_reply("PIPELINING"))
    assert c.ready and not c.authenticated


# --- reuse and QUIT -----------------------------------------------------------------------------------

def test_reset_between_messages_and_quit():
    c = ready_client("PIPELINING")
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
    sent(c)
    c.receive(b"250 ok\r\n")
    assert result_of(c).results[0].delivered
    c.send_message(msg("x@example.org"))          # a second message on the same session
    with pytest.raises(RuntimeError):               # ... but only one at a time
        c.send_message(msg("y@example.org"))
    c = ready_client()
    c.reset()
    assert sent(c) == ["RSET"]
    c.receive(b"250 2.0.0 reset\r\n")
    [e] = events(c)
    assert isinstance(e, ResetDone) and e.ok and c.ready
    c.quit()
    assert sent(c) == ["QUIT"]
    c.receive(b"221 2.0.0 bye\r\n")
    assert isinstance(events(c)[-1], Closed) and c.state is State.CLOSED


def test_idle_connection_closed_by_peer_reports_itself():
    c = ready_client()
    c.connection_lost()
    assert c.closed and "idle" in c.failure.remote_text


# --- replies that do not fit the command they answer (a broken or out-of-step next hop) -----------

@pytest.mark.parametrize("pipelining, replies, command", [
    (False, [b"250 ok\r\n", b"250 ok\r\n", b"250 2.0.0 ok whatever\r\n"], "DATA"),   # 250 to DATA
    (False, [b"250 ok\r\n", b"250 ok\r\n", b"220 hello\r\n"], "DATA"),
    (False, [b"354 go on\r\n"], "MAIL"),                                             # 354 to MAIL
    (False, [b"250 ok\r\n", b"354 go on\r\n"], "RCPT"),
    (True, [b"354 go on\r\n250 2.1.5 ok\r\n250 2.0.0 ok\r\n"], "MAIL"),              # out of step
])
def test_a_reply_that_does_not_fit_its_command_is_never_a_delivery(pipelining, replies, command):
    # only 354 lets the data go (RFC 5321 4.3.2): any other positive reply to DATA means the
    # message was not sent, whatever the server claims; the message is tried again later
    c = ready_client(*(["PIPELINING"] if pipelining else []))
    c.send_message(msg("bob@example.org"))
    for reply in replies:
        sent(c)
        c.receive(reply)
    [r] = result_of(c).results
    assert not r.delivered and r.reply_code is None and not r.permanent, r
    assert r.command == command and "protocol error" in r.remote_text
    assert c.closed


def test_a_3xx_to_the_end_of_data_is_not_a_delivery():
    c = ready_client()
    c.send_message(msg("bob@example.org"))
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"354 again\r\n"):
        sent(c)
        c.receive(reply)
    [r] = result_of(c).results
    assert not r.delivered and not r.permanent and r.command == "END-OF-DATA"


def test_a_huge_reply_is_kept_shortened():
    c = ready_client()
    c.send_message(msg("bob@example.org"))
    sent(c)
    c.receive(b"250 ok\r\n")
    sent(c)
    c.receive(b"".join(b"550-5.1.1 " + b"x" * 3000 + b"\r\n" for _ in range(200)) + b"550 5.1.1 end\r\n")
    [r] = result_of(c).results
    assert r.permanent and r.reply_code == 550
    assert len(r.remote_text) < 900 and r.remote_text.endswith("more characters)")


def test_steps_count_commands_and_replies():
    # what the driver times each reply from
    c = SmtpClient(opts())
    assert c.steps == 0
    c.receive(b"220 mx.example.org ESMTP\r\n")              # a reply, and EHLO sent
    assert c.steps == 2
    c.receive(b"250-mx.example.org\r\n")                    # half a reply: no step
    assert c.steps == 2
