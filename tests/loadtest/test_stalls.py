"""The bench's reading of Redis's latency monitor, against a real Redis: a stall is named with its
length, a reset forgets it, and the monitor's threshold is set back as it was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from loadtest.stalls import RedisStalls, describe
from pointauth.server.devstack.stack import EmbeddedStack

# Keeps Redis busy for at least 60 ms of its own clock: a stall of the event "command".
_BUSY_60_MS = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local start = now()
while now() - start < 60 do end
return 1
"""


@pytest.fixture
def client(stack: EmbeddedStack) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(stack.redis.url) as plain:
        plain.config_set("latency-monitor-threshold", 0)
        plain.latency_reset()
        yield plain


def test_a_stall_is_named_with_its_length_and_a_reset_forgets_it(client: redis.Redis) -> None:
    with RedisStalls(client) as stalls:
        assert stalls.enabled
        assert client.config_get("latency-monitor-threshold") == {"latency-monitor-threshold": "10"}
        stalls.reset()
        assert stalls.read() == {}
        client.eval(_BUSY_60_MS, 0)
        read = stalls.read()
        assert list(read) == ["command"]
        assert read["command"] >= 60
        stalls.reset()
        assert stalls.read() == {}
    assert client.config_get("latency-monitor-threshold") == {"latency-monitor-threshold": "0"}


def test_the_longest_stall_is_described_first() -> None:
    assert describe({"command": 12, "aof-fsync-always": 84}) == "aof-fsync-always 84 ms, command 12 ms"
    assert describe({}) == ""
