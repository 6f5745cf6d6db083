"""The `lexicon` judge (default): offline and deterministic, so a ranking can be reproduced anywhere.

A text's concepts are those whose taxonomy terms occur in it, as whole lowercase word sequences with
simple plural folding (the term "car" matches "cars", "box" matches "boxes", "berry" matches "berries";
not the reverse, so terms are best written in the singular); when several concepts match, only those
with the highest `priority` are kept. A head's label is the concept found in most of its texts (ties:
higher priority, then alphabetical), and a text is consistent when its concepts include that label
(METHOD.md §1.3-1.5). A head none of whose texts match anything is labelled "none", with CCS 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence

from surgeon.errors import InvalidInput
from surgeon.judges.base import JUDGES, HeadJudgement, Judge, JudgeContext

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
        self.priority: dict[str, int] = {}
        # first word of a term -> [(concept, words of the term)]
        self._index: dict[str, list[tuple[str, tuple[str, ...]]]] = defaultdict(list)
        for concept, spec in concepts.items():
            self._add_concept(concept, spec)
        self._cache: dict[str, frozenset[str]] = {}

    def _add_concept(self, concept: str, spec: object) -> None:
        if concept == NONE_LABEL:
            raise InvalidInput(f"taxonomy concept name {NONE_LABEL!r} is reserved for heads with no match")
        terms = spec.get("terms") if isinstance(spec, dict) else None
        priority = spec.get("priority", 0) if isinstance(spec, dict) else None
        if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
            raise InvalidInput(f"taxonomy concept {concept!r} needs a 'terms' list of strings")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidInput(f"taxonomy concept {concept!r} has a non-integer priority: {priority!r}")
        self.priority[concept] = priority
        for term in terms:
            words = tuple(tokenize(term))
            if not words:
                raise InvalidInput(f"taxonomy concept {concept!r} has a term with no words: {term!r}")
            self._index[words[0]].append((concept, words))

    def concepts_of(self, text: str) -> frozenset[str]:
        """The concepts whose terms occur in `text`, keeping only the highest priority among them."""
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
        if found:
            top = max(self.priority[c] for c in found)
            found = {c for c in found if self.priority[c] == top}
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
        label = min(counts, key=lambda c: (-counts[c], -self.priority[c], c))
        return HeadJudgement(label, tuple(label in s for s in sets))


def _matches_at(words: list[frozenset[str]], start: int, term: tuple[str, ...]) -> bool:
    if start + len(term) > len(words):
        return False
    return all(term[j] in words[start + j] for j in range(1, len(term)))


@JUDGES.register("lexicon")
def make_lexicon_judge(ctx: JudgeContext) -> Judge:
    return LexiconJudge(ctx.taxonomy)
