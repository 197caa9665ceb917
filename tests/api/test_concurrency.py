"""Many tills at once on one balance: holds never over-reserve, a hold has one resolution."""

from __future__ import annotations

import asyncio

from pointauth.client import PointsClient, RefusedError
from tests.conftest import STORE


async def test_200_concurrent_holds_never_over_reserve(client: PointsClient, member: str) -> None:
    amount = 7  # 1,000 points: exactly floor(1000 / 7) = 142 holds fit
    results = await asyncio.gather(
        *(client.authorize_hold(member, STORE, amount) for _ in range(200)), return_exceptions=True
    )
    held = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RefusedError)]
    assert len(held) == 1000 // amount
    assert len(refused) == 200 - len(held)
    assert {r.reason for r in refused} == {"INSUFFICIENT_POINTS"}
    assert len({h.hold_id for h in held}) == len(held)
    balance = await client.get_balance(member)
    assert balance.balance.held_points == amount * len(held)
    assert balance.balance.available_points == 1000 - amount * len(held)


async def test_capture_and_void_race_has_exactly_one_winner(client: PointsClient, member: str) -> None:
    captures = 0
    for _ in range(20):
        hold = await client.authorize_hold(member, STORE, 10)
        capture, void = await asyncio.gather(
            client.capture_hold(hold.hold_id), client.void_hold(hold.hold_id), return_exceptions=True
        )
        winners = [r for r in (capture, void) if not isinstance(r, BaseException)]
        losers = [r for r in (capture, void) if isinstance(r, RefusedError)]
        assert len(winners) == 1
        assert len(losers) == 1
        # The loser names the winner: a refused capture found the hold voided, and the reverse.
        captured = not isinstance(capture, BaseException)
        assert losers[0].reason == ("HOLD_ALREADY_CAPTURED" if captured else "HOLD_ALREADY_VOIDED")
        captures += captured
    # Each captured hold spent its 10 points; each voided one gave them back.
    balance = await client.get_balance(member)
    assert balance.balance.held_points == 0
    assert balance.balance.available_points == 1000 - 10 * captures
