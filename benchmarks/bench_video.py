"""Video frame collection (decode, sample, crop, embed, pool) vs plain encode_image on the same frames, and peak
memory vs the number of videos.

    python benchmarks/bench_video.py [--quick]

Three rates in frames embedded per second, measured in one run: `encode_image` alone on the already decoded,
cropped frames; a first validation of the video set (PyAV decoding every frame of every video, the sampled ones
cropped into the frame cache, then embedded); a second validation (frames read back from the cache). Goal
(issue 26): collection >= 0.8 x encode_image; peak memory flat in the number of videos."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from surgeon.inputs.video import VideoFrames, write_video
from surgeon.model.load import build_clip, load_model
from surgeon.results.retrieval import RetrievalSet
from surgeon.validation.validate import ValidationSuite, validate
from surgeon.validation.zeroshot import uint8_to_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_collect import SMALL, vit_b32  # noqa: E402  (one definition of the benchmark models)


def model_dir(cfg: dict, folder: Path) -> str:
    """A local-dir model (random init) surgeon loads like any other."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    model = build_clip(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def write_videos(folder: Path, n: int, frames: int, width: int, height: int) -> list[Path]:
    """n videos of moving gradients (MPEG-4, 30 fps), as a camera clip would decode: every frame differs."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(n):
        t = np.arange(frames)[:, None, None]
        base = (x[None] * 2 + y[None] + 7 * t + 40 * i) % 256
        clip = np.stack([base, (base * 3) % 256, (255 - base)], axis=-1).astype(np.uint8)
        paths.append(folder / f"{i:04d}.mp4")
        write_video(paths[-1], clip, fps=30)
    return paths


def video_suite(paths: list[Path], frames: int) -> ValidationSuite:
    captions = [f"video number {i}" for i in range(len(paths))]
    retrieval = RetrievalSet("bench", VideoFrames(paths, frames), captions, np.arange(len(paths)), len(paths), frames)
    return ValidationSuite([], None, "files", "bench videos", [retrieval])


def rates(model: str, paths: list[Path], frames: int, batch: int) -> tuple[float, float, float]:
    """(encode_image, first collection, cached collection) in frames per second. encode_image runs before,
    between and after the two collections (on shared cores the load drifts): each collection is compared with
    the mean of the plain runs on either side of it."""
    loaded = load_model(model, device="cpu" if not torch.cuda.is_available() else None)
    side = loaded.preprocess_cfg["size"]
    side = side if isinstance(side, int) else side[0]
    suite = video_suite(paths, frames)
    total = len(paths) * frames
    reference = write_reference_frames(paths, frames, loaded.preprocess, side)
    cfg = loaded.preprocess_cfg

    def plain() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(reference), batch):
                pixels = uint8_to_tensor(reference[i : i + batch], cfg["mean"], cfg["std"])
                loaded.model.encode_image(pixels.to(loaded.device))
        return total / (time.perf_counter() - start)

    def collect() -> float:
        start = time.perf_counter()
        validate(loaded, suite, batch_size=batch)
        return total / (time.perf_counter() - start)

    before = plain()
    first = collect()  # decodes into the (fresh) frame cache while embedding
    middle = plain()
    cached = collect()
    after = plain()
    return (before + middle + after) / 3, first / ((before + middle) / 2), cached / ((middle + after) / 2)


def write_reference_frames(paths: list[Path], frames: int, preprocess, side: int) -> np.ndarray:
    """The same frames, decoded once outside the cache being measured (a separate cache folder)."""
    saved = os.environ["SURGEON_CACHE_DIR"]
    os.environ["SURGEON_CACHE_DIR"] = saved + "-reference"
    try:
        return np.asarray(VideoFrames(paths, frames).decoded(preprocess, side)[:])
    finally:
        os.environ["SURGEON_CACHE_DIR"] = saved


def peak_memory_child(model: str, folder: Path, n_videos: int) -> None:
    """In a fresh process: validate n videos (fresh frame cache), print the peak RSS in KiB."""
    import resource

    paths = sorted(folder.glob("*.mp4"))[:n_videos]
    validate(load_model(model, device="cpu"), video_suite(paths, 12), batch_size=64)
    print(json.dumps({"n": n_videos, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="toy-size model, fewer and smaller videos")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        model, folder, n = args.memory_child
        peak_memory_child(model, Path(folder), int(n))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["SURGEON_CACHE_DIR"] = str(root / "cache")  # a fresh frame cache, removed afterwards
        n, length, (width, height) = (8, 60, (160, 120)) if args.quick else (16, 150, (320, 240))
        paths = write_videos(root / "videos", n, length, width, height)
        threads = torch.get_num_threads()
        print(f"{n} videos of {length} frames at {width}x{height}, 12 frames sampled each; torch threads {threads}")
        rows = [("toy-size ViT (32px)", SMALL, 256, n)]
        rows += [] if args.quick else [("ViT-B-32 random init", vit_b32(), 32, 6)]
        for name, cfg, batch, videos in rows:
            model = model_dir(cfg, root / name.split()[0])
            os.environ["SURGEON_CACHE_DIR"] = str(root / f"cache-{name.split()[0]}")
            plain, first, cached = rates(model, paths[:videos], 12, batch)
            print(
                f"{name}, {videos} videos: encode_image {plain:8.1f} frames/s | first collection {first:.3f}x | "
                f"cached {cached:.3f}x (goal >= 0.8x)"
            )
        model = model_dir(SMALL, root / "memory-model")
        more = write_videos(root / "many", 64, 30, 160, 120)
        peaks = {}
        for count in (8, len(more)):
            env = {**os.environ, "SURGEON_CACHE_DIR": str(root / f"cache-memory-{count}")}
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", model, str(root / "many"), str(count)],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            peaks[count] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]
        print(
            f"peak RSS: 8 videos {peaks[8] / 1024:.1f} MiB, 64 videos {peaks[64] / 1024:.1f} MiB, "
            f"ratio {peaks[64] / peaks[8]:.3f} (goal: flat)"
        )


if __name__ == "__main__":
    main()
