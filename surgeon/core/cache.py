"""`surgeon cache`: what the on-disk cache holds, how big it is, and how to shrink it.

The cache ($SURGEON_CACHE_DIR, else ~/.cache/surgeon) holds one folder per kind: `stats` (head statistics per
model x image set x layers: ~100 MB for ViT-B-32's last 4 layers, 1.8 GB for ViT-L-14 all layers), `text`
(pool embeddings per text tower x pool: ~7 MB for the general pool), `partial` (checkpoints of interrupted
collections, for resuming), `llm` (LLM judge answers), `frames` (the decoded frames of a video retrieval set:
videos x frames x side^2 x 3 bytes, 1.8 GB for 1,000 videos of 12 frames at 224 px) and `toy-videos` (the toy
world's video files, ~4 kB each). Every entry can be deleted at any time: it is
recomputed when next needed. Eviction drops the least recently used entries first."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.errors import InvalidInput
from surgeon.core.paths import cache_dir, is_temporary

#: writers' temporary files (paths.atomic_file's, and `.tmp-*`, the name earlier versions' cache writers gave
#: them: a cache may be shared by two versions) younger than this may still be being written: never touched
TMP_GRACE_S = 24 * 3600

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str  # the first folder under the cache root
    size: int
    used: float  # last use: the later of modification and access time

    def __str__(self) -> str:
        return str(self.path)


def parse_size(text: str) -> int:
    """'500MB', '2G', '1.5GiB', '0', '123' (bytes) -> bytes; decimal units (MB = 10^6), binary with 'i'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise InvalidInput(f"bad size {text!r}", hint="e.g. 500MB, 2GB, 1.5GiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def entries(root: Path | None = None) -> list[Entry]:
    """Every cache file, oldest use first; temporary files of writers that may still run are left out."""
    root = cache_dir() if root is None else root
    now, found = time.time(), []
    for path in root.rglob("*") if root.is_dir() else []:
        if not path.is_file() or path.is_symlink():
            continue
        stat = path.stat()
        if (is_temporary(path) or path.name.startswith(".tmp-")) and now - stat.st_mtime < TMP_GRACE_S:
            continue
        kind = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else "other"
        found.append(Entry(path, kind, stat.st_size, max(stat.st_mtime, stat.st_atime)))
    return sorted(found, key=lambda e: (e.used, str(e.path)))


def clear(kinds: list[str] | None = None, root: Path | None = None) -> list[Entry]:
    """Delete every entry (or those of `kinds`); returns what was deleted."""
    chosen = [e for e in entries(root) if not kinds or e.kind in kinds]
    for entry in chosen:
        entry.path.unlink(missing_ok=True)
    return chosen


def evict(max_size: int, root: Path | None = None) -> list[Entry]:
    """Delete least recently used entries until the cache holds at most `max_size` bytes."""
    present = entries(root)
    total = sum(e.size for e in present)
    dropped = []
    for entry in present:
        if total <= max_size:
            break
        entry.path.unlink(missing_ok=True)
        total -= entry.size
        dropped.append(entry)
    return dropped


def touch(path: Path) -> None:
    """Mark an entry as just used (eviction is least-recently-used; access times are often not kept)."""
    try:
        os.utime(path)
    except OSError:
        pass
