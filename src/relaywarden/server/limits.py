"""Connection counts behind each listener's connection limits, for one process or for all workers.

``[listener.limits] max_connections`` and ``max_connections_per_client`` are limits of the server,
whatever ``server.workers`` says. With one process the counts live in the process
(``LocalCounts``). With several accepting workers (``SharedCounts``) the supervisor maps one
anonymous shared memory area before it forks, and every worker reads the others' counts in it:

- each worker writes only its own row (no lock: one writer per row), and a check sums the rows of
  all workers;
- a row holds, per listener, the worker's number of connections and a hash table of its clients:
  slots of (64-bit hash of the address, connections), open addressing with linear probing. A slot
  whose count falls to zero keeps its key and may be taken by the next new client on that probe
  path, so a reader's search is never cut short; the table has four slots per connection the
  listener allows, so a search ends within a few slots;
- a worker that dies leaves its row behind; the worker started in its place clears the row before
  it accepts anything, so a crash never leaks connections.

Counts are exact (two addresses would need the same 64-bit hash). Each connection is counted
before it is compared with the limit; two workers admitting the last place at the same instant
may, rarely, both see the other's count too late and let one connection more in.
"""

from __future__ import annotations

import hashlib
import mmap


class LocalCounts:
    """The counts of one process (``server.workers = 1``)."""

    def __init__(self, listeners: int) -> None:
        self._totals = [0] * listeners
        self._clients: list[dict[str, int]] = [{} for _ in range(listeners)]

    def set_total(self, listener: int, connections: int) -> None:
        self._totals[listener] = connections

    def total(self, listener: int) -> int:
        return self._totals[listener]

    def client(self, listener: int, address: str) -> int:
        return self._clients[listener].get(address, 0)

    def add_client(self, listener: int, address: str, delta: int) -> None:
        clients = self._clients[listener]
        n = clients.get(address, 0) + delta
        if n > 0:
            clients[address] = n
        else:
            clients.pop(address, None)      # a table of clients that left must not grow


class SharedCounts:
    """The counts of every accepting worker, in memory shared across ``fork``; create it in the
    supervisor, then ``attach(worker)`` in each worker before it listens."""

    PROBES = 64               # the longest probe path a new client may get

    def __init__(self, listeners: int, workers: int, max_connections: int = 500) -> None:
        self.listeners = listeners
        self.workers = workers
        self.slots = 1 << max(10, (4 * max_connections - 1).bit_length())   # a power of two, >= 1024
        self._stride = 1 + 2 * self.slots                 # total, then (key, count) per slot
        self._area = mmap.mmap(-1, workers * listeners * self._stride * 8)   # MAP_SHARED
        self._cells = memoryview(self._area).cast("Q")
        self.worker: int | None = None
        self._placed: dict[tuple[int, str], int] = {}     # own live clients -> their slot's cell
        self._crowded: dict[tuple[int, str], int] = {}    # no slot found: counted here only

    def attach(self, worker: int) -> None:
        """This process is worker ``worker``: clear the row a dead predecessor may have left."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} is not one of the {self.workers} accepting workers")
        self.worker = worker
        size = self.listeners * self._stride * 8
        self._area[worker * size:(worker + 1) * size] = bytes(size)
        self._placed.clear()
        self._crowded.clear()

    def _base(self, worker: int, listener: int) -> int:
        return (worker * self.listeners + listener) * self._stride

    def _own(self, listener: int) -> int:
        if self.worker is None:
            raise RuntimeError("SharedCounts.attach(worker) was not called in this process")
        return self._base(self.worker, listener)

    @staticmethod
    def _key(address: str) -> int:
        key = int.from_bytes(hashlib.blake2b(address.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        return key or 1                                    # 0 marks a slot never used

    def set_total(self, listener: int, connections: int) -> None:
        self._cells[self._own(listener)] = max(0, connections)

    def total(self, listener: int) -> int:
        cells = self._cells
        return sum(cells[self._base(w, listener)] for w in range(self.workers))

    def client(self, listener: int, address: str) -> int:
        key = self._key(address)
        mask = self.slots - 1
        cells = self._cells
        total = self._crowded.get((listener, address), 0)
        for w in range(self.workers):
            base = self._base(w, listener) + 1
            for i in range(self.PROBES):
                cell = base + 2 * ((key + i) & mask)
                found = cells[cell]
                if found == key:
                    total += cells[cell + 1]
                    break
                if found == 0:
                    break
        return total

    def add_client(self, listener: int, address: str, delta: int) -> None:
        own = self._own(listener) + 1
        cells = self._cells
        where = (listener, address)
        cell = self._placed.get(where)
        if cell is None:
            if where in self._crowded or delta <= 0:
                n = self._crowded.get(where, 0) + delta
                if n > 0:
                    self._crowded[where] = n
                else:
                    self._crowded.pop(where, None)
                return
            key = self._key(address)
            mask = self.slots - 1
            for i in range(self.PROBES):
                candidate = own + 2 * ((key + i) & mask)
                if cells[candidate + 1] == 0:               # never used, or its client left
                    cell = candidate
                    break
            if cell is None:                                # a crowded path: counted here only
                self._crowded[where] = delta
                return
            cells[cell + 1] = 0
            cells[cell] = key
            self._placed[where] = cell
        n = max(0, cells[cell + 1] + delta)
        cells[cell + 1] = n
        if n == 0:
            del self._placed[where]                         # the key stays: a reader's path goes on
