"""Which account has a card, as far as this server process knows: hints that make a till call on
a card one Redis round trip (the ledger function call) instead of two (the card index, then the
function).

A hint is never trusted. Every call made for a card names the card, and the ledger function
refuses it (CARD_NOT_FOUND, writing nothing) unless the account still has the card; Ledger.on_card
then reads the index and calls again. So hints need no invalidation when cards move, only a bound
on their memory. They come from two places:

- **A snapshot of the card index**, the whole of it, read once when the process starts
  (`ledger.card_index_snapshot`). With it, the first call on any card linked before the start is one
  round trip, whichever process the till reaches. It is kept as one bytes string per index bucket
  (`\\n<card>\\t<account>` entries), about 30 bytes a card, where a dict would take about 175.
- **Learned hints**: what this process looked up or changed since, newest last, at most
  `ledger.card_cache_size`; they take precedence over the snapshot. A learned "" is a card the
  index did not have: it is looked up again rather than sent to a stale snapshot entry.

Ids never contain a tab or a newline (card numbers and account ids are checked at the API), so an
entry's boundaries cannot occur inside one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from pointauth.server.ledger import codec
from pointauth.server.ledger.keys import CARD_BUCKETS, Keyspace, card_bucket_number

# Buckets read per round trip while loading, adapted to keep a round's reply near TARGET_ENTRIES
# card entries: a round of Redis work stays well under a millisecond, so the tills of the other
# processes never wait long behind it, and an almost empty index still loads in a few dozen rounds.
MIN_ROUND, MAX_ROUND = 16, 8192
TARGET_ENTRIES = 2_000


@dataclass(frozen=True)
class SnapshotLoad:
    """What reading the snapshot found, for the start-up log."""

    cards: int
    bytes: int
    rounds: int
    seconds: float


class CardHints:
    def __init__(self, learned_size: int) -> None:
        self.learned_size = learned_size
        self._learned: dict[str, str] = {}
        self._snapshot: list[bytes] = []

    def get(self, card_number: str) -> str | None:
        """The account hinted for the card, or None: look it up."""
        learned = self._learned.get(card_number)
        if learned is not None:
            return learned or None
        if not self._snapshot:
            return None
        card = card_number.encode()
        bucket = self._snapshot[card_bucket_number(card)]
        start = bucket.find(b"\n" + card + b"\t")
        if start < 0:
            return None
        start += len(card) + 2
        end = bucket.find(b"\n", start)
        return codec.decode_card_owner(bucket[start : end if end >= 0 else len(bucket)])

    def learn(self, card_number: str, account: str) -> None:
        """That the card is on `account` ("": on none, as far as the index said)."""
        if not self.learned_size or self._learned.get(card_number) == account:
            return
        self._learned.pop(card_number, None)  # re-inserted: it becomes the newest
        if len(self._learned) >= self.learned_size:
            del self._learned[next(iter(self._learned))]  # the oldest entry: FIFO is enough here
        self._learned[card_number] = account

    async def load_snapshot(self, redis: Redis, keyspace: Keyspace, *, scan_below: int = CARD_BUCKETS) -> SnapshotLoad:
        """Reads every bucket of the card index (HGETALL, a round of buckets per pipeline), or in
        a keyspace of fewer than `scan_below` keys, the buckets SCAN finds. Cards linked, moved
        or unlinked while it reads are still right: a stale entry is a hint the ledger function
        refuses, and on_card then looks the card up."""
        started = time.monotonic()
        snapshot: list[bytes] = [b""] * CARD_BUCKETS
        buckets: Sequence[int] = range(CARD_BUCKETS)
        if await redis.dbsize() < scan_below:
            # A small keyspace: finding the buckets that exist costs fewer round trips than
            # asking for every one (each costs the client some microseconds, even when empty).
            pattern = keyspace.card_bucket_pattern()
            buckets = sorted({int(key.rsplit(b":", 1)[1]) async for key in redis.scan_iter(pattern, 1_000)})
        cards = size = rounds = 0
        first, per_round = 0, MIN_ROUND
        while first < len(buckets):
            numbers = buckets[first : first + per_round]
            async with redis.pipeline(transaction=False) as pipe:
                for number in numbers:
                    pipe.hgetall(keyspace.card_bucket_key(number))
                replies: list[dict[bytes, bytes]] = await pipe.execute()
            entries = 0
            for number, links in zip(numbers, replies, strict=True):
                if links:
                    bucket = b"".join([b"\n%b\t%b" % link for link in links.items()])
                    snapshot[number] = bucket
                    entries += len(links)
                    size += len(bucket)
            cards += entries
            rounds += 1
            first += len(numbers)
            per_round = max(MIN_ROUND, min(MAX_ROUND, per_round * TARGET_ENTRIES // max(entries, 1)))
        self._snapshot = snapshot
        return SnapshotLoad(cards, size, rounds, time.monotonic() - started)
