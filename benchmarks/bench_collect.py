"""Statistics collection vs plain encode_image, side by side in one run, and peak memory vs image count.

    python benchmarks/bench_collect.py [--quick]

Prints ratios (machines are noisy; absolute times mean little). Goals (issue 2): throughput ratio >= 0.8,
peak memory at 4,096 images within 5% of 256 images."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from surgeon.core.stats import HeadStats
from surgeon.model.decompose import decompose
from surgeon.model.hooks import attention, embed_dim, image_size, vision_blocks, vision_tower
from surgeon.model.load import build_clip, default_device

SMALL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 6, "head_width": 16},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
}


def vit_b32() -> dict:
    import open_clip

    return open_clip.get_model_config("ViT-B-32")


def throughput(cfg: dict, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(images/s for encode_image, images/s for statistics collection), interleaved to share the noise."""
    torch.manual_seed(0)
    model = build_clip(cfg).to(device).eval()
    visual, (size, _) = vision_tower(model), image_size(model)
    images = torch.randn(batch, 3, size, size, device=device)
    blocks = vision_blocks(visual)
    layers = tuple(range(len(blocks) - 4, len(blocks)))
    stats = HeadStats.empty(layers, attention(blocks[0]).num_heads, embed_dim(model), device)
    plain, collect = 0.0, 0.0
    with torch.no_grad():
        model.encode_image(images)
        stats.update(decompose(visual, images, layers).heads)
        for _ in range(steps):
            t0 = time.perf_counter()
            model.encode_image(images)
            sync(device)
            t1 = time.perf_counter()
            stats.update(decompose(visual, images, layers).heads)
            sync(device)
            t2 = time.perf_counter()
            plain += t1 - t0
            collect += t2 - t1
    return batch * steps / plain, batch * steps / collect


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_child(n_images: int) -> None:
    """Run in a fresh process: collect statistics over n images, print the peak RSS in KiB."""
    import resource

    torch.manual_seed(0)
    visual = vision_tower(build_clip(SMALL).eval())
    layers = (2, 3, 4, 5)
    stats = HeadStats.empty(layers, 8, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(n_images // 64):
            stats.update(decompose(visual, torch.randn(64, 3, 32, 32, generator=gen), layers).heads)
    print(json.dumps({"n": n_images, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps, skip ViT-B-32")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args.memory_child)
        return
    device = default_device()
    rows = [("toy-size ViT (32px, 6x8 heads)", SMALL, 256, 5 if args.quick else 20)]
    if not args.quick:
        rows.append(("ViT-B-32 random init, 224px", vit_b32(), 32, 4))
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    for name, cfg, batch, steps in rows:
        plain, collect = throughput(cfg, batch, steps, device)
        print(
            f"{name}: encode_image {plain:8.1f} img/s | collect stats {collect:8.1f} img/s | "
            f"ratio {collect / plain:.3f} (goal >= 0.8)"
        )
    peaks = {}
    for n in (256, 4096):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n)], capture_output=True, text=True, check=True
        )
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]
    print(
        f"peak RSS: 256 images {peaks[256] / 1024:.1f} MiB, 4096 images {peaks[4096] / 1024:.1f} MiB, "
        f"ratio {peaks[4096] / peaks[256]:.3f} (goal within 5%)"
    )


if __name__ == "__main__":
    main()
