"""Typed settings: one object read from a TOML file and POINTAUTH__SECTION__FIELD variables.

Every field has a default that suits the embedded dev stack; `load_settings` validates all of
them at start and names the offending field and its source in a ConfigError.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

ENV_PREFIX = "POINTAUTH__"

Port = Annotated[int, Meta(ge=0, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0)]


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the field and where it came from."""


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    """Address the gRPC server listens on."""
    port: Port = 50051
    """Port the gRPC server listens on (0 picks a free one)."""
    workers: Positive = 1
    """Server processes sharing the port (SO_REUSEPORT)."""
    grace_seconds: Seconds = 10.0
    """On SIGTERM, how long in-flight calls may take to finish."""
    max_in_flight: Positive = 1000
    """Calls one process works on at once; more are refused at once with RESOURCE_EXHAUSTED
    (SERVER_OVERLOADED) and a retry delay, instead of queueing past any till's deadline."""
    overload_retry_ms: Positive = 200
    """Retry delay suggested to callers refused for overload or an unavailable store."""
    max_message_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    """Largest request body a call may carry; larger ones are refused (INVALID_ARGUMENT,
    REQUEST_TOO_LARGE) before they are parsed. gRPC itself drops bodies past 4 times this
    before reading them in full (RESOURCE_EXHAUSTED, without ErrorInfo)."""


class RedisSettings(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the hot ledger."""
    max_connections: Positive = 64
    """Connection pool size per server process. Calls beyond it wait for a free connection."""
    pool_wait_seconds: Seconds = 2.0
    """How long a call waits to be sent to Redis (for a free connection, or a free pipeline)
    before it is refused as SERVER_OVERLOADED."""
    pipeline_batches: Positive = 4
    """Hot-path commands of one event-loop tick go to Redis as one pipeline; at most this many
    such batches are in flight per process (calls beyond them join the next batch). Each has a
    connection of the pool to itself, kept once taken: the rest of max_connections serves the
    other commands."""
    command_timeout_seconds: Seconds = 5.0
    """A Redis command (or connect) taking longer is BACKEND_UNAVAILABLE."""


class PostgresSettings(_Section):
    dsn: str = "postgresql://pointauth@127.0.0.1:5432/pointauth"
    """PostgreSQL holding the durable journal."""


class LedgerSettings(_Section):
    shards: Positive = 1024
    """Account shards (hash tags). Fixed for the life of the data: changing it needs a migration."""
    hold_ttl_seconds: Positive = 900
    """Life of a hold when the request gives none."""
    hold_ttl_min_seconds: Positive = 1
    """Shortest hold a request may ask for."""
    hold_ttl_max_seconds: Positive = 7 * 86400
    """Longest hold a request may ask for."""
    idempotency_ttl_seconds: Positive = 86400
    """How long a request_id is remembered (retries after that are new requests)."""
    transaction_retention_days: Positive = 90
    """How long transactions stay in Redis for refunds and receipts."""
    sweep_interval_seconds: Seconds = 1.0
    """How often the sweeper looks for holds past their TTL and releases them."""
    sweep_shards_per_tick: Positive = 64
    """Shards looked at per sweep, in turn (1,024 shards at 64 a second: each every 16 s).
    Reads and writes see an expired hold as expired at once; the sweep only writes it down."""
    sweep_accounts_per_tick: Positive = 100
    """At most this many accounts' expired holds are written down per sweep, one ledger call (at
    most 50 holds) each, so that a burst of expiries (a till network outage) is spread over
    several ticks instead of one long stall; the rest wait for the next tick."""
    card_index_snapshot: bool = True
    """Read the whole card index when the process starts, before it serves, so that a till call
    on any card is one Redis round trip (the ledger function call; without it, a card this
    process has not seen yet costs a card lookup first). Its entries are only hints (the ledger
    function checks the account still has the card, and the server looks it up again if not),
    so cards linked or moved later cost a lookup, never a wrong account. About 30 bytes a card
    per process, and a few seconds a million cards at start-up (README, "Performance")."""
    card_cache_size: Annotated[int, Meta(ge=0)] = 500_000
    """Card-to-account links learned per server process, newest kept, ahead of the snapshot:
    cards looked up, moved or linked since the start. Hints too, so the size is bounded by memory
    alone, about 160 bytes an entry (500,000: some 80 MB per process). 0 learns nothing: a card
    moved since the snapshot then costs a refused call and a lookup every time."""

    def __post_init__(self) -> None:
        if not self.hold_ttl_min_seconds <= self.hold_ttl_seconds <= self.hold_ttl_max_seconds:
            raise ValueError("hold_ttl_seconds must lie between hold_ttl_min_seconds and hold_ttl_max_seconds")


class WriteBehindSettings(_Section):
    batch_size: Positive = 1000
    """Stream entries a worker reads per round."""
    poll_ms: Positive = 50
    """Pause when every stream is empty (bounds the lag that polling adds)."""
    catchup_share: Annotated[float, Meta(gt=0, le=1)] = 0.5
    """While catching up a backlog, the worker works at most this share of the time (it pauses
    after each full batch), leaving the cores to the servers and Redis the rest of it."""
    lease_ms: Positive = 15_000
    """A worker holds a lease on its shards, renewed every second: another worker for the same
    shards waits until it stops, or this long after its last renewal if it died."""
    idle_cpu: bool = True
    """`pointauth worker` runs in the kernel's idle CPU class (SCHED_IDLE) while it keeps up:
    a till's call woken on a core it uses then preempts it at once (README, "Running it for real")."""
    idle_cpu_max_lag_ms: Positive = 10_000
    """Behind by more than this, the worker returns to the normal class until caught up, so that
    tills keeping the cores busy cannot stall the journal (needs CAP_SYS_NICE or LimitNICE=+0)."""
    claim_idle_ms: Positive = 30_000
    """Entries delivered but unacknowledged this long (a crashed worker) are claimed."""
    max_deliveries: Positive = 5
    """An entry that fails this many times goes to dead_letters, with an ERROR log."""


class ExpirySettings(_Section):
    policy: Literal["days", "end_of_month", "end_of_year"] = "end_of_month"
    """days: N days after the purchase; end_of_month: the end of the month `months` after the
    purchase's month; end_of_year: the end of the year `years` after the purchase's year."""
    # Bounded so that every expiry stays a valid date (and far below Lua's exact integers).
    days: Annotated[int, Meta(ge=1, le=36_500)] = 365
    months: Annotated[int, Meta(ge=1, le=1_200)] = 12
    years: Annotated[int, Meta(ge=1, le=100)] = 1


class EarnSettings(_Section):
    rate_points: Positive = 1
    """Base rate: rate_points points per rate_amount of purchase, rounded down."""
    rate_amount: Positive = 100
    expiry: ExpirySettings = msgspec.field(default_factory=ExpirySettings)
    timezone: str = "Asia/Tokyo"
    """Zone in which month and year ends are reckoned."""
    purchase_time_skew_seconds: Annotated[int, Meta(ge=0)] = 300
    """How far in the future a purchase_time may lie (tills' clocks drift); later is refused."""

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {self.timezone!r}") from exc


class GroupSettings(_Section):
    check_points_of_sale: bool = True
    """Refuse till, kiosk and grant calls whose point of sale the group directory lacks (an
    unknown company, store or terminal, or a store of another company). Checked against each
    process's copy of the directory: no Redis round trip."""
    refresh_seconds: Seconds = 1.0
    """How often each server process asks Redis whether the directory changed (one GET), and
    so how long a change made through another process takes to be seen here."""


class RulesSettings(_Section):
    refresh_seconds: Seconds = 1.0
    """How often each server process asks Redis whether a new rule set was published (one GET),
    and so how long a publication made through another process takes to apply here."""


class TLSSettings(_Section):
    """Encryption of the gRPC port. Paths name PEM files (readable by the server alone for the
    key); the server reads them at start and logs their paths, never their contents."""

    cert_file: str = ""
    """The server's certificate chain."""
    key_file: str = ""
    """The server certificate's private key."""
    client_ca_file: str = ""
    """mTLS: CA certificates that sign client certificates. When set, every client must present
    a certificate signed by one of them, and a credential may name its identity (`auth`)."""
    plaintext: bool = False
    """Serve without TLS (a closed test machine, or TLS ended by a proxy on the same host). The
    server refuses to start with neither this nor cert_file and key_file."""


class AuthSettings(_Section):
    """Who may call what: every call is authenticated against the credentials file and checked
    against its role (see api/permissions.py)."""

    enabled: bool = True
    """false: every caller may call every RPC without credentials (tests, benchmarks on a
    closed machine); never for a port others can reach."""
    credentials_file: str = ""
    """The credentials (TOML, `pointauth credentials issue|revoke` edit it): id, role,
    company, scope, an API key's SHA-256 or a certificate identity, revoked. Re-read when it
    changes, so credentials are added and revoked without a restart."""
    reload_seconds: Seconds = 2.0
    """How often each server process looks at the credentials file's modification time (a
    revocation takes effect within this)."""
    rate_per_second: Positive = 500
    """Calls a credential may make per second in each server process, unless its entry says
    otherwise; more are refused with RESOURCE_EXHAUSTED (RATE_LIMITED) and a retry delay."""
    burst: Positive = 1000
    """Calls a credential may make at once after being idle (the token bucket's size)."""
    audit_refusals_per_second: Positive = 50
    """Calls refused for their credentials or permissions that each server process records in
    the audit trail per second (twice that at once); more are counted in the next record's
    `suppressed`, so a flood of refused calls does not become a flood of writes."""


class Settings(_Section):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    ledger: LedgerSettings = msgspec.field(default_factory=LedgerSettings)
    writebehind: WriteBehindSettings = msgspec.field(default_factory=WriteBehindSettings)
    earn: EarnSettings = msgspec.field(default_factory=EarnSettings)
    group: GroupSettings = msgspec.field(default_factory=GroupSettings)
    rules: RulesSettings = msgspec.field(default_factory=RulesSettings)
    tls: TLSSettings = msgspec.field(default_factory=TLSSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Reads `path` (if given), then applies environment overrides, then validates."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    overrides = _env_overrides(os.environ if env is None else env)
    merged = _merge(data, overrides)
    try:
        # Environment values are strings: lax conversion turns "8" into 8 where an int is due.
        return msgspec.convert(merged, Settings, strict=not overrides)
    except (msgspec.ValidationError, ValueError) as exc:
        source = f"{path}" if path else "defaults"
        if overrides:
            source += " with POINTAUTH__ environment overrides"
        raise ConfigError(f"invalid settings ({source}): {exc}") from exc
