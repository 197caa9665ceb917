"""MembersService: accounts, profiles and cards."""

from __future__ import annotations

import calendar
from typing import Any

import grpc

from pointauth.server.api import convert
from pointauth.server.api.convert import fingerprint
from pointauth.server.api.validation import Violations
from pointauth.server.domain import ids
from pointauth.server.ledger import AccountView, CardKindCode, ProfileChange
from pointauth.server.ledger.codec import CardLink, MemberProfile
from pointauth.server.services.members import MembersService
from pointauth.v1 import members_service_pb2 as pb
from pointauth.v1 import members_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_KEY = 64
MAX_ATTRIBUTE_VALUE = 256
_PROFILE_PATHS = ("birth_month", "birth_day", "join_time", "home_company_id", "attributes")

_KINDS: dict[CardKindCode, pb.CardKind.ValueType] = {"P": pb.CARD_KIND_PHYSICAL, "A": pb.CARD_KIND_APP}
_STATES = {"A": pb.CARD_STATE_ACTIVE, "B": pb.CARD_STATE_BLOCKED, "R": pb.CARD_STATE_REPLACED}
_STATUSES = {"A": pb.ACCOUNT_STATUS_ACTIVE, "C": pb.ACCOUNT_STATUS_CLOSED, "M": pb.ACCOUNT_STATUS_MERGED}
MAX_REASON = 500


def card_kind(v: Violations, field: str, value: int) -> CardKindCode:
    """A card kind; unset means a physical card."""
    if value in (pb.CARD_KIND_UNSPECIFIED, pb.CARD_KIND_PHYSICAL):
        return "P"
    if value == pb.CARD_KIND_APP:
        return "A"
    v.add(field, "must be CARD_KIND_PHYSICAL or CARD_KIND_APP")
    return "P"


def _birthday(v: Violations, field: str, profile: pb.MemberProfile) -> str:
    """ "MMDD", or "" when not given."""
    month, day = profile.birth_month, profile.birth_day
    if month == 0 and day == 0:
        return ""
    if not 1 <= month <= 12:
        v.add(f"{field}.birth_month", "must be 1 to 12 when birth_day is given")
        return ""
    last = 29 if month == 2 else calendar.monthrange(2001, month)[1]
    if not 1 <= day <= last:
        v.add(f"{field}.birth_day", f"must be 1 to {last} for month {month}")
        return ""
    return f"{month:02d}{day:02d}"


def _attribute(v: Violations, field: str, key: str, value: str | None) -> None:
    if len(key) > MAX_ATTRIBUTE_KEY or not ids.is_id(key):
        v.add(f"{field}.attributes", f"keys must be {ids.ID_RULE}, at most {MAX_ATTRIBUTE_KEY} characters")
    if value is not None and len(value) > MAX_ATTRIBUTE_VALUE:
        v.add(f"{field}.attributes[{key}]", f"must be at most {MAX_ATTRIBUTE_VALUE} characters")


def _attributes(v: Violations, field: str, attrs: dict[str, str]) -> dict[str, str]:
    if len(attrs) > MAX_ATTRIBUTES:
        v.add(f"{field}.attributes", f"at most {MAX_ATTRIBUTES} attributes")
    for key, value in attrs.items():
        _attribute(v, field, key, value)
    return dict(attrs)


def new_profile(v: Violations, field: str, profile: pb.MemberProfile | None) -> ProfileChange:
    """A profile given on CreateAccount (unset: empty; the join time is the opening's)."""
    if profile is None:
        return ProfileChange()
    join_ms = v.timestamp(f"{field}.join_time", profile.join_time) if profile.HasField("join_time") else None
    if profile.home_company_id:
        v.identifier(f"{field}.home_company_id", profile.home_company_id)
    return ProfileChange(
        bd=_birthday(v, field, profile) or None,
        jt=join_ms,
        hc=profile.home_company_id or None,
        set_attrs=_attributes(v, field, dict(profile.attributes)) or None,
    )


def profile_update(v: Violations, profile: pb.MemberProfile, paths: list[str]) -> ProfileChange:
    """The change UpdateProfile's mask names, checked."""
    if not paths:
        v.add("update_mask", "is required: name the fields to change")
    unknown = [p for p in paths if p not in _PROFILE_PATHS and not p.startswith("attributes.")]
    for path in unknown:
        v.add("update_mask", f"unknown path {path!r}; paths are {', '.join(_PROFILE_PATHS)} and attributes.<key>")
    if ("birth_month" in paths) != ("birth_day" in paths):
        v.add("update_mask", "birth_month and birth_day change together")
    bd = _birthday(v, "profile", profile) if "birth_month" in paths else None
    jt = None
    if "join_time" in paths:
        if profile.HasField("join_time"):
            jt = v.timestamp("profile.join_time", profile.join_time)
        else:
            v.add("profile.join_time", "is required when update_mask names it")
    hc = None
    if "home_company_id" in paths:
        hc = profile.home_company_id
        if hc:
            v.identifier("profile.home_company_id", hc)
    attrs = dict(profile.attributes)
    if "attributes" in paths:
        return ProfileChange(bd=bd, jt=jt, hc=hc, set_attrs=_attributes(v, "profile", attrs), clear_attrs=True)
    keys = [p.removeprefix("attributes.") for p in paths if p.startswith("attributes.")]
    for key in keys:
        _attribute(v, "profile", key, attrs.get(key))
    for key in attrs.keys() - set(keys):
        v.add("profile.attributes", f"attribute {key!r} is not named in update_mask")
    return ProfileChange(
        bd=bd,
        jt=jt,
        hc=hc,
        set_attrs={k: attrs[k] for k in keys if k in attrs} or None,
        drop_attrs=tuple(k for k in keys if k not in attrs),
    )


def card(number: str, link: CardLink) -> pb.Card:
    message = pb.Card(
        card_number=number,
        kind=_KINDS[link.kind],
        state=_STATES[link.state],
        replaced_by_card_number=link.replaced_by or "",
    )
    if link.link_ms is not None:
        message.link_time.CopyFrom(convert.timestamp(link.link_ms))
    if link.state_ms is not None:
        message.state_time.CopyFrom(convert.timestamp(link.state_ms))
    return message


def profile_message(profile: MemberProfile) -> pb.MemberProfile:
    message = pb.MemberProfile(home_company_id=profile.hc or "", attributes=profile.attrs or {})
    if profile.bd:
        message.birth_month, message.birth_day = int(profile.bd[:2]), int(profile.bd[2:])
    if profile.jt is not None:
        message.join_time.CopyFrom(convert.timestamp(profile.jt))
    return message


def account(view: AccountView) -> pb.Account:
    stored = view.stored
    message = pb.Account(
        account_id=view.account_id,
        status=_STATUSES[stored.status],
        profile=profile_message(stored.profile),
        cards=[card(number, link) for number, link in stored.cards.items()],
    )
    message.balance.available_points, message.balance.held_points = view.available, view.held
    if stored.opened_ms is not None:
        message.create_time.CopyFrom(convert.timestamp(stored.opened_ms))
    if stored.closed_ms is not None:
        message.close_time.CopyFrom(convert.timestamp(stored.closed_ms))
    message.merged_into_account_id = stored.merged_into or ""
    message.rank_id, message.qualifying_spend = stored.rank_id or "", stored.rank_spend
    message.coupons.extend(convert.coupon(c) for c in stored.coupons.values())
    if stored.merged_ms is not None:
        message.merge_time.CopyFrom(convert.timestamp(stored.merged_ms))
    for merge_id, came in stored.merges_in.items():
        message.merges.add(merge_id=merge_id, source_account_id=came.source, merge_time=convert.timestamp(came.time))
    return message


class MembersServicer(members_service_pb2_grpc.MembersServiceServicer):
    def __init__(self, members: MembersService) -> None:
        self.members = members

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> pb.GetAccountResponse:
        v = Violations()
        which = request.WhichOneof("account")
        if which == "card_number":
            number = v.card_number("card_number", request.card_number)
            v.raise_if_any()
            return pb.GetAccountResponse(account=account(await self.members.account(card_number=number)))
        if which is None:
            v.add("account", "give account_id or card_number")
        else:
            v.identifier("account_id", request.account_id)
        v.raise_if_any()
        return pb.GetAccountResponse(account=account(await self.members.account(account_id=request.account_id)))

    async def UpdateProfile(self, request: pb.UpdateProfileRequest, context: Context) -> pb.UpdateProfileResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account_id = v.identifier("account_id", request.account_id)
        change = profile_update(v, request.profile, list(request.update_mask.paths))
        v.raise_if_any()
        view = await self.members.update_profile(
            account_id, change, request_id=request_id, fingerprint=fingerprint("UpdateProfile", request)
        )
        return pb.UpdateProfileResponse(account=account(view))

    async def CloseAccount(self, request: pb.CloseAccountRequest, context: Context) -> pb.CloseAccountResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account_id = v.identifier("account_id", request.account_id)
        v.raise_if_any()
        result = await self.members.close(
            account_id, request_id=request_id, fingerprint=fingerprint("CloseAccount", request)
        )
        return pb.CloseAccountResponse(forfeited_points=result.pts, lot_effects=convert.lot_effects(result.lots))

    async def LinkCard(self, request: pb.LinkCardRequest, context: Context) -> pb.LinkCardResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account_id = v.identifier("account_id", request.account_id)
        number = v.card_number("card_number", request.card_number)
        kind = card_kind(v, "kind", request.kind)
        v.raise_if_any()
        link = await self.members.link_card(
            account_id, number, kind, request_id=request_id, fingerprint=fingerprint("LinkCard", request)
        )
        return pb.LinkCardResponse(card=card(number, link))

    async def UnlinkCard(self, request: pb.UnlinkCardRequest, context: Context) -> pb.UnlinkCardResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        account_id = v.identifier("account_id", request.account_id)
        number = v.card_number("card_number", request.card_number)
        v.raise_if_any()
        await self.members.unlink_card(
            account_id, number, request_id=request_id, fingerprint=fingerprint("UnlinkCard", request)
        )
        return pb.UnlinkCardResponse()

    async def BlockCard(self, request: pb.BlockCardRequest, context: Context) -> pb.BlockCardResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        number = v.card_number("card_number", request.card_number)
        v.raise_if_any()
        account_id, link = await self.members.set_card_state(
            number, "B", request_id=request_id, fingerprint=fingerprint("BlockCard", request)
        )
        return pb.BlockCardResponse(account_id=account_id, card=card(number, link))

    async def UnblockCard(self, request: pb.UnblockCardRequest, context: Context) -> pb.UnblockCardResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        number = v.card_number("card_number", request.card_number)
        v.raise_if_any()
        account_id, link = await self.members.set_card_state(
            number, "A", request_id=request_id, fingerprint=fingerprint("UnblockCard", request)
        )
        return pb.UnblockCardResponse(account_id=account_id, card=card(number, link))

    async def ReissueCard(self, request: pb.ReissueCardRequest, context: Context) -> pb.ReissueCardResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        number = v.card_number("card_number", request.card_number)
        new = v.card_number("new_card_number", request.new_card_number)
        kind = card_kind(v, "new_card_kind", request.new_card_kind)
        if number and number == new:
            v.add("new_card_number", "must differ from card_number")
        v.raise_if_any()
        account_id, old_link, new_link = await self.members.reissue_card(
            number, new, kind, request_id=request_id, fingerprint=fingerprint("ReissueCard", request)
        )
        return pb.ReissueCardResponse(
            account_id=account_id,
            replaced_card=card(number, old_link),
            new_card=card(new, new_link),
        )

    async def MergeAccounts(self, request: pb.MergeAccountsRequest, context: Context) -> pb.MergeAccountsResponse:
        v = Violations()
        request_id = v.request_id(request.request_id)
        source = v.identifier("source_account_id", request.source_account_id)
        target = v.identifier("target_account_id", request.target_account_id)
        if source and source == target:
            v.add("target_account_id", "must differ from source_account_id")
        operator = v.identifier("operator_id", request.operator_id)
        if not 1 <= len(request.reason) <= MAX_REASON:
            v.add("reason", f"is required: 1 to {MAX_REASON} characters")
        v.raise_if_any()
        result = await self.members.merge(
            source,
            target,
            request_id=request_id,
            fingerprint=fingerprint("MergeAccounts", request),
            actor=operator,
            why=request.reason,
        )
        return pb.MergeAccountsResponse(
            moved_points=result.pts,
            moved_lots=[convert.lot(lot) for lot in result.lots],
            moved_card_numbers=result.cards,
        )
