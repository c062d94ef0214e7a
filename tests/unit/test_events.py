"""Tests for the event catalog, the event log writer and reader, and the docs page."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relaywarden.events import (
    CATALOG,
    ID_RANGES,
    LOG_FILE_NAME,
    EventId,
    EventLog,
    Severity,
    log_files,
    read_events,
    render_catalog_markdown,
    session_summary_text,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_KEYS = {"time", "id", "name", "severity", "listener", "client", "user", "session",
               "message_id", "text", "fields"}


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


class FixedClock:
    """A settable clock for EventLog, so records get known times."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


# --- the catalog ------------------------------------------------------------------------------


def test_every_event_id_has_exactly_one_catalog_entry() -> None:
    assert set(CATALOG) == set(EventId)
    assert len(CATALOG) == len(EventId)
    for event, definition in CATALOG.items():
        assert definition.id is event


def test_event_ids_are_unique() -> None:
    values = [member.value for member in EventId.__members__.values()]
    assert len(values) == len(set(values)), "an alias hides a duplicate event number"


@pytest.mark.parametrize(("event", "number"), [
    (EventId.WRONG_LISTENER, 1701),
    (EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED, 1707),
    (EventId.AUTH_SUCCEEDED, 1708),
    (EventId.RELAY_DENIED, 1709),
    (EventId.RELAY_DENIED_AUTHENTICATED, 1710),
    (EventId.NDR_GENERATED, 4001),
    (EventId.REMOTE_ERROR, 7004),
])
def test_kb_895853_ids_keep_their_numbers(event: EventId, number: int) -> None:
    assert int(event) == number


def test_every_id_is_in_a_documented_range() -> None:
    for event in EventId:
        assert any(low <= event <= high for low, high, _ in ID_RANGES), event.name
    assert all(low <= high for low, high, _ in ID_RANGES)


def test_catalog_entries_explain_cause_and_fix_in_sentences() -> None:
    titles = set()
    for definition in CATALOG.values():
        assert definition.title and definition.title not in titles
        titles.add(definition.title)
        assert isinstance(definition.severity, Severity)
        assert definition.explanation.endswith(".")
        assert definition.explanation.count(". ") >= 1, definition.id.name  # two sentences
        assert len(definition.fields) == len(set(definition.fields))


def test_severities_match_what_an_admin_must_see() -> None:
    assert CATALOG[EventId.OPEN_RELAY_ALLOWED].severity is Severity.WARNING
    assert CATALOG[EventId.RELAY_DENIED].severity is Severity.WARNING
    assert CATALOG[EventId.QUEUE_ERROR].severity is Severity.ERROR
    assert CATALOG[EventId.AUTH_SUCCEEDED].severity is Severity.INFO
    assert CATALOG[EventId.SESSION_SUMMARY].severity is Severity.INFO


def test_decision_events_name_their_inputs() -> None:
    accepted = CATALOG[EventId.RECIPIENT_ACCEPTED].fields
    for name in ("proxy_client", "tls", "mail_from", "rcpt_to", "decision", "rule"):
        assert name in accepted
    assert "domain" in CATALOG[EventId.RECIPIENT_DOMAIN_NOT_ACCEPTED].fields
    assert "method" in CATALOG[EventId.AUTH_SUCCEEDED].fields


# --- emitting ---------------------------------------------------------------------------------


def test_emit_writes_one_json_line_with_the_documented_keys(tmp_path: Path) -> None:
    clock = FixedClock(datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC))
    log = EventLog(tmp_path, clock=clock)
    record = log.emit(EventId.RELAY_DENIED, text="relay denied: example.org is not ours",
                      listener="mx", client="203.0.113.9", user="alice", session="s1",
                      message_id="q1", rcpt_to="bob@example.org", reply="550 5.7.1 Relay denied")
    log.close()
    [written] = lines_of(tmp_path / LOG_FILE_NAME)
    assert written == record
    assert set(written) == RECORD_KEYS
    assert written["time"] == "2024-05-01T12:00:00.123Z"
    assert written["id"] == 1709
    assert written["name"] == "RELAY_DENIED"
    assert written["severity"] == "warning"
    assert written["listener"] == "mx" and written["client"] == "203.0.113.9"
    assert written["text"] == "relay denied: example.org is not ours"
    assert written["fields"] == {"rcpt_to": "bob@example.org", "reply": "550 5.7.1 Relay denied"}


def test_emit_omits_keys_that_are_none(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        record = log.emit(EventId.SERVER_STARTED, text="started", client=None, pid=42)
    assert set(record) == {"time", "id", "name", "severity", "text", "fields"}
    assert lines_of(tmp_path / LOG_FILE_NAME) == [record]


def test_emit_stringifies_values_json_cannot_hold(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("boom")

    from ipaddress import ip_address
    cyclic: list = []
    cyclic.append(cyclic)
    with EventLog(tmp_path) as log:
        record = log.emit(EventId.CONFIG_WARNING, text="check", client=ip_address("::1"),
                          path=Path("/etc/relaywarden.toml"), nan=float("nan"),
                          when=datetime(2024, 1, 1, tzinfo=UTC), odd=Unprintable(),
                          keys={(1, 2): b"x"}, cyclic=cyclic, tags={"a"})
    [written] = lines_of(tmp_path / LOG_FILE_NAME)
    assert written == record
    assert written["client"] == "::1"
    fields = written["fields"]
    assert fields["path"] == "/etc/relaywarden.toml"
    assert fields["nan"] == "nan"
    assert fields["when"].startswith("2024-01-01")
    assert fields["odd"] == "<unprintable Unprintable>"
    assert fields["keys"] == {"(1, 2)": "b'x'"}
    assert fields["tags"] == ["a"]
    assert isinstance(fields["cyclic"], list)


def test_field_named_like_the_event_argument_is_kept(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        record = log.emit(EventId.PROTOCOL_ERROR, text="x", event="y", command="FOO")
    assert record["fields"] == {"event": "y", "command": "FOO"}


def test_unicode_text_round_trips(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.emit(EventId.RECIPIENT_UNKNOWN, text="unknown: jörg@bücher.example\nsecond line",
                 rcpt_to="jörg@bücher.example")
    [written] = lines_of(tmp_path / LOG_FILE_NAME)
    assert written["text"] == "unknown: jörg@bücher.example\nsecond line"


def test_echo_receives_each_record(tmp_path: Path) -> None:
    seen: list[dict] = []
    with EventLog(tmp_path, echo=seen.append) as log:
        first = log.emit(EventId.LISTENER_STARTED, text="listening", listener="mx", port=25)
        second = log.emit(EventId.OPEN_RELAY_ALLOWED, text="open relay", listener="devices")
    assert seen == [first, second]


# --- buffering and flushing -------------------------------------------------------------------


def test_info_is_buffered_until_flush(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_interval=3600)
    log.emit(EventId.SESSION_SUMMARY, text="summary")
    path = tmp_path / LOG_FILE_NAME
    assert not path.exists() or path.read_bytes() == b""
    log.flush()
    assert len(lines_of(path)) == 1
    log.close()


def test_warning_reaches_the_file_at_once_with_earlier_info(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_interval=3600)
    log.emit(EventId.RECIPIENT_ACCEPTED, text="accepted")
    log.emit(EventId.RELAY_DENIED, text="denied")
    names = [r["name"] for r in lines_of(tmp_path / LOG_FILE_NAME)]
    assert names == ["RECIPIENT_ACCEPTED", "RELAY_DENIED"]
    log.emit(EventId.QUEUE_ERROR, text="disk full")
    assert len(lines_of(tmp_path / LOG_FILE_NAME)) == 3
    log.close()


def test_maybe_flush_writes_only_after_the_interval(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_interval=0.2)
    log.flush()
    log.emit(EventId.DELIVERED, text="delivered")
    assert log.maybe_flush() is False
    path = tmp_path / LOG_FILE_NAME
    assert not path.exists() or path.read_bytes() == b""
    time.sleep(0.25)
    assert log.maybe_flush() is True
    assert len(lines_of(path)) == 1
    assert log.maybe_flush() is False  # nothing buffered
    log.close()


def test_emit_flushes_when_the_interval_has_passed(tmp_path: Path) -> None:
    log = EventLog(tmp_path, flush_interval=0.1)
    log.flush()
    log.emit(EventId.DELIVERED, text="one")
    time.sleep(0.15)
    log.emit(EventId.DELIVERED, text="two")
    assert [r["text"] for r in lines_of(tmp_path / LOG_FILE_NAME)] == ["one", "two"]
    log.close()


def test_emit_after_close_is_not_lost(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.emit(EventId.SERVER_STOPPED, text="stopping")
    log.close()
    log.close()
    log.emit(EventId.SERVER_STOPPED, text="late")
    log.close()
    assert [r["text"] for r in read_events(tmp_path)] == ["stopping", "late"]


def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.emit(EventId.SERVER_STARTED, text="first run")
    with EventLog(tmp_path) as log:
        log.emit(EventId.SERVER_STARTED, text="second run")
    assert [r["text"] for r in read_events(tmp_path)] == ["first run", "second run"]


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_keeps_at_most_backups_and_reads_in_order(tmp_path: Path) -> None:
    with EventLog(tmp_path, max_bytes=600, backups=3, flush_interval=3600) as log:
        for number in range(100):
            log.emit(EventId.MESSAGE_QUEUED, text=f"message {number}", number=number)
    files = log_files(tmp_path)
    names = sorted(path.name for path in files)
    assert names == [LOG_FILE_NAME, f"{LOG_FILE_NAME}.1", f"{LOG_FILE_NAME}.2",
                     f"{LOG_FILE_NAME}.3"]
    for path in files:
        assert path.stat().st_size <= 600
    numbers = [r["fields"]["number"] for r in read_events(tmp_path)]
    assert numbers == list(range(numbers[0], 100)), "records out of order or missing"
    assert numbers[0] > 0, "the oldest records should have been dropped"
    newest_backup = lines_of(tmp_path / f"{LOG_FILE_NAME}.1")
    current = lines_of(tmp_path / LOG_FILE_NAME)
    assert newest_backup[-1]["fields"]["number"] + 1 == current[0]["fields"]["number"]


def test_rotation_with_no_backups_keeps_only_the_current_file(tmp_path: Path) -> None:
    with EventLog(tmp_path, max_bytes=400, backups=0) as log:
        for number in range(30):
            log.emit(EventId.MESSAGE_QUEUED, text=f"message {number}", number=number)
    assert [p.name for p in log_files(tmp_path)] == [LOG_FILE_NAME]
    numbers = [r["fields"]["number"] for r in read_events(tmp_path)]
    assert numbers[-1] == 29 and numbers == sorted(numbers)


def test_record_larger_than_max_bytes_is_still_written(tmp_path: Path) -> None:
    with EventLog(tmp_path, max_bytes=100, backups=2) as log:
        log.emit(EventId.PROTOCOL_ERROR, text="x" * 500)
        log.emit(EventId.PROTOCOL_ERROR, text="y" * 500)
    assert [r["text"][0] for r in read_events(tmp_path)] == ["x", "y"]


# --- reading ----------------------------------------------------------------------------------


def test_torn_last_line_is_skipped_and_the_next_record_stays_readable(tmp_path: Path) -> None:
    with EventLog(tmp_path) as log:
        log.emit(EventId.SERVER_STARTED, text="before crash")
    path = tmp_path / LOG_FILE_NAME
    with open(path, "ab") as handle:
        handle.write(b'{"time":"2024-05-01T12:00:00.000Z","id":1709,"na')
    assert [r["text"] for r in read_events(tmp_path)] == ["before crash"]
    with EventLog(tmp_path) as log:
        log.emit(EventId.SERVER_STARTED, text="after restart")
    assert [r["text"] for r in read_events(tmp_path)] == ["before crash", "after restart"]


def test_read_events_of_an_empty_directory(tmp_path: Path) -> None:
    assert list(read_events(tmp_path)) == []


def test_read_events_ignores_unrelated_files(tmp_path: Path) -> None:
    (tmp_path / f"{LOG_FILE_NAME}.bak").write_text('{"id": 1}\n')
    with EventLog(tmp_path) as log:
        log.emit(EventId.SERVER_STARTED, text="real")
    assert [r["text"] for r in read_events(tmp_path)] == ["real"]


@pytest.fixture()
def populated(tmp_path: Path) -> Path:
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    clock = FixedClock(start)
    with EventLog(tmp_path, clock=clock, max_bytes=700, backups=20) as log:
        clock.now = start
        log.emit(EventId.AUTH_SUCCEEDED, text="auth", client="198.51.100.7", user="alice",
                 listener="submission", method="PLAIN")
        clock.now = start + timedelta(minutes=1)
        log.emit(EventId.RELAY_DENIED, text="denied", client="203.0.113.9", listener="mx",
                 rcpt_to="x@example.org", domain="example.org")
        clock.now = start + timedelta(minutes=2)
        log.emit(EventId.AUTH_SUCCEEDED, text="auth", client="203.0.113.50", user="bob",
                 listener="submission", method="LOGIN")
        clock.now = start + timedelta(minutes=3)
        log.emit(EventId.LISTENER_STARTED, text="listening", listener="mx", port=25)
    assert len(log_files(tmp_path)) > 1, "the fixture should span rotated files"
    return tmp_path


def test_filter_by_ids(populated: Path) -> None:
    found = list(read_events(populated, ids={EventId.AUTH_SUCCEEDED}))
    assert [r["user"] for r in found] == ["alice", "bob"]
    assert len(list(read_events(populated, ids=[1708, 1709]))) == 3


def test_filter_by_time(populated: Path) -> None:
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    found = list(read_events(populated, since=start + timedelta(minutes=1),
                             until=start + timedelta(minutes=3)))
    assert [r["id"] for r in found] == [1709, 1708]
    naive = datetime(2024, 5, 1, 12, 2)
    assert [r["id"] for r in read_events(populated, since=naive)] == [1708, 1004]


def test_filter_by_top_level_keys_and_fields(populated: Path) -> None:
    assert [r["client"] for r in read_events(populated, user="bob")] == ["203.0.113.50"]
    assert [r["id"] for r in read_events(populated, listener="mx")] == [1709, 1004]
    assert [r["user"] for r in read_events(populated, method="PLAIN")] == ["alice"]
    assert [r["id"] for r in read_events(populated, domain="example.org")] == [1709]
    assert [r["id"] for r in read_events(populated, port=25)] == [1004]
    assert [r["id"] for r in read_events(populated, port="25")] == [1004]
    assert list(read_events(populated, ids={1708}, user="carol")) == []
    both = read_events(populated, ids={1708}, listener="submission", client="198.51.100.7")
    assert [r["user"] for r in both] == ["alice"]


# --- thread safety ----------------------------------------------------------------------------


def test_many_threads_emitting_write_every_record_intact(tmp_path: Path) -> None:
    threads_count, per_thread = 8, 500
    log = EventLog(tmp_path, max_bytes=200_000, backups=50)
    barrier = threading.Barrier(threads_count)

    def worker(number: int) -> None:
        barrier.wait()
        for sequence in range(per_thread):
            event = EventId.RELAY_DENIED if sequence % 10 == 0 else EventId.RECIPIENT_ACCEPTED
            log.emit(event, text="x" * (sequence % 50), thread=number, sequence=sequence)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    log.close()
    records = []
    for path in log_files(tmp_path):
        records += lines_of(path)  # raises on any damaged line
    assert len(records) == threads_count * per_thread
    for number in range(threads_count):
        mine = [r["fields"]["sequence"] for r in records if r["fields"]["thread"] == number]
        assert mine == list(range(per_thread))


# --- session summary --------------------------------------------------------------------------


def test_session_summary_line() -> None:
    line = session_summary_text(client="203.0.113.9", listener="mx", tls="TLSv1.3", user=None,
                                accepted=3, refused=2,
                                last_refusal="550 5.7.1 Relay access denied", messages=1)
    assert line == ('client=203.0.113.9 listener=mx tls=TLSv1.3 user=- rcpts=3/5 msgs=1 '
                    'lr="550 5.7.1 Relay access denied"')


def test_session_summary_without_refusal_or_tls() -> None:
    line = session_summary_text(client="::1", listener="submission", tls=None, user="alice",
                                accepted=1, refused=0, last_refusal=None, messages=1)
    assert line == "client=::1 listener=submission tls=- user=alice rcpts=1/1 msgs=1"


def test_session_summary_quotes_hostile_values() -> None:
    line = session_summary_text(client="192.0.2.1", listener="mx", tls=None,
                                user='eve x="1"\r\nforged=1', accepted=0, refused=1,
                                last_refusal='550 5.1.1 <"a\\b"@x>', messages=0)
    assert 'user="eve x=\\"1\\"\\r\\nforged=1"' in line
    assert 'lr="550 5.1.1 <\\"a\\\\b\\"@x>"' in line
    assert "\n" not in line and "\r" not in line


# --- the docs page ----------------------------------------------------------------------------


def test_rendered_catalog_lists_every_event() -> None:
    page = render_catalog_markdown()
    for definition in CATALOG.values():
        assert f"| [{int(definition.id)}](#event-{int(definition.id)}) |" in page
        assert f"### {int(definition.id)} {definition.id.name}:" in page
        assert definition.explanation in page


def test_docs_events_md_is_up_to_date() -> None:
    committed = (REPO_ROOT / "docs" / "events.md").read_text("utf-8")
    assert committed == render_catalog_markdown() + "\n", (
        "docs/events.md is stale: run python -m relaywarden.events > docs/events.md")


def test_module_main_prints_the_catalog() -> None:
    result = subprocess.run([sys.executable, "-m", "relaywarden.events"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout == render_catalog_markdown() + "\n"


def _emit_many(directory: str, tag: str, count: int) -> None:
    from relaywarden.events import EventId, EventLog
    with EventLog(Path(directory), max_bytes=20_000, backups=50, flush_interval=0.0) as log:
        for i in range(count):
            log.emit(EventId.PROTOCOL_ERROR, text=f"{tag} {i}", seq=i, who=tag)


def test_several_processes_share_one_log_and_its_rotation(tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_emit_many, args=(str(tmp_path), f"p{n}", 400)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records = list(read_events(tmp_path))
    seen = {(r["fields"]["who"], r["fields"]["seq"]) for r in records}
    assert len(records) == 1200 and len(seen) == 1200           # nothing lost, nothing doubled
    for who in ("p0", "p1", "p2"):                              # each writer's order is kept
        seqs = [r["fields"]["seq"] for r in records if r["fields"]["who"] == who]
        assert seqs == sorted(seqs)
    files = log_files(tmp_path)
    assert len(files) > 3 and all(f.stat().st_size <= 20_000 for f in files)


def test_a_log_that_cannot_be_written_never_raises_and_catches_up(tmp_path, monkeypatch, capsys):
    from relaywarden.events import EventId, EventLog
    log = EventLog(tmp_path, flush_interval=0.0)
    real_write_all = EventLog._write_all
    failing = {"on": True}

    def write_all(self, chunk):
        if failing["on"]:
            raise OSError(28, "No space left on device")
        real_write_all(self, chunk)

    monkeypatch.setattr(EventLog, "_write_all", write_all)
    for i in range(5):
        log.emit(EventId.QUEUE_ERROR, text=f"disk full {i}")      # an ERROR flushes at once: must not raise
    assert "cannot write the event log" in capsys.readouterr().err
    failing["on"] = False
    log.emit(EventId.QUEUE_ERROR, text="disk has room again")
    log.close()
    texts = [r["text"] for r in read_events(tmp_path)]
    assert texts == [f"disk full {i}" for i in range(5)] + ["disk has room again"]


def test_emit_writes_the_record_it_returns_with_the_top_level_keys_in_order(tmp_path):
    with EventLog(tmp_path) as log:
        written = log.emit(EventId.MESSAGE_QUEUED, text="q", message_id="m1", session="s1",
                           client=ipaddress.ip_address("192.0.2.1"), listener="mx", user=None, size=5)
    assert list(written) == ["time", "id", "name", "severity", "listener", "client", "session",
                             "message_id", "text", "fields"]
    assert written["client"] == "192.0.2.1" and type(written["client"]) is str   # made a JSON type
    assert (written["id"], written["name"], written["severity"]) == (3001, "MESSAGE_QUEUED", "info")
    assert written["fields"] == {"size": 5}
    assert lines_of(tmp_path / LOG_FILE_NAME) == [written]
