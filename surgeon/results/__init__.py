"""What a run measures and writes: bias and retrieval metrics, result records, run folders, plots."""
