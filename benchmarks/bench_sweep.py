"""Sweep with the layer cache vs naive full recomputation, side by side (issue 4).

    python benchmarks/bench_sweep.py

A 12-layer ViT (random init, small images so it runs on 2 CPU cores), >= 8 pruning configurations in the
last 4 layers, evaluated on the same suite both ways: prints the speed-up (goal >= 2.5x) and checks that
every number is identical."""

from __future__ import annotations

import time

import numpy as np
import torch

from surgeon.model.heads import HeadRef
from surgeon.model.load import LoadedModel, build_clip, weights_hash
from surgeon.validation.validate import BiasSet, ClassificationSet, Evaluator, ValidationSuite

CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 12, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 128, "heads": 4, "layers": 2},
}


def main() -> None:
    import open_clip

    torch.manual_seed(0)
    model = build_clip(CFG).eval()
    pcfg = {
        "size": (64, 64),
        "mean": (0.5,) * 3,
        "std": (0.25,) * 3,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    loaded = LoadedModel(
        model,
        None,
        open_clip.get_tokenizer("ViT-B-32", context_length=16),
        "bench-vit-12",
        None,
        pcfg,
        CFG,
        torch.device("cpu"),
    )
    loaded.weights_hash = weights_hash(model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (512, 64, 64, 3), dtype=np.uint8)
    suite = ValidationSuite(
        [
            ClassificationSet(
                "bench/classes",
                ["red", "blue", "dog", "cat"],
                ["a {}", "a photo of a {}"],
                images,
                rng.integers(0, 4, 512),
            )
        ],
        BiasSet("bench/bias", images[:256], np.arange(256) % 2, ["a", "b"], {"star": ["a star"]}),
    )
    heads = [HeadRef(layer, head) for layer in range(8, 12) for head in range(8)]
    configs = [heads[: 4 * i] for i in range(9)]  # 0, 4, ..., 32 heads: 9 configurations
    timings, results = {}, {}
    for name, first_layer in (("naive (all 12 layers)", 0), ("layer cache (last 4 re-run)", 8)):
        start = time.perf_counter()
        evaluator = Evaluator(loaded, suite, first_layer=first_layer)
        results[name] = [evaluator.evaluate(c)["summary"] for c in configs]
        timings[name] = time.perf_counter() - start
    naive, cached = timings.values()
    same = list(results.values())[0] == list(results.values())[1]
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s for {len(configs)} configurations (incl. caching the prefix)")
    print(f"speed-up {naive / cached:.2f}x (goal >= 2.5x); identical numbers: {same}")
    for config, summary in zip(configs, list(results.values())[1], strict=True):
        print(
            f"  {len(config):2d} heads pruned: mean acc1 {summary['mean_acc1']:.4f}, "
            f"MaxSkew@10 {summary['max_skew@10']:.4f}"
        )


if __name__ == "__main__":
    main()
