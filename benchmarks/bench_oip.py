"""`surgeon serve-model` (Open Inference Protocol) vs a direct onnxruntime session, in one run on one machine.

    python benchmarks/bench_oip.py [--threads 2] [--requests 400] [--repeats 3] [--vit | --vit-only] [--files]
    python benchmarks/bench_oip.py --memory

Exports the bundled toy model (with --vit also a random-init ViT-B-32 at 224 px), starts the real
`surgeon serve-model` on loopback and sends FP32 pixel tensors with tritonclient's default calls, over gRPC and
over REST (binary tensor extension): 1 and 16 concurrent clients, 1 and 8 images per request. Each row is the
served throughput over that of a direct onnxruntime session given the same images in the same request batches
(16 clients: the session runs 16 requests' worth of images at once, so batching earns no credit), both with
--threads intra-op threads; every measurement is repeated --repeats times, served and direct interleaved, and the
row shows the median ratio with its min-max (the noise). --files adds PNG files to NAME_image. --memory sends
all-black 8000x8000 PNGs and reports the server's peak RSS (VmHWM) before and after."""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import export  # noqa: E402
from surgeon.runtime.preprocess import decode_image  # noqa: E402
from surgeon.runtime.session import ExportedModel  # noqa: E402

CLIENTS = (1, 16)
ROWS = (1, 8)
PROTOCOLS = {"grpc": grpcclient, "rest": httpclient}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, dict[str, str]]:
    """The real CLI (--no-verify: the benchmark's export has no surgery record), ready; its urls per protocol."""
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "surgeon", "serve-model", str(folder), "--name", "m", "--threads", str(threads)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--no-verify"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    urls = {"rest": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}
    client = httpclient.InferenceServerClient(urls["rest"])
    for _ in range(1200):
        try:
            if client.is_server_ready():
                return process, urls
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("serve-model did not become ready in 120 s")


def served(protocol: str, url: str, batches: list[np.ndarray], clients: int, model: str = "visual"):
    """(per-request latencies in s, wall seconds) of sending every batch with tritonclient's default call,
    `clients` requests in flight, one client object per thread."""
    module = PROTOCOLS[protocol]
    local = threading.local()
    name, datatype = ("pixel_values", "FP32") if model == "visual" else ("image", "BYTES")

    def one(array: np.ndarray) -> float:
        if not hasattr(local, "client"):
            local.client = (
                module.InferenceServerClient(url, network_timeout=600.0)
                if protocol == "rest"
                else (module.InferenceServerClient(url))
            )
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        start = time.perf_counter()
        local.client.infer(f"m_{model}", [tensor]).as_numpy("image_embeds")
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, batches))
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
    """Random PNG files of the model's input size, `rows` per request."""
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    return [np.array([png() for _ in range(rows)], dtype=object) for _ in range(requests)]


def measure(label: str, rows: int, clients: int, repeats: int, serve: Callable, base: Callable) -> None:
    """Served and direct `repeats` times, interleaved; one line with the median ratio and its range."""
    ratios, latencies, served_rate, direct_rate = [], [], [], []
    images = None
    for _ in range(repeats):
        these, wall = serve()
        direct_wall = base()
        images = rows * len(these)
        ratios.append(direct_wall / wall)
        latencies += these
        served_rate.append(images / wall)
        direct_rate.append(images / direct_wall)
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    print(
        f"{label:34s} {rows} img/req {clients:2d} client(s): p50 {p50:8.2f} ms p99 {p99:8.2f} ms | "
        f"{statistics.median(served_rate):7,.0f} img/s served, {statistics.median(direct_rate):7,.0f} direct | "
        f"served/direct {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, {repeats} runs)",
        flush=True,
    )


def bench(name: str, loaded, threads: int, requests: int, repeats: int, files: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(loaded, Path(tmp) / "onnx")
        size = loaded.preprocess_cfg["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        model = ExportedModel(folder, providers=["CPUExecutionProvider"], threads=threads, verify=False)
        process, urls = start_server(folder, threads)
        try:
            for rows in ROWS:
                rng = np.random.default_rng(rows)
                batches = [rng.standard_normal((rows, 3, *hw)).astype(np.float32) for _ in range(requests)]
                model.encode_pixels(batches[0])
                for protocol, url in urls.items():
                    served(protocol, url, batches[:32], 16)  # warm-up: connections, sessions, allocator
                    for clients in CLIENTS:
                        measure(
                            f"{name}, FP32 tensors, {protocol}",
                            rows,
                            clients,
                            repeats,
                            lambda p=protocol, u=url, c=clients, b=batches: served(p, u, b, c),  # type: ignore[misc]
                            lambda c=clients, b=batches: direct(model, b, c),  # type: ignore[misc]
                        )
            if files:
                pngs = png_batches(max(16, requests // 4), 8, hw)
                served("grpc", urls["grpc"], pngs[:16], 16, "image")
                for clients in CLIENTS:
                    measure(
                        f"{name}, PNG files, grpc",
                        8,
                        clients,
                        repeats,
                        lambda c=clients: served("grpc", urls["grpc"], pngs, c, "image"),  # type: ignore[misc]
                        lambda c=clients: direct_files(model, pngs, c),  # type: ignore[misc]
                    )
        finally:
            process.terminate()
            process.wait(timeout=30)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc (Linux only)")


def memory(loaded, threads: int) -> None:
    """Peak RSS of the server answering requests of all-black 8000x8000 PNGs (64 M pixels each, ~190 KB)."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        process, urls = start_server(export(loaded, Path(tmp) / "onnx"), threads)
        try:
            client = grpcclient.InferenceServerClient(urls["grpc"])
            for count in (1, 4, 8, 100):
                before = peak_rss_mb(process.pid)
                tensor = grpcclient.InferInput("image", [count], "BYTES")
                tensor.set_data_from_numpy(np.array([png] * count, dtype=object))
                start = time.perf_counter()
                try:
                    client.infer("m_image", [tensor])
                    outcome = "200"
                except InferenceServerException as err:
                    outcome = f"{err.status()} {err.message()[:90]}"
                print(
                    f"{count:3d} x 8000x8000 PNG ({count * len(png) / 1e6:5.1f} MB request): {outcome}; "
                    f"{time.perf_counter() - start:5.1f} s; server peak RSS {before:6.0f} -> "
                    f"{peak_rss_mb(process.pid):6.0f} MB",
                    flush=True,
                )
        finally:
            process.terminate()
            process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (ViT-B-32: a tenth)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the noise)")
    parser.add_argument("--vit", action="store_true", help="also a random-init ViT-B-32 at 224 px")
    parser.add_argument("--vit-only", action="store_true", help="only the random-init ViT-B-32")
    parser.add_argument("--vit-requests", type=int, default=32, help="requests per ViT-B-32 measurement")
    parser.add_argument("--files", action="store_true", help="also PNG files to NAME_image (gRPC)")
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS test with 8000x8000 PNGs")
    args = parser.parse_args()
    import torch

    from surgeon.load import build_clip, load_model

    torch.set_num_threads(args.threads)
    toy = load_model(device="cpu")
    if args.memory:
        memory(toy, args.threads)
        return
    if not args.vit_only:
        bench("toy model", toy, args.threads, args.requests, args.repeats, args.files)
    if args.vit or args.vit_only:
        import open_clip

        torch.manual_seed(0)
        vit = load_model(device="cpu")  # the toy's LoadedModel, re-pointed at a random-init ViT-B-32
        vit.model = build_clip(open_clip.get_model_config("ViT-B-32")).eval()
        vit.model_cfg, vit.preprocess_cfg = open_clip.get_model_config("ViT-B-32"), {**vit.preprocess_cfg, "size": 224}
        vit.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        bench("random-init ViT-B-32, 224 px", vit, args.threads, args.vit_requests, args.repeats, args.files)


if __name__ == "__main__":
    main()
