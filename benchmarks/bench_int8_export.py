"""int8 export of a real-size model through the CLI, as a user runs it: a random-init ViT-B-32 saved as a
checkpoint file, a small ImageFolder, `surgeon prune` (which records its validation data), then `surgeon export
RUN --format both --quantize int8` (which measures int8 on that data and says what it will write).

    python benchmarks/bench_int8_export.py [--workdir DIR] [--images-per-class N]

Prints each step's time and exit code, the size the export announced against the bytes it wrote, the measured
accuracy change and the parity recorded for each graph (issue 23, items 8 and 10)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

CLASSES = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_inputs(work: Path, per_class: int) -> tuple[Path, Path]:
    import open_clip

    from surgeon.model.load import build_clip

    checkpoint = work / "vit-b-32-random.safetensors"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        model = build_clip(open_clip.get_model_config("ViT-B-32"))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = work / "colours" / "val"
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (data / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 40, (160, 200, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i:03d}.png")
    return checkpoint, data


def surgeon(*args: str) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "surgeon", *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    print(f"$ surgeon {' '.join(args)}\n  exit {done.returncode} in {elapsed:.0f} s")
    for line in done.stderr.strip().splitlines()[-6:]:
        print(f"  stderr: {line}")
    return done.returncode, elapsed, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--images-per-class", type=int, default=4)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-int8-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, data = make_inputs(work, args.images_per_class)
    run = work / "run"
    common = ["--device", "cpu", "-q"]
    model = ["--model", "ViT-B-32", "--pretrained", str(checkpoint)]
    code, _, _ = surgeon(
        "prune",
        *model,
        "--policy",
        "heads",
        "--heads",
        "L11.H0,L10.H3",
        "--data",
        str(data),
        "--out",
        str(run),
        "--force",
        *common,
    )
    if code:
        sys.exit(code)
    print("  validation_data.json:", json.loads((run / "validation_data.json").read_text())["paths"])
    out = work / "export-int8"
    code, _, _ = surgeon(
        "export",
        str(run),
        "--format",
        "both",
        "--quantize",
        "int8",
        "--max-accuracy-drop",
        "100",
        "--onnx-exporter",
        "torchscript",
        "--out",
        str(out),
        "--force",
        "--device",
        "cpu",
    )
    if code:
        sys.exit(code)
    sizes = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print("  written (MB):", {k: round(v / 1e6, 1) for k, v in sizes.items() if v > 1e6})
    print("  quantization.json:", json.loads((out / "onnx" / "quantization.json").read_text()))
    print("  parity.json:", json.loads((out / "onnx" / "parity.json").read_text()))


if __name__ == "__main__":
    main()
