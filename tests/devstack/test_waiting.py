"""The embedded stack waits for a server that is busy getting ready (Redis loading a large
dataset answers -LOADING for minutes) and gives up on one that does not answer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from pointauth.server.devstack.stack import StackError, _wait_for


@pytest.fixture
def alive() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_busy_server_is_waited_for_past_the_timeout(alive: subprocess.Popen[bytes]) -> None:
    answers = iter([False, None, None, None, None, None, True])  # 0.05 s apart: 0.3 s busy
    _wait_for(lambda: next(answers), "server", alive, timeout=0.12)
    assert next(answers, "done") == "done"


def test_a_server_that_does_not_answer_is_given_up_on(alive: subprocess.Popen[bytes]) -> None:
    with pytest.raises(StackError, match="server did not become ready within 0 s"):
        _wait_for(lambda: False, "server", alive, timeout=0.2)


def test_a_server_that_exits_while_starting_is_reported(alive: subprocess.Popen[bytes]) -> None:
    alive.kill()
    alive.wait()
    with pytest.raises(StackError, match="server exited with code -9 while starting"):
        _wait_for(lambda: None, "server", alive)
