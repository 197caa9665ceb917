"""Published rule sets in Redis (formats: codec.py "rule sets", keys: Keyspace.rules).

Publishing is one optimistic transaction: WATCH the version, then MULTI/EXEC stores the rule set
under the next version, makes it current and appends the change to shard 0's stream (for the
journal). Two publications at once get consecutive versions; neither is lost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from pointauth.server.clock import Clock
from pointauth.server.domain.earning import RuleSet
from pointauth.server.ledger import codec
from pointauth.server.ledger.keys import Keyspace, RulesKeys


class RuleBook:
    def __init__(self, redis: Redis, keyspace: Keyspace, clock: Clock) -> None:
        self.redis = redis
        self.keys: RulesKeys = keyspace.rules()
        self.clock = clock

    async def version(self) -> int:
        return int(await self.redis.get(self.keys.version) or 0)

    async def get(self, version: int = 0) -> RuleSet | None:
        """A published version (0: the current one); None if there is none."""
        if version == 0:
            version = await self.version()
        raw: Any = await self.redis.hget(self.keys.sets, str(version)) if version else None
        return None if raw is None else codec.decode_rule_set(raw)

    async def publish(self, rule_set: RuleSet) -> RuleSet:
        """Stores `rule_set` as the next version and makes it current; returns it as stored."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.version)
                    version = int(await pipe.get(self.keys.version) or 0) + 1
                    stored = dataclasses.replace(rule_set, version=version, published_ms=self.clock.now_ms())
                    published = codec.RuleSetPublished(version, stored.published_ms, stored)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.keys.sets, str(version), codec.encode_rule_set(stored))
                    pipe.set(self.keys.version, version)
                    pipe.xadd(self.keys.events, {codec.RULE_SET_FIELD: codec.encode_rule_set_published(published)})
                    await pipe.execute()
                    return stored
                except WatchError:
                    continue  # another publication came first: take the version after it
