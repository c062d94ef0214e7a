"""The running server: data directory, event log, queue, directory, and one asyncio server per listener.

``Server.start()`` refuses an open-relay configuration (unless ``allow_open_relay``), makes the data
directory, opens the event log and the queue, loads the user database, prepares TLS, and listens.
``Server.stop()`` stops accepting, says 421 to idle sessions, lets messages already being
committed finish, and closes the queue and the log.  ``run()`` is what ``relaywarden serve`` calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import signal
import ssl
import sys
import time
import traceback
from pathlib import Path

from ..config.loader import LoadedConfig
from ..config.schema import Listener, TlsMode
from ..directory import Directory
from ..dns import make_resolver
from ..events import EventId, EventLog
from ..policy.audit import check_startable
from ..protocol.server import ServerOptions
from ..queue.store import SqliteQueue
from ..users import UserStore
from .limits import LocalCounts, SharedCounts
from .session import SmtpSession
from .tls import ensure_self_signed, server_context


class StartError(Exception):
    """The server cannot start: the message says why and what to change."""


class ListenerRuntime:
    """One listener's live state: its settings, TLS context, sessions and per-client counts."""

    def __init__(self, server: Server, config: Listener, ssl_context: ssl.SSLContext | None, index: int = 0):
        self.server = server
        self.config = config
        self.index = index          # the listener's place in the configuration (for the counts)
        self.name = config.name
        self.limits = config.limits
        self.ssl_context = ssl_context
        self.sessions: set[SmtpSession] = set()
        self.aio_server: asyncio.base_events.Server | None = None
        self._proxies = [ipaddress.ip_network(n) for n in config.proxy_from]
        self.needs_rdns = bool(config.relay.domains() or config.connections.domains())
        self._options = {
            tls: ServerOptions(
                hostname=server.hostname,
                max_command_line=self.limits.max_command_line,
                max_data_line=self.limits.max_data_line,
                max_message_size=self.limits.max_message_size,
                max_recipients=self.limits.max_recipients,
                max_errors=self.limits.max_errors,
                starttls=config.tls == TlsMode.STARTTLS and ssl_context is not None,
                require_tls=config.require_tls,
                auth_mechanisms=tuple(config.auth),
                auth_plaintext=config.auth_plaintext,
                tls_active=tls,
            )
            for tls in (False, True)
        }

    def options(self, tls_active: bool) -> ServerOptions:
        return self._options[tls_active]

    # connection counts for the limits: of this process, or of all workers (server/limits.py)

    def sessions_changed(self) -> None:
        self.server.counts.set_total(self.index, len(self.sessions))

    def active(self) -> int:
        """Connections to this listener now, in every worker (this one included)."""
        return self.server.counts.total(self.index)

    def from_client(self, address: str) -> int:
        """Counted connections from this client address, in every worker."""
        return self.server.counts.client(self.index, address)

    def client_counted(self, address: str, delta: int) -> None:
        self.server.counts.add_client(self.index, address, delta)

    def is_proxy(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._proxies)

    @property
    def bound(self) -> list[tuple[str, int]]:
        if self.aio_server is None:
            return []
        return [s.getsockname()[:2] for s in self.aio_server.sockets]


class Doorbell:
    """How accepting workers tell the delivery process that new mail is queued: datagrams on a
    UNIX socket in the data directory (``delivery.sock``) holding the new messages' queue ids,
    one per line; an empty line asks for a scan of the queue.

    An accepting worker sends the ids of one event-loop turn together. A datagram the socket
    cannot take now (the receiver's queue is short: ``net.unix.max_dgram_qlen``, 10 by default)
    is sent again a few milliseconds later; past 10 000 ids waiting, they are replaced by one
    request for a scan. When no delivery process listens (it is starting again), the ids are
    dropped: a delivery process scans the queue when it starts, and every
    ``delivery.poll_interval``."""

    MAX_DATAGRAM = 4096
    MAX_WAITING = 10_000
    RETRY = 0.005

    def __init__(self, data_dir: Path, listen=None):
        import socket as socketlib

        self.path = str(Path(data_dir) / "delivery.sock")
        self.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.listening = listen is not None
        self._loop = asyncio.get_running_loop()
        self._waiting: list[str] = []
        self._timer: asyncio.Handle | None = None
        if self.listening:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.sock.bind(self.path)
            self._loop.add_reader(self.sock.fileno(), self._drain, listen)

    def _drain(self, listen) -> None:
        rung: list[str] = []
        try:
            while len(rung) < 100_000:
                rung.extend(self.sock.recv(65536).decode("ascii", "replace").split("\n"))
        except (BlockingIOError, OSError):
            pass
        listen(rung)

    def ring(self, queue_id: str = "") -> None:
        """Say that ``queue_id`` is queued (no id: scan the queue); sent at the end of this turn."""
        if self._waiting[:1] == [""]:
            return                                  # a scan is asked for already: it finds this one too
        self._waiting.append(queue_id)
        if len(self._waiting) > self.MAX_WAITING:
            self._waiting = [""]                    # too many to name: ask for a scan instead
        if self._timer is None:
            self._timer = self._loop.call_soon(self._send)

    def _send(self) -> None:
        self._timer = None
        while self._waiting:
            take, size = 0, 0
            while take < len(self._waiting) and size + len(self._waiting[take]) + 1 <= self.MAX_DATAGRAM:
                size += len(self._waiting[take]) + 1
                take += 1
            try:
                self.sock.sendto("\n".join(self._waiting[:max(take, 1)]).encode("ascii"), self.path)
            except BlockingIOError:                 # its queue is full: again in a moment
                self._timer = self._loop.call_later(self.RETRY, self._send)
                return
            except OSError:                         # nobody listens now: its start scans the queue
                self._waiting.clear()
                return
            del self._waiting[:max(take, 1)]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.listening:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Server:
    def __init__(self, loaded: LoadedConfig, data_dir: Path, *, echo=None, worker: int = 0, role: str = "all",
                 counts: LocalCounts | SharedCounts | None = None):
        self.loaded = loaded
        self.config = loaded.config
        self.hostname = self.config.server.hostname
        self.data_dir = Path(data_dir)
        self.echo = echo
        self.auth_failure_delay = self.config.server.auth_failure_delay
        self.listeners: list[ListenerRuntime] = []
        self.events: EventLog | None = None
        self.queue: SqliteQueue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None   # the loop the sessions run on (set at start)
        self.users = UserStore(self.data_dir)
        self._users_mtime = -1
        self.directory = Directory()
        self.auth_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.runner = None          # the delivery QueueRunner, when delivery is enabled
        self.worker = worker        # index of this process among server.workers
        self.workers = self.config.server.workers
        # "all": one process does everything; with several workers, "accept" processes listen
        # and a "deliver" process runs the queue runner on a core of its own
        self.role = role
        self.doorbell: Doorbell | None = None
        # connection counts behind the listeners' limits: shared by the accepting workers
        self.counts = counts if counts is not None else LocalCounts(len(self.config.listener))
        self.resolver = make_resolver(self.config.dns)

    # --- events --------------------------------------------------------------------------------

    def emit(self, event: EventId, session: SmtpSession | None = None, *, text: str, **fields):
        if self.events is None:
            return None
        if session is None:
            return self.events.emit(event, text=text, **fields)
        # the session's listener, client, id and user, unless the caller names them itself
        pop = fields.pop
        core = session.core
        return self.events.emit(
            event, text=text, listener=pop("listener", session.rt.name),
            client=pop("client", session.client[0]), session=pop("session", session.id),
            user=pop("user", (core.auth_user or None) if core is not None else None),
            message_id=pop("message_id", None), **fields)

    def log_error(self, what: str, exc: BaseException) -> None:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.emit(EventId.PROTOCOL_ERROR, text=f"internal error: {what}: {detail}", error=detail)

    # --- directory -----------------------------------------------------------------------------

    def refresh_directory(self) -> None:
        mtime = self.users.mtime()
        if mtime != self._users_mtime:
            self.directory = Directory.build(self.loaded, self.users.records())
            self._users_mtime = mtime

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        problems = check_startable(self.loaded)
        if problems and not self.config.server.allow_open_relay:
            lines = [f"{p.where}: listener {p.listener}: {p.message}\n    fix: {p.fix}" for p in problems]
            raise StartError("refusing to start: this configuration makes an open relay\n" + "\n".join(lines)
                             + "\n(set server.allow_open_relay = true only if you really mean it)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.data_dir / "log", max_bytes=self.config.server.event_log_max_bytes,
                               backups=self.config.server.event_log_backups, echo=self.echo)
        for p in problems:
            self.emit(EventId.OPEN_RELAY_ALLOWED, text=(
                f"OPEN RELAY: listener {p.listener} {p.message} ({p.where}); allowed only because "
                f"server.allow_open_relay = true. Fix: {p.fix}"), listener=p.listener)
        self.loop = asyncio.get_running_loop()
        self.queue = SqliteQueue(self.data_dir / "queue.sqlite")
        self.refresh_directory()
        loop = asyncio.get_running_loop()
        cert_key = None
        for index, lc in enumerate(self.config.listener if self.role != "deliver" else []):
            ctx = None
            if lc.tls != TlsMode.NONE:
                if lc.certificate:
                    cert, key = Path(lc.certificate), Path(lc.key)
                else:
                    cert_key = cert_key or ensure_self_signed(self.data_dir / "tls", self.hostname)
                    cert, key = cert_key
                try:
                    ctx = server_context(cert, key)
                except (OSError, ssl.SSLError) as exc:
                    raise StartError(f"listener {lc.name}: cannot load certificate {cert} / key {key}: {exc}") from None
            rt = ListenerRuntime(self, lc, ctx, index)
            try:
                rt.aio_server = await loop.create_server(
                    lambda rt=rt: self._new_session(rt), host=lc.address, port=lc.port,
                    ssl=ctx if lc.tls == TlsMode.IMPLICIT else None, reuse_address=True,
                    reuse_port=self.workers > 1,
                    backlog=1024, start_serving=True)
            except OSError as exc:
                await self.stop()
                raise StartError(f"listener {lc.name}: cannot listen on {lc.address} port {lc.port}: {exc.strerror}") from None
            self.listeners.append(rt)
            self.emit(EventId.LISTENER_STARTED, text=f"listener {lc.name} on {lc.address} port {lc.port} (tls {lc.tls.value})",
                      listener=lc.name, address=lc.address, port=lc.port, tls=lc.tls.value)
        self.emit(EventId.SERVER_STARTED, text=(
            f"relaywarden started with {len(self.listeners)} listener(s); configuration {self.loaded.file}"
            + (f"; worker {self.worker + 1} of {self.workers}" if self.workers > 1 else "")),
            config=self.loaded.file, data_dir=str(self.data_dir), pid=os.getpid(), worker=self.worker)
        self._tasks.append(asyncio.ensure_future(self._housekeeping()))
        if self.role == "accept" and self.config.delivery.enabled:
            self.doorbell = Doorbell(self.data_dir)
        if self.config.delivery.enabled and self.role in ("all", "deliver"):
            from ..delivery.runner import QueueRunner

            self.runner = QueueRunner(loaded=self.loaded, queue=self.queue, directory=lambda: self.directory,
                                      emit=self.emit, resolver=self.resolver,
                                      data_dir=self.data_dir, hostname=self.hostname)
            self.runner.start()
            if self.role == "deliver":
                self.doorbell = Doorbell(self.data_dir, listen=self.runner.offer_ids)

    def _new_session(self, rt: ListenerRuntime) -> SmtpSession:
        self.refresh_directory()
        return SmtpSession(rt)

    async def _housekeeping(self) -> None:
        """Once a second: expire idle sessions, flush the event log, notice user changes."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for rt in self.listeners:
                for s in [s for s in rt.sessions if s.deadline < now]:
                    s.expire()
            if self.events:
                self.events.maybe_flush()
            try:
                self.refresh_directory()
            except Exception as exc:
                self.log_error("reloading the user database", exc)

    async def stop(self, grace: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for rt in self.listeners:
            if rt.aio_server is not None:
                rt.aio_server.close()
        deadline = time.monotonic() + grace
        for rt in self.listeners:
            for s in list(rt.sessions):
                s.shutdown()
        # sessions waiting on a queue commit finish first: their clients get the 250 they are owed
        while any(s.core is not None and s.core.waiting for rt in self.listeners for s in rt.sessions) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for rt in self.listeners:
            for s in list(rt.sessions):
                s.shutdown()
                if s.transport is not None:
                    s.transport.close()
        await asyncio.sleep(0)
        if self.doorbell is not None:
            self.doorbell.close()
        if self.runner is not None:
            await self.runner.close(grace)
        if self.queue is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.queue.close)
        self.auth_pool.shutdown(wait=False, cancel_futures=True)
        if self.events is not None:
            self.emit(EventId.SERVER_STOPPED, text="relaywarden stopped")
            self.events.close()


def install_event_loop_policy() -> str:
    """uvloop when available (it is measured faster here), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(loaded: LoadedConfig, data_dir: Path, *, out=sys.stdout, use_uvloop: bool = True) -> int:
    """``relaywarden serve``: one process, or a supervisor of ``server.workers`` processes."""
    loop_name = install_event_loop_policy() if use_uvloop else "asyncio"
    lock = _lock_data_dir(Path(data_dir))
    if lock is None:
        return 2
    record_configuration(Path(data_dir), loaded)
    workers = loaded.config.server.workers
    if workers == 1:
        return _serve(loaded, data_dir, out=out, loop_name=loop_name, worker=0)
    return _supervise(loaded, data_dir, out=out, loop_name=loop_name, workers=workers)


CONFIG_RECORD = "serve.config"


def record_configuration(data_dir: Path, loaded: LoadedConfig) -> None:
    """Note which configuration serves this data directory (an absolute path, or the name of the
    embedded default), for the commands that act as the server would (``queue bounce``)."""
    name = loaded.file if loaded.file.startswith("<") else str(Path(loaded.file).resolve())
    try:
        (data_dir / CONFIG_RECORD).write_text(name + "\n", encoding="utf-8")
    except OSError as exc:   # only a convenience: the server runs without it
        print(f"relaywarden: cannot write {data_dir / CONFIG_RECORD}: {exc.strerror}", file=sys.stderr)


def recorded_configuration(data_dir: Path) -> str | None:
    """The configuration ``record_configuration`` noted for this data directory, if any."""
    try:
        return (Path(data_dir) / CONFIG_RECORD).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _lock_data_dir(data_dir: Path):
    """One server per data directory: two would deliver the same queue twice, and with
    SO_REUSEPORT a stale one would silently share the ports. The lock lives as long as the
    process (and its workers, which inherit it)."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "serve.lock"
    handle = open(path, "a+")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        print(f"relaywarden: {data_dir} is already served by pid {holder}; stop it first, or use "
              "another --data-dir", file=sys.stderr)
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _serve(loaded: LoadedConfig, data_dir: Path, *, out, loop_name: str, worker: int, role: str = "all",
           counts: SharedCounts | None = None) -> int:
    def echo(record: dict) -> None:
        # errors, and warnings about the server itself (open relay, configuration); not per-session noise
        if record.get("severity") == "error" or (record.get("severity") == "warning" and record["id"] < 1100):
            if worker == 0 and role != "deliver":
                print(f"{record['time']} {record['id']} {record['name']}: {record['text']}", file=out, flush=True)

    async def main() -> int:
        server = Server(loaded, data_dir, echo=echo, worker=worker, role=role, counts=counts)
        try:
            await server.start()
        except StartError as exc:
            print(f"relaywarden: {exc}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if worker == 0 and role != "deliver":
            _banner(server, loaded, loop_name, out)
        await stop.wait()
        if worker == 0 and role != "deliver":
            print("relaywarden: stopping", file=out, flush=True)
        await server.stop()
        return 0

    return asyncio.run(main())


def _banner(server: Server, loaded: LoadedConfig, loop_name: str, out) -> None:
    workers = f"; {server.workers} worker processes" if server.workers > 1 else ""
    print(f"relaywarden {loop_name} pid {os.getpid()}; configuration {loaded.file}{workers}", file=out)
    for rt in server.listeners:
        c = rt.config
        where = ", ".join(f"{a}:{p}" for a, p in rt.bound)
        print(f"  listener {c.name:<12} {where:<22} tls={c.tls.value:<9} anonymous={str(c.anonymous).lower():<5} "
              f"auth={'+'.join(c.auth) or '-'} relay={'authenticated' if c.allow_authenticated else ''}"
              f"{'+list' if c.relay.entries else ''}{'none' if not c.allow_authenticated and not c.relay.entries else ''}",
              file=out)
    print(f"  data   {server.data_dir.resolve()}\n  queue  {server.data_dir.resolve() / 'queue.sqlite'}\n"
          f"  events {server.data_dir.resolve() / 'log' / 'events.jsonl'}", file=out, flush=True)


def _supervise(loaded: LoadedConfig, data_dir: Path, *, out, loop_name: str, workers: int) -> int:
    """Fork the workers, pass SIGTERM/SIGINT on to them, restart one that dies, stop all if one
    cannot start.  ``workers`` processes accept (sharing the listeners with SO_REUSEPORT) and one
    more runs the queue runner; all share the queue and the event log."""
    problems = check_startable(loaded)
    if problems and not loaded.config.server.allow_open_relay:
        # the same refusal as Server.start, before any process is forked
        lines = [f"{p.where}: listener {p.listener}: {p.message}\n    fix: {p.fix}" for p in problems]
        print("relaywarden: refusing to start: this configuration makes an open relay\n" + "\n".join(lines),
              file=sys.stderr)
        return 2
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    if any(lc.tls != TlsMode.NONE and not lc.certificate for lc in loaded.config.listener):
        ensure_self_signed(Path(data_dir) / "tls", loaded.config.server.hostname)   # once, before the fork
    out.flush()
    sys.stderr.flush()

    def spawn(index: int) -> None:
        """Fork worker ``index`` and record it, with SIGTERM/SIGINT blocked meanwhile so that a
        stop can never miss a worker that was being forked."""
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            if stopping:
                return
            pid = os.fork()
            if pid != 0:
                children[pid] = index
                return
        finally:
            if os.getpid() == supervisor:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        # the worker: the supervisor's handlers must not run here (they would signal its siblings)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        code = 1
        try:
            role = "deliver" if index == workers else "accept"
            if role == "accept":
                counts.attach(index)        # before it listens: clears what a dead predecessor left
            code = _serve(loaded, data_dir, out=out, loop_name=loop_name, worker=index, role=role,
                          counts=counts if role == "accept" else None)
        finally:
            out.flush()
            os._exit(code)

    supervisor = os.getpid()
    counts = SharedCounts(len(loaded.config.listener), workers,   # the listeners' limits hold for all workers
                          max((lc.limits.max_connections for lc in loaded.config.listener), default=1))
    children: dict[int, int] = {}
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)     # before the first fork: no window without it
    signal.signal(signal.SIGINT, forward)
    for i in range(workers + (1 if loaded.config.delivery.enabled else 0)):
        spawn(i)            # 0 .. workers-1 accept; index `workers` delivers
    exit_code = 0
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = max(exit_code, code if code > 0 else 0)
            continue
        if code == 2:       # StartError: it cannot listen or load its certificate; neither will a new one
            print(f"relaywarden: worker {index} could not start; stopping", file=sys.stderr)
            exit_code = 2
            forward(signal.SIGTERM, None)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 5:
            print("relaywarden: workers keep dying (more than 5 restarts a minute); stopping", file=sys.stderr)
            exit_code = 1
            forward(signal.SIGTERM, None)
            continue
        print(f"relaywarden: worker {index} (pid {pid}) ended with {code}; starting it again", file=sys.stderr)
        spawn(index)
    return exit_code
