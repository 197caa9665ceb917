"""Generate the Python stubs of proto/ into the client SDK; `--check` fails if they are stale.

CI runs the check so that the committed stubs always match the .proto files.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "client_sdk" / "src"
PACKAGE_DIR = Path("pointauth") / "v1"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins sit beside this interpreter; the venv need not be on PATH.
    bin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}", f"--mypy_out={out}",
        f"--grpc_python_out={out}", f"--mypy_grpc_out={out}",
        *protos,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    (out / PACKAGE_DIR / "__init__.py").write_text('"""Generated protobuf and gRPC code of pointauth.v1."""\n')


def stale_files(fresh: Path) -> list[str]:
    committed = OUT_ROOT / PACKAGE_DIR
    new = fresh / PACKAGE_DIR
    names = {p.name for p in committed.glob("*") if p.is_file()} | {p.name for p in new.glob("*")}
    return sorted(
        name
        for name in names
        if not (committed / name).is_file()
        or not (new / name).is_file()
        or not filecmp.cmp(committed / name, new / name, shallow=False)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = stale_files(Path(tmp))
    if stale:
        print("generated stubs differ from proto/: run scripts/gen_protos.py", *stale, sep="\n  ")
        return 1
    print("generated stubs match proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
