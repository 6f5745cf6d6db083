"""The real-size path on a random-init ViT-B-32 checkpoint file, each goal of issue 14 as a ratio from one run:

    python benchmarks/bench_scale.py [--pool-lines N] [--images N] [--large] [--work DIR]

1. peak RSS of loading the checkpoint / its size: the previous loader (random-init model + a full state dict
   + load_state_dict copy) vs now (parameters on the meta device, the file's tensors assigned); goal <= 1.3x
2. first-run text encoding through surgeon (tokenise, batch, bar, hash the text tower, write the cache) vs
   plain `encode_text` over the same batches, interleaved; goal >= 0.9x
3. `surgeon rank` (a separate process each, as a user runs it) with the general pool: first run, then a new
   image set (text embeddings cached), then the first image set again (statistics cached too); goal <= 0.2x
4. `surgeon prune --export both` with an ImageFolder set: export size / (checkpoint + visual + text ONNX), the
   ONNX parity it printed

The images are random-noise PNGs (a random-init model has nothing to find anyway): only the times matter.
`--pool-lines` takes the first N lines of the general pool (3,272) when the full pool is too slow for the
machine; the ratios of step 3 get smaller with the full pool (the text part it saves grows)."""

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
from PIL import Image

RSS_PROBE = r"""
import resource, sys, time
import torch, open_clip, safetensors.torch
from surgeon.model.load import build_clip, load_model

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

arch, path, how = sys.argv[1:4]
base = rss_kb()
if how == "before":  # the loader before issue 14: build (random init), read the whole file, copy into the model
    model = build_clip(open_clip.get_model_config(arch))
    model.load_state_dict(safetensors.torch.load_file(path))
else:
    model = load_model(arch, path, "cpu").model
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak)
"""


def write_images(folder: Path, n: int, seed: int, size: int = 256) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def surgeon(*args: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "surgeon", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"surgeon {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - t0, done.stdout


def memory(arch: str, checkpoint: Path, env: dict) -> dict:
    size_kb = checkpoint.stat().st_size / 1024
    result = {}
    for how in ("before", "after"):
        out = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, arch, str(checkpoint), how], capture_output=True, text=True, env=env
        )
        if out.returncode != 0:
            sys.exit(out.stderr)
        base, peak = (int(x) for x in out.stdout.split()[-2:])
        result[how] = {"added_by_load": round((peak - base) / size_kb, 3), "absolute": round(peak / size_kb, 3)}
    return result


def text_throughput(checkpoint: Path, lines: list[str], rounds: int) -> dict:
    """Interleaved, so both sides share the machine's noise; each surgeon round starts from an empty cache."""
    import torch

    from surgeon.core.paths import cache_dir
    from surgeon.inputs.pools import TextPool
    from surgeon.inputs.textcache import pool_embeddings
    from surgeon.model.load import load_model

    loaded = load_model("ViT-B-32", str(checkpoint), "cpu")
    pool = TextPool("bench", tuple(lines), {})
    plain_s, ours_s = 0.0, 0.0
    for r in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(lines), 256):
                loaded.model.encode_text(loaded.tokenizer(lines[i : i + 256]), normalize=True)
        t1 = time.perf_counter()
        os.environ["SURGEON_CACHE_DIR"] = str(cache_dir().parent / f"text-bench-{r}")
        _, cached = pool_embeddings(loaded, pool, quiet=True)
        t2 = time.perf_counter()
        assert not cached
        plain_s, ours_s = plain_s + t1 - t0, ours_s + t2 - t1
    return {"plain_lines_per_s": rounds * len(lines) / plain_s, "surgeon_lines_per_s": rounds * len(lines) / ours_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool-lines", type=int, default=None, help="first N lines of the general pool")
    parser.add_argument("--images", type=int, default=40, help="images per ranking set")
    parser.add_argument("--rounds", type=int, default=1, help="text-encoding rounds (interleaved)")
    parser.add_argument("--large", action="store_true", help="also measure the load memory of ViT-L-14")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    import open_clip
    import torch
    from safetensors.torch import save_file

    from surgeon.core.paths import read_lines
    from surgeon.inputs.pools import DATA
    from surgeon.model.load import build_clip

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    env = {**os.environ, "SURGEON_CACHE_DIR": str(work / "cache"), "SURGEON_EXPORTS_DIR": str(work / "exports")}
    os.environ.update(SURGEON_CACHE_DIR=env["SURGEON_CACHE_DIR"])
    checkpoints = {}
    for arch in ("ViT-B-32", "ViT-L-14") if args.large else ("ViT-B-32",):
        path = work / f"{arch}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            model = build_clip(open_clip.get_model_config(arch))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            del model
        checkpoints[arch] = path
    ckpt = checkpoints["ViT-B-32"]
    lines = read_lines(DATA / "pools" / "general.txt", "text pool")[: args.pool_lines]
    pool = work / "pool.txt"
    pool.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first, second = write_images(work / "images-a", args.images, 0), write_images(work / "images-b", args.images, 1)
    val = work / "val"
    for c, name in enumerate(("cat", "dog", "car")):
        write_images(val / name, 8, 10 + c)
    (work / "labels.txt").write_text("cat\ndog\ncar\n")
    report: dict = {"pool_lines": len(lines), "images": args.images, "torch_threads": torch.get_num_threads()}

    report["load_memory"] = {arch: memory(arch, path, env) for arch, path in checkpoints.items()}
    report["text_encoding"] = text_throughput(ckpt, lines, args.rounds)

    base = ["rank", "--model", "ViT-B-32", "--pretrained", str(ckpt), "--texts", str(pool), "--quiet"]
    t_first, _ = surgeon(*base, "--images", str(first), "--out", str(work / "rank-a"), env=env)
    t_new_images, _ = surgeon(*base, "--images", str(second), "--out", str(work / "rank-b"), env=env)
    t_same, shown = surgeon(*base, "--images", str(first), "--out", str(work / "rank-a2"), env=env)
    assert "cached statistics" in shown
    report["rank_s"] = {"first": t_first, "new_image_set": t_new_images, "same_images_again": t_same}

    run = work / "run"
    prune_args = ["prune", "--model", "ViT-B-32", "--pretrained", str(ckpt), "--ranking", str(work / "rank-a")]
    prune_args += ["--policy", "top-k", "--k", "4", "--data", str(val), "--export", "both"]
    prune_args += ["--labels", str(work / "labels.txt"), "--out", str(run), "--quiet"]
    t_prune, _ = surgeon(*prune_args, env=env)
    onnx = run / "onnx"
    exported = sum(p.stat().st_size for p in (run / "model").iterdir()) + sum(
        p.stat().st_size for p in onnx.glob("*.onnx*")
    )
    towers = [p for n in ("visual.onnx*", "text.onnx*") for p in onnx.glob(n)]  # with external-data files
    essential = sum(p.stat().st_size for p in towers) + ckpt.stat().st_size
    report["prune_export_s"] = t_prune
    report["export_bytes"] = {"exported": exported, "checkpoint_visual_text": essential}
    report["onnx_parity"] = json.loads((onnx / "parity.json").read_text())

    text = report["text_encoding"]
    print(json.dumps(report, indent=2))
    print("\ngoals (ratios measured in this run):")
    for arch, mem in report["load_memory"].items():
        print(
            f"  peak RSS added by loading {arch} / checkpoint size: {mem['before']['added_by_load']:.2f} (before) -> "
            f"{mem['after']['added_by_load']:.2f} (now); absolute peak / size {mem['before']['absolute']:.2f} -> "
            f"{mem['after']['absolute']:.2f}   goal <= 1.3"
        )
    print(
        f"  first-run text encoding / plain encode_text throughput: "
        f"{text['surgeon_lines_per_s'] / text['plain_lines_per_s']:.3f}   goal >= 0.9"
    )
    r = report["rank_s"]
    print(f"  second rank, new image set / first rank: {r['new_image_set'] / r['first']:.3f}   goal <= 0.2")
    print(f"  second rank, same images (statistics cached) / first: {r['same_images_again'] / r['first']:.3f}")
    e = report["export_bytes"]
    print(f"  --export both size / (checkpoint + visual + text): {e['exported'] / e['checkpoint_visual_text']:.3f}")
    parity = report["onnx_parity"]
    print(f"  ONNX parity (max abs diff, atol {parity['atol']}): {parity['max_abs_diff']}")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
