"""The `lexicon` judge (default): offline and deterministic, so a ranking can be reproduced anywhere.

The rule, meant to answer as the paper's LLM judge would ("is this text associated with this label?"):
- a text is ABOUT every concept whose taxonomy terms occur in it, as whole lowercase word sequences with
  simple plural folding (the term "car" matches "cars", "box" matches "boxes", "berry" matches "berries"; not
  the reverse, so terms are best written in the singular). "a red square on a green background" is about
  colors, shapes and backgrounds alike: no concept hides another;
- a head's label is the concept the most of its texts are about. When several concepts share that count the
  label is the tie, their names joined by "|" in sorted order ("colors|textures"): which one the head carries
  is not knowable from its texts, so none is chosen (not by spelling, not by a priority);
- a text is consistent with the label when it is about it; CCS is the number of such texts. For a tie, CCS
  is the count every tied concept shares (2 for 2 texture + 2 color texts, not 4), and the verdicts mark the
  texts about any tied concept;
- a head none of whose texts match anything is labelled "none", with CCS 0 (docs/METHOD.md §1.3-1.5).
A taxonomy's `priority` key (older files) is accepted and has no effect.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence

from surgeon.errors import InvalidInput
from surgeon.judges.base import JUDGES, TIE, HeadJudgement, Judge, JudgeContext

NONE_LABEL = "none"

_APOSTROPHES = re.compile(r"['’`]")
_WORD = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens without accents ("café" ~ "cafe"); apostrophes are dropped first so
    "bird's-eye" gives "birds", "eye" whether the term or the text spells it."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _WORD.findall(_APOSTROPHES.sub("", text))


def singular_forms(token: str) -> frozenset[str]:
    """The token and the singulars it may be the plural of ("boxes" -> box, "berries" -> berry).

    Several candidates rather than one stem, because English plurals are ambiguous ("shoes" -> shoe,
    "boxes" -> box); "-es" is only dropped after s, x, z, ch, sh or o, so "andes" never yields "and".
    """
    forms = {token}
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        forms.add(token[:-1])
        if token.endswith("ies"):
            forms.add(token[:-3] + "y")
        elif token.endswith(("ses", "xes", "zes", "ches", "shes", "oes")):
            forms.add(token[:-2])
    return frozenset(forms)


class LexiconJudge:
    """Taxonomy term matching; the taxonomy is compiled once into an index keyed by first word."""

    name = "lexicon"

    def __init__(self, taxonomy: dict):
        concepts = taxonomy.get("concepts") if isinstance(taxonomy, dict) else None
        if not isinstance(concepts, dict) or not concepts:
            raise InvalidInput("the lexicon judge needs a taxonomy with a non-empty 'concepts' mapping")
        # first word of a term -> [(concept, words of the term)]
        self._index: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        for concept, spec in concepts.items():
            self._add_concept(concept, spec)
        self._cache: dict[str, frozenset[str]] = {}

    def _add_concept(self, concept: str, spec: object) -> None:
        if concept == NONE_LABEL:
            raise InvalidInput(f"taxonomy concept name {NONE_LABEL!r} is reserved for heads with no match")
        if TIE in concept:
            raise InvalidInput(f"taxonomy concept name {concept!r} contains {TIE!r}, which spells ties of labels")
        terms = spec.get("terms") if isinstance(spec, dict) else None
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise InvalidInput(f"taxonomy concept {concept!r} needs a 'terms' list of strings")
        for term in terms:
            words = tuple(tokenize(term))
            if not words:
                raise InvalidInput(f"taxonomy concept {concept!r} has a term with no words: {term!r}")
            self._index[words[0]].append((concept, words))

    def concepts_of(self, text: str) -> frozenset[str]:
        """Every concept whose terms occur in `text`."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        words = [singular_forms(tok) for tok in tokenize(text)]
        found: set[str] = set()
        for i, forms in enumerate(words):
            for form in forms:
                for concept, term in self._index.get(form, ()):
                    if concept not in found and _matches_at(words, i, term):
                        found.add(concept)
        result = frozenset(found)
        self._cache[text] = result
        return result

    def judge(self, heads: Sequence[Sequence[str]]) -> list[HeadJudgement]:
        return [self._judge_head(texts) for texts in heads]

    def _judge_head(self, texts: Sequence[str]) -> HeadJudgement:
        sets = [self.concepts_of(text) for text in texts]
        counts = Counter(concept for s in sets for concept in s)
        if not counts:
            return HeadJudgement(NONE_LABEL, tuple(False for _ in texts))
        top = max(counts.values())
        tied = sorted(c for c, n in counts.items() if n == top)  # sorted only to spell a tie one way
        verdicts = tuple(any(c in s for c in tied) for s in sets)
        return HeadJudgement(TIE.join(tied), verdicts, top if len(tied) > 1 else None)


def _matches_at(words: list[frozenset[str]], start: int, term: tuple[str, ...]) -> bool:
    if start + len(term) > len(words):
        return False
    return all(term[j] in words[start + j] for j in range(1, len(term)))


@JUDGES.register("lexicon")
def make_lexicon_judge(ctx: JudgeContext) -> Judge:
    return LexiconJudge(ctx.taxonomy)
