"""Connection counts behind the listeners' limits: one process, and several workers sharing them."""

from __future__ import annotations

import os

import pytest

from relaywarden.server.limits import LocalCounts, SharedCounts


@pytest.fixture(params=["local", "shared"])
def counts(request):
    if request.param == "local":
        return LocalCounts(2)
    shared = SharedCounts(2, 3)
    shared.attach(0)
    return shared


def test_totals_and_clients_per_listener(counts):
    counts.set_total(0, 5)
    counts.add_client(0, "192.0.2.1", +1)
    counts.add_client(0, "192.0.2.1", +1)
    counts.add_client(1, "2001:db8::1", +1)
    assert (counts.total(0), counts.total(1)) == (5, 0)
    assert counts.client(0, "192.0.2.1") == 2 and counts.client(1, "192.0.2.1") == 0
    assert counts.client(1, "2001:db8::1") == 1 and counts.client(0, "192.0.2.2") == 0
    for _ in range(3):                       # never below zero, whatever the calls
        counts.add_client(0, "192.0.2.1", -1)
    assert counts.client(0, "192.0.2.1") == 0
    counts.add_client(0, "192.0.2.1", +1)
    assert counts.client(0, "192.0.2.1") == 1


def _in_child(action) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_workers_see_each_others_counts_and_a_replacement_clears_a_dead_workers_row():
    shared = SharedCounts(1, 2)          # made by the supervisor, before it forks
    shared.attach(0)
    shared.set_total(0, 2)
    shared.add_client(0, "198.51.100.7", +2)

    def worker_one():                    # dies without giving its connections back
        shared.attach(1)
        shared.set_total(0, 3)
        shared.add_client(0, "198.51.100.7", +1)
        shared.add_client(0, "203.0.113.9", +3)
    _in_child(worker_one)
    assert shared.total(0) == 5
    assert shared.client(0, "198.51.100.7") == 3 and shared.client(0, "203.0.113.9") == 3

    _in_child(lambda: shared.attach(1))  # the worker started in its place
    assert shared.total(0) == 2
    assert shared.client(0, "198.51.100.7") == 2 and shared.client(0, "203.0.113.9") == 0


def test_many_clients_counted_exactly():
    shared = SharedCounts(1, 2)
    shared.attach(1)
    addresses = [f"10.{a}.{b}.1" for a in range(40) for b in range(50)]      # 2000 clients
    for n, address in enumerate(addresses):
        shared.add_client(0, address, n % 5 + 1)
    assert [shared.client(0, a) for a in addresses] == [n % 5 + 1 for n in range(len(addresses))]


def test_an_unattached_process_cannot_count():
    shared = SharedCounts(1, 2)
    with pytest.raises(RuntimeError, match="attach"):
        shared.add_client(0, "192.0.2.1", 1)
    with pytest.raises(ValueError, match="not one of the 2"):
        shared.attach(2)


def test_a_client_whose_probe_path_is_full_is_still_counted_by_its_own_worker():
    shared = SharedCounts(1, 2)
    shared.attach(0)
    shared.PROBES = 2
    mask = shared.slots - 1
    home = SharedCounts._key("192.0.2.0") & mask
    same = [a for a in (f"192.0.{n // 256}.{n % 256}" for n in range(200_000))
            if SharedCounts._key(a) & mask == home][:3]
    assert len(same) == 3
    for address in same:
        shared.add_client(0, address, +2)
    assert [shared.client(0, a) for a in same] == [2, 2, 2]      # the third: in this process only
    shared.add_client(0, same[0], -2)                              # its slot is free again ...
    assert shared.client(0, same[0]) == 0 and shared.client(0, same[1]) == 2
    shared.add_client(0, same[2], -2)
    assert shared.client(0, same[2]) == 0
    shared.add_client(0, same[2], +1)                              # ... and now it gets one
    assert shared.client(0, same[2]) == 1 and (0, same[2]) not in shared._crowded
