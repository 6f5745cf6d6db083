"""MLServer, extended where serving an export needs it: the inference path reads tensors straight into numpy,
requests may carry a bearer token, the model repository API is closed, readiness covers every model.

MLServer is subclassed, not forked: `SurgeonServer` swaps in its own REST inference route and gRPC servicer, and
adds one guard per protocol; health, metadata, model loading and Prometheus metrics stay MLServer's.
- Inference (REST POST /v2/models/NAME[/versions/V]/infer, gRPC ModelInfer): `oipwire` reads the request (JSON,
  Triton's binary extension, raw gRPC contents) into checked numpy tensors, MLServer's DataPlane runs the model
  (its request counters and timings kept), and the answer goes back as binary where the client asked (REST) or
  as raw contents (gRPC, as Triton answers). Streaming and `generate` routes are not offered.
- Guard: with a token, every call but /v2/health/live, /v2/health/ready (gRPC ServerLive, ServerReady) needs
  `authorization: Bearer TOKEN`, as `surgeon serve --token-env` does; the repository API (index, load, unload)
  answers 403 / PERMISSION_DENIED unless opened.
- Readiness: ready while every model this server was started with is loaded and ready (MLServer alone forgets an
  unloaded model and stays ready)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio
from mlserver import MLServer
from mlserver.errors import MLServerError, ModelNotFound, ModelNotReady
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc.dataplane_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.interceptors import PromServerInterceptor
from mlserver.grpc.model_repository import ModelRepositoryServicer
from mlserver.grpc.model_repository_pb2_grpc import add_ModelRepositoryServiceServicer_to_server
from mlserver.grpc.server import GRPCServer
from mlserver.grpc.servicers import InferenceServicer
from mlserver.registry import MultiModelRegistry
from mlserver.rest.server import RESTServer
from mlserver.settings import ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput
from mlserver.utils import install_uvloop_event_loop
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from surgeon.core import limits
from surgeon.core.errors import InvalidInput, SurgeonError
from surgeon.runtime.oip import model_settings
from surgeon.runtime.oipwire import (
    CONTENTS_FIELDS,
    Tensor,
    chosen_outputs,
    encode_rest,
    from_bytes,
    from_values,
    parse_rest,
    to_bytes,
)

logger = logging.getLogger("surgeon.serve_model")

OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
OPEN_METHODS = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")
REPOSITORY_PATH = "/v2/repository/"
REPOSITORY_METHODS = ("/inference.GRPCInferenceService/Repository", "/inference.model_repository.")
UNAUTHENTICATED = "missing or wrong bearer token (header or metadata authorization: Bearer TOKEN)"
REPOSITORY_CLOSED = "the model repository API (index, load, unload) is closed; serve-model --repository-api opens it"
#: routes of MLServer's REST app this server does not offer (inference has its own, below)
DROPPED_ROUTES = ("/infer", "/generate", "/infer_stream", "/generate_stream")


def failure(err: Exception) -> tuple[int, grpc.StatusCode, str]:
    """(HTTP status, gRPC code, one line) for what an inference call raised."""
    if isinstance(err, ModelNotFound):
        return 404, grpc.StatusCode.NOT_FOUND, limits.clip(str(err))
    if isinstance(err, ModelNotReady):
        return 503, grpc.StatusCode.UNAVAILABLE, limits.clip(str(err))
    if isinstance(err, SurgeonError | MLServerError):
        return 400, grpc.StatusCode.INVALID_ARGUMENT, limits.clip(str(err))
    logger.error("inference failed: %s: %s", type(err).__name__, err)
    return 500, grpc.StatusCode.INTERNAL, limits.clip(f"internal error: {type(err).__name__}: {err}")


def payload(request_id: str | None, inputs: Sequence[Tensor]) -> InferenceRequest:
    """An MLServer request carrying numpy arrays as its inputs' data (built without pydantic's per-value checks;
    ExportGraphModel reads the arrays)."""
    return InferenceRequest.model_construct(
        id=request_id or None,
        parameters=None,
        outputs=None,
        inputs=[
            RequestInput.model_construct(name=t.name, datatype=t.datatype, shape=t.shape, data=t.array, parameters=None)
            for t in inputs
        ],
    )


def answer_tensors(response: InferenceResponse) -> list[Tensor]:
    return [Tensor(o.name, o.datatype, np.asarray(o.data)) for o in response.outputs]


async def all_ready(registry: MultiModelRegistry, names: Sequence[str]) -> bool:
    """Every model the server was started with is loaded and ready."""
    for name in names:
        try:
            model = await registry.get_model(name)
        except MLServerError:
            return False
        if not model.ready:
            return False
    return True


def bearer_ok(sent: str | bytes | None, token: str) -> bool:
    sent_bytes = sent.encode() if isinstance(sent, str) else sent or b""
    return hmac.compare_digest(sent_bytes, f"Bearer {token}".encode())


# ---- REST ------------------------------------------------------------------------------------------------
def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


class RestGuard:
    """ASGI wrapper: the bearer token (when set) on every path but health, the repository API closed unless opened."""

    def __init__(self, app: Any, token: str | None, repository_api: bool):
        self.app, self.token, self.repository_api = app, token, repository_api

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            refusal = None
            if self.token and path not in OPEN_PATHS:
                sent = dict(scope.get("headers") or []).get(b"authorization")
                if not bearer_ok(sent, self.token):
                    refusal = _error(401, UNAUTHENTICATED)
            if refusal is None and path.startswith(REPOSITORY_PATH) and not self.repository_api:
                refusal = _error(403, REPOSITORY_CLOSED)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: Request) -> bytes:
    """The request body, refused (400) past MAX_OIP_MESSAGE_BYTES before more than that is held."""
    declared = request.headers.get("content-length", "")
    too_big = InvalidInput(f"the request is larger than {limits.MAX_OIP_MESSAGE_BYTES:,} bytes; split it")
    digits = declared.isascii() and declared.isdigit()  # isdigit alone takes "²", which int() refuses
    if digits and (len(declared) > 12 or int(declared) > limits.MAX_OIP_MESSAGE_BYTES):
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.MAX_OIP_MESSAGE_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class SurgeonRestServer(RESTServer):
    """MLServer's REST server with the numpy inference route, the all-models readiness and the guard."""

    def __init__(self, settings: Settings, data_plane, handlers, names: Sequence[str], token, repository_api):
        super().__init__(settings, data_plane, handlers)
        self._names = list(names)
        server: Any = self  # MLServer leaves RESTServer._app untyped
        routes = server._app.router.routes
        routes[:] = [r for r in routes if not str(getattr(r, "path", "")).endswith(DROPPED_ROUTES)]
        routes[:0] = [
            Route("/v2/models/{model_name}/infer", self._infer, methods=["POST"]),
            Route("/v2/models/{model_name}/versions/{model_version}/infer", self._infer, methods=["POST"]),
            Route("/v2/health/ready", self._ready, methods=["GET"]),
        ]
        server._app = RestGuard(server._app, token, repository_api)

    async def _ready(self, request: Request) -> Response:
        ready = await all_ready(self._data_plane._model_registry, self._names)
        return Response(status_code=200 if ready else 400)

    async def _infer(self, request: Request) -> Response:
        name = request.path_params["model_name"]
        try:
            body = await _read_body(request)
            parsed = parse_rest(
                body, request.headers.get("inference-header-content-length"), request.headers.get("content-encoding")
            )
            result = await self._data_plane.infer(
                payload(parsed.id, parsed.inputs), name, request.path_params.get("model_version")
            )
            content, headers = encode_rest(result.model_name, result.id, answer_tensors(result), parsed)
            return Response(content, headers=headers)
        except Exception as err:  # noqa: BLE001 - every failure is one line with its status
            status, _, message = failure(err)
            return _error(status, message)


# ---- gRPC ------------------------------------------------------------------------------------------------
def grpc_tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    """A gRPC request's inputs: raw contents by np.frombuffer, or `contents` values."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    tensors = []
    for index, item in enumerate(request.inputs):
        name = item.name
        if raw:
            tensors.append(from_bytes(name, item.datatype, list(item.shape), raw[index]))
            continue
        field = CONTENTS_FIELDS.get(item.datatype)
        if field is None:
            raise InvalidInput(f"{limits.echo(name)}: send {limits.echo(item.datatype)} as raw_input_contents")
        tensors.append(from_values(name, item.datatype, list(item.shape), list(getattr(item.contents, field))))
    return tensors


def grpc_answer(result: InferenceResponse, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The answer with every output as raw contents (as Triton answers; tritonclient reads nothing else)."""
    outputs = chosen_outputs(answer_tensors(result), (o.name for o in request.outputs))
    return pb.ModelInferResponse(
        model_name=result.model_name,
        id=result.id or "",
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs
        ],
        raw_output_contents=[to_bytes(t) for t in outputs],
    )


class TensorServicer(InferenceServicer):
    """MLServer's gRPC servicer with the numpy ModelInfer and the all-models readiness; no streaming."""

    def __init__(self, data_plane, handlers, names: Sequence[str]):
        super().__init__(data_plane, handlers)
        self._names = list(names)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await all_ready(self._data_plane._model_registry, self._names))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        try:
            tensors = grpc_tensors(request)
            result = await self._data_plane.infer(
                payload(request.id, tensors), request.model_name, request.model_version
            )
            return grpc_answer(result, request)
        except Exception as err:  # noqa: BLE001 - every failure is one line with its status
            _, code, message = failure(err)
            await context.abort(code, message)
            raise  # not reached: abort raises

    async def ModelStreamInfer(self, requests_stream, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not offered; call ModelInfer")
        yield  # an async generator, as the servicer's signature is


class GrpcGuard(aio.ServerInterceptor):
    """The REST guard's rules for gRPC: token on every method but ServerLive/ServerReady, repository closed."""

    def __init__(self, token: str | None, repository_api: bool):
        self.token, self.repository_api = token, repository_api

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        refusal = None
        if self.token and method not in OPEN_METHODS:
            sent = dict(details.invocation_metadata or ()).get("authorization")
            if not bearer_ok(sent, self.token):
                refusal = (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        if refusal is None and method.startswith(REPOSITORY_METHODS) and not self.repository_api:
            refusal = (grpc.StatusCode.PERMISSION_DENIED, REPOSITORY_CLOSED)
        handler = await continuation(details)
        if refusal is None or handler is None:
            return handler
        code, message = refusal

        async def deny(request_or_requests: Any, context: aio.ServicerContext) -> None:
            await context.abort(code, message)

        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming or handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny, **serializers)
        return grpc.unary_unary_rpc_method_handler(deny, **serializers)


class SurgeonGrpcServer(GRPCServer):
    """MLServer's gRPC server with TensorServicer and the guard (metrics kept; no tracing, no debug logging)."""

    def __init__(self, settings: Settings, data_plane, handlers, names: Sequence[str], token, repository_api):
        super().__init__(settings, data_plane, handlers)
        self._names, self._token, self._repository_api = list(names), token, repository_api

    def _create_server(self):
        self._server = aio.server(
            interceptors=[
                GrpcGuard(self._token, self._repository_api),
                PromServerInterceptor(enable_handling_time_histogram=True),
            ],
            options=self._get_options(),
        )
        servicer = TensorServicer(self._data_plane, self._model_repository_handlers, self._names)
        add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        add_ModelRepositoryServiceServicer_to_server(
            ModelRepositoryServicer(self._model_repository_handlers), self._server
        )
        self._server.add_insecure_port(f"{self._settings.host}:{self._settings.grpc_port}")
        return self._server


class SurgeonServer(MLServer):
    """MLServer with SurgeonRestServer and SurgeonGrpcServer for the models in `models`."""

    def __init__(self, settings: Settings, models: Sequence[ModelSettings], token: str | None, repository_api: bool):
        self._models = list(models)
        self._token, self._repository_api = token, repository_api
        super().__init__(settings)

    def _create_servers(self) -> None:
        names = [m.name for m in self._models]
        common = (self._settings, self._data_plane, self._model_repository_handlers, names)
        self._rest_server = SurgeonRestServer(*common, self._token, self._repository_api)
        self._grpc_server = SurgeonGrpcServer(*common, self._token, self._repository_api)
        self._kafka_server = None

    async def serve(self) -> None:
        await self.start(self._models)


def serve(
    export_dir: Path,
    name: str,
    host: str,
    ports: tuple[int, int, int],
    max_batch_size: int,
    max_batch_time_ms: float,
    threads: int | None = None,
    verify: bool = True,
    token: str | None = None,
    repository_api: bool = False,
) -> None:
    """Run the server in this process until SIGINT/SIGTERM. The export is verified and opened here first, so a bad
    export fails with one line before any port is bound."""
    http_port, grpc_port, metrics_port = ports
    models = model_settings(str(Path(export_dir)), name, max_batch_size, max_batch_time_ms, threads, verify)
    settings = Settings(
        host=host,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        parallel_workers=0,  # one process holds the sessions; onnxruntime runs them in its own threads
        grpc_max_message_length=limits.MAX_OIP_MESSAGE_BYTES,
        debug=False,
        server_name="surgeon",
    )

    async def main() -> None:
        await SurgeonServer(settings, models, token, repository_api).serve()

    install_uvloop_event_loop()  # as `mlserver start` does: uvloop's event loop, when installed
    asyncio.run(main())
