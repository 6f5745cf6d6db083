"""int8 ONNX exports (`surgeon export --quantize int8`): onnxruntime's dynamic quantization of the image graphs,
kept only when the zero-shot accuracy it costs, measured on the run's validation suite with onnxruntime
before and after, stays within a gate.

Dynamic quantization (int8 weights, activations quantized per batch at run time) needs no calibration data and
is onnxruntime's own, maintained implementation (onnxruntime.quantization). visual.onnx and classifier.onnx
are quantized; text.onnx stays fp32 (class embeddings are computed once per label set, so int8 buys nothing
there and would move every class). The record goes to onnx/quantization.json, report.md and the card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from surgeon.core.errors import GateFailed, InvalidInput
from surgeon.core.paths import read_json_object

#: the gate: mean zero-shot top-1 may fall at most this many points (int8 vs the fp32 export)
DEFAULT_MAX_ACCURACY_DROP = 1.0
QUANTIZED = ("visual.onnx", "classifier.onnx")
RECORD = "quantization.json"
SCHEMES = ("int8",)


def check_scheme(scheme: str | None) -> None:
    """An unknown scheme (int4) is refused before anything loads: the check costs nothing, the export minutes."""
    if scheme is not None and scheme not in SCHEMES:
        raise InvalidInput(f"unknown quantization {scheme[:40]!r}", hint=f"choose {', '.join(SCHEMES)}")


def onnx_mean_accuracy(onnx_dir: Path, suite) -> float:
    """Mean zero-shot top-1 over the suite's classification tasks, with the export's own onnxruntime graphs."""
    import numpy as np  # here, not at the top: the CLI imports this module (its default gate) at start-up
    from PIL import Image

    from surgeon.runtime.session import ExportedModel

    served = ExportedModel(onnx_dir, providers=["CPUExecutionProvider"], verify=False, writing=True)
    accuracies, embedded = [], {}
    for task in suite.tasks:
        if id(task.images) not in embedded:  # the toy tasks share one image set
            images = [Image.fromarray(x) if isinstance(x, np.ndarray) else x for x in task.images]
            embedded[id(task.images)] = served.encode_images(images, batch_size=64)
        classes = served.class_embeddings(task.classnames, task.templates)
        predicted = (embedded[id(task.images)] @ classes.T).argmax(axis=1)
        accuracies.append(float((predicted == np.asarray(task.labels)).mean()))
    return float(np.mean(accuracies))


class _DropPreprocessingAdvice(logging.Filter):
    """onnxruntime logs advice to pre-process the graph through the root logger on every call, which reaches
    the user's terminal as `WARNING:root:...`; the accuracy gate is what decides whether int8 is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _quantize_graph(path: Path) -> None:
    """Replace an ONNX file by its int8 version (weights inside the file: no external data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    advice = _DropPreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().removeFilter(advice)
    tmp.replace(path)


def quantize_export(onnx_dir: Path, suite, scheme: str = "int8", max_drop: float | None = None) -> dict:
    """Quantize the export in `onnx_dir` in place (a temporary folder the caller publishes atomically) and
    write its record; GateFailed when mean top-1 falls more than `max_drop` points (the caller then keeps
    nothing). The fp32 weights shared through visual.onnx.data are dropped once no graph refers to them."""
    from surgeon.results.runfolder import SHARED_WEIGHTS

    check_scheme(scheme)
    max_drop = DEFAULT_MAX_ACCURACY_DROP if max_drop is None else max_drop
    suite.require_accuracy("--quantize")
    before = onnx_mean_accuracy(onnx_dir, suite)
    graphs = [name for name in QUANTIZED if (onnx_dir / name).is_file()]
    for name in graphs:
        _quantize_graph(onnx_dir / name)
    shared = onnx_dir / SHARED_WEIGHTS
    if shared.is_file() and not any(shared.name.encode() in (onnx_dir / g).read_bytes() for g in graphs):
        shared.unlink()
    after = onnx_mean_accuracy(onnx_dir, suite)
    drop = 100 * (before - after)
    record = {
        "scheme": scheme,
        "method": "onnxruntime.quantization.quantize_dynamic, weight_type QInt8",
        "graphs": graphs,
        "suite": suite.description,
        "mean_acc1_fp32": before,
        "mean_acc1_int8": after,
        "drop_points": drop,
        "max_drop_points": max_drop,
    }
    if drop > max_drop:
        raise GateFailed(
            f"--quantize {scheme}: mean zero-shot top-1 fell {drop:.2f} points ({100 * before:.2f} -> "
            f"{100 * after:.2f}), more than --max-accuracy-drop {max_drop:g}: nothing was written",
            hint="raise --max-accuracy-drop, or export without --quantize",
        )
    (onnx_dir / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def quantization_lines(folder: Path) -> list[str]:
    """Markdown lines about the int8 graphs (empty for an fp32 export): for report.md and the card."""
    path = folder / "onnx" / RECORD
    if not path.is_file():
        return []
    r = read_json_object(path, "quantization record")
    return [
        f"{', '.join(r['graphs'])} are int8 ({r['method']}); text.onnx stays fp32. Mean zero-shot top-1 on "
        f"{r['suite']}, onnxruntime: fp32 {100 * r['mean_acc1_fp32']:.2f}, int8 {100 * r['mean_acc1_int8']:.2f} "
        f"({-r['drop_points']:+.2f} points; gate: at most {r['max_drop_points']:g} points lower).",
    ]
