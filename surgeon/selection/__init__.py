"""Which heads to prune: policies and the bias-aware search."""
