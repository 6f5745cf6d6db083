"""Stage 8: export a pruned model (a registry of formats), each with provenance metadata."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip

from surgeon import __version__
from surgeon.checkpoint import write_local_dir
from surgeon.errors import InvalidInput
from surgeon.load import LoadedModel
from surgeon.registry import Registry

EXPORTERS: Registry = Registry("export format")


def provenance(loaded: LoadedModel, plan: dict, validation: dict) -> dict[str, str]:
    """The keys every artifact carries (ONNX metadata_props, safetensors header): strings only."""
    heads_per_layer: dict[str, list[int]] = {}
    for h in plan["heads"]:
        heads_per_layer.setdefault(str(h["layer"]), []).append(h["index"])
    return {
        "surgeon_version": __version__,
        "open_clip_version": open_clip.__version__,
        "base_model": plan["base_model"]["name"]
        + (f"/{plan['base_model']['pretrained']}" if plan["base_model"].get("pretrained") else ""),
        "base_weights_sha256": plan["base_model"]["weights_sha256"],
        "pruned_weights_sha256": loaded.weights_hash,
        "ranking_sha256": plan["ranking_sha256"],
        "plan": json.dumps(
            {
                "policy": plan["policy"],
                "mode": plan["mode"],
                "tower": plan["tower"],
                "seed": plan["seed"],
                "pruned_heads_per_layer": heads_per_layer,
            }
        ),
        "validation": json.dumps(validation.get("after", {}).get("summary", {})),
        "preprocess": json.dumps(loaded.preprocess_cfg),
    }


@EXPORTERS.register("safetensors")
def export_safetensors(loaded: LoadedModel, plan: dict, validation: dict, folder: Path, **_options) -> list[Path]:
    target = folder / "model"
    target.mkdir()
    write_local_dir(loaded, target, plan["record"], provenance(loaded, plan, validation))
    return [target / "open_clip_config.json", target / "open_clip_model.safetensors"]


def export_run(
    loaded: LoadedModel, plan: dict, validation: dict, folder: Path, formats: list[str], **options
) -> list[Path]:
    """Write every requested format into `folder` (a temporary run folder renamed by the caller)."""
    if not formats:
        raise InvalidInput("no export format given")
    from surgeon.load import weights_hash

    loaded.weights_hash = weights_hash(loaded.model)
    files: list[Path] = []
    for name in formats:
        files += EXPORTERS.get(name)(loaded, plan, validation, folder, **options)
    return files
