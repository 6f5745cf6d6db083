"""What the gRPC tests share: the world a test module's server runs over (tiny real open_clip models under a
models root, small real files under a data root), the client, and request and result helpers. The fixtures
(world, server, channel, stub, gate) are in tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health")
pytest.importorskip("grpc_reflection")

from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from surgeon.core.options import RankMethod  # noqa: E402
from surgeon.inputs.images import folder_images  # noqa: E402
from surgeon.inputs.pools import load_pool  # noqa: E402
from surgeon.model.load import load_model  # noqa: E402
from surgeon.ranking.rank import Ranking, rank_heads  # noqa: E402
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


def png(path: Path, rgb, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_world(base: Path) -> dict:
    """The roots a server is started with, filled with small real files, and a folder outside them that
    some of those files lead to."""
    models, data, exports, outside = (base / n for n in ("models", "data", "exports", "outside"))
    save_local_dir(models / "tiny", tiny_config())
    save_local_dir(models / "other", tiny_config(), seed=1)
    rng = np.random.default_rng(0)
    for i in range(24):
        png(data / "images" / f"img{i:02d}.png", rng.integers(0, 255, 3), i)
    (data / "pool.txt").write_text("\n".join(POOL) + "\n")
    (data / "taxonomy.json").write_text(json.dumps(TAXONOMY))
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = ["path,group"]
    for c, (name, rgb) in enumerate(colours.items()):
        for i in range(4):
            png(data / "val" / name / f"{i}.png", rgb, 100 + 10 * c + i)
            rows.append(f"val/{name}/{i}.png,{'ab'[i % 2]}")
    (data / "bias.csv").write_text("\n".join(rows) + "\n")
    (data / "queries.txt").write_text("a photo\na thing\n")
    (data / "labels.txt").write_text("red\ngreen\nblue\n")
    # things that lead outside the data root
    png(outside / "secret.png", (0, 0, 0), 7)
    (data / "escape").symlink_to(outside, target_is_directory=True)
    png(data / "linked" / "ok.png", (1, 2, 3), 8)
    (data / "linked" / "secret.png").symlink_to(outside / "secret.png")
    (outside / "ranking.json").write_text("{}")
    (data / "ranking-link").mkdir()
    (data / "ranking-link" / "ranking.json").symlink_to(outside / "ranking.json")  # a folder whose file leads out
    (data / "evil.csv").write_text("path,group\nval/red/0.png,a\n../outside/secret.png,b\n")
    (data / "evil_abs.csv").write_text(f"path,group\nval/red/0.png,a\n{outside / 'secret.png'},b\n")
    # a first row without an image suffix, outside the root: the answer must not say whether it exists there
    (data / "first_row_out_exists.csv").write_text("../outside/ranking.json,a\nval/red/0.png,a\nval/red/1.png,b\n")
    (data / "first_row_out_missing.csv").write_text("../outside/nothing,a\nval/red/0.png,a\nval/red/1.png,b\n")
    exports.mkdir()
    return {"models": models, "data": data, "exports": exports, "outside": outside}


class Client:
    """What a pipeline holds: the Surgeon stub and googleapis-common-protos' google.longrunning stub."""

    def __init__(self, channel):
        self.surgeon = pb_grpc.SurgeonStub(channel)
        self.operations = operations_pb2_grpc.OperationsStub(channel)

    def __getattr__(self, rpc: str):
        return getattr(self.surgeon if hasattr(self.surgeon, rpc) else self.operations, rpc)


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


def watch_until(stub, op, predicate, timeout=RPC_TIMEOUT) -> pb.Operation:
    for event in stub.WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=timeout):
        if predicate(event) or event.done:
            return event
    raise AssertionError("watch ended early")


def library_ranking(world) -> Ranking:
    loaded = load_model(f"local-dir:{world['models'] / 'tiny'}", device="cpu")
    pool = load_pool(str(world["data"] / "pool.txt"), False, str(world["data"] / "taxonomy.json"))
    return rank_heads(loaded, folder_images(world["data"] / "images"), pool, RankMethod(layers="1-2", m=3), quiet=True)


def health_status(channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
