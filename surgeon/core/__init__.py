"""The floor every other package stands on: errors, bounds, paths and atomic writes, progress, registries,
integrity, caches, streaming statistics."""
