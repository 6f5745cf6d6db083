"""Where surgeon keeps caches and outputs, and how it writes them without leaving half-written files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from surgeon.errors import PermissionDenied, PreconditionFailed


def cache_dir() -> Path:
    """$SURGEON_CACHE_DIR, else ~/.cache/surgeon."""
    return Path(os.environ.get("SURGEON_CACHE_DIR") or Path.home() / ".cache" / "surgeon")


def exports_dir() -> Path:
    """$SURGEON_EXPORTS_DIR, else ./exports (the design card's default output folder)."""
    return Path(os.environ.get("SURGEON_EXPORTS_DIR") or "exports")


def new_run_dir(kind: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return exports_dir() / f"{kind}-{stamp}"


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only when the block succeeds."""
    if final.exists() and not force:
        raise PreconditionFailed(f"output folder {final} already exists", hint="pass --force to replace it")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-"))
    except OSError as err:
        raise PermissionDenied(f"cannot write into {parent}: {err.strerror or err}") from None
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
