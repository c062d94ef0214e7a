"""The queue runner's last step for a message whose recipients all became final: the NDR and the
removal happen in one write, so nothing in between can lose the NDR or strand the message."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relaywarden.config.loader import default_text, parse_text
from relaywarden.delivery.runner import QueueRunner
from relaywarden.directory import Directory
from relaywarden.queue.model import MessageIn, QueueFull, RecipientIn
from relaywarden.queue.store import SqliteQueue

LOADED = parse_text(default_text(), "default.toml")


def _message(recipient: str = "nobody@example.test") -> MessageIn:
    return MessageIn(sender="someone@example.org",
                     recipients=(RecipientIn(recipient, f"<{recipient}>", None, (), "local", None, "abcdef"),),
                     data=b"Subject: x\r\n\r\nhi\r\n", received_at=time.time(), listener="mx",
                     client_address="127.0.0.1", client_port=1, helo="x", auth_user=None, tls=None,
                     body_type="7BIT", smtputf8=False, dsn_ret=None, dsn_envid=None, session_id="s")


def _runner(q: SqliteQueue, tmp_path: Path, events: list) -> QueueRunner:
    return QueueRunner(loaded=LOADED, queue=q, directory=lambda: Directory.build(LOADED),
                       emit=lambda event, **kw: events.append((int(event), kw)), resolver=None,
                       data_dir=tmp_path, hostname="mx.test")


def test_a_failed_recipient_is_bounced_and_the_message_removed_in_one_write(tmp_path):
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message()).result()

        async def run():
            await _runner(q, tmp_path, events)._deliver_message(qid)
        asyncio.run(run())
        assert q.get(qid) is None                                  # the original is gone ...
        [(ndr_id, rcpts)] = q.due(time.time() + 10, 10)            # ... and its NDR is queued
        assert rcpts[0].address == "someone@example.org"
        assert b"multipart/report" in q.message_data(ndr_id)
        assert 4001 in [e for e, _ in events]


def test_when_the_ndr_cannot_be_queued_the_message_stays_and_is_retried(tmp_path):
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message()).result()
        real = q.replace_later

        def full(*args, **kwargs):
            raise QueueFull("disk full")

        async def run():
            q.replace_later = full
            try:
                await _runner(q, tmp_path, events)._deliver_message(qid)
            finally:
                q.replace_later = real
        asyncio.run(run())
        [r] = q.recipients(qid)
        assert r.state == "deferred" and r.last_result.reply_code == 550     # kept, with the real reply
        assert [qid] == [m for m, _ in q.due(time.time() + 10**4, 10)]       # picked up again later
        assert 3002 in [e for e, _ in events]


def test_a_message_changed_by_an_operator_meanwhile_is_left_alone(tmp_path):
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message()).result()
        runner = _runner(q, tmp_path, events)

        async def run():
            message, data = q.lease_and_load_later(qid, time.time() + 60, time.time()).result()
            q.delete(qid)                                   # `queue delete` in another process
            due = [r for r in message.recipients]
            from relaywarden.queue.model import DeliveryResult
            result = DeliveryResult(550, "5.1.1", "mx.test", None, "no such mailbox", "LOCAL", True)
            await runner._finish(message, data, [(due[0], result)], [])
        asyncio.run(run())
        assert q.count() == 0                                # no NDR for a message the operator removed
        assert 3002 in [e for e, _ in events]


def test_a_leased_message_is_neither_offered_again_nor_deleted_nor_bounced(tmp_path):
    """While the runner delivers a message (its lease), `due` skips it and the operator's delete
    and bounce leave it alone; after the lease is released both work again."""
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message("alice@example.test")).result()
        now = time.time()
        assert q.lease_later(qid, now + 60, now).result()
        assert not q.lease_later(qid, now + 60, now).result()           # one deliverer at a time
        assert q.lease_and_load_later(qid, now + 60, now).result() is None
        assert q.due(now + 10, 10) == []
        assert q.delete_many([qid]) == []
        [rid] = [r.id for r in q.recipients(qid)]
        assert q.replace_many([(qid, (rid,), None)]) == [None]          # `queue bounce` skips it
        assert q.get(qid) is not None
        q.release_later(qid).result()
        assert [m for m, _ in q.due(now + 10, 10)] == [qid]
        assert q.delete_many([qid]) == [qid]


def test_a_held_message_cannot_be_leased_and_a_dead_runners_leases_are_void(tmp_path):
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        held, other = q.submit(_message()).result(), q.submit(_message()).result()
        q.hold_many([held], True)
        now = time.time()
        assert not q.lease_later(held, now + 60, now).result()
        assert q.lease_later(other, now + 3600, now).result()
        assert q.release_all_leases() == 1                              # at the runner's start
        assert q.lease_later(other, now + 60, now).result()


def test_lease_and_load_gives_the_message_and_its_data_only_with_the_lease(tmp_path):
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message("alice@example.test")).result()
        held = q.submit(_message("alice@example.test")).result()
        q.set_hold(held, True)
        now = time.time()
        message, data = q.lease_and_load_later(qid, now + 60, now).result()
        assert message == q.get(qid) and data == q.message_data(qid)
        assert q.lease_and_load_later(qid, now + 60, now).result() is None       # leased already
        assert q.lease_and_load_later(held, now + 60, now).result() is None      # on hold
        assert q.lease_and_load_later("0" * 24, now + 60, now).result() is None  # gone
        assert q.lease_and_load_later(qid, now + 120, now + 61).result()[0].id == qid   # the lease ran out


def test_ids_rung_by_another_process_start_at_once_and_anything_else_asks_for_a_scan(tmp_path):
    """The delivery process's doorbell brings queue ids: each starts without a queue scan; an
    id that does not look like one, or a full runner, wakes the scan instead."""
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message("postmaster@example.test")).result()

        async def run():
            runner = _runner(q, tmp_path, events)
            runner.offer_ids([qid])
            assert qid in runner._in_flight and not runner._wake.is_set()
            await asyncio.gather(*runner._tasks)
            runner.offer_ids(["../../etc/passwd"])
            assert runner._wake.is_set() and not runner._in_flight
            await runner.pool.close()
        asyncio.run(run())
        assert q.get(qid) is None                                       # delivered to the mailbox
        assert list((tmp_path / "mail").rglob("new/*")), "the message reached the Maildir"


def test_a_full_runner_takes_the_waiting_mail_as_slots_free_not_at_the_next_poll(tmp_path):
    """Twelve messages for a runner that takes four at a time, with a poll a minute away: each
    freed slot looks for the mail left waiting, and all of it is delivered at once."""
    loaded = parse_text(default_text() + "\n[delivery]\nmax_concurrency = 1\npoll_interval = 60\n", "busy.toml")
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        ids = [q.submit(_message("postmaster@example.test")).result() for _ in range(12)]

        async def run():
            runner = QueueRunner(loaded=loaded, queue=q, directory=lambda: Directory.build(loaded),
                                 emit=lambda event, **kw: events.append((int(event), kw)), resolver=None,
                                 data_dir=tmp_path, hostname="mx.test")
            runner.start()
            for _ in range(200):
                if q.count() == 0:
                    break
                await asyncio.sleep(0.05)
            await runner.close()
        asyncio.run(run())
        assert q.count() == 0 and all(q.get(i) is None for i in ids)
        assert len(list((tmp_path / "mail").rglob("new/*"))) == 12


def test_a_delay_notice_and_the_mark_that_it_went_out_are_one_write(tmp_path):
    """The notice, the deferral and "delay warned" go in one transaction (a crash between a
    notice and its bookkeeping would send it twice); the next deferral sends none."""
    from dataclasses import replace as dc_replace

    from relaywarden.queue.model import DeliveryResult
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        old = dc_replace(_message("someone@remote.example"), received_at=time.time() - 6 * 3600)
        qid = q.submit(old).result()
        runner = _runner(q, tmp_path, events)
        calls = []
        real = q.finish_later

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)
        q.finish_later = spy
        later = DeliveryResult(451, "4.3.0", "mx.remote.example", "192.0.2.7", "try again later", "RCPT", False)

        async def attempt():
            message = q.get(qid)
            await runner._finish(message, q.message_data(qid), [(message.recipients[0], later)], [])
        asyncio.run(attempt())
        [(notice_id, rcpts)] = [(m, r) for m, r in q.due(time.time() + 10, 10) if m != qid]
        assert rcpts[0].address == "someone@example.org" and b"delayed" in q.message_data(notice_id).lower()
        [r] = q.recipients(qid)
        assert r.state == "deferred" and r.delay_warned and r.last_result.reply_code == 451
        assert len(calls) == 1 and len(calls[0]["notices"]) == 1 and calls[0]["delay_warned"] == [r.id]

        asyncio.run(attempt())                                   # deferred again: no second notice
        assert len([m for m, _ in q.due(time.time() + 10**6, 10)]) == 2
        assert len(calls) == 2 and calls[1]["notices"] == [] and calls[1]["delay_warned"] == []


def test_when_a_notice_cannot_be_queued_the_results_still_are(tmp_path):
    """A full disk may refuse the delay notice; the attempt's results must go in anyway (a
    delivered recipient left pending would be delivered again at every poll), and the delay
    notice, not marked as sent, is tried again next time."""
    from dataclasses import replace as dc_replace

    from relaywarden.queue.model import DeliveryResult, RecipientIn
    events: list = []
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        two = dc_replace(_message("a@remote.example"), received_at=time.time() - 6 * 3600, recipients=(
            RecipientIn("a@remote.example", "<a@remote.example>", None, (), "relay", "default", "d1"),
            RecipientIn("b@remote.example", "<b@remote.example>", None, (), "relay", "default", "d2")))
        qid = q.submit(two).result()
        real = q.finish_later

        def no_room_for_notices(queue_id, **kwargs):
            if kwargs.get("notices"):
                raise QueueFull("database or disk is full")
            return real(queue_id, **kwargs)
        q.finish_later = no_room_for_notices
        runner = _runner(q, tmp_path, events)
        ok = DeliveryResult(250, "2.0.0", "mx.remote.example", "192.0.2.7", "queued", "END-OF-DATA", False)
        later = DeliveryResult(451, "4.3.0", "mx.remote.example", "192.0.2.7", "try again later", "RCPT", False)

        async def attempt():
            message = q.get(qid)
            a, b = message.recipients
            await runner._finish(message, q.message_data(qid), [(a, ok), (b, later)], [])
        asyncio.run(attempt())
        a, b = q.recipients(qid)
        assert a.state == "delivered" and b.state == "deferred" and not b.delay_warned
        assert q.count() == 1, "no notice was queued"
        assert any(e == 3002 and kw.get("operation") == "notice" for e, kw in events)


def test_success_notices_are_owed_even_when_the_message_changed_meanwhile(tmp_path):
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message("postmaster@example.test")).result()
        notice = _message("someone@example.org")
        done, extra = q.replace_later(qid, [999], None, [notice]).result()     # 999: not what is left
        assert done is None and q.get(qid) is not None                          # the message left alone
        assert len(extra) == 1 and q.get(extra[0]) is not None                  # the notice queued


def test_a_message_whose_recipient_ids_are_unknown_is_left_to_the_scan(tmp_path):
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        msg = _message("postmaster@example.test")
        qid = q.submit(msg).result()

        async def run():
            runner = _runner(q, tmp_path, [])
            runner.offer(qid, None, msg)
            assert not runner._in_flight and runner._wake.is_set() and runner._backlog
            await runner.pool.close()
        asyncio.run(run())


def test_a_rung_id_already_being_delivered_asks_for_no_scan(tmp_path):
    """A scan may start a message before its doorbell ring arrives; the ring must not ask for
    another scan (each would find the next messages before their rings, and so on)."""
    with SqliteQueue(tmp_path / "queue.sqlite") as q:
        qid = q.submit(_message("postmaster@example.test")).result()

        async def run():
            runner = _runner(q, tmp_path, [])
            runner._in_flight.add(qid)
            runner.offer_ids([qid])
            assert not runner._wake.is_set() and not runner._backlog
            runner._in_flight.discard(qid)
            await runner.pool.close()
        asyncio.run(run())
