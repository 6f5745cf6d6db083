"""What a run folder's readers share: how to recognise one, the note on which data validated it and the ONNX
parity table. Kept below prune, export and the model card so that none of them imports another for these."""

from __future__ import annotations

from pathlib import Path

from surgeon.core.paths import read_json_object
from surgeon.results.records import Plan

PARITY_FILE = "parity.json"  # in the run's onnx/ folder
SHARED_WEIGHTS = "visual.onnx.data"  # onnx/: the visual weights classifier.onnx reads too
#: the record each surgeon output writes (rank, prune, validate, export): a folder holding one is a run folder
RUN_RECORDS = ("ranking.json", "plan.json", "validation.json", "surgery.json")


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a folder surgeon wrote (a real folder, not a link, holding one of RUN_RECORDS as a
    regular file): what `force` may replace. The server's own files and anything else are never run folders."""
    if path.is_symlink() or not path.is_dir():
        return False
    return any((path / name).is_file() and not (path / name).is_symlink() for name in RUN_RECORDS)


def validation_note(plan: Plan) -> str:
    """Which data the figures come from, and for a selection by measurement, that it never saw them."""
    note = f"Measured on {plan.validated_on}."
    if plan.selected_on:
        note += f" Heads were selected on {plan.selected_on}: a disjoint split, so these figures are held out."
    return note


def parity_lines(folder: Path) -> list[str]:
    """A markdown table of the ONNX files' measured max abs difference from PyTorch (empty without ONNX):
    what a user checks before trusting the export, in report.md, the card and the CLI's output."""
    path = folder / "onnx" / PARITY_FILE
    if not path.is_file():
        return []
    parity = read_json_object(path, "ONNX parity record")
    precision = parity.get("precision", {})  # quantized graphs: measured as written, gated on accuracy instead
    lines = ["| ONNX file | precision | max abs difference from PyTorch | tolerance |", "|---|---|---|---|"]
    for name, diff in parity["max_abs_diff"].items():
        kind = precision.get(name, "fp32")
        tolerance = f"{parity['atol']:g}" if kind == "fp32" else f"none ({kind}: gated on accuracy)"
        lines.append(f"| {name} | {kind} | {diff:.2e} | {tolerance} |")
    return lines


def heads_table(plan: Plan) -> list[str]:
    """The pruned heads with their reasons (report.md and the card); the label and CCS columns only when a
    ranking gave them (the `heads` policy and the paper's presets read none)."""
    if all(h.label is None and h.ccs is None for h in plan.heads):
        return ["| head | reason |", "|---|---|", *[f"| {h.head} | {h.reason} |" for h in plan.heads]]
    return [
        "| head | concept label | CCS | reason |",
        "|---|---|---|---|",
        *[f"| {h.head} | {h.label or '-'} | {'-' if h.ccs is None else h.ccs} | {h.reason} |" for h in plan.heads],
    ]
