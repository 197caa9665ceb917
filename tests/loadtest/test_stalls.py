"""The bench's reading of Redis's latency monitor and SLOWLOG, against a real Redis: a stall is
named with its length and the command that made it, a reset forgets both, and Redis's thresholds
are set back as they were."""

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
        plain.config_set("slowlog-log-slower-than", 5000)
        plain.latency_reset()
        yield plain
        plain.config_set("slowlog-log-slower-than", 10000)  # Redis's default


def test_a_stall_is_named_with_its_length_and_a_reset_forgets_it(client: redis.Redis) -> None:
    with RedisStalls(client) as stalls:
        assert stalls.enabled
        assert client.config_get("latency-monitor-threshold") == {"latency-monitor-threshold": "10"}
        assert client.config_get("slowlog-log-slower-than") == {"slowlog-log-slower-than": "10000"}
        client.ping()  # fast: never in the SLOWLOG
        stalls.reset()
        assert (stalls.read(), stalls.slow_commands()) == ({}, [])
        sha = client.script_load(_BUSY_60_MS)
        client.evalsha(sha, 0, b"\x81\xff")  # an argument that is no UTF-8, as an FCALL's msgpack is
        read = stalls.read()
        assert list(read) == ["command"]
        assert read["command"] >= 60
        [slow] = stalls.slow_commands()
        command, took = slow.rsplit(" (", 1)
        assert command == f"EVALSHA {sha} 0 \\x81\\xff"  # the bytes shown escaped
        assert int(took.removesuffix(" ms)")) >= 60
        stalls.reset()
        assert (stalls.read(), stalls.slow_commands()) == ({}, [])
    assert client.config_get("latency-monitor-threshold") == {"latency-monitor-threshold": "0"}
    assert client.config_get("slowlog-log-slower-than") == {"slowlog-log-slower-than": "5000"}


def test_the_longest_stall_is_described_first() -> None:
    assert describe({"command": 12, "aof-fsync-always": 84}) == "aof-fsync-always 84 ms, command 12 ms"
    assert describe({}) == ""
