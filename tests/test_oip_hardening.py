"""`surgeon serve-model` under hostile input (issue 22: items 1, 4, 5, 9), through the real server on loopback:
every request is checked whole before it may join a batch, so a malformed one gets 400 / INVALID_ARGUMENT and
never changes what its batch mates get; row limits and element counts hold; image files are bounded by the pixels
their headers declare; the repository API is closed and a bearer token guards REST and gRPC."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from surgeon.core import limits
from surgeon.runtime.session import ExportedModel
from tests.test_oip import NAME, free_ports, no_torch_env, running_server, serve_command, server  # noqa: F401
from tests.test_runtime import exported  # noqa: F401 - the session fixture: a tiny real export

SIDE = 32  # the tiny export's input size
pytestmark = pytest.mark.slow  # a real MLServer process (tests/test_oip.py's server)


# ---- raw requests: what tritonclient refuses to send ---------------------------------------------------------
def rest(http: str, model: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of a POST to /v2/models/MODEL/infer."""
    binary = "Inference-Header-Content-Length" in (headers or {})
    sent = {"Content-Type": "application/octet-stream" if binary else "application/json", **(headers or {})}
    request = urllib.request.Request(f"http://{http}/v2/models/{model}/infer", data=body, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def packed(items: list[bytes]) -> bytes:
    """Triton's binary BYTES form: each element's 4-byte little-endian length, then the element."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def grpc_call(url: str, request, metadata: tuple = ()):
    """(status code, details, response) of a raw ModelInfer."""
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            return grpc.StatusCode.OK, "", stub.ModelInfer(request, metadata=metadata, timeout=60)
        except grpc.RpcError as err:
            return err.code(), err.details(), None


def race(calls: list, http: str, grpc_url: str) -> list[tuple[str, object]]:
    """Every call sent at once (a barrier), so the server batches them together; their (outcome, answer)."""
    start = threading.Barrier(len(calls))

    def send(call) -> tuple[str, object]:
        start.wait()
        return call.send(http, grpc_url)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, calls))


# ---- one request of the race: a tensor, how it is sent, what it should get -----------------------------------
#: model -> (input, datatype, output)
TENSORS = {
    "visual": ("pixel_values", "FP32", "image_embeds"),
    "text": ("text", "BYTES", "text_embeds"),
    "image": ("image", "BYTES", "image_embeds"),
}


class Call:
    """A request to NAME_visual (pixel tensors), NAME_text (strings) or NAME_image (PNG files) over REST JSON,
    REST binary or gRPC raw, declaring `shape` while carrying `values` (which disagree with it when the request is
    malformed)."""

    def __init__(self, protocol: str, model: str, shape: list[int], values: np.ndarray):
        self.protocol, self.model, self.shape, self.values = protocol, model, shape, values
        self.input, self.datatype, self.output = TENSORS[model]

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return packed([v if isinstance(v, bytes) else str(v).encode() for v in self.values.ravel()])
        return self.values.astype("<f4").tobytes()

    def json_values(self) -> list:
        if self.datatype == "FP32":
            return self.values.ravel().tolist()
        return [base64.b64encode(v).decode() if isinstance(v, bytes) else str(v) for v in self.values.ravel()]

    def send(self, http: str, grpc_url: str) -> tuple[str, object]:
        """("ok", embeddings) or ("refused", status)."""
        model = f"{NAME}_{self.model}"
        if self.protocol == "grpc":
            tensor = service_pb2.ModelInferRequest.InferInputTensor(
                name=self.input, datatype=self.datatype, shape=self.shape
            )
            request = service_pb2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[self.raw()])
            code, _, response = grpc_call(grpc_url, request)
            if code != grpc.StatusCode.OK:
                return "refused", code
            result = grpcclient.InferResult(response)
            return "ok", result.as_numpy(self.output)
        if self.protocol == "binary":
            data = self.raw()
            entry = {"name": self.input, "datatype": self.datatype, "shape": self.shape}
            entry["parameters"] = {"binary_data_size": len(data)}
            header = json.dumps({"inputs": [entry], "parameters": {"binary_data_output": True}}).encode()
            status, body, headers = rest(
                http, model, header + data, {"Inference-Header-Content-Length": str(len(header))}
            )
        else:
            entry = {"name": self.input, "datatype": self.datatype, "shape": self.shape, "data": self.json_values()}
            status, body, headers = rest(http, model, json.dumps({"inputs": [entry]}).encode())
        if status != 200:
            return "refused", status
        length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
        result = httpclient.InferResult.from_response_body(body, header_length=int(length) if length else None)
        return "ok", result.as_numpy(self.output)


def texts(rows: int, seed: int) -> np.ndarray:
    words = ["a photo of a dog", "red", "the city of Paris", "a tree", "cat", "blue sky", "ten cars"]
    return np.array([words[(seed + i) % len(words)] + f" #{seed}" for i in range(rows)], dtype=object)


def pixels(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, SIDE, SIDE)).astype(np.float32)


def pngs(rows: int, seed: int) -> np.ndarray:
    """`rows` small random PNG files (under twice the model's input: decoded whole, as `surgeon infer` does)."""
    rng = np.random.default_rng(seed)
    files = np.empty(rows, dtype=object)
    for index in range(rows):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)).save(out, format="PNG")
        files[index] = out.getvalue()
    return files


#: how a request is malformed -> (model, declared shape, values) for a request of `rows` rows
MALFORMED = {
    "text count below shape": lambda rows, seed: ("text", [rows + 1], texts(rows, seed)),
    "text count above shape": lambda rows, seed: ("text", [rows], texts(rows + 1, seed)),
    "text shape [1] without data": lambda rows, seed: ("text", [1], texts(0, seed)),
    "pixels count below shape": lambda rows, seed: ("visual", [rows, 3, SIDE, SIDE], pixels(1, seed).ravel()[:10]),
    "pixels rows above shape": lambda rows, seed: ("visual", [rows + 1, 3, SIDE, SIDE], pixels(rows, seed)),
    "pixels shape [1] without data": lambda rows, seed: ("visual", [1, 3, SIDE, SIDE], np.zeros(0, np.float32)),
    "pixels of the wrong size": lambda rows, seed: ("visual", [rows, 3, 16, 16], pixels(rows, seed)[:, :, :16, :16]),
    "pixels not finite": lambda rows, seed: ("visual", [rows, 3, SIDE, SIDE], pixels(rows, seed) * np.inf),
    "image count above shape": lambda rows, seed: ("image", [rows], pngs(rows + 1, seed)),
    "image not an image": lambda rows, seed: ("image", [rows], np.array([b"GIF89a?"] * rows, dtype=object)),
}
PROTOCOLS = ("json", "binary", "grpc")
REFUSED = {"json": 400, "binary": 400, "grpc": grpc.StatusCode.INVALID_ARGUMENT}

requests = st.tuples(
    st.sampled_from(PROTOCOLS),
    st.sampled_from(["visual", "text", "image", *sorted(MALFORMED)]),
    st.integers(1, 3),
    st.integers(0, 10_000),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mix=st.lists(requests, min_size=4, max_size=10))
def test_racing_malformed_requests_never_change_what_valid_ones_get(server, mix):  # noqa: F811
    """Issue 22 #1: valid and malformed requests to the pixel, text and image-file models, sent at once over REST
    JSON, REST binary and gRPC (batched up to 8 per run): each valid request gets its own rows, each malformed
    one 400 / INVALID_ARGUMENT."""
    root, http, grpc_url, _ = server
    direct = ExportedModel(root)
    calls, expected = [], []
    for protocol, kind, rows, seed in mix:
        if kind == "visual":
            calls.append(Call(protocol, "visual", [rows, 3, SIDE, SIDE], pixels(rows, seed)))
            expected.append(direct.encode_pixels(calls[-1].values))
        elif kind == "text":
            calls.append(Call(protocol, "text", [rows], texts(rows, seed)))
            expected.append(direct.encode_texts(list(calls[-1].values)))
        elif kind == "image":
            calls.append(Call(protocol, "image", [rows], pngs(rows, seed)))
            expected.append(direct.encode_images([Image.open(io.BytesIO(f)) for f in calls[-1].values]))
        else:
            calls.append(Call(protocol, *MALFORMED[kind](rows, seed)))
            expected.append(None)
    answers = race(calls, http, grpc_url)
    for (protocol, kind, _, _), want, (outcome, got) in zip(mix, expected, answers, strict=True):
        if want is None:
            assert (outcome, got) == ("refused", REFUSED[protocol]), (kind, protocol)
        else:
            assert outcome == "ok", (kind, protocol, got)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model", "entry", "message"),
    [
        ("text", {"name": "text", "datatype": "BYTES", "shape": [1], "data": []}, "needs 1 values, got 0"),
        ("text", {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a", "b"]}, "needs 1 values, got 2"),
        ("image", {"name": "image", "datatype": "BYTES", "shape": [1], "data": []}, "needs 1 values, got 0"),
        ("text", {"name": "text", "datatype": "BYTES", "shape": [1025], "data": ["a"] * 1025}, "1 to 1,024 rows"),
        ("text", {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"] * 5000}, "got 5,000"),
        ("text", {"name": "text", "datatype": "BYTES", "shape": [0], "data": []}, "1 to 1,024 rows"),
        (
            "visual",
            {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIDE, SIDE], "data": [0.0] * 10},
            "got 10",
        ),
        (
            "visual",
            {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, SIDE, SIDE], "data": []},
            "non-negative",
        ),
    ],
)
def test_row_limits_and_element_counts_are_checked(server, model, entry, message):  # noqa: F811
    """Issue 22 #9: the 1,024-row limit as documented (not 1,024 x max_batch_size), the data count must equal the
    shape's, and a shape [1] with no data is 400 on every model (it was 200 on the image model, 500 on text)."""
    _, http, _, _ = server
    status, body, _ = rest(http, f"{NAME}_{model}", json.dumps({"inputs": [entry]}).encode())
    assert status == 400 and message in json.loads(body)["error"], body


def test_one_input_per_name_and_requests_the_server_cannot_read(server):  # noqa: F811
    _, http, grpc_url, _ = server
    entry = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}
    status, body, _ = rest(http, f"{NAME}_text", json.dumps({"inputs": [entry, entry]}).encode())
    assert status == 400 and "takes one input" in json.loads(body)["error"]
    status, body, _ = rest(http, f"{NAME}_text", b"\x00\x01 not json")
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(body)["error"]  # names the fix
    status, body, _ = rest(http, f"{NAME}_text", b"{}", {"Content-Encoding": "br"})
    assert status == 400 and "request_compression_algorithm" in json.loads(body)["error"]
    header = json.dumps({"inputs": [{**entry, "data": None, "parameters": {"binary_data_size": 99}}]}).encode()
    status, body, _ = rest(http, f"{NAME}_text", header + b"xx", {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "overruns" in json.loads(body)["error"]
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[2])
    request = service_pb2.ModelInferRequest(model_name=f"{NAME}_text", inputs=[tensor], raw_input_contents=[b"\x05"])
    code, details, _ = grpc_call(grpc_url, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 2 values" in details


def test_tritonclient_compression_options_are_read(server):  # noqa: F811
    root, http, _, _ = server
    client = httpclient.InferenceServerClient(http)
    values = pixels(2, 7)
    tensor = httpclient.InferInput("pixel_values", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    expected = ExportedModel(root).encode_pixels(values)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(f"{NAME}_visual", [tensor], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("image_embeds"), expected, atol=1e-5, rtol=0)


# ---- memory: image files bounded by their headers -------------------------------------------------------------
@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """An all-black 8000x8000 PNG: 64 M pixels (the per-image limit) in a few hundred KB."""
    out = io.BytesIO()
    Image.new("L", (8000, 8000)).save(out, format="PNG")
    return out.getvalue()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _image_request(http: str, files: list[bytes]) -> tuple[int, bytes]:
    client = httpclient.InferenceServerClient(http, network_timeout=300, connection_timeout=300)
    tensor = httpclient.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object))
    try:
        return 200, client.infer(f"{NAME}_image", [tensor]).as_numpy("image_embeds")
    except InferenceServerException as err:
        return int(err.status()), err.message().encode()


def test_image_pixels_are_budgeted_from_headers_and_decoded_one_at_a_time(exported, tmp_path, huge_png):  # noqa: F811
    """Issue 22 #4: five 8000x8000 PNGs (320 M pixels, a 1 MB request) are refused from their headers before any
    is decoded; four (256 M, the per-request budget) are answered, one decoded at a time and reduced before the
    resize, with the server's peak RSS growing by less than 600 MB (all four decoded at once held > 1 GB)."""
    _, root, _ = exported
    with running_server(root, tmp_path, "--max-batch-size", "4") as (process, http, _, _):
        before = peak_rss_mb(process.pid)
        status, body = _image_request(http, [huge_png] * 5)
        assert status == 400 and f"{limits.MAX_OIP_REQUEST_PIXELS:,}" in body.decode(), body
        assert peak_rss_mb(process.pid) - before < 50  # refused from the headers: nothing decoded
        status, embeddings = _image_request(http, [huge_png] * 4)
        assert status == 200 and embeddings.shape == (4, 32)
        grown = peak_rss_mb(process.pid) - before
        assert grown < 600, f"peak RSS grew by {grown:.0f} MB"


# ---- the repository API, readiness and the bearer token -------------------------------------------------------
def test_repository_api_is_closed_by_default(server):  # noqa: F811
    """Issue 22 #5: unload is refused (403 / PERMISSION_DENIED) and every model stays ready."""
    _, http, grpc_url, _ = server
    request = urllib.request.Request(f"http://{http}/v2/repository/models/{NAME}_visual/unload", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403 and "--repository-api" in json.loads(refused.value.read())["error"]
    with pytest.raises(InferenceServerException) as denied:
        grpcclient.InferenceServerClient(grpc_url).unload_model(f"{NAME}_visual")
    assert denied.value.status() == "StatusCode.PERMISSION_DENIED"
    client = httpclient.InferenceServerClient(http)
    assert client.is_server_ready() and client.is_model_ready(f"{NAME}_visual")


def test_bearer_token_guards_rest_and_grpc_and_readiness_follows_every_model(exported, tmp_path):  # noqa: F811
    """Issue 22 #5: with --token-env every call but the health checks needs the token, on REST and gRPC alike;
    with --repository-api open, unloading one model makes the server not ready on both protocols."""
    _, root, _ = exported
    token = "s3cret-token"
    options = ("--token-env", "OIP_TOKEN", "--repository-api")
    with running_server(root, tmp_path, *options, env={"OIP_TOKEN": token}) as (_, http, grpc_url, _):
        values = pixels(1, 3)
        bearer = f"Bearer {token}"
        for client, module in (
            (httpclient.InferenceServerClient(http), httpclient),
            (grpcclient.InferenceServerClient(grpc_url), grpcclient),
        ):
            assert client.is_server_live() and client.is_server_ready()  # health checks stay open
            tensor = module.InferInput("pixel_values", list(values.shape), "FP32")
            tensor.set_data_from_numpy(values)
            for headers in (None, {"authorization": "Bearer wrong"}):
                with pytest.raises(InferenceServerException) as refused:
                    client.infer(f"{NAME}_visual", [tensor], headers=headers)
                assert refused.value.status() in ("401", "StatusCode.UNAUTHENTICATED"), refused.value
                assert "bearer token" in refused.value.message()
            with pytest.raises(InferenceServerException):
                client.get_model_metadata(f"{NAME}_visual")  # metadata too
            answer = client.infer(f"{NAME}_visual", [tensor], headers={"authorization": bearer}).as_numpy(
                "image_embeds"
            )
            np.testing.assert_allclose(answer, ExportedModel(root).encode_pixels(values), atol=1e-5, rtol=0)
        grpcclient.InferenceServerClient(grpc_url).unload_model(f"{NAME}_text", headers={"authorization": bearer})
        assert not httpclient.InferenceServerClient(http).is_server_ready()
        assert not grpcclient.InferenceServerClient(grpc_url).is_server_ready()


def test_token_env_must_name_a_set_variable(exported, tmp_path):  # noqa: F811
    import subprocess

    _, root, _ = exported
    command = serve_command(root, free_ports(3), "--token-env", "SURGEON_NO_SUCH_VARIABLE")
    done = subprocess.run(command, capture_output=True, text=True, env=no_torch_env(tmp_path), timeout=60)
    assert done.returncode == 2 and "SURGEON_NO_SUCH_VARIABLE" in done.stderr and "Traceback" not in done.stderr


# ---- issue 25: malformed wire forms, huge but finite pixels --------------------------------------------------
HUGE_DIMS = [0, 10**30]  # no element, but dimensions numpy cannot index: it refused them in reshape (a 500)
#: a malformed REST request -> (header length sent, body)
UNREADABLE_REST = {
    "nested 100,000 deep": (None, b'{"inputs":' + b"[" * 100_000),
    "header length a superscript two": ("\u00b2", b'{"inputs": []}'),
    "header length of 5,000 digits": ("1" * 5000, b'{"inputs": []}'),
    "header length in Arabic-Indic digits": ("\u0661\u0664", b'{"inputs": []}'),
}


def _binary(entry: dict, data: bytes = b"") -> tuple[str, bytes]:
    header = json.dumps({"inputs": [{**entry, "parameters": {"binary_data_size": len(data)}}]}).encode()
    return str(len(header)), header + data


@given(
    shape=st.lists(st.one_of(st.just(0), st.integers(0, 2**70)), max_size=limits.MAX_OIP_DIMS + 1),
    datatype=st.sampled_from(["FP32", "BYTES", "UINT8"]),
    form=st.sampled_from(["bytes", "values", "rest"]),
)
@settings(max_examples=300, deadline=None)
def test_any_declared_shape_is_a_tensor_or_one_invalid_input_line(shape, datatype, form):
    """Every dimension is bounded before anything is reshaped: a shape holding 0 with huge other dimensions was a
    numpy ValueError (a 500 / INTERNAL) in reshape, since only the element count (0) was bounded."""
    from surgeon.core.errors import InvalidInput
    from surgeon.runtime.oipwire import from_bytes, from_values, parse_rest

    empty = 0 in shape
    try:
        if form == "bytes":
            tensor = from_bytes("x", datatype, shape, b"")
        elif form == "values":
            tensor = from_values("x", datatype, shape, [])
        else:
            header_length, body = _binary({"name": "x", "datatype": datatype, "shape": shape})
            (tensor,) = parse_rest(body, header_length).inputs
    except InvalidInput as err:
        assert "\n" not in str(err) and len(str(err)) <= limits.MAX_MESSAGE_CHARS
        return
    assert empty and tensor.array.size == 0 and tensor.shape == shape


@pytest.mark.parametrize("case", sorted(UNREADABLE_REST))
def test_unreadable_rest_bodies_are_invalid_input(case):
    """A body nested past the JSON parser's recursion (RecursionError), and an Inference-Header-Content-Length that
    str.isdigit() takes but int() refuses ("²") or that has more digits than int() reads, were 500s."""
    from surgeon.core.errors import InvalidInput
    from surgeon.runtime.oipwire import parse_rest

    header_length, body = UNREADABLE_REST[case]
    with pytest.raises(InvalidInput):
        parse_rest(body, header_length)


def test_answers_are_never_written_with_nan():
    """NaN and Infinity are no JSON (RFC 8259): the encoder refuses them rather than write an invalid body."""
    from surgeon.runtime.oipwire import RestRequest, Tensor, encode_rest

    request = RestRequest(id=None, inputs=[], binary_outputs={}, binary_by_default=False)
    for value in (np.nan, np.inf):
        with pytest.raises(ValueError, match="JSON"):
            encode_rest("m", None, [Tensor("x", "FP32", np.array([[value]], dtype=np.float32))], request)


@pytest.mark.parametrize(
    ("protocol", "datatype"), [("rest", "FP32"), ("rest", "BYTES"), ("grpc", "FP32"), ("grpc", "BYTES")]
)
def test_shapes_numpy_cannot_index_are_refused_by_the_server(server, protocol, datatype):  # noqa: F811
    _, http, grpc_url, _ = server
    name, model = ("pixel_values", "visual") if datatype == "FP32" else ("text", "text")
    if protocol == "rest":
        header_length, body = _binary({"name": name, "datatype": datatype, "shape": HUGE_DIMS})
        status, answer, _ = rest(http, f"{NAME}_{model}", body, {"Inference-Header-Content-Length": header_length})
        assert status == 400 and "multiplying to more than" in json.loads(answer)["error"], answer
        return
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[0, 2**62])
    request = service_pb2.ModelInferRequest(model_name=f"{NAME}_{model}", inputs=[tensor], raw_input_contents=[b""])
    code, details, _ = grpc_call(grpc_url, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "multiplying to more than" in details, details


#: what HTTP can carry (header values are Latin-1)
SENDABLE = [case for case, (length, _) in sorted(UNREADABLE_REST.items()) if all(ord(c) < 256 for c in length or "")]


@pytest.mark.parametrize("case", SENDABLE)
def test_unreadable_bodies_get_400_from_the_server(server, case):  # noqa: F811
    _, http, _, _ = server
    header_length, body = UNREADABLE_REST[case]
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    status, answer, _ = rest(http, f"{NAME}_text", body, headers)
    assert status == 400 and "\n" not in json.loads(answer)["error"], answer


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mix=st.lists(
        st.tuples(st.sampled_from(PROTOCOLS), st.sampled_from(["visual", "classifier"]), st.booleans()),
        min_size=3,
        max_size=8,
    ).filter(lambda mix: any(huge for *_, huge in mix))
)
def test_finite_pixels_the_model_overflows_on_are_refused_alone(server, mix):  # noqa: F811
    """Pixels all 3e38 (finite, so past the NaN check) made the graphs' outputs NaN: 200 with a bare NaN token in
    the JSON answer and a label from argmax over NaN. Such a request is refused alone (each request's own rows are
    checked), while the valid requests batched with it get exactly their answers."""
    root, http, grpc_url, _ = server
    direct = ExportedModel(root)
    calls = []
    for index, (protocol, model, huge) in enumerate(mix):
        values = np.full((2, 3, SIDE, SIDE), 3e38, np.float32) if huge else pixels(2, index)
        call = Call(protocol, "visual", [2, 3, SIDE, SIDE], values)
        if model == "classifier":
            call.model, call.output = "classifier", "logits"
        calls.append(call)
    answers = race(calls, http, grpc_url)
    for (protocol, model, huge), call, (outcome, got) in zip(mix, calls, answers, strict=True):
        if huge:
            assert (outcome, got) == ("refused", REFUSED[protocol]), (model, protocol, got)
            continue
        assert outcome == "ok", (model, protocol, got)
        want = direct.encode_pixels(call.values) if model == "visual" else direct.classifier_logits(call.values)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_an_overflowing_request_says_which_input_is_out_of_range(server):  # noqa: F811
    _, http, grpc_url, _ = server
    entry = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIDE, SIDE], "data": [3e38] * 3 * SIDE * SIDE}
    for model in ("visual", "classifier"):
        status, body, _ = rest(http, f"{NAME}_{model}", json.dumps({"inputs": [entry]}).encode())
        assert status == 400 and "pixel_values is out of range" in json.loads(body)["error"], body


def test_an_output_the_model_does_not_have_is_refused(server):  # noqa: F811
    """Asking for an output by a wrong name answered 200 with no outputs at all; Triton refuses it."""
    _, http, grpc_url, _ = server
    entry = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, SIDE, SIDE], "data": [0.0] * 3 * SIDE * SIDE}
    body = json.dumps({"inputs": [entry], "outputs": [{"name": "nope"}]}).encode()
    status, answer, _ = rest(http, f"{NAME}_visual", body)
    assert status == 400 and "no output 'nope'" in json.loads(answer)["error"] and "image_embeds" in answer.decode()
    tensor = service_pb2.ModelInferRequest.InferInputTensor(
        name="pixel_values", datatype="FP32", shape=[1, 3, SIDE, SIDE]
    )
    request = service_pb2.ModelInferRequest(
        model_name=f"{NAME}_visual",
        inputs=[tensor],
        raw_input_contents=[np.zeros((1, 3, SIDE, SIDE), np.float32).tobytes()],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="nope")],
    )
    code, details, _ = grpc_call(grpc_url, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no output 'nope'" in details
    named = json.dumps({"inputs": [entry], "outputs": [{"name": "image_embeds"}]}).encode()
    status, answer, _ = rest(http, f"{NAME}_visual", named)
    assert status == 200 and [o["name"] for o in json.loads(answer)["outputs"]] == ["image_embeds"]
