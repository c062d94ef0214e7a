"""Operator tools against a running server: thousands of messages queued through SMTP and kept
deferred by Postfix's smtp-sink answering 4xx, then summarised, held, shown, retried, released,
bounced and deleted with the real command line, checking the queue and what is delivered
afterwards; and docs/operations.md's walkthrough executed block by block."""

from __future__ import annotations

import email
import json
import os
import re
import smtplib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from relaywarden.queue.ops import QueueFilter, QueueOps
from tests.support import sink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              pytest.mark.skipif(not sink.available(), reason="smtp-sink needed (scripts/install-peers)")]

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "docs" / "schemas"

CONFIG = """
[server]
hostname = "mx.example.test"
auth_failure_delay = 0.0

[[listener]]
name = "submission"
address = "127.0.0.1"
port = {port:submission}
tls = "none"
anonymous = false
auth = ["PLAIN"]
auth_plaintext = true
allow_authenticated = true

[[domain]]
name = "example.test"

[[mailbox]]
address = "alice@example.test"

[[mailbox]]
address = "mallory@example.test"

[[route]]
name = "slow"
domains = ["flood.test", "slow.test"]
kind = "smarthost"
hosts = ["127.0.0.1:SLOWPORT"]
tls = "none"

[[route]]
name = "internet"
domains = ["*"]
kind = "smarthost"
hosts = ["127.0.0.1:OKPORT"]
tls = "none"

[delivery]
min_backoff = 3600.0
max_backoff = 7200.0
poll_interval = 0.2
delay_warning = 86400.0
"""

USERS = {"alice@example.test": "alice-pw", "mallory@example.test": "mallory-pw"}


@pytest.fixture
def world(tmp_path, start_server):
    """A server whose route "slow" ends at a sink answering 4xx to RCPT (mail stays deferred)
    and whose default route ends at an accepting sink."""
    slow = sink.SmtpSink(tmp_path, "-r", "RCPT").start()
    ok = sink.SmtpSink(tmp_path).start()
    config = CONFIG.replace("SLOWPORT", str(slow.port)).replace("OKPORT", str(ok.port))
    srv = start_server(config, users=USERS)
    state = {"slow": slow, "ok": ok, "srv": srv}
    yield state
    state["slow"].stop()
    state["ok"].stop()


def send(srv, user: str, messages: list[tuple[str, str]], connections: int = 4) -> None:
    """Submit (recipient, subject) pairs as ``user`` over a few parallel SMTP sessions."""
    def session(part: list[tuple[str, str]]) -> None:
        with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=30) as s:
            s.login(user, USERS[user])
            for to, subject in part:
                s.sendmail(user, [to], f"From: <{user}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nbody\r\n")
    parts = [messages[i::connections] for i in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(session, [p for p in parts if p]))


def rw(srv, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "relaywarden", *args, "--data-dir", str(srv.data_dir)],
                       text=True, capture_output=True, timeout=120)
    if check:
        assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r


def rw_json(srv, schema: str, *args: str) -> dict:
    data = json.loads(rw(srv, *args, "--json").stdout)
    jsonschema.validate(data, json.loads((SCHEMAS / schema).read_text()))
    return data


def wait(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def count(srv, **criteria) -> int:
    with QueueOps.open(srv.data_dir) as ops:
        return ops.count(QueueFilter(**criteria))


def subjects(peer: sink.SmtpSink) -> list[str]:
    return [email.message_from_bytes(m)["Subject"] for m in peer.messages()]


def maildir(srv, mailbox: str) -> list[email.message.Message]:
    local, _, domain = mailbox.partition("@")
    new = srv.data_dir / "mail" / domain / local / "new"
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(new.iterdir())] if new.exists() else []


def test_thousands_deferred_then_held_retried_released_bounced_and_deleted(world):
    srv, slow = world["srv"], world["slow"]
    send(srv, "mallory@example.test", [(f"victim{i}@flood.test", f"flood {i}") for i in range(1800)])
    send(srv, "alice@example.test", [(f"friend{i % 2}@slow.test", f"alice {i}") for i in range(200)])
    # every message tried once and deferred by the 4xx sink
    wait(lambda: count(srv, states=("deferred",), min_attempts=1) == 2000, 120, "2000 deferred messages")
    assert count(srv) == 2000

    shape = rw_json(srv, "queue-summary.json", "queue", "summary", "--by", "user")
    assert [(r["key"], r["total"]) for r in shape["rows"]] == [("mallory@example.test", 1800), ("alice@example.test", 200)]
    assert shape["rows"][0]["counts"][0] + shape["rows"][0]["counts"][1] == 1800     # all younger than 10 minutes
    by_domain = rw_json(srv, "queue-summary.json", "queue", "summary")
    assert by_domain["rows"][0] == {"key": "flood.test", "total": 1800, "counts": by_domain["rows"][0]["counts"]}
    deferred = rw_json(srv, "queue-list.json", "queue", "list", "--reply", r"^4\d\d ", "--limit", "5000")
    assert deferred["count"] == 2000 and not deferred["truncated"]

    # hold the flood: a progress bar over four batches, and the queue says so at once
    r = rw(srv, "queue", "hold", "--user", "mallory@example.test", "--yes")
    assert "1800 of 1800 messages held" in r.stdout
    assert count(srv, states=("hold",)) == 1800 and count(srv, states=("hold",), auth_user="alice@example.test") == 0

    [one] = rw_json(srv, "queue-list.json", "queue", "list", "--user", "mallory@example.test", "--limit", "1")["messages"]
    shown = rw_json(srv, "queue-show.json", "queue", "show", one["id"][:20])
    assert shown["state"] == "hold" and shown["auth_user"] == "mallory@example.test"
    [r0] = shown["recipients"]
    assert r0["state"] == "deferred" and r0["attempts"] == 1 and r0["last_result"]["reply_code"] // 100 == 4
    assert r0["last_result"]["remote_host"] and r0["last_result"]["command"] == "RCPT"
    assert any(h["name"] == "Subject" and h["value"].startswith("flood") for h in shown["headers"])
    assert rw(srv, "queue", "show", one["id"], "--body").stdout.rstrip().endswith("body")

    # the slow destination is fixed: an accepting sink on the same port
    port = slow.port
    slow.stop()
    world["slow"] = slow = sink.SmtpSink(slow.dir.parent, port=port).start()

    # bounce half of alice's mail: 100 NDRs delivered to her own mailbox by the running server;
    # without --config the command takes the configuration the server noted at its start
    assert (srv.data_dir / "serve.config").read_text().strip() == str(srv.config_path.resolve())
    bounced = rw_json(srv, "queue-bulk.json", "queue", "bounce", "--recipient", "friend1@slow.test", "--yes")
    assert bounced["changed"] == 100 and all(bounced["notices"].values())
    ndrs = wait(lambda: (lambda m: m if len(m) >= 100 else None)(maildir(srv, "alice@example.test")), 60, "100 NDRs")
    assert {m.get_content_type() for m in ndrs} == {"multipart/report"}
    assert all("friend1@slow.test" in m.as_string() for m in ndrs)

    # retry the rest of alice's mail now instead of in an hour: delivered; held mail stays put
    retried = rw_json(srv, "queue-bulk.json", "queue", "retry", "--user", "alice@example.test", "--yes")
    assert retried["changed"] == 100 and retried["recipients"] == 100
    wait(lambda: len(slow.messages()) >= 100, 60, "alice's 100 messages at the sink")
    wait(lambda: count(srv, auth_user="alice@example.test") == 0, 30, "alice's mail to leave the queue")

    # release five of the flood by id, make them due: exactly those five are delivered
    five = [m["id"] for m in rw_json(srv, "queue-list.json", "queue", "list", "--state", "hold", "--limit", "5")["messages"]]
    rw(srv, "queue", "release", *five)
    rw(srv, "queue", "retry", *five)
    wait(lambda: len(slow.messages()) >= 105, 60, "five released messages at the sink")
    time.sleep(1.0)          # nothing else may follow
    got = subjects(slow)
    assert len(got) == 105 and sum(1 for s in got if s.startswith("flood")) == 5
    assert count(srv, states=("hold",)) == 1795

    # delete the rest of the flood; the queue is empty, nobody was told
    deleted = rw_json(srv, "queue-bulk.json", "queue", "delete", "--user", "mallory@example.test", "--state", "hold",
                      "--yes")
    assert deleted["changed"] == 1795
    wait(lambda: count(srv) == 0, 30, "an empty queue")
    time.sleep(1.0)
    assert len(slow.messages()) == 105
    ndr_events = [e for e in srv.events() if e["id"] == 4001]
    assert len(ndr_events) == 100 and {e["fields"]["recipient"] for e in ndr_events} == {"friend1@slow.test"}


def test_events_query_and_follow(world):
    srv = world["srv"]
    send(srv, "alice@example.test", [("friend@slow.test", "hello")], connections=1)
    srv.wait_for_event(lambda e: e["name"] == "DEFERRED")
    event_schema = json.loads((SCHEMAS / "event.json").read_text())
    r = rw(srv, "events", "--user", "alice@example.test", "--id", "AUTH_SUCCEEDED,1721", "--json")
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert {e["id"] for e in records} == {1708, 1721}
    for e in records:
        jsonschema.validate(e, event_schema)
    r = rw(srv, "events", "--recipient", "FRIEND@slow.test", "--since", "10m", "--json")
    assert {json.loads(x)["name"] for x in r.stdout.splitlines()} >= {"RECIPIENT_ACCEPTED", "MESSAGE_QUEUED", "DEFERRED"}
    assert rw(srv, "events", "--client", "10.0.0.0/8").stdout == ""
    assert rw(srv, "events", "--since", "2h", "--until", "1h").stdout == ""
    # --follow prints what is logged after it starts, and --limit ends it
    follow = subprocess.Popen([sys.executable, "-m", "relaywarden", "events", "--follow", "--for", "60s", "--limit", "1",
                               "--id", "MESSAGE_QUEUED", "--json", "--data-dir", str(srv.data_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        send(srv, "alice@example.test", [("later@slow.test", "later")], connections=1)
        out, _ = follow.communicate(timeout=30)
    finally:
        follow.kill()
    [record] = [json.loads(x) for x in out.splitlines()]
    assert record["name"] == "MESSAGE_QUEUED" and "later@slow.test" in json.dumps(record["fields"])


def test_operations_walkthrough_runs_as_documented(world):
    srv = world["srv"]
    send(srv, "mallory@example.test", [(f"victim{i}@flood.test", f"flood {i}") for i in range(1000)])
    send(srv, "alice@example.test", [(f"friend{i}@slow.test", f"alice {i}") for i in range(20)], connections=1)
    wait(lambda: count(srv, min_attempts=1) == 1020, 120, "1020 deferred messages")
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "docs" / "operations.md").read_text(), re.S)
    assert len(blocks) == 5
    env = {**os.environ, "RELAYWARDEN_DATA": str(srv.data_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for number, block in enumerate(blocks, start=1):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env, text=True, capture_output=True,
                           timeout=120)
        assert r.returncode == 0, f"block {number}:\n{block}\n{r.stdout}\n{r.stderr}"
        outputs.append(r.stdout)
        if number == 3:
            # between the blocks the flood is held, and other mail keeps flowing
            send(srv, "alice@example.test", [("bob@dest.test", "still flowing")], connections=1)
            wait(lambda: "still flowing" in subjects(world["ok"]), 30, "alice's mail to be delivered")
    summary, logins, held, shown, after = outputs
    assert re.search(r"mallory@example\.test\s.*1000", summary) and "alice@example.test" in summary
    assert "AUTH_SUCCEEDED" in logins and "mallory@example.test" in logins
    assert "1000 of 1000 messages held" in held and re.search(r"mallory@example\.test\s.*1000", held)
    assert "mallory@example.test" in shown and "Subject: flood" in shown and "deferred" in shown
    assert "mallory" not in after.split("queue by user")[-1] and "alice@example.test" in after
    assert count(srv, auth_user="mallory@example.test") == 0 and count(srv, auth_user="alice@example.test") == 20
    # the suspended account can no longer relay; the refusal says why
    with smtplib.SMTP("127.0.0.1", srv.ports["submission"], timeout=10) as s:
        s.login("mallory@example.test", USERS["mallory@example.test"])
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail("mallory@example.test", ["again@flood.test"], "Subject: x\r\n\r\nx\r\n")
    code, text = refused.value.recipients["again@flood.test"]
    assert code == 550 and b"[decision " in text
