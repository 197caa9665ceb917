"""A write-behind worker's lease on its shards: at most one live worker applies a shard.

Two workers reading the same streams split each account's events between them in read order; each
then holds back the events after the other's as a gap, and they wait for XAUTOCLAIM (claim_idle_ms)
to come round, a few at a time, each round a delivery towards dead-lettering. Measured with
`pointauth dev` and a second `pointauth worker` on the same stack, a burst of 600 tills' calls
left 435 events held back and the journal minutes behind. Two workers on the same shards happen by
mistake or in a rolling restart that overlaps: so a worker takes a lease before it reads, and a
second one for the same shards waits, saying who holds them, until the first stops (it gives the
lease back) or dies (the lease lapses after `lease_ms` without renewal).

The leases are one hash in Redis, field `count/index` (the worker's `--count` and `--index`),
value "expiry_ms consumer", Redis's clock. A worker of another `--count` would read some of the
same streams, whatever its index: a live lease of another count refuses it too. The same consumer
name takes its own lease back at once, so a restart after a crash under the same name does not
wait.

The lease keeps workers from slowing each other down; it is not what keeps the journal right. A
worker that stalls past its lease (a long PostgreSQL commit) may still commit the batch it holds
after another has taken over: per-account sequence checks under the account's row lock
(journal/writer.py) apply each event once and in order whoever commits it, as they always did.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace

_LEASE_LUA = """
local key, field, me, ttl, mode = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function parse(v)
    local expiry, who = string.match(v, '^(%d+) (.*)$')
    return tonumber(expiry), who
end
if mode == 'take' then
    local count = string.match(field, '^(%d+)/')
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
        local f, expiry, who = all[i], parse(all[i + 1])
        if expiry <= now then
            redis.call('HDEL', key, f)
        elseif who ~= me and (f == field or string.match(f, '^(%d+)/') ~= count) then
            return {0, who, f, expiry - now}
        end
    end
    redis.call('HSET', key, field, (now + ttl) .. ' ' .. me)
    return {1}
end
local v = redis.call('HGET', key, field)
local expiry, who = nil, nil
if v then expiry, who = parse(v) end
if who ~= me then
    return {0}
end
if mode == 'renew' then
    redis.call('HSET', key, field, (now + ttl) .. ' ' .. me)
else
    redis.call('HDEL', key, field)
end
return {1}
"""


@dataclass(frozen=True)
class Holder:
    """Who holds shards a worker asked for: their consumer, lease (`count/index`) and its time left."""

    consumer: str
    lease: str
    remaining_ms: int


class ShardLease:
    def __init__(self, redis: Redis, keyspace: Keyspace, index: int, count: int, consumer: str, lease_ms: int) -> None:
        self.key = keyspace.worker_leases()
        self.field = f"{count}/{index}"
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._script = redis.register_script(_LEASE_LUA)

    async def _call(self, mode: str) -> list[bytes | int]:
        reply: list[bytes | int] = await self._script(
            keys=[self.key], args=[self.field, self.consumer, self.lease_ms, mode]
        )
        return reply

    async def take(self) -> Holder | None:
        """Takes the lease: None when taken, else who holds (some of) these shards."""
        reply = await self._call("take")
        if reply[0] == 1:
            return None
        who, lease, remaining = reply[1], reply[2], reply[3]
        return Holder(_text(who), _text(lease), int(remaining))

    async def renew(self) -> bool:
        """False when the lease is no longer this worker's (it lapsed, and another took it)."""
        return (await self._call("renew"))[0] == 1

    async def release(self) -> None:
        await self._call("release")


def _text(value: bytes | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
