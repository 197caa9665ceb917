"""The write-behind's CPU class: the kernel's idle class while it keeps up, the normal one when it
falls far behind.

The tills never wait on the write-behind, but on a host they share with it they share its cores.
Traced on the write-behind bench (`perf sched timehist`), a till's call woken on a core that the
worker or its PostgreSQL backend was using waited until the scheduler's next tick (HZ=250: up to
4 ms) preempted them, both running for milliseconds at a time: that is what lifted the tills' p99
during a catch-up to about 3x its steady value. A thread in the idle class
(SCHED_IDLE) is preempted at once by any normal task, and runs on the CPU time they leave. The
class counts among the tasks of one cgroup: PostgreSQL, or a worker in a cgroup of its own (a
systemd unit), is put there by its cgroup (`CPUWeight=idle`, README "Running it for real").

Its one risk: on a machine the tills keep saturated the worker would get almost no CPU, and the
journal would fall behind for as long as that lasts. So once the lag passes `max_lag_ms` the
worker returns to the normal class, and goes idle again when caught up. Returning needs
CAP_SYS_NICE or an RLIMIT_NICE of at least 20 (systemd: `LimitNICE=+0`); without either, the
worker stays idle and says so when it starts.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


_IDLE = (getattr(os, "SCHED_IDLE", -1), 0)


def _set(policy: tuple[int, int]) -> None:
    # pid 0: the calling thread, the worker's event loop (threads it starts later inherit it).
    os.sched_setscheduler(0, policy[0], os.sched_param(policy[1]))


class CpuClass:
    """Moves the calling thread between the idle and the normal class as the worker's lag asks."""

    def __init__(self, max_lag_ms: int) -> None:
        self.max_lag_ms = max_lag_ms
        self.idle = False
        self.can_return = False
        """Whether this process may leave the idle class (known once `enter` has run)."""
        self._initial: tuple[int, int] | None = None
        """The thread's class and priority before `enter`: what `update` and `leave` go back to."""
        self._behind = False

    @property
    def state(self) -> str:
        """What `pointauth status` shows of it (the worker's heartbeat)."""
        if self.idle:
            return "idle" if self.can_return else "idle, may not leave"
        return "normal, behind" if self._behind else "normal"

    def enter(self) -> None:
        """Goes idle, and finds out whether the worker may come back: by coming back once."""
        if not hasattr(os, "SCHED_IDLE"):
            log.warning("write-behind: this system has no idle CPU class; the worker runs in the normal one")
            return
        try:
            self._initial = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
            _set(_IDLE)
        except OSError as exc:
            log.warning("write-behind: could not enter the idle CPU class (%s); the worker runs in the normal one", exc)
            return
        try:
            _set(self._initial)
            _set(_IDLE)
            self.can_return = True
        except OSError:  # EPERM, the usual reason: see the module's docstring
            self.can_return = False
        self.idle = True
        if self.can_return:
            log.info(
                "write-behind: the worker runs in the idle CPU class; more than %.1f s behind, it returns "
                "to the normal one until caught up", self.max_lag_ms / 1000,
            )  # fmt: skip
        else:
            log.warning(
                "write-behind: the worker runs in the idle CPU class and may not leave it (it needs "
                "CAP_SYS_NICE or RLIMIT_NICE >= 20; systemd: LimitNICE=+0): while the tills keep this "
                "machine's cores busy, the journal falls behind"
            )

    def update(self, lag_ms: int, caught_up: bool) -> None:
        """After each round: `lag_ms`, the age of the oldest entry just applied; `caught_up`,
        whether the round took the last of the backlog (a short batch, or nothing to read)."""
        if self._initial is None or not self.can_return:
            return
        if self.idle and lag_ms > self.max_lag_ms:
            _set(self._initial)
            self.idle, self._behind = False, True
            log.warning(
                "write-behind: %.1f s behind; the worker runs in the normal CPU class until caught up", lag_ms / 1000
            )
        elif not self.idle and caught_up and lag_ms <= self.max_lag_ms // 2:
            # Half the bound: a steady lag just around it does not flip the class every round.
            _set(_IDLE)
            self.idle, self._behind = True, False
            log.info("write-behind: caught up; the worker is back in the idle CPU class")

    def leave(self) -> None:
        """Back to the class the thread had (a worker run inside another program, a test)."""
        self._behind = False
        if self._initial is not None and self.idle and self.can_return:
            _set(self._initial)
            self.idle = False
