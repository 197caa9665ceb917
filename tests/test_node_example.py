"""The Node.js example a till vendor starts from (client_sdk/examples/node) decodes pointauth's
error details from the `grpc-status-details-bin` trailer: ErrorInfo's reason and BadRequest's
field violations, exactly as the server sends them."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from google.rpc import status_pb2

from pointauth.server.app import PointauthServer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "client_sdk" / "examples" / "node"

needs_node = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="node and npm are not installed"
)


@pytest.fixture(scope="session")
def node_example() -> Path:
    """The example with its packages installed by `npm ci`, once per lock file: a later run finds
    them in place (node_modules, ignored by git) and installs nothing."""
    lock = EXAMPLE / "package-lock.json"
    wanted = hashlib.sha256(lock.read_bytes() + (EXAMPLE / "package.json").read_bytes()).hexdigest()
    stamp = EXAMPLE / "node_modules" / ".pointauth-installed-from"
    # Others may run this test at the same time, on the same folder: one installs, the rest wait.
    with (Path(tempfile.gettempdir()) / "pointauth-node-example.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not stamp.exists() or stamp.read_text() != wanted:
            # No install scripts: none of these packages needs one to work.
            command = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
            subprocess.run(command, cwd=EXAMPLE, check=True, timeout=600, capture_output=True)
            stamp.write_text(wanted)
    return EXAMPLE


@needs_node
async def test_node_example_prints_error_reason_and_field_violations(
    node_example: Path, server: PointauthServer, member: str
) -> None:
    # Asynchronously: the server answers from this same event loop.
    # googleapis-common-protos (a dependency of grpcio-status) ships google/rpc/*.proto.
    google_protos = Path(status_pb2.__file__).parents[2]
    proc = await asyncio.create_subprocess_exec(
        "node",
        "error_details.js",
        f"127.0.0.1:{server.port}",
        member,
        cwd=node_example,
        env={**os.environ, "GOOGLE_PROTOS": str(google_protos)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    lines = text.splitlines()
    reason, metadata = lines[2].split(" {", 1)
    assert [*lines[:2], reason, *lines[3:5]] == [
        f"card {member}: 1000 points available; asking for 1001",
        "AuthorizeHold: FAILED_PRECONDITION",
        "  reason INSUFFICIENT_POINTS (pointauth.v1)",
        "AuthorizeHold with bad input: INVALID_ARGUMENT",
        "  reason INVALID_ARGUMENT (pointauth.v1) {}",
    ], text
    assert json.loads("{" + metadata) == {"available_points": "1000", "requested_points": "1001"}
    fields = [line.removeprefix("  field ").split(":")[0] for line in lines[5:]]
    assert fields == ["request_id", "point_of_sale.channel", "points"], text


def test_node_modules_is_ignored_by_git() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", str(EXAMPLE / "node_modules" / "x")], cwd=REPO, check=False)
    assert ignored.returncode == 0
