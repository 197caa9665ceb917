"""Typed calls of the ledger's Redis Functions, and the records they return."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from pointauth.server.clock import Clock
from pointauth.server.config import LedgerSettings
from pointauth.server.domain import reasons
from pointauth.server.domain.earning import EarnLine, LotKindCode, RankProgram
from pointauth.server.domain.ids import transaction_id
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import codec
from pointauth.server.ledger.card_hints import CardHints
from pointauth.server.ledger.codec import (
    CardKindCode,
    LotEntry,
    OpResult,
    PointOfSaleRef,
    TransactionRecord,
)
from pointauth.server.ledger.keys import Keyspace
from pointauth.server.ledger.pipeline import TickPipeline, in_rounds

SCRIPT_SOURCE = files("pointauth.server.ledger").joinpath("ledger.lua").read_text()


class LedgerRefusal(Exception):
    """A refusal by the ledger: nothing changed (but the refusal is remembered for retries)."""

    def __init__(self, result: OpResult) -> None:
        super().__init__(f"{result.code} {result.reason}: {result.message}")
        self.result = result


_VERSION_MARK = "$VERSION"
_LIBRARY_NAME = re.compile(r"pointauth_[0-9a-f]{16}")


@dataclass(frozen=True)
class LedgerLibrary:
    """ledger.lua as a Redis Functions library whose library and function names carry a hash of
    the source: a changed script is a new library beside the old one, never a replacement of
    what running servers call, and nobody has to remember to bump a version."""

    version: str
    source: str

    @classmethod
    def from_template(cls, template: str) -> LedgerLibrary:
        if not template.startswith(f"#!lua name=pointauth_{_VERSION_MARK}\n"):
            raise ValueError(f"a ledger library starts with #!lua name=pointauth_{_VERSION_MARK}")
        version = hashlib.sha256(template.encode()).hexdigest()[:16]
        return cls(version, template.replace(_VERSION_MARK, version))

    @property
    def name(self) -> str:
        return f"pointauth_{self.version}"

    @property
    def ledger_function(self) -> str:
        return f"pointauth_ledger_{self.version}"

    @property
    def release_card_function(self) -> str:
        return f"pointauth_release_card_{self.version}"

    @property
    def move_card_function(self) -> str:
        return f"pointauth_move_card_{self.version}"

    @property
    def take_budget_function(self) -> str:
        return f"pointauth_take_budget_{self.version}"

    @property
    def give_budget_function(self) -> str:
        return f"pointauth_give_budget_{self.version}"

    @property
    def settle_budget_function(self) -> str:
        return f"pointauth_settle_budget_{self.version}"


LIBRARY = LedgerLibrary.from_template(SCRIPT_SOURCE)


async def load_library(redis: Redis, library: LedgerLibrary = LIBRARY) -> bool:
    """FUNCTION LOAD unless Redis has the library already; True if this call loaded it.

    Never REPLACE: a name stands for one source, so a library of that name is this one, and
    another process loading it at the same moment is success, not a conflict."""
    try:
        await redis.function_load(library.source)
    except ResponseError as exc:
        if str(exc) == f"Library '{library.name}' already exists":
            return False
        if str(exc).startswith("unknown command"):
            raise RuntimeError("pointauth needs Redis 7.0 or later (Redis Functions)") from exc
        raise
    return True


async def drop_other_libraries(redis: Redis, keep: LedgerLibrary = LIBRARY) -> list[str]:
    """Deletes every pointauth library but `keep` (an operator's step after a deploy); returns
    their names. Safe at any time: a server still running an older release loads its own
    library again on its next call, as after a FUNCTION FLUSH."""
    dropped: list[str] = []
    for entry in await redis.function_list(library="pointauth_*"):
        name = _text(dict(zip(entry[::2], entry[1::2], strict=True))[b"library_name"])
        if name and name != keep.name and _LIBRARY_NAME.fullmatch(name):
            await redis.function_delete(name)
            dropped.append(name)
    return sorted(dropped)


def _function_missing(exc: ResponseError) -> bool:
    """FCALL's answer when Redis lacks the library: restarted without its data, a failover to
    a node without it, FUNCTION FLUSH, or an operator pruned this version."""
    return str(exc) == "Function not found"


_decode_result = codec.decode_result
_encode = codec.encode_args


class Ledger:
    """Every state change of an account is one call of the ledger function, on its shard's slot."""

    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        clock: Clock,
        settings: LedgerSettings,
        library: LedgerLibrary = LIBRARY,
        pipeline: TickPipeline | None = None,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.clock = clock
        self.settings = settings
        # The hot path's commands (card lookups, function calls) go out one pipeline per tick.
        self.pipeline = pipeline or TickPipeline(redis)
        # This release's functions; another release's servers call theirs in the same Redis.
        self.library = library
        self._ledger_function = library.ledger_function
        self._release_card_function = library.release_card_function
        self._move_card_function = library.move_card_function
        # card -> account, so that a till call on a card is one round trip (the FCALL); safe
        # however stale (card_hints.py).
        self.cards = CardHints(settings.card_cache_size)
        self._sweep_cursor = 0

    async def _call(
        self,
        op: str,
        account_id: str,
        args: dict[str, Any],
        request_id: str = "",
        fingerprint: str = "",
        blob: bytes | None = None,
        *,
        expiry_pages: int | None = None,
    ) -> OpResult:
        """One ledger call; again while it answers EXPIRY_CONTINUES (at most `expiry_pages`
        calls in all, None: until done), each a round trip of its own, so that other tills' calls
        run between them. Past `expiry_pages`, LedgerRefusal(EXPIRY_CONTINUES)."""
        keys = list(self.keyspace.account(account_id))
        if request_id:
            keys.append(self.keyspace.idempotency(account_id, request_id))
        packed = _encode(args)
        # By the wall clock, not self.clock (a test's may be any day): Redis expires the record by
        # its own, and the journal keeps it until then.
        record_expires_ms = int(time.time() * 1000) + self.settings.idempotency_ttl_seconds * 1000
        calls = 0
        while True:
            argv: list[bytes | str | int] = [
                op,
                self.clock.now_ms(),
                account_id,
                fingerprint,
                record_expires_ms,
                self.settings.transaction_retention_days * 86_400_000,
                packed,
            ]
            if blob is not None:
                argv.append(blob)
            result = _decode_result(await self._fcall(self._ledger_function, keys, argv))
            calls += 1
            if result.code != codec.EXPIRY_CONTINUES or calls == expiry_pages:
                break
        if result.code != "OK":
            raise LedgerRefusal(result)
        return result

    async def account_for_card(self, card_number: str) -> str | None:
        """The account the hints or the card index name (a hint: see on_card)."""
        account = self.cards.get(card_number)
        return account if account is not None else await self._index_lookup(card_number)

    async def _index_lookup(self, card_number: str) -> str | None:
        owner = await self.pipeline.execute("HGET", self.keyspace.card_bucket(card_number), card_number)
        account = codec.decode_card_owner(owner)
        self.cards.learn(card_number, account or "")
        return account

    async def on_card(self, card_number: str, call: Callable[[str], Awaitable[OpResult]]) -> tuple[str, OpResult]:
        """(account, answer) of `call(account)` for the account that has the card; `call` makes
        one ledger call naming the card (`card=`), which the script refuses with CARD_NOT_FOUND
        (writing nothing) unless the account has it. A hinted account so refused is forgotten,
        the index read again, and the call made once more on the account it names. A hinted
        card is one round trip; a stale hint costs two more, and never moves points elsewhere."""
        account = self.cards.get(card_number)
        hinted = account is not None
        hops = 0
        while True:
            if account is None:
                account, hinted = await self._index_lookup(card_number), False
                if account is None:
                    raise _card_not_found(card_number)
            try:
                result = await call(account)
            except LedgerRefusal as refusal:
                target = _merged_into(refusal)
                if target is not None and hops < MAX_MERGE_HOPS:
                    # The card went with its account into another: finish that merge (if a
                    # crash left it half-done), then follow.
                    hops += 1
                    await self.finish_merge(account)
                    account, hinted = target, True
                    continue
                if refusal.result.reason != _CARD_NOT_FOUND:
                    raise
                self.cards.learn(card_number, "")  # forgotten, the snapshot's entry included
                if not hinted:  # the index itself named an account without the card
                    raise _card_not_found(card_number) from None
                account = None
                continue
            self.cards.learn(card_number, account)
            return account, result

    async def create_account(
        self,
        account_id: str,
        card_number: str,
        request_id: str,
        fingerprint: str,
        *,
        kind: CardKindCode = "P",
        profile: ProfileChange | None = None,
    ) -> OpResult:
        """Opens the account with its first card (claimed in the card index first, see _claiming)."""
        args = {"card": card_number, "kind": kind, "rid": request_id, **(profile or ProfileChange()).args()}

        async def call() -> OpResult:
            return await self._call("create_account", account_id, args, request_id, fingerprint)

        if await self.redis.exists(self.keyspace.account(account_id).account):
            # Opened already (or this is a retry): the script answers (replay, or refusal)
            # without this request touching the card index.
            return await call()
        return await self._claiming(card_number, account_id, call)

    async def _claiming(self, card_number: str, account_id: str, call: Callable[[], Awaitable[OpResult]]) -> OpResult:
        """`call()`, a script call putting the card on the account, with the card claimed for the
        account in the card index first: the index (another slot) decides which of two
        concurrent links gets a card. A call the script refuses gives its claim back, so a
        refused request changes nothing. A crash between the claim and the call leaves a claim
        naming an account without the card (tills get CARD_NOT_FOUND): the retry of the request
        heals it."""
        bucket = self.keyspace.card_bucket(card_number)
        claimed = bool(await self.redis.hsetnx(bucket, card_number, codec.card_owner_value(account_id)))
        if not claimed and codec.decode_card_owner(await self.redis.hget(bucket, card_number)) != account_id:
            raise _card_taken(card_number)
        try:
            return await call()
        except LedgerRefusal:
            if claimed:
                await self._release_card(bucket, card_number, account_id)
            raise

    async def link_card(
        self, account_id: str, card_number: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> OpResult:
        args = {"card": card_number, "kind": kind, "rid": request_id}
        return await self._claiming(
            card_number, account_id, lambda: self._call("link_card", account_id, args, request_id, fingerprint)
        )

    async def unlink_card(self, account_id: str, card_number: str, *, request_id: str, fingerprint: str) -> OpResult:
        """Takes the card off the account (tills are refused at once), then gives its index
        entry back, unless the card is on the account again (a retry after a relink)."""
        args = {"card": card_number, "rid": request_id}
        result = await self._call("unlink_card", account_id, args, request_id, fingerprint)
        if not await self.redis.hexists(self.keyspace.account(account_id).account, codec.card_field(card_number)):
            await self._release_card(self.keyspace.card_bucket(card_number), card_number, account_id)
        return result

    async def set_card_state(
        self, card_number: str, state: Literal["A", "B"], *, request_id: str, fingerprint: str
    ) -> tuple[str, OpResult]:
        """Blocks ("B") or unblocks ("A") a card; (its account, answer)."""
        args = {"card": card_number, "state": state, "rid": request_id, "via": card_number, "any_state": True}
        return await self.on_card(
            card_number, lambda account: self._call("card_state", account, args, request_id, fingerprint)
        )

    async def reissue_card(
        self, card_number: str, new_card: str, kind: CardKindCode, *, request_id: str, fingerprint: str
    ) -> tuple[str, OpResult]:
        """Replaces a card by a new one on the same account; (the account, answer)."""
        args: dict[str, Any] = {"card": card_number, "new": new_card, "kind": kind, "rid": request_id}
        args |= {"via": card_number, "any_state": True}
        return await self.on_card(
            card_number,
            lambda account: self._claiming(
                new_card, account, lambda: self._call("reissue", account, args, request_id, fingerprint)
            ),
        )

    async def update_profile(
        self, account_id: str, change: ProfileChange, *, request_id: str, fingerprint: str
    ) -> AccountView:
        """The account as the update leaves it (a retry gets the same)."""
        args = {"rid": request_id, **change.args()}
        return _account_view(account_id, await self._call("update_profile", account_id, args, request_id, fingerprint))

    async def close(self, account_id: str, *, request_id: str, fingerprint: str) -> OpResult:
        return await self._call("close", account_id, {"rid": request_id}, request_id, fingerprint)

    async def account(self, account_id: str) -> AccountView:
        """The account's profile, cards and status, and its balance now, in one read."""
        return _account_view(account_id, await self._call("account", account_id, {}))

    async def account_by_card(self, card_number: str) -> AccountView:
        """As account(), for the account that has the card, whatever the card's state."""
        args = {"via": card_number, "any_state": True}
        account, result = await self.on_card(card_number, lambda a: self._call("account", a, args))
        return _account_view(account, result)

    async def _release_card(self, bucket: str, card_number: str, account_id: str) -> None:
        """Removes the card's link only if it still names this account (compare and delete)."""
        await self._fcall(self._release_card_function, [bucket], [card_number, account_id])

    async def merge(
        self, source: str, target: str, *, request_id: str, fingerprint: str, actor: str, why: str
    ) -> OpResult:
        """Merges `source` into `target` (a saga across their slots, each step one idempotent
        call): step 1 closes the source as MERGED and records the move in its slot; step 2
        applies the move on the target once (keyed by the merge id, "<source>:<request id>":
        request ids are the source's); step 3
        points the source's cards' index entries at the target; then the merge leaves the
        shard's list of unfinished merges. A crash anywhere is finished by finish_merge, which
        the recovery pass, and any call that meets the merged source, run. The answer is step
        1's: the points and lots moved."""
        # A retry answers as the first time, whatever the target has become since.
        if not await self.redis.exists(self.keyspace.idempotency(source, request_id)):
            view = await self.account(target)  # refuses a missing target (ACCOUNT_NOT_FOUND)
            if view.stored.status != "A":
                raise _not_active(target, view.stored)
        merge = f"{source}:{request_id}"
        args = {"target": target, "merge": merge, "rid": request_id, "actor": actor, "why": why}
        result = await self._call("merge_out", source, args, request_id, fingerprint)
        await self.finish_merge(source)
        return result

    async def finish_merge(self, source: str) -> bool:
        """Steps 2 and 3 of the source's merge, if it is not finished; True if it was not."""
        keys = self.keyspace.account(source)
        raw = await self.redis.hget(keys.transactions, codec.MERGE_MOVE_FIELD)
        if not isinstance(raw, bytes) or await self.redis.zscore(keys.merges, source) is None:
            return False
        move = codec.decode_merge_move(raw)
        cards = move.cards if isinstance(move.cards, dict) else {}
        args: dict[str, Any] = {"merge": move.merge, "source": source, "lots": move.lots, "cards": cards}
        if move.foreign:
            args["foreign"] = move.foreign
        if move.counts:
            args["counts"] = move.counts
        if move.earned:
            args["earned"] = True
        if move.visits:
            args["visits"] = move.visits
        if move.coupons:
            args["coupons"] = move.coupons
        on = move.target
        for _ in range(MAX_MERGE_HOPS + 1):
            try:
                await self._call("merge_in", on, args)
                break
            except LedgerRefusal as refusal:
                target = _merged_into(refusal)
                if target is None:
                    raise
                await self.finish_merge(on)
                on = target
        else:
            raise _too_many_merges(source)
        for card in sorted(cards):
            bucket = self.keyspace.card_bucket(card)
            await self._fcall(self._move_card_function, [bucket], [card, source, on])
            if self.cards.get(card) == source:
                self.cards.learn(card, on)
        await self.redis.zrem(keys.merges, source)
        return True

    async def finish_merges(self, older_than_ms: int = 0) -> int:
        """The recovery pass: finishes every merge left half-done that began at least
        `older_than_ms` ago; how many. Safe beside merges in progress: every step is idempotent."""
        latest = self.clock.now_ms() - older_than_ms
        merges = [self.keyspace.merges(shard) for shard in range(self.keyspace.shards)]
        replies: list[list[bytes]] = await in_rounds(
            self.redis, merges, lambda pipe, key: pipe.zrangebyscore(key, "-inf", latest)
        )
        finished = 0
        for member in (m for reply in replies for m in reply):
            finished += await self.finish_merge(member.decode())
        return finished

    async def use_coupon(
        self, card_number: str, coupon_id: str, *, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> tuple[str, OpResult]:
        """Uses a coupon of the card's account, once; (the account, answer)."""
        args = {"coupon": coupon_id, "pos": pos, "rid": request_id, "via": card_number}
        return await self.on_card(
            card_number, lambda account: self._call("use_coupon", account, args, request_id, fingerprint)
        )

    async def rank_review(self, account_id: str, ranks: RankArgs) -> OpResult:
        """The period's review of the account's rank, if a period has begun since its last."""
        return await self._call("rank_review", account_id, {"ranks": ranks.arg()})

    async def take_budget(self, campaign_id: str, points: int, budget: int) -> int:
        """Reserves up to `points` of a campaign's budget of `budget` points before an earn;
        returns how many (0 once it has run out). The campaign's spent count is one key in a
        slot of its own (Keyspace.budget): the reservation never lets it pass the budget,
        whatever runs at once on every shard. What the earn does not use goes back
        (settle_budget, give_budget); a crash in between leaves it reserved: a bounded
        under-spend, never an overspend."""
        key = self.keyspace.budget(campaign_id)
        return int(await self._fcall(self.library.take_budget_function, [key], [points, budget]))

    async def settle_budget(self, campaign_id: str, earn_id: str, reserved: int, granted: int) -> None:
        """After an earn: gives back what it reserved and did not grant, once per earn (a retry,
        whose answer is replayed, gives back all it reserved again)."""
        keys = [self.keyspace.budget(campaign_id), self.keyspace.budget_mark(campaign_id, earn_id)]
        ttl = self.settings.idempotency_ttl_seconds + Keyspace.BUDGET_MARK_MARGIN_S
        await self._fcall(self.library.settle_budget_function, keys, [reserved, granted, ttl])

    async def give_budget(self, campaign_id: str, points: int, refund_id: str | None = None) -> None:
        """Gives back a refused earn's reservation, or (once per refund) a refund's share."""
        if points <= 0:
            return
        keys = [self.keyspace.budget(campaign_id)]
        if refund_id is not None:
            keys.append(self.keyspace.budget_mark(campaign_id, refund_id))
        ttl = self.settings.idempotency_ttl_seconds + Keyspace.BUDGET_MARK_MARGIN_S
        await self._fcall(self.library.give_budget_function, keys, [points, ttl])

    async def budget_spent(self, campaign_id: str) -> int:
        return int(await self.redis.get(self.keyspace.budget(campaign_id)) or 0)

    async def load(self) -> bool:
        """Loads this release's library unless Redis has it (server start); True if this loaded it."""
        return await load_library(self.redis, self.library)

    async def _fcall(self, function: str, keys: list[str], args: list[bytes | str | int]) -> Any:
        """One FCALL, as one round trip (in the tick's pipeline). Only if Redis has lost the library (it answers
        "Function not found" without running anything): load it and call once more."""
        try:
            return await self.pipeline.execute("FCALL", function, len(keys), *keys, *args)
        except ResponseError as exc:
            if not _function_missing(exc):
                raise
        await self.load()
        return await self.pipeline.execute("FCALL", function, len(keys), *keys, *args)

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
        card: str | None = None,
        lines: Sequence[EarnLine] = (),
        rules_version: int = 0,
        ranks: RankArgs | None = None,
        qualifying_amount: int = 0,
        visit_day: int | None = None,
        receipt_horizon_ms: int | None = None,
    ) -> OpResult:
        """An earn (or a grant) of `points` into one lot; or, under the rules, of each of `lines`
        into its own lot, with the member's guards and caps decided by the script."""
        args: dict[str, Any] = {
            "type": "GRANT" if grant else "VISIT" if visit_day is not None else "EARN",
            "pts": points,
            "exp": expire_ms,
            "kind": kind,
            "pos": pos,
            "rid": request_id,
            "amount": purchase_amount,
            "ptime": purchase_ms,
        }
        if lines:
            args["lines"] = [_line_arg(line) for line in lines]
            args["rules"] = rules_version
        if ranks is not None:
            args["ranks"] = ranks.arg()
            args["qual"] = qualifying_amount
        if visit_day is not None:
            args["day"] = visit_day
        if receipt_horizon_ms is not None:
            args["soon"] = receipt_horizon_ms
        return await self._call("earn", account_id, _via(args, card), request_id, fingerprint)

    async def authorize(
        self,
        account_id: str,
        *,
        points: int,
        ttl_ms: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
        card: str | None = None,
    ) -> OpResult:
        args = {"pts": points, "ttl": ttl_ms, "pos": pos, "rid": request_id}
        return await self._call("authorize", account_id, _via(args, card), request_id, fingerprint)

    async def capture(
        self,
        account_id: str,
        hold_seq: int,
        *,
        points: int | None,
        request_id: str,
        fingerprint: str,
        receipt_horizon_ms: int | None = None,
        sale: SaleEarn | None = None,
        company: str | None = None,
    ) -> OpResult:
        """`receipt_horizon_ms`: also answer the receipt's facts (lots expiring within it...);
        `sale`: also earn for the sale the capture completes, in the same call; `company`: the
        caller's (see _company)."""
        args: dict[str, Any] = {"hold": hold_seq, "pts": -1 if points is None else points, "rid": request_id}
        if receipt_horizon_ms is not None:
            args["soon"] = receipt_horizon_ms
        if sale is not None:
            args |= sale.args()
        return await self._call("capture", account_id, _company(args, company), request_id, fingerprint)

    async def void(
        self, account_id: str, hold_seq: int, *, request_id: str, fingerprint: str, company: str | None = None
    ) -> OpResult:
        args = _company({"hold": hold_seq, "rid": request_id}, company)
        return await self._call("void", account_id, args, request_id, fingerprint)

    async def redeem(
        self,
        account_id: str,
        *,
        points: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
        card: str | None = None,
    ) -> OpResult:
        args = {"pts": points, "pos": pos, "rid": request_id}
        return await self._call("redeem", account_id, _via(args, card), request_id, fingerprint)

    async def refund(
        self,
        account_id: str,
        original_seq: int,
        *,
        points: int | None,
        pos: PointOfSaleRef | None,
        request_id: str,
        fingerprint: str,
        foreign: tuple[str, bytes] | None = None,
        ranks: RankArgs | None = None,
        company: str | None = None,
    ) -> OpResult:
        """A refund on this account; `foreign`: (the account, the record) of a transaction of an
        account merged into this one; `ranks`: a refunded earn lowers the qualifying spend;
        `company`: the caller's (see _company)."""
        args: dict[str, Any] = {
            "orig": original_seq,
            "pts": -1 if points is None else points,
            "pos": pos,
            "rid": request_id,
        }
        if foreign is not None:
            args["facct"] = foreign[0]
        if ranks is not None:
            args["ranks"] = ranks.arg()
        return await self._call(
            "refund",
            account_id,
            _company(args, company),
            request_id,
            fingerprint,
            blob=None if foreign is None else foreign[1],
        )

    async def refund_following(
        self,
        account_id: str,
        original_seq: int,
        *,
        points: int | None,
        pos: PointOfSaleRef | None,
        request_id: str,
        fingerprint: str,
        ranks: RankArgs | None = None,
        company: str | None = None,
    ) -> tuple[str, OpResult]:
        """(the account the refund landed on, answer): a transaction of an account since merged
        is refunded on the account it was merged into (following merges), with its record. A
        caller of another `company` than the transaction's is refused on the first account, as
        for an unknown id: before it could learn that the account was merged."""
        on, foreign = account_id, None
        for _ in range(MAX_MERGE_HOPS + 1):
            try:
                result = await self.refund(
                    on,
                    original_seq,
                    points=points,
                    pos=pos,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    foreign=foreign,
                    ranks=ranks,
                    company=company,
                )
                return on, result
            except LedgerRefusal as refusal:
                target = _merged_into(refusal)
                if target is None:
                    raise
                if foreign is None:
                    raw = await self.redis.hget(
                        self.keyspace.account(account_id).transactions, codec.record_field(original_seq)
                    )
                    if not isinstance(raw, bytes):
                        raise _no_transaction(account_id, original_seq) from None
                    foreign = (account_id, raw)
                await self.finish_merge(on)
                on = target
        raise _too_many_merges(account_id)

    async def balance(
        self, account_id: str, *, card: str | None = None, limit: int = 20, after: LotEntry | None = None
    ) -> OpResult:
        """Available and held points and a page of the spendable lots (at most `limit`, those
        after `after` in spending order); resolves what time has expired."""
        args: dict[str, Any] = {"limit": limit}
        if after is not None:
            args["after"] = [codec.lot_score(after.expire_ms, after.kind), after.lot_id]
        result = await self._call("balance", account_id, _via(args, card))
        page = result.page
        lots = [codec.decode_lot(page[i].encode(), float(page[i + 1])) for i in range(0, len(page), 2)]
        return msgspec.structs.replace(result, lots=lots, page=[])

    async def transaction(self, account_id: str, seq: int) -> TransactionRecord | None:
        raw = await self.redis.hget(self.keyspace.account(account_id).transactions, codec.record_field(seq))
        # The client never decodes responses (decode_responses=False): records are msgpack.
        return codec.decode_record(raw) if isinstance(raw, bytes) else None

    async def expired_hold_accounts(self, shards: range, limit_per_shard: int = 100) -> set[str]:
        """Accounts with a hold past its TTL, from the given shards' hold indexes."""
        now = self.clock.now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.zrangebyscore(self.keyspace.holds(shard), "-inf", now, start=0, num=limit_per_shard)
            replies: list[list[bytes]] = await pipe.execute()
        return {codec.parse_hold_member(member)[0] for reply in replies for member in reply}

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
        # Bounded work per tick; accounts left over are written down on a later visit (reads and
        # writes see their holds as expired meanwhile).
        swept = sorted(accounts)[: self.settings.sweep_accounts_per_tick]
        for account_id in swept:
            # One call each: an account with more holds to release than a call releases is
            # taken up again on a later tick (its holds still in the index).
            try:
                await self._call("balance", account_id, {"limit": 0}, expiry_pages=1)
            except LedgerRefusal as refusal:
                if refusal.result.code != codec.EXPIRY_CONTINUES:
                    raise
        return len(swept)


@dataclass(frozen=True)
class ProfileChange:
    """Profile fields to set (None: leave; "" for bd/hc: remove), attributes to set or remove,
    and whether every other attribute goes first (codec.MemberProfile names the fields)."""

    bd: str | None = None
    jt: int | None = None
    hc: str | None = None
    set_attrs: dict[str, str] | None = None
    drop_attrs: tuple[str, ...] = ()
    clear_attrs: bool = False

    def args(self) -> dict[str, Any]:
        prof = {k: v for k, v in (("bd", self.bd), ("jt", self.jt), ("hc", self.hc)) if v is not None}
        args: dict[str, Any] = {}
        if prof:
            args["prof"] = prof
        if self.set_attrs:
            args["aset"] = self.set_attrs
        if self.drop_attrs:
            args["adel"] = list(self.drop_attrs)
        if self.clear_attrs:
            args["aclear"] = True
        return args


def _line_arg(line: EarnLine) -> dict[str, Any]:
    """An EarnLine as the script's earn reads it (ledger.lua, OPS.earn)."""
    arg: dict[str, Any] = {"r": line.rule, "p": line.points, "e": line.expire_ms, "k": line.kind}
    if line.birthday_month:
        arg["bm"] = line.birthday_month
    if line.first_purchase:
        arg["fp"] = True
    if line.member_cap:
        arg["cap"] = line.member_cap
    if line.ranks:
        arg["rk"] = sorted(line.ranks)
    if line.limit_key:
        arg["lim"] = line.limit_key
    if line.budget:
        arg["b"] = True
    if line.short:
        arg["short"] = True
    if line.coupon:
        arg["cq"] = True
    return arg


@dataclass(frozen=True)
class SaleEarn:
    """An earn under the rules for the sale a capture completes (ledger.lua, OPS.capture)."""

    lines: Sequence[EarnLine]
    rules_version: int
    ranks: RankArgs | None
    qualifying_amount: int
    purchase_amount: int
    purchase_ms: int

    def args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "lines": [_line_arg(line) for line in self.lines],
            "rules": self.rules_version,
            "amount": self.purchase_amount,
            "ptime": self.purchase_ms,
        }
        if self.ranks is not None:
            args |= {"ranks": self.ranks.arg(), "qual": self.qualifying_amount}
        return args


@dataclass(frozen=True)
class RankArgs:
    """A rank program as the script applies it, with the current period's index."""

    program: RankProgram
    period: int

    def arg(self) -> dict[str, Any]:
        tiers = [[t.rank_id, t.min_spend] for t in self.program.tiers]
        return {"t": tiers, "p": self.period, "d": self.program.downgrade}


class AccountView(NamedTuple):
    """An account as GetAccount shows it: the account hash decoded (no lots or holds) and the
    balance now."""

    account_id: str
    stored: codec.StoredAccount
    available: int
    held: int


def _account_view(account_id: str, result: OpResult) -> AccountView:
    stored = codec.decode_account({k.encode(): v.encode() for k, v in result.fields.items()})
    return AccountView(account_id, stored, result.available, result.held)


MAX_MERGE_HOPS = 8
"""Merges followed from one account to the next (a chain longer than this is an error)."""


def _merged_into(refusal: LedgerRefusal) -> str | None:
    if refusal.result.reason != _ACCOUNT_MERGED:
        return None
    return refusal.result.meta.get("merged_into_account_id")


def _no_transaction(account_id: str, seq: int) -> LedgerRefusal:
    return LedgerRefusal(
        OpResult(
            code="NOT_FOUND",
            reason=reasons.name(ErrorReason.TRANSACTION_NOT_FOUND),
            message=f"no refundable transaction {transaction_id(account_id, seq)}",
        )
    )


def _too_many_merges(account_id: str) -> RuntimeError:
    return RuntimeError(f"account {account_id} is merged into a chain of more than {MAX_MERGE_HOPS} accounts")


def _not_active(account_id: str, stored: codec.StoredAccount) -> LedgerRefusal:
    if stored.status == "C":
        return LedgerRefusal(
            OpResult(
                code="FAILED_PRECONDITION",
                reason=reasons.name(ErrorReason.ACCOUNT_CLOSED),
                message=f"account {account_id} is closed",
            )
        )
    return LedgerRefusal(
        OpResult(
            code="FAILED_PRECONDITION",
            reason=_ACCOUNT_MERGED,
            message=f"account {account_id} was merged into {stored.merged_into}",
            meta={"merged_into_account_id": stored.merged_into or ""},
        )
    )


def _runs(shards: list[int]) -> list[range]:
    """[1022, 1023, 0, 1] -> [range(1022, 1024), range(0, 2)]."""
    runs: list[range] = []
    for shard in shards:
        if runs and runs[-1].stop == shard:
            runs[-1] = range(runs[-1].start, shard + 1)
        else:
            runs.append(range(shard, shard + 1))
    return runs


def _company(args: dict[str, Any], company: str | None) -> dict[str, Any]:
    """A capture, void or refund for a caller bound to a company names it: the script answers a
    hold or transaction of another company's point of sale as it answers an unknown id, before
    its replay check and writing nothing (ledger.lua, CO_SCOPED). None: no check (an operator,
    or auth off)."""
    if company is not None:
        args["co"] = company
    return args


def _via(args: dict[str, Any], card: str | None) -> dict[str, Any]:
    """A call made for a card names it: the script checks the account still has it."""
    if card is not None:
        args["via"] = card
    return args


_CARD_NOT_FOUND = reasons.name(ErrorReason.CARD_NOT_FOUND)
_ACCOUNT_MERGED = reasons.name(ErrorReason.ACCOUNT_MERGED)


def _card_not_found(card_number: str) -> LedgerRefusal:
    return LedgerRefusal(
        OpResult(code="NOT_FOUND", reason=_CARD_NOT_FOUND, message=f"no account has card {card_number}")
    )


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
