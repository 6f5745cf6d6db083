"""The gRPC service end to end: a real server on a loopback port, a real grpc client, tiny real open_clip
models under a models root and small real files under a data root (the bundled toy is used when present)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health")
pytest.importorskip("grpc_reflection")

from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

import surgeon.server.service as service_module  # noqa: E402
from surgeon.images import folder_images  # noqa: E402
from surgeon.load import TOY_MODEL_DIR, load_model  # noqa: E402
from surgeon.pools import load_pool  # noqa: E402
from surgeon.rank import Ranking, rank_heads  # noqa: E402
from surgeon.server.codegen import STUBS, generate  # noqa: E402
from surgeon.server.main import SurgeonServer  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc  # noqa: E402
from tests.conftest import save_local_dir, tiny_config  # noqa: E402

Code = grpc.StatusCode
Meta = pb.OperationMetadata
UNKNOWN = "operations/" + "0" * 32  # well-formed, never issued
RPC_TIMEOUT = 60
TAXONOMY = {
    "version": 1,
    "concepts": {
        "colors": {"description": "", "terms": ["red", "blue", "green"], "priority": 0},
        "animals": {"description": "", "terms": ["dog", "cat", "bird"], "priority": 0},
        "locations": {"description": "", "terms": ["paris", "tokyo", "city"], "priority": 0},
    },
}
POOL = ["a red circle", "a blue square", "a green thing", "a dog in a park", "a cat on a sofa", "the city of Paris"]


def _png(path: Path, rgb, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("grpc").resolve()
    models, data, exports, outside = (base / n for n in ("models", "data", "exports", "outside"))
    save_local_dir(models / "tiny", tiny_config())
    save_local_dir(models / "other", tiny_config(), seed=1)
    rng = np.random.default_rng(0)
    for i in range(24):
        _png(data / "images" / f"img{i:02d}.png", rng.integers(0, 255, 3), i)
    (data / "pool.txt").write_text("\n".join(POOL) + "\n")
    (data / "taxonomy.json").write_text(json.dumps(TAXONOMY))
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = ["path,group"]
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(4):
            _png(data / "val" / name / f"{i}.png", rgb, 100 + 10 * c + i)
            rows.append(f"val/{name}/{i}.png,{'ab'[i % 2]}")
    (data / "bias.csv").write_text("\n".join(rows) + "\n")
    (data / "queries.txt").write_text("a photo\na thing\n")
    (data / "labels.txt").write_text("red\ngreen\nblue\n")
    # things that lead outside the data root
    _png(outside / "secret.png", (0, 0, 0), 7)
    (data / "escape").symlink_to(outside, target_is_directory=True)
    _png(data / "linked" / "ok.png", (1, 2, 3), 8)
    (data / "linked" / "secret.png").symlink_to(outside / "secret.png")
    (outside / "ranking.json").write_text("{}")
    (data / "ranking-link").mkdir()
    (data / "ranking-link" / "ranking.json").symlink_to(outside / "ranking.json")  # a folder whose file leads out
    (data / "evil.csv").write_text("path,group\nval/red/0.png,a\n../outside/secret.png,b\n")
    (data / "evil_abs.csv").write_text(f"path,group\nval/red/0.png,a\n{outside / 'secret.png'},b\n")
    exports.mkdir()
    return {"models": models, "data": data, "exports": exports, "outside": outside}


@pytest.fixture(scope="module")
def server(world):
    srv = SurgeonServer(
        port=0,
        exports_root=world["exports"],
        models_root=world["models"],
        data_root=world["data"],
        max_jobs=2,
        queue_size=4,
    ).start()
    yield srv
    srv.stop(grace=5)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


class Client:
    """What a pipeline holds: the Surgeon stub and googleapis-common-protos' google.longrunning stub."""

    def __init__(self, channel):
        self.surgeon = pb_grpc.SurgeonStub(channel)
        self.operations = operations_pb2_grpc.OperationsStub(channel)

    def __getattr__(self, rpc: str):
        return getattr(self.surgeon if hasattr(self.surgeon, rpc) else self.operations, rpc)


@pytest.fixture(scope="module")
def stub(channel):
    return Client(channel)


def meta(op: operations_pb2.Operation) -> pb.OperationMetadata:
    unpacked = Meta()
    assert op.metadata.Unpack(unpacked), op.metadata.type_url
    return unpacked


def outcome(op: operations_pb2.Operation, kind):
    """The job's result: the response of a successful operation, or the one in a failed one's error details."""
    unpacked = kind()
    if op.HasField("response"):
        assert not op.HasField("error")  # exactly one of them
        assert op.response.Unpack(unpacked), op.response.type_url
        return unpacked
    packed = next(d for d in op.error.details if d.Is(kind.DESCRIPTOR))
    packed.Unpack(unpacked)
    return unpacked


def detail(status, kind):
    """The first detail of type `kind` in a google.rpc.Status, or None."""
    packed = next((d for d in status.details if d.Is(kind.DESCRIPTOR)), None)
    if packed is None:
        return None
    unpacked = kind()
    packed.Unpack(unpacked)
    return unpacked


def rank_request(**overrides) -> pb.RankHeadsRequest:
    fields = {
        "model": pb.ModelRef(model="local-dir:tiny"),
        "images": pb.ImageSource(images="images"),
        "texts": "pool.txt",
        "taxonomy": "taxonomy.json",
        "layers": "1-2",
        "m": 3,
    }
    fields.update(overrides)
    return pb.RankHeadsRequest(**fields)


def prune_request(**fields) -> pb.PruneRequest:
    return pb.PruneRequest(model=pb.ModelRef(model="local-dir:tiny"), **fields)


def validation() -> pb.ValidationData:
    return pb.ValidationData(data="val", bias_data="bias.csv", queries="queries.txt", skew_k=4)


def wait(stub, op: operations_pb2.Operation, timeout: float = RPC_TIMEOUT) -> operations_pb2.Operation:
    from google.protobuf.duration_pb2 import Duration

    done = stub.WaitOperation(
        operations_pb2.WaitOperationRequest(name=op.name, timeout=Duration(seconds=int(timeout))), timeout=timeout + 5
    )
    assert done.done, f"{op.name} not done after {timeout}s: {meta(done)}"
    return done


def code_of(call) -> Code:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, operations_pb2.Operation):
            list(result)
    return info.value.code()


def _library_ranking(world) -> Ranking:
    loaded = load_model(f"local-dir:{world['models'] / 'tiny'}", device="cpu")
    pool = load_pool(str(world["data"] / "pool.txt"), False, str(world["data"] / "taxonomy.json"))
    return rank_heads(loaded, folder_images(world["data"] / "images"), pool, layers="1-2", m=3, quiet=True)


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


def test_catalogue(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(page_size=1000), timeout=RPC_TIMEOUT).models}
    assert models["local-dir:tiny"].kind == pb.ModelInfo.KIND_LOCAL_DIR and models["local-dir:tiny"].available
    assert models["toy"].available == (TOY_MODEL_DIR / "open_clip_config.json").is_file()
    assert "openai" in models["ViT-B-32"].pretrained_tags
    for info in models.values():  # an architecture is available when some of its weights are in the local cache
        if info.kind == pb.ModelInfo.KIND_ARCHITECTURE:
            assert info.available == bool(info.cached_pretrained_tags)
            assert set(info.cached_pretrained_tags) <= set(info.pretrained_tags)
    paged, token = [], ""
    while True:
        answer = stub.ListModels(pb.ListModelsRequest(page_size=7, page_token=token), timeout=RPC_TIMEOUT)
        assert len(answer.models) <= 7
        paged += [m.name for m in answer.models]
        token = answer.next_page_token
        if not token:
            break
    assert paged == list(models)
    assert code_of(lambda: stub.ListModels(pb.ListModelsRequest(page_size=5000), timeout=10)) == Code.INVALID_ARGUMENT
    policies = stub.ListPolicies(pb.ListPoliciesRequest(), timeout=RPC_TIMEOUT)
    names = {p.name: p for p in policies.policies}
    assert {"top-k", "debias", "heads", "random"} <= set(names) and names["top-k"].options == ["k"]
    assert set(policies.modes) == {"zero", "mean", "hard"} and "llm" not in policies.judges
    assert list(policies.export_formats) == ["safetensors", "onnx", "both"]


def test_cached_pretrained_tags_come_from_the_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants
    import open_clip

    from surgeon.load import cached_pretrained_tags

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.cache/clip, open_clip's other cache
    assert cached_pretrained_tags("ViT-B-32") == []
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("c0ffee")
    (folder / "snapshots" / "c0ffee").mkdir(parents=True)
    (folder / "snapshots" / "c0ffee" / "open_clip_model.safetensors").write_bytes(b"weights")
    assert cached_pretrained_tags("ViT-B-32") == ["openai"]


def test_rank_heads_streams_progress_and_equals_the_library(stub, world):
    op = stub.RankHeads(rank_request(out="ranked"), timeout=RPC_TIMEOUT)
    assert op.name.startswith("operations/") and not op.done and meta(op).kind == Meta.KIND_RANK_HEADS
    events = list(stub.WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=RPC_TIMEOUT))
    assert events[-1].done and all(not e.done for e in events[:-1])
    stages = [meta(e).stage for e in events]
    assert "loading model" in stages and "head statistics" in stages and stages[-1] == "done"
    statistics = [meta(e).fraction for e in events if meta(e).stage == "head statistics"]
    assert statistics == sorted(statistics) and meta(events[-1]).fraction == 1.0  # a stage's own progress
    final = events[-1]
    assert meta(final).state == Meta.STATE_SUCCEEDED and not final.HasField("error")
    result = outcome(final, pb.RankHeadsResult)
    assert result.run_dir == "ranked" and len(result.heads) == 8 and list(result.layers) == [1, 2]
    assert not result.cached_stats and result.image_count == 24
    assert [h.ccs for h in result.heads] == sorted((h.ccs for h in result.heads), reverse=True)
    for rel in result.files:
        assert (world["exports"] / rel).is_file()
    # the service is a shell over the library: same ranking as the direct call
    expected = _library_ranking(world)
    assert result.ranking_sha256 == expected.digest() == Ranking.read(world["exports"] / "ranked").digest()
    # the statistics are cached and shared with the next job; a watch on a finished job yields it once
    again = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    repeated = outcome(again, pb.RankHeadsResult)
    assert repeated.cached_stats and repeated.ranking_sha256 == expected.digest()
    assert repeated.run_dir.startswith("rank-")
    watched = list(stub.WatchOperation(pb.WatchOperationRequest(name=again.name), timeout=RPC_TIMEOUT))
    assert len(watched) == 1 and watched[0].done


def test_a_generic_operations_client_follows_a_job_to_done(channel, stub):
    """A client that knows only google.longrunning (googleapis-common-protos' stubs) polls a RankHeads job
    the way LRO pollers do and reads its result from `response`."""
    started = stub.RankHeads(rank_request(out="generic"), timeout=RPC_TIMEOUT)
    operations = operations_pb2_grpc.OperationsStub(channel)
    deadline = time.monotonic() + RPC_TIMEOUT
    op = started
    while not op.done:
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.2)
        op = operations.GetOperation(operations_pb2.GetOperationRequest(name=started.name), timeout=RPC_TIMEOUT)
    assert op.name == started.name and not op.HasField("error")
    assert op.response.type_url == "type.googleapis.com/surgeon.v1.RankHeadsResult"
    assert op.metadata.type_url == "type.googleapis.com/surgeon.v1.OperationMetadata"
    ranked = pb.RankHeadsResult()
    op.response.Unpack(ranked)
    assert ranked.run_dir == "generic" and len(ranked.heads) == 8
    # the job-starting RPCs say what their operations hold (AIP-151), for clients that read descriptors
    method = pb.DESCRIPTOR.services_by_name["Surgeon"].methods_by_name["RankHeads"]
    info = method.GetOptions().Extensions[operations_pb2.operation_info]
    assert (info.response_type, info.metadata_type) == ("RankHeadsResult", "OperationMetadata")
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), timeout=RPC_TIMEOUT)
    assert started.name in [o.name for o in listed.operations]
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=started.name), timeout=RPC_TIMEOUT)


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
            pb.ValidateRequest(model=pb.ModelRef(model="local-dir:pruned"), validation=validation(), out="checks/v"),
            timeout=RPC_TIMEOUT,
        ),
    )
    assert meta(checked).state == Meta.STATE_SUCCEEDED, checked.error
    validated = outcome(checked, pb.ValidateResult)
    for key, value in result.after.items():
        assert validated.summary[key] == pytest.approx(value, abs=1e-6)
    assert validated.out == "checks/v"
    assert json.loads((world["exports"] / "checks" / "v" / "validation.json").read_text())["summary"][
        "mean_acc1"
    ] == pytest.approx(result.after["mean_acc1"], abs=1e-6)
    benchmark = [f for f in validated.files if f.startswith("checks/v/clip_benchmark/")]
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


@pytest.fixture
def gate(monkeypatch):
    """Hold every job at its ranking step until released (no test waits on timing)."""
    release = threading.Event()
    real = service_module.run_rank

    def gated(*args, **kwargs):
        assert release.wait(RPC_TIMEOUT), "gate never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_rank", gated)
    yield release
    release.set()


def test_twenty_concurrent_requests_finish_or_are_refused(stub, world, server, gate):
    gate.set()
    first = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    baseline = outcome(first, pb.RankHeadsResult).ranking_sha256
    gate.clear()
    barrier = threading.Barrier(20)

    def submit(_):
        barrier.wait(timeout=30)
        try:
            return stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(submit, range(20)))
    accepted = [a for a in answers if isinstance(a, operations_pb2.Operation)]
    refused = [a for a in answers if not isinstance(a, operations_pb2.Operation)]
    assert set(refused) <= {Code.RESOURCE_EXHAUSTED}
    assert len(accepted) == 6 and len(refused) == 14  # 2 running + 4 waiting (max-jobs 2, queue 4)
    gate.set()
    finished = [wait(stub, op) for op in accepted]
    assert all(meta(op).state == Meta.STATE_SUCCEEDED for op in finished)
    assert {outcome(op, pb.RankHeadsResult).ranking_sha256 for op in finished} == {baseline}
    assert len({outcome(op, pb.RankHeadsResult).run_dir for op in finished}) == 6
    known = {
        o.name for o in stub.ListOperations(operations_pb2.ListOperationsRequest(), timeout=RPC_TIMEOUT).operations
    }
    assert {op.name for op in accepted} <= known  # none lost


def _watch_until(stub, op, predicate, timeout=RPC_TIMEOUT) -> pb.Operation:
    for event in stub.WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=timeout):
        if predicate(event) or event.done:
            return event
    raise AssertionError("watch ended early")


def test_cancel_stops_at_the_next_step_and_leaves_nothing(stub, world, monkeypatch):
    import surgeon.images

    real_open = surgeon.images.open_image

    def slow_open(path):
        time.sleep(0.1)
        return real_open(path)

    monkeypatch.setattr(surgeon.images, "open_image", slow_open)
    op = stub.RankHeads(rank_request(out="cancelled", no_cache=True, batch_size=1), timeout=RPC_TIMEOUT)
    seen = _watch_until(stub, op, lambda e: meta(e).stage == "head statistics" and meta(e).message.startswith("3/"))
    assert not seen.done
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT)
    final = wait(stub, op, timeout=30)
    assert meta(final).state == Meta.STATE_CANCELLED and final.error.code == Code.CANCELLED.value[0]
    assert not final.HasField("response")
    assert not (world["exports"] / "cancelled").exists()
    assert not list(world["exports"].glob(".cancelled*"))
    # a finished operation cannot be cancelled
    cancel_again = lambda: stub.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=10)  # noqa: E731
    assert code_of(cancel_again) == Code.FAILED_PRECONDITION


def test_a_cancel_after_publishing_is_refused_and_keeps_the_output(stub, world, monkeypatch):
    """Once the output is renamed into place the job is done: removing it could not bring back what a force
    replaced, so a late cancel is refused (issue 13)."""
    written, release = threading.Event(), threading.Event()
    real = service_module.run_prune

    def prune_then_hold(*args, **kwargs):
        result = real(*args, **kwargs)
        written.set()
        release.wait(RPC_TIMEOUT)
        return result

    monkeypatch.setattr(service_module, "run_prune", prune_then_hold)
    ranked = wait(stub, stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT))
    request = pb.PruneRequest(
        model=pb.ModelRef(model="local-dir:tiny"),
        ranking=outcome(ranked, pb.RankHeadsResult).run_dir,
        policy="heads",
        heads="L1.H0",
        validation=validation(),
        out="half",
    )
    op = stub.Prune(request, timeout=RPC_TIMEOUT)
    assert written.wait(RPC_TIMEOUT) and (world["exports"] / "half" / "plan.json").is_file()
    cancel = lambda: stub.CancelOperation(  # noqa: E731
        operations_pb2.CancelOperationRequest(name=op.name), timeout=RPC_TIMEOUT
    )
    assert code_of(cancel) == Code.FAILED_PRECONDITION
    release.set()
    final = wait(stub, op)
    assert meta(final).state == Meta.STATE_SUCCEEDED
    assert (world["exports"] / "half" / "plan.json").is_file()


def test_cancel_a_waiting_job(stub, gate):
    running = [stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT) for _ in range(2)]
    waiting = stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)
    stub.CancelOperation(operations_pb2.CancelOperationRequest(name=waiting.name), timeout=RPC_TIMEOUT)
    cancelled = stub.GetOperation(operations_pb2.GetOperationRequest(name=waiting.name), timeout=RPC_TIMEOUT)
    assert cancelled.done and meta(cancelled).state == Meta.STATE_CANCELLED
    # its place in the queue (4 here) is free again at once
    more = [stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT) for _ in range(4)]
    assert code_of(lambda: stub.RankHeads(rank_request(), timeout=RPC_TIMEOUT)) == Code.RESOURCE_EXHAUSTED
    gate.set()
    assert all(meta(wait(stub, op)).state == Meta.STATE_SUCCEEDED for op in running + more)


def test_reflection_lists_the_service(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(channel)
    services = database.get_services()
    assert {"surgeon.v1.Surgeon", "google.longrunning.Operations", "grpc.health.v1.Health"} <= set(services)
    assert database.FindFileContainingSymbol("surgeon.v1.Surgeon").name == "surgeon/v1/surgeon.proto"
    operations = database.FindFileContainingSymbol("google.longrunning.Operations")
    assert operations.name == "google/longrunning/operations.proto"  # grpcurl can call it by reflection


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
        _library_ranking(world).write(world["data"] / "ranking")
    (world["exports"] / "existing").mkdir(exist_ok=True)
    before = sorted(p.name for p in world["exports"].iterdir())
    assert code_of(lambda: getattr(stub, rpc)(make(world), timeout=RPC_TIMEOUT)) == code
    assert sorted(p.name for p in world["exports"].iterdir()) == before  # nothing written


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


@pytest.mark.skipif(not (TOY_MODEL_DIR / "open_clip_config.json").is_file(), reason="the toy model is not trained yet")
def test_toy_defaults_need_no_data(stub):
    done = wait(stub, stub.RankHeads(pb.RankHeadsRequest(images=pb.ImageSource(n_images=64)), timeout=RPC_TIMEOUT))
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    ranked = outcome(done, pb.RankHeadsResult)
    assert ranked.model == "toy" and ranked.image_count == 64


def _health(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_and_drain_on_shutdown(world, monkeypatch):
    import surgeon.images

    real_open = surgeon.images.open_image
    monkeypatch.setattr(surgeon.images, "open_image", lambda p: (time.sleep(0.2), real_open(p))[1])
    srv = SurgeonServer(
        port=0, exports_root=world["exports"], models_root=world["models"], data_root=world["data"], max_jobs=1
    ).start()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = pb_grpc.SurgeonStub(ch)
        assert _health(ch) == _health(ch, "surgeon.v1.Surgeon") == health_pb2.HealthCheckResponse.SERVING
        running = stub.RankHeads(rank_request(out="drained", no_cache=True, batch_size=1), timeout=RPC_TIMEOUT)
        waiting = stub.RankHeads(rank_request(out="never"), timeout=RPC_TIMEOUT)
        _watch_until(stub, running, lambda e: meta(e).stage == "head statistics")
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1.0, "cancel_wait": 20})
        stopper.start()
        deadline = time.monotonic() + 10
        while _health(ch) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert code_of(lambda: stub.RankHeads(rank_request(), timeout=10)) == Code.UNAVAILABLE
        stopper.join(60)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError) as info:
            _health(ch)
        assert info.value.code() == Code.UNAVAILABLE
    for op, name in ((running, "drained"), (waiting, "never")):
        job = srv.jobs.get(op.name)
        assert job.state == "CANCELLED" and not (world["exports"] / name).exists()
    assert not list(world["exports"].glob(".drained*"))


def test_token_auth(world, monkeypatch):
    srv = SurgeonServer(port=0, exports_root=world["exports"], models_root=world["models"], token="s3cret").start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.SurgeonStub(ch)
            request = pb.ListPoliciesRequest()
            assert code_of(lambda: stub.ListPolicies(request, timeout=10)) == Code.UNAUTHENTICATED
            wrong = [("authorization", "Bearer nope")]
            assert code_of(lambda: stub.ListPolicies(request, metadata=wrong, timeout=10)) == Code.UNAUTHENTICATED
            watch = lambda: stub.WatchOperation(pb.WatchOperationRequest(name="operations/x"), timeout=10)  # noqa: E731
            assert code_of(watch) == Code.UNAUTHENTICATED
            right = [("authorization", "Bearer s3cret")]
            assert stub.ListPolicies(request, metadata=right, timeout=10).policies
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    finally:
        srv.stop(grace=1)
    from surgeon.errors import InvalidInput
    from surgeon.server.main import serve

    monkeypatch.delenv("SURGEON_TEST_TOKEN", raising=False)
    with pytest.raises(InvalidInput, match="SURGEON_TEST_TOKEN"):
        serve(port=0, exports_root=world["exports"], token_env="SURGEON_TEST_TOKEN")


def test_tls(world, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
        timeout=60,
    )
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-200:]!r}")
    srv = SurgeonServer(port=0, exports_root=world["exports"], tls_cert=cert, tls_key=key).start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", credentials) as ch:
            assert pb_grpc.SurgeonStub(ch).ListPolicies(pb.ListPoliciesRequest(), timeout=10).policies
    finally:
        srv.stop(grace=1)


def test_surgeon_serve_command_drains_on_sigterm(world, tmp_path):
    env = {**os.environ, "SURGEON_CACHE_DIR": str(tmp_path / "cache")}
    args = ["serve", "--port", "0", "--exports-root", str(world["exports"]), "--models-root", str(world["models"])]
    process = subprocess.Popen(
        [sys.executable, "-m", "surgeon", *args, "--max-jobs", "1", "--grace", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert lines and "listening on" in lines[0], process.stderr.read() if process.poll() is not None else lines
        port = int(re.search(r":(\d+) \(", lines[0]).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_nested_outputs_clash_like_equal_ones(tmp_path):
    """A Prune replacing run1 would delete what an Export writes into run1/export-onnx."""
    from surgeon.errors import PreconditionFailed
    from surgeon.server.jobs import JobManager

    jobs = JobManager(max_jobs=1)
    release = threading.Event()
    jobs.submit("Prune", lambda job: release.wait(10), [tmp_path / "run1"])
    try:
        for path in (tmp_path / "run1", tmp_path / "run1" / "export-onnx", tmp_path):
            with pytest.raises(PreconditionFailed, match="another operation"):
                jobs.submit("Export", lambda job: None, [path])
        jobs.submit("Export", lambda job: None, [tmp_path / "run2" / "export-onnx"])  # unrelated: accepted
    finally:
        release.set()
