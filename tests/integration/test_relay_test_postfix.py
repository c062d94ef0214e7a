"""``relaywarden relay-test`` against a deliberately open Debian Postfix and against relaywarden.

The Postfix is a private instance (``bench/postfix.py``: its own configuration, queue and log
under the test's directory, ``postfix -c DIR start`` on a loopback port) with
``mynetworks = 0.0.0.0/0``, the classic open-relay mistake: every client is "trusted" by
``permit_mynetworks`` and relays anywhere.  (``smtpd_relay_restrictions = permit`` cannot be
used: Postfix's smtpd refuses to start without a ``reject_unauth_destination`` in them.)  relay-test must report the open
relay (exit 2, the plain foreign-to-foreign attempt among those accepted); against relaywarden's
default configuration it must report none (exit 0).  The battery never sends DATA, so the open
Postfix relays nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.postfix import PostfixInstance
from tests.support.server import QUEUE_ONLY_CONFIG, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not Path("/usr/sbin/postfix").exists(), reason="Debian postfix not installed"),
]


class OpenPostfix(PostfixInstance):
    """The benchmark's private Postfix with every address in mynetworks: an open relay."""

    def main_cf(self) -> str:
        # later lines of main.cf override earlier ones
        return super().main_cf() + "mynetworks = 0.0.0.0/0\n"


def relay_test(target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relaywarden", "relay-test", target,
                           "--local-domain", "example.test", "--timeout", "10", *extra],
                          capture_output=True, text=True, timeout=150)


@pytest.fixture
def open_postfix(tmp_path):
    # PostfixInstance opens the directories above its root to the postfix user
    root = tmp_path / "postfix"
    instance = OpenPostfix(root, free_port(), domain="example.test")
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


def test_relay_test_reports_the_open_postfix(open_postfix):
    r = relay_test(f"127.0.0.1:{open_postfix.port}", "--json")
    assert r.returncode == 2, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["exit_code"] == 2 and out["target"] == f"127.0.0.1:{open_postfix.port}"
    accepted = {a["name"]: a for a in out["attempts"] if a["outcome"] == "accepted"}
    assert out["relayed"] == len(accepted) >= 10
    plain = accepted["foreign sender, foreign recipient"]
    assert plain["rcpt_to"] == "<relaytest@example.net>" and plain["rcpt_reply"].startswith("250")
    assert "ESMTP" not in plain["rcpt_reply"]                        # a reply to RCPT, not the banner
    assert open_postfix.queued() == 0                                # no DATA: nothing was relayed


def test_relay_test_human_output_names_the_open_relay(open_postfix):
    r = relay_test(f"127.0.0.1:{open_postfix.port}")
    assert r.returncode == 2
    assert "OPEN RELAY:" in r.stdout and "attempts were accepted" in r.stdout


def test_relay_test_finds_no_relay_in_relaywarden_default(start_server):
    srv = start_server(QUEUE_ONLY_CONFIG)
    r = relay_test(f"127.0.0.1:{srv.ports['mx']}", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["relayed"] == 0 and len(out["attempts"]) >= 30
    assert {a["outcome"] for a in out["attempts"]} == {"refused"}
    assert all((a["rcpt_reply"] or a["mail_reply"])[:1] == "5" for a in out["attempts"])
