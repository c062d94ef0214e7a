"""The user database: SMTP AUTH passwords (argon2 hashes), enabled flags and relay rights.

One JSON file in the data directory (``users.json``), replaced atomically on every change and
locked against concurrent writers, so ``relaywarden user ...`` works while the server runs; the
server notices a change by the file's modification time and rebuilds its ``Directory``.
Passwords are never stored in plaintext; hashes use argon2id with the parameters measured for this
project (time_cost=2, memory_cost=19456 KiB, parallelism=1).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .directory import UserRecord, lookup_key

FILE_NAME = "users.json"
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)

# Verified against when a login names no known user, so that a wrong user name costs the same
# time as a wrong password (no user enumeration by timing).
_DUMMY_HASH = HASHER.hash("relaywarden-no-such-user")


class UserError(Exception):
    pass


def hash_password(password: str) -> str:
    if not password:
        raise UserError("an empty password is not allowed")
    return HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Constant-work check (runs argon2 even for unknown users).  Call it off the event loop."""
    try:
        return HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class UserStore:
    """The users file of one data directory."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / FILE_NAME

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def records(self) -> list[UserRecord]:
        return [self._record(d) for d in self._read().values()]

    def get(self, address: str) -> UserRecord | None:
        data = self._read().get(lookup_key(address))
        return self._record(data) if data else None

    @staticmethod
    def _record(d: dict) -> UserRecord:
        aliases = d.get("aliases")
        return UserRecord(
            address=d["address"],
            password_hash=d.get("password_hash"),
            enabled=d.get("enabled"),
            relay=d.get("relay"),
            aliases=tuple(aliases) if aliases is not None else None,
        )

    def _read(self) -> dict[str, dict]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{self.path} is damaged ({exc}); restore it from a backup") from None
        return {lookup_key(u["address"]): u for u in data.get("users", [])}

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            users = self._read()
            yield users
            payload = json.dumps({"users": sorted(users.values(), key=lambda u: u["address"])}, indent=2)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(payload + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def add(self, address: str, password: str | None, *, relay: bool = True, aliases: tuple[str, ...] = (),
            taken: dict[str, str] | None = None) -> UserRecord:
        """Add a user. ``taken`` maps the lookup keys of addresses the configuration's mailboxes
        own (their addresses and aliases) to the mailbox: the new user and its aliases may not
        claim one, nor an address or alias of another user."""
        if "@" not in address:
            raise UserError(f"{address!r} is not an address (local@domain)")
        for alias in aliases:
            if "@" not in alias:
                raise UserError(f"alias {alias!r} is not an address (local@domain)")
        with self._locked() as users:
            key = lookup_key(address)
            if key in users:
                raise UserError(f"{address} already exists; use `relaywarden user passwd` to change its password")
            owners = dict(taken or {})
            for row in users.values():
                for owned in (row["address"], *(row.get("aliases") or ())):
                    owners.setdefault(lookup_key(owned), row["address"])
            if key in owners and lookup_key(owners[key]) != key:
                raise UserError(f"{address} is already an alias of mailbox {owners[key]}")
            for alias in aliases:
                owner = owners.get(lookup_key(alias))
                if owner is not None or lookup_key(alias) == key:
                    raise UserError(f"alias {alias} already belongs to mailbox {owner or address}; "
                                    "an address can belong to one mailbox only")
            rec = UserRecord(address=address, password_hash=hash_password(password) if password else None,
                             enabled=True, relay=relay, aliases=tuple(aliases) if aliases else None)
            users[key] = _row(rec)
        return rec

    def update(self, address: str, *, config_mailboxes: Iterable[str] | None = None, source: str = "",
               **changes) -> UserRecord:
        """Set password_hash / enabled / relay on a user, creating an overlay row for a
        configuration mailbox that has none yet. With ``config_mailboxes`` (the configuration's
        mailbox addresses, named ``source``), an address that is neither a user nor one of
        them is refused: a mistyped address must not become a new account that may relay."""
        with self._locked() as users:
            key = lookup_key(address)
            if (key not in users and config_mailboxes is not None
                    and key not in {lookup_key(a) for a in config_mailboxes}):
                raise UserError(
                    f"{address} is neither a user in {self.path} nor a [[mailbox]] of {source or 'the configuration'}; "
                    f"add it with `relaywarden user add {address}`, or pass --config FILE if it is a mailbox of "
                    "the configuration the server runs")
            row = users.get(key) or {"address": address}
            row.update({k: v for k, v in changes.items()})
            users[key] = row
            return self._record(row)


    def delete(self, address: str) -> None:
        """Remove a user (for a mailbox of the configuration: its overlay - password, flags)."""
        with self._locked() as users:
            key = lookup_key(address)
            if key not in users:
                raise UserError(f"{address} is not a user in {self.path}")
            del users[key]


def _row(rec: UserRecord) -> dict:
    d = asdict(rec)
    if d.get("aliases") is not None:
        d["aliases"] = list(d["aliases"])
    return {k: v for k, v in d.items() if v is not None}
