"""Write a (pruned) model as an open_clip `local-dir` folder: `open_clip_config.json` + safetensors.
The tokenizer settings travel inside `model_cfg.text_cfg` and preprocessing in `preprocess_cfg`.

Soft-pruned models are standard open_clip checkpoints. Hard-pruned ones carry their layout at the top
level of the JSON ("surgeon") and in the safetensors header; `model_cfg` stays untouched so open_clip's
own loader never sees unknown keys."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from surgeon import __version__
from surgeon.model.load import LoadedModel


def write_local_dir(
    loaded: LoadedModel, folder: Path, record: dict | None = None, metadata: dict[str, str] | None = None
) -> None:
    """Write into an existing (temporary) folder; the caller renames it into place."""
    pcfg = dict(loaded.preprocess_cfg)
    pcfg["size"] = list(pcfg["size"]) if not isinstance(pcfg["size"], int) else pcfg["size"]
    config = {"model_cfg": loaded.model_cfg, "preprocess_cfg": pcfg}
    if record and record.get("heads_kept"):
        config["surgeon"] = {"version": __version__, **record}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    header = {"format": "pt", "surgeon_version": __version__, **(metadata or {})}
    if record:
        header["surgeon_record"] = json.dumps(record)
    tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    try:
        save_file(_unshare(tensors), str(folder / "open_clip_model.safetensors"), metadata=header)
    except SafetensorError as err:  # safetensors reports a full disk as its own error: make it a storage error
        raise OSError(str(err)) from None


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out
