"""The `embedding` judge: offline like `lexicon`, but matches meaning rather than words, using the ranked
model's own text tower. Each concept becomes one prompt (name, a few terms, description); a head's label
is the concept with the highest mean cosine similarity over its texts, and a text is consistent when its
own nearest concept is that label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from surgeon.core.errors import InvalidInput
from surgeon.ranking.judges.base import JUDGES, HeadJudgement, Judge, JudgeContext
from surgeon.ranking.judges.lexicon import NONE_LABEL

PROMPT_TERMS = 5


def concept_prompt(name: str, spec: dict) -> str:
    """Name and terms first: CLIP truncates long prompts, so the description goes last."""
    terms = ", ".join(spec.get("terms", [])[:PROMPT_TERMS])
    description = spec.get("description", "").strip()
    prompt = f"a photo about {name}: {terms}" if terms else f"a photo about {name}"
    return f"{prompt}. {description}" if description else prompt


class EmbeddingJudge:
    """Nearest-concept labelling in the text embedding space; concept embeddings are computed once."""

    name = "embedding"

    def __init__(self, taxonomy: dict, encode_text: Callable[[list[str]], torch.Tensor]):
        concepts = taxonomy.get("concepts") if isinstance(taxonomy, dict) else None
        if not isinstance(concepts, dict) or not concepts:
            raise InvalidInput("the embedding judge needs a taxonomy with a non-empty 'concepts' mapping")
        self.concepts = sorted(concepts)
        self.prompts = [concept_prompt(c, concepts[c] if isinstance(concepts[c], dict) else {}) for c in self.concepts]
        self._encode = encode_text
        self._concept_emb: torch.Tensor | None = None

    def _embed(self, texts: list[str]) -> torch.Tensor:
        emb = torch.as_tensor(self._encode(texts)).detach().float().cpu()
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise InvalidInput(f"encode_text returned shape {tuple(emb.shape)} for {len(texts)} texts")
        return F.normalize(emb, dim=-1)

    @property
    def concept_embeddings(self) -> torch.Tensor:
        """(concepts x D), encoded on first use so building the judge costs nothing."""
        if self._concept_emb is None:
            self._concept_emb = self._embed(self.prompts)
        return self._concept_emb

    def judge(self, heads: Sequence[Sequence[str]]) -> list[HeadJudgement]:
        flat = [text for texts in heads for text in texts]
        if not flat:
            return [HeadJudgement(NONE_LABEL, ()) for _ in heads]
        sims = self._embed(flat) @ self.concept_embeddings.T  # one batch for every head's texts
        nearest = sims.argmax(dim=1).tolist()
        out, start = [], 0
        for texts in heads:
            stop = start + len(texts)
            if stop == start:
                out.append(HeadJudgement(NONE_LABEL, ()))
                continue
            label = int(sims[start:stop].mean(dim=0).argmax())
            out.append(HeadJudgement(self.concepts[label], tuple(n == label for n in nearest[start:stop])))
            start = stop
        return out


@JUDGES.register("embedding")
def make_embedding_judge(ctx: JudgeContext) -> Judge:
    if ctx.encode_text is None:
        raise InvalidInput(
            "the embedding judge needs the model's text encoder (encode_text), and none was given",
            hint="load a CLIP model with a text tower, or use --judge lexicon",
        )
    return EmbeddingJudge(ctx.taxonomy, ctx.encode_text)
