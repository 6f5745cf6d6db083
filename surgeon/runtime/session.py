"""An ONNX export served with onnxruntime: image and text embeddings, zero-shot or baked classification.

Export folder (`onnx/` inside a run's export folder, or that folder itself):
  visual.onnx      pixel_values float32 [N, 3, H, W] -> image_embeds [N, D] (L2-normalised)
  text.onnx        input_ids int64 [N, L]            -> text_embeds [N, D]  (L2-normalised)
  classifier.onnx  pixel_values -> logits [N, C] = 100 * cosine to baked class embeddings (optional;
                   class names in its metadata_props["labels"] and in labels.txt)
  preprocess.json  open_clip's eval preprocessing settings
  clip_tokenizer.json  {"type": "clip-bpe", "context_length": L, "vocab_file": ...} + the vocabulary file
                   (tokenizer.json in exports written before the rename)
Sessions open lazily, on the CUDA execution provider when onnxruntime offers it, else on the CPU."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound
from surgeon.core.integrity import verify_export
from surgeon.core.paths import refuse_temporary
from surgeon.inputs.preprocess import PreprocessConfig, load_image, to_rgb
from surgeon.inputs.templates import DEFAULT_TEMPLATES, check_labels, check_templates, fill, read_labels
from surgeon.runtime.tokenizer import ClipTokenizer

#: the tokenizer settings file: its current name, then the one of older exports
TOKENIZER_SPECS = ("clip_tokenizer.json", "tokenizer.json")
_GRAPHS = {
    "visual": ("visual.onnx", "pixel_values", "image_embeds"),
    "text": ("text.onnx", "input_ids", "text_embeds"),
    "classifier": ("classifier.onnx", "pixel_values", "logits"),
}


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build offers it (onnxruntime-gpu), with the CPU as fallback."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        _preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _preload_cuda_libraries() -> None:
    """Serving never imports torch, so nothing has loaded the CUDA and cuDNN libraries that its pip wheels
    (nvidia-*) bring; onnxruntime-gpu >= 1.21 can load them itself. Best effort: if this fails, onnxruntime
    falls back to the CPU provider and says so in `active_providers`."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - a missing library is reported by the session, not here
            pass


def resolve_export_dir(path: Path) -> Path:
    """The folder holding visual.onnx: PATH/onnx (a surgeon export) or PATH itself."""
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"export folder not found: {path}")
    for candidate in (path / "onnx", path):
        if (candidate / "visual.onnx").is_file() or (candidate / "classifier.onnx").is_file():
            return candidate
    raise NotFound(
        f"{path} holds no ONNX export (no visual.onnx in it or in {path / 'onnx'})",
        hint="export a pruned model with `surgeon prune ... --export onnx`",
    )


#: an image file, or an image already in memory
ImageInput = Path | str | Image.Image


@dataclass(frozen=True)
class TopClass:
    label: str
    logit: float  # 100 * cosine similarity
    probability: float  # softmax over all classes


@dataclass(frozen=True)
class Prediction:
    image: str
    top: list[TopClass]

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "top": [{"label": t.label, "logit": t.logit, "probability": t.probability} for t in self.top],
        }


class ExportedModel:
    """A surgeon ONNX export, ready to embed and classify images with onnxruntime only."""

    def __init__(
        self,
        export_dir: Path | str,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        verify: bool = True,
        writing: bool = False,
        spinning: bool = True,
    ):
        """`verify`: check the files against the export's recorded sha256 hashes first (integrity.verify_export:
        its manifest.json, or the run's surgery.json); a folder with neither is refused unless `verify` is
        False (--no-verify). `writing`: the writer measuring its own unfinished output (surgeon.exporting.quantize),
        which everyone else is refused. `spinning`: onnxruntime's intra-op threads busy-wait between runs (its
        default, lowest latency for one caller); a server turns it off, since spinning threads take the cores its
        own request handling needs."""
        self.root = Path(export_dir)
        if not writing:
            refuse_temporary(self.root, "export")
        self.dir = resolve_export_dir(self.root)
        if verify:
            verify_export(self.dir, sorted(p for p in self.dir.iterdir() if p.is_file()))
        self.providers = list(providers) if providers else default_providers()
        self.threads = threads
        self.spinning = spinning
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._preprocess: PreprocessConfig | None = None
        self._tokenizer: ClipTokenizer | None = None
        self._class_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = {}

    # ---- lazily loaded parts -------------------------------------------------------------------------
    @property
    def preprocess(self) -> PreprocessConfig:
        if self._preprocess is None:
            self._preprocess = PreprocessConfig.from_file(self.dir / "preprocess.json")
        return self._preprocess

    @property
    def tokenizer(self) -> ClipTokenizer:
        if self._tokenizer is None:
            spec = next((self.dir / n for n in TOKENIZER_SPECS if (self.dir / n).is_file()), None)
            if spec is None:
                raise NotFound(
                    f"{self.dir} has no {TOKENIZER_SPECS[0]}, so it cannot encode text or --labels",
                    hint="use the export's classifier.onnx (no --labels) or re-export with open_clip's BPE tokenizer",
                )
            self._tokenizer = ClipTokenizer.from_spec(spec)
        return self._tokenizer

    @property
    def has_classifier(self) -> bool:
        return (self.dir / "classifier.onnx").is_file()

    def session(self, name: str) -> ort.InferenceSession:
        """The onnxruntime session of 'visual', 'text' or 'classifier', opened on first use and checked
        for the expected input and output names."""
        if name in self._sessions:
            return self._sessions[name]
        filename, input_name, output_name = _GRAPHS[name]
        path = self.dir / filename
        if not path.is_file():
            if name == "classifier":
                raise NotFound(
                    f"{self.dir} has no classifier.onnx, and no labels were given",
                    hint="pass --labels FILE (one class name per line), or export with --labels to bake a classifier",
                )
            raise NotFound(f"{filename} not found in {self.dir}")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as err:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise CorruptInput(f"cannot load {path} with onnxruntime: {err}") from None
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [input_name] or outputs != [output_name]:
            raise CorruptInput(f"{path}: expected {input_name} -> {output_name}, the graph has {inputs} -> {outputs}")
        self._sessions[name] = session
        return session

    @property
    def active_providers(self) -> list[str]:
        """The providers the opened sessions really run on (CUDA requested but unusable falls back to CPU)."""
        seen: list[str] = []
        for session in self._sessions.values():
            seen += [p for p in session.get_providers() if p not in seen]
        return seen

    # ---- embeddings -----------------------------------------------------------------------------------
    def _run(self, name: str, array: np.ndarray) -> np.ndarray:
        session = self.session(name)
        _, input_name, _ = _GRAPHS[name]
        try:
            return session.run(None, {input_name: array})[0]
        except Exception as err:
            raise CorruptInput(f"{name} graph failed on an input of shape {list(array.shape)}: {err}") from None

    def _image_batches(self, images: Sequence[ImageInput], batch_size: int):
        if batch_size < 1:
            raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            yield self.preprocess.batch([to_rgb(x) if isinstance(x, Image.Image) else load_image(x) for x in chunk])

    def encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> L2-normalised image embeddings [N, D]."""
        return self._run("visual", np.ascontiguousarray(pixel_values, dtype=np.float32))

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Image files -> L2-normalised embeddings float32 [N, D], batch_size images per run."""
        if not images:
            raise InvalidInput("no images given")
        return np.concatenate([self.encode_pixels(batch) for batch in self._image_batches(images, batch_size)])

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> L2-normalised embeddings float32 [N, D]."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInput("no texts given")
        if batch_size < 1:
            raise InvalidInput(f"batch size must be at least 1, got {batch_size}")
        out = []
        for start in range(0, len(texts), batch_size):
            out.append(self.encode_tokens(self.tokenizer(texts[start : start + batch_size])))
        return np.concatenate(out)

    def encode_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        """Token ids int64 [N, L] (the tokenizer's) -> L2-normalised text embeddings [N, D]."""
        return self._run("text", input_ids)

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """Zero-shot class embeddings [C, D]: per class, the normalised mean of its normalised template
        embeddings (as surgeon and open_clip build zero-shot classifiers)."""
        labels, templates = tuple(labels), tuple(templates)
        check_labels(labels)
        if not templates:
            raise InvalidInput("no prompt templates given")
        key = (labels, templates)
        if key not in self._class_cache:
            texts = [fill(t, c) for c in labels for t in check_templates(templates)]
            emb = self.encode_texts(texts).astype(np.float32)
            emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
            emb = emb.reshape(len(labels), len(templates), -1).mean(axis=1)
            self._class_cache[key] = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        return self._class_cache[key]

    # ---- classification -------------------------------------------------------------------------------
    def classifier_labels(self) -> list[str]:
        """Class names of classifier.onnx: its metadata_props['labels'], else labels.txt next to it."""
        meta = self.session("classifier").get_modelmeta().custom_metadata_map
        if "labels" in meta:
            try:
                labels = json.loads(meta["labels"])
            except json.JSONDecodeError as err:
                raise CorruptInput(f"classifier.onnx: metadata 'labels' is not JSON: {err}") from None
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise CorruptInput("classifier.onnx: metadata 'labels' is not a list of strings")
            return labels
        path = self.dir / "labels.txt"
        if not path.is_file():
            raise CorruptInput(f"classifier.onnx in {self.dir} has no 'labels' metadata and there is no labels.txt")
        return read_labels(path)

    def classifier_logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, 3, H, W] -> classifier.onnx's logits [N, C] (100 * cosine)."""
        return self._run("classifier", np.ascontiguousarray(pixel_values, dtype=np.float32))

    def logits(
        self, images: Sequence[ImageInput], labels: Sequence[str] | None = None, batch_size: int = 32
    ) -> tuple[np.ndarray, list[str]]:
        """(logits [N, C] = 100 * cosine, class names). With labels: zero-shot through text.onnx and the
        default templates; without: the export's classifier.onnx."""
        if not images:
            raise InvalidInput("no images given")
        if labels is not None:
            classes = self.class_embeddings(labels)
            out = [100.0 * (self.encode_pixels(b) @ classes.T) for b in self._image_batches(images, batch_size)]
            return np.concatenate(out).astype(np.float32), list(labels)
        names = self.classifier_labels()
        out = [self._run("classifier", b) for b in self._image_batches(images, batch_size)]
        logits = np.concatenate(out)
        if logits.shape[1] != len(names):
            raise CorruptInput(f"classifier.onnx gives {logits.shape[1]} logits but names {len(names)} classes")
        return logits, names

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str] | None = None,
        top_k: int = 5,
        batch_size: int = 32,
        image_names: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """The top_k classes of each image (fewer when there are fewer classes), best first. `image_names`
        label the predictions (default: the image paths)."""
        if top_k < 1:
            raise InvalidInput(f"top-k must be at least 1, got {top_k}")
        logits, names = self.logits(images, labels, batch_size)
        probs = softmax(logits.astype(np.float64))
        k = min(top_k, len(names))
        predictions = []
        shown = [str(image) for image in images] if image_names is None else list(image_names)
        for image, row, prob in zip(shown, logits, probs, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            top = [TopClass(names[i], float(row[i]), float(prob[i])) for i in order]
            predictions.append(Prediction(str(image), top))
        return predictions


def softmax(x: np.ndarray) -> np.ndarray:
    """Class probabilities from logits, along the last axis."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
