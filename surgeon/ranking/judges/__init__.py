"""Judges label each head's TextSpan texts with a concept; importing a module registers it in JUDGES."""

from surgeon.ranking.judges import embedding, lexicon, llm  # noqa: F401
