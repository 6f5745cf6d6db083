"""`surgeon serve-model` (Open Inference Protocol over MLServer) vs a direct onnxruntime session, in one run.

    python benchmarks/bench_oip.py [--threads 2] [--requests 400] [--vit]

Exports the bundled toy model's visual.onnx (with --vit also a random-init ViT-B-32 at 224 px), starts the real
`surgeon serve-model` on loopback and sends gRPC requests with tritonclient: p50/p99 latency with 1 and with
16 concurrent clients, for requests of 1 image and of --batch images (as pixel tensors, then as PNG files to
the NAME_image model), and the served throughput over that of a direct onnxruntime session given the same
images in the same request batches (for files: decoded and preprocessed too), both with --threads intra-op
threads (goal >= 0.8). With 16 clients the server's adaptive batching merges requests, so its denominator is
the direct session run on 16 requests' worth of images at once."""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import export  # noqa: E402
from surgeon.runtime.preprocess import decode_image  # noqa: E402
from surgeon.runtime.session import ExportedModel  # noqa: E402

CLIENTS = (1, 16)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, str]:
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "surgeon", "serve-model", str(folder), "--name", "m", "--threads", str(threads)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    for _ in range(600):
        try:
            if client.is_model_ready("m_visual"):
                return process, f"127.0.0.1:{grpc}"
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("serve-model did not become ready in 60 s")


def served(url: str, batches: list[np.ndarray], clients: int, model: str = "visual") -> tuple[list[float], float]:
    """(per-request latencies in s, wall seconds) of sending every batch, `clients` requests in flight: pixel
    tensors to m_visual, or arrays of encoded files to m_image."""
    local = [grpcclient.InferenceServerClient(url) for _ in range(clients)]
    name, datatype = ("pixel_values", "FP32") if model == "visual" else ("image", "BYTES")

    def one(index: int) -> float:
        array = batches[index]
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        start = time.perf_counter()
        local[index % clients].infer(f"m_{model}", [tensor]).as_numpy("image_embeds")
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(len(batches))))
    return latencies, time.perf_counter() - start


def direct(model: ExportedModel, batches: list[np.ndarray], merge: int) -> float:
    """Wall seconds of a direct onnxruntime session over the same images, `merge` requests per run."""
    runs = [np.concatenate(batches[i : i + merge]) for i in range(0, len(batches), merge)]
    start = time.perf_counter()
    for array in runs:
        model.encode_pixels(array)
    return time.perf_counter() - start


def direct_files(model: ExportedModel, batches: list[np.ndarray], merge: int) -> float:
    """`direct` for encoded files: decoding and preprocessing included, as the server does them."""
    start = time.perf_counter()
    for i in range(0, len(batches), merge):
        files = np.concatenate(batches[i : i + merge])
        model.encode_pixels(model.preprocess.batch([decode_image(io.BytesIO(f), "bench") for f in files]))
    return time.perf_counter() - start


def png_batches(requests: int, rows: int, hw: tuple[int, int]) -> list[np.ndarray]:
    """Random photos-sized-for-the-model PNG files, `rows` per request."""
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    return [np.array([png() for _ in range(rows)], dtype=object) for _ in range(requests)]


def report(name: str, what: str, rows: int, clients: int, latencies: list[float], wall: float, base: float) -> None:
    requests = len(latencies)
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    print(
        f"{name}, {rows} {what}/request, {clients:2d} client(s): p50 {p50:7.2f} ms, p99 {p99:7.2f} ms, "
        f"{rows * requests / wall:7,.0f} img/s served vs {rows * requests / base:7,.0f} img/s direct "
        f"(batch {rows * clients}): served/direct {base / wall:.2f}"
    )


def bench(name: str, loaded, threads: int, requests: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(loaded, Path(tmp) / "onnx")
        size = loaded.preprocess_cfg["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        model = ExportedModel(folder, providers=["CPUExecutionProvider"], threads=threads)
        process, url = start_server(folder, threads)
        try:
            for rows in (1, batch):
                rng = np.random.default_rng(0)
                batches = [rng.standard_normal((rows, 3, *hw)).astype(np.float32) for _ in range(requests)]
                served(url, batches[:16], 16)  # warm-up
                model.encode_pixels(batches[0])
                for clients in CLIENTS:
                    latencies, wall = served(url, batches, clients)
                    report(name, "image(s)", rows, clients, latencies, wall, direct(model, batches, clients))
            files = png_batches(requests, batch, hw)
            served(url, files[:16], 16, "image")  # warm-up
            for clients in CLIENTS:
                latencies, wall = served(url, files, clients, "image")
                report(name, "PNG file(s)", batch, clients, latencies, wall, direct_files(model, files, clients))
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32, help="images per request in the second round")
    parser.add_argument("--vit", action="store_true", help="also a random-init ViT-B-32 at 224 px")
    args = parser.parse_args()
    import torch

    from surgeon.load import build_clip, load_model

    torch.set_num_threads(args.threads)
    bench("toy model", load_model(device="cpu"), args.threads, args.requests, args.batch)
    if args.vit:
        import open_clip

        torch.manual_seed(0)
        vit = load_model(device="cpu")  # the toy's LoadedModel, re-pointed at a random-init ViT-B-32
        vit.model = build_clip(open_clip.get_model_config("ViT-B-32")).eval()
        vit.model_cfg, vit.preprocess_cfg = open_clip.get_model_config("ViT-B-32"), {**vit.preprocess_cfg, "size": 224}
        vit.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        bench("random-init ViT-B-32, 224 px", vit, args.threads, max(32, args.requests // 10), 8)


if __name__ == "__main__":
    main()
