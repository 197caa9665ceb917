"""The benches' CPU split (loadtest/procs.py's `cpu_split` and `pin`, used by `loadtest.bench
--store-cpu` and `writebehind_bench --split-cpus`): every thread of the processes set apart runs
on the last CPU; and the bench's --store-cpu end to end, its stores on that CPU and its servers on
the others."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import bench
from loadtest.procs import cpu_split, pin, tree

REPO = Path(__file__).resolve().parents[2]
ALLOWED = os.sched_getaffinity(0)

pytestmark = pytest.mark.skipif(len(ALLOWED) < 2, reason="a CPU split needs two CPUs")


def threads_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread of the process and the CPUs it may run on."""
    return {int(task.name): os.sched_getaffinity(int(task.name)) for task in Path(f"/proc/{pid}/task").glob("*")}


def test_the_last_cpu_is_set_apart_from_the_others() -> None:
    own, rest = cpu_split("--store-cpu")
    assert own == {max(ALLOWED)}
    assert rest == ALLOWED - own


def test_pin_moves_every_thread_of_every_process_given() -> None:
    # A process whose second thread started before the pin, as Redis's background threads do.
    program = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", program])
    try:
        while len(threads_cpus(proc.pid)) < 2:
            time.sleep(0.01)
        own, _ = cpu_split("--store-cpu")
        pin([proc.pid], own)
        pinned = threads_cpus(proc.pid)
        assert len(pinned) == 2
        assert set(map(frozenset, pinned.values())) == {frozenset(own)}
        assert os.sched_getaffinity(0) == ALLOWED  # only those given
    finally:
        proc.kill()
        proc.wait(10)
    pin([proc.pid], own)  # gone by now: skipped, no error


def test_bench_runs_the_stores_on_their_cpu_and_the_rest_on_the_others(tmp_path: Path) -> None:
    own, rest = cpu_split("--store-cpu")
    command = [
        sys.executable, "-m", "loadtest.bench", "--quick", "--accounts", "200", "--workers", "1", "--clients", "1",
        "--scenarios", "authorize", "--security", "", "--store-cpu", "--data-dir", str(tmp_path / "stack"),
        "--json", str(tmp_path / "bench.json"),
    ]  # fmt: skip
    running = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest: dict[str, set[frozenset[int]]] = {}
    try:
        # The stores start where the bench runs and are moved before the first step: the last look
        # at each process, taken while the steps run, is where it measured.
        while running.poll() is None:
            now: dict[str, set[frozenset[int]]] = {}
            for pid in tree(running.pid):
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    cpus = set(map(frozenset, threads_cpus(pid).values()))
                except OSError:
                    continue
                role = (
                    "redis" if comm == "redis-server"
                    else "postgres" if comm == "postgres"
                    else "worker" if b"worker" in cmdline
                    else "server" if b"serve" in cmdline
                    else None
                )  # fmt: skip
                if role:
                    now.setdefault(role, set()).update(cpus)
            latest.update(now)
            time.sleep(0.2)
        output = running.communicate(timeout=10)[0]
    finally:
        if running.poll() is None:
            running.kill()
    assert running.returncode == 0, output
    assert f"CPUs: Redis, PostgreSQL and the worker on CPU {max(own)}, the rest on {sorted(rest)}" in output
    assert latest == {
        "redis": {frozenset(own)},
        "postgres": {frozenset(own)},
        "worker": {frozenset(own)},
        "server": {frozenset(rest)},
    }


def test_store_cpu_is_refused_with_stores_the_bench_did_not_start() -> None:
    with pytest.raises(SystemExit, match="--background-idle and --store-cpu need the embedded stack"):
        bench.main(["--store-cpu", "--redis-url", "redis://127.0.0.1:1/0"])
    assert os.sched_getaffinity(0) == ALLOWED  # nothing was moved
