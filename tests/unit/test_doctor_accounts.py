"""Unit tests of the doctor checks ``accounts`` and ``queue-spam`` (relaywarden.diagnose).

The event logs here are written by the real ``EventLog`` with an injected clock, so a history of
days is laid down in milliseconds; the records carry the same top-level keys and fields the
server's session writes (see tests/integration/test_doctor_accounts.py for the same checks over
logs made by real SMTP traffic).  Queues are real SQLite queues filled through ``submit``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relaywarden.config.loader import parse_text
from relaywarden.diagnose.accounts import account_activity, check_accounts, command, is_guest_name
from relaywarden.diagnose.model import Context, Level
from relaywarden.diagnose.queue_spam import DOMINANCE_MIN_MESSAGES, check_queue_spam
from relaywarden.directory import Directory
from relaywarden.events import EventId, EventLog
from relaywarden.queue.model import MessageIn, RecipientIn
from relaywarden.queue.store import SqliteQueue
from relaywarden.users import hash_password

NOW = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0
HASH = hash_password("s3cret pass")

CONFIG = f"""\
[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525

[[listener]]
name = "submission"
address = "127.0.0.1"
port = 2587
auth = ["PLAIN"]
allow_authenticated = true

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"
password_hash = "{HASH}"

[[mailbox]]
address = "bob@example.test"
password_hash = "{HASH}"

[[route]]
name = "default"

[doctor]
window_hours = 24
baseline_days = 14
burst_factor = 10
min_recipients = 200
failed_logins = 20
queue_recipients_per_message = 50
queue_share = 0.5
"""


def make_ctx(tmp_path: Path, text: str = CONFIG, now: float = NOW) -> Context:
    loaded = parse_text(text, "relaywarden.toml")
    return Context(loaded=loaded, data_dir=tmp_path, directory=Directory.build(loaded), resolver=None,
                   live=False, now=now)


class Log:
    """An event log written at chosen moments, with the records the server's session writes."""

    def __init__(self, data_dir: Path):
        self.moment = NOW
        self.log = EventLog(data_dir / "log", clock=lambda: datetime.fromtimestamp(self.moment, UTC))

    def at(self, moment: float) -> Log:
        self.moment = moment
        return self

    def start(self) -> None:
        self.log.emit(EventId.SERVER_STARTED, text="started", version="test", config_file="x", listeners=[], pid=1)

    def login(self, user: str, client: str, ok: bool = True) -> None:
        if ok:
            self.log.emit(EventId.AUTH_SUCCEEDED, text="ok", listener="submission", client=client, user=user,
                          method="PLAIN")
        else:
            self.log.emit(EventId.AUTH_FAILED, text="failed", listener="submission", client=client, user=user,
                          method="PLAIN", reason="wrong password")

    def relay(self, user: str, client: str, recipients: list[str], sender: str | None = None) -> None:
        for rcpt in recipients:
            self.log.emit(EventId.RECIPIENT_ACCEPTED, text="accepted", listener="submission", client=client,
                          user=user, decision="0badc0de", verdict="relay", route="default",
                          sender=sender or user, recipient=rcpt)
        self.log.emit(EventId.MESSAGE_QUEUED, text="queued", listener="submission", client=client, user=user,
                      message_id="q1", sender=sender or user, recipients=recipients, size=100)

    def close(self) -> None:
        self.log.close()


def history(log: Log, user: str, *, days: int = 10, per_day: int = 5, client: str = "192.0.2.10") -> None:
    """``days`` days of ordinary sending before the window: one login and ``per_day`` recipients a day
    to two partner domains."""
    log.at(NOW - (days + 1.5) * DAY).start()
    for day in range(days, 0, -1):
        log.at(NOW - DAY - day * DAY + 9 * HOUR).login(user, client)
        log.relay(user, client, [f"p{i}@partner{i % 2}.test" for i in range(per_day)])


def run(check, ctx):
    return asyncio.run(check(ctx))


def by_check(findings, name):
    return [f for f in findings if f.check == name]


# ------------------------------------------------------------------------------ bursts


def test_burst_over_a_quiet_history_is_a_failure_with_the_commands(tmp_path):
    log = Log(tmp_path)
    history(log, "alice@example.test")
    history(log, "bob@example.test")
    log.at(NOW - 2 * HOUR).login("alice@example.test", "198.51.100.7")
    for batch in range(3):
        log.relay("alice@example.test", "198.51.100.7",
                  [f"u{batch}.{i}@victim{i % 60}.test" for i in range(100)], sender="promo@spam.test")
    log.at(NOW - HOUR).login("bob@example.test", "192.0.2.10")
    log.relay("bob@example.test", "192.0.2.10", ["p@partner0.test", "q@partner1.test"])
    log.close()
    ctx = make_ctx(tmp_path)

    act = account_activity(ctx)
    alice = act["alice@example.test"]
    assert alice.recent.recipients == 300 and len(alice.recent.domains) == 60
    assert alice.recent.clients == {"198.51.100.7"}
    assert 10 <= alice.baseline.windows <= 12.5
    assert alice.baseline.recipients == pytest.approx(50 / alice.baseline.windows)
    assert set(alice.exceeded(10)) == {"recipients", "domains"}   # one client, as usual
    assert act["bob@example.test"].exceeded(10) == []

    findings = run(check_accounts, ctx)
    bursts = by_check(findings, "accounts.burst")
    assert [f.level for f in bursts] == [Level.FAIL]
    burst = bursts[0]
    assert "alice@example.test" in burst.title
    assert burst.where == "relaywarden.toml:16"          # the [[mailbox]] table of alice
    assert any("300 relayed recipients, 60 external domains" in e for e in burst.evidence)
    data = f" --data-dir {tmp_path}"
    assert burst.fix.startswith(f"relaywarden user suspend-relay alice@example.test{data}; "
                                f"relaywarden user passwd alice@example.test{data}; "
                                f"relaywarden queue hold --user alice@example.test --yes{data}; ")
    assert f"relaywarden queue list --user alice@example.test{data}" in burst.fix
    assert not any("bob" in f.title for f in findings)


def test_steady_large_sender_is_not_a_burst(tmp_path):
    log = Log(tmp_path)
    history(log, "alice@example.test", per_day=300)
    log.at(NOW - HOUR).relay("alice@example.test", "192.0.2.10", [f"r{i}@partner{i % 2}.test" for i in range(310)])
    log.close()
    findings = run(check_accounts, make_ctx(tmp_path))
    assert [f.level for f in findings] == [Level.OK]
    assert any("alice@example.test: 310 recipients" in e for e in findings[0].evidence)


def test_below_min_recipients_is_never_a_burst(tmp_path):
    log = Log(tmp_path)
    history(log, "alice@example.test", per_day=1)
    log.at(NOW - HOUR).relay("alice@example.test", "192.0.2.10", [f"r{i}@d{i}.test" for i in range(150)])
    log.close()
    assert [f.check for f in run(check_accounts, make_ctx(tmp_path))] == ["accounts"]


def test_many_client_addresses_count_as_a_burst(tmp_path):
    log = Log(tmp_path)
    history(log, "alice@example.test", per_day=40)
    for i in range(40):      # the same recipients as usual, but from forty addresses
        client = f"203.0.113.{i + 1}"
        log.at(NOW - 5 * HOUR + i * 60).login("alice@example.test", client)
        log.relay("alice@example.test", client, [f"p{j}@partner{j % 2}.test" for j in range(6)])
    log.close()
    ctx = make_ctx(tmp_path)
    assert account_activity(ctx)["alice@example.test"].exceeded(10) == ["clients"]
    burst = by_check(run(check_accounts, ctx), "accounts.burst")[0]
    assert burst.level is Level.FAIL
    assert any("above 10x the usual: clients" in e for e in burst.evidence)


def test_no_history_in_the_log_is_only_a_warning(tmp_path):
    log = Log(tmp_path)
    log.at(NOW - 3 * HOUR).start()
    log.relay("alice@example.test", "192.0.2.10", [f"r{i}@d{i}.test" for i in range(250)])
    log.close()
    burst = by_check(run(check_accounts, make_ctx(tmp_path)), "accounts.burst")[0]
    assert burst.level is Level.WARN
    assert any("no history" in e for e in burst.evidence)


# ------------------------------------------------------------------------------ logins


def test_login_after_many_failures_from_other_addresses_fails(tmp_path):
    log = Log(tmp_path)
    history(log, "bob@example.test")
    for i in range(25):
        log.at(NOW - 3 * HOUR + i * 30).login("bob@example.test", f"203.0.113.{i % 5 + 1}", ok=False)
    log.at(NOW - 2 * HOUR).login("bob@example.test", "203.0.113.9")
    log.close()
    ctx = make_ctx(tmp_path)
    runs = account_activity(ctx)["bob@example.test"].login_runs
    assert len(runs) == 1 and runs[0].failures == 25 and runs[0].client == "203.0.113.9"
    assert dict(runs[0].failure_clients) == {f"203.0.113.{n}": 5 for n in range(1, 6)}
    finding = by_check(run(check_accounts, ctx), "accounts.guessed-password")[0]
    assert finding.level is Level.FAIL
    assert "after 25 failed logins" in finding.title
    assert finding.fix.startswith("relaywarden user suspend-relay bob@example.test")


def test_stale_password_on_a_known_client_is_a_warning(tmp_path):
    log = Log(tmp_path)
    history(log, "bob@example.test", client="192.0.2.10")
    for i in range(30):
        log.at(NOW - 4 * HOUR + i * 60).login("bob@example.test", "192.0.2.10", ok=False)
    log.at(NOW - 3 * HOUR).login("bob@example.test", "192.0.2.10")
    log.close()
    finding = by_check(run(check_accounts, make_ctx(tmp_path)), "accounts.guessed-password")[0]
    assert finding.level is Level.WARN
    assert any("old password" in e for e in finding.evidence)


def test_failures_reset_by_a_success_or_too_few_are_not_flagged(tmp_path):
    log = Log(tmp_path)
    history(log, "bob@example.test")
    for i in range(15):
        log.at(NOW - 6 * HOUR + i).login("bob@example.test", "203.0.113.1", ok=False)
    log.at(NOW - 5 * HOUR).login("bob@example.test", "192.0.2.10")      # after 15: below 20
    for i in range(15):
        log.at(NOW - 4 * HOUR + i).login("bob@example.test", "203.0.113.1", ok=False)
    log.at(NOW - 3 * HOUR).login("bob@example.test", "192.0.2.10")      # 15 again, not 30
    log.close()
    ctx = make_ctx(tmp_path)
    assert [r.failures for r in account_activity(ctx)["bob@example.test"].login_runs] == [15, 15]
    assert [f.check for f in run(check_accounts, ctx)] == ["accounts"]


def test_failures_older_than_a_window_before_the_success_do_not_count(tmp_path):
    log = Log(tmp_path)
    log.at(NOW - 20 * DAY).start()
    for i in range(30):
        log.at(NOW - 3 * DAY + i).login("bob@example.test", "203.0.113.1", ok=False)
    log.at(NOW - HOUR).login("bob@example.test", "203.0.113.1")
    log.close()
    assert account_activity(make_ctx(tmp_path))["bob@example.test"].login_runs == []


# ------------------------------------------------------------------------------ guest accounts


@pytest.mark.parametrize("address, guest", [
    ("guest@example.test", True), ("test1@example.test", True), ("Admin@example.test", True),
    ("info@example.test", True), ("scanner@example.test", True), ("demo-2@example.test", True),
    ("alice@example.test", False), ("testimonials@example.test", False), ("bob.user@example.test", False),
])
def test_guest_names(address, guest):
    assert is_guest_name(address) is guest


GUESTS = f"""
[[mailbox]]
address = "scanner@example.test"
password_hash = "{HASH}"

[[mailbox]]
address = "guest@example.test"

[[mailbox]]
address = "test@example.test"
password_hash = "{HASH}"
relay = false
"""


def test_guest_account_that_can_log_in_and_relay_is_a_warning(tmp_path):
    text = CONFIG.replace("[[route]]", GUESTS + "\n[[route]]")
    findings = run(check_accounts, make_ctx(tmp_path, text))
    guests = by_check(findings, "accounts.guest")
    # guest@ has no password (cannot log in), test@ has no relay right: only scanner@ is flagged
    assert [f.title for f in guests] == ["guest-like account scanner@example.test can log in and relay"]
    assert guests[0].level is Level.WARN
    header = text.splitlines().index('address = "scanner@example.test"')   # 0-based: the [[mailbox]] above, 1-based
    assert guests[0].where == f"relaywarden.toml:{header}"
    assert guests[0].fix.startswith(f"relaywarden user suspend-relay scanner@example.test --data-dir {tmp_path}")
    # no event log: the activity part says it was skipped, never silently nothing
    assert [f.level for f in by_check(findings, "accounts.activity")] == [Level.SKIP]


def test_guest_account_is_harmless_where_no_listener_relays_for_users(tmp_path):
    text = CONFIG.replace("allow_authenticated = true", "allow_authenticated = false")
    text = text.replace("[[route]]", GUESTS + "\n[[route]]")
    assert by_check(run(check_accounts, make_ctx(tmp_path, text)), "accounts.guest") == []


def test_command_names_the_data_dir_unless_it_is_the_default(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    assert command(ctx, "user", "passwd", "a b@x") == f"relaywarden user passwd 'a b@x' --data-dir {tmp_path}"
    monkeypatch.setenv("RELAYWARDEN_DATA", str(tmp_path))
    assert command(ctx, "user", "passwd", "alice@x") == "relaywarden user passwd alice@x"


def test_user_commands_name_the_configuration_file_the_doctor_read(tmp_path, monkeypatch):
    # `user passwd` refuses an address it does not know: the doctor's advice must let it see the
    # configuration's mailboxes
    monkeypatch.setenv("RELAYWARDEN_DATA", str(tmp_path))
    path = tmp_path / "relaywarden.toml"
    path.write_text(CONFIG)
    ctx = make_ctx(tmp_path)
    ctx.loaded = parse_text(CONFIG, str(path))
    assert command(ctx, "user", "passwd", "alice@x") == f"relaywarden user passwd alice@x --config {path}"
    assert command(ctx, "queue", "list") == "relaywarden queue list"


# ------------------------------------------------------------------------------ the queue


def message(sender: str, to: list[str], *, user: str | None = None, client: str = "192.0.2.10",
            verdict: str = "relay") -> MessageIn:
    return MessageIn(
        sender=sender, data=b"Subject: hi\r\n\r\nbody\r\n", received_at=NOW, listener="submission" if user else "mx",
        recipients=tuple(RecipientIn(address=a, original=f"<{a}>", orcpt=None, notify=(), verdict=verdict,
                                     route="default", decision_id="0badc0de") for a in to),
        client_address=client, client_port=4000, helo="client.test", auth_user=user, tls=None,
        body_type="7BIT", smtputf8=False, dsn_ret=None, dsn_envid=None, session_id="s1")


def fill(tmp_path: Path, messages: list[MessageIn]) -> None:
    queue = SqliteQueue(tmp_path / "queue.sqlite")
    try:
        for m in messages:
            queue.submit(m).result()
    finally:
        queue.close()


def normal_mail(n: int) -> list[MessageIn]:
    users = ["alice@example.test", "bob@example.test", "carol@example.test"]
    return [message(users[i % 3], [f"friend{i}@partner{i % 4}.test"], user=users[i % 3]) for i in range(n)]


def test_queue_without_signs_of_spam_is_ok(tmp_path):
    fill(tmp_path, normal_mail(30))
    findings = run(check_queue_spam, make_ctx(tmp_path))
    assert [(f.check, f.level) for f in findings] == [("queue-spam", Level.OK)]
    assert findings[0].evidence[0] == "30 messages, 30 recipients waiting"


def test_missing_queue_is_skipped_and_empty_queue_is_ok(tmp_path):
    [missing] = run(check_queue_spam, make_ctx(tmp_path))
    assert missing.level is Level.SKIP and str(tmp_path) in missing.evidence[0]
    fill(tmp_path, [])
    [empty] = run(check_queue_spam, make_ctx(tmp_path))
    assert (empty.level, empty.title) == (Level.OK, "the queue is empty")


def test_many_recipient_message_alone_is_a_warning(tmp_path):
    big = message("news@example.test", [f"member{i}@lists.partner.test" for i in range(60)], user="news@example.test")
    fill(tmp_path, [*normal_mail(30), big])
    findings = run(check_queue_spam, make_ctx(tmp_path))
    assert [(f.check, f.level) for f in findings] == [("queue-spam.recipients", Level.WARN)]
    assert "news@example.test" in findings[0].title and "more than 50 recipients" in findings[0].title
    assert "relaywarden queue hold --user news@example.test --yes" in findings[0].fix


def test_anonymous_relay_of_foreign_spam_dominating_the_queue_fails(tmp_path):
    spam = [message(f"offer{i}@cheap-pills.test", [f"x{i}.{j}@victim{(i * 7 + j) % 90}.test" for j in range(70)],
                    client="10.1.2.3") for i in range(30)]
    fill(tmp_path, [*normal_mail(20), *spam])
    ctx = make_ctx(tmp_path)
    findings = run(check_queue_spam, ctx)
    checks = {f.check for f in findings}
    assert checks == {"queue-spam.recipients", "queue-spam.domains", "queue-spam.foreign-sender",
                      "queue-spam.dominant"}
    assert all(f.level is Level.FAIL for f in findings)
    dominant = by_check(findings, "queue-spam.dominant")[0]
    assert dominant.title == "client 10.1.2.3 owns 60% of the queue (more than 50%)"
    assert dominant.where == "relaywarden.toml:1"       # the relay list of listener mx (its table)
    assert f"relaywarden queue hold --client 10.1.2.3 --yes --data-dir {tmp_path}" in dominant.fix
    assert f"relaywarden queue summary --by client --data-dir {tmp_path}" in dominant.fix
    foreign = by_check(findings, "queue-spam.foreign-sender")[0]
    assert foreign.title.startswith("30 relayed message(s) from client 10.1.2.3")


def test_user_dominating_a_large_enough_queue(tmp_path):
    mine = [message("alice@example.test", [f"r{i}@partner0.test"], user="alice@example.test")
            for i in range(DOMINANCE_MIN_MESSAGES)]
    fill(tmp_path, [*mine, *normal_mail(5)])
    findings = run(check_queue_spam, make_ctx(tmp_path))
    assert [(f.check, f.level) for f in findings] == [("queue-spam.dominant", Level.WARN)]
    assert findings[0].title.startswith("user alice@example.test owns 88% of the queue")
    assert "relaywarden user suspend-relay alice@example.test" in findings[0].fix
    # the same share in a tiny queue says nothing
    small = tmp_path / "small"
    small.mkdir()
    fill(small, [*mine[:4], *normal_mail(2)])
    assert [f.check for f in run(check_queue_spam, make_ctx(small))] == ["queue-spam"]


def test_local_and_forwarded_mail_from_outside_is_not_foreign_relay(tmp_path):
    inbound = [message(f"someone{i}@outside.test", ["alice@example.test"], client="203.0.113.5", verdict="local")
               for i in range(10)]
    fill(tmp_path, [*inbound, *normal_mail(30)])
    assert [f.check for f in run(check_queue_spam, make_ctx(tmp_path))] == ["queue-spam"]


def test_activity_counts_the_accounts_queued_mail(tmp_path):
    fill(tmp_path, [*normal_mail(6), dataclasses.replace(normal_mail(1)[0])])
    Log(tmp_path).close()
    act = account_activity(make_ctx(tmp_path))
    assert act["alice@example.test"].queued_messages == 3
    assert act["bob@example.test"].queued_messages == 2
