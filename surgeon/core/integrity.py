"""The sha256 of every file of a run or export folder, recorded when it is written and checked before the folder
is used again (`surgeon infer`, `serve-model`, `surgeon export`, the Export RPC): a weight file changed after
the export is refused instead of served or re-exported under the old validation numbers. A run folder's record
is its surgery.json; an ONNX folder also carries its own (onnx/manifest.json), so that it can be copied out and
served alone and still be checked. Nothing is used unverified unless the user opts out (--no-verify).
Torch-free (the serving path)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from surgeon.core.errors import CorruptInput, PreconditionFailed
from surgeon.core.paths import read_json_object

RECORD = "surgery.json"  # a run or export folder's record (with its provenance, plan and validation)
MANIFEST = "manifest.json"  # an ONNX folder's own record: the sha256 of each of its files
MANIFEST_SCHEMA = "surgeon.onnx-manifest/1"
OPT_OUT = "pass --no-verify to use it anyway"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """folder/manifest.json: the sha256 of every file in `folder` (written last, by the exporter)."""
    hashes = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
    path = folder / MANIFEST
    path.write_text(json.dumps({"schema": MANIFEST_SCHEMA, "sha256": hashes}, indent=2), encoding="utf-8")
    return path


def record_folder(folder: Path) -> Path | None:
    """The folder whose surgery.json describes `folder`: itself, or its parent (an `onnx/` folder)."""
    return next((f for f in (folder, folder.parent) if (f / RECORD).is_file()), None)


def recorded_hashes(root: Path, record: str = RECORD) -> dict[str, str]:
    data = read_json_object(root / record, "integrity record", hint=OPT_OUT)
    hashes = data.get("sha256")
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise CorruptInput(f"{root / record} has no sha256 table of its files", hint=OPT_OUT)
    return hashes


def verify(root: Path, required: Iterable[Path] = (), record: str = RECORD) -> int:
    """Check every file listed in root/`record` against its recorded sha256, and that each of `required`
    (files about to be used) is listed. Returns the number of files checked; raises CorruptInput."""
    hashes = recorded_hashes(root, record)
    for name, expected in sorted(hashes.items()):
        _check(root, name, expected, record)
    for path in required:
        if _listed_name(root, path) not in hashes:  # None: a file (or a link) outside the folder
            raise CorruptInput(f"{path} is not listed in {root / record}, so it cannot be verified", hint=OPT_OUT)
    return len(hashes)


def _listed_name(root: Path, path: Path) -> str | None:
    """`path`'s name relative to `root` as a record lists it: as written (a link keeps its own name), else with
    links followed; None when it is outside `root` either way."""
    for base, resolved in (
        (Path(os.path.abspath(root)), Path(os.path.abspath(path))),
        (root.resolve(), path.resolve()),
    ):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return None


def _homes(root: Path) -> list[Path]:
    """Where the files of `root` may lie once links are followed: the folder, and in a Hugging Face hub snapshot
    (HUB/models--ORG--NAME/snapshots/REV/..., whose files are links into that repository's blobs/) those blobs.
    Their contents are checked against the recorded hashes all the same."""
    base = root.resolve()
    snapshot = next((folder for folder in (base, *base.parents) if folder.parent.name == "snapshots"), None)
    blobs = None if snapshot is None else snapshot.parent.parent / "blobs"
    return [base, blobs] if blobs is not None and blobs.is_dir() else [base]


def _check(root: Path, name: str, expected: str, record: str) -> None:
    path = (root / name).resolve()
    if not any(path.is_relative_to(home) for home in _homes(root)):
        raise CorruptInput(f"{root / record} lists {name!r}, outside the folder", hint=OPT_OUT)
    if not path.is_file():
        raise CorruptInput(f"{root / name} is listed in {record} but missing", hint=OPT_OUT)
    if sha256_file(path) != expected:
        raise CorruptInput(
            f"{root / name} does not match the sha256 recorded in {record}: it changed after the export",
            hint=f"re-export the run, or {OPT_OUT}",
        )


def verify_run(folder: Path, required: Iterable[Path] = ()) -> int:
    """`verify` against the surgery.json of `folder` (or of its parent); a folder without one is refused."""
    root = record_folder(folder)
    if root is None:
        raise PreconditionFailed(f"{folder} has no {RECORD}, so its files cannot be verified", hint=OPT_OUT)
    return verify(root, required)


def verify_export(folder: Path, required: Iterable[Path] = ()) -> int:
    """An ONNX folder about to be served, checked against its own manifest; inside its run folder the manifest
    itself is checked against the run's surgery.json first, which must list it (a manifest added later proves
    nothing). Exports older than the manifest are checked against the run's surgery.json. A folder with neither
    record is refused: nothing is served unverified unless the user opts out."""
    manifest = folder / MANIFEST
    files = [p for p in required if p != manifest]
    run = record_folder(folder)
    if not manifest.is_file():
        if run is None:
            raise PreconditionFailed(
                f"{folder} has no {MANIFEST} and no {RECORD}, so its files cannot be verified", hint=OPT_OUT
            )
        return verify(run, files)
    if run is not None:
        name = manifest.relative_to(run).as_posix()
        expected = recorded_hashes(run).get(name)
        if expected is None:
            raise CorruptInput(f"{manifest} is not listed in {run / RECORD}, so it cannot be verified", hint=OPT_OUT)
        _check(run, name, expected, RECORD)
    return verify(folder, files, MANIFEST)
