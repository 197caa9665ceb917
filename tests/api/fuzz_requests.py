"""Hypothesis strategies for fuzzing the API: any request message built from its protobuf
descriptor (values by field type, biased toward interesting ones and toward ids of a seeded world),
and byte-level mutations of serialized requests that the server may not be able to decode."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pointauth.v1 import common_pb2

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_POINTS = 10**15
NOW_S = 1_795_000_000  # tests.conftest.START_MS: the server's (manual) clock
MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z

INTERESTING_INT64 = (
    0, 1, -1, 2, 99, 100, 101, 1000, 10**6, MAX_POINTS, MAX_POINTS + 1, -MAX_POINTS, 2**31 - 1, 2**31,
    -(2**31), 2**32, 2**53, 2**53 + 1, INT64_MAX, INT64_MAX - 1, INT64_MIN, INT64_MIN + 1,
)  # fmt: skip
INTERESTING_INT32 = (0, 1, -1, 2, 7, 12, 13, 29, 31, 32, 100, 500, 501, 1000, 1440, INT32_MAX, INT32_MIN)
INTERESTING_STRINGS = (
    "", " ", "null", "NULL", "undefined", "None", "nil", "NaN", "0", "-1", "true", "a", "-a", "a-", "_a",
    "A" * 64, "A" * 65, "4000", "400", "a b", "a\tb", "a\nb", "../../etc/passwd", "%s%n%x", "{}", "{0}",
    "{points}", "{balance:>99999}", "{0.__class__}", "${jndi:x}", "'; DROP TABLE accounts; --", "\x00",
    "a\x00b", "\u0085", "\u200b", "\u202eevil", "e\u0301", "Ω", "ｶｰﾄﾞ", "日本語の名前", "😀" * 8, "\U0010ffff",
    "ß", "İ", "ﬁ", "１２３４", "٣٤٥", "4000000000000001 ", " 4000000000000001", "4000-0000-0000-0001",
    "--", "a.b", "a.1", "a.0", "a.-1", "a.99999999999999999999", ".1", "x.", "null.1", "member-1.",
)  # fmt: skip
HUGE_STRINGS = ("x" * 70_000, "é" * 40_000, "😀" * 20_000, "A" * (1 << 20) + "B")
PLACEHOLDER_UUIDS = (
    "00000000-0000-0000-0000-000000000000",
    "0B8F6D3E-3A4C-4B8E-9A51-5F2C7D9E1A20",
    "{0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20}",
    "urn:uuid:0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a20",
    "0b8f6d3e3a4c4b8e9a515f2c7d9e1a20",
    "0b8f6d3e-3a4c-4b8e-9a51-5f2c7d9e1a2",
)
TIMESTAMP_SECONDS = (
    NOW_S, NOW_S - 1, NOW_S - 3600, NOW_S - 86_400 * 400, NOW_S + 299, NOW_S + 301, NOW_S + 86_400,
    NOW_S + 86_400 * 30, NOW_S + 86_400 * 365 * 5, 0, -1, -62_135_596_800, MAX_TIMESTAMP_S, MAX_TIMESTAMP_S + 1,
    INT64_MAX, INT64_MIN,
)  # fmt: skip
DURATION_SECONDS = (0, 1, 59, 60, 300, 3600, 86_400, 86_400 * 366, -1, 315_576_000_000, 315_576_000_001, INT64_MAX)
NANOS = (0, 0, 0, 1, 500_000_000, 999_999_999, 1_000_000_000, -1, INT32_MAX, INT32_MIN)
MASK_PATHS = (
    "birth_month", "birth_day", "join_time", "home_company_id", "attributes", "attributes.segment",
    "profile.birth_month", "", "*", "unknown_field", "birth_month.x", "BIRTH_MONTH",
)  # fmt: skip
# A plausible request's request_id, to be replaced by a new one for each call (Hypothesis draws
# the same UUIDs over and over).
FRESH_REQUEST_ID = "00000000-0000-4000-8000-000000000000"
PERIODS = (
    "2026-11", "2026-12", "2026-10", "2025-01", "1970-01", "9999-12", "2026-13", "2026-00", "2026-1", "26-11",
    "2026-11-01", "0000-01", "1969-12", "10000-01", "２０２６-１１",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class World:
    """Valid-looking values of the seeded world that requests are biased toward, so that many get
    past validation into lookups and the ledger."""

    accounts: Sequence[str]
    cards: Sequence[str]
    companies: Sequence[str]
    stores: Sequence[str]
    terminals: Sequence[str]
    regions: Sequence[str]
    transactions: Sequence[str]
    holds: Sequence[str]
    coupons: Sequence[str]
    rule_ids: Sequence[str]
    ranks: Sequence[str]
    skus: Sequence[str]
    categories: Sequence[str]
    page_tokens: Sequence[str]
    request_ids: Sequence[str]
    points_of_sale: Sequence[common_pb2.PointOfSale]

    def pool(self, field: str) -> Sequence[str]:
        """The world's values for a string field, by its name (empty: none in particular)."""
        if field in ("card_number", "new_card_number", "replaced_by_card_number"):
            return self.cards
        if field.endswith("account_id"):
            return self.accounts
        if field in ("company_id", "home_company_id", "company_ids", "issuer_id", "payer_id", "payee_id"):
            return self.companies
        if field in ("store_id", "store_ids"):
            return self.stores
        if field == "terminal_id":
            return self.terminals
        if field in ("region_id", "region_ids"):
            return self.regions
        if field.endswith("transaction_id"):
            return [*self.transactions, *self.holds]
        if field == "hold_id":
            return [*self.holds, *self.transactions]
        if field == "coupon_id":
            return self.coupons
        if field in ("campaign_id", "rule_id"):
            return self.rule_ids
        if field in ("rank_id", "rank_ids"):
            return self.ranks
        if field in ("sku", "skus"):
            return self.skus
        if field in ("category", "categories"):
            return self.categories
        if field == "page_token":
            return self.page_tokens
        if field == "request_id":
            return [*self.request_ids, *PLACEHOLDER_UUIDS]
        if field.endswith("period"):
            return PERIODS
        if field == "paths":
            return MASK_PATHS
        return ()


def _perturb(value: str, how: int) -> str:
    return [
        value + "0",
        value[:-1],
        value.upper(),
        value.lower(),
        f" {value}",
        f"{value}\u200b",
        value.replace("-", "_"),
        value * 3,
        value + ".1",
    ][how % 9]


def strings(pool: Sequence[str]) -> st.SearchStrategy[str]:
    @st.composite
    def draw_string(draw: st.DrawFn) -> str:
        roll = draw(st.integers(0, 99))
        if roll < 50 and pool:
            return draw(st.sampled_from(pool))
        if roll < 68:
            return draw(st.sampled_from(INTERESTING_STRINGS))
        if roll < 82:
            return draw(st.text(max_size=24))
        if roll < 90:
            return draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,12}", fullmatch=True))
        if roll < 98 and pool:
            return _perturb(draw(st.sampled_from(pool)), draw(st.integers(0, 8)))
        if roll < 98:
            return draw(st.sampled_from(INTERESTING_STRINGS))
        return draw(st.sampled_from(HUGE_STRINGS))

    return draw_string()


def integers(low: int, high: int, interesting: Sequence[int], plausible: tuple[int, int]) -> st.SearchStrategy[int]:
    choices = [i for i in interesting if low <= i <= high]

    @st.composite
    def draw_int(draw: st.DrawFn) -> int:
        roll = draw(st.integers(0, 9))
        if roll < 4:
            return draw(st.integers(*plausible))
        if roll < 8:
            return draw(st.sampled_from(choices))
        return draw(st.integers(low, high))

    return draw_int()


PLAUSIBLE_RANGES = {
    "birth_month": (1, 12), "birth_day": (1, 28), "month_days": (1, 28), "weekdays": (1, 7),
    "start_minute": (0, 1439), "end_minute": (0, 1439), "version": (0, 5), "order": (0, 10),
    "period_months": (1, 12), "page_size": (0, 3), "yen": (1, 200), "expire_days": (1, 90), "valid_days": (1, 90),
    "multiply_basis_points": (1, 20_000), "expiring_within_days": (1, 30), "min_spend": (0, 50_000),
}  # fmt: skip


def _plausible(field: str) -> tuple[int, int]:
    """The values a real client would send for a numeric field, by its name."""
    return PLAUSIBLE_RANGES.get(field, (1, 2000))


SCALAR_INTS: dict[int, tuple[int, int, Sequence[int]]] = {
    FieldDescriptor.TYPE_INT64: (INT64_MIN, INT64_MAX, INTERESTING_INT64),
    FieldDescriptor.TYPE_SINT64: (INT64_MIN, INT64_MAX, INTERESTING_INT64),
    FieldDescriptor.TYPE_SFIXED64: (INT64_MIN, INT64_MAX, INTERESTING_INT64),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1, INTERESTING_INT64),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1, INTERESTING_INT64),
    FieldDescriptor.TYPE_INT32: (INT32_MIN, INT32_MAX, INTERESTING_INT32),
    FieldDescriptor.TYPE_SINT32: (INT32_MIN, INT32_MAX, INTERESTING_INT32),
    FieldDescriptor.TYPE_SFIXED32: (INT32_MIN, INT32_MAX, INTERESTING_INT32),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1, INTERESTING_INT32),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1, INTERESTING_INT32),
}


class RequestStrategies:
    """`message(descriptor)`: any message of that type, built field by field from its descriptor.

    Two kinds: `wild` values (any field may be absent, interesting or out of range), and
    `plausible` ones (every field set as a well-behaved client would, from the seeded world),
    of which some have one field replaced by a wild value, so that calls get past validation
    into lookups and the ledger, and each check of a field is met on its own."""

    MAX_DEPTH = 5

    def __init__(self, world: World) -> None:
        self.world = world
        self._cache: dict[tuple[str, int, bool], st.SearchStrategy[Message]] = {}

    def message(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        wild, plausible = self._message(descriptor, 0, False), self._message(descriptor, 0, True)
        return st.one_of(plausible, plausible, plausible, self._one_wild_field(descriptor), wild)

    def plausible(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        return self._message(descriptor, 0, True)

    def _one_wild_field(self, descriptor: Descriptor) -> st.SearchStrategy[Message]:
        fields = list(descriptor.fields)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = draw(self._message(descriptor, 0, True))
            if fields:
                field = draw(st.sampled_from(fields))
                message.ClearField(field.name)
                if draw(st.integers(0, 4)) > 0:  # else: left out
                    _set(message, field, draw(self._field(field, 0, False)))
            return message

        return build()

    def _message(self, descriptor: Descriptor, depth: int, plausible: bool) -> st.SearchStrategy[Message]:
        key = (descriptor.full_name, depth, plausible)
        if key not in self._cache:
            self._cache[key] = self._build(descriptor, depth, plausible)
        return self._cache[key]

    def _build(self, descriptor: Descriptor, depth: int, plausible: bool) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        special = {
            "google.protobuf.Timestamp": self._timestamp,
            "google.protobuf.Duration": self._duration,
        }.get(descriptor.full_name)
        if special is not None:
            return special(cls, plausible)
        if descriptor.full_name == "pointauth.v1.PointOfSale" and plausible and self.world.points_of_sale:
            return st.sampled_from(self.world.points_of_sale)
        if depth >= self.MAX_DEPTH:
            return st.just(cls())
        # A real oneof sets at most one of its fields; a proto3 `optional` is a oneof of one.
        groups: list[list[FieldDescriptor]] = []
        seen: dict[str, list[FieldDescriptor]] = {}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and len(oneof.fields) > 1:
                if oneof.name not in seen:
                    seen[oneof.name] = []
                    groups.append(seen[oneof.name])
                seen[oneof.name].append(field)
            else:
                groups.append([field])
        values = {field.name: self._field(field, depth, plausible) for field in descriptor.fields}
        absent = 0 if plausible else 3  # in ten
        # A basket's lines add up to the purchase amount.
        sums = plausible and {"basket", "purchase_amount"} <= set(descriptor.fields_by_name)

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = cls()
            for group in groups:
                if len(group) > 1:
                    chosen = draw(st.integers(0, len(group) - int(plausible)))
                    if chosen == len(group):
                        continue
                    field = group[chosen]
                else:
                    field = group[0]
                    if draw(st.integers(0, 9)) >= 10 - absent:  # (Hypothesis leans to 0: present)
                        continue
                _set(message, field, draw(values[field.name]))
            if sums:
                sale: Any = message
                if sale.basket:
                    sale.purchase_amount = sum(line.amount for line in sale.basket)
            return message

        built: st.SearchStrategy[Message] = build()
        if descriptor.full_name == "pointauth.v1.PointOfSale" and self.world.points_of_sale:
            known = st.sampled_from(self.world.points_of_sale)
            return st.one_of(known, built)
        return built

    def _field(self, field: FieldDescriptor, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = self._single(field.message_type.fields_by_name["key"], depth + 1, plausible)
            value = self._single(field.message_type.fields_by_name["value"], depth + 1, plausible)
            entries = st.dictionaries(key, value, max_size=3)
            if plausible or field.message_type.fields_by_name["value"].type != FieldDescriptor.TYPE_STRING:
                return entries
            many = st.builds(lambda n: {f"k{i}": "v" * (i % 7) for i in range(n)}, st.sampled_from([100, 5000]))
            return st.one_of(entries, many)
        single = self._single(field, depth, plausible)
        if not field.is_repeated:
            return single
        # Deep in a message, short lists: a rule set of long lists of long lists is slow to draw.
        longest = 3 if depth < 2 else 1
        if plausible:
            return st.lists(single, min_size=int(field.name == "paths"), max_size=min(longest, 2))

        @st.composite
        def repeated(draw: st.DrawFn) -> list[Any]:
            roll = draw(st.integers(0, 19))
            if roll < 14 or depth >= 2:
                return draw(st.lists(single, max_size=longest))
            if roll < 18:
                return draw(st.lists(single, min_size=4, max_size=12))
            # Many elements: one drawn value repeated, e.g. a basket past its 500-line limit.
            return [draw(single)] * draw(st.sampled_from([100, 500, 501, 2000]))

        return repeated()

    def _single(self, field: FieldDescriptor, depth: int, plausible: bool) -> st.SearchStrategy[Any]:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            if plausible and field.message_type.full_name == "google.protobuf.Timestamp":
                cls = GetMessageClass(field.message_type)
                # An expiry or a campaign's end lies ahead; a purchase, visit or joining is past.
                ahead = field.name.endswith(("expire_time", "end_time"))
                seconds = [NOW_S + 86_400 * 30, NOW_S + 86_400 * 90] if ahead else [NOW_S, NOW_S - 600]
                return st.builds(lambda s: cls(seconds=s), st.sampled_from(seconds))
            return self._message(field.message_type, depth + 1, plausible)
        if kind == FieldDescriptor.TYPE_STRING:
            pool = self.world.pool(field.name)
            if not plausible:
                return strings(pool)
            if field.name == "paths":
                return st.sampled_from(MASK_PATHS[:5])
            if field.name == "request_id":  # a reused one is refused unless the request repeats
                return st.just(FRESH_REQUEST_ID)
            if field.name == "page_token":  # a page token goes with its own card and page size
                return st.just("")
            return st.sampled_from(pool) if pool else st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
        if kind == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=32)
        if kind == FieldDescriptor.TYPE_BOOL:
            return st.booleans()
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            defined = [v.number for v in field.enum_type.values]
            if plausible:
                return st.sampled_from(defined[1:] or defined)
            return st.one_of(st.sampled_from(defined), st.sampled_from([-1, len(defined), 99, INT32_MAX, INT32_MIN]))
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
        low, high, interesting = SCALAR_INTS[kind]
        if plausible:
            return st.integers(*_plausible(field.name))
        return integers(low, high, interesting, _plausible(field.name))

    @staticmethod
    def _timestamp(cls: type[Message], plausible: bool) -> st.SearchStrategy[Message]:
        if plausible:  # now, a while ago (a purchase), or later (an expiry)
            seconds = st.sampled_from([NOW_S, NOW_S - 600, NOW_S + 86_400 * 30, NOW_S + 86_400 * 90])
            return st.builds(lambda s: cls(seconds=s), seconds)
        seconds = st.one_of(
            st.sampled_from(TIMESTAMP_SECONDS), st.integers(NOW_S - 86_400 * 60, NOW_S + 86_400 * 60)
        )  # fmt: skip
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, st.sampled_from(NANOS))

    @staticmethod
    def _duration(cls: type[Message], plausible: bool) -> st.SearchStrategy[Message]:
        if plausible:
            return st.builds(lambda s: cls(seconds=s), st.sampled_from([60, 300, 900]))
        seconds = st.one_of(st.sampled_from(DURATION_SECONDS), st.integers(-10, 100_000))
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, st.sampled_from(NANOS))


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    target: Any = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        for k, v in value.items():
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- byte-level mutations ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


JUNK_FIELDS = (
    b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length-delimited, length 4 GiB
    b"\x0a\x05ab",  # length past the end
    b"\x12\x02\xc3\x28",  # field 2, a string that is not UTF-8
    b"\x0a\x01\xff",  # field 1, a one-byte string that is not UTF-8
    b"\x1a\x03\xed\xa0\x80",  # field 3, an encoded surrogate
    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint of 11 bytes
    b"\x08\x80",  # a varint cut short
    b"\x0b",  # field 1, start group, never ended
    b"\x0c",  # field 1, end group, never started
    b"\x0e\x00",  # wire type 6: none such
    b"\x0f\x00",  # wire type 7: none such
    b"\x00\x00",  # field number 0
    _varint((536_870_911 << 3) | 0) + b"\x01",  # the largest field number
    _varint((536_870_912 << 3) | 0) + b"\x01",  # past the largest field number
    b"\x0d\x00\x00",  # fixed32 cut short
    b"\x09\x00\x00\x00",  # fixed64 cut short
    b"\x08\x01" * 64,  # one varint field, many times
)


def _nested(depth: int) -> bytes:
    """A length-delimited field 3 nested `depth` times (protobuf parsers stop at 100 levels)."""
    body = b""
    for _ in range(depth):
        body = b"\x1a" + _varint(len(body)) + body
    return body


@st.composite
def mutations(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """A serialized request with one to four byte-level mutations."""
    data = bytearray(draw(bodies))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 9))
        at = draw(st.integers(0, len(data)))
        if op == 0 and data:  # flip a bit
            data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:  # overwrite a byte
            data[at % len(data)] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == 2:  # insert bytes
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == 3:  # delete a run
            del data[at : at + draw(st.integers(1, 8))]
        elif op == 4:  # truncate
            del data[at:]
        elif op == 5 and data:  # repeat a slice
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 16))]
        elif op == 6:  # a malformed field after the last one
            data += draw(st.sampled_from(JUNK_FIELDS))
        elif op == 7:  # a malformed field anywhere
            data[at:at] = draw(st.sampled_from(JUNK_FIELDS))
        elif op == 8:  # an unknown field appended (valid wire format, unknown number)
            number = draw(st.sampled_from([15, 99, 1000, 19_000, 536_870_911]))
            data += _varint(number << 3 | 2) + b"\x03abc"
        else:  # deeply nested fields
            data += _nested(draw(st.sampled_from([50, 101, 200])))
    return bytes(data)


def examples(strategy: st.SearchStrategy[Any], count: int, name: str) -> list[Any]:
    """`count` examples of `strategy`, the same ones every run (derandomized by `name`)."""
    drawn: list[Any] = []

    def collect(example: Any) -> None:
        drawn.append(example)

    collect.__name__ = collect.__qualname__ = f"examples_{name}"  # the seed is derived from the name
    run: Callable[[], None] = settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(collect))
    run()
    return drawn
