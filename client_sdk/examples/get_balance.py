"""A member's balance with the Python SDK: `python get_balance.py 127.0.0.1:50051 9100000000000001`."""

from __future__ import annotations

import asyncio
import sys

from pointauth.client import PointsClient


async def main(address: str, card_number: str) -> None:
    async with PointsClient(address) as client:
        reply = await client.get_balance(card_number)
    print(f"{reply.account_id}: {reply.balance.available_points} points available, {reply.balance.held_points} held")
    for lot in reply.lots:
        print(f"  {lot.points} points expiring {lot.expire_time.ToDatetime():%Y-%m-%d}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
