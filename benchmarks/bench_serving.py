"""Serving an ONNX export vs PyTorch eager, and int8 vs fp32 (issue 15), measured side by side in one process.

    python benchmarks/bench_serving.py [--quick] [--threads N]

For the bundled toy model (and a random-init ViT-B-32 at 224 px unless --quick): image throughput of
visual.onnx in onnxruntime vs `model.encode_image` in PyTorch eager, same batch and thread count (goal >= 1.0
on CPU); then visual.onnx quantized to int8 with onnxruntime's dynamic quantization: its latency vs fp32 and,
on the toy model, the zero-shot top-1 change on the six toy tasks (text embeddings stay fp32). Timings are
medians of interleaved runs."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from surgeon.exporting.export import _export_graph, _graphs, _tokenizer_files, check_exporter
from surgeon.model.load import build_clip, load_model
from surgeon.runtime.session import ExportedModel


def export(loaded, folder: Path) -> Path:
    """visual.onnx + text.onnx + preprocess/tokenizer files, as `surgeon export` writes them."""
    folder.mkdir(parents=True)
    for graph in _graphs(loaded, None):
        _export_graph(graph, folder / graph.filename, 18, check_exporter(None))
    (folder / "preprocess.json").write_text(json.dumps(loaded.preprocess_cfg), encoding="utf-8")
    _tokenizer_files(loaded, folder)
    return folder


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def timed(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def quantize(folder: Path) -> Path:
    """A copy of the export whose visual.onnx is int8 (dynamic quantization of the weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = folder.with_name(folder.name + "-int8")
    shutil.copytree(folder, target)
    quantize_dynamic(str(folder / "visual.onnx"), str(target / "visual.onnx"), weight_type=QuantType.QInt8)
    return target


def toy_accuracy(folder: Path, tasks) -> dict[str, float]:
    served = ExportedModel(folder, providers=["CPUExecutionProvider"])
    images = [Image.fromarray(a) for a in tasks[0].images]
    embeds = served.encode_images(images, batch_size=64)
    accuracy = {}
    for task in tasks:
        classes = served.class_embeddings(task.classnames, task.templates)
        accuracy[task.name] = float(((embeds @ classes.T).argmax(1) == np.asarray(task.labels)).mean())
    return accuracy


def bench(name: str, loaded, batch: int, threads: int, rounds: int, tasks=None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(loaded, Path(tmp) / "onnx")
        int8 = quantize(folder)
        size = loaded.preprocess_cfg["size"]
        pixels = torch.randn(batch, 3, *((size,) * 2 if isinstance(size, int) else size))
        array = pixels.numpy()
        model = loaded.model.eval()
        fp32, q8 = session(folder / "visual.onnx", threads), session(int8 / "visual.onnx", threads)
        with torch.inference_mode():
            got = fp32.run(None, {"pixel_values": array})[0]
            assert np.abs(got - model.encode_image(pixels, normalize=True).numpy()).max() < 1e-4
            medians = timed(
                {
                    "torch": lambda: model.encode_image(pixels, normalize=True),
                    "onnx": lambda: fp32.run(None, {"pixel_values": array}),
                    "int8": lambda: q8.run(None, {"pixel_values": array}),
                },
                rounds,
            )
        throughput = {k: batch / v for k, v in medians.items()}
        print(
            f"{name}, batch {batch}, {threads} thread(s): torch eager {throughput['torch']:,.0f} img/s, "
            f"onnxruntime {throughput['onnx']:,.0f} img/s: ONNX/eager {throughput['onnx'] / throughput['torch']:.2f}"
        )
        print(f"  int8 / fp32 latency: {medians['int8'] / medians['onnx']:.3f}")
        if tasks:
            before, after = toy_accuracy(folder, tasks), toy_accuracy(int8, tasks)
            deltas = ", ".join(f"{t} {100 * (after[t] - before[t]):+.1f}" for t in before)
            mean = 100 * (statistics.mean(after.values()) - statistics.mean(before.values()))
            print(
                f"  int8 zero-shot top-1 change (points, {len(tasks[0].labels)} toy images): {deltas}; mean {mean:+.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy model only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from surgeon.inputs.toy.world import get_world

    bench("toy model", load_model(device="cpu"), 32, args.threads, args.rounds, get_world().zeroshot_tasks(500))
    if not args.quick:
        import open_clip

        torch.manual_seed(0)
        vit = load_model(device="cpu")  # the toy's LoadedModel, re-pointed at a random-init ViT-B-32
        vit.model = build_clip(open_clip.get_model_config("ViT-B-32")).eval()
        vit.model_cfg, vit.preprocess_cfg = open_clip.get_model_config("ViT-B-32"), {**vit.preprocess_cfg, "size": 224}
        vit.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        bench("random-init ViT-B-32, 224 px", vit, 8, args.threads, max(5, args.rounds // 4))


if __name__ == "__main__":
    main()
