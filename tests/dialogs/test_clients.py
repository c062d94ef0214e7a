"""Independent SMTP clients against the real server: swaks, Python's smtplib and aiosmtplib.

Each client sends a message; the test then finds it in the queue with the facts the server must
have kept (sender, recipients, authenticated user, TLS).  One shared server, delivery off.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import subprocess
from email.message import EmailMessage

import aiosmtplib
import pytest

from tests.support.server import DEFAULT_CONFIG
from tests.support.smtp import queue_only_server, read_queued

USER, PASSWORD = "alice@example.test", "correct horse"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, cert_files):
    server = queue_only_server(tmp_path_factory.mktemp("clients") / "srv", DEFAULT_CONFIG, cert_files=cert_files,
                               users={USER: PASSWORD})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def queued_by(srv, sender: str) -> tuple:
    """The queued message of a unique sender, found through its MESSAGE_QUEUED event."""
    event = srv.wait_for_event(lambda e: e["id"] == 3001 and e["fields"].get("sender") == sender)
    msg, data = read_queued(srv.data_dir, event["message_id"])
    assert msg is not None
    return msg, data


# --- swaks -----------------------------------------------------------------------------------------

def swaks(srv, listener: str, *args: str) -> subprocess.CompletedProcess:
    if not shutil.which(SWAKS):
        pytest.skip("swaks is not installed")
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(srv.ports[listener]),
                           "--helo", "swaks.example.org", "--timeout", "10", *args],
                          capture_output=True, text=True, timeout=60)


def swaks_queue_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(r"<[-~]  250 2\.0\.0 .*queued as ([0-9A-Za-z]+)", result.stdout)
    assert m, result.stdout
    return m.group(1)


def test_swaks_plain(srv):
    r = swaks(srv, "mx", "--from", "swaks-plain@example.org", "--to", "alice@example.test",
              "--header", "Subject: swaks plain", "--body", "hello from swaks")
    msg, data = read_queued(srv.data_dir, swaks_queue_id(r))
    assert msg.sender == "swaks-plain@example.org"
    assert msg.tls is None and msg.auth_user is None
    assert b"Subject: swaks plain" in data and b"hello from swaks" in data


def test_swaks_starttls_verified(srv, ca_file):
    r = swaks(srv, "mx", "-tls", "--tls-verify", "--tls-ca-path", str(ca_file),
              "--from", "swaks-tls@example.org", "--to", "alice@example.test")
    msg, data = read_queued(srv.data_dir, swaks_queue_id(r))
    assert msg.tls is not None
    assert b"with ESMTPS id" in data


def test_swaks_verification_fails_without_the_ca(srv):
    r = swaks(srv, "mx", "-tls", "--tls-verify", "--tls-ca-path", "/nonexistent-ca.pem",
              "--from", "swaks-noca@example.org", "--to", "alice@example.test")
    assert r.returncode != 0
    assert "250 2.0.0" not in r.stdout


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_on_submission(srv, mechanism):
    sender = f"swaks-{mechanism.lower()}@example.test"
    r = swaks(srv, "submission", "-tls", "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
              "--from", sender, "--to", "friend@example.net")
    msg, data = read_queued(srv.data_dir, swaks_queue_id(r))
    assert "235 2.7.0" in r.stdout
    assert msg.auth_user == USER and msg.tls is not None and msg.listener == "submission"
    assert [(x.address, x.verdict) for x in msg.recipients] == [("friend@example.net", "relay")]
    assert b"with ESMTPSA id" in data
    srv.wait_for_event(lambda e: e["id"] == 1708 and e["fields"].get("method") == mechanism)


def test_swaks_wrong_password(srv):
    r = swaks(srv, "submission", "-tls", "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "nope",
              "--from", USER, "--to", "friend@example.net")
    assert r.returncode != 0
    assert "535 5.7.8" in r.stdout


def test_swaks_auth_refused_without_tls(srv):
    r = swaks(srv, "submission", "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
              "--from", USER, "--to", "friend@example.net")
    assert r.returncode != 0
    assert "250 2.0.0" not in r.stdout


def test_swaks_pipeline(srv):
    r = swaks(srv, "mx", "--pipeline", "--from", "swaks-pipe@example.org",
              "--to", "alice@example.test,postmaster@example.test")
    msg, _ = read_queued(srv.data_dir, swaks_queue_id(r))
    assert [x.address for x in msg.recipients] == ["alice@example.test", "postmaster@example.test"]


def test_swaks_relay_refused_on_mx(srv):
    r = swaks(srv, "mx", "--from", "swaks-relay@example.org", "--to", "victim@example.net")
    assert r.returncode != 0
    assert re.search(r"<[-~*]+ +550 5\.7\.1 Relay access denied", r.stdout), r.stdout


# --- smtplib ------------------------------------------------------------------------------------

def message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("Grüße from the standard library.\n")
    return msg


def test_smtplib_starttls_login_send_message(srv, client_tls):
    sender = "smtplib@example.test"
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], local_hostname="smtplib.example.org", timeout=10) as s:
        s.starttls(context=client_tls)
        s.login(USER, PASSWORD)
        refused = s.send_message(message(sender, "friend@example.net", "smtplib"))
    assert refused == {}
    msg, data = queued_by(srv, sender)
    assert msg.auth_user == USER and msg.tls is not None
    assert b"Subject: smtplib" in data


def test_smtplib_sees_the_refusals(srv):
    with smtplib.SMTP("127.0.0.1", srv.ports["mx"], timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            s.send_message(message("smtplib-relay@example.org", "victim@example.net", "relay"))
        assert info.value.recipients["victim@example.net"][0] == 550
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        with pytest.raises(smtplib.SMTPNotSupportedError):
            s.login(USER, PASSWORD)     # AUTH is not offered before TLS


def test_smtplib_wrong_password(srv, client_tls):
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.starttls(context=client_tls)
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login(USER, "wrong")
        assert info.value.smtp_code == 535


# --- aiosmtplib -----------------------------------------------------------------------------------

def test_aiosmtplib_submission(srv, client_tls):
    sender = "aiosmtplib@example.test"

    async def send():
        return await aiosmtplib.send(message(sender, "friend@example.net", "aiosmtplib"),
                                     hostname="127.0.0.1", port=srv.ports["submission"], start_tls=True,
                                     tls_context=client_tls, username=USER, password=PASSWORD, timeout=10)

    errors, response = asyncio.run(send())
    assert errors == {}
    qid = re.search(r"queued as ([0-9A-Za-z]+)", response).group(1)
    msg, _ = read_queued(srv.data_dir, qid)
    assert msg.sender == sender and msg.auth_user == USER and msg.tls is not None


def test_aiosmtplib_mx_several_messages_on_one_connection(srv):
    async def send():
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.ports["mx"], start_tls=False, timeout=10)
        async with client:
            results = []
            for i in range(3):
                results.append(await client.send_message(message(f"aio{i}@example.org", "alice@example.test", f"n{i}")))
            return results

    results = asyncio.run(send())
    ids = [re.search(r"queued as ([0-9A-Za-z]+)", response).group(1) for _, response in results]
    assert len(set(ids)) == 3
    for i, qid in enumerate(ids):
        msg, _ = read_queued(srv.data_dir, qid)
        assert msg.sender == f"aio{i}@example.org" and msg.tls is None
