"""onnxruntime latency of visual.onnx: unpruned vs hard-pruned vs zero-pruned, next to the FLOP ratios (issue 5).

    python benchmarks/bench_onnx.py [--quick]

Models: the bundled toy model (when present) and a random-init ViT-B-32 at 224 px, with 25% and 50% of the
heads of the last 4 layers removed. Goal: hard-pruned latency ratio within 15% of the whole encoder's FLOP
ratio; zero-pruned as fast as unpruned. Latencies are medians of interleaved runs in one process."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from surgeon.exporting.export import _Visual
from surgeon.model.heads import HeadRef
from surgeon.model.hooks import attention, image_size, vision_blocks, vision_tower
from surgeon.model.load import TOY_MODEL_DIR, build_clip, load_model
from surgeon.model.surgery import SurgeryRequest, apply_surgery


def encoder_flops(visual: torch.nn.Module) -> tuple[float, float]:
    """(attention FLOPs, whole-encoder FLOPs) per image, multiply-adds x 2, from the module shapes."""
    from surgeon.model.decompose import AttentionParams

    tokens = visual.positional_embedding.shape[0]
    width = visual.conv1.out_channels
    patch = visual.conv1.kernel_size[0] ** 2 * 3
    attention_flops = mlp = 0.0
    for block in vision_blocks(visual):
        p = AttentionParams.of_block(block)
        inner = p.n_heads * p.head_dim
        attention_flops += 2 * (3 * tokens * width * inner + 2 * tokens * tokens * inner + tokens * inner * width)
        mlp += 2 * 2 * tokens * width * block.mlp.c_fc.out_features
    embed = 2 * (tokens - 1) * patch * width + 2 * width * visual.output_dim
    return attention_flops, attention_flops + mlp + embed


def export(model: torch.nn.Module, size: int, path: Path) -> None:
    torch.onnx.export(
        _Visual(model.eval()),
        (torch.randn(2, 3, size, size),),
        str(path),
        dynamo=False,
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        opset_version=18,
        dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
    )


def latency(sessions: dict[str, ort.InferenceSession], batch: np.ndarray, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, {"pixel_values": batch})
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"pixel_values": batch})
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(name: str, make_model, size: int, heads_per_layer: int, batch: int, rounds: int, tmp: Path) -> None:
    n_layers = len(vision_blocks(vision_tower(make_model())))
    layers = range(n_layers - 4, n_layers)
    variants = {"unpruned": None}
    for share in (0.25, 0.5):
        count = int(heads_per_layer * share)
        heads = [HeadRef(layer, h) for layer in layers for h in range(count)]
        variants[f"hard {int(share * 100)}%"] = ("hard", heads)
        variants[f"zero {int(share * 100)}%"] = ("zero", heads)
    sessions, flops = {}, {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    for label, surgery in variants.items():
        model = make_model()
        if surgery:
            apply_surgery(model, SurgeryRequest(surgery[1], surgery[0]))
        flops[label] = encoder_flops(vision_tower(model))
        path = tmp / f"{name}-{label.replace(' ', '_').replace('%', '')}.onnx"
        export(model, size, path)
        sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    times = latency(sessions, pixels, rounds)
    base_time, (base_attn, base_all) = times["unpruned"], flops["unpruned"]
    print(f"\n{name} (batch {batch}, {rounds} interleaved rounds, median latency)")
    for label in variants:
        attn, total = flops[label]
        ratio, flop_ratio = times[label] / base_time, total / base_all
        gap = (
            ""
            if label == "unpruned" or label.startswith("zero")
            else f" | |latency - FLOP ratio| / FLOP ratio = {abs(ratio - flop_ratio) / flop_ratio:.1%} (goal <= 15%)"
        )
        print(
            f"  {label:10s} {1000 * times[label]:8.1f} ms  latency ratio {ratio:.3f}  "
            f"attention-FLOP ratio {attn / base_attn:.3f}  encoder-FLOP ratio {flop_ratio:.3f}{gap}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="toy model only, fewer rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if (TOY_MODEL_DIR / "open_clip_config.json").is_file():
            toy = load_model(device="cpu")
            size = image_size(toy.model)[0]
            heads = attention(vision_blocks(vision_tower(toy.model))[0]).num_heads
            bench(
                "toy model",
                lambda: load_model(device="cpu").model,
                size,
                heads,
                64,
                10 if args.quick else 40,
                Path(tmp),
            )
        if not args.quick:
            import open_clip

            cfg = open_clip.get_model_config("ViT-B-32")
            torch.manual_seed(0)
            state = build_clip(cfg).state_dict()

            def vit_b32():
                model = build_clip(cfg)
                model.load_state_dict(state)
                return model

            bench("ViT-B-32 random init, 224 px", vit_b32, 224, 12, 8, 10, Path(tmp))


if __name__ == "__main__":
    main()
