"""The group directory in Redis: its keys share shard 0's slot with its stream, a registration
writes the entry, the version and the change in one transaction, and concurrent registrations
from several processes get one version each, in stream order."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.domain.group import Company, Entry, Refusal, Store, Terminal
from pointauth.server.ledger import Keyspace, codec
from pointauth.server.ledger.directory import DirectoryStore, Registered
from tests.conftest import START_MS


def test_every_directory_key_is_in_shard_0_s_slot() -> None:
    keys = Keyspace(1024).directory()
    assert keys == (
        "pa:{s0}:g:companies", "pa:{s0}:g:stores", "pa:{s0}:g:terminals", "pa:{s0}:g:version", "pa:{s0}:events",
    )  # fmt: skip
    assert keys.events == Keyspace(1024).events(0)


def test_a_change_is_a_third_kind_of_stream_entry() -> None:
    change = codec.DirectoryChange(3, START_MS, codec.TerminalEntry("store-1", "till-1", "Till 1"))
    raw = codec.encode_directory_change(change)
    assert msgspec.msgpack.decode(raw) == {
        "version": 3,
        "time": START_MS,
        "entry": {"type": "terminal", "store_id": "store-1", "terminal_id": "till-1", "name": "Till 1"},
    }
    assert codec.decode_stream_entry({codec.DIRECTORY_FIELD: raw}) == change
    with pytest.raises(msgspec.DecodeError, match="b'g'"):
        codec.decode_stream_entry({b"q": raw})


async def test_a_registration_writes_entry_version_and_change_together(
    redis: Redis, keyspace: Keyspace, clock: ManualClock
) -> None:
    store = DirectoryStore(redis, keyspace, clock)
    keys = keyspace.directory()
    assert await store.register(Company("acme", "Acme")) == Registered(Company("acme", "Acme"), 1, changed=True)
    clock.advance(5)
    registered = await store.register(Store("store-1", "acme", "kanto"))
    assert registered == Registered(Store("store-1", "acme", "kanto"), 2, changed=True)

    assert await redis.get(keys.version) == b"2"
    stored: Any = await redis.hgetall(keys.stores)
    assert stored == {b"store-1": codec.encode_directory_entry(codec.StoreEntry("store-1", "acme", "kanto"))}
    entries: Any = await redis.xrange(keys.events)
    assert [codec.decode_stream_entry(fields) for _, fields in entries] == [
        codec.DirectoryChange(1, START_MS, codec.CompanyEntry("acme", "Acme")),
        codec.DirectoryChange(2, START_MS + 5, codec.StoreEntry("store-1", "acme", "kanto")),
    ]
    # The same entry again: nothing written, the version it has answered.
    assert await store.register(Company("acme", "Acme")) == Registered(Company("acme", "Acme"), 2, changed=False)
    assert (await redis.xlen(keys.events), await redis.get(keys.version)) == (2, b"2")
    # A refusal writes nothing either.
    refused = await store.register(Terminal("store-404", "till-1"))
    assert isinstance(refused, Refusal)
    assert refused.reason_name == "STORE_NOT_FOUND"
    assert (await redis.xlen(keys.events), await redis.get(keys.version)) == (2, b"2")


async def test_concurrent_registrations_get_one_version_each_in_stream_order(
    redis: Redis, keyspace: Keyspace, clock: ManualClock, stack: EmbeddedStack
) -> None:
    await DirectoryStore(redis, keyspace, clock).register(Company("acme"))
    # Four "processes", each with its own connections, registering 25 stores each at once.
    clients = [Redis.from_url(stack.redis.url) for _ in range(4)]
    try:
        stores = [DirectoryStore(client, keyspace, clock) for client in clients]

        async def register_many(i: int) -> list[int]:
            versions = []
            for n in range(25):
                outcome = await stores[i].register(Store(f"s{i}-{n:02d}", "acme", "kanto"))
                assert isinstance(outcome, Registered)
                versions.append(outcome.version)
            return versions

        versions = await asyncio.gather(*(register_many(i) for i in range(4)))
    finally:
        for client in clients:
            await client.aclose()
    assert sorted(v for vs in versions for v in vs) == list(range(2, 102))
    entries: Any = await redis.xrange(keyspace.events(0))
    changes = [codec.decode_stream_entry(fields) for _, fields in entries]
    assert [c.version for c in changes if isinstance(c, codec.DirectoryChange)] == list(range(1, 102))
    loaded = await DirectoryStore(redis, keyspace, clock).load()
    assert (loaded.version, len(loaded.stores)) == (101, 100)


async def test_add_missing_writes_only_what_is_missing_and_no_change(
    redis: Redis, keyspace: Keyspace, clock: ManualClock
) -> None:
    store = DirectoryStore(redis, keyspace, clock)
    await store.register(Company("acme", "Acme"))
    entries: list[Entry] = [Company("acme", "other name"), Company("beta"), Store("b-1", "beta", "kanto")]
    assert await store.add_missing(entries) == (2, [Company("beta"), Store("b-1", "beta", "kanto")])
    assert await store.add_missing(entries) == (2, [])
    loaded = await store.load()
    assert (loaded.version, loaded.companies["acme"].display_name, sorted(loaded.companies)) == (
        2, "Acme", ["acme", "beta"],
    )  # fmt: skip
    assert await redis.xlen(keyspace.events(0)) == 1  # the registration's only
