"""Redis's own stalls while the benchmark runs, from its latency monitor: which of its events
(the AOF's fsync or write, a fork for a rewrite, a slow command, expiry or eviction cycles) took
at least `THRESHOLD_MS` during a step, and the longest of each. A till's call waits behind any
of them, so a step's tail can be laid to Redis, or not (Redis's event names:
https://redis.io/docs/latest/operate/oss_and_stack/management/optimization/latency-monitor/).
Commands that slow are named too, from Redis's SLOWLOG over the same step."""

from __future__ import annotations

from typing import Self

import redis
from redis.exceptions import ResponseError

COMMAND_CHARS = 80
"""How much of a slow command is shown: its name and first arguments."""
THRESHOLD_MS = 10
"""Events shorter than this are not recorded: #13's p99 target for a till's call, so that each
event recorded could alone have put a call past it."""


class RedisStalls:
    """Turns the monitor and the SLOWLOG's threshold to `threshold_ms` for the bench's Redis (and
    back once done); `reset()` before a step, `read()` and `slow_commands()` after it. A Redis
    that refuses CONFIG SET (a managed one) reports nothing: `enabled` says so."""

    def __init__(self, client: redis.Redis, threshold_ms: int = THRESHOLD_MS) -> None:
        self.client = client
        self.threshold_ms = threshold_ms
        self.enabled = False
        self._before: dict[str, str] = {}

    def __enter__(self) -> Self:
        settings = {"latency-monitor-threshold": self.threshold_ms, "slowlog-log-slower-than": self.threshold_ms * 1000}
        try:
            for name, value in settings.items():
                before = str(self.client.config_get(name)[name])
                self.client.config_set(name, value)
                self._before[name] = before
        except ResponseError:
            self.__exit__()
            return self
        self.enabled = True
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self._before.items():
            self.client.config_set(name, value)
        self._before = {}

    def reset(self) -> None:
        if self.enabled:
            self.client.latency_reset()
            self.client.slowlog_reset()

    def read(self) -> dict[str, int]:
        """Each event recorded since the last reset, with its longest occurrence in ms."""
        if not self.enabled:
            return {}
        # Each: [name, time of the latest, the latest ms, the longest ms since the reset].
        latest: list[list[bytes | str | int]] = self.client.latency_latest()
        return {_text(event[0]): int(event[3]) for event in latest}

    def slow_commands(self, most: int = 8) -> list[str]:
        """The commands that took `threshold_ms` or more since the last reset (the latest `most` of
        them), oldest first: "FCALL pointauth_ledger_… 2 pa:{s7}:a:member-1… (271 ms)"."""
        if not self.enabled:
            return []
        entries = self.client.slowlog_get(most)
        return [
            f"{_text(entry['command'])[:COMMAND_CHARS]} ({entry['duration'] / 1000:.0f} ms)"
            for entry in reversed(entries)
        ]


def _text(value: bytes | str | int) -> str:
    # A slow FCALL's arguments are msgpack: shown escaped, never an error.
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def describe(stalls: dict[str, int]) -> str:
    """Each stall as "aof-fsync-always 84 ms", comma-separated, the longest first."""
    return ", ".join(f"{event} {ms} ms" for event, ms in sorted(stalls.items(), key=lambda item: -item[1]))
