"""What the CLI verbs write for machines: `--json` documents and validation folders.

Every verb's `--json` prints exactly one JSON document on stdout (progress and warnings go to stderr), with
the same top-level keys, so scripts need not scrape tables: `command`, `out` (the output folder, or null),
`files` (what was written) and `summary` (the headline numbers), plus the verb's own details."""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.clipbench import CLIP_BENCHMARK_DIR, finite, write_results
from surgeon.paths import atomic_dir


def emit_json(command: str, out: Path | None, files: list[Path], summary: dict | None, **details) -> None:
    document = {
        "command": command,
        "out": None if out is None else str(out),
        "files": [str(f) for f in files],
        "summary": summary or {},
        **details,
    }
    print(json.dumps(finite(document), indent=2, default=str, allow_nan=False))


def write_validation(report: dict, folder: Path, language: str, force: bool = False) -> list[Path]:
    """`folder`/clip_benchmark/<one file per set>.json and `folder`/validation.json (surgeon's report),
    written atomically. clip_benchmark's files sit in their own folder: `clip_benchmark build FOLDER` reads
    every .json of a folder, and surgeon's report is not one of its results."""
    with atomic_dir(folder, force=force) as tmp:
        written = write_results(report, tmp / CLIP_BENCHMARK_DIR, language)
        (tmp / "validation.json").write_text(json.dumps(finite(report), indent=2), encoding="utf-8")
    return [folder / CLIP_BENCHMARK_DIR / p.name for p in written] + [folder / "validation.json"]
