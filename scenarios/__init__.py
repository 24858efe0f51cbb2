"""Avalanche strategy, plugins and benchmarks for amstream learners (issue 3; not yet built)."""
