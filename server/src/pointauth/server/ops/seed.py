"""`pointauth seed`: a realistic population for load tests, bulk-loaded into Redis (a raw RESP
stream, as `redis-cli --pipe` does) and PostgreSQL (COPY), both at once.

Account n is always the same (a deterministic hash of n), so runs are repeatable. Seeding is
idempotent: what each chunk of accounts has seeded is recorded (a Redis hash; in PostgreSQL, the
chunk's own rows, written in one transaction), so a second run, or a larger one, only adds the
accounts that are missing and never overwrites one; card links are only ever added.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TextIO
from urllib.parse import urlparse

from pointauth.server.config import Settings
from pointauth.server.journal.pg import connection
from pointauth.server.ledger import codec
from pointauth.server.ledger.keys import Keyspace, card_bucket_number
from pointauth.server.ops.progress import ProgressBar
from pointauth.server.ops.seed_group import SeedGroup, load_group

DAY_MS = 86_400_000
SEED_ISSUER = b"seed-retail"
DONE_KEY = "pa:seed:done"
CHUNK = 50_000

# (lot id, points, expire ms, kind)
Lot = tuple[int, int, int, bytes]


def account_id(n: int) -> str:
    return f"a{n:08d}"


def primary_card(n: int) -> str:
    return f"9{n:015d}"


def seed_account(n: int, anchor_ms: int) -> tuple[bytes, list[bytes], list[Lot]]:
    """Account n: 1 to 3 cards (60/30/10 %); a regular lot, half a second one, a third a
    limited-time lot, with expiries spread over the next 13 months. A second regular lot that
    would expire with the first is part of it, as the ledger keeps one lot per expiry, kind and
    issuer."""
    h = (n * 2_654_435_761) & 0xFFFFFFFF  # Knuth's multiplicative hash: cheap and well spread
    extra_cards = (h % 10 >= 6) + (h % 10 >= 9)
    cards = [b"9%015d" % n] + [b"8%014d%d" % (n, k) for k in range(1, extra_cards + 1)]
    lots: list[Lot] = [(1, 100 + h % 4900, anchor_ms + (30 + h % 365) * DAY_MS, b"R")]
    if (h >> 8) & 1:
        points, expire_ms = 10 + (h >> 4) % 990, anchor_ms + (200 + (h >> 12) % 300) * DAY_MS
        if expire_ms == lots[0][2]:
            lots[0] = (1, lots[0][1] + points, expire_ms, b"R")
        else:
            lots.append((2, points, expire_ms, b"R"))
    if (h >> 16) % 3 == 0:
        lots.append((len(lots) + 1, 50 + (h >> 20) % 450, anchor_ms + (7 + (h >> 24) % 50) * DAY_MS, b"L"))
    return b"a%08d" % n, cards, lots


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def redis_chunk(start: int, count: int, anchor_ms: int, keyspace: Keyspace) -> bytes:
    """RESP commands writing accounts [start, start+count) as the ledger script would."""
    tags = [f"{keyspace.prefix}:{{s{s}}}:".encode() for s in range(keyspace.shards)]
    seq_field, x0_field, lot_points_field = _bulk(codec.SEQ_FIELD), _bulk(codec.X0_FIELD), _bulk(codec.LOT_POINTS_FIELD)
    held_points = _bulk(codec.HELD_POINTS_FIELD) + _bulk(b"0")
    card_on_account = _bulk(codec.encode_card_link(codec.CardLink()))
    crc = zlib.crc32
    out: list[bytes] = []
    for n in range(start, start + count):
        account, cards, lots = seed_account(n, anchor_ms)
        tag = tags[crc(account) % keyspace.shards]  # + "a:" or "l:" and the id: keys.py's names
        # What codec.encode_account gives, without building a StoredAccount per account (which
        # would halve the seeding rate). A seeded account has no transaction records: x0, where
        # pruning starts, is past its events, or its first calls would look for theirs. The
        # account's cards are fields of its hash too (codec.card_field), as well as in the index.
        hset = 10 + 2 * len(cards)
        out.append(b"*%d\r\n$4\r\nHSET\r\n%s%s" % (hset, _bulk(tag + b"a:" + account), seq_field))
        out.append(_bulk(b"%d" % len(lots)) + x0_field + _bulk(b"%d" % (len(lots) + 1)))
        out.append(lot_points_field + _bulk(b"%d" % sum(lot[1] for lot in lots)) + held_points)
        out.extend(_bulk(codec.card_field(card)) + card_on_account for card in cards)
        out.append(b"*%d\r\n$4\r\nZADD\r\n%s" % (2 + 2 * len(lots), _bulk(tag + b"l:" + account)))
        for lot_id, points, expire_ms, kind in lots:
            out.append(_bulk(b"%d" % codec.lot_score(expire_ms, kind)))
            out.append(_bulk(codec.lot_member_of(lot_id, points, SEED_ISSUER)))
        owner = _bulk(codec.card_owner_value(account.decode()))
        for card in cards:
            bucket = keyspace.card_bucket_key(card_bucket_number(card)).encode()
            out.append(b"*4\r\n$6\r\nHSETNX\r\n%s%s%s" % (_bulk(bucket), _bulk(card), owner))
    return b"".join(out)


def chunks(accounts: int, seeded: dict[int, int]) -> Iterator[tuple[int, int]]:
    """(first, count) ranges still to seed: the CHUNK-aligned pieces of [0, accounts) less what
    `seeded` (chunk start -> accounts of that chunk already there) says is done."""
    for start in range(0, accounts, CHUNK):
        first, end = start + seeded.get(start, 0), min(start + CHUNK, accounts)
        if first < end:
            yield first, end - first


def redis_seeded(client: Any) -> dict[int, int]:
    """What earlier runs wrote to Redis: chunk start -> accounts seeded."""
    return {int(start): int(count) for start, count in client.hgetall(DONE_KEY).items()}


class _RespPipe:
    """Streams RESP commands over one socket while a thread drains the replies, watching for
    errors: what `redis-cli --pipe` does, without a third process competing for the CPU."""

    def __init__(self, redis_url: str) -> None:
        url = urlparse(redis_url)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379))
        self.errors: list[bytes] = []
        self._finished = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if url.password:
            self.send(b"*2\r\n$4\r\nAUTH\r\n" + _bulk(url.password.encode()))
        db = url.path.strip("/")
        if db and db != "0":
            self.send(b"*2\r\n$6\r\nSELECT\r\n" + _bulk(db.encode()))

    def send(self, commands: bytes) -> None:
        self.sock.sendall(commands)

    def _drain(self) -> None:
        tail = b""
        while chunk := self.sock.recv(1 << 20):
            # Every reply of ours is one line (:n, +OK or -ERR); keep a partial last line for later.
            data = tail + chunk
            complete, _, tail = data.rpartition(b"\r\n")
            if complete.startswith(b"-") or b"\n-" in complete:
                self.errors.extend(line for line in complete.split(b"\r\n") if line.startswith(b"-"))
            if complete.endswith(b"+PONG"):
                break
        self._finished.set()

    def close(self) -> None:
        """Ends with a PING: its PONG comes after every other reply."""
        self.send(b"*1\r\n$4\r\nPING\r\n")
        if not self._finished.wait(timeout=600):
            raise RuntimeError("Redis did not answer the seeding commands within 10 minutes")
        self.sock.close()


def load_redis(
    redis_url: str,
    keyspace: Keyspace,
    todo: list[tuple[int, int]],
    anchor_ms: int,
    progress: Callable[[int], None] = lambda _: None,
) -> None:
    """Streams the chunks' commands to Redis, then records the chunks as done."""
    pipe = _RespPipe(redis_url)
    for start, count in todo:
        pipe.send(redis_chunk(start, count, anchor_ms, keyspace))
        progress(count)
    if todo:
        # Sent after the chunks' own commands, so a chunk counts as seeded only once written.
        marks = [(first - first % CHUNK, first % CHUNK + count) for first, count in todo]
        pipe.send(b"*%d\r\n$4\r\nHSET\r\n%s" % (2 + 2 * len(marks), _bulk(DONE_KEY.encode())))
        pipe.send(b"".join(_bulk(b"%d" % start) + _bulk(b"%d" % seeded) for start, seeded in marks))
    pipe.close()
    if pipe.errors:
        raise RuntimeError(f"Redis refused {len(pipe.errors)} seeding commands, first: {pipe.errors[0]!r}")


# No opened_at, status or profile: a seeded account hash has no `ot` and no profile, and is
# active; nor linked_at for its cards, whose fields have no link time (codec.CardLink "AP"), so
# that rehydrate gives back exactly the hash seeded.
_ACCOUNT_COLUMNS = ("account_id", "shard", "card_number", "last_seq")
_JOURNAL_COLUMNS = (
    "event_id", "account_id", "seq", "type", "points", "lots", "issuer_id", "company_id",
    "event_time", "stream", "entry_id",
)  # fmt: skip


_FLOW_COLUMNS = ("event_time", "account_id", "seq", "flow", "issuer_id", "company_id", "points")


def postgres_chunk(start: int, count: int, anchor_ms: int, keyspace: Keyspace) -> dict[str, bytes]:
    """COPY text rows for accounts, cards, lots and the journal. Each seeded lot is a GRANT event
    in the journal, so the journal still holds every account's events 1..last_seq, with its point
    flow (ISSUED by the seed issuer), so the seed month settles and ties out as any other."""
    rows: dict[str, list[bytes]] = {"accounts": [], "cards": [], "lots": [], "journal": [], "point_flows": []}
    opened = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(anchor_ms // 1000)).encode()
    crc = zlib.crc32
    for n in range(start, start + count):
        account, cards, lots = seed_account(n, anchor_ms)
        shard = crc(account) % keyspace.shards
        rows["accounts"].append(b"%s\t%d\t%s\t%d\n" % (account, shard, cards[0], len(lots)))
        rows["cards"].extend(b"%s\t%s\n" % (card, account) for card in cards)
        for lot_id, points, expire_ms, kind in lots:
            rows["lots"].append(b"%s\t%d\t%d\t%d\t%s\t%s\n" % (account, lot_id, points, expire_ms, kind, SEED_ISSUER))
            effect = b'[[%d,%d,%d,"%s","%s"]]' % (lot_id, points, expire_ms, kind, SEED_ISSUER)
            rows["journal"].append(
                b"%s.%d\t%s\t%d\tGRANT\t%d\t%s\t%s\t%s\t%s\tseed\tseed\n"
                % (account, lot_id, account, lot_id, points, effect, SEED_ISSUER, SEED_ISSUER, opened)
            )
            rows["point_flows"].append(
                b"%s\t%s\t%d\tISSUED\t%s\t%s\t%d\n" % (opened, account, lot_id, SEED_ISSUER, SEED_ISSUER, points)
            )
    return {table: b"".join(lines) for table, lines in rows.items()}


async def load_postgres(
    dsn: str,
    keyspace: Keyspace,
    accounts: int,
    anchor_ms: int,
    progress: Callable[[int], None] = lambda _: None,
) -> None:
    """One transaction per chunk, so a chunk is all in or all out; each resumes after the last
    account it already holds, so a seed interrupted or grown later picks up where it stopped."""
    columns = {"accounts": _ACCOUNT_COLUMNS, "cards": ("card_number", "account_id"),
               "lots": ("account_id", "lot_id", "points", "expire_ms", "kind", "issuer_id"),
               "journal": _JOURNAL_COLUMNS, "point_flows": _FLOW_COLUMNS}  # fmt: skip
    async with connection(dsn) as conn:
        # The seed month's journal partition must exist before the rows arrive.
        await conn.execute("SELECT journal_create_partitions(to_timestamp($1::bigint / 1000.0), 1)", anchor_ms)
        await conn.execute("SET synchronous_commit = off")  # a lost chunk is simply seeded again
        # Foreign-key checks cost more than the COPY itself; every chunk is consistent by
        # construction, so a superuser skips them as pg_restore --disable-triggers does.
        skip_triggers = bool(await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        for start in range(0, accounts, CHUNK):
            end = min(start + CHUNK, accounts)
            last = await conn.fetchval(
                "SELECT max(account_id) FROM accounts WHERE account_id >= $1 AND account_id < $2",
                account_id(start),
                account_id(start + CHUNK),
            )
            first = start if last is None else int(last[1:]) + 1
            if first < end:
                chunk = postgres_chunk(first, end - first, anchor_ms, keyspace)
                async with conn.transaction():
                    if skip_triggers:
                        await conn.execute("SET LOCAL session_replication_role = replica")
                    for table, data in chunk.items():
                        await conn.copy_to_table(table, source=io.BytesIO(data), columns=columns[table], format="text")
            progress(end - start)


def _load_redis_process(redis_url: str, shards: int, todo: list[tuple[int, int]], anchor_ms: int, done: Any) -> None:
    def count(n: int) -> None:
        with done.get_lock():
            done.value += n

    load_redis(redis_url, Keyspace(shards), todo, anchor_ms, count)


def seed_command(settings: Settings, accounts: int, out: TextIO = sys.stdout, group: SeedGroup | None = None) -> int:
    """Seeds the group directory (`group`, by default SeedGroup()'s), then accounts
    0..accounts-1 into both stores at once: Redis from a second process (generating its commands
    costs a core), PostgreSQL from this one."""
    import redis as redis_sync

    keyspace = Keyspace(settings.ledger.shards)
    group = group or SeedGroup()
    added = asyncio.run(load_group(settings.redis.url, settings.postgres.dsn, keyspace, group))
    print(
        f"group directory: {group.companies} companies, {group.stores} stores, {group.points_of_sale} terminals "
        f"({added} entries new in Redis)",
        file=out,
    )
    anchor_ms = int(time.time() // 86_400) * DAY_MS  # today, 00:00 UTC: expiries ahead of now
    client = redis_sync.Redis.from_url(settings.redis.url)
    seeded = redis_seeded(client)
    memory_before = int(client.info("memory")["used_memory"])
    redis_todo = list(chunks(accounts, seeded))
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    redis_done = ctx.Value("q", 0)
    redis_proc = ctx.Process(
        target=_load_redis_process, args=(settings.redis.url, keyspace.shards, redis_todo, anchor_ms, redis_done)
    )
    redis_proc.start()
    bar = ProgressBar("accounts (Redis + PostgreSQL)")
    total = 2 * accounts
    pg_done = 0

    def progress(n: int) -> None:
        nonlocal pg_done
        pg_done += n
        bar(pg_done + redis_done.value + accounts - sum(c for _, c in redis_todo), total)

    asyncio.run(load_postgres(settings.postgres.dsn, keyspace, accounts, anchor_ms, progress))
    postgres_seconds = time.monotonic() - started
    while redis_proc.is_alive():
        redis_proc.join(0.5)
        bar(pg_done + redis_done.value + accounts - sum(c for _, c in redis_todo), total)
    if redis_proc.exitcode != 0:
        print("seeding Redis failed (see above)", file=out)
        return 1
    seconds = time.monotonic() - started
    memory = int(client.info("memory")["used_memory"])
    new = sum(count for _, count in redis_todo)
    per_account = f"{(memory - memory_before) / new:,.0f} bytes" if new else "n/a (nothing new)"
    print(
        f"seeded {accounts:,} accounts ({new:,} new in Redis) in {seconds:,.1f} s "
        f"(PostgreSQL {postgres_seconds:,.1f} s); Redis memory per new account: {per_account}, "
        f"used_memory {memory / 2**20:,.0f} MiB",
        file=out,
    )
    return 0
