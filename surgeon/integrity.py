"""The sha256 of every file of a run or export folder, recorded in its surgery.json, checked before the folder
is used again (`surgeon infer`, `surgeon export`, the Export RPC): a weight file changed after the export is
refused instead of served or re-exported under the old validation numbers. Torch-free (the serving path)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from surgeon.errors import CorruptInput, PreconditionFailed
from surgeon.paths import read_json_object

RECORD = "surgery.json"
OPT_OUT = "pass --no-verify to use it anyway"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def record_folder(folder: Path) -> Path | None:
    """The folder whose surgery.json describes `folder`: itself, or its parent (an `onnx/` folder)."""
    return next((f for f in (folder, folder.parent) if (f / RECORD).is_file()), None)


def recorded_hashes(root: Path) -> dict[str, str]:
    record = read_json_object(root / RECORD, "surgery record", hint=OPT_OUT)
    hashes = record.get("sha256")
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise CorruptInput(f"{root / RECORD} has no sha256 table of its files", hint=OPT_OUT)
    return hashes


def verify(root: Path, required: Iterable[Path] = ()) -> int:
    """Check every file listed in root/surgery.json against its recorded sha256, and that each of `required`
    (files about to be used) is listed. Returns the number of files checked; raises CorruptInput."""
    hashes = recorded_hashes(root)
    base = root.resolve()
    for name, expected in sorted(hashes.items()):
        path = (root / name).resolve()
        if not path.is_relative_to(base):
            raise CorruptInput(f"{root / RECORD} lists {name!r}, outside the folder", hint=OPT_OUT)
        if not path.is_file():
            raise CorruptInput(f"{root / name} is listed in {RECORD} but missing", hint=OPT_OUT)
        if sha256_file(path) != expected:
            raise CorruptInput(
                f"{root / name} does not match the sha256 recorded in {RECORD}: it changed after the export",
                hint=f"re-export the run, or {OPT_OUT}",
            )
    for path in required:
        if path.resolve().relative_to(base).as_posix() not in hashes:
            raise CorruptInput(f"{path} is not listed in {root / RECORD}, so it cannot be verified", hint=OPT_OUT)
    return len(hashes)


def verify_run(folder: Path, required: Iterable[Path] = (), needs_record: bool = True) -> int:
    """`verify` against the surgery.json of `folder` (or of its parent); a folder without one is refused when
    `needs_record` (a run folder always has one), else accepted as hand-assembled (returns 0)."""
    root = record_folder(folder)
    if root is None:
        if needs_record:
            raise PreconditionFailed(f"{folder} has no {RECORD}, so its files cannot be verified", hint=OPT_OUT)
        return 0
    return verify(root, required)
