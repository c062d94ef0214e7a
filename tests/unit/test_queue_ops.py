"""Unit tests of the operator's queue service (relaywarden.queue.ops) and its CLI over a real
SQLite queue: each filter, the qshape summary, show, the bulk operations in batches, bounce with
a real NDR, and every --json output against its schema in docs/schemas/."""

from __future__ import annotations

import dataclasses
import email
import json
import time
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from relaywarden.cli.main import main
from relaywarden.config.loader import load_default
from relaywarden.directory import Directory
from relaywarden.events import read_events
from relaywarden.queue.model import DeliveryResult, MessageIn, RecipientIn
from relaywarden.queue.ops import QueueFilter, QueueOps, parse_duration
from relaywarden.queue.store import SqliteQueue

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"
NOW = 1_700_000_000.0


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def rcpt(address: str, **changes) -> RecipientIn:
    return dataclasses.replace(RecipientIn(address=address, original=f"<{address}>", orcpt=None, notify=(),
                                           verdict="relay", route="default", decision_id="9f3a2c01"), **changes)


def msg(sender: str = "alice@example.test", to: tuple[str, ...] = ("bob@dest.test",), *, age: float = 60.0,
        user: str | None = "alice@example.test", client: str = "192.0.2.10", listener: str = "submission",
        body: bytes = b"Subject: hello\r\nX-Tag: one\r\n\r\nbody text\r\n", **changes) -> MessageIn:
    return dataclasses.replace(MessageIn(
        sender=sender, recipients=tuple(rcpt(a) for a in to), data=body, received_at=NOW - age,
        listener=listener, client_address=client, client_port=4000, helo="client.test", auth_user=user,
        tls=None, body_type="8BITMIME", smtputf8=False, dsn_ret=None, dsn_envid=None, session_id="s1"), **changes)


@pytest.fixture
def queue(tmp_path):
    q = SqliteQueue(tmp_path / "queue.sqlite")
    yield q
    q.close()


@pytest.fixture
def ops(queue):
    return QueueOps(queue, clock=lambda: NOW, batch=3)


def put(queue: SqliteQueue, m: MessageIn) -> str:
    return queue.submit(m).result()


def deferred(queue: SqliteQueue, qid: str, text: str = "greylisted, try later", code: int = 450) -> None:
    for r in queue.recipients(qid):
        queue.record_attempt(qid, r.id, DeliveryResult(code, f"{str(code)[0]}.7.1", "mail.dest.test", "127.0.0.1",
                                                       text, "RCPT", False), next_attempt_at=NOW + 600)


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    assert parse_duration("1.5d") == 129600 and parse_duration("1w") == 604800
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_each_filter_selects_exactly_its_messages(queue, ops):
    a = put(queue, msg(age=30))
    b = put(queue, msg(sender="", to=("carol@other.test",), user=None, client="203.0.113.7", listener="mx", age=7200))
    c = put(queue, msg(sender="Mallory@Example.test", user="mallory@example.test", client="2001:db8::5", age=600))
    d = put(queue, msg(to=("dave@dest.test", "erin@third.test"), age=90000))
    deferred(queue, c, "451 greylisted by policy")
    deferred(queue, d, "mailbox busy", code=452)
    deferred(queue, d, "mailbox busy", code=452)
    queue.set_hold(b, True)

    def sel(**kw) -> list[str]:
        return ops.select(QueueFilter(**kw))

    assert sel() == [a, b, c, d]
    assert sel(states=("hold",)) == [b]
    assert sel(states=("deferred",)) == [c, d]
    assert sel(states=("active",)) == [a]
    assert sel(states=("active", "hold")) == [a, b]
    assert sel(sender="") == [b]
    assert sel(sender="mallory@example.TEST") == [c]
    assert sel(recipient="ERIN@third.test") == [d]
    assert sel(recipient_domain="dest.test") == [a, c, d]
    assert sel(recipient_domain="Third.Test.") == [d]
    assert sel(auth_user="MALLORY@example.test") == [c]
    assert sel(client="203.0.113.7") == [b]
    assert sel(client="192.0.2.0/24") == [a, d]
    assert sel(client="2001:db8::/32") == [c]
    assert sel(listener="mx") == [b]
    assert sel(older_than=3600) == [b, d]
    assert sel(younger_than=3600) == [a, c]
    assert sel(older_than=300, younger_than=86400) == [b, c]
    assert sel(min_attempts=1) == [c, d]
    assert sel(min_attempts=2) == [d]
    assert sel(reply=r"greylist") == [c]
    assert sel(reply=r"^452 4\.7\.1 mail\.dest\.test") == [d]
    assert sel(auth_user="alice@example.test", recipient_domain="third.test") == [d]
    assert sel(ids=(a, d), states=("deferred",)) == [d]
    with pytest.raises(ValueError):
        QueueFilter(client="not-an-address")
    with pytest.raises(ValueError):
        QueueFilter(states=("frozen",))


def test_summary_is_a_qshape_table(queue, ops):
    for _ in range(5):
        put(queue, msg(user="mallory@example.test", to=("x@spam.test", "y@spam.test"), age=120))
    put(queue, msg(age=60 * 30))
    put(queue, msg(to=("bob@dest.test", "z@spam.test"), age=60 * 2000))
    by_domain = ops.summary(QueueFilter())
    assert by_domain.unit == "recipients" and by_domain.labels[0] == "5" and by_domain.labels[-1] == "1280+"
    assert [(r.key, r.total) for r in by_domain.rows] == [("spam.test", 11), ("dest.test", 2)]
    spam = by_domain.rows[0]
    assert spam.counts[0] == 10 and spam.counts[-1] == 1 and sum(spam.counts) == 11
    assert by_domain.total.total == 13
    by_user = ops.summary(QueueFilter(), by="user", top=1)
    assert by_user.unit == "messages"
    assert [(r.key, r.total) for r in by_user.rows] == [("mallory@example.test", 5)] and by_user.omitted == 1
    custom = ops.summary(QueueFilter(), by="sender", buckets=(60,))
    assert custom.labels == ["60", "60+"] and custom.total.counts == (6, 1)
    jsonschema.validate(by_domain.as_dict(), schema("queue-summary.json"))


def test_show_has_envelope_results_headers_and_body_on_request(queue, ops):
    qid = put(queue, msg())
    deferred(queue, qid, "greylisted")
    view = ops.show(qid[:10])
    data = view.as_dict()
    jsonschema.validate(data, schema("queue-show.json"))
    assert data["id"] == qid and data["state"] == "deferred" and "body" not in data
    assert {"name": "X-Tag", "value": "one"} in data["headers"]
    [r] = data["recipients"]
    assert r["last_result"]["remote_text"] == "greylisted" and r["last_result"]["reply_code"] == 450
    assert r["attempts"] == 1 and r["next_attempt_at"].endswith("Z")
    assert ops.show(qid, body=True).as_dict()["body"] == "body text\r\n"
    with pytest.raises(KeyError):
        ops.show("ffffffffffff")


def test_an_ambiguous_prefix_is_refused(queue, ops):
    a, b = put(queue, msg()), put(queue, msg())
    common = next(i for i in range(24) if a[i] != b[i])
    with pytest.raises(KeyError, match="more than one"):
        ops.resolve(a[:common])
    assert ops.resolve(a) == a


def test_bulk_hold_release_delete_retry_in_batches(queue, ops):
    ids = [put(queue, msg(age=10 + i)) for i in range(8)]
    for qid in ids[:4]:
        deferred(queue, qid)
    steps: list[int] = []
    held = ops.hold(ids, progress=steps.append)
    assert steps == [3, 3, 2] and held.changed == 8
    assert queue.due(NOW + 10_000, 100) == []
    assert ops.hold(ids).changed == 0        # already held: nothing changes
    released = ops.release(ids[:5])
    assert released.changed == 5 and ops.select(QueueFilter(states=("hold",))) == ids[5:]
    retried = ops.retry(ids[:4])
    assert (retried.changed, retried.recipients) == (4, 4)
    assert {q for q, _ in queue.due(NOW, 100)} == set(ids[:5])
    deleted = ops.delete(ids[6:] + ["0" * 24])
    assert (deleted.selected, deleted.changed) == (3, 2) and queue.count() == 6
    assert deleted.ids == ids[6:] and deleted.skipped == ["0" * 24]
    for result in (held, released, retried, deleted):
        jsonschema.validate(result.as_dict(), schema("queue-bulk.json"))


def test_bounce_replaces_the_message_with_a_proper_ndr(queue, ops, tmp_path):
    loaded = load_default()
    directory = Directory.build(loaded)
    qid = put(queue, msg(sender="bob@remote.test", to=("one@dest.test", "two@dest.test")))
    deferred(queue, qid, "mailbox busy")
    silent = put(queue, msg(sender=""))
    events: list[tuple] = []
    result = ops.bounce([qid, silent], loaded=loaded, directory=directory, hostname="mx.example.test",
                        emit=lambda *a, **k: events.append((a, k)))
    assert result.changed == 2 and result.recipients == 3 and result.notices[silent] is None
    ndr_id = result.notices[qid]
    assert queue.get(qid) is None and queue.get(silent) is None
    ndr = queue.get(ndr_id)
    assert ndr.sender == "" and [r.address for r in ndr.recipients] == ["bob@remote.test"]
    assert ndr.recipients[0].verdict == "relay"
    report = email.message_from_bytes(queue.message_data(ndr_id))
    assert report.get_content_type() == "multipart/report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status").as_string()
    assert "Final-Recipient: rfc822; one@dest.test" in status and "Final-Recipient: rfc822; two@dest.test" in status
    assert "Action: failed" in status and "Status: 5.0.0" in status
    human = next(p for p in report.walk() if p.get_content_type() == "text/plain").get_payload(decode=True)
    assert "Returned to the sender by the mail administrator of mx.example.test" in " ".join(human.decode().split())
    assert [k["recipient"] for _, k in events] == ["one@dest.test", "two@dest.test"]
    assert all(a[0] == 4001 and k["ndr"] == ndr_id for a, k in events)
    jsonschema.validate(result.as_dict(), schema("queue-bulk.json"))
    # `ndr explain` reads our own NDR back as what it is (its DSN part carries no command)
    from relaywarden.cli.ndr_cmd import explain_recipient
    from relaywarden.dsn.causes import RETURNED_BY_ADMIN
    from relaywarden.dsn.parse import read_bounce

    read = read_bounce(queue.message_data(ndr_id))
    assert [r.address for r in read.recipients] == ["one@dest.test", "two@dest.test"]
    assert {explain_recipient(r).key for r in read.recipients} == {RETURNED_BY_ADMIN.key}


def test_bounce_skips_a_message_that_changed_meanwhile(queue):
    qid = put(queue, msg(to=("one@dest.test", "two@dest.test")))
    [first, second] = queue.recipients(qid)
    # read with both recipients waiting; then the runner delivers one before the bounce lands
    queue.record_attempt(qid, first.id, DeliveryResult(250, "2.0.0", "h", None, "ok", "DATA", False),
                         next_attempt_at=None)
    assert queue.replace_many([(qid, (first.id, second.id), None)]) == [None]
    assert queue.get(qid) is not None
    assert queue.replace_many([(qid, (second.id,), None)]) == [""]
    assert queue.get(qid) is None


# ---------------------------------------------------------------------------------- the CLI


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    q = SqliteQueue(d / "queue.sqlite")
    six_minutes_ago = time.time() - 360
    ids = [q.submit(msg(user="mallory@example.test", to=("x@spam.test",), received_at=six_minutes_ago)).result()
           for _ in range(120)]
    ids.append(q.submit(msg(sender="alice@example.test", to=("bob@dest.test",))).result())
    q.close()
    return d, ids


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_cli_json_outputs_match_their_schemas(data_dir):
    d, ids = data_dir
    r = cli("queue", "list", "--data-dir", str(d), "--json", "--limit", "5")
    listed = json.loads(r.output)
    jsonschema.validate(listed, schema("queue-list.json"))
    assert listed["count"] == 5 and listed["truncated"] and listed["messages"][0]["id"] == ids[0]
    r = cli("queue", "summary", "--by", "user", "--data-dir", str(d), "--json")
    shape = json.loads(r.output)
    jsonschema.validate(shape, schema("queue-summary.json"))
    assert shape["rows"][0] == {"key": "mallory@example.test", "total": 120, "counts": [0, 120] + [0] * 8}
    r = cli("queue", "show", ids[-1], "--body", "--data-dir", str(d), "--json")
    jsonschema.validate(json.loads(r.output), schema("queue-show.json"))


def test_cli_bulk_asks_before_changing_many_and_needs_a_selection(data_dir):
    d, ids = data_dir
    r = CliRunner().invoke(main, ["queue", "delete", "--data-dir", str(d)])
    assert r.exit_code == 2 and "--all" in r.output
    r = CliRunner().invoke(main, ["queue", "hold", "--user", "mallory@example.test", "--data-dir", str(d)], input="n\n")
    assert r.exit_code == 1 and "hold 120 messages?" in r.output
    r = cli("queue", "hold", "--user", "mallory@example.test", "--data-dir", str(d), input="y\n")
    assert "120 of 120 messages held" in r.output
    r = cli("queue", "release", ids[0][:14], "--data-dir", str(d), "--json")
    assert json.loads(r.output)["changed"] == 1
    r = cli("queue", "delete", "--state", "hold", "--yes", "--data-dir", str(d), "--json")
    out = json.loads(r.output)
    jsonschema.validate(out, schema("queue-bulk.json"))
    assert out["changed"] == 119
    r = cli("queue", "list", "--data-dir", str(d), "--json")
    assert [m["id"] for m in json.loads(r.output)["messages"]] == [ids[0], ids[-1]]


CONFIG = """
[server]
hostname = "mx.example.test"

[[listener]]
name = "mx"
address = "127.0.0.1"
port = 2525
tls = "none"

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"
"""


def test_cli_bounce_logs_4001_and_queues_the_ndr(data_dir, tmp_path):
    d, ids = data_dir
    config = tmp_path / "relaywarden.toml"
    config.write_text(CONFIG)
    r = cli("queue", "bounce", ids[-1], "--config", str(config), "--data-dir", str(d), "--json")
    out = json.loads(r.output)
    assert out["changed"] == 1 and out["notices"][ids[-1]]
    [event] = list(read_events(d / "log", ids=[4001]))
    assert event["message_id"] == ids[-1] and event["fields"]["ndr"] == out["notices"][ids[-1]]
    q = SqliteQueue(d / "queue.sqlite")
    try:
        ndr = q.get(out["notices"][ids[-1]])
        # alice@example.test is a mailbox of the configuration: the NDR is delivered locally
        assert ndr.recipients[0].verdict == "local" and ndr.recipients[0].address == "alice@example.test"
    finally:
        q.close()


def test_cli_without_a_queue_says_where_it_looked(tmp_path):
    r = CliRunner().invoke(main, ["queue", "list", "--data-dir", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no queue at" in r.output


def test_operator_changes_are_logged_as_queue_changed_events(tmp_path):
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        ids = [q.submit(msg(sender=f"s{i}@example.org")).result() for i in range(3)]
    runner = CliRunner()
    r = runner.invoke(main, ["queue", "hold", "--sender", "s1@example.org", "--yes", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["queue", "delete", ids[2], "--yes", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    events = [e for e in read_events(tmp_path / "log") if e["name"] == "QUEUE_CHANGED"]
    assert [(e["fields"]["operation"], e["fields"]["changed"]) for e in events] == [("hold", 1), ("delete", 1)]
    assert events[0]["fields"]["ids"] == [ids[1]] and "sender" in events[0]["fields"]["filters"]
    assert events[0]["severity"] == "warning"


def test_delete_reports_a_message_being_delivered_as_skipped(queue, ops):
    leased, free = put(queue, msg()), put(queue, msg())
    now = time.time()
    assert queue.lease_later(leased, now + 60, now).result()
    result = ops.delete([leased, free])
    assert (result.changed, result.ids, result.skipped) == (1, [free], [leased])
    assert queue.get(leased) is not None and queue.get(free) is None
