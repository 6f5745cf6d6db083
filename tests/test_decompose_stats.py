"""The decomposition is exact, statistics merge, and TextSpan from statistics equals the explicit one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgeon.core.errors import InvalidInput
from surgeon.core.stats import HeadStats
from surgeon.model.decompose import decompose, parse_layers
from surgeon.model.load import load_model
from surgeon.ranking.textspan import numerical_rank, textspan


@pytest.fixture(scope="module")
def batch():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_terms_sum_to_normalised_embedding(tiny_model_dir, batch):
    loaded = load_model(f"local-dir:{tiny_model_dir}", device="cpu")
    layers = tuple(range(3))
    parts = decompose(loaded.model.visual, batch, layers, with_rest=True)
    total = parts.heads.sum((1, 2)) + parts.rest["embed"] + parts.rest["mlp"].sum(1)
    expected = loaded.model.encode_image(batch, normalize=True)
    assert parts.heads.shape == (6, 3, 4, 32)
    assert (total - expected).abs().max().item() <= 1e-5
    assert (parts.embedding - expected).abs().max().item() <= 1e-6


def test_head_terms_are_not_trivial(tiny_default_dir, batch):
    """Every head contributes something that differs across images (else TextSpan has nothing to explain)."""
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    heads = decompose(loaded.model.visual, batch, (1, 2)).heads
    assert heads.std(0).sum(-1).min() > 0


def test_stats_of_halves_merge_into_whole(tiny_default_dir, batch):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    heads = decompose(loaded.model.visual, batch, (1, 2)).heads
    whole, first, second = (HeadStats.empty((1, 2), 4, 32) for _ in range(3))
    whole.update(heads)
    first.update(heads[:2])
    second.update(heads[2:])
    merged = first.merge(second)
    assert merged.count == 6
    torch.testing.assert_close(merged.total, whole.total, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.outer, whole.outer, rtol=0, atol=1e-12)
    flat = heads[:, 0, 1].double()
    torch.testing.assert_close(whole.outer[0, 1], flat.T @ flat)
    assert whole.outer.numel() == merged.outer.numel()  # fixed size, whatever the number of images


def test_stats_roundtrip_and_corruption(tmp_path):
    stats = HeadStats.empty((0,), 2, 3)
    stats.update(torch.randn(5, 1, 2, 3))
    stats.save(tmp_path / "s.safetensors", {"k": "v"})
    loaded = HeadStats.load(tmp_path / "s.safetensors")
    assert loaded.count == 5 and torch.equal(loaded.outer, stats.outer)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(Exception, match="corrupt statistics"):
        HeadStats.load(tmp_path / "bad.safetensors")


def reference_textspan(data: np.ndarray, texts: np.ndarray, iters: int, rank: int) -> list[int]:
    """TextSpan on the explicit contribution matrix, written from the paper's description."""
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    texts = (vh.T @ np.linalg.inv(vh @ vh.T) @ vh @ texts.T).T
    data = data - data.mean(0, keepdims=True)
    picks = []
    for _ in range(iters):
        best = int(np.argmax((data @ texts.T).std(0)))
        picks.append(best)
        t = texts[best]
        data = data - np.outer(data @ t / (t @ t), t)
        texts = texts - np.outer(texts @ t / (t @ t), t)
    return picks


@pytest.mark.parametrize("rank", [8, 80])
def test_textspan_from_stats_matches_explicit_matrix(rank):
    rng = np.random.default_rng(3)
    dim, n, n_texts = 24, 300, 60
    mixing = rng.normal(size=(dim, dim)) * np.linspace(3, 0.1, dim)[:, None]
    data = rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)
    texts = rng.normal(size=(n_texts, dim))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    expected = reference_textspan(data, texts, 5, rank)
    stats = HeadStats.empty((0,), 1, dim)
    stats.update(torch.from_numpy(data).view(n, 1, 1, dim))
    got = textspan(stats.count, stats.total[0, 0], stats.outer[0, 0], torch.from_numpy(texts), m=5, span_rank=rank)
    assert list(got.picks) == expected
    assert len(set(got.picks)) == 5 and got.stds[0] >= got.stds[-1] > 0


def test_textspan_with_fewer_images_than_rank_matches_reference():
    """12 images span 12 directions: the basis may not add arbitrary null-space ones."""
    rng = np.random.default_rng(7)
    dim, n = 24, 12
    for trial in range(10):
        data = rng.normal(size=(n, dim))
        texts = rng.normal(size=(40, dim))
        texts /= np.linalg.norm(texts, axis=1, keepdims=True)
        stats = HeadStats.empty((0,), 1, dim)
        stats.update(torch.from_numpy(data).view(n, 1, 1, dim))
        got = textspan(stats.count, stats.total[0, 0], stats.outer[0, 0], torch.from_numpy(texts), m=5, span_rank=80)
        assert list(got.picks) == reference_textspan(data, texts, 5, 80), trial


def test_textspan_on_real_head_matches_reference_at_its_numerical_rank(tiny_default_dir):
    """A head of width 16 writes into ~16 + 3 directions of the 32-dim joint space (the rest is float32
    rounding): the requested rank 80 is clamped, and the published algorithm at that rank picks the same."""
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    heads = decompose(loaded.model.visual, images, (2,)).heads
    texts = loaded.encode_text([f"a photo of thing number {i}" for i in range(40)]).double()
    stats = HeadStats.empty((2,), 4, 32)
    stats.update(heads)
    for h in range(4):
        got = textspan(stats.count, stats.total[0, h], stats.outer[0, h], texts, m=5, span_rank=80)
        data = heads[:, 0, h].double().numpy()
        singular = np.linalg.svd(data, compute_uv=False)
        assert 16 <= got.effective_rank <= 19 and singular[got.effective_rank] < 1e-5 * singular[0]
        assert list(got.picks) == reference_textspan(data, texts.numpy(), 5, got.effective_rank)


def test_numerical_rank_separates_signal_from_rounding():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 64))  # 6 directions of signal in 64 dims
    noisy = signal.astype(np.float32).astype(np.float64)  # what float32 contributions carry
    noisy += rng.normal(size=noisy.shape) * 1e-8 * np.abs(signal).max()
    values = torch.linalg.eigvalsh(torch.from_numpy(noisy.T @ noisy))
    assert numerical_rank(values, count=500) == 6
    assert numerical_rank(values, count=4) == 4  # 4 images span at most 4 directions
    assert numerical_rank(torch.zeros(64, dtype=torch.float64), count=500) == 0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, (8, 9, 10, 11)),
        ("all", tuple(range(12))),
        ("8-11", (8, 9, 10, 11)),
        ("3,5", (3, 5)),
        ("-1", (11,)),
        ("last2", (10, 11)),
    ],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 12) == expected


@pytest.mark.parametrize("spec", ["12", "0-12", "foo", "last0", "last13", ""])
def test_parse_layers_rejects(spec):
    with pytest.raises(InvalidInput):
        parse_layers(spec if spec else ",", 12)


def test_textspan_stops_when_span_is_exhausted():
    """With rank r < m the projected texts vanish after r picks; later 'picks' would be float noise."""
    rng = np.random.default_rng(4)
    stats = HeadStats.empty((0,), 1, 12)
    stats.update(torch.from_numpy(rng.normal(size=(50, 1, 1, 12))))
    texts = torch.from_numpy(rng.normal(size=(30, 12)))
    got = textspan(stats.count, stats.total[0, 0], stats.outer[0, 0], texts, m=5, span_rank=3)
    assert len(got.picks) == 3
