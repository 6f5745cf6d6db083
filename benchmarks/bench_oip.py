"""`surgeon serve-model` (Open Inference Protocol) vs a direct onnxruntime session, in one run on one machine.

    python benchmarks/bench_oip.py [--threads 2] [--requests 400] [--repeats 3] [--vit | --vit-only] [--files]
        [--before CODE_DIR] [--kserve PYTHON]
    python benchmarks/bench_oip.py --memory

Exports the bundled toy model (with --vit also a random-init ViT-B-32 at 224 px) with the project's exporter and
manifest (so the server verifies it before its port opens, as it does for users), starts the real
`surgeon serve-model` on loopback and sends FP32 pixel tensors with tritonclient's default calls, over gRPC and
over REST (binary tensor extension): 1 and 16 concurrent clients, 1 and 8 images per request. Each row is the
served throughput over that of a direct onnxruntime session with the server's session options, given the same
images in the same request batches (16 clients: the session runs 16 requests' worth of images at once, so
batching earns no credit); every measurement is repeated --repeats times, served and direct interleaved, and the
row shows the median ratio with its min-max (the noise), and the CPU time per image of the server process, of
the clients (this process, while serving) and of the direct session: on a machine where clients and server share
the cores, clients' CPU time is taken from the server's. The CPU ratios are what the throughput ratio comes to
when the cores are the bottleneck (direct/(server+clients): clients on the same cores, as here; direct/server:
clients elsewhere); they move far less with other load on the machine than wall-clock throughput does.
--before CODE_DIR adds rows of the same server run from another copy of the code (`git archive COMMIT surgeon`
unpacked there), --kserve PYTHON rows of a minimal KServe ModelServer (benchmarks/kserve_onnx.py, run by an
interpreter that has kserve) serving the same visual.onnx. --files adds PNG files to NAME_image. --memory sends
all-black 8000x8000 images (8-bit and 16-bit PNGs, float and 32-bit TIFFs) and reports the server's peak RSS (VmHWM)
before and after (--before: also from that copy of the code)."""

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_serving import export as export_graphs  # noqa: E402
from surgeon.core.integrity import write_manifest  # noqa: E402
from surgeon.inputs.preprocess import decode_image  # noqa: E402
from surgeon.runtime.session import ExportedModel  # noqa: E402

CLIENTS = (1, 16)
ROWS = (1, 8)
PROTOCOLS = {"grpc": grpcclient, "rest": httpclient}
STARTUP_S = 300


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def export(loaded, folder: Path) -> Path:
    """The graphs as `surgeon export` writes them, and last their manifest.json (what `export_run` writes last):
    the record serve-model verifies before its port opens."""
    export_graphs(loaded, folder)
    write_manifest(folder)
    return folder


@dataclass(eq=False)  # hashed by identity: one entry per running server
class Server:
    label: str
    process: subprocess.Popen
    urls: dict[str, str]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _ready(label: str, process: subprocess.Popen, urls: dict[str, str]) -> Server:
    client = httpclient.InferenceServerClient(urls["rest"])
    for _ in range(STARTUP_S * 10):
        if process.poll() is not None:
            raise SystemExit(f"{label} exited {process.returncode} before it was ready")
        try:
            if client.is_server_ready():
                return Server(label, process, urls)
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{label} did not become ready in {STARTUP_S} s")


def start_server(folder: Path, threads: int, code: Path = REPO, label: str = "serve-model") -> Server:
    """The real CLI from the code in `code`, verifying the export, ready; its urls per protocol."""
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "surgeon", "serve-model", str(folder), "--name", "m", "--threads", str(threads)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=code)
    return _ready(label, process, {"rest": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"})


def kserve_usable(python: str) -> bool:
    try:
        usable = subprocess.run([python, "-c", "import kserve, onnxruntime"], capture_output=True).returncode == 0
    except OSError:  # no such interpreter
        usable = False
    if not usable:
        print(
            f"KServe rows skipped: {python} cannot import kserve and onnxruntime (install them into a separate "
            "venv: python -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve onnxruntime)"
        )
    return usable


def start_kserve(python: str, folder: Path, threads: int) -> Server:
    """benchmarks/kserve_onnx.py serving folder/visual.onnx as m_visual, ready."""
    http, grpc = free_ports(2)
    command = [python, str(REPO / "benchmarks" / "kserve_onnx.py"), str(folder), "--threads", str(threads)]
    command += ["--http_port", str(http), "--grpc_port", str(grpc)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return _ready("kserve", process, {"rest": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"})


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


@dataclass
class Runs:
    """One server's measurements of one row, over the repeats."""

    ratios: list[float]
    latencies: list[float]
    rates: list[float]
    server_cpu: list[float]  # ms per image
    client_cpu: list[float]


def measure(label: str, rows: int, clients: int, repeats: int, servers: dict[Server, Callable], base: Callable) -> None:
    """Each server and the direct session `repeats` times, interleaved; one line per server with the median ratio
    and its range, and the median CPU time per image of server, clients and direct session."""
    runs = {server: Runs([], [], [], [], []) for server in servers}
    direct_rate, direct_cpu = [], []
    for _ in range(repeats):
        walls = {}
        for server, serve in servers.items():
            cpu, client = server.cpu_seconds(), time.process_time()
            latencies, walls[server] = serve()
            images = rows * len(latencies)
            runs[server].client_cpu.append((time.process_time() - client) / images * 1000)
            runs[server].server_cpu.append((server.cpu_seconds() - cpu) / images * 1000)
            runs[server].latencies += latencies
            runs[server].rates.append(images / walls[server])
        cpu = time.process_time()
        direct_wall = base()
        direct_cpu.append((time.process_time() - cpu) / images * 1000)
        direct_rate.append(images / direct_wall)
        for server, wall in walls.items():
            runs[server].ratios.append(direct_wall / wall)
    load, direct_ms = os.getloadavg()[0], statistics.median(direct_cpu)
    for server, got in runs.items():
        p50, p99 = np.percentile(np.asarray(got.latencies) * 1000, [50, 99])
        server_ms, client_ms = statistics.median(got.server_cpu), statistics.median(got.client_cpu)
        print(
            f"{label} {server.label:18s} {rows} img/req {clients:2d} client(s): p50 {p50:8.1f} ms p99 {p99:8.1f} ms | "
            f"{statistics.median(got.rates):7,.1f} img/s served, {statistics.median(direct_rate):7,.1f} direct | "
            f"served/direct {statistics.median(got.ratios):.2f} (range {min(got.ratios):.2f}-{max(got.ratios):.2f}, "
            f"{repeats} runs) | CPU ms/img: server {server_ms:.2f}, clients {client_ms:.2f}, direct {direct_ms:.2f}; "
            f"direct/(server+clients) {direct_ms / (server_ms + client_ms):.2f}, direct/server "
            f"{direct_ms / server_ms:.2f} | load {load:.1f}",
            flush=True,
        )


def request_count(requests: int, rows: int, clients: int) -> int:
    """Requests per measurement: `requests` images' worth, at least two per client (one per client for 8 images,
    so that ViT-B-32's 16-client rows finish in minutes)."""
    return max(requests // rows, clients * (2 if rows == 1 else 1))


def bench(name: str, loaded, requests: int, args: argparse.Namespace) -> None:
    threads, repeats = args.threads, args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(loaded, Path(tmp) / "onnx")
        size = loaded.preprocess_cfg["size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        model = ExportedModel(folder, providers=["CPUExecutionProvider"], threads=threads, spinning=False)
        servers = [start_server(folder, threads)]
        try:
            if args.before:
                servers.append(start_server(folder, threads, Path(args.before), "serve-model before"))
            if args.kserve and kserve_usable(args.kserve):
                servers.append(start_kserve(args.kserve, folder, threads))
            for rows in ROWS:
                rng = np.random.default_rng(rows)
                count = max(request_count(requests, rows, clients) for clients in CLIENTS)
                batches = [rng.standard_normal((rows, 3, *hw)).astype(np.float32) for _ in range(count)]
                model.encode_pixels(batches[0])
                for protocol in PROTOCOLS:
                    for server in servers:  # warm-up: connections and sessions, 16 one-image requests
                        served(protocol, server.urls[protocol], [b[:1] for b in batches[:16]], 16)
                    for clients in CLIENTS:
                        these = batches[: request_count(requests, rows, clients)]
                        measure(
                            f"{name}, FP32, {protocol:4s}",
                            rows,
                            clients,
                            repeats,
                            {
                                s: lambda p=protocol, u=s.urls[protocol], c=clients, b=these: served(p, u, b, c)
                                for s in servers
                            },
                            lambda c=clients, b=these: direct(model, b, c),  # type: ignore[misc]
                        )
            if args.files:
                pngs = png_batches(max(16, requests // 4), 8, hw)
                url = servers[0].urls["grpc"]
                served("grpc", url, pngs[:16], 16, "image")
                for clients in CLIENTS:
                    measure(
                        f"{name}, PNG files, grpc",
                        8,
                        clients,
                        repeats,
                        {servers[0]: lambda c=clients: served("grpc", url, pngs, c, "image")},  # type: ignore[misc]
                        lambda c=clients: direct_files(model, pngs, c),  # type: ignore[misc]
                    )
        finally:
            for server in servers:
                server.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc (Linux only)")


#: --memory's files: (label, PIL mode, format, save options): each 8000x8000 (64 M pixels, the per-image limit)
MEMORY_FILES = (
    ("8-bit grey PNG", "L", "PNG", {}),
    ("16-bit grey PNG", "I;16", "PNG", {}),
    ("float TIFF", "F", "TIFF", {"compression": "tiff_deflate"}),
    ("32-bit int TIFF", "I", "TIFF", {"compression": "tiff_deflate"}),
)


def memory(loaded, threads: int, before: str | None = None) -> None:
    """Peak RSS of the server answering requests of all-black 8000x8000 images (64 M pixels each, 0.1-0.4 MB): one
    8-bit PNG in requests of 1, 4, 8 and 100, then one file of each wider mode (16-bit, float, 32-bit), each mode on a
    fresh server; with `before`, the same from that copy of the code."""
    files = {}
    for label, mode, form, options in MEMORY_FILES:
        buffer = io.BytesIO()
        Image.new(mode, (8000, 8000)).save(buffer, format=form, **options)
        files[label] = buffer.getvalue()
    codes = [("serve-model", REPO)] + ([("before", Path(before))] if before else [])
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(loaded, Path(tmp) / "onnx")
        for code_label, code in codes:
            runs = [[(files["8-bit grey PNG"], "8-bit grey PNG", count) for count in (1, 4, 8, 100)]]
            runs += [[(files[label], label, 1)] for label, *_ in MEMORY_FILES[1:]]
            for run in runs:
                server = start_server(folder, threads, code, code_label)
                try:
                    client = grpcclient.InferenceServerClient(server.urls["grpc"])
                    for data, label, count in run:
                        _memory_request(server, client, data, label, count)
                finally:
                    server.stop()


def _memory_request(server: Server, client, data: bytes, label: str, count: int) -> None:
    before = peak_rss_mb(server.process.pid)
    tensor = grpcclient.InferInput("image", [count], "BYTES")
    tensor.set_data_from_numpy(np.array([data] * count, dtype=object))
    start = time.perf_counter()
    try:
        client.infer("m_image", [tensor])
        outcome = "200"
    except InferenceServerException as err:
        outcome = f"{err.status()} {err.message()[:90]}"
    after = peak_rss_mb(server.process.pid)
    print(
        f"{server.label}: {count:3d} x 8000x8000 {label} ({count * len(data) / 1e6:5.1f} MB request): {outcome}; "
        f"{time.perf_counter() - start:5.1f} s; server peak RSS {before:6.0f} -> {after:6.0f} MB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=400, help="images per measurement (toy)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the noise)")
    parser.add_argument("--vit", action="store_true", help="also a random-init ViT-B-32 at 224 px")
    parser.add_argument("--vit-only", action="store_true", help="only the random-init ViT-B-32")
    parser.add_argument("--vit-requests", type=int, default=32, help="images per ViT-B-32 measurement")
    parser.add_argument("--files", action="store_true", help="also PNG files to NAME_image (gRPC)")
    parser.add_argument("--memory", action="store_true", help="only the peak-RSS test with 8000x8000 PNGs")
    parser.add_argument("--before", metavar="CODE_DIR", help="also serve-model from this copy of the code")
    parser.add_argument("--kserve", metavar="PYTHON", help="also a KServe ModelServer run by this interpreter")
    args = parser.parse_args()
    import torch

    from surgeon.model.load import build_clip, load_model

    torch.set_num_threads(args.threads)
    toy = load_model(device="cpu")
    if args.memory:
        memory(toy, args.threads, args.before)
        return
    if not args.vit_only:
        bench("toy", toy, args.requests, args)
    if args.vit or args.vit_only:
        import open_clip

        torch.manual_seed(0)
        vit = load_model(device="cpu")  # the toy's LoadedModel, re-pointed at a random-init ViT-B-32
        vit.model = build_clip(open_clip.get_model_config("ViT-B-32")).eval()
        vit.model_cfg, vit.preprocess_cfg = open_clip.get_model_config("ViT-B-32"), {**vit.preprocess_cfg, "size": 224}
        vit.tokenizer = open_clip.get_tokenizer("ViT-B-32")
        bench("ViT-B-32", vit, args.vit_requests, args)


if __name__ == "__main__":
    main()
