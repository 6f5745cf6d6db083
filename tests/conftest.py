"""Shared fixtures: tiny real open_clip models (both block types) saved as local-dir folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from surgeon.load import build_clip


def tiny_config(block_type: str = "default", layers: int = 3, heads: int = 4, image_size: int = 32) -> dict:
    vision = {
        "image_size": image_size,
        "patch_size": 8,
        "width": 16 * heads,
        "layers": layers,
        "head_width": 16,
        "mlp_ratio": 2.0,
    }
    if block_type == "custom":
        vision.update(block_type="custom", ls_init_value=0.5, qk_norm=True)
    return {
        "embed_dim": 32,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    }


def tiny_toy_model_cfg() -> dict:
    """The smallest toy CLIP (32 px, one block per tower) for training and zero-shot tests."""
    from surgeon.toy.train import toy_model_cfg

    return toy_model_cfg(
        image_size=32,
        patch_size=16,
        width=32,
        layers=1,
        head_width=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
    )


def save_local_dir(folder: Path, config: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_clip(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Caches and exports of a test never leak into the user's home or the repo."""
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SURGEON_EXPORTS_DIR", str(tmp_path / "exports"))
    # the deprecated TorchScript exporter is ~10x faster on tiny models; tests/test_deploy.py covers dynamo
    monkeypatch.setenv("SURGEON_ONNX_EXPORTER", "torchscript")


@pytest.fixture(scope="session", params=["default", "custom"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return save_local_dir(tmp_path_factory.mktemp(f"tiny-{request.param}"), tiny_config(request.param))


@pytest.fixture(scope="session")
def tiny_default_dir(tmp_path_factory) -> Path:
    return save_local_dir(tmp_path_factory.mktemp("tiny"), tiny_config("default"))


@pytest.fixture(scope="session")
def vit_file(tmp_path_factory) -> Path:
    """A real open_clip architecture (ViT-S-32, random init, 252 MB) saved as a bare .safetensors checkpoint:
    a file that cannot say its activation, loaded as `--model ViT-S-32 --pretrained FILE`."""
    import warnings

    from surgeon.load import load_model

    path = tmp_path_factory.mktemp("ckpt") / "vit-s-32.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using a random initialisation": that is the point
        model = load_model("ViT-S-32", device="cpu").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def pool_file(tmp_path) -> Path:
    lines = [
        "a red circle",
        "a blue square",
        "",
        "a green thing",
        "a dog in a park",
        "a cat on a sofa",
        "the city of Paris",
        "a street in Tokyo",
        "three apples",
        "five birds",
        "a yellow wall",
    ]
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- gRPC: one server per test module, over that module's own world (tests/grpc_helpers.py) ----
# The imports are inside the fixtures: only the gRPC test modules, which skip without grpc, use them.


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from tests.grpc_helpers import make_world

    return make_world(tmp_path_factory.mktemp("grpc").resolve())


@pytest.fixture(scope="module")
def server(world):
    from surgeon.server.main import SurgeonServer

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
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    from tests.grpc_helpers import Client

    return Client(channel)


@pytest.fixture
def gate(monkeypatch):
    """Hold every job at its ranking step until released (no test waits on timing)."""
    import threading

    import surgeon.server.service as service_module
    from tests.grpc_helpers import RPC_TIMEOUT

    release = threading.Event()
    real = service_module.run_rank

    def gated(*args, **kwargs):
        assert release.wait(RPC_TIMEOUT), "gate never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "run_rank", gated)
    yield release
    release.set()
