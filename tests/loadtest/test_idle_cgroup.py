"""The benches' `--background-idle`: a cgroup in the kernel's idle CPU class, holding the processes
it is given, gone once they have ended."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.procs import CGROUP_V1_CPU, idle_cgroup, tree

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (CGROUP_V1_CPU / "cpu.idle").exists(),
    reason="needs root and cgroup v1's cpu controller with cpu.idle, as this project's machines have",
)


def cpu_cgroup(pid: int) -> str:
    """The process's group in the cpu hierarchy, from /proc/<pid>/cgroup ("3:cpu:/name")."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    raise AssertionError(f"no cpu controller line for {pid}")


def test_the_processes_given_move_into_an_idle_cgroup_removed_after_them() -> None:
    # A parent and its child, as PostgreSQL's postmaster and a backend: both are given.
    sleep = "import time; time.sleep(60)"
    program = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    parent = subprocess.Popen([sys.executable, "-c", program])
    try:
        while len(tree(parent.pid)) < 2:
            time.sleep(0.01)
        name = f"pointauth-test-{os.getpid()}"
        with idle_cgroup(name) as move:
            group = CGROUP_V1_CPU / name
            assert (group / "cpu.idle").read_text().strip() == "1"
            pids = tree(parent.pid)
            move(pids)
            assert {cpu_cgroup(pid) for pid in pids} == {f"/{name}"}
            assert sorted(int(p) for p in (group / "cgroup.procs").read_text().split()) == sorted(pids)
            assert cpu_cgroup(os.getpid()) != f"/{name}"  # only those given
            for pid in pids:
                os.kill(pid, 9)
            parent.wait(10)
        assert not group.exists()
    finally:
        if parent.poll() is None:
            parent.kill()
