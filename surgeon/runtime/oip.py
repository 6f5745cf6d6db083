"""An ONNX export served over the Open Inference Protocol (KServe v2: REST + gRPC, the protocol of Triton,
KServe and MLServer) by MLServer, with adaptive batching, health endpoints and Prometheus metrics.

Why MLServer: it batches requests in-process (adaptive batching: `max_batch_size`, `max_batch_time`), serves
/v2/health/live, /v2/health/ready and per-model readiness, exports Prometheus metrics on its own port, and
pulls no torch. KServe's ModelServer speaks the same protocol but leaves batching to its sidecar agent.

One OIP model per graph of the export, named like `surgeon triton-repo`'s (NAME_visual, NAME_text,
NAME_classifier; the image models take the same tensors there, the text model takes strings here, not token ids),
plus NAME_image, which takes image files and preprocesses them here as `surgeon infer` does:
  NAME_visual      pixel_values FP32 [-1, 3, H, W] (preprocess.json's) -> image_embeds FP32 [-1, D]
  NAME_image       image BYTES [-1] (encoded files: PNG, JPEG...; base64 strings over REST) -> image_embeds
  NAME_text        text BYTES [-1] (UTF-8 strings, tokenized here)      -> text_embeds FP32 [-1, D]
  NAME_classifier  pixel_values FP32 [-1, 3, H, W] -> logits FP32 [-1, C], probabilities FP32 [-1, C],
                   label BYTES [-1] (the top class)
A model is ready once its export was verified against surgery.json and its onnxruntime session opened."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
from pathlib import Path

import numpy as np
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.errors import InferenceError
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, RequestInput
from prometheus_client import Histogram

from surgeon import limits
from surgeon.errors import SurgeonError
from surgeon.runtime.preprocess import decode_image
from surgeon.runtime.session import ExportedModel, softmax

#: OIP model suffix -> (ONNX graph, input name, input datatype, outputs as (name, datatype))
GRAPHS = {
    "visual": ("visual", "pixel_values", "FP32", (("image_embeds", "FP32"),)),
    "image": ("visual", "image", "BYTES", (("image_embeds", "FP32"),)),
    "text": ("text", "text", "BYTES", (("text_embeds", "FP32"),)),
    "classifier": (
        "classifier",
        "pixel_values",
        "FP32",
        (("logits", "FP32"), ("probabilities", "FP32"), ("label", "BYTES")),
    ),
}

#: rows per onnxruntime run (after adaptive batching merged requests), on the registry MLServer's /metrics
#: serves in-process (its own batch_request_queue metric lands in another registry unless workers > 0)
BATCH_ROWS = Histogram(
    "surgeon_oip_batch_rows",
    "rows (images or texts) per onnxruntime run, after adaptive batching",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)


@functools.lru_cache(maxsize=4)
def open_export(export_dir: str, verify: bool, threads: int | None) -> ExportedModel:
    """One verified ExportedModel per process, shared by the graphs' OIP models (hashed once, not per graph)."""
    return ExportedModel(export_dir, verify=verify, threads=threads)


class ExportGraphModel(MLModel):
    """One graph of an ONNX export as an MLServer model; `parameters.extra` names the graph and export options."""

    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        self.graph: str = extra["graph"]
        self.export = open_export(self.settings.parameters.uri, extra["verify"], extra.get("threads"))
        self.export.session(GRAPHS[self.graph][0])  # opened now: ready means it can answer
        if self.graph == "classifier":
            self.labels = np.array(self.export.classifier_labels(), dtype=object)
        if self.graph == "text":
            self.export.tokenizer  # noqa: B018 - loaded now, not on the first request
        return True

    def _input(self, payload: InferenceRequest) -> RequestInput:
        _, name, datatype, _ = GRAPHS[self.graph]
        if len(payload.inputs) != 1 or payload.inputs[0].name != name:
            raise InferenceError(f"{self.name} takes one input, {name!r}; got {[i.name for i in payload.inputs]}")
        tensor = payload.inputs[0]
        if tensor.datatype != datatype:
            raise InferenceError(f"{name} must be {datatype}, got {tensor.datatype}")
        rows = tensor.shape[0] if tensor.shape else 0
        most = limits.MAX_OIP_ROWS * max(1, self.settings.max_batch_size)  # adaptive batching merges requests
        if not 1 <= rows <= most:
            raise InferenceError(f"{name} must hold 1 to {most} rows, got shape {tensor.shape}")
        return tensor

    def _pixels(self, tensor: RequestInput) -> np.ndarray:
        height, width = self.export.preprocess.size
        expected = [3, height, width]
        if list(tensor.shape[1:]) != expected:
            raise InferenceError(f"pixel_values must be [N, {', '.join(map(str, expected))}], got {tensor.shape}")
        try:
            return NumpyCodec.decode_input(tensor).astype(np.float32, copy=False)
        except (ValueError, TypeError) as err:
            raise InferenceError(f"pixel_values does not hold {tensor.shape} FP32 values: {err}") from None

    def _texts(self, tensor: RequestInput) -> list[str]:
        if len(tensor.shape) != 1:
            raise InferenceError(f"text must be a 1-D BYTES tensor, got shape {tensor.shape}")
        try:
            texts = StringCodec.decode_input(tensor)
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise InferenceError(f"text is not UTF-8 strings: {err}") from None
        longest = max(len(t) for t in texts)
        if longest > limits.MAX_OIP_TEXT_CHARS:
            raise InferenceError(f"a text has {longest:,} characters, more than {limits.MAX_OIP_TEXT_CHARS:,}")
        return texts

    def _images(self, tensor: RequestInput) -> np.ndarray:
        """Encoded image files (raw bytes over gRPC, base64 strings over REST) -> preprocessed pixels."""
        if len(tensor.shape) != 1:
            raise InferenceError(f"image must be a 1-D BYTES tensor of encoded files, got shape {tensor.shape}")
        images = []
        for index, item in enumerate(getattr(tensor.data, "root", tensor.data)):
            try:
                data = item if isinstance(item, bytes) else base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise InferenceError(f"image #{index} is neither bytes nor base64") from None
            images.append(decode_image(io.BytesIO(data), f"#{index}"))
        return self.export.preprocess.batch(images)

    def _infer(self, tensor: RequestInput) -> list:
        """The output tensors (blocking: runs in a worker thread, onnxruntime releases the GIL)."""
        if self.graph == "text":
            return [NumpyCodec.encode_output("text_embeds", self.export.encode_texts(self._texts(tensor)))]
        if self.graph == "image":
            return [NumpyCodec.encode_output("image_embeds", self.export.encode_pixels(self._images(tensor)))]
        pixels = self._pixels(tensor)
        if self.graph == "visual":
            return [NumpyCodec.encode_output("image_embeds", self.export.encode_pixels(pixels))]
        logits = self.export.classifier_logits(pixels)
        probabilities = softmax(logits.astype(np.float64)).astype(np.float32)
        label = StringCodec.encode_output("label", [str(x) for x in self.labels[np.argmax(logits, axis=1)]])
        label.shape = [len(logits)]  # [N] as the metadata says, not the codec's [N, 1]
        return [
            NumpyCodec.encode_output("logits", logits),
            NumpyCodec.encode_output("probabilities", probabilities),
            label,
        ]

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        tensor = self._input(payload)
        BATCH_ROWS.labels(self.name).observe(tensor.shape[0])
        try:
            outputs = await asyncio.to_thread(self._infer, tensor)
        except SurgeonError as err:
            raise InferenceError(limits.clip(str(err))) from None
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)


def model_settings(
    source: str, name: str, max_batch_size: int, max_batch_time_ms: float, threads: int | None, verify: bool
) -> list[ModelSettings]:
    """The MLServer settings of each graph the export at `source` has (classifier only with a classifier.onnx)."""
    export = open_export(source, verify, threads)
    height, width = export.preprocess.size
    dim = int(export.session("visual").get_outputs()[0].shape[-1] or -1)
    shapes = {"pixel_values": [-1, 3, height, width], "image": [-1], "text": [-1], "label": [-1]}
    settings = []
    for graph, (_, input_name, datatype, outputs) in GRAPHS.items():
        if graph == "classifier" and not export.has_classifier:
            continue
        classes = len(export.classifier_labels()) if graph == "classifier" else 0
        out_shapes = {"image_embeds": [-1, dim], "text_embeds": [-1, dim], "logits": [-1, classes]}
        out_shapes["probabilities"] = out_shapes["logits"]
        extra = {"graph": graph, "verify": verify, "threads": threads}
        settings.append(
            ModelSettings(
                name=f"{name}_{graph}",
                implementation=ExportGraphModel,
                platform="onnxruntime",
                inputs=[MetadataTensor(name=input_name, datatype=datatype, shape=shapes[input_name])],
                outputs=[
                    MetadataTensor(name=n, datatype=t, shape=out_shapes.get(n, shapes.get(n, [-1]))) for n, t in outputs
                ],
                max_batch_size=max_batch_size,
                max_batch_time=max_batch_time_ms / 1000.0,
                parameters=ModelParameters(uri=source, extra=extra),
            )
        )
    return settings


def serve(
    export_dir: Path,
    name: str,
    host: str,
    ports: tuple[int, int, int],
    max_batch_size: int,
    max_batch_time_ms: float,
    threads: int | None = None,
    verify: bool = True,
) -> None:
    """Run MLServer in this process until SIGINT/SIGTERM. The export is verified and opened here first, so a bad
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
        await MLServer(settings).start(models)

    asyncio.run(main())
