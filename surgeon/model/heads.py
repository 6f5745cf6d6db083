"""Head coordinates (`L<layer>.H<head>`): what ranking, policies, surgery, validation and sweeps pass
between them, kept apart from any of those stages so none has to import another to name a head."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from surgeon.core.errors import InvalidInput
from surgeon.core.limits import echo


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}.H{self.head}"

    @classmethod
    def parse(cls, spec: str) -> HeadRef:
        match = re.fullmatch(r"\s*L(\d{1,6})\.H(\d{1,6})\s*", spec, flags=re.IGNORECASE)
        if not match:
            raise InvalidInput(f"malformed head {echo(spec)}", hint="write heads as L<layer>.H<head>, e.g. L11.H5")
        return cls(int(match[1]), int(match[2]))


def parse_heads(spec: str | Iterable[str]) -> list[HeadRef]:
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    heads = [HeadRef.parse(p) for p in parts if p.strip()]
    if not heads:
        raise InvalidInput("no heads given", hint="e.g. --heads L11.H5,L10.H8")
    return sorted(set(heads))
