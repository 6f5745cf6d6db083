"""Prune, Validate and Export end to end, and the errors a job meets while it runs."""

from __future__ import annotations

import json

import pytest

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402

from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Code,
    Meta,
    code_of,
    detail,
    meta,
    outcome,
    rank_request,
    validation,
    wait,
)


def test_prune_validate_export_and_operations(stub, world):
    ranked = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    prune_op = stub.Prune(
        pb.PruneRequest(
            model=pb.ModelRef(model="local-dir:tiny"),
            ranking=outcome(ranked, pb.RankHeadsResult).run_dir,
            policy="top-k",
            k=2,
            validation=validation(),
            out="pruned",
        ),
        timeout=RPC_TIMEOUT,
    )
    done = wait(stub, prune_op)
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    result = outcome(done, pb.PruneResult)
    assert result.run_dir == "pruned" and result.exported and not result.gate_failures
    assert [h.name for h in result.heads] == [h.name for h in outcome(ranked, pb.RankHeadsResult).heads[:2]]
    assert "pruned/open_clip_model.safetensors" in result.files and "pruned/report.md" in result.files
    plan = json_format.MessageToDict(result.plan)
    assert plan["policy"] == "top-k" and plan == json.loads((world["exports"] / "pruned" / "plan.json").read_text())
    assert set(result.before) == {"mean_acc1", "max_skew@4", "ndkl"} and set(result.after) == set(result.before)
    # validate the pruned model (a local-dir: folder under the exports root): the prune's "after" numbers
    checked = wait(
        stub,
        stub.Validate(
            pb.ValidateRequest(model=pb.ModelRef(model="local-dir:pruned"), validation=validation(), out="checks-v"),
            timeout=RPC_TIMEOUT,
        ),
    )
    assert meta(checked).state == Meta.STATE_SUCCEEDED, checked.error
    validated = outcome(checked, pb.ValidateResult)
    for key, value in result.after.items():
        assert validated.summary[key] == pytest.approx(value, abs=1e-6)
    assert validated.out == "checks-v"
    assert json.loads((world["exports"] / "checks-v" / "validation.json").read_text())["summary"][
        "mean_acc1"
    ] == pytest.approx(result.after["mean_acc1"], abs=1e-6)
    benchmark = [f for f in validated.files if f.startswith("checks-v/clip_benchmark/")]
    assert len(benchmark) == 2 and all((world["exports"] / f).is_file() for f in validated.files)  # the 2 sets
    assert {json.loads((world["exports"] / f).read_text())["language"] for f in benchmark} == {"en"}
    report = json_format.MessageToDict(outcome(checked, pb.ValidateResult).report)
    assert {r["task"] for r in report["results"]} == {"zeroshot_classification", "bias"}
    # re-export the run folder
    exported = wait(stub, stub.Export(pb.ExportRequest(run_dir="pruned", labels="labels.txt"), timeout=60))
    assert meta(exported).state == Meta.STATE_SUCCEEDED, exported.error
    assert outcome(exported, pb.ExportResult).out_dir == "pruned/export-onnx"
    assert {"pruned/export-onnx/onnx/visual.onnx", "pruned/export-onnx/onnx/classifier.onnx"} <= set(
        outcome(exported, pb.ExportResult).files
    )
    assert all((world["exports"] / f).is_file() for f in outcome(exported, pb.ExportResult).files)
    # operations: listed newest first, filtered, paged, deleted
    only_prune = operations_pb2.ListOperationsRequest(filter="metadata.kind=KIND_PRUNE AND done=true")
    listed = stub.ListOperations(only_prune, timeout=RPC_TIMEOUT).operations
    assert prune_op.name in [o.name for o in listed] and all(meta(o).kind == Meta.KIND_PRUNE for o in listed)
    page = stub.ListOperations(operations_pb2.ListOperationsRequest(page_size=1), timeout=RPC_TIMEOUT)
    assert page.operations[0].name == exported.name and page.next_page_token == "1"
    got = stub.GetOperation(operations_pb2.GetOperationRequest(name=done.name), timeout=RPC_TIMEOUT)
    assert outcome(got, pb.PruneResult).run_dir == "pruned"
    stub.DeleteOperation(operations_pb2.DeleteOperationRequest(name=done.name), timeout=RPC_TIMEOUT)
    assert (
        code_of(lambda: stub.GetOperation(operations_pb2.GetOperationRequest(name=done.name), timeout=10))
        == Code.NOT_FOUND
    )
    assert (world["exports"] / "pruned" / "plan.json").is_file()  # forgetting an operation keeps its files
    # as the CLI, no run_dir means the newest run folder
    newest = wait(stub, stub.Export(pb.ExportRequest(format="safetensors"), timeout=60))
    assert meta(newest).state == Meta.STATE_SUCCEEDED, newest.error
    assert outcome(newest, pb.ExportResult).out_dir == "pruned/export-safetensors"


def test_manifest_rows_may_use_dotdot_inside_the_data_root(stub, world):
    manifest = world["data"] / "manifests" / "colours.csv"
    manifest.parent.mkdir(exist_ok=True)
    manifest.write_text(
        "path,label\n" + "".join(f"../val/{c}/{i}.png,{c}\n" for c in ("red", "blue") for i in range(2))
    )
    request = pb.ValidateRequest(
        model=pb.ModelRef(model="local-dir:tiny"), validation=pb.ValidationData(data="manifests/colours.csv")
    )
    done = wait(stub, stub.Validate(request, timeout=RPC_TIMEOUT))
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    validated = outcome(done, pb.ValidateResult)
    assert set(validated.summary) == {"mean_acc1"} and not validated.out


def test_errors_found_while_running_end_in_the_operation(stub, world):
    bad_layers = wait(stub, stub.RankHeads(rank_request(layers="2-7"), timeout=RPC_TIMEOUT))
    assert meta(bad_layers).state == Meta.STATE_FAILED and bad_layers.error.code == Code.INVALID_ARGUMENT.value[0]
    assert "out of range" in bad_layers.error.message
    ranked = wait(stub, stub.RankHeads(rank_request(out="for-tiny"), timeout=RPC_TIMEOUT))
    other = pb.PruneRequest(
        model=pb.ModelRef(model="local-dir:other"), ranking="for-tiny", policy="top-k", k=1, validation=validation()
    )
    wrong_model = wait(stub, stub.Prune(other, timeout=RPC_TIMEOUT))
    assert wrong_model.error.code == Code.FAILED_PRECONDITION.value[0] and "ranking was made for" in (
        wrong_model.error.message
    )
    assert detail(wrong_model.error, error_details_pb2.Help).links[0].description  # what to do about it
    assert detail(wrong_model.error, error_details_pb2.ErrorInfo).reason == "PRECONDITION_FAILED"
    gated = pb.PruneRequest(
        model=pb.ModelRef(model="local-dir:tiny"),
        ranking=outcome(ranked, pb.RankHeadsResult).run_dir,
        policy="top-k",
        k=2,
        validation=validation(),
        max_skew=-1.0,
        out="gated",
    )
    failed = wait(stub, stub.Prune(gated, timeout=RPC_TIMEOUT))
    assert meta(failed).state == Meta.STATE_FAILED and failed.error.code == Code.FAILED_PRECONDITION.value[0]
    assert not failed.HasField("response")  # exactly one of error and response: the result rides in the details
    assert detail(failed.error, error_details_pb2.ErrorInfo).reason == "GATE_FAILED"
    gated_result = outcome(failed, pb.PruneResult)
    assert gated_result.gate_failures and not gated_result.exported  # the run folder and its report remain
    gated_dir = world["exports"] / "gated"
    assert (gated_dir / "report.md").is_file() and not (gated_dir / "open_clip_model.safetensors").exists()
