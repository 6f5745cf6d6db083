"""The MLP activation a checkpoint file runs with: chosen with --activation, assumed out loud otherwise, and
recorded (ranking.json, plan.json, the card). OpenAI's weights under GELU give wrong numbers everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgeon.core.errors import InvalidInput
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    return folder


def test_the_gelu_assumption_reaches_the_screen_and_quickgelu_can_be_named(vit_file, two_classes):
    """Before: cli.py's filter (`.*QuickGELU.*`) swallowed load.py's warning, so the assumption was silent."""
    common = ["validate", "--model", "ViT-S-32", "--pretrained", str(vit_file), "--data", str(two_classes), "-q"]
    assumed = run_cli(*common)
    assert assumed.returncode == 0, assumed.stderr
    assert "GELU assumed" in assumed.stderr and "--activation quickgelu" in assumed.stderr
    named = run_cli(*common, "--activation", "quickgelu")
    assert named.returncode == 0, named.stderr
    assert "GELU assumed" not in named.stderr
    refused = run_cli(*common, "--activation", "relu")
    assert refused.returncode == 2 and "unknown activation 'relu'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_activation_and_how_it_was_decided_are_recorded(vit_file):
    from open_clip.model import QuickGELU

    from surgeon.model.load import load_model

    with pytest.warns(UserWarning, match="GELU assumed"):
        assumed = load_model("ViT-S-32", str(vit_file), device="cpu")
    assert assumed.record()["activation"] == "GELU"
    assert assumed.record()["activation_source"].startswith("assumed")
    named = load_model("ViT-S-32", str(vit_file), device="cpu", activation="quickgelu")
    assert isinstance(named.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert named.record()["activation_source"] == "given with --activation"
    assert named.forward_identity != assumed.forward_identity  # caches and rankings never mix the two
    with pytest.raises(InvalidInput, match="unknown activation"):
        load_model("ViT-S-32", str(vit_file), device="cpu", activation="swish")


def test_a_study_names_the_activation_per_model(tmp_path):
    from surgeon.studies.study import parse_study

    study = tmp_path / "s.toml"
    body = '[[policies]]\npolicy = "top-k"\nk = 1\n[[data]]\nname = "shape"\npath = "toy:shape"\n'
    study.write_text('[[models]]\nname = "ViT-B-32"\nactivation = "quickgelu"\n' + body)
    assert parse_study(study).models[0].activation == "quickgelu"
    study.write_text('[[models]]\nname = "ViT-B-32"\nactivation = "relu"\n' + body)
    with pytest.raises(InvalidInput, match=r"models\[0\]\.activation: unknown activation"):
        parse_study(study)


def test_a_grpc_request_names_the_activation(tmp_path):
    from surgeon.server.paths import Root
    from surgeon.server.specs import ServerConfig, SpecBuilder
    from surgeon.v1 import surgeon_pb2 as pb

    roots = {name: Root.create(name, tmp_path / name, make=True) for name in ("exports", "models", "data")}
    builder = SpecBuilder(ServerConfig(**roots))
    request = pb.RankHeadsRequest(model=pb.ModelRef(model="ViT-B-32", activation="quickgelu"))
    spec, _ = builder.rank_spec(request)
    assert spec.model.activation == "quickgelu"
    with pytest.raises(InvalidInput, match="unknown activation"):
        builder.rank_spec(pb.RankHeadsRequest(model=pb.ModelRef(model="ViT-B-32", activation="relu")))
