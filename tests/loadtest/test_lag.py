"""The bench's write-behind lag sampler: a sample Redis does not answer is missed, said, and not
counted as no lag; sampling goes on, and picks up again once Redis answers."""

from __future__ import annotations

import time
from pathlib import Path

from loadtest.lag import LagSampler
from pointauth.server.devstack.stack import RedisServer, free_port
from pointauth.server.ledger import Keyspace


def test_samples_redis_did_not_answer_are_missed_and_sampling_goes_on(tmp_path: Path) -> None:
    port = free_port()
    sampler = LagSampler(f"redis://127.0.0.1:{port}/0", Keyspace(4), interval_s=0.05)
    sampler.start()
    deadline = time.monotonic() + 10
    while len(sampler.missed) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(sampler.missed) >= 3, sampler.missed
    assert sampler.samples_ms == []
    assert "ConnectionError" in sampler.missed[0]
    # Redis comes up on that port: the same sampler's next samples are taken (no backlog: 0 ms).
    redis = RedisServer(tmp_path, port=port).start()
    try:
        while not sampler.samples_ms and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sampler.stop()
        redis.stop()
    assert sampler.samples_ms
    assert set(sampler.samples_ms) == {0}
