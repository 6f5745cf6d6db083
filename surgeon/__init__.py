"""surgeon: rank CLIP vision heads by Concept Consistency Score, prune, validate and export."""

__version__ = "0.1.0"
