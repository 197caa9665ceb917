"""README.md's code blocks do what they say: every shell command parses with the real command
line parser and names files that exist, and every Python block runs as written against a server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest import account_size, bench, writebehind_bench
from pointauth.server.app import PointauthServer
from pointauth.server.cli import build_parser
from pointauth.server.config import Settings
from pointauth.server.devstack.demo import load_demo_members

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The address the README's examples use: `pointauth dev`'s.
README_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class Block:
    language: str
    text: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def code_blocks(markdown: str) -> list[Block]:
    return [
        Block(m["language"], m["text"], markdown.count("\n", 0, m.start()) + 1)
        for m in re.finditer(r"^```(?P<language>\w*)\n(?P<text>.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    ]


def shell_commands(block: Block) -> list[list[str]]:
    """Each command as argv: continued lines joined, comments dropped."""
    joined = block.text.replace("\\\n", " ")
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


BLOCKS = code_blocks(README.read_text())
COMMANDS = [(block, argv) for block in BLOCKS if block.language == "sh" for argv in shell_commands(block)]
PYTHON = [block for block in BLOCKS if block.language == "python"]


def test_readme_has_commands_and_python_to_check() -> None:
    assert len(COMMANDS) >= 10
    assert PYTHON


def _parses(parse: object, args: list[str]) -> object:
    """The parser's answer; an argparse error (it exits) fails the test with its message."""
    assert callable(parse)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            return parse(args)
        except SystemExit:
            pytest.fail(f"{shlex.join(args)}: {err.getvalue().strip()}")


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))


@pytest.mark.parametrize(("block", "argv"), COMMANDS, ids=[shlex.join(argv) for _, argv in COMMANDS])
def test_shell_command_parses_and_names_existing_files(block: Block, argv: list[str]) -> None:
    match argv:
        case ["uv", "run", "pointauth", *args]:
            parsed = _parses(build_parser().parse_args, args)
            config = getattr(parsed, "config", None)
            if config is not None:
                assert (REPO / config).is_file(), f"{block}: {config} does not exist"
        case ["uv", "run", "python", "-m", "loadtest.bench", *args]:
            _parses(bench.parse_args, args)
        case ["uv", "run", "python", "-m", "loadtest.writebehind_bench", *args]:
            _parses(writebehind_bench.parse_args, args)
        case ["uv", "run", "python", "-m", "loadtest.account_size", *args]:
            _parses(account_size.parse_args, args)
        case ["uv", "run", "python", "-m", module] if module.startswith("loadtest."):
            # Run with no arguments: the module must be there and be a command.
            assert callable(getattr(importlib.import_module(module), "main", None)), f"{block}: no {module}.main"
        case ["make", target]:
            assert target in _make_targets(), f"{block}: the Makefile has no target {target}"
        case [script] if script.startswith("./scripts/"):
            assert os.access(REPO / script, os.X_OK), f"{block}: {script} is not an executable file"
        case _:
            pytest.fail(f"{block}: this test does not know how to check {shlex.join(argv)}; teach it")


def test_readme_names_every_settings_section() -> None:
    text = README.read_text()
    missing = [name for name in Settings.__struct_fields__ if f"`{name}`" not in text]
    assert missing == []


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_is_clean(block: Block) -> None:
    """No unused imports or undefined names (pyflakes' checks)."""
    lint = [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F", "--stdin-filename", "README.py", "-"]
    result = subprocess.run(lint, input=block.text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{block}:\n{result.stdout}"


@pytest.mark.parametrize("block", PYTHON, ids=str)
async def test_python_block_runs_against_a_server(block: Block, server: PointauthServer, tmp_path: Path) -> None:
    """Runs as written, in a fresh interpreter, with the demo members it names; only the address
    changes, to this test's server. What a `print(...)  # comment` says it prints must appear."""
    await load_demo_members(server.accounts)
    assert README_ADDRESS in block.text, f"{block} does not use {README_ADDRESS}"
    code = block.text.replace(README_ADDRESS, f"127.0.0.1:{server.port}")
    # A subprocess, not exec(): the block runs its own event loop, and this server needs ours.
    # This server is plaintext without auth, as README.md says to run `pointauth dev` for these
    # examples (each acts as till and operator at once); the SDK reads POINTAUTH_PLAINTEXT.
    env = {**os.environ, "POINTAUTH_PLAINTEXT": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, f"{block}:\n{err.decode()}"
    printed = out.decode().splitlines()
    promised = re.findall(r"^\s*print\(.*\)\s+# (.+)$", block.text, re.MULTILINE)
    assert [line for line in promised if line not in printed] == [], f"{block} printed {printed}"
