"""Real checkpoints at real scale: cached text embeddings, per-batch progress, explicit data, presets
without ranking, TorchScript archives, the cache command."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from surgeon import collect, textspan
from surgeon.images import folder_images
from surgeon.load import load_model
from surgeon.pools import TextPool
from surgeon.textcache import pool_embeddings, text_cache_path, text_key

POOL = TextPool("t", ("a red dog", "a blue cat", "three birds", "Paris at night", "a green car"), {"concepts": {}})


@pytest.fixture
def tiny(tiny_default_dir):
    return load_model(f"local-dir:{tiny_default_dir}", device="cpu")


def test_text_embeddings_are_cached_and_equal_a_plain_encode(tiny):
    first, cached = pool_embeddings(tiny, POOL, batch_size=2, quiet=True)
    assert not cached and text_cache_path(text_key(tiny, POOL)).is_file()
    with torch.no_grad():
        plain = tiny.model.encode_text(tiny.tokenizer(list(POOL.lines)), normalize=True)
    assert torch.allclose(first, plain, atol=1e-6)
    again, cached = pool_embeddings(tiny, POOL, quiet=True)
    assert cached and torch.equal(again, first)
    _, cached = pool_embeddings(tiny, POOL, quiet=True, use_cache=False)
    assert not cached


def test_text_key_follows_the_text_tower_and_the_pool_only(tiny):
    key = text_key(tiny, POOL)
    with torch.no_grad():
        tiny.model.visual.proj.add_(1.0)  # the image tower does not change a text embedding
    assert text_key(tiny, POOL) == key
    assert text_key(tiny, TextPool("t", POOL.lines[:-1], {})) != key
    tiny.tokenizer.context_length = 8  # another tokenizer setting: other tokens
    assert text_key(tiny, POOL) != key
    tiny.tokenizer.context_length = 16
    assert text_key(tiny, POOL) == key
    with torch.no_grad():
        tiny.model.token_embedding.weight[0, 0] += 1.0
    assert text_key(tiny, POOL) != key
    tiny.model_cfg = {**tiny.model_cfg, "quick_gelu": True}  # same weights, another activation
    assert text_key(tiny, POOL) != key


def test_a_corrupt_text_cache_entry_is_re_encoded(tiny):
    path = text_cache_path(text_key(tiny, POOL))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    embeddings, cached = pool_embeddings(tiny, POOL, quiet=True)
    assert not cached and embeddings.shape[0] == len(POOL.lines)
    assert pool_embeddings(tiny, POOL, quiet=True)[1]


def recording_bar(calls: dict):
    @contextmanager
    def bar(description, total, quiet=False):
        calls[description] = {"total": total, "steps": []}
        yield calls[description]["steps"].append

    return bar


def test_bars_advance_per_batch(tiny, image_folder, monkeypatch):
    calls: dict = {}
    monkeypatch.setattr(collect, "progress_bar", recording_bar(calls))
    monkeypatch.setattr(textspan, "progress_bar", recording_bar(calls))
    import surgeon.textcache as textcache

    monkeypatch.setattr(textcache, "progress_bar", recording_bar(calls))
    images = folder_images(image_folder)  # 24 images
    # one checkpoint chunk of 3 batches of 5: the bar still moves once per batch
    stats = collect.accumulate(tiny, images, (1, 2), batch_size=5, on_chunk=lambda *_: None, chunk_batches=3)
    steps = [s for s in calls["head statistics"]["steps"] if s]
    assert steps == [5, 5, 5, 5, 4] and calls["head statistics"]["total"] == 24
    pool_embeddings(tiny, POOL, batch_size=2, quiet=True)
    assert calls["text encoding"]["steps"] == [2, 2, 1]
    textspan.textspan_all(stats, torch.randn(5, tiny.embed_dim).double(), m=2, rank=4)
    assert calls["TextSpan"] == {"total": 8, "steps": [1] * 8}
