"""What a test checks besides the answers: the account's stored state and its events, read
through the ledger's codec (the one definition of what Redis stores)."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace, codec


async def account_state(redis: Redis, keyspace: Keyspace, account_id: str) -> codec.StoredAccount:
    """The account as stored: its hash (sequence, totals), lots and open holds."""
    keys = keyspace.account(account_id)
    # The client never decodes responses: every reply is bytes (redis-py types allow str too).
    stored: Any = await redis.hgetall(keys.account)
    lots: Any = await redis.zrange(keys.lots, 0, -1, withscores=True)
    holds: Any = await redis.zrange(keys.open_holds, 0, -1, withscores=True)
    return codec.decode_account(stored, lots, holds)


async def stream_events(redis: Redis, keyspace: Keyspace, account_id: str) -> list[codec.Event]:
    """The account's events in its shard's stream, in order."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keyspace.account(account_id).events)  # type: ignore[assignment]
    decoded = [codec.decode_stream_entry(fields) for _, fields in entries]
    # Notes (a refusal's request id, for the write-behind) are not events.
    return [e for e in decoded if isinstance(e, codec.Event) and e.account == account_id]


async def events(redis: Redis, keyspace: Keyspace, account_id: str) -> list[dict[str, Any]]:
    """stream_events as plain maps of the fields each event has (lots and points of sale as lists)."""
    return [msgspec.to_builtins(e) for e in await stream_events(redis, keyspace, account_id)]
