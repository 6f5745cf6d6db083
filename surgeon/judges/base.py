"""The judge interface: label each head's TextSpan texts with one concept and say, per text, whether it
belongs to that concept. CCS is the number of texts judged consistent (METHOD.md §1.3-1.5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from surgeon.registry import Registry


@dataclass(frozen=True)
class HeadJudgement:
    label: str
    verdicts: tuple[bool, ...]

    @property
    def ccs(self) -> int:
        return sum(self.verdicts)


class Judge(Protocol):
    name: str

    def judge(self, heads: Sequence[Sequence[str]]) -> list[HeadJudgement]:
        """One judgement per head, given each head's texts in TextSpan order."""
        ...


JUDGES: Registry = Registry("judge")
