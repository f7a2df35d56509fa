"""The analysis: a model -> its merge groups (trace, graph IR, unit spaces, propagation, grouping)."""
