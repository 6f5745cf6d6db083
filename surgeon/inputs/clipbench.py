"""clip_benchmark's file formats: its per-dataset JSON class-name and template files, and its result files.

clip_benchmark (1.6) writes one JSON file per (dataset, model, language, task), named
`{dataset}_{pretrained}_{model}_{language}_{task}.json` (dataset with "wds/" dropped and "/" -> "_",
a pretrained file by its base name) and holding `dataset, model, pretrained, task, metrics, language`;
`clip_benchmark build` turns a set of them into one CSV. Writing the same files lets its users aggregate
surgeon's numbers next to their own."""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.core.errors import CorruptInput, InvalidInput
from surgeon.core.paths import atomic_dir, finite, read_json

CLIP_BENCHMARK_DIR = "clip_benchmark"  # the folder of result files inside surgeon's output folders
#: clip_benchmark's fallback when a template file has no entry for the dataset
DEFAULT_TEMPLATE_KEY = "imagenet1k"


def dataset_keys(name: str) -> list[str]:
    """The keys clip_benchmark looks a dataset up by: its name, and for wds/ (or other prefixed) names the rest."""
    keys = [name]
    if "/" in name:
        keys.append(name.split("/", 1)[1])
    else:
        keys.append(f"wds/{name}")
    return keys


def read_json_entry(path: Path, keys: list[str], what: str, fallback: str | None = None) -> list[str]:
    """The list of strings stored under the first of `keys` (then `fallback`) in a clip_benchmark JSON file."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CorruptInput(f"{what} {path} is not an object keyed by dataset name")
    key = next((k for k in [*keys, *([fallback] if fallback else [])] if k in data), None)
    if key is None:
        known = ", ".join(sorted(data)[:8]) + (" ..." if len(data) > 8 else "")
        raise InvalidInput(f"{what} {path} has no entry for {' or '.join(keys)}", hint=f"it has: {known}")
    entry = data[key]
    if not isinstance(entry, list) or not entry or not all(isinstance(x, str) and x.strip() for x in entry):
        raise CorruptInput(f"{what} {path}: entry {key!r} is not a list of non-empty strings")
    return [x.strip() for x in entry]


def result_filename(entry: dict, language: str) -> str:
    """clip_benchmark's default `--output` template, filled as its `run` fills it."""
    dataset = entry["dataset"].removeprefix("wds/").replace("/", "_")
    pretrained = entry["pretrained"]
    if Path(pretrained).is_file():
        pretrained = Path(pretrained).name
    return f"{dataset}_{pretrained}_{entry['model']}_{language}_{entry['task']}.json".replace("/", "_")


def result_entry(entry: dict, language: str, model: str | None = None, pretrained: str | None = None) -> dict:
    """One clip_benchmark result: its keys, scalar metrics only (NaN as null: clip_benchmark writes no NaN).
    `model`/`pretrained` override the entry's (a run's before/after reports)."""
    metrics = finite({k: v for k, v in entry["metrics"].items() if isinstance(v, int | float | str) or v is None})
    return {
        "dataset": entry["dataset"],
        "model": entry["model"] if model is None else model,
        "pretrained": entry["pretrained"] if pretrained is None else pretrained,
        "task": entry["task"],
        "metrics": metrics,
        "language": language,
    }


def pruned_tag(pretrained: str | None, policy: str, n_heads: int) -> str:
    """The pretrained tag a pruned model's results carry, so that `clip_benchmark build` tells it from the
    original (its rows are keyed by model + pretrained): e.g. openai-pruned-debias-1."""
    base = Path(pretrained).name if pretrained and Path(pretrained).is_file() else (pretrained or "")
    return f"{base}-pruned-{policy}-{n_heads}".lstrip("-").replace("/", "_")


def write_results(
    report: dict, folder: Path, language: str = "en", model: str | None = None, pretrained: str | None = None
) -> list[Path]:
    """One clip_benchmark file per result of a validation report into `folder` (new, or being built
    atomically); `model`/`pretrained` override the entries'. Returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in report["results"]:
        result = result_entry(entry, language, model, pretrained)
        path = folder / result_filename(result, language)
        if path in written:
            raise InvalidInput(f"two validation sets would write the same clip_benchmark file {path.name}")
        path.write_text(json.dumps(result), encoding="utf-8")
        written.append(path)
    return written


def write_validation(report: dict, folder: Path, language: str, force: bool = False) -> list[Path]:
    """`folder`/clip_benchmark/<one file per set>.json and `folder`/validation.json (surgeon's report),
    written atomically. clip_benchmark's files sit in their own folder: `clip_benchmark build FOLDER` reads
    every .json of a folder, and surgeon's report is not one of its results."""
    with atomic_dir(folder, force=force) as tmp:
        written = write_results(report, tmp / CLIP_BENCHMARK_DIR, language)
        (tmp / "validation.json").write_text(json.dumps(finite(report), indent=2), encoding="utf-8")
    return [folder / CLIP_BENCHMARK_DIR / p.name for p in written] + [folder / "validation.json"]
