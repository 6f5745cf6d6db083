"""Text embeddings of a TextSpan pool, cached on disk.

Encoding the 3,272-line general pool took 4-8 minutes of every ViT-B-32 `rank` on a CPU, more than the image
statistics, and was redone by every `rank`, `prune` and `sweep`. The embeddings depend only on the text tower
(its weights, the model config and the tokenizer) and the pool's lines, so they are cached under a key of
exactly those: a new image set, judge or layer choice reuses them. Under torchrun every rank encodes a
share of the pool and one all-gather hands rank 0 the whole (torchrun sets OMP_NUM_THREADS=1, so rank 0
alone on one thread was the slowest part of a distributed run).

Encoding is written as it goes (`partial/text-<key>-rank<r>of<n>.safetensors`, rewritten atomically after
each chunk of batches): an interrupted encoding (more than 20 minutes of the general pool on ViT-L-14 on a
CPU) resumes at the first line not encoded, with the same batch boundaries, so the result is identical."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from surgeon.core.cache import touch
from surgeon.core.distributed import World, agree, shard, world
from surgeon.core.paths import atomic_file, cache_dir
from surgeon.core.progress import progress_bar
from surgeon.inputs.pools import TextPool
from surgeon.model.load import LoadedModel, weights_hash

TEXT_FORMAT = "surgeon.text-embeddings/1"
PARTIAL_FORMAT = "surgeon.text-embeddings-partial/1"
MAX_PARTIAL_WRITES = 32  # chunks per encoding: each write rewrites what is done, so at most ~16x the final size


def is_text_weight(name: str) -> bool:
    """State-dict entries the text embeddings depend on: everything but the image tower and the logit scale."""
    return not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")


def tokenizer_identity(tokenizer) -> dict:
    """What decides the tokens: the tokenizer class, its context length, and an HF tokenizer's name."""
    inner = getattr(tokenizer, "tokenizer", None)
    return {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "context_length": getattr(tokenizer, "context_length", None),
        "name": getattr(inner, "name_or_path", None),
    }


def text_key(loaded: LoadedModel, pool: TextPool) -> str:
    """Cache key: text-tower weights + model config (minus the image tower's) + tokenizer + the pool's lines."""
    import open_clip

    payload = {
        "v": 1,
        "text_weights": weights_hash(loaded.model, is_text_weight),
        "config": {k: v for k, v in loaded.model_cfg.items() if k != "vision_cfg"},
        "tokenizer": tokenizer_identity(loaded.tokenizer),
        "open_clip": open_clip.__version__,  # its tokenizers' cleaning rules are part of the tokens
        "pool": pool.digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def text_cache_path(key: str) -> Path:
    return cache_dir() / "text" / f"{key}.safetensors"


def _load(path: Path) -> tuple[dict[str, str], torch.Tensor] | None:
    """(metadata, embeddings) of a cache file, or None when it is unreadable: the cache never fails a run."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return meta, load_file(str(path))["embeddings"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _read(path: Path, size: int) -> torch.Tensor | None:
    """The cached embeddings, or None when the entry is unreadable or not for a pool of this size."""
    loaded = _load(path)
    if loaded is None or loaded[0].get("format") != TEXT_FORMAT or loaded[1].shape[0] != size:
        return None
    return loaded[1]


def _save(path: Path, embeddings: torch.Tensor, meta: dict) -> None:
    """Atomic: a crash or a concurrent writer never leaves half an entry."""
    try:
        with atomic_file(path, suffix=".safetensors") as tmp:
            save_file({"embeddings": embeddings.cpu().contiguous()}, str(tmp), metadata=meta)
    except OSError as err:  # the cache is an optimisation: the ranking still stands
        warnings.warn(f"could not cache the text embeddings in {path.parent}: {err}", stacklevel=3)


def _partial_path(key: str, w: World) -> Path:
    return cache_dir() / "partial" / f"text-{key}-rank{w.rank}of{w.size}.safetensors"


def _read_partial(path: Path, share: tuple[int, int], batch_size: int) -> torch.Tensor | None:
    """The lines of this share already encoded by an interrupted run (a whole number of batches, encoded with
    this batch size), or None when there is no usable partial entry."""
    loaded = _load(path) if path.is_file() else None
    if loaded is None:
        return None
    meta, done = loaded
    wanted = {"format": PARTIAL_FORMAT, "share": f"{share[0]}:{share[1]}", "batch_size": str(batch_size)}
    rows = done.shape[0]
    if any(meta.get(k) != v for k, v in wanted.items()) or rows > share[1] - share[0] or rows % batch_size:
        return None
    return done


def _encode_share(
    loaded: LoadedModel, lines: list[str], w: World, batch_size: int, quiet: bool, partial: Path | None
) -> torch.Tensor:
    """This rank's contiguous share of the pool, encoded in batches with a bar (rank 0's bar shows its share);
    with `partial`, each chunk of batches is saved there and a rerun resumes after the last saved one."""
    start, stop = shard(len(lines), w, batch_size)
    done = _read_partial(partial, (start, stop), batch_size) if partial is not None else None
    parts = [done] if done is not None else []
    first = start + (done.shape[0] if done is not None else 0)
    n_batches = -(-(stop - start) // batch_size)
    chunk = batch_size * max(1, -(-n_batches // MAX_PARTIAL_WRITES))
    label = "text encoding"
    if first > start:
        label += f" (resumed: {first - start:,} of {stop - start:,} lines were encoded)"
    with progress_bar(label, stop - first, quiet or not w.is_main) as advance:
        for i in range(first, stop, chunk):
            parts.append(loaded.encode_text(lines[i : min(i + chunk, stop)], batch_size=batch_size, advance=advance))
            if partial is not None and i + chunk < stop:
                meta = {"format": PARTIAL_FORMAT, "share": f"{start}:{stop}", "batch_size": str(batch_size)}
                _save(partial, torch.cat([p.to(loaded.device) for p in parts]), meta)
    if not parts:
        return torch.zeros(0, loaded.embed_dim, device=loaded.device)
    return torch.cat([p.to(loaded.device) for p in parts])


def _gather(share: torch.Tensor, w: World) -> torch.Tensor:
    """Every rank's share, in rank order (shares differ in length by at most a batch: padded for the gather)."""
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.int64, device=share.device) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([share.shape[0]], dtype=torch.int64, device=share.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, share.shape[1], dtype=share.dtype, device=share.device)
    padded[: share.shape[0]] = share
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def pool_embeddings(
    loaded: LoadedModel, pool: TextPool, batch_size: int = 256, quiet: bool = False, use_cache: bool = True
) -> tuple[torch.Tensor, bool]:
    """(L2-normalised float32 embeddings of every pool line on the model's device, whether they came from the
    cache). Collective under torchrun: every rank calls it and gets the whole."""
    w = world()
    path = text_cache_path(text_key(loaded, pool)) if use_cache else None
    cached = _read(path, len(pool.lines)) if path is not None and path.is_file() else None
    if agree(cached is not None, w) and path is not None and cached is not None:  # agreed: every rank has it
        touch(path)  # for `surgeon cache evict` (least recently used first)
        return cached.to(loaded.device), True
    lines = list(pool.lines)
    partial = _partial_path(path.stem, w) if path is not None else None
    embeddings = _encode_share(loaded, lines, w, batch_size, quiet, partial)
    if w.active:
        embeddings = _gather(embeddings, w)
    if path is not None and w.is_main:
        meta = {"format": TEXT_FORMAT, "pool": pool.name, "lines": str(len(lines)), "model": loaded.identity}
        _save(path, embeddings, meta)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return embeddings, False
