"""`pointauth dev` as a developer runs it: every command it prints works when pasted, and Ctrl-C
stops the server, then the worker (which journals what is left), then Redis and PostgreSQL,
without anything complaining on the way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from pointauth.server.config import load_settings
from pointauth.server.devstack.stack import EmbeddedStack, free_port

REPO = Path(__file__).resolve().parents[2]
READY = "Ctrl-C stops everything"


def pasted_commands(hint: str) -> list[str]:
    """The commands as a developer copies them: a line indented by two spaces starts one, lines
    indented by four continue it."""
    commands: list[str] = []
    for line in hint.splitlines():
        if line.startswith("    ") and commands:
            commands[-1] += "\n" + line
        elif line.startswith("  "):
            commands.append(line.strip())
    return commands


def _wait_for_hint(out: Path, proc: subprocess.Popen[bytes], err: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = out.read_text()
        if READY in text:
            return text
        assert proc.poll() is None, f"pointauth dev exited with {proc.returncode}:\n{err.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"pointauth dev printed no usage hint in 120 s:\n{err.read_text()}")


def _paste(command: str, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _running(*marks: str) -> list[str]:
    """Command lines of live processes that contain one of `marks` (ports may be reused by
    others' tests at once, so the processes are looked for, not the ports)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if cmdline.parent.name == str(os.getpid()):
            continue
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended while we looked
        if any(mark in command for mark in marks):
            found.append(command)
    return found


def test_dev_prints_working_commands_and_stops_in_order_on_ctrl_c(tmp_path: Path) -> None:
    data_dir, out, err = tmp_path / "data", tmp_path / "dev.out", tmp_path / "dev.err"
    port = free_port()
    # Pasted `uv run` commands must not re-sync the virtual environment others' tests share.
    env = {**os.environ, "UV_NO_SYNC": "1"}
    command = [sys.executable, "-m", "pointauth.server.cli", "dev", "--data-dir", str(data_dir), "--port", str(port)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        # A process group of its own, as a terminal's foreground job has: Ctrl-C signals all of it.
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        hint = _wait_for_hint(out, proc, err)
        config = data_dir / "pointauth.toml"
        settings = load_settings(config, env={})
        assert settings.server.port == port
        commands = pasted_commands(hint)
        by_kind = {
            "status": [c for c in commands if c.startswith(f"uv run pointauth --config {config} status")],
            "reconcile": [c for c in commands if c.startswith(f"uv run pointauth --config {config} reconcile")],
            "psql": [c for c in commands if "psql " in c and settings.postgres.dsn in c],
            "balance": [c for c in commands if c.startswith("uv run buf curl") and c.endswith("/GetBalance")],
            "hold": [c for c in commands if c.startswith("uv run buf curl") and c.endswith("/AuthorizeHold")],
            "python": [c for c in commands if c.startswith("uv run python client_sdk/examples/get_balance.py")],
        }
        assert {kind: len(found) for kind, found in by_kind.items()} == dict.fromkeys(by_kind, 1), hint
        assert sorted(c for found in by_kind.values() for c in found) == sorted(commands), "a command is untested"
        run = {kind: found[0] for kind, found in by_kind.items()}

        assert "backlog:" in _paste(run["status"], env)
        balance = json.loads(_paste(run["balance"], env))
        assert (balance["accountId"], balance["balance"]["availablePoints"]) == ("member-0001", "1500")
        hold = json.loads(_paste(run["hold"], env))
        assert (hold["heldPoints"], hold["balance"]["availablePoints"]) == ("100", "1400")
        assert _paste(run["python"], env).startswith("member-0001: 1400 points available, 100 held\n")
        assert "agree" in _paste(run["reconcile"], env)
        assert "HOLD_AUTHORIZED" in _paste(run["psql"], env)
        # Its worker journaled those, in the server's thread: which stays in the normal CPU class
        # (the idle class is for `pointauth worker`, a process of its own).
        assert {os.sched_getscheduler(int(t.name)) for t in Path(f"/proc/{proc.pid}/task").iterdir()} == {
            os.SCHED_OTHER
        }

        # One more hold, and Ctrl-C at once: the worker must still journal it before the stores stop.
        _paste(run["hold"], env)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(90) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the stores get SIGTERM as their parent dies (stack.py)
            proc.wait()

    log = err.read_text()
    assert "unavailable" not in log.lower(), log
    assert "Traceback" not in log, log
    assert "stopping: the server, then the write-behind worker" in log
    # PostgreSQL names the data folder; redis-server shows its address as its title.
    redis_title = f"redis-server {urlparse(settings.redis.url).netloc}"
    assert _running(str(data_dir.resolve()), redis_title) == []
    with EmbeddedStack(data_dir.resolve()) as stack:
        count = [
            str(stack.postgres.bindir / "psql"), stack.postgres.dsn, "-tAc",
            "SELECT count(*) FROM journal WHERE type = 'HOLD_AUTHORIZED'",
        ]  # fmt: skip
        journaled = subprocess.run(count, capture_output=True, text=True, check=True).stdout.strip()
    assert journaled == "2"
