"""The mailbox directory: an immutable snapshot of every mailbox, its addresses and rights.

Mailboxes come from the configuration (``[[mailbox]]``) and from the user database in the data
directory (``relaywarden user ...``), which overlays passwords, the enabled flag and the relay right
and may add mailboxes of its own.  The relay decision reads a ``Directory``; it never touches the
database itself, so it stays a pure function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from .config.loader import LoadedConfig


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    address: str                    # primary address, also the AUTH login
    aliases: tuple[str, ...] = ()
    password_hash: str | None = None
    relay: bool = True
    enabled: bool = True
    source: str = ""                # "file:line" or "user database"

    @property
    def addresses(self) -> tuple[str, ...]:
        return (self.address, *self.aliases)


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A row of the user database: fields left None do not override the configuration."""

    address: str
    password_hash: str | None = None
    enabled: bool | None = None
    relay: bool | None = None
    aliases: tuple[str, ...] | None = None


def lookup_key(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local.casefold()}@{domain.lower()}"


class Directory:
    """Mailboxes by every address they own (case-insensitive local part)."""

    def __init__(self, entries: Iterable[MailboxEntry] = ()):
        self._entries: dict[str, MailboxEntry] = {}
        self._by_address: dict[str, MailboxEntry] = {}
        for entry in entries:
            self._entries[lookup_key(entry.address)] = entry
        for entry in self._entries.values():
            for addr in entry.addresses:
                self._by_address.setdefault(lookup_key(addr), entry)

    def find(self, address: str) -> MailboxEntry | None:
        """The mailbox that owns ``address`` (primary or alias), or None."""
        return self._by_address.get(lookup_key(address))

    def login(self, username: str) -> MailboxEntry | None:
        """The mailbox whose primary address is ``username`` (the AUTH identity)."""
        return self._entries.get(lookup_key(username))

    def __iter__(self) -> Iterator[MailboxEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def build(cls, loaded: LoadedConfig, users: Iterable[UserRecord] = ()) -> Directory:
        entries: dict[str, MailboxEntry] = {}
        for i, mb in enumerate(loaded.config.mailbox):
            entries[lookup_key(mb.address)] = MailboxEntry(
                address=mb.address,
                aliases=tuple(mb.aliases),
                password_hash=mb.password_hash,
                relay=mb.relay,
                enabled=mb.enabled,
                source=loaded.source.where("mailbox", i),
            )
        for user in users:
            key = lookup_key(user.address)
            base = entries.get(key) or MailboxEntry(address=user.address, source="user database")
            entries[key] = replace(
                base,
                password_hash=user.password_hash if user.password_hash is not None else base.password_hash,
                enabled=user.enabled if user.enabled is not None else base.enabled,
                relay=user.relay if user.relay is not None else base.relay,
                aliases=user.aliases if user.aliases is not None else base.aliases,
                source=base.source if base.source != "user database" else "user database",
            )
        return cls(entries.values())
