"""Requests refused at once: their status codes and the details in the status trailer."""

from __future__ import annotations

import pytest

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    UNKNOWN,
    Code,
    code_of,
    detail,
    library_ranking,
    prune_request,
    rank_request,
)


def test_error_details_in_the_status_trailer(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.RankHeads(rank_request(m=0), timeout=RPC_TIMEOUT)
    status = rpc_status.from_call(info.value)
    assert status.code == Code.INVALID_ARGUMENT.value[0] and status.message == info.value.details()
    assert "hint" not in status.message  # the hint travels as google.rpc.Help, not in the text
    assert detail(status, error_details_pb2.ErrorInfo).reason == "INVALID_INPUT"
    assert detail(status, error_details_pb2.ErrorInfo).domain == "surgeon"
    violation = detail(status, error_details_pb2.BadRequest).field_violations[0]
    assert violation.field == "m" and "1..100" in violation.description
    with pytest.raises(grpc.RpcError) as info:
        stub.GetOperation(operations_pb2.GetOperationRequest(name="operations/x"), timeout=RPC_TIMEOUT)
    status = rpc_status.from_call(info.value)
    assert detail(status, error_details_pb2.BadRequest).field_violations[0].field == "name"
    assert detail(status, error_details_pb2.Help).links[0].description == "operations/<32 hex>"


@pytest.mark.parametrize(
    ("rpc", "make", "code"),
    [
        ("RankHeads", lambda w: rank_request(model=pb.ModelRef(model="ViT-Nope")), Code.NOT_FOUND),
        ("RankHeads", lambda w: rank_request(model=pb.ModelRef(model="local-dir:missing")), Code.NOT_FOUND),
        ("RankHeads", lambda w: rank_request(m=0), Code.INVALID_ARGUMENT),
        ("RankHeads", lambda w: rank_request(judge="oracle"), Code.INVALID_ARGUMENT),
        ("RankHeads", lambda w: rank_request(judge="llm"), Code.INVALID_ARGUMENT),
        (
            "RankHeads",
            lambda w: rank_request(images=pb.ImageSource(images="images", n_images=0)),
            Code.INVALID_ARGUMENT,
        ),
        ("RankHeads", lambda w: rank_request(texts="missing.txt"), Code.NOT_FOUND),
        ("RankHeads", lambda w: rank_request(images=pb.ImageSource(images="../outside")), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(images=pb.ImageSource(images=str(w["outside"]))), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(images=pb.ImageSource(images="escape")), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(images=pb.ImageSource(images="linked")), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(texts="/etc/hostname"), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(taxonomy="escape/secret.png"), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(out="../x"), Code.PERMISSION_DENIED),
        ("RankHeads", lambda w: rank_request(out=str(w["outside"] / "x")), Code.PERMISSION_DENIED),
        (
            "RankHeads",
            lambda w: rank_request(model=pb.ModelRef(model=f"local-dir:{w['outside']}")),
            Code.PERMISSION_DENIED,
        ),
        (
            "RankHeads",
            lambda w: rank_request(model=pb.ModelRef(model="local-dir:../models/tiny")),
            Code.PERMISSION_DENIED,
        ),
        ("RankHeads", lambda w: rank_request(out="existing"), Code.FAILED_PRECONDITION),
        ("Prune", lambda w: prune_request(ranking="ranking", policy="magic"), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking="ranking", policy="top-k", k=0), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking="ranking", policy="top-k", k=999), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking="ranking", policy="heads", heads="L1.Hx"), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking="ranking", policy="top-k", mode="slice"), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking="ranking", export_format="tflite"), Code.INVALID_ARGUMENT),
        ("Prune", lambda w: prune_request(ranking=str(w["outside"])), Code.PERMISSION_DENIED),
        ("Prune", lambda w: prune_request(ranking="nope"), Code.NOT_FOUND),
        ("Prune", lambda w: prune_request(ranking="ranking-link"), Code.PERMISSION_DENIED),
        (
            "Prune",
            lambda w: prune_request(
                ranking="ranking", validation=pb.ValidationData(bias_data="evil.csv", queries="queries.txt")
            ),
            Code.PERMISSION_DENIED,
        ),
        (
            "Prune",
            lambda w: prune_request(ranking="ranking", validation=pb.ValidationData(data="evil_abs.csv")),
            Code.PERMISSION_DENIED,
        ),
        ("Prune", lambda w: prune_request(ranking="ranking", labels="escape/secret.png"), Code.PERMISSION_DENIED),
        *[  # a first row naming no image is looked at as a header: only once it is known to be inside the root
            (
                "Prune",
                lambda w, name=name: prune_request(
                    ranking="ranking", validation=pb.ValidationData(bias_data=name, queries="queries.txt")
                ),
                Code.PERMISSION_DENIED,
            )
            for name in ("first_row_out_exists.csv", "first_row_out_missing.csv")
        ],
        ("Validate", lambda w: pb.ValidateRequest(model=pb.ModelRef(model="RN50x64-nope")), Code.NOT_FOUND),
        (
            "Validate",
            lambda w: pb.ValidateRequest(
                model=pb.ModelRef(model="local-dir:tiny"), validation=pb.ValidationData(data="../val")
            ),
            Code.PERMISSION_DENIED,
        ),
        ("Export", lambda w: pb.ExportRequest(run_dir="../.."), Code.PERMISSION_DENIED),
        ("Export", lambda w: pb.ExportRequest(run_dir="nope"), Code.NOT_FOUND),
        ("Export", lambda w: pb.ExportRequest(run_dir="existing", format="tflite"), Code.INVALID_ARGUMENT),
        ("GetOperation", lambda w: operations_pb2.GetOperationRequest(name=UNKNOWN), Code.NOT_FOUND),
        ("GetOperation", lambda w: operations_pb2.GetOperationRequest(name="operations/nope"), Code.INVALID_ARGUMENT),
        ("GetOperation", lambda w: operations_pb2.GetOperationRequest(), Code.INVALID_ARGUMENT),
        ("CancelOperation", lambda w: operations_pb2.CancelOperationRequest(name=UNKNOWN), Code.NOT_FOUND),
        ("DeleteOperation", lambda w: operations_pb2.DeleteOperationRequest(name=UNKNOWN), Code.NOT_FOUND),
        ("WaitOperation", lambda w: operations_pb2.WaitOperationRequest(name=UNKNOWN), Code.NOT_FOUND),
        ("WatchOperation", lambda w: pb.WatchOperationRequest(name=UNKNOWN), Code.NOT_FOUND),
        ("WatchOperation", lambda w: pb.WatchOperationRequest(name="../operations"), Code.INVALID_ARGUMENT),
        ("ListOperations", lambda w: operations_pb2.ListOperationsRequest(page_token="x"), Code.INVALID_ARGUMENT),
        ("ListOperations", lambda w: operations_pb2.ListOperationsRequest(filter="kind=Prune"), Code.INVALID_ARGUMENT),
    ],
    ids=[
        "unknown-model",
        "missing-local-dir",
        "m-zero",
        "unknown-judge",
        "llm-judge",
        "n-images-zero",
        "missing-pool",
        "images-dotdot",
        "images-absolute-outside",
        "images-symlink-out",
        "image-symlinked-out",
        "texts-outside",
        "taxonomy-via-symlink",
        "out-dotdot",
        "out-absolute-outside",
        "model-absolute-outside",
        "model-dotdot",
        "out-exists",
        "unknown-policy",
        "k-zero",
        "k-beyond-ranking",
        "malformed-heads",
        "unknown-mode",
        "unknown-export-format",
        "ranking-outside",
        "missing-ranking",
        "ranking-folder-file-leads-out",
        "manifest-row-dotdot",
        "manifest-row-absolute",
        "labels-via-symlink",
        "manifest-first-row-out-exists",
        "manifest-first-row-out-missing",
        "validate-unknown-model",
        "validate-data-dotdot",
        "export-dotdot",
        "export-missing-run",
        "export-unknown-format",
        "get-unknown",
        "get-malformed",
        "get-empty",
        "cancel-unknown",
        "delete-unknown",
        "wait-unknown",
        "watch-unknown",
        "watch-malformed",
        "bad-page-token",
        "bad-filter",
    ],
)
def test_bad_requests_are_refused_at_once(stub, world, rpc, make, code):
    if not (world["data"] / "ranking" / "ranking.json").exists():
        library_ranking(world).write(world["data"] / "ranking")
    (world["exports"] / "existing").mkdir(exist_ok=True)
    before = sorted(p.name for p in world["exports"].iterdir())
    assert code_of(lambda: getattr(stub, rpc)(make(world), timeout=RPC_TIMEOUT)) == code
    assert sorted(p.name for p in world["exports"].iterdir()) == before  # nothing written
