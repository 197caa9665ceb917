"""The write-behind worker's CPU class (journal/priority.py): idle while it keeps up, normal while
far behind, and the class it found when it stops. Read from the kernel (sched_getscheduler)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from redis.asyncio import Redis

from pointauth.server.clock import ManualClock
from pointauth.server.devstack.stack import EmbeddedStack
from pointauth.server.journal import worker_status
from pointauth.server.ledger import Keyspace, Ledger
from tests.journal.support import (
    DAY_MS,
    FAST,
    TILL,
    assert_journal_complete,
    fingerprint,
    running_worker,
    wait_until_applied,
)

pytestmark = pytest.mark.skipif(
    not hasattr(os, "SCHED_IDLE") or os.geteuid() != 0,
    reason="leaving the idle class needs CAP_SYS_NICE (root) on Linux",
)
PRIORITY_LOG = "pointauth.server.journal.priority"


async def earn_on(ledger: Ledger, clock: ManualClock, accounts: list[str], earns: int) -> None:
    for account in accounts:
        await ledger.create_account(account, f"card-{account}", f"open-{account}", fingerprint(f"open-{account}"))
        for n in range(earns):
            rid = f"{account}-earn-{n}"
            await ledger.earn(
                account, points=10, expire_ms=clock.now_ms() + 30 * DAY_MS, kind="R", pos=TILL,
                request_id=rid, fingerprint=fingerprint(rid),
            )  # fmt: skip


def transitions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PRIORITY_LOG]


async def test_the_worker_works_in_the_idle_class_and_stops_in_the_one_it_found(
    stack: EmbeddedStack, redis: Redis, ledger: Ledger, clock: ManualClock, keyspace: Keyspace, dsn: str
) -> None:
    accounts = [f"member-{i}" for i in range(5)]
    await earn_on(ledger, clock, accounts, earns=4)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER

    async with running_worker(stack.redis.url, dsn, keyspace, dataclasses.replace(FAST, idle_cpu=True)) as worker:
        await wait_until_applied(redis, dsn, keyspace, accounts)
        # The worker runs in this thread (the test's event loop): the class is the thread's.
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
        assert (worker.cpu_class.idle, worker.cpu_class.can_return) == (True, True)
        await asyncio.sleep(3 * FAST.housekeeping_s)  # a heartbeat since
        status = await worker_status(redis, dsn, keyspace)
        assert [(w.consumer, w.cpu_class) for w in status.workers] == [("test-worker", "idle")]
        assert ", CPU class idle, last seen " in status.render()

    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    await assert_journal_complete(redis, dsn, keyspace, accounts)


async def test_far_behind_the_worker_is_in_the_normal_class_until_caught_up(
    stack: EmbeddedStack,
    redis: Redis,
    ledger: Ledger,
    clock: ManualClock,
    keyspace: Keyspace,
    dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    accounts = [f"member-{i}" for i in range(10)]
    await earn_on(ledger, clock, accounts, earns=50)  # 510 events: three batches of 200
    await asyncio.sleep(0.5)  # the backlog is now at least 500 ms old
    config = dataclasses.replace(FAST, idle_cpu=True, idle_cpu_max_lag_ms=200)
    policies: list[int] = []

    async def watch() -> None:
        while True:
            policies.append(os.sched_getscheduler(0))
            await asyncio.sleep(0)

    caplog.set_level(logging.INFO, logger=PRIORITY_LOG)
    async with running_worker(stack.redis.url, dsn, keyspace, config) as worker:
        watching = asyncio.create_task(watch())
        await wait_until_applied(redis, dsn, keyspace, accounts)
        # The round after the last batch finds nothing: caught up, the worker goes idle again.
        for _ in range(1000):
            if worker.cpu_class.idle:
                break
            await asyncio.sleep(0.01)
        watching.cancel()
        assert os.sched_getscheduler(0) == os.SCHED_IDLE

    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    messages = transitions(caplog)
    assert len(messages) == 3, messages
    assert messages[0].startswith("write-behind: the worker runs in the idle CPU class; more than 0.2 s behind")
    assert " s behind; the worker runs in the normal CPU class until caught up" in messages[1]
    assert float(messages[1].split()[1]) >= 0.5  # the lag it was behind by, in seconds
    assert messages[2] == "write-behind: caught up; the worker is back in the idle CPU class"
    # The watcher, in the worker's thread, saw it in the normal class, and idle last.
    assert os.SCHED_OTHER in policies
    assert policies[-1] == os.SCHED_IDLE
    await assert_journal_complete(redis, dsn, keyspace, accounts)


def test_without_the_right_to_leave_it_the_worker_stays_idle_and_says_so() -> None:
    """No CAP_SYS_NICE (dropped by setpriv) and an RLIMIT_NICE of 0: the kernel refuses the way
    back, and however far behind, the worker stays idle."""
    program = textwrap.dedent(
        """
        import logging, os, resource
        from pointauth.server.journal.priority import CpuClass
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
        cpu = CpuClass(max_lag_ms=1000)
        cpu.enter()
        cpu.update(lag_ms=60_000, caught_up=False)
        print(cpu.idle, cpu.can_return, os.sched_getscheduler(0) == os.SCHED_IDLE)
        print(cpu.state)
        """
    )
    done = subprocess.run(
        ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--", sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == ["True False True", "idle, may not leave"]
    assert done.stderr.splitlines() == [
        "WARNING write-behind: the worker runs in the idle CPU class and may not leave it (it needs CAP_SYS_NICE "
        "or RLIMIT_NICE >= 20; systemd: LimitNICE=+0): while the tills keep this machine's cores busy, the "
        "journal falls behind"
    ]


def test_a_worker_started_in_another_class_goes_back_to_it_with_its_priority() -> None:
    """Started under `chrt -f 10` (real-time, priority 10): idle while it keeps up, and the same
    real-time class and priority after a long lag and after it stops."""
    program = textwrap.dedent(
        """
        import os
        from pointauth.server.journal.priority import CpuClass
        now = lambda: (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority, cpu.state)
        cpu = CpuClass(max_lag_ms=1000)
        cpu.enter()
        seen = [now()]
        cpu.update(lag_ms=60_000, caught_up=False)
        seen.append(now())
        cpu.update(lag_ms=0, caught_up=True)
        seen.append(now())
        cpu.leave()
        seen.append(now())
        print(seen)
        """
    )
    done = subprocess.run(
        ["chrt", "-f", "10", sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    idle, behind = (os.SCHED_IDLE, 0, "idle"), (os.SCHED_FIFO, 10, "normal, behind")
    stopped = (os.SCHED_FIFO, 10, "normal")
    assert done.stdout.strip() == str([idle, behind, idle, stopped])
