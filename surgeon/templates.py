"""Zero-shot prompt templates and class labels, shared by validation, export and the torch-free runtime.

A template holds one placeholder for the class name, either ``{}`` or ``{c}`` (both styles are common in
published template lists). Templates from users' files are checked when read, so a stray ``{x}`` is one
clear error instead of a KeyError deep inside validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from surgeon.errors import InvalidInput
from surgeon.paths import read_lines

#: docs/METHOD.md §3-4: the CCS paper's four neutral templates
DEFAULT_TEMPLATES = ("a {}", "a photo of {}", "a picture of {}", "an image of {}")


def fill(template: str, label: str) -> str:
    return template.format(label) if "{}" in template else template.format(c=label)


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list; InvalidInput naming the first one that cannot be filled."""
    templates = list(templates)
    if not templates:
        raise InvalidInput(f"{where}: no prompt templates")
    for template in templates:
        try:
            fill(template, "x")
        except (KeyError, IndexError, ValueError) as err:
            raise InvalidInput(
                f"{where}: template {template!r} cannot be filled ({type(err).__name__}: {err})",
                hint="use {} or {c} for the class name and double other braces ({{ }})",
            ) from None
    return templates


def read_templates(path: Path | None, dataset: str = "") -> list[str]:
    """Templates from a file, one per line, or clip_benchmark's JSON keyed by dataset name (`dataset`'s
    entry, else imagenet1k's, as clip_benchmark does); None: the defaults. Each must name the class."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    if path.suffix.lower() == ".json":
        from surgeon.clipbench import DEFAULT_TEMPLATE_KEY, dataset_keys, read_json_entry

        lines = read_json_entry(path, dataset_keys(dataset), "templates file", DEFAULT_TEMPLATE_KEY)
    else:
        lines = read_lines(path, "templates file")
    templates = check_templates(lines, str(path))
    unnamed = next((t for t in templates if fill(t, "\0") == t), None)
    if unnamed is not None:
        raise InvalidInput(f"{path}: template {unnamed!r} has no {{}} or {{c}} for the class name")
    return templates


def check_labels(labels: Sequence[str]) -> None:
    if not labels:
        raise InvalidInput("no class labels given")
    if any(not str(x).strip() for x in labels):
        raise InvalidInput("class labels must not be empty")
    seen, duplicates = set(), []
    for x in labels:
        if x in seen and x not in duplicates:
            duplicates.append(x)
        seen.add(x)
    if duplicates:
        raise InvalidInput(f"class labels repeat {', '.join(duplicates[:3])}")


def read_labels(path: Path) -> list[str]:
    """A labels file: UTF-8, one class name per line, blank lines ignored; empty files and repeated
    names are errors."""
    labels = read_lines(Path(path), "labels file")
    try:
        check_labels(labels)
    except InvalidInput as err:
        raise InvalidInput(f"labels file {path}: {err}") from None
    return labels
