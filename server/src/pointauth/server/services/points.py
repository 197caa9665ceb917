"""The till's use cases: earn, hold, capture, void, redeem, refund, balance and receipt."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from pointauth.server.clock import Clock
from pointauth.server.domain.earning import (
    BASE_RULE,
    NOTE_BUDGET,
    NOTE_MEMBER_CAP,
    NOTE_NOT_BIRTHDAY_MONTH,
    NOTE_NOT_FIRST_PURCHASE,
    NOTE_NOT_RANK,
    BasketLine,
    EarnLine,
    RuleSet,
)
from pointauth.server.domain.ids import transaction_id
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import (
    Ledger,
    LedgerRefusal,
    LotEntry,
    OpResult,
    PointOfSaleRef,
    RankArgs,
    SaleEarn,
    TransactionRecord,
)
from pointauth.server.ledger.codec import CouponEntry, EarnLineEntry
from pointauth.server.rules import receipt
from pointauth.server.rules.earn_policy import EarnPolicy
from pointauth.server.rules.engine import DAY_MS, earning_amount, rank_after, visit_lines
from pointauth.server.rules.receipt import Facts, ReceiptLine
from pointauth.server.services.directory import DirectoryService
from pointauth.server.services.refusals import failed_precondition, not_found, renamed_not_found
from pointauth.server.services.rules import RulesService


class Outcome(NamedTuple):
    """What the ledger answered, and for which account (a card names it only indirectly)."""

    account_id: str
    result: OpResult


class Earned(NamedTuple):
    """An earn's answer: the ledger's, for which account (the rule set version it used, and
    the rest, are in the answer: a retry gets it as it was)."""

    account_id: str
    result: OpResult


class PointsService:
    def __init__(
        self,
        ledger: Ledger,
        policy: EarnPolicy,
        clock: Clock,
        directory: DirectoryService | None = None,
        rules: RulesService | None = None,
    ) -> None:
        self.ledger = ledger
        self.policy = policy
        self.clock = clock
        self.directory = directory
        """The group directory every point of sale is checked against; None: no check."""
        self.rules = rules
        """The published rule set; None, or none published: the configured base rate."""

    def check_point_of_sale(self, pos: PointOfSaleRef) -> None:
        """Refuses a point of sale the group directory lacks, before anything reaches the ledger
        (so nothing is written, not even an idempotency record: a retry after the store is
        registered goes through). From this process's copy: no round trip."""
        if self.directory is not None:
            self.directory.check(pos)

    # A call made for a card goes through Ledger.on_card: one round trip when the process
    # knows the card's account, and refused, never misapplied, if that link has gone stale.

    async def earn(
        self,
        card_number: str,
        *,
        purchase_amount: int,
        purchase_ms: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
        basket: tuple[BasketLine, ...] = (),
    ) -> Earned:
        self.check_point_of_sale(pos)
        rule_set = self.rules.current if self.rules is not None else None
        if rule_set is not None and rule_set.version:
            assert self.rules is not None
            purchase = self.rules.purchase(pos, purchase_amount, basket, purchase_ms)
            return await self._earn_lines(
                card_number,
                self.rules.lines(rule_set, purchase),
                rule_set.version,
                self.rules.rank_args(rule_set),
                earning_amount(purchase),
                purchase_amount,
                purchase_ms,
                pos,
                request_id,
                fingerprint,
            )
        points = self.policy.points_for(purchase_amount)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.earn(
                account,
                points=points,
                expire_ms=self.policy.expire_ms(purchase_ms),
                kind="R",
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                purchase_amount=purchase_amount,
                purchase_ms=purchase_ms,
                card=card_number,
                receipt_horizon_ms=self.receipt_horizon_ms(),
            ),
        )
        return Earned(account, result)

    async def _earn_lines(
        self,
        card_number: str,
        lines: list[EarnLine],
        rules_version: int,
        ranks: RankArgs | None,
        qualifying_amount: int,
        purchase_amount: int,
        purchase_ms: int,
        pos: PointOfSaleRef,
        request_id: str,
        fingerprint: str,
    ) -> Earned:
        """An earn under the rules, on the card's account."""

        def call(lines: list[EarnLine]) -> Awaitable[tuple[str, OpResult]]:
            return self.ledger.on_card(
                card_number,
                lambda account: self.ledger.earn(
                    account,
                    points=0,
                    expire_ms=0,
                    kind="R",
                    pos=pos,
                    request_id=request_id,
                    fingerprint=fingerprint,
                    purchase_amount=purchase_amount,
                    purchase_ms=purchase_ms,
                    card=card_number,
                    lines=lines,
                    rules_version=rules_version,
                    ranks=ranks,
                    qualifying_amount=qualifying_amount,
                    receipt_horizon_ms=self.receipt_horizon_ms(),
                ),
            )

        account, result = await self._within_budgets(lines, call)
        return Earned(account, result)

    async def _within_budgets(
        self, lines: list[EarnLine], call: Callable[[list[EarnLine]], Awaitable[tuple[str, OpResult]]]
    ) -> tuple[str, OpResult]:
        """`call(lines)`, an earn's ledger call, with each budgeted campaign's points reserved
        first (the budget is another slot's: Ledger.take_budget) and what the account's script
        did not grant (its member cap or guards) given back after, once; everything if the earn
        is refused. The budgets' calls of one earn run at once: in the same tick's pipeline."""
        budgeted = [i for i, line in enumerate(lines) if line.budget and line.points]
        taken = await asyncio.gather(
            *(self.ledger.take_budget(lines[i].rule, lines[i].points, lines[i].budget) for i in budgeted)
        )
        reserved = {lines[i].rule: n for i, n in zip(budgeted, taken, strict=True)}
        for i, n in zip(budgeted, taken, strict=True):
            if n < lines[i].points:
                lines[i] = dataclasses.replace(lines[i], points=n, short=lines[i].points - n)
        try:
            account, result = await call(lines)
        except LedgerRefusal:
            # Refused: nothing was granted. (Any other failure may come after the script ran: the
            # reservation stays, a bounded under-spend, never an overspend.)
            await asyncio.gather(*(self.ledger.give_budget(rule, n) for rule, n in reserved.items()))
            raise
        granted = {line.rule: line.points for line in result.lines}
        earn_id = transaction_id(account, result.etx or result.tx)
        await asyncio.gather(
            *(self.ledger.settle_budget(rule, earn_id, n, granted.get(rule, 0)) for rule, n in reserved.items())
        )
        return account, result

    def sale_lines(
        self, pos: PointOfSaleRef, purchase_amount: int, basket: tuple[BasketLine, ...], purchase_ms: int
    ) -> tuple[list[EarnLine], int, RankArgs | None, int]:
        """What a sale earns: (lines, rule set version, rank program, qualifying amount); with no
        rule set published, one base line at the configured rate."""
        rule_set = self._rule_set()
        if self.rules is None or not rule_set.version:
            base = EarnLine(BASE_RULE, self.policy.points_for(purchase_amount), "R", self.policy.expire_ms(purchase_ms))
            return [base], 0, None, purchase_amount
        purchase = self.rules.purchase(pos, purchase_amount, basket, purchase_ms)
        return (
            self.rules.lines(rule_set, purchase),
            rule_set.version,
            self.rules.rank_args(rule_set),
            earning_amount(purchase),
        )

    def _rule_set(self) -> RuleSet:
        return self.rules.current if self.rules is not None else RuleSet(version=0)

    def receipt_horizon_ms(self) -> int:
        return self._rule_set().receipt.expiring_within_days * DAY_MS

    async def receipt_lines(self, result: OpResult, *, earned: bool) -> list[ReceiptLine]:
        """The promotional receipt of an earn's (`earned`) or a capture's answer, in the words of
        the rule set the earn used, at the instant it was made: a retry prints the same."""
        by_rule = tuple((line.rule, line.points) for line in result.lines)
        if earned and not by_rule:
            by_rule = ((BASE_RULE, result.pts),)  # an earn at the configured rate
        facts = Facts(
            earned=by_rule,
            available=result.available,
            expiring=tuple((lot.expire_ms, lot.points) for lot in result.soon),
            birthday=result.bd,
            rank_id=result.rank,
            spend=result.spend,
            coupons=tuple((c.coupon_id, c.campaign_id, c.expire_ms) for c in result.coupons),
        )
        rule_set = self._rule_set()
        if self.rules is not None and result.rules and result.rules != rule_set.version:
            rule_set = await self.rules.get(result.rules)
        return receipt.lines(rule_set, facts, self.policy.zone, result.now or self.clock.now_ms())

    async def use_coupon(
        self, card_number: str, coupon_id: str, *, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> tuple[str, CouponEntry]:
        """(the account, the coupon as used)."""
        self.check_point_of_sale(pos)
        account, result = await self.ledger.use_coupon(
            card_number, coupon_id, pos=pos, request_id=request_id, fingerprint=fingerprint
        )
        return account, result.coupons[0]

    async def check_in(
        self, card_number: str, *, visit_ms: int, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> Earned:
        """A visit's points: each visit rule that applies, once per its limit (a day, in the
        program's time zone), decided by the account's script."""
        self.check_point_of_sale(pos)
        rule_set = self.rules.current if self.rules is not None else RuleSet(version=0)
        lines: list[EarnLine] = []
        if self.rules is not None:
            lines = visit_lines(rule_set, self.rules.purchase(pos, 0, (), visit_ms), self.policy.expire_ms(visit_ms))
        if not lines:
            raise failed_precondition(
                ErrorReason.NO_VISIT_RULE, "no visit rule of the current rule set gives points for this visit"
            )
        assert self.rules is not None
        ranks = self.rules.rank_args(rule_set)
        day = self.policy.local_time(visit_ms).date().toordinal()
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.earn(
                account,
                points=0,
                expire_ms=0,
                kind="R",
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                purchase_ms=visit_ms,
                card=card_number,
                lines=lines,
                rules_version=rule_set.version,
                ranks=ranks,
                visit_day=day,
                receipt_horizon_ms=self.receipt_horizon_ms(),
            ),
        )
        return Earned(account, result)

    async def simulate(
        self,
        card_number: str | None,
        *,
        purchase_amount: int,
        purchase_ms: int,
        pos: PointOfSaleRef,
        basket: tuple[BasketLine, ...] = (),
    ) -> tuple[int, list[EarnLineEntry], list[str]]:
        """(rule set version, what each rule would give now, the campaigns that would issue a
        coupon), writing nothing: the member's guards and caps as they stand (when a card is
        given), budgets as they stand."""
        self.check_point_of_sale(pos)
        rule_set = self.rules.current if self.rules is not None else RuleSet(version=0)
        if self.rules is None or not rule_set.version:
            points = self.policy.points_for(purchase_amount)
            return 0, [EarnLineEntry(BASE_RULE, points, 0)], []
        purchase = self.rules.purchase(pos, purchase_amount, basket, purchase_ms)
        lines = self.rules.lines(rule_set, purchase)
        member = (await self.ledger.account_by_card(card_number)).stored if card_number else None
        ranks = self.rules.rank_args(rule_set)
        rank = None
        if member is not None and ranks is not None:
            rank = rank_after(
                ranks.program,
                member.rank_id,
                member.rank_spend,
                member.rank_period,
                ranks.period,
                earning_amount(purchase),
            )
        out: list[EarnLineEntry] = []
        for line in lines:
            points, note = line.points, ""
            if member is not None and line.ranks and rank not in line.ranks:
                points, note = 0, NOTE_NOT_RANK
            born = member.profile.bd or "" if member is not None else ""
            if member is not None and line.birthday_month and born[:2] != f"{line.birthday_month:02d}":
                points, note = 0, NOTE_NOT_BIRTHDAY_MONTH
            if member is not None and line.first_purchase and member.first_earn_ms is not None:
                points, note = 0, NOTE_NOT_FIRST_PURCHASE
            if member is not None and points and line.member_cap:
                room = max(line.member_cap - member.rule_counts.get(line.rule, 0), 0)
                if points > room:
                    points, note = room, NOTE_MEMBER_CAP
            if points and line.budget:
                room = max(line.budget - await self.ledger.budget_spent(line.rule), 0)
                if points > room:
                    points, note = room, NOTE_BUDGET
            out.append(EarnLineEntry(line.rule, 0 if line.coupon else points, 0, note))
        coupons = [line.rule for line, entry in zip(lines, out, strict=True) if line.coupon and not entry.note]
        return rule_set.version, out, coupons

    async def authorize(
        self, card_number: str, *, points: int, ttl_ms: int, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> Outcome:
        self.check_point_of_sale(pos)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.authorize(
                account,
                points=points,
                ttl_ms=ttl_ms,
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                card=card_number,
            ),
        )
        return Outcome(account, result)

    # Capture and void act at the hold's own point of sale, checked when it was authorized.
    # Capture, void, refund and receipt name a hold or transaction by id only: `company`, the
    # caller's (None: bound to none), limits them to its own company's, and one of another
    # company is refused as an unknown id is (the ledger's script decides, in the same call).

    async def capture(
        self,
        account_id: str,
        hold_seq: int,
        *,
        points: int | None,
        request_id: str,
        fingerprint: str,
        company: str | None,
        sale: tuple[int, tuple[BasketLine, ...], int] | None = None,
    ) -> OpResult:
        """A capture; with `sale` (purchase amount, basket, purchase ms), also the earn for the
        sale it completes, in the same call, at the hold's point of sale."""

        async def capture_with(lines: list[EarnLine], earn: SaleEarn | None) -> tuple[str, OpResult]:
            result = await self.ledger.capture(
                account_id,
                hold_seq,
                points=points,
                request_id=request_id,
                fingerprint=fingerprint,
                receipt_horizon_ms=self.receipt_horizon_ms(),
                sale=None if earn is None else dataclasses.replace(earn, lines=lines),
                company=company,
            )
            return account_id, result

        try:
            if sale is None:
                return (await capture_with([], None))[1]
            record = await self.ledger.transaction(account_id, hold_seq)
            # Another company's hold is refused here too, before its budgets are reserved.
            if record is None or record.type != "HOLD" or not _company_may_see(record, company):
                raise not_found(ErrorReason.HOLD_NOT_FOUND, f"no hold {account_id}.{hold_seq}")
            amount, basket, purchase_ms = sale
            lines, version, ranks, qualifying = self.sale_lines(record.pos, amount, basket, purchase_ms)
            earn = SaleEarn(lines, version, ranks, qualifying, amount, purchase_ms)
            return (await self._within_budgets(lines, lambda chosen: capture_with(chosen, earn)))[1]
        except LedgerRefusal as refusal:
            raise _unknown_hold(refusal, account_id, hold_seq) from None

    async def void(
        self, account_id: str, hold_seq: int, *, request_id: str, fingerprint: str, company: str | None
    ) -> OpResult:
        try:
            return await self.ledger.void(
                account_id, hold_seq, request_id=request_id, fingerprint=fingerprint, company=company
            )
        except LedgerRefusal as refusal:
            raise _unknown_hold(refusal, account_id, hold_seq) from None

    async def redeem(
        self, card_number: str, *, points: int, pos: PointOfSaleRef, request_id: str, fingerprint: str
    ) -> Outcome:
        self.check_point_of_sale(pos)
        account, result = await self.ledger.on_card(
            card_number,
            lambda account: self.ledger.redeem(
                account, points=points, pos=pos, request_id=request_id, fingerprint=fingerprint, card=card_number
            ),
        )
        return Outcome(account, result)

    async def refund(
        self,
        account_id: str,
        original_seq: int,
        *,
        points: int | None,
        pos: PointOfSaleRef | None,
        request_id: str,
        fingerprint: str,
        company: str | None,
    ) -> Outcome:
        """Lands on the account the transaction's account was merged into, if it was."""
        if pos is not None:
            self.check_point_of_sale(pos)
        try:
            account, result = await self.ledger.refund_following(
                account_id,
                original_seq,
                points=points,
                pos=pos,
                request_id=request_id,
                fingerprint=fingerprint,
                ranks=self.rules.rank_args(self.rules.current) if self.rules is not None else None,
                company=company,
            )
        except LedgerRefusal as refusal:
            message = f"no refundable transaction {account_id}.{original_seq}"
            raise renamed_not_found(refusal, ErrorReason.TRANSACTION_NOT_FOUND, message) from None
        # A refunded earn's campaign points go back to their budgets, once per refund (a campaign
        # without a budget has no count: nothing happens).
        refund_id = transaction_id(account, result.tx)
        await asyncio.gather(
            *(
                self.ledger.give_budget(share.rule, share.points, refund_id)
                for share in result.lines
                if share.budgeted and share.points
            )
        )
        return Outcome(account, result)

    async def balance(self, card_number: str, *, limit: int = 20, after: LotEntry | None = None) -> tuple[Outcome, int]:
        """The balance, a page of lots (at most `limit`, after `after`), and the instant it was read at."""
        read_ms = self.clock.now_ms()
        account, result = await self.ledger.on_card(
            card_number, lambda account: self.ledger.balance(account, card=card_number, limit=limit, after=after)
        )
        return Outcome(account, result), read_ms

    async def receipt(self, account_id: str, seq: int, *, company: str | None) -> TransactionRecord:
        record = await self.ledger.transaction(account_id, seq)
        if record is None or not _company_may_see(record, company):
            raise not_found(ErrorReason.TRANSACTION_NOT_FOUND, f"no transaction {account_id}.{seq}")
        return record

    def hold_state(self, record: TransactionRecord) -> str:
        """A hold past its TTL is expired even if no sweeper has written it down yet."""
        return "EXPIRED" if record.state == "HELD" and record.exp <= self.clock.now_ms() else record.state


def _company_may_see(record: TransactionRecord, company: str | None) -> bool:
    """Whether a caller bound to `company` (None: to none) may know of this hold or transaction:
    only if it was made at one of its company's points of sale (as ledger.lua's CO_SCOPED)."""
    return company is None or record.pos.company_id == company


def _unknown_hold(refusal: LedgerRefusal, account_id: str, hold_seq: int) -> LedgerRefusal:
    return renamed_not_found(refusal, ErrorReason.HOLD_NOT_FOUND, f"no hold {account_id}.{hold_seq}")
