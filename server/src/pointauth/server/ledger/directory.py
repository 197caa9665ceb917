"""The group directory in Redis (formats: codec.py, keys: Keyspace.directory).

A registration is one optimistic transaction: WATCH the version key, read what the check needs,
then MULTI/EXEC writes the entry, raises the version and appends the change to shard 0's stream.
Every change raises the version, so a change made meanwhile by another process fails the EXEC
and the registration is read and checked again: the check and the write are atomic, without Lua.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from pointauth.server.clock import Clock
from pointauth.server.domain.group import (
    Company,
    Directory,
    Entry,
    Refusal,
    Store,
    Terminal,
    check_registration,
)
from pointauth.server.domain.settlement import PointValue
from pointauth.server.ledger import codec
from pointauth.server.ledger.keys import DirectoryKeys, Keyspace


@dataclass(frozen=True)
class Registered:
    entry: Entry
    version: int
    """The directory's version that has the entry: its change's, or, when the entry was stored
    exactly so already (nothing written), the version read."""
    changed: bool


def to_stored(entry: Entry) -> codec.DirectoryEntry:
    if isinstance(entry, Company):
        value = entry.point_value
        return codec.CompanyEntry(entry.company_id, entry.display_name, value.yen, value.points)
    if isinstance(entry, Store):
        return codec.StoreEntry(entry.store_id, entry.company_id, entry.region_id, entry.display_name)
    return codec.TerminalEntry(entry.store_id, entry.terminal_id, entry.display_name)


def directory_of(
    version: int,
    companies: Iterable[codec.CompanyEntry],
    stores: Iterable[codec.StoreEntry],
    terminals: Iterable[codec.TerminalEntry],
) -> Directory:
    return Directory(
        version=version,
        companies={c.company_id: _company(c) for c in companies},
        stores={s.store_id: Store(s.store_id, s.company_id, s.region_id, s.name) for s in stores},
        terminals={(t.store_id, t.terminal_id): Terminal(t.store_id, t.terminal_id, t.name) for t in terminals},
    )


@dataclass(frozen=True)
class StoredDirectory:
    """The directory's keys as stored, decoded."""

    version: int
    companies: list[codec.CompanyEntry]
    stores: list[codec.StoreEntry]
    terminals: list[codec.TerminalEntry]

    def directory(self) -> Directory:
        return directory_of(self.version, self.companies, self.stores, self.terminals)


class DirectoryStore:
    def __init__(self, redis: Redis, keyspace: Keyspace, clock: Clock) -> None:
        self.redis = redis
        self.keys: DirectoryKeys = keyspace.directory()
        self.clock = clock

    async def read(self) -> StoredDirectory:
        """Everything, as of one instant (one MULTI/EXEC of reads)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(self.keys.version)
            pipe.hgetall(self.keys.companies)
            pipe.hgetall(self.keys.stores)
            pipe.hgetall(self.keys.terminals)
            replies: list[Any] = await pipe.execute()
        version, companies, stores, terminals = replies
        return StoredDirectory(
            version=codec.decode_directory_version(version),
            companies=[codec.decode_company(raw) for raw in companies.values()],
            stores=[codec.decode_store(raw) for raw in stores.values()],
            terminals=[codec.decode_terminal(raw) for raw in terminals.values()],
        )

    async def load(self) -> Directory:
        return (await self.read()).directory()

    async def version(self) -> int:
        return codec.decode_directory_version(await self.redis.get(self.keys.version))

    def _hash(self, entry: codec.DirectoryEntry) -> str:
        if isinstance(entry, codec.CompanyEntry):
            return self.keys.companies
        if isinstance(entry, codec.StoreEntry):
            return self.keys.stores
        return self.keys.terminals

    async def register(self, entry: Entry) -> Registered | Refusal:
        """Creates or updates `entry` once `check_registration` allows it (else its refusal,
        with nothing written). An entry stored exactly so already is left alone."""
        stored = to_stored(entry)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.version)
                    outcome = await self._check(pipe, entry, stored)
                    if not isinstance(outcome, tuple):
                        return outcome
                    version, current = outcome
                    if current == stored:
                        return Registered(entry, version, changed=False)
                    change = codec.DirectoryChange(version + 1, self.clock.now_ms(), stored)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self._hash(stored), codec.directory_field(stored), codec.encode_directory_entry(stored))
                    pipe.incr(self.keys.version)
                    pipe.xadd(self.keys.events, {codec.DIRECTORY_FIELD: codec.encode_directory_change(change)})
                    await pipe.execute()
                    return Registered(entry, change.version, changed=True)
                except WatchError:
                    continue  # another change came first: read and check again

    async def _check(
        self, pipe: Pipeline, entry: Entry, stored: codec.DirectoryEntry
    ) -> tuple[int, codec.DirectoryEntry | None] | Refusal:
        """(version, the entry as stored now) under WATCH, or the refusal."""
        version = codec.decode_directory_version(await pipe.get(self.keys.version))
        # The client never decodes responses: every reply is bytes (redis-py types allow str too).
        raw: Any = await pipe.hget(self._hash(stored), codec.directory_field(stored))
        named: Any
        current: codec.DirectoryEntry | None = None
        company: Company | None = None
        store: Store | None = None
        if isinstance(stored, codec.CompanyEntry):
            current = None if raw is None else codec.decode_company(raw)
        elif isinstance(stored, codec.StoreEntry):
            current = None if raw is None else codec.decode_store(raw)
            store = None if current is None else _store(current)
            named = await pipe.hget(self.keys.companies, stored.company_id)
            company = None if named is None else _company(codec.decode_company(named))
        else:
            current = None if raw is None else codec.decode_terminal(raw)
            named = await pipe.hget(self.keys.stores, stored.store_id)
            store = None if named is None else _store(codec.decode_store(named))
        refusal = check_registration(entry, company=company, store=store)
        if refusal is not None:
            await pipe.unwatch()  # type: ignore[no-untyped-call]
            return refusal
        return version, current

    async def add_missing(self, entries: Sequence[Entry]) -> tuple[int, list[Entry]]:
        """Writes the entries the directory lacks (never changing one it has) and raises the
        version once if any; no stream entry: for bulk loads that write PostgreSQL themselves.
        Returns (the version after, the entries written)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.version)
                    version = codec.decode_directory_version(await pipe.get(self.keys.version))
                    present = {
                        key: set(await pipe.hkeys(key))
                        for key in (self.keys.companies, self.keys.stores, self.keys.terminals)
                    }
                    missing: dict[str, dict[bytes, bytes]] = {}
                    added: list[Entry] = []
                    for entry in entries:
                        stored = to_stored(entry)
                        key, field = self._hash(stored), codec.directory_field(stored)
                        if field not in present[key] and field not in missing.get(key, {}):
                            missing.setdefault(key, {})[field] = codec.encode_directory_entry(stored)
                            added.append(entry)
                    if not added:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return version, []
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for key, mapping in missing.items():
                        pipe.hset(key, mapping=_mapping(mapping))
                    pipe.incr(self.keys.version)
                    replies: list[Any] = await pipe.execute()
                    return int(replies[-1]), added
                except WatchError:
                    continue

    async def replace(
        self,
        version: int,
        companies: Sequence[codec.CompanyEntry],
        stores: Sequence[codec.StoreEntry],
        terminals: Sequence[codec.TerminalEntry],
    ) -> None:
        """Makes the directory exactly this (rehydrate), atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.companies, self.keys.stores, self.keys.terminals, self.keys.version)
            for key, entries in (
                (self.keys.companies, companies),
                (self.keys.stores, stores),
                (self.keys.terminals, terminals),
            ):
                if entries:
                    pipe.hset(
                        key,
                        mapping=_mapping({codec.directory_field(e): codec.encode_directory_entry(e) for e in entries}),
                    )
            if version:
                pipe.set(self.keys.version, version)
            await pipe.execute()


def _company(entry: codec.CompanyEntry) -> Company:
    return Company(entry.company_id, entry.name, PointValue(entry.yen, entry.per))


def _store(entry: codec.StoreEntry) -> Store:
    return Store(entry.store_id, entry.company_id, entry.region_id, entry.name)


def _mapping(fields: Mapping[bytes, bytes]) -> Any:
    # redis-py types hset's mapping with str keys; bytes are what it sends either way.
    return dict(fields)
