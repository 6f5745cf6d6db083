"""Studies over models x policies x data, and the toy world's own apps (train, report)."""
