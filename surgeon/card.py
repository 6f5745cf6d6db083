"""The model card (README.md with Hugging Face front matter) of an exported pruned model."""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.load import LoadedModel


def _q(value: object) -> str:
    """A YAML scalar: JSON strings and numbers are valid YAML."""
    return json.dumps(value)


def _front_matter(plan: dict, validation: dict) -> list[str]:
    base = plan["base_model"]
    base_name = base["name"] + (f"/{base['pretrained']}" if base.get("pretrained") else "")
    run_name = f"{base_name} pruned ({plan['policy']}, {plan['mode']})"
    lines = [
        "---",
        "library_name: open_clip",
        f"base_model: {_q(base_name)}",
        "pipeline_tag: zero-shot-image-classification",
        "tags:",
        *[f"- {_q(t)}" for t in ("clip", "pruned", "attention-head-pruning", "surgeon", f"policy-{plan['policy']}")],
        "model-index:",
        f"- name: {_q(run_name)}",
        "  results:",
    ]
    for entry in validation.get("after", {}).get("results", []):
        metrics = entry["metrics"]
        if entry["task"] == "zeroshot_classification":
            task, pairs = (
                "zero-shot-image-classification",
                [("accuracy", "acc1"), ("accuracy", "acc5"), ("recall", "mean_per_class_recall")],
            )
        else:
            task = "bias-evaluation"
            pairs = [
                ("max_skew", k)
                for k in metrics
                if k.startswith(("max_skew@", "min_skew@")) and not k.endswith(("_per_query", "_sum"))
            ] + [("ndkl", "ndkl")]
        lines += [
            f"  - task: {{type: {task}}}",
            f"    dataset: {{name: {_q(entry['dataset'])}, type: {_q(entry['dataset'])}}}",
            "    metrics:",
        ]
        lines += [
            f"    - {{type: {kind}, name: {name}, value: {round(float(metrics[name]), 6)}}}" for kind, name in pairs
        ]
    lines.append("---")
    return lines


def model_card(loaded: LoadedModel, plan: dict, validation: dict, folder: Path) -> str:
    from surgeon.validate import markdown_report

    hard = bool(plan["record"].get("heads_kept"))
    has_onnx = (folder / "onnx" / "visual.onnx").exists()
    lines = _front_matter(plan, validation) + [
        "",
        f"# {plan['base_model']['name']} with {len(plan['heads'])} attention head(s) pruned",
        "",
        f"Made by surgeon {plan['surgeon_version']}: heads of the "
        f"{plan['tower']} tower were ranked by Concept Consistency Score (CCS) and pruned with the "
        f"`{plan['policy']}` policy in `{plan['mode']}` mode"
        + (" (heads physically removed)." if hard else " (weights zeroed or mean-folded; shapes unchanged).")
        + (f" MLP activation: {plan['base_model']['activation']}." if plan["base_model"].get("activation") else ""),
        "",
        "## What was pruned and why",
        "",
        "| head | concept label | CCS | reason |",
        "|---|---|---|---|",
        *[
            f"| {h['head']} | {h['label'] or '-'} | {'-' if h['ccs'] is None else h['ccs']} | {h['reason']} |"
            for h in plan["heads"]
        ],
        "",
        "## Validation before and after",
        "",
        markdown_report(validation["before"], validation["after"]),
        "## How to load",
        "",
        "```python",
    ]
    if hard:
        lines += [
            "import surgeon.load",
            "",
            "loaded = surgeon.load.load_model('local-dir:model')  # rebuilds the narrower attention",
            "model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer",
        ]
    else:
        lines += [
            "import open_clip",
            "",
            "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:model')",
            "tokenizer = open_clip.get_tokenizer('local-dir:model')",
        ]
    lines += ["```", ""]
    if has_onnx:
        from surgeon.export import parity_lines

        lines += [
            "ONNX parity, measured at export on fresh inputs:",
            "",
            *parity_lines(folder),
            "",
            "With onnxruntime only (no torch):",
            "",
            "```python",
            "import onnxruntime as ort",
            "",
            "visual = ort.InferenceSession('onnx/visual.onnx')  # pixel_values [batch, 3, H, W] -> image_embeds",
            "embeds = visual.run(None, {'pixel_values': pixels})[0]  # pixels preprocessed as onnx/preprocess.json",
            "```",
            "",
            "or `surgeon infer . IMAGE... --labels labels.txt`.",
            "",
        ]
    lines += [
        "## Limits",
        "",
        "- CCS labels come from an automatic judge over TextSpan descriptions; they describe, they do not prove.",
        "- Validation covers only the sets listed above; pruning can hurt other tasks more (the paper reports "
        "the largest drops on fine-grained and geographic sets when high-CCS heads go).",
        "- Lower skew on one bias set does not make the model fair elsewhere.",
        "",
    ]
    return "\n".join(lines)
