"""The last vision block at the CLS token only (surgeon.model.cls_token) vs run whole, side by side (issue 24).

    python benchmarks/bench_last_block.py                  # random-init ViT-B-32, 224 px, 128 images

Prints CPU seconds of the last block on the cached streams of 128 images, whole vs at the CLS token, and of
the debias search's unit of work: an Evaluator pass (deep layer cache) of one single-head ablation from each
of the last 4 layers (4, 3, 2, 1 blocks re-run), the last block whole vs at the CLS token, with the largest
difference between the two ways' normalised embeddings."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from surgeon.model.cls_token import block_at_cls
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import vision_blocks, vision_tower
from surgeon.validation import validate as validate_module
from surgeon.validation.validate import Evaluator, ValidationSuite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_debias import synthetic_suite, vit_b_32  # noqa: E402  (one definition of the bench model)


def cpu_seconds(run, repeats: int) -> tuple[float, object]:
    start = time.process_time()
    for _ in range(repeats):
        outcome = run()
    return (time.process_time() - start) / repeats, outcome


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=64, help="bias units (2 images each)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = vit_b_32()
    bias = synthetic_suite(1, args.units).bias
    assert bias is not None
    evaluator = Evaluator(loaded, ValidationSuite([], bias, "files", "synthetic"), first_layer=8, deep=True)
    last = vision_blocks(vision_tower(loaded.model))[-1]
    streams = evaluator._prefixes[evaluator._set_key[bias.name]][(frozenset(), 11)]
    with torch.no_grad():
        whole, _ = cpu_seconds(lambda: last(streams)[:, :1], args.repeats)
        cls, _ = cpu_seconds(lambda: block_at_cls(last, streams), args.repeats)
    print(f"last block, {len(streams)} images: whole {whole:.3f} s CPU, CLS only {cls:.3f} s ({cls / whole:.3f})")

    singles = [HeadRef(layer, 0) for layer in range(8, 12)]

    def passes() -> list[torch.Tensor]:
        return [evaluator.embeddings(bias.name, [head]) for head in singles]

    fast, fast_out = cpu_seconds(passes, args.repeats)
    validate_module.block_at_cls = lambda block, x: block(x)  # the whole block
    slow, slow_out = cpu_seconds(passes, args.repeats)
    validate_module.block_at_cls = block_at_cls
    gap = max((a - b).abs().max().item() for a, b in zip(fast_out, slow_out, strict=True))
    print(
        f"4 single-head passes (layers 8-11): last block whole {slow:.2f} s CPU, CLS only {fast:.2f} s "
        f"({fast / slow:.3f}); max abs embedding difference {gap:.2e}"
    )


if __name__ == "__main__":
    main()
