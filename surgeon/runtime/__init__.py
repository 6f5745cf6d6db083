"""Torch-free serving of an ONNX export: image loading and preprocessing (numpy + PIL), the CLIP BPE
tokenizer, onnxruntime sessions and the `surgeon infer` command.

Nothing in this package imports torch or open_clip: a serving stack needs numpy, pillow, ftfy, regex and
onnxruntime (or onnxruntime-gpu), plus typer and rich for the command. The names below are loaded on
first use, so importing one submodule (say the tokenizer) does not pull in onnxruntime."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipTokenizer": "surgeon.runtime.tokenizer",
    "PreprocessConfig": "surgeon.inputs.preprocess",
    "load_image": "surgeon.inputs.preprocess",
    "DEFAULT_TEMPLATES": "surgeon.inputs.templates",
    "ExportedModel": "surgeon.runtime.session",
    "Prediction": "surgeon.runtime.session",
    "TopClass": "surgeon.runtime.session",
    "read_labels": "surgeon.inputs.templates",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
