"""Statistics collection with 1 vs 2 CPU processes (gloo), and the all-reduce's share of the time (issue 7).

    python benchmarks/bench_distributed.py [--images 512]

Each process takes a batch-aligned shard (surgeon.core.distributed.shard), accumulates with the library's
`accumulate`, then one all-reduce merges; timings are taken inside the workers."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from surgeon.core.distributed import World, all_reduce, shard
from surgeon.inputs.images import ImageSet
from surgeon.model.load import LoadedModel, build_clip, weights_hash
from surgeon.ranking.collect import accumulate

CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
}


def make_loaded() -> LoadedModel:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.manual_seed(0)
    model = build_clip(CFG).eval()
    pcfg = {"size": (64, 64), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    preprocess = image_transform_v2(PreprocessCfg(**pcfg), is_train=False)
    loaded = LoadedModel(model, preprocess, None, "bench", None, pcfg, CFG, torch.device("cpu"))
    loaded.weights_hash = weights_hash(model)
    return loaded


def image_set(n: int) -> ImageSet:
    arrays = np.random.default_rng(0).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)
    return ImageSet("bench", "synthetic", n, lambda i: Image.fromarray(arrays[i]))


def worker(rank: int, size: int, n: int, port: int, threads: int, out: dict) -> None:
    torch.set_num_threads(threads)
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size)
    w = World(rank, size)
    loaded, images = make_loaded(), image_set(n)
    start, stop = shard(n, w, 32)
    t0 = time.perf_counter()
    stats = accumulate(loaded, images, (4, 5, 6, 7), 32, True, start, stop)
    t1 = time.perf_counter()
    stats = all_reduce(stats, w)
    t2 = time.perf_counter()
    out[rank] = {"collect": t1 - t0, "reduce": t2 - t1, "count": stats.count}
    if size > 1:
        dist.destroy_process_group()


def run(size: int, n: int, threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    start = time.perf_counter()
    mp.spawn(worker, args=(size, n, port, threads, out), nprocs=size, join=True)
    return {"wall": time.perf_counter() - start, "ranks": dict(out)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    single = run(1, args.images, cores)
    double = run(2, args.images, max(1, cores // 2))
    t1 = max(r["collect"] + r["reduce"] for r in single["ranks"].values())
    t2 = max(r["collect"] + r["reduce"] for r in double["ranks"].values())
    reduce_share = max(r["reduce"] for r in double["ranks"].values()) / t2
    print(
        json.dumps({"images": args.images, "cores": cores, "1 process s": round(t1, 2), "2 processes s": round(t2, 2)})
    )
    print(f"throughput 2 processes / 1 process: {t1 / t2:.2f}x (same {cores} cores, threads split between processes)")
    print(f"all-reduce share of the 2-process time: {reduce_share:.2%}")
    assert all(r["count"] == args.images for r in double["ranks"].values())


if __name__ == "__main__":
    main()
