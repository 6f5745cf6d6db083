"""What the CLI verbs print for machines: `--json` documents.

Every verb's `--json` prints exactly one JSON document on stdout (progress and warnings go to stderr), with
the same top-level keys, so scripts need not scrape tables: `command`, `out` (the output folder, or null),
`files` (what was written) and `summary` (the headline numbers), plus the verb's own details."""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.core.paths import finite


def emit_json(command: str, out: Path | None, files: list[Path], summary: dict | None, **details) -> None:
    document = {
        "command": command,
        "out": None if out is None else str(out),
        "files": [str(f) for f in files],
        "summary": summary or {},
        **details,
    }
    print(json.dumps(finite(document), indent=2, default=str, allow_nan=False))
