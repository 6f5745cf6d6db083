"""The judge interface: label each head's TextSpan texts with one concept and say, per text, whether it
belongs to that concept. CCS is the number of texts judged consistent (docs/METHOD.md §1.3-1.5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from surgeon.registry import Registry

TIE = "|"  # joins the concepts of a tied label: "colors|textures"


@dataclass(frozen=True)
class HeadJudgement:
    """`label` may be a tie of concepts joined by TIE (a judge that can tell reports it rather than pick one by
    some arbitrary order); then `verdicts` mark the texts about any of them and `tie_count` is the CCS: the
    number of texts about each one of them (equal: that is what makes them tied)."""

    label: str
    verdicts: tuple[bool, ...]
    tie_count: int | None = None

    @property
    def ccs(self) -> int:
        return sum(self.verdicts) if self.tie_count is None else self.tie_count


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
