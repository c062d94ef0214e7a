"""server.workers > 1: several processes share the listeners, the queue and the event log; the
first delivers; the supervisor passes SIGTERM on and replaces a worker that dies."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import sink

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not sink.available(), reason="smtp-sink needed")]

CONFIG = """
[server]
hostname = "mx.example.test"
workers = 2

[[listener]]
name = "devices"
address = "127.0.0.1"
port = {port:devices}
tls = "none"

[listener.relay]
mode = "only"
entries = ["127.0.0.1"]

[[domain]]
name = "example.test"

[[route]]
name = "sink"
kind = "smarthost"
hosts = ["127.0.0.1:SINKPORT"]
tls = "none"

[delivery]
poll_interval = 0.2
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("app@example.test", [f"user{n}@remote.example"], f"X-Seq: {n}\r\nSubject: {n}\r\n\r\nx\r\n")


def test_two_workers_accept_share_the_log_and_deliver_everything(tmp_path, start_server):
    peer = sink.SmtpSink(tmp_path).start()
    try:
        srv = start_server(CONFIG.replace("SINKPORT", str(peer.port)))
        workers = _children(srv.proc.pid)
        assert len(workers) == 3                                   # two accept, one delivers
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: _send(srv.ports["devices"], n), range(200)))
        assert len(peer.wait_for(200, timeout=60)) == 200        # accepted by either, delivered by the third
        sessions = srv.wait_for_event(lambda e: e["name"] == "SERVER_STARTED" and e["fields"]["worker"] == 2)
        pids = {e["fields"]["pid"] for e in srv.events() if e["name"] == "SERVER_STARTED"}
        assert pids == set(workers)
        assert sessions
        # both workers took connections (SO_REUSEPORT spreads them); info events reach the disk within a second
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            summaries = [e for e in srv.events() if e["name"] == "SESSION_SUMMARY"]
            if len(summaries) >= 200:
                break
            time.sleep(0.2)
        assert sum(e["fields"]["messages"] for e in summaries) == 200
        assert {e["fields"]["worker"] for e in summaries} == {0, 1}
        # a worker killed outright is replaced (here the delivery process); the server goes on
        delivery = max(workers)     # forked last
        os.kill(delivery, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(set(_children(srv.proc.pid)) - {delivery}) < 3:
            time.sleep(0.1)
        assert len(set(_children(srv.proc.pid)) - {delivery}) == 3
        for n in range(200, 220):
            _send(srv.ports["devices"], n)
        assert len(peer.wait_for(220, timeout=60)) == 220
        assert srv.stop() == 0
        assert _children(srv.proc.pid) == []
    finally:
        peer.stop()


def test_workers_refuse_an_open_relay_before_forking(tmp_path, start_server):
    config = CONFIG.replace("SINKPORT", "25").replace('mode = "only"', 'mode = "all-except"')
    with pytest.raises(RuntimeError, match="open relay"):
        start_server(config)


def test_one_server_per_data_directory(tmp_path, start_server):
    from tests.support.server import RelayServer

    first = start_server(CONFIG.replace("SINKPORT", "25"))
    second = RelayServer(CONFIG.replace("SINKPORT", "25"), first.data_dir)     # same data dir, other ports
    with pytest.raises(RuntimeError, match="already served by pid"):
        second.start(timeout=10)


LIMITS = """
[server]
hostname = "mx.example.test"
workers = 2

[[listener]]
name = "few"
address = "127.0.0.1"
port = {port:few}
tls = "none"
[listener.limits]
max_connections = 4

[[listener]]
name = "perclient"
address = "127.0.0.1"
port = {port:perclient}
tls = "none"
[listener.limits]
max_connections_per_client = 3

[[domain]]
name = "example.test"

[[mailbox]]
address = "postmaster@example.test"

[delivery]
enabled = false
"""


def _greetings(port: int, n: int) -> tuple[list[int], list]:
    from tests.support.smtp import SmtpConn

    conns = [SmtpConn(port) for _ in range(n)]
    return [c.greeting.code for c in conns], conns


@pytest.mark.parametrize("listener, limit", [("few", 4), ("perclient", 3)])
def test_connection_limits_hold_for_the_whole_server_not_per_worker(start_server, listener, limit):
    """SO_REUSEPORT spreads the connections over both workers; counted per process, 8 of them
    would all be let in (up to the limit in each worker): counted for the server, `limit` are."""
    srv = start_server(LIMITS)
    codes, conns = _greetings(srv.ports[listener], 8)
    try:
        assert sorted(codes) == [220] * limit + [421] * (8 - limit)
        summaries = [e for e in srv.events() if e["name"] == "CONNECTION_LIMIT"]
        assert summaries or srv.wait_for_event(lambda e: e["name"] == "CONNECTION_LIMIT")
    finally:
        for c in conns:
            c.close()
    # the places are given back: once they are closed, as many get in again
    deadline = time.monotonic() + 10
    while True:
        codes, conns = _greetings(srv.ports[listener], limit)
        for c in conns:
            c.close()
        if codes == [220] * limit:
            break
        assert time.monotonic() < deadline, f"places were not given back: {codes}"
        time.sleep(0.2)
