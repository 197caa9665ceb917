"""Redis key names. Every key of an account carries its shard's hash tag, so one script call
touches a single hash slot and the same code runs on one Redis or a Redis Cluster."""

from __future__ import annotations

import zlib
from typing import NamedTuple

# Card lookups happen before the account is known, so cards live in their own keys: small
# hashes bucketed by card number, which Redis stores compactly (listpack) at 10M+ cards.
# Changing the bucket count would orphan every card: it is fixed.
CARD_BUCKETS = 1 << 18


def card_bucket_number(card_number: str | bytes) -> int:
    """The card index bucket that holds the card (Keyspace.card_bucket)."""
    return zlib.crc32(card_number.encode() if isinstance(card_number, str) else card_number) % CARD_BUCKETS


class AccountKeys(NamedTuple):
    """The keys one ledger script call may touch, in the order of the script's KEYS."""

    account: str
    transactions: str
    lots: str
    open_holds: str
    """The account's own open holds (`holds` is the shard's hold index)."""
    holds: str
    events: str
    merges: str
    """The shard's accounts merged out whose merge is not finished yet (the recovery pass's list)."""


class DirectoryKeys(NamedTuple):
    """The group directory's keys, all in shard 0's slot with that shard's stream, so that one
    MULTI/EXEC writes an entry, raises the version and appends the change to the stream."""

    companies: str
    stores: str
    terminals: str
    version: str
    events: str


class RulesKeys(NamedTuple):
    sets: str
    version: str
    events: str


class Keyspace:
    """Names keys for a fixed number of shards (changing `shards` requires a migration)."""

    def __init__(self, shards: int, prefix: str = "pa") -> None:
        self.shards = shards
        self.prefix = prefix

    def shard_of(self, account_id: str) -> int:
        return zlib.crc32(account_id.encode()) % self.shards

    def account(self, account_id: str) -> AccountKeys:
        tag = f"{self.prefix}:{{s{self.shard_of(account_id)}}}"
        return AccountKeys(
            account=f"{tag}:a:{account_id}",
            transactions=f"{tag}:x:{account_id}",
            lots=f"{tag}:l:{account_id}",
            open_holds=f"{tag}:o:{account_id}",
            holds=f"{tag}:holds",
            events=f"{tag}:events",
            merges=f"{tag}:merges",
        )

    def account_hash_pattern(self) -> str:
        """SCAN's MATCH for every account hash (an operator's full pass, never the hot path)."""
        return f"{self.prefix}:{{s*}}:a:*"

    def account_of_hash(self, key: bytes | str) -> str:
        """The account id in an account hash's key."""
        text = key.decode() if isinstance(key, bytes) else key
        return text.split(":a:", 1)[1]

    def idempotency(self, account_id: str, request_id: str) -> str:
        return f"{self.prefix}:{{s{self.shard_of(account_id)}}}:r:{account_id}:{request_id}"

    def events(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:events"

    def holds(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:holds"

    def rules(self) -> RulesKeys:
        """The published rule sets, in shard 0's slot with its stream (codec.py, rule sets)."""
        tag = f"{self.prefix}:{{s0}}"
        return RulesKeys(sets=f"{tag}:rs:sets", version=f"{tag}:rs:version", events=f"{tag}:events")

    def budget(self, campaign_id: str) -> str:
        """A campaign's budget: the points it has given so far (a slot of its own, so that every
        shard's earns reserve from the one count)."""
        return f"{self.prefix}:{{b:{campaign_id}}}:budget"

    BUDGET_MARK_MARGIN_S = 86_400
    """A budget mark outlives the idempotency record of its earn or refund by this much."""

    def budget_mark(self, campaign_id: str, transaction_id: str) -> str:
        """That an earn's reservation, or a refund's share, was settled with the budget once."""
        return f"{self.prefix}:{{b:{campaign_id}}}:done:{transaction_id}"

    def worker_leases(self) -> str:
        """Which write-behind worker applies which shards, until when (journal/lease.py)."""
        return f"{self.prefix}:wb:leases"

    def merges(self, shard: int) -> str:
        return f"{self.prefix}:{{s{shard}}}:merges"

    def card_bucket(self, card_number: str) -> str:
        return self.card_bucket_key(card_bucket_number(card_number))

    def card_bucket_key(self, number: int) -> str:
        return f"{self.prefix}:card:{number}"

    def card_bucket_pattern(self) -> str:
        """SCAN's MATCH for every card index bucket (start-up, never the hot path)."""
        return f"{self.prefix}:card:*"

    def directory(self) -> DirectoryKeys:
        tag = f"{self.prefix}:{{s0}}"
        return DirectoryKeys(
            companies=f"{tag}:g:companies",
            stores=f"{tag}:g:stores",
            terminals=f"{tag}:g:terminals",
            version=f"{tag}:g:version",
            events=self.events(0),
        )
