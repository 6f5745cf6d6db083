"""Zero-shot prompt templates and class labels, shared by validation, export and the torch-free runtime.

A template holds one placeholder for the class name, either ``{}`` or ``{c}`` (both styles are common in
published template lists). Templates from users' files are checked when read, so a stray ``{x}`` is one
clear error instead of a KeyError deep inside validation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from string import Formatter

from surgeon.core.errors import InvalidInput
from surgeon.core.paths import PACKAGE_DATA, read_lines

#: docs/METHOD.md §3-4: the CCS paper's four neutral templates
DEFAULT_TEMPLATES = ("a {}", "a photo of {}", "a picture of {}", "an image of {}")
#: named template sets: CLIP's per-data-set prompts as the paper uses them (docs/METHOD.md §6)
TEMPLATE_SETS_FILE = PACKAGE_DATA / "templates" / "sets.json"
NEUTRAL = "neutral"  # the name of DEFAULT_TEMPLATES


@cache
def _template_sets() -> tuple[dict[str, list[str]], dict[str, str]]:
    from surgeon.core.paths import read_json_object

    data = read_json_object(TEMPLATE_SETS_FILE, "template sets")
    return data["sets"], data["datasets"]


def template_set_names() -> list[str]:
    """Every name `named_templates` knows: the sets, the data sets they belong to, and `neutral`."""
    sets, datasets = _template_sets()
    return sorted({*sets, *datasets, NEUTRAL})


def named_templates(name: str) -> list[str] | None:
    """The templates a set or a data set stands for (the paper's: 18 for CIFAR-10/100 and Oxford-pets, 1 for
    Food-101, 5 for Country-211, 80 for ImageNet and its variants), by name, case-insensitive, clip_benchmark's
    `wds/` or `wds_` prefix dropped; None for other names."""
    key = name.strip().lower().removeprefix("wds/").removeprefix("wds_")
    if key == NEUTRAL:
        return list(DEFAULT_TEMPLATES)
    sets, datasets = _template_sets()
    chosen = key if key in sets else datasets.get(key)
    return None if chosen is None else list(sets[chosen])


def fill(template: str, label: str) -> str:
    return template.format(label) if "{}" in template else template.format(c=label)


def _check_fields(template: str) -> None:
    """ValueError unless every replacement field of `template` is a bare {} or a bare {c}: str.format would
    also run attribute and index lookups ({c.upper}, {c[0]}) and format specs ({c:>300000000}), which drop the
    class name or allocate at will, from a line of a user's file."""
    names = set()
    for _, name, spec, conversion in Formatter().parse(template):
        if name is None:
            continue
        if name not in ("", "c") or spec or conversion:
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{field} is not {{}} or {{c}}")
        names.add(name)
    if len(names) > 1:
        raise ValueError("it mixes {} and {c}")


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """The templates as a list; InvalidInput naming the first one that cannot be filled."""
    templates = list(templates)
    if not templates:
        raise InvalidInput(f"{where}: no prompt templates")
    for template in templates:
        try:
            _check_fields(template)
            fill(template, "x")
        except (KeyError, IndexError, ValueError) as err:
            raise InvalidInput(
                f"{where}: template {template!r} cannot be filled ({err})",
                hint="use {} or {c} for the class name and double other braces ({{ }})",
            ) from None
    return templates


def read_templates(path: Path | None, dataset: str = "") -> list[str]:
    """Templates from a file, one per line, or clip_benchmark's JSON keyed by dataset name (`dataset`'s
    entry, else imagenet1k's, as clip_benchmark does), or a named set (`named_templates`: a bare name is always
    the set, never a file in the working folder; name such a file by a longer path); None: the paper's set when
    `dataset` is one of its data sets (as clip_benchmark picks templates by data set), else the defaults. Each
    must name the class."""
    if path is None:
        chosen = named_templates(dataset)
        if chosen is None:
            return list(DEFAULT_TEMPLATES)
        # an assumption that changes accuracy: said, as the activation is (--templates names another set)
        warnings.warn(
            f"{dataset}: the paper's {len(chosen)} template(s) of this data set, chosen by its name "
            "(--templates neutral or a file to choose others)",
            stacklevel=2,
        )
        return chosen
    named = named_templates(str(path)) if len(path.parts) == 1 else None
    if named is not None:
        return named
    if path.suffix.lower() == ".json":
        from surgeon.inputs.clipbench import DEFAULT_TEMPLATE_KEY, dataset_keys, read_json_entry

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
