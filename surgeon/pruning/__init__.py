"""The prune job: rank, select, operate, validate, export."""
