"""Processes the benchmark runs and watches: servers started as commands, the client pool, and the
CPU each group of processes used (from /proc), which tells what bounds a step."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Self

from loadtest.driver import Step, StepResult, client_main

TICKS = os.sysconf("SC_CLK_TCK")
READY_WITHIN_S = 300
"""How long a service may take to serve: a pointauth process reads its snapshot of the card index
before it listens (seconds at ten million cards)."""


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(child) for child in task.read_text().split())
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children(current))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def named(command: str) -> list[int]:
    """Every process of this machine running `command` (e.g. redis-server, postgres): the stores'
    CPU counts whether the bench started them or was given them."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == command:
                found.append(int(comm.parent.name))
    return found


def cpu_split(option: str) -> tuple[set[int], set[int]]:
    """(the last CPU this process may run on, the others): a CPU of its own for what `option`
    sets apart, as a deployment would with cpusets or hosts of their own."""
    allowed = os.sched_getaffinity(0)
    rest = allowed - {max(allowed)}
    if not rest:
        raise SystemExit(f"{option} needs at least two CPUs")
    return {max(allowed)}, rest


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of these processes onto `cpus`: an affinity is a thread's, and threads made
    before it was set (Redis's, grpc's) keep their own. Processes gone meanwhile are skipped."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task.name), cpus)


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def _idle_capable_root() -> Path:
    """The cgroup hierarchy whose groups have cpu.idle: v1's cpu controller, or a v2 mount with
    the cpu controller enabled for its children."""
    if (CGROUP_V1_CPU / "cpu.idle").exists():
        return CGROUP_V1_CPU
    for root in CGROUP_V2:
        controllers = root / "cgroup.subtree_control"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return root
    raise SystemExit("no cgroup hierarchy with the cpu controller here: cannot make a group idle")


@contextlib.contextmanager
def idle_cgroup(name: str) -> Iterator[Callable[[list[int]], None]]:
    """A cgroup in the kernel's idle CPU class (cpu.idle = 1), as systemd's `CPUWeight=idle`
    makes a unit's: yields a function moving processes into it; removed on exit (its processes
    must have ended or left by then). Needs root."""
    group = _idle_capable_root() / name
    group.mkdir(exist_ok=True)
    (group / "cpu.idle").write_text("1")

    def move(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                (group / "cgroup.procs").write_text(str(pid))

    try:
        yield move
    finally:
        # Processes just killed may still be leaving it (EBUSY): give them a moment.
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.02)
        else:
            print(f"could not remove cgroup {group}: processes are still in it", file=sys.stderr)


def background_label(idle_cgroup_used: bool) -> str:
    """How a bench's write-behind ran, as its results record it."""
    return "worker and PostgreSQL in an idle cgroup" if idle_cgroup_used else "worker in the idle class"


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuMeter:
    """CPU used by named process groups between start() and stop(), in cores (1.0 = one core
    busy), and how busy the whole machine was (0..1: the share of all its cores' time)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._machine = (0, 0)
        self._t0 = 0.0
        self.busy = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        self._machine = _machine_ticks()

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        busy, total = _machine_ticks()
        self.busy = round((busy - self._machine[0]) / max(total - self._machine[1], 1), 3)
        return {name: round((cpu_seconds(pids) - self._start[name]) / elapsed, 2) for name, pids in self.groups.items()}


class Service:
    """A server command run for the benchmark; `with` starts it and waits for it to answer."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int | None,
        env: dict[str, str],
        log: Path,
        ready: tuple[str, int] | None = None,
    ) -> None:
        """`port`: where it answers gRPC once ready; None for a process that serves nothing.
        `ready`: (a line its processes log once serving, how many must have): a process that
        reads a snapshot first (pointauth's card index) listens later than its siblings."""
        self.name, self.command, self.port, self.env, self.log = name, command, port, env, log
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc is not None else []

    def __enter__(self) -> Self:
        with self.log.open("ab") as log:
            self._log_start = log.tell()  # the log may hold an earlier run's lines
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log)
        if self.port is not None:
            self._wait_listening()
        if self.ready is not None:
            self._wait_logged(*self.ready)
        else:
            # The first process to listen answered; give its siblings (SO_REUSEPORT) time to join.
            time.sleep(1.0)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The end of its log: the folder holding it may be gone once the error is read."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_logged(self, line: str, count: int) -> None:
        deadline = time.monotonic() + READY_WITHIN_S
        while self._logged_since_start().count(line) < count:
            if (self.proc is not None and self.proc.poll() is not None) or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"{self.name}: not {count}x {line!r} within {READY_WITHIN_S} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def _logged_since_start(self) -> str:
        with self.log.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def _wait_listening(self) -> None:
        # A TCP connection, not a gRPC channel: the same wait for a plaintext server and a TLS one.
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port or 0), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(
                        f"{self.name} did not listen on {self.target} within {READY_WITHIN_S} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in reversed(tree(self.proc.pid)):
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()


class ClientPool:
    """Client processes (spawned: grpc does not survive fork) that run each step together."""

    def __init__(self, size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(child,), name=f"bench-client-{index}", daemon=True)
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def run(self, steps: list[Step]) -> list[StepResult]:
        """One step per process (fewer steps than processes leaves the rest idle)."""
        for conn, step in zip(self._conns, steps, strict=False):
            conn.send(step)
        return [conn.recv() for conn, _ in zip(self._conns, steps, strict=False)]

    def __enter__(self) -> Self:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
