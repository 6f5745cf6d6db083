"""The text-embedding cache written as it goes: an interrupted encoding resumes where it stopped."""

from __future__ import annotations

import pytest
import torch

from surgeon.inputs.pools import TextPool
from surgeon.inputs.textcache import pool_embeddings, text_cache_path, text_key
from surgeon.model.load import load_model

POOL = TextPool("t", tuple(f"a photo of thing number {i}" for i in range(40)), {"concepts": {}})


@pytest.fixture
def tiny(tiny_default_dir):
    return load_model(f"local-dir:{tiny_default_dir}", device="cpu")


def counting(loaded, calls: list[int], stop_after: int | None = None):
    """Wrap loaded.encode_text: record how many lines each call encodes; raise KeyboardInterrupt (Ctrl-C)
    on call number `stop_after` + 1."""
    encode = type(loaded).encode_text.__get__(loaded)  # the unwrapped method

    def wrapped(texts, batch_size=256, advance=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(len(texts))
        return encode(texts, batch_size=batch_size, advance=advance)

    loaded.encode_text = wrapped


def test_an_interrupted_encoding_resumes_with_the_remainder_only_and_the_same_result(tiny, tmp_path, monkeypatch):
    """Before: the embeddings were written once, at the end: Ctrl-C at 2,304 of 3,272 lines lost them all."""
    reference, _ = pool_embeddings(tiny, POOL, batch_size=4, quiet=True, use_cache=False)
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "fresh"))
    first: list[int] = []
    counting(tiny, first, stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        pool_embeddings(tiny, POOL, batch_size=4, quiet=True)
    assert sum(first) == 12 and not text_cache_path(text_key(tiny, POOL)).is_file()
    resumed: list[int] = []
    counting(tiny, resumed)
    embeddings, cached = pool_embeddings(tiny, POOL, batch_size=4, quiet=True)
    assert sum(resumed) == len(POOL.lines) - 12 and not cached
    assert torch.equal(embeddings, reference)
    assert not list((tmp_path / "fresh" / "partial").iterdir())  # the partial entry is gone once whole
    assert pool_embeddings(tiny, POOL, batch_size=4, quiet=True)[1]


def test_a_partial_entry_from_another_batch_size_is_not_resumed(tiny):
    calls: list[int] = []
    counting(tiny, calls, stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        pool_embeddings(tiny, POOL, batch_size=4, quiet=True)
    again: list[int] = []
    counting(tiny, again)
    pool_embeddings(tiny, POOL, batch_size=5, quiet=True)  # other batch boundaries: start over
    assert sum(again) == len(POOL.lines)


def test_the_bar_estimates_over_steps_slower_than_richs_default_window(monkeypatch):
    """rich estimates speed from the last 30 s of steps by default: a bar whose steps take longer (a text batch
    of ViT-L-14 on a CPU) never showed an ETA."""
    from rich.progress import Progress

    from surgeon.core import progress

    clock, bars = [0.0], []

    class Recorded(Progress):
        def __init__(self, *columns, **options):
            super().__init__(*columns, **options, get_time=lambda: clock[0])
            bars.append(self)

    monkeypatch.setattr(progress, "Progress", Recorded)
    monkeypatch.setattr(progress, "progress_enabled", lambda quiet: True)
    with progress.progress_bar("text encoding", 10) as advance:
        for _ in range(3):
            clock[0] += 90.0  # one batch: 90 s
            advance(1)
        assert bars[0].tasks[0].time_remaining == pytest.approx(7 * 90.0)
