"""Where surgeon keeps caches and outputs, and how it writes them without leaving half-written files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path

from surgeon.core.errors import (
    CorruptInput,
    InvalidInput,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    SurgeonError,
)
from surgeon.core.limits import MAX_TEXT_FILE_BYTES, clip

#: the data files shipped in the package (pools, taxonomies, templates, the toy model)
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"

#: the process umask, read once at import (reading it means setting it, which is not thread-safe later)
_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: `.NAME.tmp-PID-XXXX` (atomic_dir, atomic_file) and `.NAME.old-PID` (a replaced output): a writer's own
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)(?=-|$))?.*")
STALE_AFTER_S = 3600.0  # a temporary entry this old whose writer is gone is removed by the next writer

#: called with the final path right before an output is renamed into place (a job's cancellation point: after
#: the rename the output is published and a cancel can no longer undo it without losing the previous one)
_before_publish: ContextVar[Callable[[Path], None] | None] = ContextVar("before_publish", default=None)


@contextmanager
def publish_check(check: Callable[[Path], None]) -> Iterator[None]:
    """Run `check(final)` before every publishing rename made in this context (it may raise to stop it)."""
    token = _before_publish.set(check)
    try:
        yield
    finally:
        _before_publish.reset(token)


def _check_publish(final: Path) -> None:
    check = _before_publish.get()
    if check is not None:
        check(final)


def is_temporary(path: Path) -> bool:
    """Whether `path` is (inside) another writer's temporary folder or file."""
    return any(TEMP_NAME.fullmatch(part) for part in Path(path).parts)


def refuse_temporary(path: Path, what: str) -> None:
    if is_temporary(path):
        raise PreconditionFailed(
            f"{what} {path} is the temporary output of an unfinished (or killed) writer",
            hint="use a finished output; stale temporary folders are removed by the next write into their folder",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(folder: Path, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary entries in `folder` left by killed writers: older than `older_than` seconds and
    not owned by a live process (entries without a pid go by age alone). Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if age < older_than or (pid is not None and _alive(pid)):  # this process's own writers are alive too
            continue
        remove_path(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def cache_dir() -> Path:
    """$SURGEON_CACHE_DIR, else ~/.cache/surgeon."""
    return Path(os.environ.get("SURGEON_CACHE_DIR") or Path.home() / ".cache" / "surgeon")


def exports_dir() -> Path:
    """$SURGEON_EXPORTS_DIR, else ./exports (the design card's default output folder)."""
    return Path(os.environ.get("SURGEON_EXPORTS_DIR") or "exports")


def new_run_dir(kind: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return exports_dir() / f"{kind}-{stamp}"


def newest_output(*patterns: str, hint: str, root: Path | None = None) -> Path:
    """The most recently written match of glob patterns under `root` (default: exports/), for verbs that
    default to "the last run" (a run folder may have any name, so this goes by modification time)."""
    root = exports_dir() if root is None else root
    found = [p for pattern in patterns for p in root.glob(pattern)] if root.is_dir() else []
    # dot-names are other writers' temporary folders (atomic_dir): never finished, about to move
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not found:
        raise NotFound(f"nothing in {root} matches {' or '.join(patterns)}", hint=hint)
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def newest_run(hint: str, root: Path | None = None) -> Path:
    """The newest run folder of `surgeon prune` (one that holds a pruned model) under `root`: weights next to
    README.md (the Hub layout) or in model/ (older runs)."""
    config = newest_output("*/open_clip_config.json", "*/model/open_clip_config.json", hint=hint, root=root)
    return (
        config.parent.parent
        if config.parent.name == "model" and (config.parent.parent / "plan.json").is_file()
        else config.parent
    )


def check_output(final: Path, force: bool) -> Path:
    """`final` as an absolute path, refused when it exists (unless `force`) or when it is the working folder or
    holds it (`--out .`): replacing it would pull the folder from under the shell that asked."""
    absolute = Path(os.path.abspath(final))
    here = Path(os.getcwd())
    if absolute == here or absolute in here.parents:
        raise InvalidInput(f"output folder {final} is the working folder or holds it", hint="choose another --out")
    if absolute.exists() and not force:
        raise PreconditionFailed(f"output folder {final} already exists", hint="pass --force to replace it")
    return absolute


@contextmanager
def atomic_dir(final: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only when the block succeeds.

    Readers never see a half-written folder: on any error (disk full, Ctrl-C, a failed check) the temporary
    folder is removed. When two writers race for the same `final`, the second gets a clear error (or, with
    `force`, replaces the first's folder in one rename)."""
    final = check_output(final, force)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.tmp-{os.getpid()}-"))
    except OSError as err:
        raise PermissionDenied(f"cannot write into {parent}: {err.strerror or err}") from None
    try:
        try:
            yield tmp
        except OSError as err:
            raise StorageError(f"writing {final} failed: {err.strerror or err}; nothing was written") from None
        _usual_modes(tmp)
        _check_publish(final)
        _publish(tmp, final, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _usual_modes(root: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a published output gets the modes a plain write would."""
    os.chmod(root, 0o777 & ~_UMASK)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def _publish(tmp: Path, final: Path, force: bool) -> None:
    old = None
    if final.exists():
        if not force:
            raise PreconditionFailed(
                f"output folder {final} was created by another process meanwhile",
                hint="pass --force to replace it, or choose another --out",
            )
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as err:
        if old is not None:  # put the previous output back: never lose both
            os.rename(old, final)
        raise PreconditionFailed(f"could not move the result into {final}: {err.strerror or err}") from None
    if old is not None:
        remove_path(old)


def remove_path(path: Path) -> None:
    """Remove a folder (recursively) or a file, whichever `path` is; best effort."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling of `path` for a writer that wants a file name (safetensors, matplotlib, plain
    text), renamed onto `path` when the block succeeds and removed otherwise: readers never see half a file.
    Its name is one `remove_stale_temporaries` recognises. OSErrors propagate: each caller decides what a failed
    write means (an error for an output, a skipped entry for a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's file is owner-only; the published one has a plain write's modes
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """An output file written through `atomic_file`, with the modes a plain write would give it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            _check_publish(path)
    except PermissionError as err:
        raise PermissionDenied(f"cannot write {path}: {err.strerror or err}") from None
    except OSError as err:
        raise StorageError(f"writing {path} failed: {err.strerror or err}; nothing was written") from None


def _check_regular_file(path: Path, what: str, error: type[SurgeonError], hint: str | None = None) -> None:
    """A file a user names, refused before it is opened when it is a folder, FIFO or device (reading one would
    block or never end) or larger than limits.MAX_TEXT_FILE_BYTES; a missing file is left to the reader."""
    if path.exists() and not path.is_file():
        raise error(f"{what} {path} is not a regular file (a folder, FIFO or device)", hint=hint)
    if path.is_file() and path.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise error(f"{what} {path} is larger than {MAX_TEXT_FILE_BYTES >> 20} MiB", hint=hint)


def read_json(path: Path, what: str, hint: str | None = None) -> object:
    """A JSON file a user or an export handed us: missing -> NotFound, unreadable -> PermissionDenied, anything
    else that is not a JSON regular file within the size bound (`_check_regular_file`) -> CorruptInput; one line
    each."""
    path = Path(path)
    try:
        _check_regular_file(path, what, CorruptInput, hint)
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a leading BOM (Windows editors) is no content
    except FileNotFoundError:
        raise NotFound(f"{what} not found: {path}", hint=hint) from None
    except PermissionError as err:
        raise PermissionDenied(f"cannot read {what} {path}: {err.strerror or err}", hint=hint) from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
        raise CorruptInput(f"{what} {path} is not valid JSON: {clip(str(err), 200)}", hint=hint) from None
    except OSError as err:
        raise CorruptInput(f"cannot read {what} {path}: {err.strerror or err}", hint=hint) from None


def read_json_object(path: Path, what: str, hint: str | None = None) -> dict:
    """`read_json` of a file whose top level must be an object (configs, records)."""
    data = read_json(path, what, hint)
    if not isinstance(data, dict):
        raise CorruptInput(f"{what} {path} is not a JSON object", hint=hint)
    return data


def read_lines(path: Path, what: str) -> list[str]:
    """UTF-8, one entry per line, blank lines ignored; empty or unreadable files are errors, and so are FIFOs,
    devices and files over the size bound (`_check_regular_file`)."""
    _check_regular_file(path, what, InvalidInput)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM would become part of the first entry
    except FileNotFoundError:
        raise NotFound(f"{what} not found: {path}") from None
    except UnicodeDecodeError as err:
        raise InvalidInput(f"{what} {path} is not UTF-8 (byte {err.start})", hint="re-save it as UTF-8") from None
    except OSError as err:
        raise InvalidInput(f"cannot read {what} {path}: {err.strerror or err}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InvalidInput(f"{what} {path} is empty")
    return lines


def finite(value):
    """NaN/inf are not JSON: null instead, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
