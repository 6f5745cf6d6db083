"""The ranking is a function of the model and the data alone: batch size, image order and the forward-pass
configuration's bookkeeping must not change TextSpan's picks or the CCS. The hazard: a projection basis wider
than the head's numerical rank holds float-rounding directions, and picks 2..m would follow them."""

from __future__ import annotations

import numpy as np
import pytest

from surgeon.core.options import RankMethod
from surgeon.inputs.images import ImageSet, toy_images
from surgeon.inputs.pools import load_pool
from surgeon.model.load import load_model
from surgeon.ranking.rank import rank_heads
from tests.conftest import save_local_dir, tiny_config


def permuted(images: ImageSet, seed: int) -> ImageSet:
    order = np.random.default_rng(seed).permutation(images.count)
    return ImageSet(f"{images.identity}:perm{seed}", images.description, images.count, lambda i: images.load(order[i]))


def picks(loaded, images: ImageSet, batch_size: int) -> list[tuple[str, list[str], int, int]]:
    ranking = rank_heads(
        loaded, images, load_pool("toy", True), RankMethod(batch_size=batch_size, use_cache=False), quiet=True
    )
    return [(h.name, h.texts, h.ccs, h.effective_rank) for h in ranking.heads]


def assert_invariant(loaded, images: ImageSet, max_rank: int) -> None:
    reference = picks(loaded, images, 64)
    assert all(rank <= max_rank for *_, rank in reference)
    for batch_size in (16, 50):
        assert picks(loaded, images, batch_size) == reference, f"batch size {batch_size}"
    assert picks(loaded, permuted(images, 1), 64) == reference, "permuted image order"


def test_bundled_model_ranking_ignores_batch_size_and_image_order():
    loaded = load_model(None, device="cpu")
    assert_invariant(loaded, toy_images(400), max_rank=16 + 3)  # head width 16 in a 128-dim joint space


@pytest.mark.slow
def test_random_init_head_width_64_ranking_ignores_batch_size_and_image_order(tmp_path):
    """A ViT-B-like head (width 64) in a 160-dim joint space: rank 80 would keep ~15 rounding directions."""
    config = tiny_config(layers=2, heads=2, image_size=32)
    config["vision_cfg"].update(width=128, head_width=64)
    config["embed_dim"] = 160
    loaded = load_model(f"local-dir:{save_local_dir(tmp_path / 'vit64', config, seed=3)}", device="cpu")
    assert_invariant(loaded, toy_images(300), max_rank=64 + 3)


def test_gelu_and_quickgelu_of_the_same_weights_never_share_statistics_or_rankings(tmp_path):
    from surgeon.core.errors import PreconditionFailed
    from surgeon.ranking.collect import stats_key

    config = tiny_config()
    gelu_dir = save_local_dir(tmp_path / "gelu", config)
    quick_dir = save_local_dir(tmp_path / "quick", {**config, "quick_gelu": True})
    (quick_dir / "open_clip_model.safetensors").write_bytes((gelu_dir / "open_clip_model.safetensors").read_bytes())
    gelu, quick = (load_model(f"local-dir:{d}", device="cpu") for d in (gelu_dir, quick_dir))
    assert gelu.weights_hash == quick.weights_hash  # the same tensors ...
    images = toy_images(40)
    assert stats_key(gelu, images, (1, 2)) != stats_key(quick, images, (1, 2))  # ... computing different things
    ranking = rank_heads(gelu, images, load_pool("toy", True), RankMethod(layers="1-2"), quiet=True)
    ranking.check_model(gelu)
    with pytest.raises(PreconditionFailed, match="another architecture config"):
        ranking.check_model(quick)
    assert ranking.model["activation"] == "GELU"
