"""Stage 8: export a pruned model (a registry of formats), each with provenance metadata."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import open_clip
import torch

from surgeon import __version__
from surgeon.core.cache import human
from surgeon.core.errors import ExportFailed, InvalidInput
from surgeon.core.integrity import sha256_file, verify_run, write_manifest
from surgeon.core.registry import Registry
from surgeon.exporting.quantize import quantization_lines
from surgeon.inputs.templates import read_labels
from surgeon.model.checkpoint import write_local_dir
from surgeon.model.hooks import encode_image, encode_text
from surgeon.model.load import LoadedModel
from surgeon.results.records import Plan, check_validation_report
from surgeon.results.runfolder import PARITY_FILE, SHARED_WEIGHTS, parity_lines
from surgeon.validation.datarecord import DATA_RECORD

if TYPE_CHECKING:
    from surgeon.validation.validate import ValidationSuite

EXPORTERS: Registry = Registry("export format")

#: the export's tokenizer settings (surgeon's own format: not a Hugging Face tokenizers file, hence the name)
TOKENIZER_SPEC = "clip_tokenizer.json"  # surgeon.runtime.session.TOKENIZER_SPECS[0]
#: ONNX exporters: torch.export-based (the default) and the TorchScript-based one torch deprecates
ONNX_EXPORTERS = ("dynamo", "torchscript")


def check_exporter(exporter: str | None) -> str:
    """The exporter to use: the one named, else $SURGEON_ONNX_EXPORTER, else dynamo (for deployments that
    cannot pass an option, e.g. the gRPC service)."""
    exporter = exporter or os.environ.get("SURGEON_ONNX_EXPORTER") or ONNX_EXPORTERS[0]
    if exporter not in ONNX_EXPORTERS:
        raise InvalidInput(f"unknown ONNX exporter {exporter!r}", hint=f"one of {', '.join(ONNX_EXPORTERS)}")
    return exporter


def run_model_dir(run_dir: Path) -> Path:
    """Where a run folder keeps its open_clip weights: next to README.md (the Hub layout), or in model/ (runs
    written before the Hub layout)."""
    return run_dir if (run_dir / "open_clip_config.json").is_file() else run_dir / "model"


def provenance(loaded: LoadedModel, plan: Plan, validation: dict) -> dict[str, str]:
    """The keys every artifact carries (ONNX metadata_props, safetensors header): strings only."""
    return {
        "surgeon_version": __version__,
        "open_clip_version": open_clip.__version__,
        "base_model": plan.base_identity,
        "base_weights_sha256": plan.base_model["weights_sha256"],
        "pruned_weights_sha256": loaded.weights_hash,
        "ranking_sha256": plan.ranking_sha256 or "none (the policy reads no ranking)",
        "plan": json.dumps(
            {
                "policy": plan.policy,
                "mode": plan.mode,
                "tower": plan.tower,
                "seed": plan.seed,
                "pruned_heads_per_layer": plan.heads_per_layer(),
            }
        ),
        "validation": json.dumps(validation.get("after", {}).get("summary", {})),
        "preprocess": json.dumps(loaded.preprocess_cfg),
    }


@EXPORTERS.register("safetensors")
def export_safetensors(loaded: LoadedModel, plan: Plan, validation: dict, folder: Path, **_options) -> list[Path]:
    """open_clip_config.json + open_clip_model.safetensors next to README.md: the run folder is a Hub repo that
    open_clip loads as `hf-hub:USER/REPO` (and `local-dir:RUN` here)."""
    write_local_dir(loaded, folder, plan.record, provenance(loaded, plan, validation))
    return [folder / "open_clip_config.json", folder / "open_clip_model.safetensors"]


class _Visual(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return encode_image(self.model, pixel_values, normalize=True)


class _Text(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return encode_text(self.model, input_ids, normalize=True)


class _Classifier(torch.nn.Module):
    """pixels -> 100 * cosine similarity to baked zero-shot class embeddings (docs/METHOD.md §4)."""

    class_embeddings: torch.Tensor

    def __init__(self, model: torch.nn.Module, class_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings.float().T.contiguous())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return 100.0 * encode_image(self.model, pixel_values, normalize=True) @ self.class_embeddings


@dataclass(frozen=True)
class OnnxGraph:
    """One ONNX artifact: how to build it, its I/O names and how to make fresh inputs for validation."""

    filename: str
    module: torch.nn.Module
    input_name: str
    output_name: str
    make_input: Callable[[int], torch.Tensor]
    doc: str  # the graph's doc_string: what goes in and out


def _graphs(loaded: LoadedModel, labels: list[str] | None) -> list[OnnxGraph]:
    model = loaded.model.eval()
    size = (
        tuple(loaded.preprocess_cfg["size"])
        if not isinstance(loaded.preprocess_cfg["size"], int)
        else ((loaded.preprocess_cfg["size"],) * 2)
    )
    device = loaded.device
    gen = torch.Generator().manual_seed(1234)

    def pixels(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, *size, generator=gen).to(device)

    words = ["a photo of a dog", "red", "a small striped star on the left", "the city of Paris at night"]

    def tokens(batch: int) -> torch.Tensor:
        return loaded.tokenizer([words[(i + batch) % len(words)] * (1 + i % 2) for i in range(batch)]).to(device)

    image = f"pixel_values float32 [batch, 3, {size[0]}, {size[1]}] preprocessed as preprocess.json"
    embeds = f"float32 [batch, {loaded.embed_dim}], L2-normalised"
    context = loaded.model_cfg["text_cfg"].get("context_length", 77)
    visual_doc = f"{loaded.identity} image tower: {image} -> image_embeds {embeds}"
    text_doc = (
        f"{loaded.identity} text tower: input_ids int64 [batch, {context}] ({TOKENIZER_SPEC}) -> text_embeds {embeds}"
    )
    graphs = [
        OnnxGraph("visual.onnx", _Visual(model), "pixel_values", "image_embeds", pixels, visual_doc),
        OnnxGraph("text.onnx", _Text(model), "input_ids", "text_embeds", tokens, text_doc),
    ]
    if labels:
        from surgeon.inputs.templates import DEFAULT_TEMPLATES
        from surgeon.validation.zeroshot import build_classifier

        classes = build_classifier(model, loaded.tokenizer, labels, DEFAULT_TEMPLATES, device)
        doc = f"{loaded.identity} zero-shot classifier: {image} -> logits float32 [batch, {len(labels)}] = 100 * cosine"
        graphs.append(OnnxGraph("classifier.onnx", _Classifier(model, classes), "pixel_values", "logits", pixels, doc))
    return graphs


#: above this many bytes of weights a graph keeps them in an external-data file (protobuf's 2 GB limit)
EXTERNAL_DATA_BYTES = 1_800_000_000


#: torch.onnx.export keeps global state (and the dynamo exporter prints through the process's stdout): one
#: export at a time per process, so concurrent jobs of the gRPC service cannot interleave
_EXPORT_LOCK = threading.Lock()


def _export_graph(graph: OnnxGraph, path: Path, opset: int, exporter: str) -> None:
    """dynamo: torch.export-based, a named `batch` dimension and static feature dims; torchscript: the exporter
    torch deprecates, kept as a fallback."""
    graph.module.eval()
    if exporter == "dynamo":
        weights = sum(t.numel() * t.element_size() for t in graph.module.state_dict().values())
        shapes = {
            "dynamo": True,
            "dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},),
            "external_data": weights > EXTERNAL_DATA_BYTES,
            "verbose": False,
        }
    else:
        shapes = {"dynamo": False, "dynamic_axes": {graph.input_name: {0: "batch"}, graph.output_name: {0: "batch"}}}
    with _EXPORT_LOCK, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # progress lines
        # dynamo's warnings are noise; the TorchScript exporter's one about the text tower's end-of-text gather
        # (never negative indices) too. check_onnx compares every graph's output with PyTorch anyway.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.module,
            (graph.make_input(2),),
            str(path),
            input_names=[graph.input_name],
            output_names=[graph.output_name],
            opset_version=opset,
            **shapes,
        )


def _name_dims(proto, graph: OnnxGraph, width: int) -> None:
    """Name the batch dimension `batch` and fix the output width (the TorchScript exporter leaves a symbolic
    'Divimage_embeds_dim_1'), so serving configs can read every shape from the file."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    out_dims[1].dim_value = width


def check_onnx(graph: OnnxGraph, path: Path, atol: float) -> float:
    """Compare the ONNX file with the PyTorch module on fresh inputs (another batch size than at export);
    returns the max abs difference or raises ExportFailed."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [graph.input_name] or [o.name for o in outputs] != [graph.output_name]:
        raise ExportFailed(
            f"{path.name}: unexpected I/O names {[i.name for i in inputs]} -> {[o.name for o in outputs]}"
        )
    fresh = graph.make_input(3)
    with torch.no_grad():
        expected = graph.module(fresh).float().cpu().numpy()
    got = session.run(None, {graph.input_name: fresh.cpu().numpy()})[0]
    if got.shape != expected.shape:
        raise ExportFailed(f"{path.name}: output shape {got.shape}, PyTorch gives {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not diff <= atol:
        raise ExportFailed(
            f"{path.name}: max abs difference {diff:.3g} exceeds the tolerance {atol:g}",
            hint="investigate the graph, or loosen --atol if the difference is acceptable",
        )
    return diff


@EXPORTERS.register("onnx")
def export_onnx(
    loaded: LoadedModel,
    plan: Plan,
    validation: dict,
    folder: Path,
    labels: Path | None = None,
    atol: float = 1e-4,
    opset: int = 18,
    exporter: str | None = None,
    **_options,
) -> list[Path]:
    """visual.onnx, text.onnx (and classifier.onnx with labels), each validated against PyTorch and
    stamped with provenance and a doc_string, plus the preprocessing and tokenizer files a torch-free
    runtime needs."""
    import onnx

    if opset < 18:
        raise InvalidInput("ONNX export needs opset >= 18")
    exporter = check_exporter(exporter)
    label_list = read_labels(labels) if labels else None
    target = folder / "onnx"
    target.mkdir()
    files = []
    meta = provenance(loaded, plan, validation)
    parity: dict[str, float] = {}
    graphs = _graphs(loaded, label_list)
    for graph in graphs:
        path = target / graph.filename
        _export_graph(graph, path, opset, exporter)
        diff = parity[graph.filename] = check_onnx(graph, path, atol)
        # weights over 2 GB stay in torch's external-data files: loading them into one protobuf would fail
        proto = onnx.load(str(path), load_external_data=False)
        extra = {
            "export_atol": str(atol),
            "export_max_abs_diff": f"{diff:.3e}",
            "artifact": graph.filename,
            "exporter": exporter,
        }
        if graph.filename == "classifier.onnx":
            extra["labels"] = json.dumps(label_list)
        onnx.helper.set_model_props(proto, {**meta, **extra})
        _name_dims(
            proto, graph, len(label_list) if label_list and graph.filename == "classifier.onnx" else loaded.embed_dim
        )
        proto.doc_string = graph.doc
        proto.producer_name, proto.producer_version = "surgeon", __version__
        onnx.save(proto, str(path))
        files.append(path)
    if label_list:
        _share_visual_weights(target, next(g for g in graphs if g.filename == "classifier.onnx"), atol)
    files += sorted(p for p in target.iterdir() if p not in files)  # external-data files, if any
    (target / PARITY_FILE).write_text(json.dumps({"atol": atol, "max_abs_diff": parity}, indent=2), encoding="utf-8")
    files.append(target / PARITY_FILE)
    pcfg = dict(loaded.preprocess_cfg)
    (target / "preprocess.json").write_text(json.dumps(pcfg, indent=2), encoding="utf-8")
    files.append(target / "preprocess.json")
    files += _tokenizer_files(loaded, target)
    if label_list:
        (target / "labels.txt").write_text("\n".join(label_list) + "\n", encoding="utf-8")
        files.append(target / "labels.txt")
    return files


def _share_visual_weights(target: Path, classifier: OnnxGraph, atol: float) -> None:
    """classifier.onnx repeats the whole visual tower (351 MB for ViT-B-32): move visual.onnx's weights into
    an external-data file and point classifier.onnx's identical initializers at the same bytes, so the
    classifier stays one self-standing call but adds only its class embeddings. Checked again afterwards."""
    import onnx
    from onnx import numpy_helper

    visual_path, classifier_path = target / "visual.onnx", target / "classifier.onnx"
    visual = onnx.load(str(visual_path))  # with its external data, if torch already wrote some (> 2 GB)
    if not any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(str(visual_path), load_external_data=False).graph.initializer
    ):
        onnx.save(visual, str(visual_path), save_as_external_data=True, location=SHARED_WEIGHTS, size_threshold=1024)
        visual = onnx.load(str(visual_path))
    located = onnx.load(str(visual_path), load_external_data=False)
    where = {}
    for loaded_tensor, ref in zip(visual.graph.initializer, located.graph.initializer, strict=True):
        if ref.data_location == onnx.TensorProto.EXTERNAL:
            array = numpy_helper.to_array(loaded_tensor)
            where[(array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest())] = ref.external_data
    model = onnx.load(str(classifier_path))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        ref = where.get((array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()))
        if ref is not None:
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            tensor.external_data.extend(ref)
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(classifier_path))
    check_onnx(classifier, classifier_path, atol)


def _tokenizer_files(loaded: LoadedModel, target: Path) -> list[Path]:
    """open_clip's BPE vocabulary and settings, so serving needs no open_clip (other tokenizers: skipped)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    if not isinstance(loaded.tokenizer, SimpleTokenizer):
        return []
    vocab = Path(default_bpe())
    shutil.copy(vocab, target / vocab.name)
    spec = {"type": "clip-bpe", "context_length": loaded.tokenizer.context_length, "vocab_file": vocab.name}
    (target / TOKENIZER_SPEC).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return [target / TOKENIZER_SPEC, target / vocab.name]


def size_estimate(loaded: LoadedModel, formats: list[str], n_labels: int = 0, quantize: str | None = None) -> dict:
    """Bytes each large file of an export will take, from parameter counts: the checkpoint at the model's
    dtypes; ONNX graphs in float32 (visual: the image tower; text: the rest), int8 image graphs at one byte a
    weight (each then holds its own copy); an fp32 classifier.onnx shares visual.onnx's weights."""
    from surgeon.model.hooks import vision_tower

    weights = loaded.model.state_dict().values()
    files = {}
    if "safetensors" in formats:
        files["open_clip_model.safetensors"] = sum(t.numel() * t.element_size() for t in weights)
    if "onnx" in formats:
        visual = sum(t.numel() for t in vision_tower(loaded.model).state_dict().values())
        image_bytes = visual if quantize else 4 * visual
        files["onnx/visual.onnx"] = image_bytes
        files["onnx/text.onnx"] = 4 * (sum(t.numel() for t in weights) - visual)
        if n_labels:
            files["onnx/classifier.onnx"] = 4 * n_labels * loaded.embed_dim + (image_bytes if quantize else 0)
    return files


def announce_size(estimate: dict[str, int], folder: Path, leaner: str) -> None:
    """Say what an export with ONNX and the checkpoint will write, and the leaner choice, before writing;
    refuse (StorageError, nothing written) when the file system has not that much free."""
    from surgeon.core.errors import StorageError
    from surgeon.core.progress import stage

    total = sum(estimate.values())
    parts = ", ".join(f"{name} {human(size)}" for name, size in estimate.items())
    stage(f"exporting about {human(total)}")
    free = shutil.disk_usage(folder).free
    if total > free:
        raise StorageError(
            f"the export needs about {human(total)} ({parts}) but {folder.parent} has {human(free)} free",
            hint=leaner,
        )
    if "open_clip_model.safetensors" in estimate and "onnx/visual.onnx" in estimate:
        warnings.warn(f"the export writes about {human(total)} ({parts}); {leaner}", stacklevel=3)


def export_run(
    loaded: LoadedModel,
    plan: Plan,
    validation: dict,
    folder: Path,
    formats: list[str],
    leaner: str | None = None,
    **options,
) -> list[Path]:
    """Write every requested format into `folder` (a temporary run folder renamed by the caller). `leaner`:
    what a user could write instead, said with the size before writing (default: prune's choice)."""
    if not formats:
        raise InvalidInput("no export format given")
    exporters = [EXPORTERS.get(name) for name in dict.fromkeys(formats)]  # unknown formats fail before any work
    labels = options.get("labels")
    estimate = size_estimate(loaded, formats, len(read_labels(labels)) if labels else 0, options.get("quantize"))
    if leaner is None:
        checkpoint = human(estimate.get("open_clip_model.safetensors", 0))
        leaner = (
            f"the checkpoint alone is {checkpoint}: `--export safetensors` now, `surgeon export RUN --format onnx` "
            "when you deploy"
        )
    announce_size(estimate, folder, leaner)
    files: list[Path] = []
    for exporter in exporters:
        files += exporter(loaded, plan, validation, folder, **options)
    if options.get("quantize"):  # after the fp32 parity check, before the card and the hashes
        from surgeon.exporting.quantize import RECORD, quantize_export

        record = quantize_export(
            folder / "onnx", options["suite"], options["quantize"], options.get("max_accuracy_drop")
        )
        measure_quantized_parity(loaded, folder / "onnx", options.get("labels"), record["graphs"], record["scheme"])
        files = [p for p in files if p.exists()] + [folder / "onnx" / RECORD]
    if (folder / "onnx").is_dir():  # last in the folder: its own hashes, so that it can be served alone
        files.append(write_manifest(folder / "onnx"))
    sections = {"ONNX parity": parity_lines(folder), "int8 quantization": quantization_lines(folder)}
    if (folder / "report.md").is_file():  # before surgery.json hashes the report
        with open(folder / "report.md", "a", encoding="utf-8") as report:
            for title, lines in sections.items():
                if lines:
                    report.write(f"\n## {title}\n\n" + "\n".join(lines) + "\n")
    write_card(loaded, plan, validation, folder, files)
    return files


def measure_quantized_parity(
    loaded: LoadedModel, onnx_dir: Path, labels: Path | None, quantized: list[str], scheme: str
) -> dict:
    """Measure the quantized graphs against PyTorch as the fp32 ones were (fresh inputs), and record what was
    measured: parity.json and each graph's metadata then state the int8 difference, not the fp32 one. No
    tolerance applies to them (quantization moves every output): the accuracy gate decides."""
    import onnx

    from surgeon.core.paths import read_json_object

    path = onnx_dir / PARITY_FILE
    parity = read_json_object(path, "ONNX parity record")
    graphs = {g.filename: g for g in _graphs(loaded, read_labels(labels) if labels else None)}
    fp32 = dict(parity["max_abs_diff"])
    precision = {name: scheme if name in quantized else "fp32" for name in fp32}
    for name in quantized:
        diff = parity["max_abs_diff"][name] = check_onnx(graphs[name], onnx_dir / name, float("inf"))
        proto = onnx.load(str(onnx_dir / name), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        onnx.helper.set_model_props(
            proto,
            {
                **props,
                "export_max_abs_diff": f"{diff:.3e}",
                "fp32_max_abs_diff": props.get("export_max_abs_diff", ""),
                "quantization": scheme,
            },
        )
        onnx.save(proto, str(onnx_dir / name))
    parity.update(precision=precision, fp32_max_abs_diff=fp32)
    path.write_text(json.dumps(parity, indent=2), encoding="utf-8")
    return parity


def write_card(loaded: LoadedModel, plan: Plan, validation: dict, folder: Path, files: list[Path]) -> None:
    """README.md (Hugging Face model card) and surgery.json (same facts, machine-readable, with hashes)."""
    from surgeon.exporting.card import model_card

    (folder / "README.md").write_text(model_card(loaded, plan, validation, folder), encoding="utf-8")
    hashes = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "surgery.json"
    }
    surgery = {
        "schema": "surgeon.model.surgery/1",
        "provenance": provenance(loaded, plan, validation),
        "plan": plan.to_dict(),
        "validation": {k: validation[k]["summary"] for k in ("before", "after") if k in validation},
        "artifacts": [str(p.relative_to(folder)) for p in files],
        "sha256": hashes,
    }
    (folder / "surgery.json").write_text(json.dumps(surgery, indent=2), encoding="utf-8")


def export_existing_run(
    run_dir: Path,
    formats: list[str],
    out_dir: Path,
    force: bool = False,
    device: str | None = None,
    verify: bool = True,
    measure_on: ValidationSuite | None = None,
    **options,
) -> list[Path]:
    """Re-export the pruned checkpoint of a `surgeon prune` run folder (e.g. to ONNX, with new labels), after
    checking its files against the hashes of its surgery.json (unless `verify` is False). `--quantize`
    measures accuracy on `measure_on` when given, else on the data the run recorded (validation_data.json)."""
    from surgeon.core.errors import NotFound, PreconditionFailed
    from surgeon.core.paths import atomic_dir, read_json, read_json_object, refuse_temporary
    from surgeon.exporting.quantize import check_scheme
    from surgeon.model.load import load_model

    refuse_temporary(run_dir, "run folder")
    check_exporter(options.get("exporter"))
    check_scheme(options.get("quantize"))
    if not run_dir.is_dir():
        raise NotFound(f"run folder not found: {run_dir}")
    model_dir = run_model_dir(run_dir)
    missing = [n for n in ("plan.json", "validation.json") if not (run_dir / n).is_file()]
    missing += [] if (model_dir / "open_clip_config.json").is_file() else ["open_clip_config.json"]
    if missing:
        raise PreconditionFailed(
            f"{run_dir} is not a complete surgeon run folder (missing {', '.join(missing)})",
            hint="export a folder written by `surgeon prune` whose export was not skipped",
        )
    plan = Plan.from_dict(read_json(run_dir / "plan.json", "plan"), f"{run_dir}/plan.json")
    validation = read_json_object(run_dir / "validation.json", "validation report")
    check_validation_report(validation, f"{run_dir}/validation.json")
    for name in dict.fromkeys(formats):
        EXPORTERS.get(name)  # unknown formats fail before the model is loaded
    if options.get("quantize") and "onnx" not in formats:
        raise InvalidInput("--quantize needs the ONNX format (--format onnx or both)")
    if measure_on is not None and not options.get("quantize"):
        raise InvalidInput("the validation options are read by --quantize only (it measures int8 on them)")
    if verify:  # before validation_data.json is read: its paths are trusted only once its hash is checked
        verify_run(run_dir)
    if options.get("quantize"):  # fails before the model is loaded: no data to measure on, or changed data
        options["suite"] = _quantization_suite(run_dir, plan.base_model["name"], measure_on)
    loaded = load_model(f"local-dir:{model_dir}", device=device)
    if "safetensors" in formats and "onnx" in formats:
        onnx_only = size_estimate(loaded, ["onnx"], quantize=options.get("quantize"))
        options["leaner"] = (
            f"`--format onnx` alone writes {human(sum(onnx_only.values()))} (the run keeps the checkpoint)"
        )
    with atomic_dir(out_dir, force=force) as tmp:
        for name in ("plan.json", "validation.json", DATA_RECORD):
            if (run_dir / name).is_file():  # runs made before validation_data.json have none
                shutil.copy(run_dir / name, tmp / name)
        files = export_run(loaded, plan, validation, tmp, formats, **options)
    return [out_dir / p.relative_to(tmp) for p in files]


def _quantization_suite(run_dir: Path, model: str, measure_on: ValidationSuite | None) -> ValidationSuite:
    """What int8 is measured on: the data named, else the data the run recorded (its hashes checked); the toy
    model's runs from before the record use the toy suite they were validated on."""
    from surgeon.core.fallback import is_toy_model
    from surgeon.validation.datarecord import recorded_suite
    from surgeon.validation.validate import build_suite

    if measure_on is not None:
        return measure_on
    if is_toy_model(model) and not (run_dir / DATA_RECORD).is_file():
        return build_suite(model=model)
    return recorded_suite(run_dir, model)
