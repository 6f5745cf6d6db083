"""Generate the Python stubs of proto/surgeon/v1/surgeon.proto into surgeon/v1/ (a generated subpackage).

    python -m surgeon.server.codegen          # regenerate in place (needs grpcio-tools)

The stubs are committed; tests/test_grpc_stubs.py regenerates them into a temporary folder and fails when the
committed ones differ. The proto package surgeon.v1 is also the Python package the stubs live in, so protoc's
absolute imports (`from surgeon.v1 import ...`) resolve as written: nothing is rewritten."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = Path("surgeon/v1/surgeon.proto")
OUT = REPO
STUBS = ("surgeon_pb2.py", "surgeon_pb2.pyi", "surgeon_pb2_grpc.py")


def generate(out: Path = OUT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (grpc_tools) into `out`/surgeon/v1 and return the stub paths."""
    import grpc_tools  # type: ignore[import-untyped]  # grpcio-tools ships no type information
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as googleapis:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            *(f"-I{path}" for path in _googleapis_includes(Path(googleapis))),
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto_root / PROTO),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO}")
    folder = out / PROTO.parent
    for package in (out / "surgeon", folder):
        (package / "__init__.py").touch()  # an existing one keeps its text
    return [folder / name for name in STUBS]


def _googleapis_includes(scratch: Path) -> list[Path]:
    """Include paths for google/longrunning/operations.proto and what it imports (google/api, google/rpc), from
    googleapis-common-protos. That package ships operations.proto as operations_proto.proto (its Python module
    registers the real name), so a copy under the real name goes into `scratch`."""
    from google.longrunning import operations_proto_pb2

    package = Path(operations_proto_pb2.__file__).parent
    target = scratch / "google" / "longrunning" / "operations.proto"
    target.parent.mkdir(parents=True)
    shutil.copyfile(package / "operations_proto.proto", target)
    return [scratch, package.parent.parent]


if __name__ == "__main__":
    for written in generate():
        print(written.relative_to(REPO))
    sys.exit(0)
