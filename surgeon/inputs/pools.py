"""Text pools for TextSpan: the bundled general pool (real CLIPs), the toy world's pool, or a file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from surgeon.core import fallback
from surgeon.core.errors import CorruptInput
from surgeon.core.paths import PACKAGE_DATA, read_json, read_lines
from surgeon.inputs import defaults

DATA = PACKAGE_DATA


@dataclass(frozen=True)
class TextPool:
    name: str
    lines: tuple[str, ...]
    taxonomy: dict

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.lines).encode()).hexdigest()


def read_taxonomy(path: Path) -> dict:
    taxonomy = read_json(path, "taxonomy")
    if not isinstance(taxonomy, dict) or not isinstance(taxonomy.get("concepts"), dict):
        raise CorruptInput(f"taxonomy {path} has no 'concepts' mapping")
    return taxonomy


def load_pool(spec: str | None, toy: bool, taxonomy: str | None = None) -> TextPool:
    """ "general", "toy", or a file path; `None`: fallback.text_pool_for (`toy`: the model is the toy).
    The taxonomy is the pool's own (a file pool uses the general one) unless `taxonomy` names a file."""
    spec = fallback.text_pool_for(toy, spec)
    general_taxonomy = DATA / "taxonomies" / "general.json"
    if spec == fallback.TOY:
        lines, own_taxonomy = defaults.toy_pool()
        name = "toy"
    elif spec == "general":
        name, lines, own_taxonomy = "general", read_lines(DATA / "pools" / "general.txt", "text pool"), None
    else:
        name, lines, own_taxonomy = Path(spec).name, read_lines(Path(spec), "text pool"), None
    if taxonomy:
        own_taxonomy = read_taxonomy(Path(taxonomy))
    return TextPool(name, tuple(lines), own_taxonomy or read_taxonomy(general_taxonomy))
