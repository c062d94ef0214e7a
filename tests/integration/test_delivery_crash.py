"""SIGKILL the server while it delivers a few hundred messages: after a restart every acknowledged
message reaches the sink, and duplicates stay within what was in flight at the kill."""

from __future__ import annotations

import re
import smtplib
import threading
import time

import pytest

from tests.support import nsd, sink

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (nsd.available() and sink.available()), reason="nsd and smtp-sink needed")]

CONFIG = """
[server]
hostname = "mx.example.test"

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

[[mailbox]]
address = "postmaster@example.test"

[[route]]
name = "sink"
domains = ["*"]
kind = "smarthost"
hosts = ["127.0.0.1:SINKPORT"]
tls = "none"

[delivery]
min_backoff = 1.0
max_backoff = 1.0
poll_interval = 0.2
max_per_destination = 10
"""

TOTAL = 300


def test_kill_during_delivery_loses_nothing(tmp_path, start_server):
    peer = sink.SmtpSink(tmp_path, "-w", "1").start()     # the sink answers DATA after 1 s: deliveries stay in flight
    try:
        srv = start_server(CONFIG.replace("SINKPORT", str(peer.port)))
        acked: set[int] = set()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def client(start: int) -> None:
            try:
                with smtplib.SMTP("127.0.0.1", srv.ports["devices"], timeout=30) as s:
                    for n in range(start, TOTAL, 6):
                        s.sendmail("app@example.test", [f"user{n}@remote.example"],
                                   f"X-Seq: {n}\r\nSubject: {n}\r\n\r\nmessage {n}\r\n")
                        with lock:
                            acked.add(n)
            except (smtplib.SMTPException, OSError) as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(peer.messages()) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()                                          # SIGKILL, mid-acceptance and mid-delivery
        for t in threads:
            t.join(30)
        acked_at_kill = set(acked)
        assert len(acked_at_kill) >= 40
        srv.start()                                         # same data directory
        deadline = time.monotonic() + 120
        seqs: list[int] = []
        while time.monotonic() < deadline:
            seqs = [int(m.group(1)) for data in peer.messages() if (m := re.search(rb"X-Seq: (\d+)", data))]
            if acked_at_kill <= set(seqs):
                break
            time.sleep(0.2)
        missing = acked_at_kill - set(seqs)
        assert not missing, f"acknowledged but never delivered: {sorted(missing)[:20]}"
        duplicates = len(seqs) - len(set(seqs))
        # at most what was in flight to the sink when the kill came (10 per destination here, twice over for the retry)
        assert duplicates <= 20, f"{duplicates} duplicates"
    finally:
        peer.stop()
