"""The `lexicon` judge (default): offline and deterministic, so a ranking can be reproduced anywhere.

The rule, meant to answer as the paper's LLM judge would ("is this text associated with this label?"):
- a text is ABOUT every concept whose taxonomy terms occur in it, as whole lowercase word sequences with
  simple plural folding (the term "car" matches "cars", "box" matches "boxes", "berry" matches "berries"; not
  the reverse, so terms are best written in the singular). "a red square on a green background" is about
  colors, shapes and backgrounds alike: no concept hides another;
- a head's label is the concept the most of its texts are about, and a text is consistent when it is about
  the label: CCS is the number of consistent texts, so label, verdicts and CCS always agree. Ties of that
  count break, in order, toward (1) the concept of the earliest text about one tied concept but not another
  (TextSpan orders a head's texts by the variance they explain: the first is the strongest evidence); (2)
  when no text tells them apart (every text about one is about the other: each toy background line names a
  colour), the more specific concept, the one fewer of the distinct texts judged together (a ranking: every
  head's) are about; (3) the name, only for concepts no text of the call tells apart. The tie is not kept as
  a label ("colors|textures" with CCS 2 but 4 texts marked consistent, issue 24): a label must say which
  texts it counts. A tie moves no head in a ranking (CCS is the tied count either way);
- a head none of whose texts match anything is labelled "none", with CCS 0 (docs/METHOD.md §1.3-1.5).
A taxonomy's `priority` key (older files) is accepted and has no effect.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence

from surgeon.core.errors import InvalidInput
from surgeon.ranking.judges.base import JUDGES, HeadJudgement, Judge, JudgeContext

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
        # how many distinct texts of the call each concept is about: the specificity that breaks nested ties
        frequency = Counter(c for text in {t for texts in heads for t in texts} for c in self.concepts_of(text))
        return [self._judge_head(texts, frequency) for texts in heads]

    def _judge_head(self, texts: Sequence[str], frequency: Counter[str]) -> HeadJudgement:
        sets = [self.concepts_of(text) for text in texts]
        counts = Counter(concept for s in sets for concept in s)
        if not counts:
            return HeadJudgement(NONE_LABEL, tuple(False for _ in texts))
        top = max(counts.values())
        tied = [c for c, n in counts.items() if n == top]
        # earliest separating text (False sorts first), then the rarer concept, then the name (module docstring)
        label = min(tied, key=lambda c: (tuple(c not in s for s in sets), frequency[c], c))
        return HeadJudgement(label, tuple(label in s for s in sets))


def _matches_at(words: list[frozenset[str]], start: int, term: tuple[str, ...]) -> bool:
    if start + len(term) > len(words):
        return False
    return all(term[j] in words[start + j] for j in range(1, len(term)))


@JUDGES.register("lexicon")
def make_lexicon_judge(ctx: JudgeContext) -> Judge:
    return LexiconJudge(ctx.taxonomy)
