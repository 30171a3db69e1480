"""The chained-tuning toolkit's library: the stage scripts at the repository root run on it."""
