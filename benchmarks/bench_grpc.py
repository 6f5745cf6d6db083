"""The gRPC service: round-trip latency under 50 concurrent clients, and what a job costs over the library call.

    python benchmarks/bench_grpc.py [--quick] [--clients 50] [--calls 40]

Starts `surgeon serve` in a subprocess on a loopback port (models and data in a temporary folder: a small
random-init ViT saved as an open_clip local-dir folder, random images), then
  1. ListModels and GetOperation round trips: p50/p99 with one client, and with N concurrent clients (one
     channel each, grpc.aio, every client calling in a loop);
  2. a RankHeads job (submit -> WaitOperation done) vs the same library calls made directly (load_model,
     load_pool, resolve_images, rank_heads, Ranking.write) on cached statistics, interleaved, medians.
Prints ratios (machines are noisy; absolute times mean little). Goal (issue 6): job overhead <= 5%. Both sides
use --threads torch threads (default 1: with other work on the machine, multi-threaded torch stalls at random)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from google.longrunning import operations_pb2, operations_pb2_grpc
from PIL import Image

from surgeon.core.options import RankMethod
from surgeon.v1 import surgeon_pb2 as pb
from surgeon.v1 import surgeon_pb2_grpc as pb_grpc

POOL_LINES = 600  # a slice of the general pool: keeps a ranking at seconds on a CPU
MEDIUM = {  # big enough that a ranking job is real work, small enough for a CPU run
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}


def make_world(base: Path, n_images: int) -> None:
    import torch
    from safetensors.torch import save_file

    from surgeon.model.load import build_clip

    torch.manual_seed(0)
    folder = base / "models" / "medium"
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MEDIUM, "preprocess_cfg": {}}))
    model = build_clip(MEDIUM)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    images = base / "data" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    general = (Path(__file__).resolve().parent.parent / "surgeon" / "data" / "pools" / "general.txt").read_text()
    (base / "data" / "pool.txt").write_text("\n".join(general.splitlines()[:POOL_LINES]) + "\n")
    (base / "exports").mkdir()


def start_server(base: Path, env: dict) -> tuple[subprocess.Popen, int]:
    args = ["serve", "--port", "0", "--max-jobs", "2", "--queue-size", "64", "--grace", "5"]
    args += ["--exports-root", str(base / "exports"), "--models-root", str(base / "models")]
    args += ["--data-root", str(base / "data")]
    process = subprocess.Popen(
        [sys.executable, "-m", "surgeon", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(180)
    match = re.search(r"listening on [^:]+:(\d+) ", line[0] if line else "")
    if not match:
        process.kill()
        raise SystemExit(f"the server did not start: {line}")
    return process, int(match.group(1))


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):7.2f} ms  p99 {np.percentile(ms, 99):7.2f} ms  (n={len(ms)})"


async def _client(target: str, call: str, request, calls: int, out: list[float]) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        surgeon = pb_grpc.SurgeonStub(channel)
        method = getattr(surgeon if hasattr(surgeon, call) else operations_pb2_grpc.OperationsStub(channel), call)
        await method(request, timeout=30)  # connect and warm up
        for _ in range(calls):
            t0 = time.perf_counter()
            await method(request, timeout=30)
            out.append(time.perf_counter() - t0)


async def concurrent_latency(target: str, call: str, request, clients: int, calls: int) -> list[float]:
    samples: list[float] = []
    await asyncio.gather(*(_client(target, call, request, calls, samples) for _ in range(clients)))
    return samples


def rank_request(out: str = "") -> pb.RankHeadsRequest:
    return pb.RankHeadsRequest(
        model=pb.ModelRef(model="local-dir:medium"),
        images=pb.ImageSource(images="images"),
        texts="pool.txt",
        layers="last4",
        out=out,
    )


def job_seconds(stub, operations, out: str, cached: bool = True) -> tuple[float, float]:
    """(submit -> done seen by the client, the job's own run time as the server reports it)"""
    from google.protobuf.duration_pb2 import Duration

    t0 = time.perf_counter()
    op = stub.RankHeads(rank_request(out), timeout=60)
    wait = operations_pb2.WaitOperationRequest(name=op.name, timeout=Duration(seconds=600))
    done = operations.WaitOperation(wait, timeout=620)
    elapsed = time.perf_counter() - t0
    meta, result = pb.OperationMetadata(), pb.RankHeadsResult()
    done.metadata.Unpack(meta)
    if not done.response.Unpack(result) or result.cached_stats != cached:
        raise SystemExit(f"job did not succeed on cached statistics: {done.error} {result.cached_stats}")
    ran = meta.end_time.ToNanoseconds() / 1e9 - meta.start_time.ToNanoseconds() / 1e9
    return elapsed, ran


def library_seconds(base: Path, out: Path) -> float:
    """What the RankHeads job runs, called directly (as `surgeon rank` does)."""
    from surgeon.inputs.images import resolve_images
    from surgeon.inputs.pools import load_pool
    from surgeon.model.load import load_model
    from surgeon.ranking.rank import rank_heads

    t0 = time.perf_counter()
    loaded = load_model(f"local-dir:{base / 'models' / 'medium'}")
    pool = load_pool(str(base / "data" / "pool.txt"), loaded.is_toy)
    images = resolve_images(str(base / "data" / "images"), None)
    ranking = rank_heads(loaded, images, pool, RankMethod(layers="last4"), quiet=True)
    ranking.write(out)
    elapsed = time.perf_counter() - t0
    if not ranking.cached_stats:
        raise SystemExit("the library call did not find cached statistics")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--calls", type=int, default=40, help="calls per client")
    parser.add_argument("--rounds", type=int, default=7, help="job / library pairs")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on both sides (1: steady numbers on a shared machine)"
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported, here and in the server
    if args.quick:
        args.calls, args.rounds, args.images = 10, 3, 64
    base = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    env = {**os.environ, "SURGEON_CACHE_DIR": str(base / "cache"), "PYTHONWARNINGS": "ignore"}
    os.environ["SURGEON_CACHE_DIR"] = env["SURGEON_CACHE_DIR"]
    process = None
    try:
        make_world(base, args.images)
        process, port = start_server(base, env)
        target = f"127.0.0.1:{port}"
        print(
            f"server on {target}; {os.cpu_count()} CPU(s), {args.threads} torch thread(s); {args.images} images, "
            f"{POOL_LINES} pool lines; model {MEDIUM['vision_cfg']}"
        )
        with grpc.insecure_channel(target) as channel:
            stub, operations = pb_grpc.SurgeonStub(channel), operations_pb2_grpc.OperationsStub(channel)
            first, _ = job_seconds(stub, operations, "warm", cached=False)  # computes and caches the statistics
            listed = operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=1), timeout=10)
            op_name = listed.operations[0].name
            print(f"first RankHeads job (fresh statistics): {first:.2f} s")
            requests = {
                "ListModels": pb.ListModelsRequest(),
                "GetOperation": operations_pb2.GetOperationRequest(name=op_name),
            }
            print("\n1. round-trip latency on loopback")
            for call, request in requests.items():
                single = asyncio.run(concurrent_latency(target, call, request, 1, args.calls * 5))
                loaded = asyncio.run(concurrent_latency(target, call, request, args.clients, args.calls))
                print(f"  {call:<12} 1 client:   {percentiles(single)}")
                print(
                    f"  {call:<12} {args.clients} clients: {percentiles(loaded)}  "
                    f"-> p50 x{np.median(loaded) / np.median(single):.1f} under load"
                )
            print("\n2. RankHeads job vs the library call, cached statistics (interleaved)")
            library_seconds(base, base / "lib-warm")  # imports and first-call costs out of the way
            jobs, direct, service = [], [], []
            for i in range(args.rounds):
                direct.append(library_seconds(base, base / f"lib-{i}"))
                total, ran = job_seconds(stub, operations, f"job-{i}")
                jobs.append(total)
                service.append(total - ran)
            lib_m, job_m = statistics.median(direct), statistics.median(jobs)
            print(f"  library call: median {lib_m * 1000:8.1f} ms  ({', '.join(f'{t * 1000:.0f}' for t in direct)})")
            print(f"  gRPC job:     median {job_m * 1000:8.1f} ms  ({', '.join(f'{t * 1000:.0f}' for t in jobs)})")
            print(f"  job / library = {job_m / lib_m:.3f}  (overhead {100 * (job_m / lib_m - 1):+.1f}%, goal <= 5%)")
            outside = statistics.median(service)
            print(
                f"  of which outside the job body (RPCs, queue, wake-up): median {outside * 1000:.1f} ms"
                f" = {100 * outside / lib_m:.2f}% of the library call"
            )
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
