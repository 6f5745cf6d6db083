"""Judges label each head's TextSpan texts with a concept; importing a module registers it in JUDGES."""

from surgeon.judges import embedding, lexicon, llm  # noqa: F401
