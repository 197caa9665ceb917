"""Typed calls of the ledger script, and the records it returns."""

from __future__ import annotations

from importlib.resources import files
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from pointauth.server.clock import Clock
from pointauth.server.config import LedgerSettings
from pointauth.server.domain import reasons
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger.keys import Keyspace

LotKindCode = Literal["R", "L"]
SCRIPT_SOURCE = files("pointauth.server.ledger").joinpath("ledger.lua").read_text()


class LotEntry(msgspec.Struct, array_like=True, frozen=True):
    """A lot, or one transaction's effect on a lot (`points` is then a signed delta)."""

    lot_id: int
    points: int
    expire_ms: int
    kind: LotKindCode
    issuer_id: str


class PointOfSaleRef(msgspec.Struct, array_like=True, frozen=True):
    company_id: str
    store_id: str
    terminal_id: str
    channel: int


class OpResult(msgspec.Struct, frozen=True):
    """What a ledger script call answered; `code` is OK or the gRPC status name of a refusal."""

    code: str
    available: int = 0
    held: int = 0
    reason: str = ""
    message: str = ""
    meta: dict[str, str] = {}
    tx: int = 0
    pts: int = 0
    released: int = 0
    exp: int = 0
    lots: list[LotEntry] = []


class TransactionRecord(msgspec.Struct, frozen=True):
    """A transaction as the ledger keeps it for refunds and receipts."""

    type: Literal["EARN", "GRANT", "HOLD", "CAPTURE", "REDEMPTION", "REFUND"]
    time: int
    pts: int
    refunded: int
    available: int
    held: int
    pos: PointOfSaleRef | None = None
    lots: list[LotEntry] = []
    ref: int = 0
    state: str = ""
    exp: int = 0
    captured: int = 0
    released: int = 0
    capture: int = 0
    amount: int = 0


class LedgerRefusal(Exception):
    """A refusal by the ledger: nothing changed (but the refusal is remembered for retries)."""

    def __init__(self, result: OpResult) -> None:
        super().__init__(f"{result.code} {result.reason}: {result.message}")
        self.result = result


_RELEASE_CARD = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""

_decode_result = msgspec.msgpack.Decoder(OpResult).decode
_decode_record = msgspec.msgpack.Decoder(TransactionRecord).decode
_encode = msgspec.msgpack.Encoder().encode


class Ledger:
    """Every state change of an account is one call of the ledger script, on its shard's slot."""

    def __init__(self, redis: Redis, keyspace: Keyspace, clock: Clock, settings: LedgerSettings) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.clock = clock
        self.settings = settings
        # redis-py sends EVALSHA and reloads the script on NOSCRIPT (restart, failover, flush).
        self._script = redis.register_script(SCRIPT_SOURCE)
        self._release_script = redis.register_script(_RELEASE_CARD)
        # card -> account, saving a round trip per till call. Safe because a link is permanent:
        # CreateAccount refuses a linked card, and nothing unlinks one yet. Whatever adds
        # unlinking or moving cards must invalidate this cache in every server process.
        self._cards: dict[str, str] = {}
        self._sweep_cursor = 0

    async def _call(
        self,
        op: str,
        account_id: str,
        args: dict[str, Any],
        request_id: str = "",
        fingerprint: str = "",
    ) -> OpResult:
        keys = list(self.keyspace.account(account_id))
        if request_id:
            keys.append(self.keyspace.idempotency(account_id, request_id))
        argv: list[bytes | str | int] = [
            op,
            self.clock.now_ms(),
            account_id,
            fingerprint,
            self.settings.idempotency_ttl_seconds,
            self.settings.transaction_retention_days * 86_400_000,
            _encode(args),
        ]
        raw = await self._script(keys=keys, args=argv)
        result = _decode_result(raw)
        if result.code != "OK":
            raise LedgerRefusal(result)
        return result

    async def account_for_card(self, card_number: str) -> str | None:
        account = self._cards.get(card_number)
        if account is None:
            account = _text(await self.redis.hget(self.keyspace.card_bucket(card_number), card_number))
            if account is not None and self.settings.card_cache_size:
                if len(self._cards) >= self.settings.card_cache_size:
                    del self._cards[next(iter(self._cards))]  # the oldest entry: FIFO is enough here
                self._cards[card_number] = account
        return account

    async def create_account(self, account_id: str, card_number: str, request_id: str, fingerprint: str) -> OpResult:
        """Opens the account with its first card. The card index (another slot) decides which
        of two concurrent openings gets a card, so it is claimed first; an opening the account
        script then refuses gives its claim back. A refused request changes nothing."""
        keys = self.keyspace.account(account_id)
        if await self.redis.exists(keys.account):
            # Opened already (or this is a retry): the script answers (replay, or refusal)
            # without this request touching the card index.
            return await self._call(
                "create_account", account_id, {"card": card_number, "rid": request_id}, request_id, fingerprint
            )
        bucket = self.keyspace.card_bucket(card_number)
        claimed = bool(await self.redis.hsetnx(bucket, card_number, account_id))
        if not claimed and _text(await self.redis.hget(bucket, card_number)) != account_id:
            raise _card_taken(card_number)
        try:
            return await self._call(
                "create_account", account_id, {"card": card_number, "rid": request_id}, request_id, fingerprint
            )
        except LedgerRefusal:
            if claimed:
                await self._release_card(bucket, card_number, account_id)
            raise

    async def _release_card(self, bucket: str, card_number: str, account_id: str) -> None:
        """Removes the card's link only if it still names this account (compare and delete)."""
        await self._release_script(keys=[bucket], args=[card_number, account_id])

    async def earn(
        self,
        account_id: str,
        *,
        points: int,
        expire_ms: int,
        kind: LotKindCode,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
        grant: bool = False,
        purchase_amount: int = 0,
        purchase_ms: int = 0,
    ) -> OpResult:
        args = {
            "type": "GRANT" if grant else "EARN",
            "pts": points,
            "exp": expire_ms,
            "kind": kind,
            "pos": pos,
            "rid": request_id,
            "amount": purchase_amount,
            "ptime": purchase_ms,
        }
        return await self._call("earn", account_id, args, request_id, fingerprint)

    async def authorize(
        self,
        account_id: str,
        *,
        points: int,
        ttl_ms: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
    ) -> OpResult:
        args = {"pts": points, "ttl": ttl_ms, "pos": pos, "rid": request_id}
        return await self._call("authorize", account_id, args, request_id, fingerprint)

    async def capture(
        self,
        account_id: str,
        hold_seq: int,
        *,
        points: int | None,
        request_id: str,
        fingerprint: str,
    ) -> OpResult:
        args = {"hold": hold_seq, "pts": -1 if points is None else points, "rid": request_id}
        return await self._call("capture", account_id, args, request_id, fingerprint)

    async def void(self, account_id: str, hold_seq: int, *, request_id: str, fingerprint: str) -> OpResult:
        return await self._call("void", account_id, {"hold": hold_seq, "rid": request_id}, request_id, fingerprint)

    async def redeem(
        self,
        account_id: str,
        *,
        points: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
    ) -> OpResult:
        args = {"pts": points, "pos": pos, "rid": request_id}
        return await self._call("redeem", account_id, args, request_id, fingerprint)

    async def refund(
        self,
        account_id: str,
        original_seq: int,
        *,
        points: int | None,
        pos: PointOfSaleRef | None,
        request_id: str,
        fingerprint: str,
    ) -> OpResult:
        args = {
            "orig": original_seq,
            "pts": -1 if points is None else points,
            "pos": pos,
            "rid": request_id,
        }
        return await self._call("refund", account_id, args, request_id, fingerprint)

    async def balance(self, account_id: str) -> OpResult:
        """Available and held points and the spendable lots; resolves what time has expired."""
        return await self._call("balance", account_id, {})

    async def transaction(self, account_id: str, seq: int) -> TransactionRecord | None:
        raw = await self.redis.hget(self.keyspace.account(account_id).transactions, str(seq))
        # The client never decodes responses (decode_responses=False): records are msgpack.
        return _decode_record(raw) if isinstance(raw, bytes) else None

    async def expired_hold_accounts(self, shards: range, limit_per_shard: int = 100) -> set[str]:
        """Accounts with a hold past its TTL, from the given shards' hold indexes."""
        now = self.clock.now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(self.keyspace.holds(shard), "-inf", now, start=0, num=limit_per_shard)
            replies: list[list[bytes]] = await pipe.execute()
        return {member.decode().rpartition(".")[0] for reply in replies for member in reply}

    async def sweep_expired_holds(self, shard_count: int | None = None) -> int:
        """Releases holds past their TTL in the next `shard_count` shards (all by default), in
        turn, so that a periodic sweep costs little; returns how many accounts were swept."""
        count = min(shard_count or self.keyspace.shards, self.keyspace.shards)
        first = self._sweep_cursor
        self._sweep_cursor = (first + count) % self.keyspace.shards
        shards = [s % self.keyspace.shards for s in range(first, first + count)]
        accounts: set[str] = set()
        for run in _runs(shards):
            accounts |= await self.expired_hold_accounts(run)
        for account_id in accounts:
            await self.balance(account_id)
        return len(accounts)


def _runs(shards: list[int]) -> list[range]:
    """[1022, 1023, 0, 1] -> [range(1022, 1024), range(0, 2)]."""
    runs: list[range] = []
    for shard in shards:
        if runs and runs[-1].stop == shard:
            runs[-1] = range(runs[-1].start, shard + 1)
        else:
            runs.append(range(shard, shard + 1))
    return runs


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _card_taken(card_number: str) -> LedgerRefusal:
    return LedgerRefusal(
        OpResult(
            code="ALREADY_EXISTS",
            reason=reasons.name(ErrorReason.CARD_ALREADY_LINKED),
            message=f"card {card_number} is linked to another account",
        )
    )
