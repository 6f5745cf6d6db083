"""Text pools for TextSpan: the bundled general pool (real CLIPs), the toy world's pool, or a file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from surgeon import defaults
from surgeon.errors import CorruptInput, InvalidInput, NotFound
from surgeon.paths import read_json

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class TextPool:
    name: str
    lines: tuple[str, ...]
    taxonomy: dict

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.lines).encode()).hexdigest()


def read_lines(path: Path, what: str = "text pool") -> list[str]:
    """UTF-8, one entry per line, blank lines ignored; empty or unreadable files are errors, and so are FIFOs
    and devices (reading one would block or never end) and files over limits.MAX_TEXT_FILE_BYTES."""
    from surgeon.limits import MAX_TEXT_FILE_BYTES

    if path.exists() and not path.is_file():
        raise InvalidInput(f"{what} {path} is not a regular file (a folder, FIFO or device)")
    if path.is_file() and path.stat().st_size > MAX_TEXT_FILE_BYTES:
        raise InvalidInput(f"{what} {path} is larger than {MAX_TEXT_FILE_BYTES >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
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


def read_taxonomy(path: Path) -> dict:
    taxonomy = read_json(path, "taxonomy")
    if not isinstance(taxonomy, dict) or not isinstance(taxonomy.get("concepts"), dict):
        raise CorruptInput(f"taxonomy {path} has no 'concepts' mapping")
    return taxonomy


def load_pool(spec: str | None, toy: bool, taxonomy: str | None = None) -> TextPool:
    """`None` -> "toy" for the toy model, "general" otherwise; "general", "toy", or a file path.
    The taxonomy is the pool's own (a file pool uses the general one) unless `taxonomy` names a file."""
    spec = spec or ("toy" if toy else "general")
    general_taxonomy = DATA / "taxonomies" / "general.json"
    if spec == "toy":
        lines, own_taxonomy = defaults.toy_pool()
        name = "toy"
    elif spec == "general":
        name, lines, own_taxonomy = "general", read_lines(DATA / "pools" / "general.txt"), None
    else:
        name, lines, own_taxonomy = Path(spec).name, read_lines(Path(spec)), None
    if taxonomy:
        own_taxonomy = read_taxonomy(Path(taxonomy))
    return TextPool(name, tuple(lines), own_taxonomy or read_taxonomy(general_taxonomy))
