"""SASL PLAIN and LOGIN server exchanges: every path, cancel, malformed input, fuzz."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaywarden.protocol.sasl import (
    MAX_LINE,
    MECHANISMS,
    Credentials,
    SaslCancelled,
    SaslError,
    SaslExchange,
    client_plain,
    new_exchange,
)

USERNAME_CHALLENGE = "VXNlcm5hbWU6"
PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def assert_sasl_error(exc: pytest.ExceptionInfo[SaslError], code: int, enhanced: str) -> None:
    assert (exc.value.code, exc.value.enhanced) == (code, enhanced)
    assert exc.value.reason


# --- mechanisms -------------------------------------------------------------------------------


def test_mechanisms_offered() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")


@pytest.mark.parametrize("name", ["PLAIN", "plain", "Plain", "LOGIN", "login"])
def test_new_exchange_is_case_insensitive(name: str) -> None:
    assert new_exchange(name).mechanism == name.upper()


@pytest.mark.parametrize("name", ["CRAM-MD5", "XOAUTH2", "", "PLAIN ", "plaın", "LOGIN\x00"])
def test_unknown_mechanism_is_504(name: str) -> None:
    with pytest.raises(SaslError) as exc:
        new_exchange(name)
    assert_sasl_error(exc, 504, "5.5.4")


# --- PLAIN ------------------------------------------------------------------------------------


def test_plain_with_initial_response() -> None:
    result = new_exchange("PLAIN").start(client_plain("alice@example.org", "s3cret"))
    assert result == Credentials("", "alice@example.org", "s3cret")


def test_plain_with_authzid_and_utf8() -> None:
    result = new_exchange("PLAIN").start(client_plain("jürgen", "pässwörd ✓", authzid="admin"))
    assert result == Credentials("admin", "jürgen", "pässwörd ✓")


def test_plain_without_initial_response_sends_empty_challenge() -> None:
    exchange = new_exchange("PLAIN")
    assert exchange.start(None) == ""
    assert exchange.step(b64("\0bob\0pw")) == Credentials("", "bob", "pw")


def test_plain_password_may_contain_spaces_and_be_long() -> None:
    password = "a b " * 500
    assert new_exchange("PLAIN").start(client_plain("u", password)) == Credentials("", "u", password)


@pytest.mark.parametrize(
    "message",
    [
        b"",  # empty
        b"bob\0pw",  # one NUL
        b"\0\0pw",  # empty username
        b"\0bob\0",  # empty password
        b"a\0bob\0pw\0",  # extra NUL
        b"\0bob\0p\0w",
        b"\0b\xffob\0pw",  # not UTF-8
        b"\0bob\0\xc3",  # truncated UTF-8
        b"\xed\xa0\x80\0bob\0pw",  # surrogate in authzid
    ],
)
def test_plain_malformed_message_is_501(message: bytes) -> None:
    with pytest.raises(SaslError) as exc:
        new_exchange("PLAIN").start(b64(message))
    assert_sasl_error(exc, 501, "5.5.2")
    exchange = new_exchange("PLAIN")
    exchange.start(None)
    with pytest.raises(SaslError) as exc:
        exchange.step(b64(message))
    assert_sasl_error(exc, 501, "5.5.2")


def test_plain_empty_initial_response_is_malformed() -> None:
    with pytest.raises(SaslError) as exc:
        new_exchange("PLAIN").start("=")
    assert_sasl_error(exc, 501, "5.5.2")


# --- LOGIN ------------------------------------------------------------------------------------


def test_login_full_dialog() -> None:
    exchange = new_exchange("LOGIN")
    assert exchange.start(None) == USERNAME_CHALLENGE
    assert base64.b64decode(USERNAME_CHALLENGE) == b"Username:"
    assert exchange.step(b64("scanner@example.org")) == PASSWORD_CHALLENGE
    assert base64.b64decode(PASSWORD_CHALLENGE) == b"Password:"
    assert exchange.step(b64("pr1nt")) == Credentials("", "scanner@example.org", "pr1nt")


def test_login_with_initial_username() -> None:
    exchange = new_exchange("login")
    assert exchange.start(b64("carol")) == PASSWORD_CHALLENGE
    assert exchange.step(b64("pw ✓")) == Credentials("", "carol", "pw ✓")


@pytest.mark.parametrize(
    ("username", "password"),
    [(b"", b"pw"), (b"carol", b""), (b"car\0ol", b"pw"), (b"carol", b"p\0w"), (b"\xff", b"pw"), (b"carol", b"\xc3")],
)
def test_login_malformed_is_501(username: bytes, password: bytes) -> None:
    exchange = new_exchange("LOGIN")
    exchange.start(None)
    with pytest.raises(SaslError) as exc:
        assert exchange.step(b64(username)) == PASSWORD_CHALLENGE
        exchange.step(b64(password))
    assert_sasl_error(exc, 501, "5.5.2")


def test_login_empty_initial_response_means_empty_username() -> None:
    exchange = new_exchange("LOGIN")
    assert exchange.start("=") == PASSWORD_CHALLENGE
    with pytest.raises(SaslError) as exc:
        exchange.step(b64("pw"))
    assert_sasl_error(exc, 501, "5.5.2")


# --- cancel, base64, line length, misuse -----------------------------------------------------


@pytest.mark.parametrize(("mechanism", "steps"), [("PLAIN", 0), ("LOGIN", 0), ("LOGIN", 1)])
def test_star_cancels(mechanism: str, steps: int) -> None:
    exchange = new_exchange(mechanism)
    exchange.start(None)
    for _ in range(steps):
        exchange.step(b64("user"))
    with pytest.raises(SaslCancelled) as exc:
        exchange.step("*")
    assert (exc.value.code, exc.value.enhanced) == (501, "5.0.0")
    with pytest.raises(RuntimeError):
        exchange.step(b64("user"))


def test_star_as_initial_response_is_not_base64() -> None:
    with pytest.raises(SaslError) as exc:
        new_exchange("PLAIN").start("*")
    assert_sasl_error(exc, 501, "5.5.2")


@pytest.mark.parametrize(
    "line",
    [
        "AGJvYgBwdw",  # missing padding
        "AGJvYgBwdw=",  # wrong padding length
        " AGJvYgBwdw==",
        "AGJvYgBwdw== ",
        "AGJv YgBwdw=",
        "AGJvYgBwdw=\r\n",
        "=AGJvYgBwdw",
        "AGJvYgBwdw=AGJv",  # data after padding
        "AGJvYgBw!w==",
        "AGJvYgBwdw=é",
        "AGJvYgBwdw-_",  # URL-safe alphabet
    ],
)
def test_bad_base64_is_501_everywhere(line: str) -> None:
    with pytest.raises(SaslError) as exc:
        new_exchange("PLAIN").start(line)
    assert_sasl_error(exc, 501, "5.5.2")
    exchange = new_exchange("LOGIN")
    exchange.start(None)
    with pytest.raises(SaslError) as exc:
        exchange.step(line)
    assert_sasl_error(exc, 501, "5.5.2")


def test_reference_base64_is_accepted() -> None:
    assert base64.b64encode(b"\0bob\0pw").decode() == "AGJvYgBwdw=="
    assert new_exchange("PLAIN").start("AGJvYgBwdw==") == Credentials("", "bob", "pw")


def test_line_length_cap() -> None:
    at_cap = b64(b"\0u\0" + b"p" * (MAX_LINE // 4 * 3 - 3))
    assert len(at_cap) == MAX_LINE
    assert isinstance(new_exchange("PLAIN").start(at_cap), Credentials)
    too_long = b64(b"\0u\0" + b"p" * (MAX_LINE // 4 * 3))
    with pytest.raises(SaslError) as exc:
        new_exchange("PLAIN").start(too_long)
    assert_sasl_error(exc, 500, "5.5.6")


def test_a_failed_exchange_is_over() -> None:
    exchange = new_exchange("LOGIN")
    exchange.start(None)
    with pytest.raises(SaslError):
        exchange.step("not base64!")
    with pytest.raises(RuntimeError):
        exchange.step(b64("user"))


def test_driver_misuse_is_a_runtime_error() -> None:
    exchange = SaslExchange("PLAIN")
    with pytest.raises(RuntimeError):
        exchange.step(b64("\0u\0p"))
    exchange.start(client_plain("u", "p"))
    with pytest.raises(RuntimeError):
        exchange.step(b64("\0u\0p"))
    with pytest.raises(RuntimeError):
        exchange.start(None)


def test_password_is_not_in_repr() -> None:
    creds = Credentials("", "alice", "hunter2")
    assert "hunter2" not in repr(creds)
    assert "alice" in repr(creds)


def test_client_plain() -> None:
    assert client_plain("bob", "pw") == "AGJvYgBwdw=="
    assert base64.b64decode(client_plain("u", "p", "z")) == b"z\0u\0p"
    with pytest.raises(ValueError):
        client_plain("b\0ob", "pw")


def test_errors_are_value_errors_with_a_reply() -> None:
    err = SaslError(501, "5.5.2", "Cannot Base64-decode Client responses")
    assert isinstance(err, ValueError)
    assert str(err) == "501 5.5.2 Cannot Base64-decode Client responses"


# --- fuzz -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None)
lines = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60).map(b64),
    st.sampled_from(["*", "=", "", "==", "A===", USERNAME_CHALLENGE]),
)


@FUZZ
@given(st.sampled_from(MECHANISMS), st.none() | lines, st.lists(lines, max_size=4))
def test_fuzz_only_sasl_errors_escape(mechanism: str, initial: str | None, responses: list[str]) -> None:
    exchange = new_exchange(mechanism)
    try:
        result = exchange.start(initial)
        for line in responses:
            if isinstance(result, Credentials):
                break
            assert isinstance(result, str)
            result = exchange.step(line)
    except (SaslError, SaslCancelled):
        return
    if isinstance(result, Credentials):
        assert result.username and result.password
        assert "\0" not in result.username + result.password + result.authzid


@FUZZ
@given(
    st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
    st.text(min_size=1, max_size=40).filter(lambda s: "\0" not in s),
    st.text(max_size=40).filter(lambda s: "\0" not in s),
)
def test_fuzz_plain_and_login_round_trip(username: str, password: str, authzid: str) -> None:
    try:
        username.encode()
        password.encode()
        authzid.encode()
    except UnicodeEncodeError:  # lone surrogates cannot be sent
        return
    assert new_exchange("PLAIN").start(client_plain(username, password, authzid)) == Credentials(
        authzid, username, password
    )
    login = new_exchange("LOGIN")
    assert login.start(b64(username)) == PASSWORD_CHALLENGE
    assert login.step(b64(password)) == Credentials("", username, password)


@FUZZ
@given(st.text(max_size=20))
def test_fuzz_mechanism_names(name: str) -> None:
    try:
        exchange = new_exchange(name)
    except SaslError as err:
        assert err.code == 504
        return
    assert exchange.mechanism in MECHANISMS
