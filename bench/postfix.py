"""A private Debian Postfix instance on one loopback port, for benchmarks measured in the same run.

``PostfixInstance(root, port, queue_mode)`` writes its own configuration directory, queue
directory and maillog under ``root`` (nothing in /etc/postfix or /var/spool/postfix is touched),
starts it with ``postfix -c DIR start`` and stops it with ``postfix -c DIR stop`` (then SIGKILL of
every process left in its tree). It accepts mail for one relay domain and, in the first two
modes, never delivers it:

- ``defer``: the domain's transport is in ``defer_transports``; qmgr moves each message from the
  incoming to the deferred queue (Postfix's ordinary path, with its background work);
- ``hold``: an access rule answers HOLD; cleanup writes the message straight to the hold queue
  and nothing else touches it (the closest to relaywarden with delivery off);
- ``relay`` (with ``relay_port``): a transport map sends the domain to ``[127.0.0.1]:relay_port``
  over the ``relay`` transport (the smtp client; Postfix's default concurrency, connection cache
  and retry settings), so qmgr delivers every message and removes its queue file.

Either way a message is "accepted" only after cleanup has fsynced its queue file, Postfix's
default durability.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """Postfix would not start or stop; the message carries `postfix check` and the maillog."""


class PostfixInstance:
    def __init__(self, root: Path, port: int, *, domain: str = "example.test", queue_mode: str = "defer",
                 relay_port: int | None = None):
        if queue_mode not in ("defer", "hold", "relay"):
            raise ValueError(f"queue_mode must be defer, hold or relay, not {queue_mode!r}")
        if (queue_mode == "relay") != (relay_port is not None):
            raise ValueError("relay_port is given with queue_mode relay, and only then")
        self.relay_port = relay_port
        self.root = Path(root)
        self.port = port
        self.domain = domain
        self.queue_mode = queue_mode
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "lib"
        self.maillog = self.root / "maillog"
        self.started = False

    # --- configuration -------------------------------------------------------------------------

    def main_cf(self) -> str:
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            "command_directory = /usr/sbin",
            "daemon_directory = /usr/lib/postfix/sbin",
            "shlib_directory = /usr/lib/postfix",
            "meta_directory = /etc/postfix",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.root}",
            "myhostname = pf.example.test",
            "myorigin = $myhostname",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            f"relay_domains = {self.domain}",
            "relay_transport = relay:[127.0.0.1]:9",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "biff = no",
            "append_dot_mydomain = no",
            "smtputf8_enable = no",
        ]
        if self.queue_mode == "defer":
            lines.append("defer_transports = relay")
        elif self.queue_mode == "relay":
            lines += [f"transport_maps = inline:{{ {self.domain}=relay:[127.0.0.1]:{self.relay_port} }}",
                      "smtp_helo_name = pf.example.test"]
        else:
            lines.append("smtpd_recipient_restrictions = check_recipient_access static:HOLD")
        return "\n".join(lines) + "\n"

    def master_cf(self) -> str:
        return (f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + SERVICES)

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(self.master_cf())
        for d in (self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        self.maillog.touch()
        # the queue directory must be reachable by the postfix user
        for parent in [self.root, *self.root.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if not mode & 0o001:
                os.chmod(parent, mode | 0o011)

    # --- lifecycle -----------------------------------------------------------------------------

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(["/usr/sbin/postfix", "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 30.0) -> PostfixInstance:
        self.write_config()
        r = self._postfix("start")
        self.started = True
        deadline = time.monotonic() + timeout
        while self.master_pid() is None or not self._listening():
            if time.monotonic() > deadline:
                check = self._postfix("check")
                raise PostfixError(f"postfix did not start on port {self.port}:\n{r.stdout}{r.stderr}\n"
                                   f"postfix check: {check.stdout}{check.stderr}\nmaillog:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _listening(self) -> bool:
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def pids(self) -> list[int]:
        """The master and every process under it (smtpd, cleanup, qmgr, ...)."""
        master = self.master_pid()
        return [] if master is None else process_tree(master)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.started:
            return
        left = self.pids()
        try:
            self._postfix("stop", timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while any(Path(f"/proc/{p}").exists() for p in left) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.started = False

    # --- observation ---------------------------------------------------------------------------

    def queued(self) -> int:
        """Queue files in every queue (one per accepted message)."""
        return sum(count_files(self.queue_dir / q) for q in QUEUES)

    def settled(self) -> bool:
        """Nothing left for qmgr to move (incoming and active empty); relaying: the queue is empty."""
        if self.queue_mode == "relay":
            return self.queued() == 0
        return count_files(self.queue_dir / "incoming") == 0 and count_files(self.queue_dir / "active") == 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.maillog.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def count_files(directory: Path) -> int:
    n = 0
    for _, _, files in os.walk(directory):
        n += len(files)
    return n


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found
