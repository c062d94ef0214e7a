"""The doctor's ``accounts`` and ``queue-spam`` checks over event logs and queues made by real SMTP
traffic through a running relaywarden (delivery off, so the mail stays queued).

How the history is made: a test cannot wait days, so the compromised account's quiet history is
real mail sent through the server in five batches, and afterwards, in a *copy* of the data
directory, the ``time`` of every event of batch k is moved back by 6-k days (the order of the log
is kept; nothing else in a record changes).  The burst that follows the history is left at its
real time.  The server's own log and queue are not touched.  Everything else (failed logins, the
guest account, the healthy server) is left exactly as the server wrote it.

The fixes the doctor prints are run as printed, with the real command line, and the doctor is
run again to see the problem gone.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import smtplib
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from relaywarden.cli.doctor_cmd import build_context
from relaywarden.config.loader import load_config
from relaywarden.diagnose.accounts import check_accounts
from relaywarden.diagnose.model import Level
from relaywarden.diagnose.queue_spam import check_queue_spam
from relaywarden.events import LOG_FILE_NAME, format_time
from relaywarden.queue.ops import QueueFilter, QueueOps
from tests.support.server import QUEUE_ONLY_CONFIG, RelayServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CONFIG = QUEUE_ONLY_CONFIG + """
[doctor]
window_hours = 24
baseline_days = 14
burst_factor = 10
min_recipients = 200
failed_logins = 8
queue_recipients_per_message = 50
queue_share = 0.5
"""
PASSWORD = "correct horse battery"
USERS = {"alice@example.test": PASSWORD, "bob@example.test": PASSWORD}


def send(srv: RelayServer, client_tls, user: str | None, sender: str, rcpts: list[str],
         password: str = PASSWORD) -> None:
    """One message: as ``user`` over the submission listener (STARTTLS + AUTH PLAIN), or
    anonymously to the mx listener when ``user`` is None."""
    port = srv.ports["submission" if user else "mx"]
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.starttls(context=client_tls)
        if user:
            smtp.login(user, password)
        refused = smtp.sendmail(sender, rcpts, f"From: <{sender}>\r\nSubject: test\r\n\r\nhello\r\n")
        assert not refused, refused


def failed_login(srv: RelayServer, client_tls, user: str) -> None:
    """One AUTH PLAIN with a wrong password (smtplib's login() would try LOGIN after it too)."""
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as smtp:
        smtp.starttls(context=client_tls)
        smtp.ehlo()
        smtp.user, smtp.password = user, "wrong guess"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.auth("PLAIN", smtp.auth_plain)


def context(srv: RelayServer, data_dir: Path | None = None):
    """The doctor's context as ``relaywarden doctor --offline`` builds it."""
    return build_context(load_config(srv.config_path), data_dir or srv.data_dir, live=False, timeout=10)


def doctor(srv: RelayServer, check, data_dir: Path | None = None):
    return asyncio.run(check(context(srv, data_dir)))


def doctor_cli(srv: RelayServer, *args: str) -> subprocess.CompletedProcess:
    """``relaywarden doctor`` run as the administrator runs it, on these two checks."""
    return srv.run_cli("doctor", "--config", str(srv.config_path), "--data-dir", str(srv.data_dir),
                       "--offline", "--check", "accounts", "--check", "queue-spam", *args)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60)


def commands_in(fix: str) -> list[list[str]]:
    """The relaywarden command lines in a printed fix ("cmd; cmd; then review with cmd and ...")."""
    found: list[list[str]] = []
    for part in fix.split("; "):
        current: list[str] | None = None
        for word in shlex.split(part):
            if word == "relaywarden":
                current = []
                found.append(current)
            elif current is not None and word in ("and", "then", "if", "to"):
                current = None
            elif current is not None:
                current.append(word)
    return found


def run_fix(fix: str, *wanted: str) -> list[subprocess.CompletedProcess]:
    """Run, as printed, the commands of a fix that start with one of ``wanted`` ("queue hold")."""
    results = []
    for words in commands_in(fix):
        if any(" ".join(words).startswith(w) for w in wanted):
            r = cli("relaywarden", *words)
            assert r.returncode == 0, (words, r.stdout, r.stderr)
            results.append(r)
    assert len(results) == len(wanted), fix
    return results


def shift_history(data_dir: Path, marks: list[float]) -> None:
    """Move events written before marks[k+1] (and after marks[k]) back by len(marks)-k days."""
    path = data_dir / "log" / LOG_FILE_NAME
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        moment = datetime.fromisoformat(record["time"])
        stamp = moment.timestamp()
        for k in range(len(marks) - 1):
            if stamp < marks[k + 1]:
                record["time"] = format_time(moment - timedelta(days=len(marks) - k))
                break
        out.append(json.dumps(record))
    path.write_text("\n".join(out) + "\n")


def test_compromised_account_burst_over_a_quiet_history(start_server, client_tls, tmp_path):
    srv = start_server(CONFIG, users=USERS)
    marks = [0.0]
    for day in range(5):                       # the quiet history: a couple of recipients a day
        send(srv, client_tls, "alice@example.test", "alice@example.test",
             [f"day{day}@partner.test", f"day{day}@supplier.test"])
        send(srv, client_tls, "bob@example.test", "bob@example.test", [f"day{day}@partner.test"])
        time.sleep(0.05)
        marks.append(time.time())
        time.sleep(0.05)
    # the burst: 300 recipients in 60 external domains, with a sender that is not ours
    for batch in range(3):
        send(srv, client_tls, "alice@example.test", "offers@cheap-pills.test",
             [f"u{batch}.{i}@victim{i % 60}.test" for i in range(100)])
    send(srv, client_tls, "bob@example.test", "bob@example.test", ["today@partner.test"])
    srv.stop()
    copy = tmp_path / "copy"
    shutil.copytree(srv.data_dir, copy)
    shift_history(copy, marks)

    findings = doctor(srv, check_accounts, copy)
    assert [(f.check, f.level) for f in findings] == [("accounts.burst", Level.FAIL)]
    burst = findings[0]
    assert burst.title == "account alice@example.test relayed far more than usual: it may be compromised"
    assert burst.evidence[0] == "last 24 h: 300 relayed recipients, 60 external domains, 1 client addresses, 3 messages"
    assert burst.evidence[1].startswith("usual per 24 h over the last 5.")
    assert "2.0 recipients, 2.0 domains" in burst.evidence[1]
    assert burst.evidence[-1] == "8 of its messages are in the queue"
    header = srv.config_path.read_text().splitlines().index('address = "alice@example.test"')
    assert burst.where == f"{srv.config_path}:{header}"      # alice's [[mailbox]] table

    # the same queue, seen by queue-spam: alice's mail shows three signs, so it is a failure
    spam = doctor(srv, check_queue_spam, copy)
    assert sorted(f.check for f in spam) == ["queue-spam.domains", "queue-spam.foreign-sender",
                                             "queue-spam.recipients"]
    assert {f.level for f in spam} == {Level.FAIL}
    assert all("user alice@example.test" in f.title for f in spam)
    assert spam[0].fix.startswith(f"relaywarden queue summary --by user --data-dir {copy}")

    # the fix as printed: suspend the relay right, hold its mail, review it
    results = run_fix(burst.fix, "user suspend-relay", "queue hold", "queue list")
    assert "alice@example.test" in results[2].stdout
    with QueueOps.open(copy) as ops:
        assert ops.count(QueueFilter(states=("hold",), auth_user="alice@example.test")) == 8
        assert ops.count(QueueFilter(states=("hold",), auth_user="bob@example.test")) == 0
    users = json.loads((copy / "users.json").read_text())["users"]
    assert [u["relay"] for u in users if u["address"] == "alice@example.test"] == [False]
    again = doctor(srv, check_accounts, copy)
    assert again[0].evidence[-1] == "8 of its messages are in the queue (8 held)"


def test_login_after_a_burst_of_failed_logins(start_server, client_tls):
    srv = start_server(CONFIG, users=USERS)
    for _ in range(10):
        failed_login(srv, client_tls, "bob@example.test")
    send(srv, client_tls, "bob@example.test", "bob@example.test", ["someone@partner.test"])
    for _ in range(3):                          # a typo or three is not password guessing
        failed_login(srv, client_tls, "alice@example.test")
    send(srv, client_tls, "alice@example.test", "alice@example.test", ["someone@partner.test"])
    srv.stop()

    findings = doctor(srv, check_accounts)
    assert [(f.check, f.level) for f in findings] == [("accounts.guessed-password", Level.FAIL)]
    found = findings[0]
    assert found.title == ("account bob@example.test logged in after 10 failed logins: "
                           "its password may have been guessed")
    assert "login from 127.0.0.1 after 10 failed logins" in found.evidence[0]
    assert "127.0.0.1 x10" in found.evidence[0]
    config = srv.config_path                     # the file the doctor read
    assert found.fix.startswith(
        f"relaywarden user suspend-relay bob@example.test --config {config} --data-dir {srv.data_dir}; "
        f"relaywarden user passwd bob@example.test --config {config} --data-dir {srv.data_dir}; ")

    r = doctor_cli(srv, "--json")
    assert r.returncode == 2, r.stderr
    report = json.loads(r.stdout)
    assert [(f["check"], f["level"]) for f in report["findings"]] == [
        ("accounts.guessed-password", "fail"), ("queue-spam", "ok")]
    assert report["findings"][0]["section"] == "relay from a compromised account"


def test_guest_account_with_the_relay_right(start_server, client_tls):
    srv = start_server(CONFIG, users={**USERS, "scanner@example.test": "scan2me"})
    findings = doctor(srv, check_accounts)
    assert [(f.check, f.level) for f in findings] == [("accounts.guest", Level.WARN)]
    assert findings[0].title == "guest-like account scanner@example.test can log in and relay"
    assert "listeners that let authenticated users relay: submission" in findings[0].evidence

    # before: the scanner account relays; after the printed fix it is refused (5.7.1, event 1710)
    send(srv, client_tls, "scanner@example.test", "scanner@example.test", ["x@outside.test"], password="scan2me")
    run_fix(findings[0].fix, "user suspend-relay")
    time.sleep(1.1)                             # the server notices users.json by its mtime
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(srv, client_tls, "scanner@example.test", "scanner@example.test", ["y@outside.test"],
             password="scan2me")
    assert refused.value.recipients["y@outside.test"][0] == 550
    assert [f.level for f in doctor(srv, check_accounts)] == [Level.OK]


def test_healthy_server_is_ok(start_server, client_tls):
    srv = start_server(CONFIG, users=USERS)
    for i in range(6):
        send(srv, client_tls, "alice@example.test", "alice@example.test",
             [f"friend{i}@partner.test", "bob@example.test"])
        send(srv, client_tls, "bob@example.test", "bob@example.test", [f"client{i}@customer{i % 2}.test"])
        send(srv, client_tls, None, f"newsletter{i}@outside.test", ["alice@example.test"])
    failed_login(srv, client_tls, "alice@example.test")        # one typo
    send(srv, client_tls, "alice@example.test", "alice@example.test", ["later@partner.test"])
    srv.stop()

    accounts = doctor(srv, check_accounts)
    assert [(f.check, f.level) for f in accounts] == [("accounts", Level.OK)]
    assert accounts[0].evidence[0] == "2 accounts can log in; 2 relayed in the last 24 h"
    queue = doctor(srv, check_queue_spam)
    assert [(f.check, f.level) for f in queue] == [("queue-spam", Level.OK)]
    assert queue[0].evidence[0] == "19 messages, 25 recipients waiting"

    r = doctor_cli(srv)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 ok, 0 warnings, 0 failures, 0 skipped" in r.stdout
