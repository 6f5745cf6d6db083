"""The model card (README.md with Hugging Face front matter) of an exported pruned model."""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.exporting.quantize import quantization_lines
from surgeon.model.load import LoadedModel
from surgeon.results.records import Plan
from surgeon.results.runfolder import heads_table, parity_lines, validation_note


def _q(value: object) -> str:
    """A YAML scalar: JSON strings and numbers are valid YAML."""
    return json.dumps(value)


#: the license of the bundled toy model and of everything surgeon writes for it: the project's
TOY_LICENSE = "mit"


def base_model_facts(base: dict) -> dict[str, str]:
    """The card's base_model (a Hub id, from open_clip's pretrained config) and license (the base model's:
    read from its card in the local Hub cache, else `other` linking to it; the toy's is the project's MIT).
    `base` is the plan's base_model record."""
    if base["name"] == "toy":
        return {"license": TOY_LICENSE}
    import open_clip

    from surgeon.model.load import HF_HUB_PREFIX, hub_repo

    pretrained = base.get("pretrained") or ""
    repo_id, _ = hub_repo(open_clip.get_pretrained_cfg(base["name"], pretrained) if pretrained else {})
    if base["name"].startswith(HF_HUB_PREFIX):  # a model loaded from the Hub by its repo id
        repo_id = base["name"].removeprefix(HF_HUB_PREFIX)
    if not repo_id:  # a local folder or checkpoint file: its license is not known here
        return {"license": "unknown"}
    license_id = _cached_card_license(repo_id)
    if license_id:
        return {"base_model": repo_id, "license": license_id}
    return {
        "base_model": repo_id,
        "license": "other",
        "license_name": "same-as-base-model",
        "license_link": f"https://huggingface.co/{repo_id}",
    }


def _cached_card_license(repo_id: str) -> str | None:
    """The `license:` of the base model's README.md front matter when the local Hub cache holds it."""
    from huggingface_hub import try_to_load_from_cache

    card = try_to_load_from_cache(repo_id, "README.md")
    if not isinstance(card, str):
        return None
    text = Path(card).read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


#: model-index task types of the retrieval results (Papers with Code's task names): one per direction measured
RETRIEVAL_CARD_TASKS = {
    "zeroshot_retrieval": (
        ("text-to-image-retrieval", "image_retrieval"),
        ("image-to-text-retrieval", "text_retrieval"),
    ),
    "zeroshot_video_retrieval": (("text-to-video-retrieval", "video_retrieval"),),
}


def _retrieval_index(entry: dict) -> list[str]:
    """model-index results of one retrieval set: a task type per direction, its recall@k as `recall` metrics
    and its median rank."""
    lines = []
    for task_type, prefix in RETRIEVAL_CARD_TASKS[entry["task"]]:
        figures = {k: v for k, v in entry["metrics"].items() if k.startswith(f"{prefix}_") and v is not None}
        lines += [
            f"  - task: {{type: {task_type}}}",
            f"    dataset: {{name: {_q(entry['dataset'])}, type: {_q(entry['dataset'])}}}",
            "    metrics:",
        ]
        lines += [
            f"    - {{type: {'recall' if '_recall@' in name else 'rank'}, name: {name}, value: {round(float(v), 6)}}}"
            for name, v in figures.items()
            if "_recall@" in name or name.endswith("_median_rank")
        ]
    return lines


def _front_matter(plan: Plan, validation: dict, has_onnx: bool) -> list[str]:
    """Hub metadata. library_name says what loads the weights: open_clip for zero/mean pruning; for hard
    pruning open_clip cannot (narrower attention), so it names the ONNX files when there are some, else none.
    Bias metrics have no Hub task type: they stay in the card body."""
    run_name = f"{plan.base_identity} pruned ({plan.policy}, {plan.mode})"
    library = "onnx" if plan.hard and has_onnx else None if plan.hard else "open_clip"
    tags = ["clip", "pruned", "attention-head-pruning", "surgeon", f"policy-{plan.policy}"]
    tags += ["onnx"] * has_onnx + ["toy"] * (plan.base_model["name"] == "toy")
    lines = ["---"]
    lines += [f"library_name: {library}"] if library else []
    lines += [f"{key}: {_q(value)}" for key, value in base_model_facts(plan.base_model).items()]
    lines += ["pipeline_tag: zero-shot-image-classification", "tags:", *[f"- {_q(t)}" for t in tags]]
    after = validation.get("after", {}).get("results", [])
    results = [e for e in after if e["task"] == "zeroshot_classification"]
    retrieval = [e for e in after if e["task"] in RETRIEVAL_CARD_TASKS]
    if results or retrieval:
        lines += ["model-index:", f"- name: {_q(run_name)}", "  results:"]
    for entry in results:
        metrics = entry["metrics"]
        lines += [
            "  - task: {type: zero-shot-image-classification}",
            f"    dataset: {{name: {_q(entry['dataset'])}, type: {_q(entry['dataset'])}}}",
            "    metrics:",
        ]
        lines += [
            f"    - {{type: {kind}, name: {name}, value: {round(float(metrics[name]), 6)}}}"
            for kind, name in (("accuracy", "acc1"), ("accuracy", "acc5"), ("recall", "mean_per_class_recall"))
        ]
    for entry in retrieval:
        lines += _retrieval_index(entry)
    lines.append("---")
    return lines


def selection_sentence(plan: Plan) -> str:
    """How the heads were chosen, as the plan records it: the policy's own description (its docstring's first
    line), and a CCS ranking only when the policy read one (`heads` and the paper's presets read none)."""
    from surgeon.selection.policies import POLICIES

    policy = POLICIES.get(plan.policy) if plan.policy in POLICIES else None
    described = policy.description.rstrip(".") if policy is not None else ""
    if policy is not None and policy.listed:
        described = f"listed by the user: {', '.join(h.head for h in plan.heads)}"
    sentence = f"{len(plan.heads)} head(s) of the {plan.tower} tower were chosen by the `{plan.policy}` policy"
    sentence += f" ({described[0].lower() + described[1:]})" if described else ""
    if plan.ranking_sha256 is None:
        return sentence + ", without a Concept Consistency Score (CCS) ranking"
    return sentence + f", reading a Concept Consistency Score (CCS) ranking (sha256 {plan.ranking_sha256[:12]}…)"


def _chance_section(plan: Plan, validation: dict) -> list[str]:
    """A selection by measurement (debias): how it stopped, and its held-out result next to random head sets of
    the same size on the same data."""
    from surgeon.selection.debias import chance_lines

    lines = [f"Search: {plan.policy_details['stopped']}.", ""] if "stopped" in plan.policy_details else []
    if "against_chance" in validation:
        lines += ["### Against chance", "", *chance_lines(validation["against_chance"]), ""]
    return lines


def model_card(loaded: LoadedModel, plan: Plan, validation: dict, folder: Path) -> str:
    from surgeon.validation.validate import markdown_report

    hard = plan.hard
    has_onnx = (folder / "onnx" / "visual.onnx").exists()
    activation = plan.base_model.get("activation")
    if activation and plan.base_model.get("activation_source"):  # e.g. "assumed: a checkpoint file does not record it"
        activation = f"{activation} ({plan.base_model['activation_source']})"
    lines = _front_matter(plan, validation, has_onnx) + [
        "",
        f"# {plan.base_model['name']} with {len(plan.heads)} attention head(s) pruned",
        "",
        f"Made by surgeon {plan.surgeon_version}: {selection_sentence(plan)}, pruned in `{plan.mode}` mode"
        + (" (heads physically removed)." if hard else " (weights zeroed or mean-folded; shapes unchanged).")
        + (f" MLP activation: {activation}." if activation else ""),
        "",
        "## What was pruned and why",
        "",
        *heads_table(plan),
        "",
        "## Validation before and after",
        "",
        validation_note(plan),
        "",
        markdown_report(validation["before"], validation["after"]),
        *_chance_section(plan, validation),
        "## How to load",
        "",
        "```python",
    ]
    if hard:
        lines += [
            "# the heads are physically removed: plain open_clip cannot build the narrower attention, surgeon can",
            "import surgeon.model.load  # pip install 'surgeon[surgery]'",
            "",
            "loaded = surgeon.model.load.load_model('hf-hub:USER/REPO')  # this folder pushed to the Hub as USER/REPO",
            "# or from a local copy: surgeon.model.load.load_model('local-dir:.'); the CLI: --model hf-hub:USER/REPO",
            "model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer",
        ]
    else:
        lines += [
            "import open_clip",
            "",
            "# this folder pushed to the Hub as USER/REPO; from a local copy use 'local-dir:PATH'",
            "model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:USER/REPO')",
            "tokenizer = open_clip.get_tokenizer('hf-hub:USER/REPO')",
        ]
    lines += ["```", ""]
    if has_onnx:
        lines += [
            "ONNX parity, measured at export on fresh inputs:",
            "",
            *parity_lines(folder),
            "",
            *[line + "\n" for line in quantization_lines(folder)],
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
        *["- CCS labels come from an automatic judge over TextSpan descriptions; they describe, they do not prove."]
        * (plan.ranking_sha256 is not None),
        "- Validation covers only the sets listed above; pruning can hurt other tasks more (the paper reports "
        "the largest drops on fine-grained and geographic sets when high-CCS heads go).",
        "- Lower skew on one bias set does not make the model fair elsewhere.",
        "",
    ]
    return "\n".join(lines)
