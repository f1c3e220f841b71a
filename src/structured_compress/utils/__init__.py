"""Small utilities: FLOP counting, atomic file writes, run metrics."""
