"""Who the load goes to: the seeded population's naming, and the hot/cold skew of real traffic."""

from __future__ import annotations

import random
from dataclasses import dataclass

# The seeding contract (`pointauth seed`): account n is f"a{n:08d}", its primary card f"9{n:015d}".
ACCOUNT_FORMAT = "a{n:08d}"
CARD_FORMAT = "9{n:015d}"


@dataclass(frozen=True)
class Population:
    """`accounts` members numbered 0..accounts-1; `card_format` names member n's primary card."""

    accounts: int
    card_format: str = CARD_FORMAT
    hot_share: float = 0.2
    """Share of the members that are "hot" (regulars)..."""
    hot_traffic: float = 0.8
    """...and the share of the traffic they make (80/20 by default); 0 makes the choice uniform."""

    def __post_init__(self) -> None:
        if self.accounts < 1:
            raise ValueError("the population needs at least one account")
        if not (0 < self.hot_share <= 1 and 0 <= self.hot_traffic <= 1):
            raise ValueError("hot_share must be in (0, 1] and hot_traffic in [0, 1]")
        self.card_format.format(n=0)  # a bad format fails at start, not in the middle of a run

    def card(self, n: int) -> str:
        return self.card_format.format(n=n)

    def pick(self, rng: random.Random) -> int:
        """A member number. Hot members are spread over the whole range (every 1/hot_share-th),
        so hot traffic lands on all shards and card buckets, as regulars of a real chain do."""
        stride = max(1, round(1 / self.hot_share))
        hot_count = max(1, self.accounts // stride)
        if rng.random() < self.hot_traffic:
            return rng.randrange(hot_count) * stride
        return rng.randrange(self.accounts)
