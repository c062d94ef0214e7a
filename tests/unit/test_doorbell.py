"""The doorbell between accepting workers and the delivery process: ids batched per event-loop
turn, nothing lost when the receiver's datagram queue is full, a scan asked for when too many wait."""

from __future__ import annotations

import asyncio
import socket

from relaywarden.server.app import Doorbell


def _ids(n: int, start: int = 0) -> list[str]:
    return [f"{k:024x}" for k in range(start, start + n)]


def _receive_all(sock: socket.socket) -> list[list[str]]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            return datagrams


def test_the_ids_of_one_turn_go_in_one_datagram_and_a_full_queue_loses_none(tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "delivery.sock"))
    receiver.setblocking(False)

    async def run() -> list[list[str]]:
        bell = Doorbell(tmp_path)
        for queue_id in _ids(100):                 # one turn: one datagram
            bell.ring(queue_id)
        await asyncio.sleep(0.01)
        batches = _receive_all(receiver)
        assert batches == [_ids(100)]
        for k in range(40):                        # forty turns while nobody reads: the queue fills
            bell.ring(_ids(1, 1000 + k)[0])
            await asyncio.sleep(0)
        await asyncio.sleep(0.02)
        assert bell._waiting, "the receiver's queue should be full by now"
        received: list[list[str]] = []
        for _ in range(100):                       # reading again: the rest arrives
            received += _receive_all(receiver)
            if not bell._waiting and sum(map(len, received)) == 40:
                break
            await asyncio.sleep(0.01)
        bell.close()
        return received

    received = asyncio.run(run())
    assert [i for batch in received for i in batch] == _ids(40, 1000)
    receiver.close()


def test_too_many_waiting_ids_become_one_request_for_a_scan(tmp_path):
    async def run() -> list[str]:
        got: list[str] = []
        listener = Doorbell(tmp_path, listen=got.extend)
        bell = Doorbell(tmp_path)
        for queue_id in _ids(Doorbell.MAX_WAITING + 5):
            bell.ring(queue_id)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if got:
                break
        bell.close()
        listener.close()
        return got

    assert asyncio.run(run()) == [""]                  # the runner takes "" as: scan the queue


def test_with_nobody_listening_the_ids_are_dropped(tmp_path):
    async def run() -> list[str]:
        bell = Doorbell(tmp_path)
        bell.ring(_ids(1)[0])
        await asyncio.sleep(0.01)
        waiting = list(bell._waiting)
        bell.close()
        return waiting

    assert asyncio.run(run()) == []                     # a delivery process scans when it starts
