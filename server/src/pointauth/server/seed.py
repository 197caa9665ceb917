"""`pointauth seed`: a realistic population for load tests, bulk-loaded into Redis (redis-cli
--pipe, the mass insertion Redis documents) and PostgreSQL (COPY).

Account n is always the same (a deterministic hash of n), so runs are repeatable. Seeding is
idempotent per chunk: finished chunks are recorded in Redis and skipped when run again, and
card links are only ever added (HSETNX), never overwritten.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

from pointauth.server.ledger.keys import CARD_BUCKETS, Keyspace

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
    limited-time lot, with expiries spread over the next 13 months."""
    h = (n * 2_654_435_761) & 0xFFFFFFFF  # Knuth's multiplicative hash: cheap and well spread
    extra_cards = (h % 10 >= 6) + (h % 10 >= 9)
    cards = [b"9%015d" % n] + [b"8%014d%d" % (n, k) for k in range(1, extra_cards + 1)]
    lots: list[Lot] = [(1, 100 + h % 4900, anchor_ms + (30 + h % 365) * DAY_MS, b"R")]
    if (h >> 8) & 1:
        lots.append((2, 10 + (h >> 4) % 990, anchor_ms + (200 + (h >> 12) % 300) * DAY_MS, b"R"))
    if (h >> 16) % 3 == 0:
        lots.append((len(lots) + 1, 50 + (h >> 20) % 450, anchor_ms + (7 + (h >> 24) % 50) * DAY_MS, b"L"))
    return b"a%08d" % n, cards, lots


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def redis_chunk(start: int, count: int, anchor_ms: int, keyspace: Keyspace) -> bytes:
    """RESP commands writing accounts [start, start+count) as the ledger script would."""
    tags = [f"{keyspace.prefix}:{{s{s}}}:a:".encode() for s in range(keyspace.shards)]
    card_prefix = f"{keyspace.prefix}:card:".encode()
    crc = zlib.crc32
    out: list[bytes] = []
    for n in range(start, start + count):
        account, cards, lots = seed_account(n, anchor_ms)
        key = tags[crc(account) % keyspace.shards] + account
        out.append(
            b"*%d\r\n$4\r\nHSET\r\n%s$3\r\nseq\r\n%s" % (4 + 2 * len(lots), _bulk(key), _bulk(b"%d" % len(lots)))
        )
        for lot_id, points, expire_ms, kind in lots:
            out.append(_bulk(b"l:%d" % lot_id))
            out.append(_bulk(b"%d:%d:%s:%s" % (points, expire_ms, kind, SEED_ISSUER)))
        for card in cards:
            bucket = card_prefix + b"%d" % (crc(card) % CARD_BUCKETS)
            out.append(b"*4\r\n$6\r\nHSETNX\r\n%s%s%s" % (_bulk(bucket), _bulk(card), _bulk(account)))
    return b"".join(out)


def chunks(accounts: int, done: set[int]) -> Iterator[tuple[int, int]]:
    for start in range(0, accounts, CHUNK):
        if start not in done:
            yield start, min(CHUNK, accounts - start)


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
        # Sent after the chunks' own commands, so a chunk is marked done only once written.
        pipe.send(b"*%d\r\n$4\r\nSADD\r\n%s" % (2 + len(todo), _bulk(DONE_KEY.encode())))
        pipe.send(b"".join(_bulk(b"%d" % start) for start, _ in todo))
    pipe.close()
    if pipe.errors:
        raise RuntimeError(f"Redis refused {len(pipe.errors)} seeding commands, first: {pipe.errors[0]!r}")


class ProgressBar:
    """A plain text progress bar on stderr: no dependency, readable in CI logs too."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.started = time.monotonic()
        self._shown = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._shown < 0.5 and self.done < self.total:
            return
        self._shown = now
        filled = int(30 * self.done / max(self.total, 1))
        rate = self.done / max(now - self.started, 1e-9)
        bar = "#" * filled + "." * (30 - filled)
        end = "\n" if self.done >= self.total else ""
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done:,}/{self.total:,} {rate:,.0f}/s{end}")
        sys.stderr.flush()
