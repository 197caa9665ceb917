"""What a test checks besides the answers: the account's stored state and its events."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from pointauth.server.ledger import Keyspace


async def account_state(redis: Redis, keyspace: Keyspace, account_id: str) -> dict[bytes, bytes]:
    """The account hash as stored: lots, open holds and sequence."""
    stored = await redis.hgetall(keyspace.account(account_id).account)
    return {bytes(k): bytes(v) for k, v in stored.items()}  # type: ignore[arg-type]


async def events(redis: Redis, keyspace: Keyspace, account_id: str) -> list[dict[str, Any]]:
    """The account's events in its shard's stream, in order."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(keyspace.account(account_id).events)  # type: ignore[assignment]
    # Entries without "e" only point the write-behind at a refusal's idempotency record.
    decoded = [msgspec.msgpack.decode(fields[b"e"]) for _, fields in entries if b"e" in fields]
    return [event for event in decoded if event["account"] == account_id]
