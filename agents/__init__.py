"""Gymnasium agents whose value networks are trained by amstream learners (issue 4; not yet built)."""
