"""The judge interface: label each head's TextSpan texts with one concept and say, per text, whether it
belongs to that concept. CCS is the number of texts judged consistent (docs/METHOD.md §1.3-1.5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from surgeon.core.registry import Registry


@dataclass(frozen=True)
class HeadJudgement:
    """One concept per head (a judge breaks ties of its own rule: surgeon.ranking.judges.lexicon) and one verdict per
    text, whether it is about that concept; CCS counts those verdicts, so label and CCS always agree."""

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


# name -> factory(JudgeContext) -> Judge
JUDGES: Registry = Registry("judge")


@dataclass
class JudgeContext:
    """Everything a judge factory may need; each judge takes what it uses.

    taxonomy: {"concepts": {name: {"description": str, "terms": [str, ...]}}}
    encode_text: maps texts to L2-normalised embeddings with the ranked model's text tower.
    """

    taxonomy: dict
    encode_text: Callable[[list[str]], torch.Tensor] | None = None
    llm_url: str | None = None
    llm_models: tuple[str, ...] = ()
    llm_key_env: str = "OPENAI_API_KEY"
    llm_timeout_s: float = 60.0
    cache_dir: Path | None = None
