"""`surgeon serve-model`: an ONNX export over the Open Inference Protocol (MLServer), exercised with Triton's
own client (tritonclient) over gRPC and REST on loopback. The server runs as the real CLI in a subprocess where
`import torch` fails, so the serving path is proven torch-free."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from surgeon.runtime.session import ExportedModel
from tests.test_runtime import LABELS, _write_image, exported  # noqa: F401 - the session fixture: a tiny real export

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny"
pytestmark = pytest.mark.slow  # a real MLServer process per module and per refused command
STARTUP_S = 90


def free_ports(n: int) -> list[int]:
    """n distinct ephemeral ports, free when asked (the kernel's choice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def no_torch_env(tmp: Path) -> dict[str, str]:
    """This environment with a sitecustomize that makes `import torch` fail, ahead of the worktree."""
    blocker = tmp / "no-torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n", encoding="utf-8")
    path = os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def serve_command(export: Path, ports: list[int], *extra: str) -> list[str]:
    http, grpc, metrics = map(str, ports)
    options = ["--name", NAME, "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics, "--threads", "1"]
    return [sys.executable, "-m", "surgeon", "serve-model", str(export), *options, *extra]


@contextlib.contextmanager
def running_server(export: Path, folder: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[tuple]:
    """(process, http url, grpc url, metrics url) of a `surgeon serve-model` running until the block ends."""
    ports = free_ports(3)
    log = folder / "server.log"
    environment = {**no_torch_env(folder), **(env or {})}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            serve_command(export, ports, *options), stdout=sink, stderr=subprocess.STDOUT, env=environment
        )
    http = f"127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve-model exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:  # not listening yet, or not ready (400)
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve-model not ready after {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield process, http, f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[2]}/metrics"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):  # noqa: F811
    """(export folder, http url, grpc url, metrics url) of a running `surgeon serve-model`, batching 8 requests."""
    _, root, _ = exported
    folder = tmp_path_factory.mktemp("oip")
    with running_server(root, folder, "--max-batch-size", "8", "--max-batch-time-ms", "50") as (_, http, grpc, metrics):
        yield root, http, grpc, metrics


def scrape(url: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _grpc_infer(url: str, model: str, name: str, array: np.ndarray, datatype: str, outputs: list[str]) -> list:
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def _http_infer(url: str, model: str, name: str, array: np.ndarray, datatype: str, outputs: list[str]) -> list:
    """tritonclient's HTTP call with its defaults: the binary tensor extension, in and out."""
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
    return [result.as_numpy(o) for o in outputs]


def _json_infer(url: str, model: str, name: str, array: np.ndarray, datatype: str, outputs: list[str]) -> list:
    """tritonclient's HTTP call with JSON tensors (binary_data=False), in and out."""
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=False)
    requested = [httpclient.InferRequestedOutput(o, binary_data=False) for o in outputs]
    result = client.infer(model, [tensor], outputs=requested)
    return [result.as_numpy(o) for o in outputs]


CALLS = {"grpc": _grpc_infer, "http": _http_infer, "json": _json_infer}


@pytest.mark.parametrize("protocol", sorted(CALLS))
def test_round_trip_equals_a_direct_onnxruntime_session(server, protocol, tmp_path):
    """Every served model, with tritonclient's default calls (gRPC; REST binary) and with REST JSON tensors."""
    root, http, grpc, _ = server
    infer, url = CALLS[protocol], grpc if protocol == "grpc" else http
    direct = ExportedModel(root)
    pixels = _pixels(3)
    (image,) = infer(url, f"{NAME}_visual", "pixel_values", pixels, "FP32", ["image_embeds"])
    np.testing.assert_allclose(image, direct.encode_pixels(pixels), atol=1e-5, rtol=0)
    files = [_write_image(tmp_path / f"{i}.png", 40 + 7 * i, 30, i) for i in range(3)]
    encoded = [path.read_bytes() for path in files]  # binary BYTES carry the files; JSON carries base64 strings
    payload = encoded if protocol != "json" else [base64.b64encode(data).decode() for data in encoded]
    (from_files,) = infer(url, f"{NAME}_image", "image", np.array(payload, dtype=object), "BYTES", ["image_embeds"])
    np.testing.assert_allclose(from_files, direct.encode_images(files), atol=1e-5, rtol=0)
    texts = np.array(["a photo of a dog", "red", "the city of Paris"], dtype=object)
    (text,) = infer(url, f"{NAME}_text", "text", texts, "BYTES", ["text_embeds"])
    np.testing.assert_allclose(text, direct.encode_texts(list(texts)), atol=1e-5, rtol=0)
    logits, probs, labels = infer(
        url, f"{NAME}_classifier", "pixel_values", pixels, "FP32", ["logits", "probabilities", "label"]
    )
    expected = direct.classifier_logits(pixels)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [x.decode() if isinstance(x, bytes) else x for x in labels] == [LABELS[i] for i in expected.argmax(1)]


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_tritonclient_default_call_with_no_outputs_named_gets_every_output(server, module, tmp_path):
    """`client.infer(model, [tensor])` and nothing else, on every served model: each output of the model comes
    back, binary (REST) or raw contents (gRPC), and reads with as_numpy."""
    root, http, grpc, _ = server
    client = module.InferenceServerClient(grpc if module is grpcclient else http)
    direct = ExportedModel(root)
    pixels = _pixels(2, seed=5)
    files = [_write_image(tmp_path / f"{i}.png", 33 + i, 41, i).read_bytes() for i in range(2)]
    texts = ["a photo of a cat", "blue"]
    cases = {
        "visual": ("pixel_values", pixels, "FP32", {"image_embeds": direct.encode_pixels(pixels)}),
        "image": ("image", np.array(files, dtype=object), "BYTES", {"image_embeds": None}),
        "text": ("text", np.array(texts, dtype=object), "BYTES", {"text_embeds": direct.encode_texts(texts)}),
        "classifier": (
            "pixel_values",
            pixels,
            "FP32",
            {"logits": direct.classifier_logits(pixels), "probabilities": None, "label": None},
        ),
    }
    for graph, (name, array, datatype, expected) in cases.items():
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        result = client.infer(f"{NAME}_{graph}", [tensor])
        for output, values in expected.items():
            got = result.as_numpy(output)
            assert got is not None and len(got) == 2, (graph, output)
            if values is not None:
                np.testing.assert_allclose(got, values, atol=1e-4, rtol=0)


def test_concurrent_requests_are_batched_and_answered_in_order(server):
    """Bursts of 16 concurrent requests: every caller gets its own rows back, and the server merges them into
    fewer onnxruntime runs. Merging is opportunistic (a request joins a batch only if it arrives while another
    is waiting), so on two loaded cores a burst may arrive spread out: up to five bursts, each checked whole."""
    root, _, grpc, metrics = server
    direct = ExportedModel(root)
    inputs = [_pixels(1 + i % 3, seed=i) for i in range(16)]
    expected = [direct.encode_pixels(array) for array in inputs]
    clients = [grpcclient.InferenceServerClient(grpc) for _ in inputs]  # connected before the burst
    for client in clients:
        assert client.is_server_ready()

    def one(client, array: np.ndarray, start: threading.Barrier) -> np.ndarray:
        tensor = grpcclient.InferInput("pixel_values", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        wanted = [grpcclient.InferRequestedOutput("image_embeds")]
        start.wait()  # all at once
        return client.infer(f"{NAME}_visual", [tensor], outputs=wanted).as_numpy("image_embeds")

    def grew(after: dict, before: dict, name: str, labels: str) -> float:
        return after[f"{name}{{{labels}}}"] - before.get(f"{name}{{{labels}}}", 0.0)

    runs_per_burst = []
    for _ in range(5):
        before, start = scrape(metrics), threading.Barrier(len(inputs))
        with ThreadPoolExecutor(len(inputs)) as pool:
            answers = list(pool.map(one, clients, inputs, [start] * len(inputs)))
        for answer, wanted in zip(answers, expected, strict=True):  # each caller gets its own rows back
            np.testing.assert_allclose(answer, wanted, atol=1e-5, rtol=0)
        after = scrape(metrics)
        model = f'model="{NAME}_visual"'
        assert grew(after, before, "surgeon_oip_batch_rows_sum", model) == sum(len(a) for a in inputs)
        assert grew(after, before, "model_infer_request_success_total", f'{model},version=""') == len(inputs)
        runs_per_burst.append(grew(after, before, "surgeon_oip_batch_rows_count", model))
        if runs_per_burst[-1] < len(inputs):
            break
    # adaptive batching merged concurrent requests into fewer onnxruntime runs
    assert runs_per_burst[-1] < len(inputs), runs_per_burst


def test_health_and_metadata(server):
    _, http, grpc, _ = server
    for client in (httpclient.InferenceServerClient(http), grpcclient.InferenceServerClient(grpc)):
        assert client.is_server_live() and client.is_server_ready()
        for graph in ("visual", "image", "text", "classifier"):
            assert client.is_model_ready(f"{NAME}_{graph}")
    assert not httpclient.InferenceServerClient(http).is_model_ready(f"{NAME}_nothing")
    meta = httpclient.InferenceServerClient(http).get_model_metadata(f"{NAME}_visual")
    assert meta["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["name"] == "image_embeds" and meta["outputs"][0]["shape"] == [-1, 32]


@pytest.mark.parametrize(
    ("model", "name", "array", "datatype", "message"),
    [
        ("visual", "pixels", _pixels(1), "FP32", "takes one input, 'pixel_values'"),
        ("visual", "pixel_values", np.zeros((1, 3, 16, 16), np.float32), "FP32", "must be [N, 3, 32, 32]"),
        ("visual", "pixel_values", np.zeros((1, 3, 32, 32), np.int64), "INT64", "must be FP32"),
        ("text", "text", np.array(["x" * 10_001], dtype=object), "BYTES", "more than 10,000"),
        ("image", "image", np.array([b"not an image"], dtype=object), "BYTES", "image #0"),
    ],
)
def test_bad_payloads_are_protocol_errors(server, model, name, array, datatype, message):
    _, http, grpc, _ = server
    with pytest.raises(InferenceServerException) as grpc_error:
        _grpc_infer(grpc, f"{NAME}_{model}", name, array, datatype, [])
    assert grpc_error.value.status() == "StatusCode.INVALID_ARGUMENT" and message in grpc_error.value.message()
    with pytest.raises(InferenceServerException) as http_error:
        _http_infer(http, f"{NAME}_{model}", name, array, datatype, [])
    assert http_error.value.status() == "400" and message in http_error.value.message()


def test_served_sessions_sleep_between_runs(exported, tmp_path):  # noqa: F811
    """The server's onnxruntime threads do not spin between runs: spinning ones took the cores its event loop and
    the clients need (bench_oip, toy, 16 clients x 1 image: server CPU 3.2 -> 1.6 ms per image)."""
    _, root, _ = exported
    probe = (  # in a subprocess: MLServer's protos and tritonclient's cannot share one process
        "import sys; from surgeon.runtime.oip import open_export; "
        "options = open_export(sys.argv[1], True, 1).session('visual').get_session_options(); "
        "print(options.get_session_config_entry('session.intra_op.allow_spinning'))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe, str(root)], capture_output=True, text=True, env=no_torch_env(tmp_path)
    )
    assert found.returncode == 0 and found.stdout.strip() == "0", found.stderr[-2000:]


def test_unknown_model_is_not_found(server):
    _, _, grpc, _ = server
    with pytest.raises(InferenceServerException) as error:
        _grpc_infer(grpc, "nope", "pixel_values", _pixels(1), "FP32", [])
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_cli_refuses_bad_exports_and_taken_ports_in_one_line(exported, tmp_path):  # noqa: F811
    _, root, _ = exported
    env = no_torch_env(tmp_path)
    missing = subprocess.run(
        serve_command(tmp_path / "nothing", free_ports(3)), capture_output=True, text=True, env=env
    )
    assert missing.returncode == 3 and missing.stderr.startswith("error: export folder not found"), missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], *free_ports(2)]
        busy = subprocess.run(serve_command(root, ports), capture_output=True, text=True, env=env, timeout=60)
    assert busy.returncode == 5 and "cannot listen on 127.0.0.1" in busy.stderr and "Traceback" not in busy.stderr
    bad = subprocess.run(serve_command(root, free_ports(3), "--max-batch-size", "0"), capture_output=True, text=True)
    assert bad.returncode == 2 and "--max-batch-size" in bad.stderr
