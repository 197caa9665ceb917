"""Demo data for `pointauth dev`: a small group directory (the points of sale README.md and the
usage hint name) and a few cards with regular and limited-time points.

Loading is idempotent (registering is create-or-update, and grants have fixed request ids), so
restarting `dev` does not add points twice."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from pointauth.server.domain import reasons
from pointauth.server.domain.group import Company, Entry, Store, Terminal
from pointauth.server.domain.reasons import ErrorReason
from pointauth.server.ledger import LedgerRefusal, LotKindCode, PointOfSaleRef
from pointauth.server.services.accounts import AccountsService

_NAMESPACE = uuid.UUID("6f1b2c1e-8d0a-4c47-9a5e-2b7f3c9d4e10")
HEAD_OFFICE = PointOfSaleRef(company_id="demo-retail", store_id="head-office", terminal_id="admin", channel=5)
DAY_MS = 86_400_000


# Every point of sale the demo's calls, README.md's snippets and `pointauth dev`'s hint use.
DEMO_GROUP: tuple[Entry, ...] = (
    Company("demo-retail", "Demo Retail"),
    Company("acme", "Acme Retail"),
    Store("head-office", "demo-retail", "kanto", "Demo Retail head office"),
    Store("store-001", "demo-retail", "kanto", "Demo Retail Shibuya"),
    Store("store-1", "acme", "kanto", "Acme Shinjuku"),
    Terminal("head-office", "admin", "Back office"),
    Terminal("store-001", "till-1", "Till 1"),
    Terminal("store-1", "till-1", "Till 1"),
    Terminal("store-1", "till-3", "Till 3"),
)


@dataclass(frozen=True)
class DemoMember:
    account_id: str
    card_number: str
    regular_points: int
    limited_points: int


MEMBERS = (
    DemoMember("member-0001", "9100000000000001", 1200, 300),
    DemoMember("member-0002", "9100000000000002", 5000, 0),
    DemoMember("member-0003", "9100000000000003", 80, 500),
)


def _request(name: str) -> tuple[str, str]:
    return str(uuid.uuid5(_NAMESPACE, name)), hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


async def load_demo_members(accounts: AccountsService) -> list[DemoMember]:
    directory = accounts.points.directory
    if directory is not None:
        for entry in DEMO_GROUP:
            await directory.register(entry)
    now = accounts.points.clock.now_ms()
    for member in MEMBERS:
        rid, fp = _request(f"open {member.account_id}")
        try:
            await accounts.open(member.account_id, member.card_number, request_id=rid, fingerprint=fp)
        except LedgerRefusal as refusal:
            if refusal.result.reason != reasons.name(ErrorReason.ACCOUNT_ALREADY_EXISTS):
                raise
            continue  # loaded by an earlier run
        lots: tuple[tuple[int, LotKindCode, int], ...] = (
            (member.regular_points, "R", now + 365 * DAY_MS),
            (member.limited_points, "L", now + 30 * DAY_MS),
        )
        for points, kind, expire_ms in lots:
            if points:
                rid, fp = _request(f"grant {member.account_id} {kind}")
                await accounts.grant(
                    member.card_number,
                    points=points,
                    expire_ms=expire_ms,
                    kind=kind,
                    pos=HEAD_OFFICE,
                    request_id=rid,
                    fingerprint=fp,
                )
    return list(MEMBERS)
