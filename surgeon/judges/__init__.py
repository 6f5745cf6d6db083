"""Judges register themselves in JUDGES on import."""

from surgeon.judges import llm  # noqa: F401
