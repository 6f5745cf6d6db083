"""ListModels and ListPolicies: what a client may choose."""

from __future__ import annotations

import pytest

grpc = pytest.importorskip("grpc")

from surgeon.model.load import TOY_MODEL_DIR  # noqa: E402
from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import (  # noqa: E402
    RPC_TIMEOUT,
    Code,
    code_of,
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
    assert names["random"].options == ["k", "seed", "seeds"] and names["high"].options == []
    assert names["top-k"].description == "The k heads with the highest CCS."  # its docstring's first line
    assert all(p.description for p in policies.policies)
    fields = set(pb.PruneRequest.DESCRIPTOR.fields_by_name)  # the registry names request fields: real ones
    assert all(set(p.options) <= fields for p in policies.policies), [p.options for p in policies.policies]
    assert set(policies.modes) == {"zero", "mean", "hard"} and "llm" not in policies.judges
    assert list(policies.export_formats) == ["safetensors", "onnx", "both"]


def test_cached_pretrained_tags_come_from_the_hub_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants
    import open_clip

    from surgeon.model.load import cached_pretrained_tags

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
