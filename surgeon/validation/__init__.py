"""Measuring a model: zero-shot accuracy, bias, retrieval, ablation sweeps, data records."""
