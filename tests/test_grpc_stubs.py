"""The committed stubs match the proto, and server reflection describes the service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_reflection")

from surgeon.server.codegen import STUBS, generate  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402


def test_committed_stubs_match_the_proto(tmp_path):
    generate(out=tmp_path)
    committed = Path(pb.__file__).parent

    def normal(text: str) -> str:  # the generator's own version stamps may differ; the code may not
        text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", "", text)
        return re.sub(r"(Protobuf Python Version:|GRPC_GENERATED_VERSION =).*", "", text)

    for name in STUBS:
        fresh = (tmp_path / "surgeon" / "v1" / name).read_text()
        assert normal(fresh) == normal((committed / name).read_text()), (
            f"surgeon/v1/{name} is out of date with proto/surgeon/v1/surgeon.proto: "
            "run python -m surgeon.server.codegen"
        )


def test_reflection_lists_the_service(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert {"surgeon.v1.Surgeon", "google.longrunning.Operations", "grpc.health.v1.Health"} <= set(services)
    assert database.FindFileContainingSymbol("surgeon.v1.Surgeon").name == "surgeon/v1/surgeon.proto"
    operations = database.FindFileContainingSymbol("google.longrunning.Operations")
    assert operations.name == "google/longrunning/operations.proto"  # grpcurl can call it by reflection
