"""Merging: statistics, similarities, matching, merged weights; the ``merge`` / ``prepare`` API."""
