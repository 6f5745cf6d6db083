"""Which data validated a run (validation_data.json in its folder): the validation options, every path made
absolute, with content hashes of the files they name and of every image the suite read. `surgeon export RUN
--quantize int8` measures the int8 graphs on that same data, and refuses it when it changed since the run."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PreconditionFailed
from surgeon.core.integrity import sha256_file
from surgeon.core.options import is_path
from surgeon.core.paths import read_json_object
from surgeon.core.progress import Advance, progress_bar
from surgeon.validation.spec import ValidationSpec

if TYPE_CHECKING:
    from surgeon.validation.validate import ValidationSuite

DATA_RECORD = "validation_data.json"
SCHEMA = "surgeon.validation-data/1"
#: every ValidationSpec field: a run rebuilt without one of them (a bias column, a retrieval set) would be
#: measured on other data than it was validated on. Paths are recorded with their content hashes.
PATH_OPTIONS = tuple(f.name for f in dataclasses.fields(ValidationSpec) if is_path(ValidationSpec, f.name))
VALUE_OPTIONS = tuple(f.name for f in dataclasses.fields(ValidationSpec) if f.name not in PATH_OPTIONS)


def _generated(value: object) -> bool:
    """The toy world's sets by name ("toy", "toy:captions", "toy:counterfactuals" ...): drawn from seeds (the
    counterfactual images written once into the cache), so there is no user file to hash."""
    return str(value) == "toy" or str(value).startswith("toy:")


def record_validation_data(options: dict[str, Any], suite: ValidationSuite, quiet: bool = True) -> dict[str, Any]:
    """The record of `suite`, built from the validation `options` (ValidationSpec's fields) that made it;
    hashing reads every image once more (a bar unless quiet)."""
    paths: dict[str, dict[str, str]] = {}
    for name in PATH_OPTIONS:
        value = options.get(name)
        if value is None:
            continue
        if _generated(value):
            paths[name] = {"path": str(value)}
            continue
        path = Path(value).resolve()
        paths[name] = {"path": str(path), "sha256": _path_digest(path)}
    return {
        "schema": SCHEMA,
        "description": suite.description,
        "options": {name: options.get(name) for name in VALUE_OPTIONS},
        "paths": paths,
        "images_sha256": images_digests(suite, quiet),
    }


def _path_digest(path: Path) -> str:
    """A file's SHA-256; for a folder, its top-level files' (a webdataset's class names and templates): the
    images under it are covered by `images_digests`."""
    if path.is_file():
        return sha256_file(path)
    return _files_digest(sorted(p for p in path.iterdir() if p.is_file()))


def _files_digest(files: list[Path], advance: Advance | None = None) -> str:
    """SHA-256 over each file's name (relative to the files' common folder) and content."""
    digest = hashlib.sha256()
    base = os.path.commonpath([str(f.parent) for f in files]) if files else ""
    for file in files:
        digest.update(os.path.relpath(file, base).encode() + b"\0" + bytes.fromhex(sha256_file(file)))
        if advance is not None:
            advance(1)
    return digest.hexdigest()


def images_digests(suite: ValidationSuite, quiet: bool = True) -> dict[str, str]:
    """Per set: a digest of the image files (or webdataset shards) it reads; the toy's arrays are seeded."""
    from surgeon.inputs.video import VideoFrames
    from surgeon.inputs.webdata import ShardImages

    sets: list[tuple[str, object]] = [(t.name, t.images) for t in suite.tasks]
    sets += [(suite.bias.name, suite.bias.images)] if suite.bias is not None else []
    sets += [(r.name, r.images.paths if isinstance(r.images, VideoFrames) else r.images) for r in suite.retrieval]
    listed = {
        name: list(images.shards if isinstance(images, ShardImages) else images)
        for name, images in sets
        if isinstance(images, ShardImages | list)
    }
    with progress_bar("hashing validation data", sum(map(len, listed.values())), quiet) as advance:
        return {name: _files_digest(files, advance) for name, files in listed.items()}


def recorded_suite(run_dir: Path, model: str | None) -> ValidationSuite:
    """The suite a run was validated on, rebuilt from its record after checking every hash."""
    path = run_dir / DATA_RECORD
    if not path.is_file():
        raise PreconditionFailed(
            f"{run_dir} does not record which data validated it (a run made before surgeon recorded it)",
            hint="pass the validation options (--data, --classnames, --templates) to measure int8 on",
        )
    record = read_json_object(path, "validation data record")
    if record.get("schema") != SCHEMA or not all(isinstance(record.get(k), dict) for k in ("paths", "images_sha256")):
        raise CorruptInput(f"{path} is not a surgeon validation data record (schema {SCHEMA})")
    given: dict[str, Any] = {}
    for name, entry in record["paths"].items():
        if name not in PATH_OPTIONS or not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise CorruptInput(f"{path}: unexpected entry {name[:40]!r}")
        where = Path(entry["path"])
        if not _generated(entry["path"]):
            if not where.exists():
                raise NotFound(
                    f"the run's validation {name} {where} is gone",
                    hint="pass the validation options (--data ...) to measure on data you have",
                )
            _check_digest(f"{name} {where}", _path_digest(where), entry.get("sha256"))
        given[name] = where
    options = record.get("options")  # a record made before an option existed lacks it: the option's default
    if not isinstance(options, dict) or not set(options) <= set(VALUE_OPTIONS):
        raise CorruptInput(f"{path}: the validation options are {', '.join(VALUE_OPTIONS)}")
    try:  # checked as options typed in are: the bounds, the choices
        spec = ValidationSpec(**given, **options)
        spec.check()
        suite = spec.build(model)
    except (TypeError, InvalidInput) as err:
        raise CorruptInput(f"{path}: {err}") from None
    recorded = record["images_sha256"]
    for name, digest in images_digests(suite, quiet=False).items():  # a terminal bar: every image is read again
        _check_digest(f"images of set {name}", digest, recorded.get(name))
    return suite


def _check_digest(what: str, digest: str, recorded: object) -> None:
    if digest != recorded:
        raise PreconditionFailed(
            f"the run's validation {what} changed since the run: its content hash differs",
            hint="restore it, or pass the validation options (--data ...) to measure on other data",
        )
