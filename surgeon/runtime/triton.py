"""A Triton Inference Server model repository for an ONNX export (onnxruntime backend, dynamic batching), so
teams on Triton or KServe (whose Triton runtime reads the same layout) serve an export with no surgeon code.

    REPO/NAME_visual/config.pbtxt + 1/visual.onnx       pixel_values -> image_embeds
    REPO/NAME_text/config.pbtxt + 1/text.onnx           input_ids -> text_embeds (+ clip_tokenizer.json, the
                                                        BPE vocabulary and preprocess.json for clients)
    REPO/NAME_classifier/config.pbtxt + 1/classifier.onnx + labels.txt (Triton's classification extension)

Shapes and types come from the ONNX files themselves (read with onnxruntime, no torch); every dimension but
the leading batch must be fixed, which surgeon's exports guarantee."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from surgeon.core import limits
from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.core.paths import atomic_dir, read_json_object
from surgeon.runtime.session import _GRAPHS, TOKENIZER_SPECS, resolve_export_dir

#: onnxruntime element types -> Triton's model-config data types
TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64"}
#: files a client needs to build inputs, copied next to the text model's config
CLIENT_FILES = ("preprocess.json", *TOKENIZER_SPECS)


def _tensor(arg, batch: bool) -> str:
    """One input/output entry of config.pbtxt from an onnxruntime NodeArg."""
    shape = list(arg.shape)
    shape = shape[1:] if batch else [-1, *shape[1:]]  # without batching, -1: the batch dimension varies
    if not all(isinstance(d, int) and (d > 0 or (d == -1 and not batch and i == 0)) for i, d in enumerate(shape)):
        raise CorruptInput(
            f"{arg.name} has the shape {arg.shape}: Triton needs every dimension but the batch fixed",
            hint="re-export with this surgeon version (`surgeon export RUN`)",
        )
    if arg.type not in TRITON_TYPES:
        raise CorruptInput(f"{arg.name} has the type {arg.type}, which this writer does not map to Triton")
    dims = ", ".join(str(d) for d in shape)
    return f'name: "{arg.name}", data_type: {TRITON_TYPES[arg.type]}, dims: [ {dims} ]'


def model_config(name: str, filename: str, session, max_batch_size: int, queue_delay_us: int) -> str:
    """config.pbtxt text for one ONNX graph served by Triton's onnxruntime backend."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    batched = max_batch_size > 0
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(f"  {{ {_tensor(arg, batched)} }}" for arg in inputs),
        "]",
        "output [",
        ",\n".join(
            f"  {{ {_tensor(arg, batched)}"
            + (', label_filename: "labels.txt"' if filename == "classifier.onnx" else "")
            + " }"
            for arg in outputs
        ),
        "]",
        "instance_group [ { kind: KIND_AUTO, count: 1 } ]",
    ]
    if batched:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
    return "\n".join(lines) + "\n"


def model_prefix(export_dir: Path, name: str | None = None) -> str:
    """The models' name prefix (NAME_visual...): `name` if given, else the run folder's name, made URL-safe."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", name):
            raise InvalidInput(f"model name {limits.echo(name)!r}: use 1-200 letters, digits, '_', '.' or '-'")
        return name
    source = resolve_export_dir(Path(export_dir))
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", (source.parent if source.name == "onnx" else source).name)


def write_triton_repository(
    export_dir: Path,
    out: Path,
    name: str | None = None,
    max_batch_size: int = 32,
    queue_delay_us: int = 1000,
    force: bool = False,
) -> list[Path]:
    """Write the repository into `out` (all or nothing); returns the config.pbtxt files written."""
    from surgeon.runtime.session import ExportedModel

    if max_batch_size < 0:
        raise InvalidInput(f"--max-batch-size must be 0 (no batching) or more, got {max_batch_size}")
    if queue_delay_us < 0:
        raise InvalidInput(f"--queue-delay-us must be 0 or more, got {queue_delay_us}")
    source = resolve_export_dir(Path(export_dir))
    name = model_prefix(source, name)
    model = ExportedModel(source, providers=["CPUExecutionProvider"])
    graphs = [g for g, (filename, _, _) in _GRAPHS.items() if (source / filename).is_file()]
    configs = []
    with atomic_dir(Path(out), force=force) as tmp:
        for graph in graphs:
            filename = _GRAPHS[graph][0]
            folder = tmp / f"{name}_{graph}"
            (folder / "1").mkdir(parents=True)
            config = model_config(folder.name, filename, model.session(graph), max_batch_size, queue_delay_us)
            (folder / "config.pbtxt").write_text(config, encoding="utf-8")
            for path in [source / filename, *_external_data(source, filename)]:
                shutil.copy(path, folder / "1" / path.name)
            if graph == "classifier":
                (folder / "labels.txt").write_text("\n".join(model.classifier_labels()) + "\n", encoding="utf-8")
            if graph == "text":
                _copy_client_files(source, folder)
            configs.append(Path(out) / folder.name / "config.pbtxt")
    return configs


def _external_data(source: Path, filename: str) -> list[Path]:
    """The external-data files a graph reads: its own (`visual.onnx.data`) and shared ones (classifier.onnx reads
    the visual tower's weights from visual.onnx.data). Locations are plain strings in the ONNX protobuf, so a
    byte search finds them without the onnx package (the serving install has only onnxruntime)."""
    graph = (source / filename).read_bytes()
    return [p for p in sorted(source.glob("*.data")) if p.is_file() and p.name.encode() in graph]


def _copy_client_files(source: Path, folder: Path) -> None:
    """Preprocessing and tokenizer settings with the BPE vocabulary they name, so clients can build inputs
    from the repository alone."""
    for name in CLIENT_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
            if name in TOKENIZER_SPECS:
                vocab = Path(read_json_object(source / name, "tokenizer config").get("vocab_file") or "").name
                if vocab and (source / vocab).is_file():
                    shutil.copy(source / vocab, folder / vocab)
