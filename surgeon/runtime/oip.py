"""An ONNX export served over the Open Inference Protocol (KServe v2: REST + gRPC, the protocol of Triton,
KServe and MLServer) by MLServer, with adaptive batching, health endpoints and Prometheus metrics.

Why MLServer: it serves /v2/health/live, /v2/health/ready, per-model readiness and metadata, exports Prometheus
metrics on its own port, loads models with a settings schema, and pulls no torch. Its inference path turns every
tensor value into a Python object and its batcher trusts each request's shape; `oipserver` replaces only that
path (numpy straight from the wire, Triton's binary REST extension, a bearer token, the repository API closed) and
`oipbatch` batches checked numpy arrays instead (NOTES.md: "Serving").

One OIP model per graph of the export, named like `surgeon triton-repo`'s (NAME_visual, NAME_text,
NAME_classifier; the image models take the same tensors there, the text model takes strings here, not token ids),
plus NAME_image, which takes image files and preprocesses them here as `surgeon infer` does:
  NAME_visual      pixel_values FP32 [-1, 3, H, W] (preprocess.json's) -> image_embeds FP32 [-1, D]
  NAME_image       image BYTES [-1] (encoded files: PNG, JPEG...; base64 strings in JSON) -> image_embeds
  NAME_text        text BYTES [-1] (UTF-8 strings, tokenized here)      -> text_embeds FP32 [-1, D]
  NAME_classifier  pixel_values FP32 [-1, 3, H, W] -> logits FP32 [-1, C], probabilities FP32 [-1, C],
                   label BYTES [-1] (the top class)
A model is ready once its export was verified against surgery.json and its onnxruntime session opened.

Every request is checked whole before it may join a batch (one input of the model's name and datatype, its
element count the product of its shape, 1 to MAX_OIP_ROWS rows, finite pixels, texts within MAX_OIP_TEXT_CHARS,
image files within the pixel budgets read from their headers), then converted to the graph's input; a request
that fails gets 400 / INVALID_ARGUMENT and never reaches a batch. After the run, a request whose own output rows are
not finite (pixels finite but huge) gets 400 too, alone: rows never mix in the graphs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io

import numpy as np
from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput
from prometheus_client import Histogram

from surgeon.core import limits
from surgeon.core.errors import InvalidInput, SurgeonError
from surgeon.inputs.preprocess import decode_image, header_size
from surgeon.runtime.oipbatch import Batcher, PixelBudget
from surgeon.runtime.oipwire import Tensor, from_values
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

#: rows per onnxruntime run (after adaptive batching merged requests), on the registry MLServer's /metrics serves
BATCH_ROWS = Histogram(
    "surgeon_oip_batch_rows",
    "rows (images or texts) per onnxruntime run, after adaptive batching",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)

#: decoded pixels held at once by every image model's decoding threads together
DECODING = PixelBudget(limits.MAX_OIP_DECODING_PIXELS)


@functools.lru_cache(maxsize=4)
def open_export(export_dir: str, verify: bool, threads: int | None) -> ExportedModel:
    """One verified ExportedModel per process, shared by the graphs' OIP models (hashed once, not per graph).
    Its intra-op threads sleep between runs instead of spinning: the server's event loop and the batcher share
    the cores with them (spinning doubled the server's CPU time per request, NOTES.md "Serving")."""
    return ExportedModel(export_dir, verify=verify, threads=threads, spinning=False)


def payload_tensors(payload: InferenceRequest) -> list[Tensor]:
    """The request's inputs as checked tensors: numpy arrays put there by `oipserver`'s wire readers, or the JSON
    values of a request MLServer parsed itself."""
    tensors = []
    for item in payload.inputs:
        data = item.data
        if isinstance(data, np.ndarray):
            tensors.append(Tensor(item.name, item.datatype, data))
        else:
            tensors.append(from_values(item.name, item.datatype, item.shape, getattr(data, "root", data)))
    return tensors


class ExportGraphModel(MLModel):
    """One graph of an ONNX export as an MLServer model; `parameters.extra` names the graph, the export options
    and the batching settings (MLServer's own batcher is off: `oipbatch.Batcher` merges checked arrays instead)."""

    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        self.graph: str = extra["graph"]
        self.export = open_export(self.settings.parameters.uri, extra["verify"], extra.get("threads"))
        self.export.session(GRAPHS[self.graph][0])  # opened now: ready means it can answer
        if self.graph == "classifier":
            self.labels = np.array(self.export.classifier_labels(), dtype=object)
        if self.graph == "text":
            self.export.tokenizer  # noqa: B018 - loaded now, not on the first request
        self.batcher = Batcher(
            self._run,
            max_requests=int(extra["max_batch_size"]),
            max_wait_s=float(extra["max_batch_time_ms"]) / 1000.0,
            max_rows=limits.MAX_OIP_ROWS,
            observe=BATCH_ROWS.labels(self.name).observe,
        )
        return True

    def _check(self, inputs: list[Tensor]) -> Tensor:
        """The one input this model takes, of its datatype, with 1 to MAX_OIP_ROWS rows."""
        _, name, datatype, _ = GRAPHS[self.graph]
        if len(inputs) != 1 or inputs[0].name != name:
            raise InvalidInput(f"{self.name} takes one input, {name!r}; got {limits.echo([t.name for t in inputs])}")
        tensor = inputs[0]
        if tensor.datatype != datatype:
            raise InvalidInput(f"{name} must be {datatype}, got {tensor.datatype}")
        rows = tensor.shape[0] if tensor.shape else 0
        if not 1 <= rows <= limits.MAX_OIP_ROWS:
            raise InvalidInput(f"{name} must hold 1 to {limits.MAX_OIP_ROWS:,} rows, got shape {tensor.shape}")
        return tensor

    def _pixels(self, tensor: Tensor) -> np.ndarray:
        height, width = self.export.preprocess.size
        expected = [3, height, width]
        if tensor.shape[1:] != expected:
            raise InvalidInput(f"pixel_values must be [N, {', '.join(map(str, expected))}], got {tensor.shape}")
        if not np.isfinite(tensor.array).all():
            raise InvalidInput("pixel_values holds NaN or infinite values")
        return tensor.array

    def _token_ids(self, tensor: Tensor) -> np.ndarray:
        if len(tensor.shape) != 1:
            raise InvalidInput(f"text must be a 1-D BYTES tensor, got shape {tensor.shape}")
        texts = []
        for index, item in enumerate(tensor.array):
            try:
                texts.append(item.decode("utf-8") if isinstance(item, bytes) else item)
            except UnicodeDecodeError:
                raise InvalidInput(f"text #{index} is not UTF-8") from None
            if len(texts[-1]) > limits.MAX_OIP_TEXT_CHARS:
                raise InvalidInput(
                    f"text #{index} has {len(texts[-1]):,} characters, more than {limits.MAX_OIP_TEXT_CHARS:,}"
                )
        return self.export.tokenizer(texts)

    def _image_pixels(self, tensor: Tensor) -> np.ndarray:
        """Encoded image files (bytes; base64 strings in JSON) -> preprocessed pixels, one image decoded at a time
        within the server's decoding budget, after the whole request's size was read from the headers."""
        if len(tensor.shape) != 1:
            raise InvalidInput(f"image must be a 1-D BYTES tensor of encoded files, got shape {tensor.shape}")
        files, sizes = [], []
        for index, item in enumerate(tensor.array):
            try:
                data = item if isinstance(item, bytes) else base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise InvalidInput(f"image #{index} is neither bytes nor base64") from None
            files.append(data)
            sizes.append(header_size(data, f"#{index}"))
        total = sum(w * h for w, h in sizes)
        if total > limits.MAX_OIP_REQUEST_PIXELS:
            raise InvalidInput(
                f"the request's images hold {total:,} pixels, more than the {limits.MAX_OIP_REQUEST_PIXELS:,} "
                "one request may have decoded; send fewer or smaller images per request"
            )
        config = self.export.preprocess
        pixels = np.empty((len(files), 3, *config.size), dtype=np.float32)
        for index, (data, (width, height)) in enumerate(zip(files, sizes, strict=True)):
            with DECODING.hold(width * height):
                pixels[index] = config(decode_image(io.BytesIO(data), f"#{index}", reduce_for=config.size))
        return pixels

    def _rows(self, tensor: Tensor) -> np.ndarray:
        """The graph's input for a checked tensor (blocking for files and texts: run in a worker thread)."""
        if self.graph == "text":
            return self._token_ids(tensor)
        if self.graph == "image":
            return self._image_pixels(tensor)
        return self._pixels(tensor)

    def _run(self, rows: np.ndarray) -> list[np.ndarray]:
        """The outputs for a (merged) batch of rows, in GRAPHS' order."""
        if self.graph == "text":
            return [self.export.encode_tokens(rows)]
        if self.graph in ("visual", "image"):
            return [self.export.encode_pixels(rows)]
        logits = self.export.classifier_logits(rows)
        probabilities = softmax(logits.astype(np.float64)).astype(np.float32)
        return [logits, probabilities, self.labels[np.argmax(logits, axis=1)]]

    def _finite(self, name: str, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """This request's own rows of a (merged) run, refused when any float output is NaN or infinite: finite
        pixels as large as 3e38 overflow the graph, and NaN would be a bare token in a JSON answer and argmax a
        meaningless label. Rows never mix in the graph, so the requests batched with this one keep their answers."""
        if all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
            return outputs
        fix = "; send pixels preprocessed as onnx/preprocess.json says (about -3..3)" if name == "pixel_values" else ""
        raise InvalidInput(f"{name} is out of range: the model's outputs for it are not finite (NaN or infinite){fix}")

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            with self.batcher.preparing():
                tensor = self._check(payload_tensors(payload))
                if self.graph in ("visual", "classifier"):
                    rows = self._rows(tensor)
                else:
                    rows = await asyncio.to_thread(self._rows, tensor)
            outputs = self._finite(tensor.name, await self.batcher.submit(rows))
        except SurgeonError as err:
            raise InferenceError(limits.clip(str(err))) from None
        described = GRAPHS[self.graph][3]
        return InferenceResponse.model_construct(  # numpy data: `oipserver` writes it out without Python values
            model_name=self.name,
            id=payload.id,
            parameters=None,
            outputs=[
                ResponseOutput.model_construct(name=name, datatype=datatype, shape=list(array.shape), data=array)
                for (name, datatype), array in zip(described, outputs, strict=True)
            ],
        )


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
        extra = {
            "graph": graph,
            "verify": verify,
            "threads": threads,
            "max_batch_size": max_batch_size,
            "max_batch_time_ms": max_batch_time_ms,
        }
        settings.append(
            ModelSettings(
                name=f"{name}_{graph}",
                implementation=ExportGraphModel,
                platform="onnxruntime",
                inputs=[MetadataTensor(name=input_name, datatype=datatype, shape=shapes[input_name])],
                outputs=[
                    MetadataTensor(name=n, datatype=t, shape=out_shapes.get(n, shapes.get(n, [-1]))) for n, t in outputs
                ],
                max_batch_size=1,  # MLServer's batcher off: ExportGraphModel batches checked arrays itself
                parameters=ModelParameters(uri=source, extra=extra),
            )
        )
    return settings
